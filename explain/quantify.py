"""Quantification: a set of images' class prevalences from a classifier's outputs.

Four estimators, vectorised (a leading batch axis holds groups or bootstrap replicates):

- **classify and count** (CC): the share of images predicted in each class;
- **probabilistic classify and count** (PCC, Bella et al. 2010): the mean posterior;
- **adjusted classify and count** (ACC, Forman 2008): CC's shares ``q`` corrected by the model's
  confusion on its validation images, ``M[j, k] = P(predicted j | true k)``: the solution of
  ``M p = q``, clipped to [0, 1] and renormalised (QuaPy's ``ACC`` with ``norm="clip"``);
- **EM prior shift** (Saerens, Latinne & Decaestecker 2002): the maximum-likelihood prior of the
  new images, given the posteriors a model trained under the prior ``tau`` gives them (QuaPy's
  ``EMQ.EM``: same E- and M-steps, same stopping rule).

CC and ACC assume that the model's confusion on its validation images holds for the new images;
PCC and EM that its posteriors are calibrated and that only the class prior changed (p(x | y) is
the same). QuaPy (``quapy.method.aggregative``) is the reference these are tested against.
"""
from __future__ import annotations

import numpy as np

ESTIMATORS = ("classify_and_count", "probabilistic_classify_and_count", "adjusted_classify_and_count", "em")
SHORT = {"classify_and_count": "CC", "probabilistic_classify_and_count": "PCC",
         "adjusted_classify_and_count": "ACC", "em": "EM"}
#: EM stops when the mean absolute change of the prior is below this (after 11 iterations), as QuaPy's EMQ.
EM_EPSILON = 1e-4
EM_MAX_ITER = 1000


