"""The shown prediction of a hierarchical model: one path from the root to a leaf that respects
the taxonomy.

Each level's own argmax can contradict the level above (a "non-living" level 1 over a copepod
leaf). What every page and command shows instead is the leaf whose path has the highest product
of the per-level probabilities (the sum of their logs), with its ancestors at every level above;
the per-level argmax is kept only as a diagnostic (``inconsistent``). With the leaf level alone,
the path is the leaf's argmax lifted to its ancestors.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from data.taxonomy import Taxonomy

EPS = 1e-12


def leaf_ancestors(taxonomy: Taxonomy, levels: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """Per level, the index of every leaf class's ancestor (the leaf itself at the leaf level)."""
    return {lvl: taxonomy.leaf_to_level(lvl) for lvl in levels}


def best_path(probs: Mapping[str, np.ndarray], taxonomy: Taxonomy,
              levels: tuple[str, ...] | list[str] | None = None) -> dict[str, np.ndarray]:
    """Per level, the node index of each image's shown path: the leaf maximising the product of
    the probabilities of its path over the levels in ``probs``, lifted to its ancestors.

    ``probs``: level → (n, n_nodes) probabilities (rows need not sum to 1: log of each entry).
    Levels of ``levels`` (default: the taxonomy's) missing from ``probs`` still get the lifted
    path. Without the leaf level the per-level argmax is returned (no path to choose).
    """
    levels = tuple(levels or taxonomy.levels)
    leaf = taxonomy.levels[-1]
    if leaf not in probs:
        return {lvl: np.asarray(p).argmax(-1) for lvl, p in probs.items()}
    anc = leaf_ancestors(taxonomy, levels)
    p_leaf = np.asarray(probs[leaf], dtype=np.float64)
    score = np.zeros(p_leaf.shape, dtype=np.float64)
    for lvl in levels:
        if lvl in probs:
            score += np.log(np.maximum(np.asarray(probs[lvl], dtype=np.float64), EPS))[..., anc[lvl]]
    best = score.argmax(-1)
    return {lvl: anc[lvl][best] for lvl in levels}


def path_probabilities(probs: Mapping[str, np.ndarray], path: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per level, each image's probability of the node its shown path takes there."""
    out = {}
    for lvl, idx in path.items():
        if lvl in probs:
            p = np.asarray(probs[lvl])
            out[lvl] = np.take_along_axis(p.reshape(-1, p.shape[-1]), np.asarray(idx).reshape(-1, 1), 1).reshape(
                np.shape(idx))
    return out
