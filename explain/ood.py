"""Out-of-distribution scores and metrics (higher score = more anomalous, everywhere).

Logit scores, per taxonomic level, from one level's logits: maximum softmax probability
(Hendrycks & Gimpel 2017), maximum logit (Hendrycks et al. 2022), normalised entropy, energy
(Liu et al. 2020) and generalised entropy GEN (Liu, Lochman & Zach 2023). A "flat" logit
vector scores high on all of them; a peaked one low. Feature scores on the embeddings: the
distance to the k-th nearest training image (Sun et al. 2022, FAISS via
:mod:`explain.neighbours`) and the Mahalanobis distance to the closest class mean under a
shared covariance (Lee et al. 2018).

Every score is one :class:`OODScore` entry, added with :func:`register_score` in this file: its
id, label, what it ``reads`` ("logits" or "features") and its function. The pages, the benchmark
and the tests iterate :func:`list_scores`, so adding a score is one registered function.

Metrics treat OOD images as positives for AUROC and AUPR. FPR95 follows the usual convention
(Hendrycks et al. 2019; Sun et al. 2022): the threshold keeps 95 % of in-distribution images
(TPR), and FPR is the share of OOD images that it keeps too.

The evaluation sets scored by the Anomalies page are built in explain/ood_evaluation.py; the
benchmark over them is ``python bench/ood_benchmark.py --json``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG_PATH = Path(__file__).resolve().parent.parent / "models" / "ood_config.json"
CONFIG: dict = json.loads(CONFIG_PATH.read_text())

#: ``reads`` values: a logit score maps one level's logits (N, K) to (N,); a feature score is
#: fitted on training embeddings and labels and returns the scorer of embeddings (N, D) → (N,).
READS = ("logits", "features")
LogitFn = Callable[[np.ndarray], np.ndarray]
FeatureFn = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class OODScore:
    """One registered OOD score (higher = more anomalous)."""

    name: str  #: id, as the pages, the benchmark and docs/results.md key it
    label: str  #: shown to users
    reads: str  #: "logits" or "features"
    fn: Callable  #: a LogitFn (reads logits) or a FeatureFn (reads features)


_SCORES: dict[str, OODScore] = {}


def register_score(name: str, label: str, reads: str) -> Callable[[Callable], Callable]:
    """Decorator that registers ``fn`` as the OOD score ``name`` reading ``reads`` (see :data:`READS`)."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {READS}, not {reads!r}")

    def deco(fn: Callable) -> Callable:
        if name in _SCORES:
            raise ValueError(f"OOD score {name!r} is already registered")
        _SCORES[name] = OODScore(name, label, reads, fn)
        return fn
    return deco


def unregister_score(name: str) -> OODScore:
    """Remove a registered score (e.g. a test's or a plugin's) and return its entry."""
    return _SCORES.pop(name)


def list_scores(reads: str | None = None) -> list[OODScore]:
    """The registered scores in registration order (logit scores first), optionally only those reading ``reads``."""
    return [s for s in _SCORES.values() if reads is None or s.reads == reads]


def score_names(reads: str | None = None) -> tuple[str, ...]:
    """Ids of :func:`list_scores`."""
    return tuple(s.name for s in list_scores(reads))


def get_score(name: str) -> OODScore:
    """The entry of score ``name``; KeyError naming the known ones otherwise."""
    try:
        return _SCORES[name]
    except KeyError:
        raise KeyError(f"unknown score {name!r}; known: {tuple(_SCORES)}") from None


def is_logit_score(name: str) -> bool:
    """Whether ``name`` is a registered score that reads logits."""
    return name in _SCORES and _SCORES[name].reads == "logits"


