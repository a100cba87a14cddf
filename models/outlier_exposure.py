"""Outlier exposure with flat logits: a loss term that pushes every level's logits towards
uniform on known outliers made from the training batch (Hendrycks et al. 2019).

``python -m models.train ... --outlier-exposure mixed --oe-weight 0.5`` adds, to each step,
``oe_weight × flat_logit_loss(model(outliers))``, with outliers generated from a fraction of
the current (augmented) batch by :mod:`models.outliers`. The outlier forward pass runs with
batch-norm and dropout in eval mode: batch-norm running statistics stay those of
in-distribution images and the logits are flattened exactly as they are computed at test time.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import HierarchicalClassifier
from .outliers import adversarial, chimeras, corruptions

OE_KINDS = ("none", "adversarial", "chimera", "corruption", "mixed")


def flat_logit_loss(logits: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Cross-entropy from the uniform distribution to the softmax, minus its minimum log K,
    averaged over images and levels: 0 when every level's logits are flat.

    ``mask[level]`` (bool, per image) selects the images whose level should be flat (a chimera
    of two copepods need not be flat at the group level)."""
    terms = []
    for lvl, z in logits.items():
        z = torch.where(torch.isfinite(z), z, torch.full_like(z, -30.0))
        k = z.shape[-1]
        if k < 2:
            continue
        ce = torch.logsumexp(z, -1) - z.mean(-1) - math.log(k)
        m = mask.get(lvl) if mask is not None else None
        if m is None:
            terms.append(ce.mean())
        elif m.any():
            terms.append(ce[m].mean())
    if not terms:
        return next(iter(logits.values())).sum() * 0.0
    return torch.stack(terms).mean()


@contextlib.contextmanager
def frozen_norm(model: nn.Module):
    """Batch norm and dropout in eval mode inside the block; modes restored after."""
    mods = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))]
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, t in zip(mods, was):
            m.train(t)


@dataclass
class OutlierExposure:
    """The training hook: ``term(model, x_batch, labels, generator)`` → extra loss (scalar).

    ``fraction`` of the batch is turned into outliers; ``mixed`` splits them evenly between
    adversarial (FGSM, ε uniform in ``eps``), chimera and corruption outliers."""

    kind: str = "mixed"
    fraction: float = 0.5
    eps: tuple[float, float] = (0.03, 0.1)
    pgd_steps: int = 1

    def outliers(self, model: HierarchicalClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor],
                 g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outlier images from the batch and, per level, which of them should be flat there."""
        n = max(2, int(round(self.fraction * x.shape[0])))
        idx = torch.randperm(x.shape[0], generator=g)[:n].to(x.device)
        kinds = ("adversarial", "chimera", "corruption") if self.kind == "mixed" else (self.kind,)
        parts = torch.tensor_split(idx, len(kinds))
        xs, masks = [], {lvl: [] for lvl in labels}
        for kind, sel in zip(kinds, parts):
            if len(sel) == 0:
                continue
            xb, lb = x[sel], {lvl: v[sel] for lvl, v in labels.items()}
            if kind == "adversarial":
                eps = self.eps[0] + (self.eps[1] - self.eps[0]) * torch.rand(len(sel), generator=g)
                xo = adversarial(model, xb, lb, eps.to(x.device), steps=self.pgd_steps, g=g)
                m = {lvl: torch.ones(len(sel), dtype=torch.bool, device=x.device) for lvl in labels}
            elif kind == "chimera":
                leaf = lb[list(labels)[-1]]
                # partners come from the whole batch, so a small part still finds other classes
                xo, j = chimeras(torch.cat([xb, x]), torch.cat([leaf, labels[list(labels)[-1]]]), g)
                xo, j = xo[: len(sel)], j[: len(sel)]
                full = {lvl: torch.cat([lb[lvl], labels[lvl]]) for lvl in labels}
                m = {lvl: full[lvl][: len(sel)] != full[lvl][j] for lvl in labels}
            elif kind == "corruption":
                xo = corruptions(xb, g)
                m = {lvl: torch.ones(len(sel), dtype=torch.bool, device=x.device) for lvl in labels}
            else:
                raise ValueError(f"unknown outlier kind {kind!r}; known: {OE_KINDS[1:]}")
            xs.append(xo)
            for lvl in labels:
                masks[lvl].append(m[lvl])
        return torch.cat(xs), {lvl: torch.cat(v) for lvl, v in masks.items()}

    def __call__(self, model: HierarchicalClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor],
                 g: torch.Generator) -> torch.Tensor:
        with frozen_norm(model):
            xo, mask = self.outliers(model, x.detach(), labels, g)
            out = model(xo.contiguous(memory_format=torch.channels_last))
        return flat_logit_loss(out, mask)


def make_oe_term(kind: str, **options) -> OutlierExposure | None:
    """The outlier-exposure hook for ``--outlier-exposure kind`` (None for "none")."""
    if kind not in OE_KINDS:
        raise ValueError(f"unknown outlier-exposure kind {kind!r}; known: {OE_KINDS}")
    return None if kind == "none" else OutlierExposure(kind=kind, **options)
