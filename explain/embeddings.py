"""Embeddings (the model's ``embed``) and calibrated logits for a dataset, cached on disk.

One forward pass gives both; they are stored under ``cache_dir()/embeddings`` in a file whose
name holds the model's sha256 and the dataset manifest's fingerprint, so the cache is rebuilt
when either changes. Every page and command reads them through :func:`split_embeddings` /
:func:`split_outputs`.

    python -m explain.embeddings build --model NAME [--dataset ndsb]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.decode import keeps_colour
from data.manifest import build_manifest, decoded_array
from data.paths import cache_dir, writer_temp
from data.sources import Source, open_source
from data.splits import DEFAULT_SEED
from models.base import HierarchicalClassifier, images_to_tensor
from models.handle import open_model

CACHE_VERSION = 1
ProgressFn = Callable[[float, str], None]


@dataclass
class Outputs:
    """Per-image embeddings (N, D) float32, calibrated logits per level, and the manifest rows."""

    embeddings: np.ndarray
    logits: dict[str, np.ndarray]
    rows: pd.DataFrame

    def take(self, mask: np.ndarray) -> "Outputs":
        idx = np.flatnonzero(mask)
        return Outputs(self.embeddings[idx], {k: v[idx] for k, v in self.logits.items()},
                       self.rows.iloc[idx].reset_index(drop=True))


@torch.no_grad()
def compute_outputs(model: HierarchicalClassifier, images_uint8: np.ndarray, batch_size: int = 256,
                    progress: bool = False, on_progress: ProgressFn | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embeddings (N, D) float32 and calibrated logits per level for uint8 foreground images (N, S, S).
    ``on_progress(fraction, message)`` is called after each batch (for a UI progress bar)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    embs: list[np.ndarray] = []
    logits: dict[str, list[np.ndarray]] = {lvl: [] for lvl in model.levels}
    for i in tqdm(range(0, len(images_uint8), batch_size), disable=not progress, desc="embedding", unit="batch"):
        x = images_to_tensor(np.array(images_uint8[i : i + batch_size])).to(device)  # a writable copy of a memmap slice
        raw, emb = model.forward_raw(model.normalise(x))
        embs.append(emb.float().cpu().numpy())
        for j, lvl in enumerate(model.levels):
            logits[lvl].append((raw[lvl] / model.temperature[j]).float().cpu().numpy())
        if on_progress:
            done = min(i + batch_size, len(images_uint8))
            on_progress(done / len(images_uint8), f"embedding {done:,} / {len(images_uint8):,} images")
    if not embs:
        d = int(model.embed(torch.zeros(1, 1, model.preprocessing["size"], model.preprocessing["size"])).shape[1])
        return np.zeros((0, d), np.float32), {k: np.zeros((0, model.num_classes(k)), np.float32) for k in model.levels}
    return np.concatenate(embs).astype(np.float32), {k: np.concatenate(v).astype(np.float32) for k, v in logits.items()}


def compute_embeddings(model: HierarchicalClassifier, images_uint8: np.ndarray, batch_size: int = 256,
                       progress: bool = False) -> np.ndarray:
    """The model's embedding of uint8 foreground images (N, S, S) → float32 (N, D)."""
    return compute_outputs(model, images_uint8, batch_size, progress)[0]


