"""The model zoo: named checkpoints in ``models/zoo/`` (or ``$PLANKTON_LENS_ZOO``).

    python -m models.zoo [--json]

lists them with headline metrics and the one-line command that reproduces each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .base import HierarchicalClassifier
from .checkpoint import CheckpointError, load_checkpoint, read_manifest

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
#: Preferred default model for the dashboard, in order; the first present is used.
DEFAULT_ORDER = ("ndsb-bacnn", "ndsb-bcnn", "ndsb-flat", "ndsb-sbacnn")


def zoo_dirs() -> list[Path]:
    """Folders searched for checkpoints: ``$PLANKTON_LENS_ZOO`` (``:``-separated) then models/zoo."""
    extra = [Path(p) for p in os.environ.get("PLANKTON_LENS_ZOO", "").split(os.pathsep) if p]
    return [*extra, ZOO_DIR]


def _manifest_paths() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in zoo_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                out.setdefault(p.stem, p)
    return out


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
    """One entry per checkpoint: name, arch, dataset, held-out classes, metrics, command, path."""
    out = []
    for name, p in _manifest_paths().items():
        try:
            m = read_manifest(p)
        except CheckpointError as e:
            out.append({"name": name, "error": str(e), "path": str(p)})
            continue
        if m.get("format", "").startswith("plankton-lens-checkpoint") is False:
            continue
        out.append({
            "name": name, "arch": m.get("arch"), "dataset": m.get("dataset"), "heldout": m.get("heldout", []),
            "kind": m.get("kind", "classifier"), "parameters": m.get("parameters"),
            "size_mb": round(m.get("size_bytes", 0) / 2**20, 2), "metrics": headline(m),
            "command": m.get("command"), "path": str(p),
        })
    return out


#: Kinds of zoo entries that ``load_model`` returns as a ``HierarchicalClassifier``.
CLASSIFIER_KINDS = ("classifier", "clip")


def model_names(kind: str | None = "classifier", *, kinds: tuple[str, ...] | None = None) -> list[str]:
    """Names of the loadable zoo models of one ``kind`` (None: any), or of any of ``kinds``."""
    wanted = tuple(kinds) if kinds is not None else (None if kind is None else (kind,))
    return [m["name"] for m in list_models() if "error" not in m and (wanted is None or m["kind"] in wanted)]


def model_kind(name: str) -> str | None:
    """The kind ("classifier", "clip") of a zoo model, or None when there is no such model."""
    return next((m.get("kind", "classifier") for m in list_models() if m["name"] == name), None)


def default_model_name() -> str | None:
    names = model_names()
    for n in DEFAULT_ORDER:
        if n in names:
            return n
    return names[0] if names else None


def load_model(name: str) -> tuple[HierarchicalClassifier, dict]:
    """Load a zoo model by name (sha256-verified): a classifier, or a CLIP model wrapped as a
    :class:`~models.clip_model.ClipClassifier` (logits from its class prompt ensembles)."""
    paths = _manifest_paths()
    if name not in paths:
        raise CheckpointError(f"No model named {name!r} in the zoo ({', '.join(sorted(paths)) or 'empty'}).")
    if read_manifest(paths[name]).get("kind") == "clip":
        from .clip_model import ClipClassifier, load_clip_checkpoint  # open_clip: imported only when needed

        pc, manifest = load_clip_checkpoint(paths[name])
        return ClipClassifier(pc).eval(), manifest
    return load_checkpoint(paths[name])


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
        print(f"{m['name']:<24} {m['arch']:<7} {m['parameters'] / 1e6:.1f}M  leaf acc {met.get('class_accuracy', float('nan')):.3f}  "
              f"log loss {met.get('leaf_log_loss', float('nan')):.3f}")
        print(f"{'':<24} reproduce: {m['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
