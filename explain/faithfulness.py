"""How faithful a saliency map is to the model.

Deletion / insertion (Petsiuk et al. 2018): remove (or add) pixels in attribution order and
track the class probability; a faithful map has a low deletion AUC and a high insertion AUC,
compared with random pixel orders. Model randomisation (Adebayo et al. 2018): a map that
barely changes when the last layers' weights are randomised does not explain the model.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.base import HierarchicalClassifier

from .saliency import MODEL_LOCK, attribute, target_index


@dataclass
class Curves:
    """Probability of the target class as a fraction of pixels is removed / added."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(np.trapezoid(self.insertion, self.fractions))


def pixel_order(attr: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices from most to least attributed (ties broken at random, reproducibly)."""
    a = np.asarray(attr, dtype=np.float64).ravel()
    tie = np.random.default_rng(seed).random(a.size)
    return np.lexsort((tie, -a))


def _masks(order: np.ndarray, shape: tuple[int, int], fractions: np.ndarray) -> torch.Tensor:
    """(len(fractions), 1, H, W) masks, 1 on the first ``fraction`` of pixels in ``order``."""
    n = shape[0] * shape[1]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    counts = np.round(fractions * n).astype(int)
    return torch.from_numpy(rank[None, :] < counts[:, None]).float().reshape(-1, 1, *shape)


@torch.no_grad()
def _probs(model: HierarchicalClassifier, images: torch.Tensor, level: str, t: int) -> np.ndarray:
    model.eval()
    with MODEL_LOCK:
        return model(images)[level].softmax(-1)[:, t].float().cpu().numpy()


def curves(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None,
           attr: np.ndarray, steps: int = 16) -> Curves:
    """Deletion and insertion curves of ``attr`` for ``target`` at ``level`` (baseline 0 = background)."""
    t = target_index(model, level, target, x)
    x = x[:1].float()
    fr = np.linspace(0.0, 1.0, steps + 1)
    m = _masks(pixel_order(attr), tuple(x.shape[-2:]), fr).to(x.dtype)
    p = _probs(model, torch.cat([x * (1 - m), x * m]), level, t)
    return Curves(fr, p[: steps + 1], p[steps + 1 :])


def random_references(model: HierarchicalClassifier, x: torch.Tensor, targets: dict[str, int | str | None],
                      steps: int = 16, n: int = 2, seed: int = 0) -> dict[str, float]:
    """Mean AUC of ``n`` random pixel orders for each ``{level: target}``: the chance level for
    deletion *and* insertion (one forward pass serves every level).

    Deleting the first k pixels of a random order leaves the image made by inserting the other
    n-k, so random insertion is random deletion read backwards, with the same area.
    """
    idx = {lvl: target_index(model, lvl, t, x) for lvl, t in targets.items()}
    x = x[:1].float()
    fr = np.linspace(0.0, 1.0, steps + 1)
    rng = np.random.default_rng(seed)
    hw = tuple(x.shape[-2:])
    m = torch.cat([_masks(rng.permutation(hw[0] * hw[1]), hw, fr) for _ in range(n)]).to(x.dtype)
    model.eval()
    with MODEL_LOCK, torch.no_grad():
        out = model(x * (1 - m))
    res = {}
    for lvl, t in idx.items():
        dele = out[lvl].softmax(-1)[:, t].float().cpu().numpy().reshape(n, -1)
        res[lvl] = float(np.mean(np.trapezoid(dele, fr, axis=1)))
    return res


def random_reference(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None,
                     steps: int = 16, n: int = 2, seed: int = 0) -> float:
    """Random-order AUC for one level (see :func:`random_references`)."""
    return random_references(model, x, {level: target}, steps, n, seed)[level]


@dataclass
class Faithfulness:
    """Deletion/insertion AUCs of a map and the AUC of random pixel orders (the reference)."""

    deletion_auc: float
    insertion_auc: float
    random_auc: float
    curves: Curves

    @property
    def verdict(self) -> str:
        """'faithful' when both AUCs beat random, 'partial' when one does, else 'not better than random'."""
        wins = int(self.deletion_auc < self.random_auc) + int(self.insertion_auc > self.random_auc)
        return ("not better than random", "partial", "faithful")[wins]

    def to_dict(self) -> dict:
        d = {k: round(float(v), 6) for k, v in asdict(self).items() if k != "curves"}
        d["verdict"] = self.verdict
        return d


def faithfulness(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None,
                 attr: np.ndarray, steps: int = 16, n_random: int = 2, reference: float | None = None) -> Faithfulness:
    """Deletion/insertion AUCs of ``attr`` next to random orders' (pass a cached ``reference``
    from :func:`random_reference` to skip recomputing it)."""
    t = target_index(model, level, target, x)
    c = curves(model, x, level, t, attr, steps)
    ref = reference if reference is not None else random_reference(model, x, level, t, steps, n_random)
    return Faithfulness(c.deletion_auc, c.insertion_auc, ref, c)


# --- model randomisation sanity check --------------------------------------------------------
def cascade_groups(model: HierarchicalClassifier) -> list[tuple[str, list[str]]]:
    """Parameter names randomised cumulatively, top first: the layers after the GradCAM block
    (heads), then that last convolutional block, then every remaining weight."""
    names = [n for n, _ in model.named_parameters()]
    block = getattr(model, "gradcam_block", None) or model.gradcam_layer  # a ViT's grid view has no weights
    cam = {id(p) for p in block.parameters()}
    cam_names = [n for n, p in model.named_parameters() if id(p) in cam]
    last = max(names.index(n) for n in cam_names)
    heads = [n for n in names[last + 1:] if n not in cam_names]
    rest = [n for n in names if n not in heads and n not in cam_names]
    return [("output heads", heads), ("+ last convolutional block", cam_names), ("+ all layers", rest)]


def _randomise_(model: torch.nn.Module, names: list[str], gen: torch.Generator) -> None:
    """Replace the named parameters with Gaussian noise of each tensor's own scale."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            s = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * (s if s > 0 else 0.02))


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation and SSIM of two maps' absolute values (1 = identical)."""
    from scipy.stats import spearmanr  # imported on use: only the sanity check needs them
    from skimage.metrics import structural_similarity

    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    rho = spearmanr(a.ravel(), b.ravel()).statistic if a.std() > 0 and b.std() > 0 else 0.0
    na, nb = (a / a.max() if a.max() > 0 else a), (b / b.max() if b.max() > 0 else b)
    ssim = structural_similarity(na, nb, data_range=1.0)
    return {"spearman": float(np.nan_to_num(rho)), "ssim": float(ssim)}


def randomisation_check(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None,
                        method: str = "integrated_gradients", seed: int = 0, **opts) -> list[dict]:
    """Cascading model randomisation: similarity of the map to the original after each step.

    Works on a copy; the given model is untouched. Low similarity means the map depends on
    what the model learned (the check is passed).
    """
    t = target_index(model, level, target, x)
    base = attribute(model, x, level, t, method, **opts)
    with MODEL_LOCK:
        rnd = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for label, names in cascade_groups(model):
        if not names:
            continue
        _randomise_(rnd, names, gen)
        out.append({"randomised": label, **map_similarity(base, attribute(rnd, x, level, t, method, **opts))})
    return out
