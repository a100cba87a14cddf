"""Classification metrics per taxonomic level (plain numpy; checked against hand-computed values)."""
from __future__ import annotations

import numpy as np

from data.taxonomy import Taxonomy


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def prf_macro(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the classes present in ``y_true``.

    Classes absent from the ground truth are left out of the macro average (as scikit-learn's
    ``labels=`` restricted to the true classes); a class never predicted has precision 0.
    """
    cm = confusion(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = support > 0
    prec = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(n), where=(prec + rec) > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "f1": float(f1[present].mean()) if present.any() else 0.0,
        "precision": float(prec[present].mean()) if present.any() else 0.0,
        "recall": float(rec[present].mean()) if present.any() else 0.0,
    }


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Multi-class log loss as the NDSB 2015 competition scored it (rows renormalised, clipped)."""
    p = np.clip(probs, eps, 1 - eps)
    p = p / p.sum(1, keepdims=True)
    return float(-np.log(p[np.arange(len(y_true)), y_true]).mean())


def topk_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == y_true[:, None]).any(1).mean())


def consistency(preds: dict[str, np.ndarray], taxonomy: Taxonomy) -> float:
    """Fraction of images whose argmax at every level is the parent of the argmax below it."""
    ok = np.ones(len(next(iter(preds.values()))), dtype=bool)
    for lvl in taxonomy.levels[1:]:
        up = taxonomy.levels[taxonomy.levels.index(lvl) - 1]
        ok &= taxonomy.child_to_parent(lvl)[preds[lvl]] == preds[up]
    return float(ok.mean())


def mistake_severity(y_true: np.ndarray, y_pred: np.ndarray, taxonomy: Taxonomy) -> float:
    """Mean tree distance between true and predicted leaf over wrong predictions
    (Bertinetto et al. 2020); 0 when there are none."""
    wrong = y_true != y_pred
    if not wrong.any():
        return 0.0
    names = taxonomy.classes
    d = [taxonomy.distance(names[a], names[b]) for a, b in zip(y_true[wrong], y_pred[wrong])]
    return float(np.mean(d))


def evaluate_predictions(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], taxonomy: Taxonomy) -> dict:
    """The full metrics report (the ``models.evaluate`` JSON shape, without the model name).

    ``levels`` and ``leaf`` score the shown path (:func:`models.path.best_path`: one root-to-leaf
    path that respects the taxonomy); ``argmax_levels`` scores each level's own argmax, a
    diagnostic, whose agreement with the taxonomy is ``consistency`` (``path_consistency``: the
    shown path's, 1 by construction)."""
    from models.path import best_path

    argmax = {lvl: p.argmax(1) for lvl, p in probs.items()}
    path = best_path(probs, taxonomy)
    n = {lvl: len(taxonomy.names(lvl)) for lvl in taxonomy.levels}
    levels = {lvl: prf_macro(targets[lvl], path[lvl], n[lvl]) for lvl in taxonomy.levels}
    leaf = taxonomy.levels[-1]
    return {
        "levels": levels,
        "argmax_levels": {lvl: prf_macro(targets[lvl], argmax[lvl], n[lvl]) for lvl in taxonomy.levels if lvl in argmax},
        "leaf": {
            "accuracy": levels[leaf]["accuracy"],
            "top5": topk_accuracy(targets[leaf], probs[leaf], 5),
            "log_loss": log_loss(targets[leaf], probs[leaf]),
        },
        "consistency": consistency(argmax, taxonomy) if set(taxonomy.levels) <= set(argmax) else 1.0,
        "path_consistency": consistency(path, taxonomy),
        "level1_recall": level_recall(targets[taxonomy.levels[0]], path[taxonomy.levels[0]], taxonomy.names(taxonomy.levels[0])),
        "mistake_severity": mistake_severity(targets[leaf], path[leaf], taxonomy),
        "n_images": int(len(targets[leaf])),
    }


def level_recall(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """Recall of each node (None for a node with no true image), and their mean over the nodes
    present as ``balanced_accuracy`` (level 1: living / non-living / unknown)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(names):
        m = y_true == i
        out[name] = float((y_pred[m] == i).mean()) if m.any() else None
    present = [v for v in out.values() if v is not None]
    out["balanced_accuracy"] = float(np.mean(present)) if present else None
    return out
