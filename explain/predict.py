"""Per-level predictions of one image: top-k, the shown path (one root-to-leaf path that respects
the taxonomy, :func:`models.path.best_path`) and where the levels' own argmaxes contradict it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.base import HierarchicalClassifier

from .saliency import MODEL_LOCK


@dataclass
class Prediction:
    """What the model says about one image at every taxonomic level (root first)."""

    levels: tuple[str, ...]
    probs: dict[str, np.ndarray]  # level → (n_classes,) probabilities
    topk: dict[str, list[tuple[str, float]]]  # level → [(name, probability)], best first
    path: dict[str, str]  # level → name on the shown path (highest product of probabilities)
    contradictions: dict[str, str] = field(default_factory=dict)  # level → message (of the argmaxes)
    argmax: dict[str, str] = field(default_factory=dict)  # level → that level's own argmax (a diagnostic)

    def probability(self, level: str, names: list[str]) -> float:
        """The probability at ``level`` of the node the shown path takes (``names``: the level's classes)."""
        return float(self.probs[level][names.index(self.path[level])])

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "argmax": self.argmax,
            "top_k": {lvl: [{"name": n, "probability": round(p, 6)} for n, p in v] for lvl, v in self.topk.items()},
            "contradictions": self.contradictions,
        }


def contradictions(model: HierarchicalClassifier, path: dict[str, str]) -> dict[str, str]:
    """Levels whose argmax is not a child of the argmax at the level above, with a message."""
    out = {}
    for i, lvl in enumerate(model.levels[1:], start=1):
        up = model.levels[i - 1]
        parent = model.taxonomy.parent(lvl, path[lvl])
        if parent != path[up]:
            out[lvl] = (f"{lvl} says {path[lvl]!r}, whose parent is {parent!r}, "
                        f"but {up} says {path[up]!r}")
    return out


@torch.no_grad()
def predict(model: HierarchicalClassifier, x: torch.Tensor, k: int = 5) -> Prediction:
    """Probabilities, top-``k``, the shown path and the argmax per level for one image ``x`` (1, C, S, S)."""
    from models.path import best_path

    model.eval()
    with MODEL_LOCK:
        out = model(x[:1])
    probs = {lvl: out[lvl][0].float().softmax(-1).cpu().numpy() for lvl in model.levels}
    topk, argmax = {}, {}
    for lvl, p in probs.items():
        order = np.argsort(-p)[: max(1, k)]
        names = model.class_names[lvl]
        topk[lvl] = [(names[i], float(p[i])) for i in order]
        argmax[lvl] = names[int(order[0])]
    best = best_path({lvl: p[None] for lvl, p in probs.items()}, model.taxonomy, model.levels)
    path = {lvl: model.class_names[lvl][int(best[lvl][0])] for lvl in model.levels}
    return Prediction(tuple(model.levels), probs, topk, path, contradictions(model, argmax), argmax)


def ground_truth_path(model: HierarchicalClassifier, cls: str | None) -> dict[str, str] | None:
    """The taxonomy path of a true leaf class, or None when the class is unknown to the model."""
    if not cls or cls not in model.class_names[model.levels[-1]]:
        return None
    return model.taxonomy.path(cls)
