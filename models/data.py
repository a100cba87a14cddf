"""Training / evaluation arrays from the data layer: decoded images and per-level labels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data.manifest import build_manifest, decoded_array
from data.sources import Source, open_source
from data.splits import DEFAULT_SEED, heldout_classes
from data.taxonomy import LEVELS, Taxonomy, taxonomy_from_paths


@dataclass
class ArraySet:
    """Images (N, S, S) uint8 foreground, labels per level, and the manifest rows they came from."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    rows: pd.DataFrame


def restrict_taxonomy(tax: Taxonomy, drop: list[str]) -> Taxonomy:
    """The taxonomy without the ``drop`` leaf classes (for held-out-class training)."""
    if not drop:
        return tax
    keep = tax.table[~tax.table["class"].isin(drop)]
    t = taxonomy_from_paths(f"{tax.name}-minus{len(drop)}", {r[3]: (r[0], r[1], r[2]) for r in keep[list(LEVELS)].itertuples(index=False)})
    return t


def labels_for(rows: pd.DataFrame, tax: Taxonomy) -> dict[str, np.ndarray]:
    out = {}
    for lvl in tax.levels:
        pos = {n: i for i, n in enumerate(tax.names(lvl))}
        out[lvl] = rows[lvl].map(pos).to_numpy(dtype=np.int64).copy()
    return out


def load_dataset(dataset: str, size: int, holdout: str | None = None, seed: int = DEFAULT_SEED,
                 limit_per_class: int | None = None) -> tuple[Source, pd.DataFrame, np.ndarray, Taxonomy, list[str]]:
    """Source, manifest (with a ``heldout`` column), decoded images, model taxonomy, held-out classes."""
    src = open_source(dataset)
    df = build_manifest(src, seed=seed).copy()
    held = heldout_classes(dataset, holdout) if holdout else []
    df["heldout"] = df["class"].isin(held)
    if limit_per_class:
        df = df.groupby(["class", "split"], group_keys=False).head(limit_per_class).sort_index()
    images = decoded_array(src, df.reset_index(drop=True), size)
    df = df.reset_index(drop=True)
    tax = restrict_taxonomy(src.taxonomy(), held)
    return src, df, images, tax, held


def subset(df: pd.DataFrame, images: np.ndarray, tax: Taxonomy, split: str, heldout: bool = False) -> ArraySet:
    mask = (df["split"] == split) & (df["heldout"] == heldout)
    rows = df[mask]
    idx = rows.index.to_numpy()
    return ArraySet(np.asarray(images[idx]), labels_for(rows, tax) if not heldout else {}, rows)
