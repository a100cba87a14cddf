"""Explanations kept on disk, so that a restarted server finds the maps it computed before.

Saliency maps, IG convergence gaps, random-order references and faithfulness curves are small
(a 64 px map is 16 KB) but each costs 0.1–0.5 s of CPU to compute. The store keys each result
by the model (its name and sha256), the image (the sha1 of its model input) and every parameter
of the computation, so a retrained model or a changed image never reads a stale entry. Files
are ``.npz`` read with ``allow_pickle=False``; an unreadable file is recomputed and replaced.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from data.paths import cache_dir, writer_temp

STORE_VERSION = 1
MAX_FILES_PER_MODEL = 20_000  # about 350 MB of 64 px maps; the oldest tenth goes when exceeded
PRUNE_EVERY = 100  # saves between two counts of a model's folder
_META = "__meta__"
_saves = itertools.count()


@functools.lru_cache(maxsize=32)
def code_version(*modules) -> str:
    """A short hash of the modules' source: entries computed by older code are not reused."""
    h = hashlib.sha1()
    for m in modules:
        try:
            h.update(Path(m.__file__).read_bytes())
        except (OSError, TypeError, AttributeError):
            h.update(repr(m).encode())
    return h.hexdigest()[:12]


def store_dir() -> Path:
    return cache_dir() / "explanations"


def entry_path(model_key: str, kind: str, params: dict) -> Path:
    """Where the result of ``kind`` with ``params`` for the model ``model_key`` ("name:sha256") lives."""
    blob = json.dumps({"v": STORE_VERSION, "model": model_key, "kind": kind, **params}, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:24]
    folder = hashlib.sha1(model_key.encode()).hexdigest()[:16]
    return store_dir() / folder / f"{kind}-{digest}.npz"


def _encode(value: dict) -> dict[str, np.ndarray]:
    """Arrays stay arrays; scalars, strings and None go into one JSON entry."""
    arrays = {k: np.asarray(v) for k, v in value.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in value.items() if not isinstance(v, np.ndarray)}
    arrays[_META] = np.asarray(json.dumps(meta))
    return arrays


def _decode(z) -> dict:
    out = json.loads(str(z[_META]))
    out.update({k: z[k] for k in z.files if k != _META})
    return out


def load(path: Path) -> dict | None:
    """A stored result, or None when absent or unreadable (truncated, tampered, older format)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return _decode(z)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def save(path: Path, value: dict) -> None:
    """Write atomically (a writer-specific temporary file, then a rename); never raises: the
    store only saves time, so a full or read-only disk just means recomputing next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = writer_temp(path)
        np.savez(tmp, **_encode(value))
        tmp.replace(path)
        if next(_saves) % PRUNE_EVERY == 0:
            prune(path.parent)
    except OSError:
        pass


def prune(folder: Path, limit: int = MAX_FILES_PER_MODEL) -> None:
    """Keep a model's folder under ``limit`` entries by removing the oldest tenth."""
    files = [p for p in folder.glob("*.npz") if not p.name.startswith(".")]  # not a writer's temporary file
    if len(files) <= limit:
        return
    files.sort(key=lambda p: p.stat().st_mtime)
    for p in files[: max(1, len(files) // 10)]:
        p.unlink(missing_ok=True)


def cached(model_key: str, kind: str, params: dict, compute: Callable[[], dict]) -> dict:
    """The stored result of ``kind`` for these parameters, computing and storing it when absent.
    ``compute`` returns a dict of numpy arrays, numbers, strings and None."""
    path = entry_path(model_key, kind, params)
    value = load(path)
    if value is None:
        value = compute()
        save(path, value)
    return value