def shares(counts: np.ndarray) -> np.ndarray:
    """Counts (..., K) → shares summing to 1 along the last axis (all-zero rows stay zero)."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(-1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def classify_and_count(pred: np.ndarray, k: int) -> np.ndarray:
    """CC: the share of images whose predicted class index (in ``pred``) is each of ``k`` classes."""
    return shares(np.bincount(np.asarray(pred, dtype=np.int64), minlength=k)[:k])


def probabilistic_classify_and_count(proba: np.ndarray) -> np.ndarray:
    """PCC: the mean posterior of the images (N, K) → (K,)."""
    p = np.asarray(proba, dtype=np.float64)
    return p.mean(0) if len(p) else np.zeros(p.shape[1])


def confusion_rates(true: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``M[j, t] = P(predicted j | true t)`` from labelled images (class indices; a true index
    outside 0..k-1 is left out) and the images per true class. A class without images gets the
    identity column (it is taken as never confused: nothing is known of it)."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    ok = (true >= 0) & (true < k) & (pred >= 0) & (pred < k)
    c = np.bincount(pred[ok] * k + true[ok], minlength=k * k).reshape(k, k).astype(np.float64)
    n = c.sum(0)
    m = np.divide(c, n, out=np.zeros_like(c), where=n > 0)
    empty = n == 0
    m[:, empty] = 0.0
    m[empty, empty] = 1.0
    return m, n


def clip_normalise(p: np.ndarray) -> np.ndarray:
    """Clip prevalences to [0, 1] and rescale each vector to sum 1; an all-zero vector becomes
    uniform (QuaPy's ``normalize_prevalence(method="clip")``)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    tot = p.sum(-1, keepdims=True)
    k = p.shape[-1]
    return np.where(tot > 0, p / np.where(tot > 0, tot, 1.0), 1.0 / k)


#: Weight of ACC's pull towards classify-and-count (rates are in [0, 1]): it only matters where the
#: confusion matrix is singular, e.g. a class no validation image is predicted as, or two classes
#: always predicted alike; the validation images cannot tell the prevalence along those directions,
#: and among the exact solutions the one closest to CC's shares is taken.
ACC_RIDGE = 1e-9


def adjusted_classify_and_count(q: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """ACC: solve ``rates @ p = q`` for each of CC's share vectors ``q`` (..., K). ``rates``:
    one (K, K) matrix (:func:`confusion_rates`) for every vector, or (B, K, K), one per slice
    ``q[b]`` (bootstrap replicates: q (B, ..., K)). Solved as least squares pulled towards ``q``
    by :data:`ACC_RIDGE` (the exact solution when ``rates`` is invertible; where it is singular,
    the solution closest to CC), then clipped and renormalised (:func:`clip_normalise`)."""
    q = np.asarray(q, dtype=np.float64)
    m = np.asarray(rates, dtype=np.float64)
    k = q.shape[-1]
    mt = np.swapaxes(m, -1, -2)
    a = mt @ m + ACC_RIDGE * np.eye(k)
    if m.ndim == 2:
        rhs = q.reshape(-1, k).T
        p = np.linalg.solve(a, mt @ rhs + ACC_RIDGE * rhs).T.reshape(q.shape)
    else:
        qq = q.reshape(m.shape[0], -1, k).transpose(0, 2, 1)  # (B, K, n)
        p = np.linalg.solve(a, mt @ qq + ACC_RIDGE * qq).transpose(0, 2, 1).reshape(q.shape)
    return clip_normalise(p)


def smooth_prior(prior: np.ndarray) -> np.ndarray:
    """The training prior with QuaPy's smoothing: a zero entry gets ``EM_EPSILON`` added to every
    entry, then the vector is renormalised."""
    t = np.asarray(prior, dtype=np.float64).copy()
    t = t / t.sum() if t.sum() > 0 else np.full(len(t), 1.0 / len(t))
    if np.prod(t) == 0:
        t += EM_EPSILON
        t /= t.sum()
    return t


def em(proba: np.ndarray, prior: np.ndarray, weights: np.ndarray | None = None, start: np.ndarray | None = None,
       epsilon: float = EM_EPSILON, max_iter: int = EM_MAX_ITER) -> np.ndarray:
    """EM prior shift (Saerens et al. 2002) on posteriors ``proba`` (N, K) of a model trained
    under ``prior`` (K,): the prior (K,) that maximises the likelihood of the images.

    ``weights`` (B, N): B weighted replicates at once (bootstrap multiplicities) → (B, K);
    ``start`` (K,) or (B, K): where the iteration starts (default: the training prior).
    E-step: each image's posterior reweighted by ``estimate / prior`` and renormalised; M-step:
    their (weighted) mean. Stops as QuaPy's ``EMQ.EM`` does (mean absolute change below
    ``epsilon`` after more than 10 iterations, at most ``max_iter``)."""
    x = np.asarray(proba, dtype=np.float32)
    tau = smooth_prior(prior)
    single = weights is None
    w = np.ones((1, len(x)), np.float32) if single else np.asarray(weights, np.float32)
    b, k = w.shape[0], x.shape[1]
    tot = w.sum(1, keepdims=True).astype(np.float64)
    if len(x) == 0:
        return np.zeros(k) if single else np.zeros((b, k))
    q = np.broadcast_to(tau if start is None else np.asarray(start, np.float64), (b, k)).copy()
    active = np.ones(b, bool)
    prev = None
    for s in range(max_iter):
        ratio = (q[active] / tau).astype(np.float32)  # (b', K)
        denom = x @ ratio.T  # (N, b')
        np.maximum(denom, 1e-30, out=denom)
        new = ratio * ((w[active] / denom.T) @ x) / tot[active]  # (b', K)
        if prev is not None and s > 10:
            done = np.abs(new - prev[active]).mean(1) < epsilon
        else:
            done = np.zeros(len(new), bool)
        q[active] = new
        prev = q.copy()
        if done.any():
            idx = np.flatnonzero(active)
            active[idx[done]] = False
        if not active.any():
            break
    return q[0] if single else q


def training_prior(counts: np.ndarray, sampler: str = "uniform") -> np.ndarray:
    """The class prior a model's posteriors carry: its training images per class, reweighted as
    its training sampler drew them (``sqrt``: 1/sqrt(n) per image, ``balanced``: 1/n)."""
    n = np.asarray(counts, dtype=np.float64)
    if sampler == "sqrt":
        n = np.sqrt(n)
    elif sampler == "balanced":
        n = (n > 0).astype(np.float64)
    return shares(n)
