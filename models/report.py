"""Writes generated sections of docs/results.md between ``<!-- BEGIN name -->`` / ``<!-- END name -->``
markers, so each benchmark command updates its own table and leaves the rest of the file alone."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def write_results_section(name: str, markdown: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the section ``name`` of docs/results.md with ``markdown``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Plankton Lens — measured results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def publish(result: dict, section: str, markdown: str, *, as_json: bool, results_path: Path | None = RESULTS) -> None:
    """What a benchmark command prints: its section written into docs/results.md (unless
    ``results_path`` is None), then the result as JSON or the Markdown on stdout."""
    if results_path is not None:
        print(f"wrote {write_results_section(section, markdown, results_path)}", file=sys.stderr)
    print(json.dumps(result, indent=1) if as_json else markdown)
