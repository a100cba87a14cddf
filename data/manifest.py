"""The dataset index: one parquet manifest per dataset, built once (with a progress bar) and reused.

Columns: relpath, dataset, class, living, group, subgroup, split, width, height, bytes.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .decode import ImageDecodeError, decode_image, load_for_model
from .paths import cache_dir, writer_temp
from .sources import Source
from .splits import DEFAULT_SEED, stratified_split
from .taxonomy import LEVELS

MANIFEST_VERSION = 1


def _manifest_path(src: Source, seed: int) -> Path:
    tax = src.taxonomy().version
    return cache_dir() / "manifests" / f"{src.name}-{src.fingerprint()}-t{tax}-s{seed}-v{MANIFEST_VERSION}.parquet"


def build_manifest(src: Source, seed: int = DEFAULT_SEED, progress: bool = True, rebuild: bool = False) -> pd.DataFrame:
    """The manifest of ``src``: cached on disk, rebuilt when the archive changes.

    A source with ``skip_unreadable`` (a biologist's collection, :mod:`data.collections_io`) has every
    image decoded: unreadable ones are left out of the manifest and reported with ``src.report``.
    Elsewhere an unreadable file stays in the index with size 0.
    """
    path = _manifest_path(src, seed)
    skip = getattr(src, "skip_unreadable", False)
    if path.exists() and not rebuild:
        df = pd.read_parquet(path)
        if skip:
            for rel in sorted({r for r, _ in src.files()} - set(df["relpath"])):
                src.report(rel, "corrupt_image", f"{rel} cannot be read as an image; left out of the index")
        return df
    tax = src.taxonomy()
    files = src.files()
    rows = []
    for relpath, cls in tqdm(files, desc=f"indexing {src.name}", disable=not progress, unit="img"):
        try:
            data = src.read_bytes(relpath)
        except (OSError, ValueError) as e:
            if not skip:
                raise
            src.report(relpath, "unreadable", f"{relpath} cannot be read ({e}); left out of the index")
            continue
        if skip:
            try:
                w, h = decode_image(data, mode=src.mode, background=src.background).original_size
            except ImageDecodeError as e:
                src.report(relpath, "corrupt_image", f"{relpath} cannot be read as an image ({e.message}); "
                           "left out of the index")
                continue
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    w, h = Image.open(io.BytesIO(data)).size
            except Exception:  # noqa: BLE001 - an unreadable file stays in the index with size 0
                w, h = 0, 0
        rows.append((relpath, cls, w, h, len(data)))
    df = pd.DataFrame(rows, columns=["relpath", "class", "width", "height", "bytes"])
    df.insert(1, "dataset", src.name)
    unknown = sorted(set(df["class"]) - set(tax.classes))
    if unknown:
        raise ValueError(f"classes missing from taxonomy {tax.name!r}: {unknown}")
    paths = tax.table.set_index("class")
    for lvl in LEVELS[:-1]:
        df[lvl] = df["class"].map(paths[lvl])
    df["split"] = stratified_split(df, seed)
    if src.sample and seed == DEFAULT_SEED:
        # the shipped sample keeps each image's split in the full archive, so that its "test"
        # images are never ones the zoo's models were trained on (data/sample.py)
        from .sample import sample_splits

        df["split"] = df["relpath"].map(sample_splits()).fillna(df["split"])
    df = df[["relpath", "dataset", "class", *LEVELS[:-1], "split", "width", "height", "bytes"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = writer_temp(path)
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return df


def decode_rows(src: Source, relpaths, size: int, colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The model input of each image of ``relpaths`` (the one decoding path of datasets and
    collections): uint8 (N, size, size) foreground, or (N, size, size, 3) with ``colour``, and a
    boolean (N,) that is False where the image could not be read or decoded (left blank)."""
    relpaths = list(relpaths) if not hasattr(relpaths, "__len__") else relpaths
    n = len(relpaths)
    out = np.zeros((n, size, size, 3) if colour else (n, size, size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    for i, rel in enumerate(relpaths):
        try:
            out[i], _, _ = load_for_model(src.read_bytes(rel), size, mode=src.mode, background=src.background, colour=colour)
        except (ImageDecodeError, OSError):
            ok[i] = False
    return out, ok


def decoded_array(src: Source, manifest: pd.DataFrame, size: int, progress: bool = True,
                  colour: bool = False) -> np.ndarray:
    """All manifest images as one uint8 array (N, size, size), foreground polarity (0 = background);
    (N, size, size, 3) with ``colour`` (:func:`data.decode.keeps_colour`).

    Cached on disk as .npy (memory-mapped on reuse), so training and batch inference decode
    each image once. Unreadable images become blank frames (and are reported).
    """
    key = f"{src.name}-{src.fingerprint()}-n{len(manifest)}-{pd.util.hash_pandas_object(manifest['relpath']).sum() & 0xFFFFFFFF:x}-{size}" + ("-rgb" if colour else "")
    shape = (len(manifest), size, size, 3) if colour else (len(manifest), size, size)
    path = cache_dir() / "arrays" / f"{key}.npy"
    if path.exists():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError, EOFError):
            pass  # damaged (a disk error, a hand edit): decoded again below
    relpaths = tqdm(manifest["relpath"], desc=f"decoding {src.name} @{size}px", disable=not progress, unit="img")
    out, ok = decode_rows(src, relpaths, size, colour)
    bad = int((~ok).sum())
    if bad:
        warnings.warn(f"{bad} unreadable images in {src.name} were left blank")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = writer_temp(path)
    np.save(tmp, out)
    tmp.replace(path)
    return out
