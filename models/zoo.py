"""The model zoo: named models in ``$PLANKTON_LENS_ZOO`` (default: the user data folder) and ``models/zoo/``.

    python -m models.zoo [--json]

lists them with headline metrics and the one-line command that reproduces each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError, read_manifest

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
#: Preferred default model for the dashboard, in order; the first present is used.
DEFAULT_ORDER = ("ndsb-bacnn", "ndsb-bcnn", "ndsb-flat", "ndsb-sbacnn")
#: Manifest formats the zoo lists: the project's checkpoints and imported models.
FORMATS = ("plankton-lens-checkpoint", "plankton-lens-import")


def user_zoo_dir() -> Path:
    """Where ``python -m models add`` registers models: the first folder of ``$PLANKTON_LENS_ZOO``,
    else ``models/`` inside the user data folder."""
    extra = [p for p in os.environ.get("PLANKTON_LENS_ZOO", "").split(os.pathsep) if p]
    if extra:
        return Path(extra[0]).expanduser()
    from data.paths import user_data_dir

    return user_data_dir() / "models"


def zoo_dirs() -> list[Path]:
    """Folders searched for models, first first: ``$PLANKTON_LENS_ZOO`` (``:``-separated; default
    the user data folder's ``models/``), then the project's own ``models/zoo``."""
    extra = [Path(p).expanduser() for p in os.environ.get("PLANKTON_LENS_ZOO", "").split(os.pathsep) if p]
    return [*(extra or [user_zoo_dir()]), ZOO_DIR]


def _entries() -> list[tuple[str, Path, dict | None, str | None]]:
    """Every manifest file of every zoo folder as (name, path, manifest or None, error or None),
    in search order; JSON files of other formats are left out."""
    out = []
    for d in zoo_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.json")):
            try:
                m = read_manifest(p)
            except CheckpointError as e:
                out.append((p.stem, p, None, str(e)))
                continue
            if not isinstance(m, dict):
                out.append((p.stem, p, None, f"Checkpoint manifest {p} is not a JSON object."))
                continue
            if not str(m.get("format", "")).startswith(FORMATS):
                continue
            out.append((str(m.get("name") or p.stem), p, m, None))
    return out


def manifest_path(name: str) -> Path | None:
    """The manifest of the first readable zoo entry called ``name`` (a broken entry of the same
    name earlier in the search order never hides it), or None."""
    return next((p for n, p, m, _ in _entries() if n == name and m is not None), None)


def headline(manifest: dict) -> dict:
    """Test-split headline metrics from a manifest (empty when absent)."""
    test = manifest.get("metrics", {}).get("test", {})
    if not test:
        return {}
    lv = test.get("levels", {})
    return {
        **{f"{k}_accuracy": round(v["accuracy"], 4) for k, v in lv.items()},
        "leaf_log_loss": round(test.get("leaf", {}).get("log_loss", float("nan")), 4),
        "consistency": round(test.get("consistency", float("nan")), 4),
    }


def list_models() -> list[dict]:
    """One entry per model: name, arch, dataset, held-out classes, metrics, command, path; a broken
    entry as ``{"name", "error", "path"}`` (listed, and never hiding a valid model of its name)."""
    out, seen = [], set()
    for name, p, m, err in _entries():
        if m is None:
            out.append({"name": name, "error": err, "path": str(p)})
            continue
        if name in seen:  # shadowed by an earlier folder's model of the same name
            continue
        seen.add(name)
        out.append({
            "name": name, "arch": m.get("arch"), "dataset": m.get("dataset"), "heldout": m.get("heldout", []),
            "kind": m.get("kind", "classifier"), "parameters": m.get("parameters"),
            "size_mb": round(m.get("size_bytes", 0) / 2**20, 2), "metrics": headline(m),
            "command": m.get("command"), "path": str(p), "source": "imported" if str(m.get("format", "")).startswith("plankton-lens-import") or m.get("pretrained")
            else "plankton-lens",
        })
    return out


#: Kinds of zoo entries that ``open_model`` returns behind the classifier interface.
CLASSIFIER_KINDS = ("classifier", "clip")


def model_names(kind: str | None = "classifier", *, kinds: tuple[str, ...] | None = None) -> list[str]:
    """Names of the loadable zoo models of one ``kind`` (None: any), or of any of ``kinds``."""
    wanted = tuple(kinds) if kinds is not None else (None if kind is None else (kind,))
    return [m["name"] for m in list_models() if "error" not in m and (wanted is None or m["kind"] in wanted)]


def model_kind(name: str) -> str | None:
    """The kind ("classifier", "clip") of a zoo model, or None when there is no such model."""
    return next((m.get("kind", "classifier") for m in list_models() if m["name"] == name and "error" not in m), None)


def default_model_name() -> str | None:
    names = model_names()
    for n in DEFAULT_ORDER:
        if n in names:
            return n
    return names[0] if names else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("The zoo is empty: train a model with python -m models.train --arch bacnn --dataset ndsb", file=sys.stderr)
        return 1
    for m in models:
        if "error" in m:
            print(f"{m['name']:<24} ERROR {m['error']}")
            continue
        met = m["metrics"]
        print(f"{m['name']:<24} {str(m['arch']):<7} {(m['parameters'] or 0) / 1e6:.1f}M  leaf acc {met.get('class_accuracy', float('nan')):.3f}  "
              f"log loss {met.get('leaf_log_loss', float('nan')):.3f}")
        print(f"{'':<24} {'reproduce' if m['source'] == 'plankton-lens' else 'imported'}: {m['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
