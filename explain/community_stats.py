"""Diversity and dissimilarity of the groups' communities, with scikit-bio and SciPy.

Every measure reads the model's classes only ("unknown" is not a taxon). Richness counts the
classes with at least one image (estimated counts rounded), Shannon's index is in nats (natural
logarithm, scikit-bio's default), and Bray–Curtis compares compositions: each group's classes'
relative abundance, renormalised to sum 1 over the classes, so that a group with many images
moved to "unknown" is compared by what remains.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _composition(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, np.float64)
    tot = c.sum(-1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def bray_curtis_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row, the Bray–Curtis dissimilarity of two compositions (SciPy's ``braycurtis`` on
    relative abundances); NaN where either row is empty."""
    from scipy.spatial.distance import braycurtis

    pa, pb = _composition(a), _composition(b)
    out = np.full(len(pa), np.nan)
    for i in range(len(pa)):
        if pa[i].sum() > 0 and pb[i].sum() > 0:
            out[i] = braycurtis(pa[i], pb[i])
    return out


def expected_counts(est, estimator: str) -> np.ndarray:
    """(G, K) images per class by ``estimator`` (its relative abundance times the group's images)."""
    return est.shares[estimator][:, :-1] * est.grouped.images[:, None]


def diversity(est, estimator: str = "classify_and_count") -> pd.DataFrame:
    """Per group: richness (classes with at least one image) and Shannon's index (nats) of the
    counts ``estimator`` gives (scikit-bio ``alpha_diversity``)."""
    from skbio.diversity import alpha_diversity

    counts = expected_counts(est, estimator)
    ids = [str(g) for g in est.grouped.groups["group"]]
    ok = counts.sum(1) > 0
    rich = np.zeros(len(ids), np.int64)
    shannon = np.full(len(ids), np.nan)
    if ok.any():
        sub = [i for i, o in zip(ids, ok) if o]
        rich[ok] = alpha_diversity("observed_features", np.rint(counts[ok]).astype(np.int64), ids=sub).to_numpy()
        shannon[ok] = alpha_diversity("shannon", counts[ok], ids=sub).to_numpy()
    return pd.DataFrame({"group": est.grouped.groups["group"].to_numpy(), "images": est.grouped.images,
                         "richness": rich, "shannon": shannon})


def bray_curtis_between(est, estimator: str = "classify_and_count") -> pd.DataFrame:
    """The groups × groups Bray–Curtis dissimilarity of their compositions by ``estimator``
    (scikit-bio ``beta_diversity``); NaN for a group without any classified image."""
    from skbio.diversity import beta_diversity

    comp = _composition(expected_counts(est, estimator))
    ids = [str(g) for g in est.grouped.groups["group"]]
    ok = comp.sum(1) > 0
    out = pd.DataFrame(np.nan, index=ids, columns=ids)
    if ok.sum() >= 1:
        sub = [i for i, o in zip(ids, ok) if o]
        dm = beta_diversity("braycurtis", comp[ok], ids=sub)
        out.loc[sub, sub] = dm.data
    return out
