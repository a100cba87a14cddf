"""Bootstrap bands of the Community view's estimates (over images; seeded).

CC's and ACC's bootstraps are exact: they depend on a group's images only through the counts of
their categories (validated label per class, confirmed anomaly, moved to "unknown", kept and
predicted per class), resampled as a multinomial; ACC's also resamples the validation images
behind its confusion matrix (within each true class). PCC's and EM's resample at most
``band_images`` of a group's kept images (its EM subset's first ones) with bootstrap
multiplicities, their spread rescaled by sqrt(m / n) to the estimate's own number of images (the
m-out-of-n bootstrap).
"""
from __future__ import annotations

import math

import numpy as np

from . import quantify as Q
from .community_layout import Grouped

def bands(gr: Grouped, within: dict, kept_counts: np.ndarray, n_moved: np.ndarray, rates, vkeep, prior, subsets,
           em_n: np.ndarray, n_boot: int, seed: int, band_images: int, band: float,
           shares: dict) -> tuple[dict, dict]:
    """Bootstrap bands over images (see the module docstring)."""
    G, K = gr.n_groups, gr.k
    if n_boot <= 0:
        return ({e: np.full_like(s, np.nan) for e, s in shares.items()}, {e: np.full_like(s, np.nan) for e, s in shares.items()})
    rng = np.random.default_rng(seed)
    n = gr.images
    # image categories: validated label per class | confirmed anomaly | moved | kept, predicted per class
    cats = np.concatenate([gr.reviewed, gr.anomalies[:, None], n_moved[:, None], kept_counts], axis=1)
    draws = multinomial(rng, cats, n_boot)  # (B, G, 2K + 2)
    rev_b, unk_b = draws[..., :K], draws[..., K] + draws[..., K + 1]
    kc_b = draws[..., K + 2:]
    nk_b = kc_b.sum(-1)
    tot = np.broadcast_to(n.astype(np.float64), (n_boot, G))
    within_b: dict[str, np.ndarray] = {"classify_and_count": Q.shares(kc_b)}
    if rates is not None:
        within_b["adjusted_classify_and_count"] = Q.adjusted_classify_and_count(
            within_b["classify_and_count"], rates_boot(gr, vkeep, n_boot, rng))
    else:
        within_b["adjusted_classify_and_count"] = np.full((n_boot, G, K), np.nan)
    for e in ("probabilistic_classify_and_count", "em"):
        within_b[e] = np.full((n_boot, G, K), np.nan)
    if subsets is not None:
        pcc_b = np.broadcast_to(within["probabilistic_classify_and_count"], (n_boot, G, K)).copy()
        em_b = np.broadcast_to(within["em"], (n_boot, G, K)).copy()
        nk = kept_counts.sum(1)
        for i, idx in enumerate(subsets):
            m = min(len(idx), band_images)
            if m == 0:
                continue
            x = gr.posteriors(idx[:m])
            w = resample_weights(rng, m, n_boot)
            pcc_m = (w @ x) / m
            pcc_b[:, i] = within["probabilistic_classify_and_count"][i] + math.sqrt(m / nk[i]) * (pcc_m - x.mean(0))
            if prior is not None and em_n[i]:
                centre = within["em"][i] if m == em_n[i] else Q.em(x, prior)
                em_m = Q.em(x, prior, weights=w, start=centre)
                em_b[:, i] = within["em"][i] + math.sqrt(m / em_n[i]) * (em_m - centre)
        within_b["probabilistic_classify_and_count"] = np.clip(pcc_b, 0, 1)
        if prior is not None:
            within_b["em"] = np.clip(em_b, 0, 1)
    alpha = (1 - band) / 2 * 100
    low, high = {}, {}
    for e in Q.ESTIMATORS:
        taxa = (rev_b + nk_b[..., None] * np.nan_to_num(within_b[e], nan=0.0)) / tot[..., None]
        rep = np.concatenate([taxa, (unk_b / tot)[..., None]], axis=-1)
        lo, hi = np.percentile(rep, [alpha, 100 - alpha], axis=0)
        if not np.isfinite(within[e]).all():
            lo, hi = np.full_like(lo, np.nan), np.full_like(hi, np.nan)
        low[e], high[e] = np.minimum(lo, shares[e]), np.maximum(hi, shares[e])
    return low, high


def rates_boot(gr: Grouped, vkeep: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, K, K) confusion rates from the validation images resampled within each true class."""
    K = gr.k
    ok = (gr.base.val_true >= 0) & (gr.base.val_pred >= 0) & vkeep
    t, pr = gr.base.val_true[ok], gr.base.val_pred[ok]
    order = np.argsort(t, kind="stable")
    t, pr = t[order], pr[order]
    per = np.bincount(t, minlength=K)[:K]
    start = np.concatenate([[0], np.cumsum(per)[:-1]])
    pick = start[t] + np.floor(rng.random((n_boot, len(t))) * per[t]).astype(np.int64)  # a random image of the same class
    key = (np.arange(n_boot)[:, None] * K + pr[pick]) * K + t[None, :]
    c = np.bincount(key.ravel(), minlength=n_boot * K * K).reshape(n_boot, K, K).astype(np.float64)  # (B, pred, true)
    r = np.divide(c, per[None, None, :], out=np.zeros_like(c), where=per[None, None, :] > 0)
    empty = per == 0
    r[:, :, empty] = 0.0
    r[:, empty, empty] = 1.0
    return r


def multinomial(rng: np.random.Generator, counts: np.ndarray, n_boot: int) -> np.ndarray:
    """``n_boot`` resamples of each row of category ``counts`` (G, C): (B, G, C) multinomial
    draws of the row's total with its shares (drawn as conditional binomials, one vectorised
    draw per category that any row has)."""
    counts = np.asarray(counts, np.int64)
    G, C = counts.shape
    out = np.zeros((n_boot, G, C), np.int32)
    left = np.broadcast_to(counts.sum(1), (n_boot, G)).copy()
    rest = counts.sum(1).astype(np.float64)
    cols = np.flatnonzero(counts.sum(0) > 0)
    for j in cols[:-1]:
        p = np.divide(counts[:, j], rest, out=np.zeros(G), where=rest > 0)
        x = rng.binomial(left, np.clip(p, 0.0, 1.0))
        out[:, :, j] = x
        left -= x
        rest -= counts[:, j]
    if len(cols):
        out[:, :, cols[-1]] = left
    return out


def resample_weights(rng: np.random.Generator, m: int, n_boot: int) -> np.ndarray:
    """(B, m) bootstrap multiplicities: how often each of m images is drawn in m draws with replacement."""
    idx = rng.integers(0, m, size=(n_boot, m))
    key = (np.arange(n_boot)[:, None] * m + idx).ravel()
    return np.bincount(key, minlength=n_boot * m).reshape(n_boot, m).astype(np.float32)
