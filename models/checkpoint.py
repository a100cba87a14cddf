"""Checkpoints: safetensors weights plus a JSON manifest, verified by sha256 on load.

The manifest holds everything needed to rebuild and reproduce the model: architecture and
config, levels and class names, the full taxonomy table and its version, preprocessing, dataset
and split seed, held-out classes, metrics, the training command and the code version.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.taxonomy import Taxonomy

from .architectures import create_model
from .base import HierarchicalClassifier

REPO = Path(__file__).resolve().parent.parent


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, tampered with or incompatible."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=5)
        v = rev.stdout.strip() or "unknown"
        return v + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def save_checkpoint(model: HierarchicalClassifier, path: str | Path, **extra) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the manifest path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"arch": model.arch})
    tmp.replace(weights)
    manifest = {
        "name": path.stem,
        "format": "plankton-lens-checkpoint/1",
        **model.metadata(),
        "taxonomy": {**model.taxonomy.to_dict()},
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "size_bytes": weights.stat().st_size,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    mpath = path.with_suffix(".json")
    mtmp = mpath.with_name(mpath.name + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=1, default=float))
    mtmp.replace(mpath)
    return mpath


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    if p.suffix != ".json":
        p = p.with_suffix(".json")
    if not p.exists():
        raise CheckpointError(f"Checkpoint manifest {p} does not exist.")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint manifest {p} is not valid JSON ({e}).") from None


def verified_weights(path: str | Path, manifest: dict, verify: bool = True) -> Path:
    """The weights file named by a checkpoint's manifest; a missing file or (when ``verify``) a
    sha256 that differs from the manifest's raises :class:`CheckpointError`."""
    weights = Path(path).with_suffix(".json").parent / manifest.get("weights", "")
    if not weights.is_file():
        raise CheckpointError(f"Weights file {weights} for checkpoint {manifest.get('name')} is missing.")
    if verify:
        digest = sha256_file(weights)
        if digest != manifest.get("sha256"):
            raise CheckpointError(
                f"Checkpoint {manifest.get('name')!r} failed its integrity check: the weights' sha256 "
                f"({digest[:12]}…) does not match the manifest ({str(manifest.get('sha256'))[:12]}…). "
                "The file was modified or damaged; retrain it with the command in its manifest."
            )
    return weights


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[HierarchicalClassifier, dict]:
    """Rebuild a model from its manifest and weights; refuses a sha256 mismatch."""
    manifest = read_manifest(path)
    weights = verified_weights(path, manifest, verify)
    try:
        taxonomy = Taxonomy.from_dict(manifest["taxonomy"])
        model = create_model(manifest["arch"], taxonomy, manifest["config"])
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"Checkpoint {manifest.get('name')!r} cannot be loaded: {type(e).__name__}: {e}") from None
    model.eval()
    return model, manifest


def save_training_state(path: Path, state: dict) -> None:
    """Resumable training state (tensors and plain Python values only; read with weights_only)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_training_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
