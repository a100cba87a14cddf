"""What a benchmark command in bench/ prints: its section of docs/results.md (written by
:func:`models.report.write_results_section`), then the result as JSON or as Markdown."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from models.report import RESULTS, write_results_section


def publish(result: dict, section: str, markdown: str, *, as_json: bool, results_path: Path | None = RESULTS) -> None:
    """What a benchmark command prints: its section written into docs/results.md (unless
    ``results_path`` is None), then the result as JSON or the Markdown on stdout."""
    if results_path is not None:
        print(f"wrote {write_results_section(section, markdown, results_path)}", file=sys.stderr)
    print(json.dumps(result, indent=1) if as_json else markdown)
