"""Deterministic stratified splits and held-out-class protocols."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_SEED = 20150316  # NDSB 2015 closing date
DEFAULT_RATIOS = (0.7, 0.1, 0.2)
DATA_DIR = Path(__file__).resolve().parent


def _rank(keys: pd.Series, seed: int) -> np.ndarray:
    h = [int.from_bytes(hashlib.sha1(f"{seed}:{k}".encode()).digest()[:8], "big") for k in keys]
    return np.argsort(np.array(h, dtype=np.uint64), kind="stable")


def stratified_split(
    df: pd.DataFrame, seed: int = DEFAULT_SEED, ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    by: str = "class", key: str = "relpath",
) -> pd.Series:
    """A split label ("train" / "val" / "test") per row, stratified by ``by``.

    Depends only on the seed and the file names (not on row order). Classes with at least
    3 images have at least one image in every split.
    """
    out = pd.Series("train", index=df.index, dtype=object)
    for _, grp in df.groupby(by, sort=True):
        n = len(grp)
        order = grp.index.to_numpy()[_rank(grp[key], seed)]
        n_test = int(round(ratios[2] * n))
        n_val = int(round(ratios[1] * n))
        if n >= 3:
            n_test, n_val = max(1, n_test), max(1, n_val)
        elif n == 2:
            n_test, n_val = 1, 0
        else:
            n_test, n_val = 0, 0
        out.loc[order[:n_test]] = "test"
        out.loc[order[n_test:n_test + n_val]] = "val"
    return out


def heldout_classes(dataset: str = "ndsb", name: str = "default") -> list[str]:
    """Leaf classes held out of training for leave-class-out OOD and zero-shot protocols
    (``data/heldout_<dataset>.json``)."""
    cfg = json.loads((DATA_DIR / f"heldout_{dataset}.json").read_text())
    return list(cfg[name]["classes"])
