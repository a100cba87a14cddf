"""One model handle: ``open_model(name_or_path) -> LensModel`` for every page, command and benchmark.

A ``LensModel`` holds the network behind the one classifier interface
(:class:`~models.base.HierarchicalClassifier`: per-level logits, ``embed``, the saliency target
layer), its manifest, its preprocessing and one cache key (``name:sha256``). Every kind of zoo
entry opens through here: the project's own checkpoints, its CLIP models (as a
:class:`~models.clip_model.ClipClassifier`, the open_clip model in ``clip``), and models a user
imported with ``python -m models add`` (:mod:`models.foreign`). A model is loaded once per
process and reloaded when its manifest or weights change on disk.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .base import HierarchicalClassifier
from .checkpoint import CheckpointError, read_manifest

_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class LensModel:
    """A loaded model: ``classifier`` (every page's interface), its ``manifest`` and, for a CLIP
    model, the open_clip wrapper in ``clip`` (text prompts, image features)."""

    name: str
    classifier: HierarchicalClassifier
    manifest: dict
    path: str
    clip: Any = None  # models.clip_model.PlanktonClip for kind "clip"

    @property
    def sha256(self) -> str:
        return str(self.manifest.get("sha256") or "")

    @property
    def key(self) -> str:
        """The one cache key of this model's weights: ``name:sha256``."""
        return f"{self.name}:{self.sha256}"

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "classifier"))

    @property
    def preprocessing(self) -> dict:
        return self.classifier.preprocessing

    @property
    def size(self) -> int:
        return int(self.classifier.preprocessing["size"])

    @property
    def dataset(self) -> str | None:
        """The dataset whose images the model was trained on or imported for (None: unknown)."""
        return self.manifest.get("dataset")

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.classifier.levels)

    def require_clip(self):
        """The open_clip wrapper (:class:`~models.clip_model.PlanktonClip`); CheckpointError when
        this is not a CLIP model."""
        if self.clip is None:
            raise CheckpointError(f"Model {self.name!r} is not a CLIP model (kind {self.kind!r}).")
        return self.clip


def _resolve(name_or_path: str | Path) -> Path:
    from .zoo import manifest_path

    p = Path(str(name_or_path)).expanduser()
    if p.suffix == ".json" and p.is_file():
        return p.resolve()
    found = manifest_path(str(name_or_path))
    if found is None:
        from .zoo import model_names

        known = ", ".join(model_names(kind=None)) or "empty"
        raise CheckpointError(f"No model named {str(name_or_path)!r} in the zoo ({known}). "
                              "Import one with: python -m models add PATH --name NAME")
    return found


def _stamp(path: Path) -> tuple:
    """What identifies a model file's version on disk: the manifest's and the weights' stat."""
    out: list = [str(path)]
    for p in (path, *_weights_files(path)):
        try:
            st = p.stat()
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [None, None]
    return tuple(out)


def _weights_files(path: Path) -> list[Path]:
    try:
        m = read_manifest(path)
    except CheckpointError:
        return []
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    files = [m.get("weights"), m.get("weights_file"), source.get("weights")]
    return [(path.parent / f) for f in files if isinstance(f, str) and f]


@lru_cache(maxsize=8)
def _open(path: str, stamp: tuple) -> LensModel:
    p = Path(path)
    manifest = read_manifest(p)
    name = str(manifest.get("name") or p.stem)
    fmt = str(manifest.get("format", ""))
    if manifest.get("kind") == "clip":
        from .clip_model import ClipClassifier, load_clip_checkpoint  # open_clip: imported only when needed

        pc, manifest = load_clip_checkpoint(p)
        return LensModel(name, ClipClassifier(pc).eval(), manifest, str(p), pc)
    if fmt.startswith("plankton-lens-import"):
        from .foreign import load_imported

        model, manifest = load_imported(p)
        return LensModel(name, model, manifest, str(p))
    if fmt.startswith("plankton-lens-checkpoint"):
        from .checkpoint import load_checkpoint

        model, manifest = load_checkpoint(p)
        return LensModel(name, model, manifest, str(p))
    raise CheckpointError(f"{p} is not a Plankton Lens model manifest (format {fmt or 'missing'!r}).")


def open_model(name_or_path: str | Path) -> LensModel:
    """The model named ``name_or_path`` in the zoo, or the manifest at that path (sha256-verified;
    :class:`~models.checkpoint.CheckpointError` with a readable message otherwise)."""
    path = _resolve(name_or_path)
    with _LOCK:
        return _open(str(path), _stamp(path))


def clear_cache() -> None:
    """Forget every loaded model (tests; a server that wants to reload everything)."""
    _open.cache_clear()