def __getattr__(name: str):
    """Legacy names, derived from the registry on every access: ``LOGIT_SCORES``,
    ``FEATURE_SCORES``, ``SCORES`` (ids) and ``SCORE_LABELS`` (id → label)."""
    if name == "LOGIT_SCORES":
        return score_names("logits")
    if name == "FEATURE_SCORES":
        return score_names("features")
    if name == "SCORES":
        return score_names()
    if name == "SCORE_LABELS":
        return {s.name: s.label for s in _SCORES.values()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- logit scores ------------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.where(np.isfinite(z), z, -1e9)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@register_score("msp", "1 − maximum softmax probability", "logits")
def msp(logits: np.ndarray) -> np.ndarray:
    """1 − maximum softmax probability, in [0, 1 − 1/K]."""
    return 1.0 - softmax(logits).max(-1)


@register_score("max_logit", "− maximum logit", "logits")
def max_logit(logits: np.ndarray) -> np.ndarray:
    """Negative maximum logit."""
    return -np.asarray(logits, dtype=np.float64).max(-1)


@register_score("entropy", "normalised entropy", "logits")
def entropy(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy of the softmax divided by log K, in [0, 1]."""
    p = softmax(logits)
    k = p.shape[-1]
    h = -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)
    return h / np.log(k) if k > 1 else np.zeros(p.shape[:-1])


@register_score("energy", "energy (− logsumexp)", "logits")
def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy −T·logsumexp(z / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.where(np.isfinite(z), z, -1e9)
    m = z.max(-1)
    return -temperature * (m + np.log(np.exp(z - m[..., None]).sum(-1)))


@register_score("gen", "generalised entropy (GEN)", "logits")
def gen(logits: np.ndarray, gamma: float | None = None, top_m: int | None = None) -> np.ndarray:
    """Generalised entropy Σ_{top M} p^γ (1 − p)^γ over the M largest probabilities."""
    gamma = CONFIG["gen_gamma"] if gamma is None else gamma
    top_m = CONFIG["gen_top_m"] if top_m is None else top_m
    p = np.sort(softmax(logits), -1)[..., ::-1][..., : max(1, min(top_m, np.shape(logits)[-1]))]
    return (p**gamma * (1 - p) ** gamma).sum(-1)


def logit_score(logits: np.ndarray, name: str) -> np.ndarray:
    """The registered logit score ``name`` for logits (N, K) → (N,) float64, higher = more anomalous."""
    if not is_logit_score(name):
        raise KeyError(f"unknown logit score {name!r}; known: {score_names('logits')}")
    return np.asarray(_SCORES[name].fn(np.atleast_2d(logits)), dtype=np.float64)


def feature_scorer(name: str, train_embeddings: np.ndarray, train_labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The registered feature score ``name`` fitted on training embeddings (M, D) and their leaf
    labels (M,): a function of embeddings (N, D) → (N,) float64, higher = more anomalous."""
    s = get_score(name)
    if s.reads != "features":
        raise KeyError(f"{name!r} is not a feature score; known: {score_names('features')}")
    fitted = s.fn(np.asarray(train_embeddings), np.asarray(train_labels))
    return lambda emb: np.asarray(fitted(np.asarray(emb)), dtype=np.float64)


def is_log_probability(logits: np.ndarray, tol: float = 1e-3) -> bool:
    """True when a level's outputs are already log-probabilities (logsumexp ≈ 0 for every row),
    as the flat model's upper levels: there max logit and energy carry no extra information."""
    z = np.atleast_2d(logits)
    return bool(len(z)) and bool(np.all(np.abs(energy(z)) < tol))


# --- feature scores ---------------------------------------------------------------------------
@dataclass
class Mahalanobis:
    """Class-conditional Gaussians with one shared covariance, stored whitened."""

    whiten: np.ndarray  # (D, D): x @ whiten has identity covariance
    means: np.ndarray  # (C, D) whitened class means

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the closest class mean."""
        q = np.asarray(embeddings, dtype=np.float64) @ self.whiten
        d = (q**2).sum(1)[:, None] - 2 * q @ self.means.T + (self.means**2).sum(1)[None]
        return np.maximum(d.min(1), 0.0)


def fit_mahalanobis(embeddings: np.ndarray, labels: np.ndarray, shrinkage: float | None = None) -> Mahalanobis:
    """Fit class means and the shared (within-class) covariance on training embeddings;
    ``shrinkage`` × mean variance is added to the diagonal for a stable inverse."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    if len(x) < 2:
        raise ValueError("need at least two training embeddings to fit a covariance")
    shrinkage = CONFIG["mahalanobis_shrinkage"] if shrinkage is None else shrinkage
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(x)
    cov += np.eye(len(cov)) * shrinkage * max(float(np.trace(cov)) / len(cov), 1e-12)
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(np.maximum(vals, 1e-12))
    return Mahalanobis(whiten, means @ whiten)


def knn_scores(train_embeddings: np.ndarray, query_embeddings: np.ndarray, k: int | None = None) -> np.ndarray:
    """kNN score: distance from each L2-normalised query to its k-th nearest training embedding."""
    return _knn_fitted(train_embeddings, k)(query_embeddings)


def _knn_fitted(train_embeddings: np.ndarray, k: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The k-th nearest distance to the L2-normalised training embeddings (exact distances)."""
    from .neighbours import KNN_K, build_index, knn_score, normalise

    train = normalise(train_embeddings)
    index, k = build_index(train), KNN_K if k is None else k
    return lambda emb: knn_score(index, emb, k, vectors=train).astype(np.float64)


@register_score("knn", "kNN distance (embedding)", "features")
def _knn(train_embeddings: np.ndarray, train_labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """kNN score fitted on the training embeddings (labels unused): the k-th nearest distance."""
    return _knn_fitted(train_embeddings)


@register_score("mahalanobis", "Mahalanobis distance (embedding)", "features")
def _mahalanobis(train_embeddings: np.ndarray, train_labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Mahalanobis score fitted on the training embeddings and labels."""
    return fit_mahalanobis(train_embeddings, train_labels).score


# --- metrics ----------------------------------------------------------------------------------
def _split(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(id_scores, dtype=np.float64).ravel(), np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    return a, b


def auroc(id_scores, ood_scores) -> float:
    """Probability that an OOD image scores higher than an in-distribution one (ties count ½)."""
    from scipy.stats import rankdata

    a, b = _split(id_scores, ood_scores)
    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


def aupr(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (step-wise, as scikit-learn)."""
    a, b = _split(id_scores, ood_scores)
    s = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each group of tied scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / len(b)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_at_tpr(id_scores, tpr: float | None = None) -> float:
    """The lowest threshold that keeps at least ``tpr`` of in-distribution images (kept: score ≤ t)."""
    tpr = CONFIG["tpr"] if tpr is None else tpr
    a = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())
    if len(a) == 0:
        raise ValueError("need in-distribution scores")
    k = int(np.ceil(np.clip(tpr, 0.0, 1.0) * len(a) - 1e-9))
    return float(a[max(k, 1) - 1])


def rates_at(id_scores, ood_scores, threshold: float) -> dict[str, float]:
    """At a threshold (anomalous: score > t): TPR = in-distribution kept, FPR = OOD kept,
    and the complementary "flagged" rates for each."""
    a = np.asarray(id_scores, dtype=np.float64).ravel()
    b = np.asarray(ood_scores, dtype=np.float64).ravel()
    tpr = float((a <= threshold).mean()) if len(a) else float("nan")
    fpr = float((b <= threshold).mean()) if len(b) else float("nan")
    return {"tpr": tpr, "fpr": fpr, "id_flagged": 1 - tpr, "ood_flagged": 1 - fpr}


def fpr_at_tpr(id_scores, ood_scores, tpr: float | None = None) -> float:
    """Share of OOD images kept at the threshold that keeps ``tpr`` of in-distribution images."""
    a, b = _split(id_scores, ood_scores)
    return rates_at(a, b, threshold_at_tpr(a, tpr))["fpr"]


def ood_metrics(id_scores, ood_scores, tpr: float | None = None) -> dict[str, float]:
    """AUROC, AUPR (OOD positive), FPR at ``tpr`` TPR and its threshold."""
    a, b = _split(id_scores, ood_scores)
    return {"auroc": auroc(a, b), "aupr": aupr(a, b), "fpr95": fpr_at_tpr(a, b, tpr), "threshold": threshold_at_tpr(a, tpr)}


def known_group_unknown_class(group_scores, leaf_scores, group_threshold: float, leaf_threshold: float) -> np.ndarray:
    """Images whose group head is peaked (score ≤ its threshold) while the leaf head is flat
    (score > its threshold): the model knows the group but not the class."""
    return (np.asarray(group_scores) <= group_threshold) & (np.asarray(leaf_scores) > leaf_threshold)
