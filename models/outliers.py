"""Known outliers made from in-distribution images: adversarial examples, chimeras, corruptions.

Every generator takes a float batch (N, 1, S, S) in [0, 1], foreground polarity (0 =
background), and returns a batch of the same shape. Randomness comes from a CPU
``torch.Generator`` so outliers are reproducible. Used for outlier-exposure training
(:mod:`models.outlier_exposure`) and as the "known outliers" of the Anomalies page.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import HierarchicalClassifier

KINDS = ("adversarial", "chimera", "corruption")
CORRUPTIONS = ("noise", "blur", "pixelate", "jigsaw", "invert", "occlude")


def _rand(n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device)


# --- adversarial -------------------------------------------------------------------------------
def hierarchical_ce(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean cross-entropy to ``labels`` (the attack's objective)."""
    return sum(F.cross_entropy(out[lvl], labels[lvl]) for lvl in labels if lvl in out)


def adversarial(model: HierarchicalClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor],
                eps: float | torch.Tensor = 0.06, steps: int = 1, g: torch.Generator | None = None) -> torch.Tensor:
    """FGSM (``steps=1``; Goodfellow et al. 2015) or PGD with a random start (Madry et al.
    2018) in an L∞ ball of radius ``eps`` (a float or one per image). The model's mode is
    left as is (callers freeze batch norm); no parameter gradients are accumulated."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    x0 = x.detach()
    if steps > 1:
        noise = (torch.rand(x.shape, generator=g) if g is not None else torch.rand(x.shape)).to(x.device)
        adv = (x0 + (noise * 2 - 1) * eps_t).clamp(0, 1)
        step = eps_t * 2.5 / steps
    else:
        adv, step = x0.clone(), eps_t
    for _ in range(max(1, steps)):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = hierarchical_ce(model(adv), labels)
            (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.min(torch.max(adv, x0 - eps_t), x0 + eps_t).clamp(0, 1)
    return adv.detach()


# --- chimeras ---------------------------------------------------------------------------------
def partners(leaf: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each image, the index of a random other image of a different leaf class (itself
    when the batch holds a single class)."""
    n = leaf.shape[0]
    r = torch.rand(n, n, generator=g)
    same = (leaf.cpu()[:, None] == leaf.cpu()[None, :])
    r = r.masked_fill(same, -1.0)
    return r.argmax(1).to(leaf.device)


def _place(x: torch.Tensor, scale: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Shrink each image by ``scale`` and centre it at (cx, cy) in [-1, 1] coordinates."""
    n = x.shape[0]
    inv = 1.0 / scale
    zero = torch.zeros_like(scale)
    A = torch.stack([torch.stack([inv, zero, -cx * inv], 1), torch.stack([zero, inv, -cy * inv], 1)], 1)
    grid = F.affine_grid(A, [n, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def chimeras(x: torch.Tensor, leaf: torch.Tensor, g: torch.Generator, mode: str = "mixed") -> tuple[torch.Tensor, torch.Tensor]:
    """Two organisms of different classes in one image: ``paste`` puts both, shrunk, side by
    side (brightest pixel wins, as overlapping organisms in a shadowgraph); ``blend`` mixes them
    with a weight in [0.35, 0.65]; ``mixed`` does each for half of the batch. Returns the
    chimeras and the partner index of each image."""
    n, dev = x.shape[0], x.device
    j = partners(leaf, g)
    a, b = x, x[j]
    # paste
    s = 0.5 + 0.2 * _rand(n, g, dev)
    theta = _rand(n, g, dev) * 2 * math.pi
    d = 0.35 + 0.15 * _rand(n, g, dev)
    dx, dy = d * torch.cos(theta), d * torch.sin(theta)
    pasted = torch.max(_place(a, s, dx, dy), _place(b, s, -dx, -dy))
    # blend
    w = (0.35 + 0.3 * _rand(n, g, dev)).view(n, 1, 1, 1)
    blended = w * a + (1 - w) * b
    if mode == "paste":
        out = pasted
    elif mode == "blend":
        out = blended
    elif mode == "mixed":
        use_paste = (_rand(n, g, dev) < 0.5).view(n, 1, 1, 1)
        out = torch.where(use_paste, pasted, blended)
    else:
        raise ValueError(f"unknown chimera mode {mode!r}")
    return out.clamp(0, 1), j


# --- heavy corruptions ------------------------------------------------------------------------
def _jigsaw(x: torch.Tensor, g: torch.Generator, tiles: int = 4) -> torch.Tensor:
    n, c, h, w = x.shape
    th, tw = h // tiles, w // tiles
    t = x[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, tiles * tiles, c, th, tw)
    perm = torch.stack([torch.randperm(tiles * tiles, generator=g) for _ in range(n)]).to(x.device)
    t = t[torch.arange(n, device=x.device)[:, None], perm]
    t = t.reshape(n, tiles, tiles, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * tiles, tw * tiles)
    out = x.clone()
    out[:, :, : th * tiles, : tw * tiles] = t
    return out


def corrupt(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One heavy corruption applied to the whole batch."""
    n, _, h, w = x.shape
    dev = x.device
    if kind == "noise":
        sigma = (0.25 + 0.25 * _rand(n, g, dev)).view(n, 1, 1, 1)
        return (x + sigma * torch.randn(x.shape, generator=g).to(dev)).clamp(0, 1)
    if kind == "blur":
        k = 9
        return F.avg_pool2d(F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False), k, 1, k // 2, count_include_pad=False)
    if kind == "pixelate":
        small = F.adaptive_avg_pool2d(x, (max(1, h // 10), max(1, w // 10)))
        return F.interpolate(small, size=(h, w), mode="nearest")
    if kind == "jigsaw":
        return _jigsaw(x, g)
    if kind == "invert":  # the wrong polarity: a bright field with a dark organism
        return 1.0 - x
    if kind == "occlude":  # most of the organism hidden, speckle elsewhere
        out = x.clone()
        for i in range(n):
            bh, bw = int(h * (0.5 + 0.2 * torch.rand(1, generator=g))), int(w * (0.5 + 0.2 * torch.rand(1, generator=g)))
            y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
            x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
            out[i, :, y0 : y0 + bh, x0 : x0 + bw] = 0.0
        speckle = (torch.rand(x.shape, generator=g) < 0.08).to(dev)
        return torch.where(speckle, torch.ones_like(out), out)
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")


def corruptions(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image gets one heavy corruption drawn from :data:`CORRUPTIONS`."""
    pick = torch.randint(0, len(CORRUPTIONS), (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for k, name in enumerate(CORRUPTIONS):
        sel = (pick == k).nonzero().flatten().to(x.device)
        if len(sel):
            out[sel] = corrupt(x[sel], name, g)
    return out