def manifest_key(manifest: pd.DataFrame, src: Source) -> str:
    """A fingerprint of a dataset manifest: its archive, files, classes and split assignment."""
    h = hashlib.sha256(src.fingerprint().encode())
    h.update(pd.util.hash_pandas_object(manifest[["relpath", "class", "split"]], index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def is_cached(model_name: str, dataset: str, limit_per_class: int | None = None) -> bool:
    """Whether the embeddings of ``dataset`` by ``model_name`` are already on disk."""
    man = open_model(model_name).manifest
    _, _, key = dataset_rows(dataset, man, limit_per_class)
    return cache_path(model_name, man["sha256"], dataset, key).exists()


def cache_path(model_name: str, model_sha: str, dataset: str, mkey: str) -> Path:
    return cache_dir() / "embeddings" / model_name / f"{dataset}__{model_sha[:16]}__{mkey}__v{CACHE_VERSION}.npz"


@lru_cache(maxsize=16)
def _rows(dataset: str, seed: int, limit_per_class: int | None, fingerprint: str) -> tuple[Source, pd.DataFrame, str]:
    src = open_source(dataset)
    df = build_manifest(src, seed=seed, progress=False)
    if limit_per_class:
        df = df.groupby(["class", "split"], group_keys=False).head(limit_per_class).sort_index()
    df = df.reset_index(drop=True)
    return src, df, manifest_key(df, src)


def dataset_rows(dataset: str, manifest: dict | None = None,
                 limit_per_class: int | None = None) -> tuple[Source, pd.DataFrame, str]:
    """Source, manifest rows of ``dataset`` and their fingerprint (:func:`manifest_key`); the split
    seed is the model's when it was trained on it. ``limit_per_class`` keeps the first n images of
    each class in each split (tests, quick looks). Memoised while the archive is unchanged."""
    seed = DEFAULT_SEED
    if manifest and manifest.get("dataset") == dataset:
        seed = int(manifest.get("split_seed", DEFAULT_SEED))
    src, df, key = _rows(dataset, seed, limit_per_class, open_source(dataset).fingerprint())
    return src, df.copy(deep=False), key


def dataset_manifest(dataset: str, manifest: dict | None = None,
                     limit_per_class: int | None = None) -> tuple[Source, pd.DataFrame]:
    """Source and manifest rows of ``dataset`` (see :func:`dataset_rows`)."""
    src, df, _ = dataset_rows(dataset, manifest, limit_per_class)
    return src, df


def _load(path: Path, levels: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    try:
        with np.load(path) as z:
            return z["embeddings"], {lvl: z[f"logits_{lvl}"] for lvl in levels}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # absent, or a truncated file from a killed run: rebuilt


def evict_stale(folder: Path, current: Path) -> None:
    """Remove files in ``folder`` derived from older weights of the same model for the same dataset
    manifest (names ``<dataset>__<sha>__<manifest>__…``)."""
    dataset, sha, mkey = current.name.split("__")[:3]
    for p in folder.glob(f"{dataset}__*__{mkey}__*"):
        if p.name.split("__")[1] != sha:
            p.unlink(missing_ok=True)


def split_outputs(model_name: str, dataset: str, split: str | None = None, progress: bool = False,
                  limit_per_class: int | None = None, on_progress: ProgressFn | None = None) -> Outputs:
    """Embeddings, logits and manifest rows of ``dataset`` (one split or all), cached on disk.

    The whole dataset (or its ``limit_per_class`` subset) is embedded once; the cache file is keyed
    by the model's sha256 and the dataset manifest, so a retrained model or a changed dataset
    gives a fresh file (and the stale one is removed).
    """
    lm = open_model(model_name)
    model, man = lm.classifier, lm.manifest
    src, rows, key = dataset_rows(dataset, man, limit_per_class)
    path = cache_path(model_name, man["sha256"], dataset, key)
    got = _load(path, list(model.levels)) if path.exists() else None
    if got is None or len(got[0]) != len(rows):
        t0 = time.time()
        if on_progress:
            on_progress(0.0, f"decoding {len(rows):,} {dataset} images")
        images = decoded_array(src, rows, int(model.preprocessing["size"]), progress=progress,
                               colour=keeps_colour(model.preprocessing, src.mode))
        emb, logits = compute_outputs(model, images, progress=progress, on_progress=on_progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = writer_temp(path)
        np.savez(tmp, embeddings=emb, **{f"logits_{k}": v for k, v in logits.items()})
        tmp.replace(path)
        evict_stale(path.parent, path)
        if progress:
            print(f"embedded {len(rows):,} {dataset} images with {model_name} in {time.time() - t0:.1f} s → {path}",
                  file=sys.stderr)
        got = (emb, logits)
    out = Outputs(got[0], got[1], rows)
    return out if split is None else out.take((rows["split"] == split).to_numpy())


def split_embeddings(model_name: str, dataset: str, split: str | None = None, progress: bool = False,
                     limit_per_class: int | None = None, on_progress: ProgressFn | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Embeddings (N, D) float32 and the manifest rows of ``dataset`` (one split or all)."""
    o = split_outputs(model_name, dataset, split, progress, limit_per_class, on_progress)
    return o.embeddings, o.rows


def predictions_frame(logits: dict[str, np.ndarray], model: HierarchicalClassifier) -> pd.DataFrame:
    """Per image and level: the shown prediction (``pred_<level>``: the taxonomy path of highest
    product of probabilities, :func:`models.path.best_path`) and its probability
    (``pred_conf_<level>``); ``inconsistent`` is True where two adjacent levels' own argmaxes are
    not parent and child in the taxonomy (a diagnostic), and ``inconsistency`` says which."""
    from models.path import best_path, path_probabilities

    out: dict[str, np.ndarray] = {}
    probs, idx = {}, {}
    for lvl in model.levels:
        z = logits[lvl] - logits[lvl].max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        probs[lvl], idx[lvl] = p, p.argmax(1)
    path = best_path(probs, model.taxonomy, model.levels)
    conf = path_probabilities(probs, path)
    for lvl in model.levels:
        out[f"pred_{lvl}"] = np.asarray(model.class_names[lvl], dtype=object)[path[lvl]]
        out[f"pred_conf_{lvl}"] = conf[lvl].astype(np.float32)
    n = len(next(iter(idx.values()))) if idx else 0
    why = np.full(n, "", dtype=object)
    for up, lvl in zip(model.levels[:-1], model.levels[1:]):
        parent = model.taxonomy.child_to_parent(lvl)[idx[lvl]]
        bad = parent != idx[up]
        names_up, names_lvl = np.asarray(model.class_names[up], dtype=object), np.asarray(model.class_names[lvl], dtype=object)
        for i in np.flatnonzero(bad):
            msg = (f"{up} {names_up[idx[up][i]]!r} but {lvl} {names_lvl[idx[lvl][i]]!r} "
                   f"(which belongs to {names_up[parent[i]]!r})")
            why[i] = msg if not why[i] else f"{why[i]}; {msg}"
    df = pd.DataFrame(out)
    df["inconsistent"] = why != ""
    df["inconsistency"] = why
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explain.embeddings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="embed every image of a dataset with a zoo model (cached)")
    b.add_argument("--model", required=True, help="zoo model name (python -m models.zoo lists them)")
    b.add_argument("--dataset", default=None, help="dataset name (default: the model's own)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    b.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                   help="only the first N images per class and split (a quick look)")
    args = ap.parse_args(argv)
    from data.sources import DatasetNotFound
    from models.checkpoint import CheckpointError

    try:
        dataset = args.dataset or open_model(args.model).dataset or "ndsb"
        t0 = time.time()
        o = split_outputs(args.model, dataset, progress=not args.json, limit_per_class=args.limit_per_class)
    except (CheckpointError, DatasetNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    man = open_model(args.model).manifest
    _, _, key = dataset_rows(dataset, man, args.limit_per_class)
    info = {"model": args.model, "dataset": dataset, "images": len(o.rows), "dim": int(o.embeddings.shape[1]),
            "seconds": round(time.time() - t0, 2),
            "cache": str(cache_path(args.model, man["sha256"], dataset, key))}
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
