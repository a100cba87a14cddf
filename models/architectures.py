"""Hierarchical classifiers: flat baseline, B-CNN, BA-CNN, SBA-CNN, registered by name."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data.taxonomy import Taxonomy

from .backbone import CompactResNet, TimmBackbone, gap, make_stage
from .base import HierarchicalClassifier

_REGISTRY: dict[str, type[HierarchicalClassifier]] = {}


def register(name: str) -> Callable[[type[HierarchicalClassifier]], type[HierarchicalClassifier]]:
    """Class decorator adding an architecture to the registry (as timm's ``register_model``)."""

    def deco(cls: type[HierarchicalClassifier]) -> type[HierarchicalClassifier]:
        cls.arch = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def create_model(arch: str, taxonomy: Taxonomy, config: dict | None = None) -> HierarchicalClassifier:
    """Build an architecture by name for ``taxonomy``."""
    if arch not in _REGISTRY:
        raise KeyError(f"unknown architecture {arch!r}; known: {list_architectures()}")
    return _REGISTRY[arch](taxonomy, dict(config or {}))


def _backbone(config: dict) -> CompactResNet | TimmBackbone:
    """The project's compact ResNet, or a timm trunk when ``config["backbone"]`` is ``timm/NAME``."""
    name = str(config.get("backbone", "compact"))
    channels = int(config.get("preprocessing", {}).get("channels", 1))
    if name.startswith("timm/"):
        return TimmBackbone(name.split("/", 1)[1], channels)
    if name != "compact":
        raise ValueError(f"unknown backbone {name!r} (compact or timm/NAME)")
    return CompactResNet(
        in_channels=int(config.get("preprocessing", {}).get("channels", 1)),
        widths=tuple(config.get("widths", (48, 96, 192, 256))),
        depths=tuple(config.get("depths", (1, 2, 2, 1))),
        stem_mode=str(config.get("stem_mode", "stride2")),
    )


def _log_sum_to_levels(leaf_logp: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Log-probabilities of every higher level from leaf log-probabilities (sum along the tree)."""
    return {lvl: torch.logsumexp(leaf_logp.unsqueeze(2) + m.unsqueeze(0), dim=1) for lvl, m in masks.items()}


class _TreeMixin:
    """Buffers mapping leaves to higher-level nodes, as additive log masks (0 or -inf)."""

    def _register_tree(self) -> None:
        for lvl in self.levels[:-1]:
            m = torch.from_numpy(self.taxonomy.level_matrix(lvl))
            self.register_buffer(f"_logmask_{lvl}", torch.log(m), persistent=False)

    def _masks(self) -> dict[str, torch.Tensor]:
        return {lvl: getattr(self, f"_logmask_{lvl}") for lvl in self.levels[:-1]}


@register("flat")
class FlatCNN(_TreeMixin, HierarchicalClassifier):
    """One leaf head; higher levels by summing leaf probabilities along the taxonomy."""

    def __init__(self, taxonomy: Taxonomy, config: dict):
        super().__init__(taxonomy, config)
        self.backbone = _backbone(self.config)
        self.drop = nn.Dropout(float(self.config.get("dropout", 0.2)))
        self.head = nn.Linear(self.backbone.widths[-1], self.num_classes("class"))
        self._register_tree()

    def forward_raw(self, x):
        f = gap(self.backbone.forward_stages(x)[-1])
        leaf = self.head(self.drop(f))
        out = _log_sum_to_levels(leaf.log_softmax(-1), self._masks())
        out["class"] = leaf
        return {lvl: out[lvl] for lvl in self.levels}, f

    def linear_heads(self):
        return {"class": self.head}  # the other levels are sums of the leaf's probabilities

    @property
    def gradcam_layer(self):
        return self.backbone.stages[-1]


def _head(cin: int, n: int, drop: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(drop), nn.Linear(cin, n))


@register("bcnn")
class BranchCNN(HierarchicalClassifier):
    """B-CNN (Zhu & Bain 2017): coarse heads branch off earlier blocks, the leaf head off the last.

    Level k's head reads stage ``branch_stages[k]``; per-level loss weights follow a schedule
    over epochs (``models.train.loss_weights``).
    """

    def __init__(self, taxonomy: Taxonomy, config: dict):
        super().__init__(taxonomy, config)
        self.backbone = _backbone(self.config)
        drop = float(self.config.get("dropout", 0.2))
        self.branch_stages = tuple(self.config.get("branch_stages", (1, 2, 3, 3))[: len(self.levels)])
        self.heads = nn.ModuleDict({
            lvl: _head(self.backbone.widths[s], self.num_classes(lvl), drop) for lvl, s in zip(self.levels, self.branch_stages)
        })

    def forward_raw(self, x):
        stages = [gap(s) for s in self.backbone.forward_stages(x)]
        out = {lvl: self.heads[lvl](stages[s]) for lvl, s in zip(self.levels, self.branch_stages)}
        return out, stages[self.branch_stages[-1]]

    def linear_heads(self):
        return {lvl: self.heads[lvl][-1] for lvl in self.levels}

    @property
    def gradcam_layer(self):
        return self.backbone.stages[-1]


@register("bacnn")
class BranchAttentionCNN(HierarchicalClassifier):
    """BA-CNN (Pizarro, Ñanculef & Valle 2023): branch features from several blocks, combined
    for each level by a learned attention over the branches, then that level's head."""

    def __init__(self, taxonomy: Taxonomy, config: dict):
        super().__init__(taxonomy, config)
        self.backbone = _backbone(self.config)
        d = int(self.config.get("attention_dim", 192))
        drop = float(self.config.get("dropout", 0.2))
        self.branch_stages = tuple(self.config.get("branch_stages", (1, 2, 3)))
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(self.backbone.widths[s], d), nn.ReLU(inplace=True)) for s in self.branch_stages)
        self.att_w = nn.Linear(d, d)
        self.att_v = nn.Parameter(torch.zeros(len(self.levels), d))  # one query per level
        self.heads = nn.ModuleDict({lvl: _head(d, self.num_classes(lvl), drop) for lvl in self.levels})

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch features (N, B, d) and attention weights (N, L, B) from a normalised batch."""
        stages = self.backbone.forward_stages(x)
        feats = torch.stack([p(gap(stages[s])) for p, s in zip(self.proj, self.branch_stages)], dim=1)
        scores = torch.einsum("nbd,ld->nlb", torch.tanh(self.att_w(feats)), self.att_v)
        return feats, scores.softmax(-1)

    def forward_raw(self, x):
        feats, alpha = self.attention(x)
        z = torch.einsum("nlb,nbd->nld", alpha, feats)
        out = {lvl: self.heads[lvl](z[:, i]) for i, lvl in enumerate(self.levels)}
        return out, z[:, -1]

    def linear_heads(self):
        return {lvl: self.heads[lvl][-1] for lvl in self.levels}

    @property
    def gradcam_layer(self):
        return self.backbone.stages[-1]


@register("sbacnn")
class SplitBranchCNN(HierarchicalClassifier):
    """SBA-CNN: level 1 decides living / non-living / unknown; a separate last block and heads
    per level-1 node handle the levels below it. P(node) = P(level-1 parent) · P(node | branch)."""

    def __init__(self, taxonomy: Taxonomy, config: dict):
        super().__init__(taxonomy, config)
        if str(self.config.get("backbone", "compact")) != "compact":
            raise ValueError("sbacnn splits the compact backbone's last stage; use flat, bcnn or bacnn with a timm backbone")
        self.backbone = _backbone(self.config)
        w = self.backbone.widths
        bw = int(self.config.get("branch_width", 160))
        drop = float(self.config.get("dropout", 0.2))
        self.backbone.stages = self.backbone.stages[:-1]  # shared up to stage 3
        root = self.levels[0]
        self.root_head = _head(w[-2], self.num_classes(root), drop)
        self.branches = nn.ModuleList()
        self.branch_heads = nn.ModuleList()
        table = taxonomy.table
        for k, node in enumerate(self.class_names[root]):
            self.branches.append(make_stage(w[-2], bw, 1))
            heads = nn.ModuleDict()
            for lvl in self.levels[1:]:
                members = sorted(table.loc[table[root] == node, lvl].unique())
                idx = torch.tensor([self.class_names[lvl].index(m) for m in members])
                self.register_buffer(f"_members_{k}_{lvl}", idx, persistent=False)
                heads[lvl] = _head(bw, len(members), drop)
            self.branch_heads.append(heads)

    def forward_raw(self, x):
        shared = self.backbone.forward_stages(x)[-1]
        root = self.levels[0]
        root_logits = self.root_head(gap(shared))
        root_logp = root_logits.log_softmax(-1)
        out = {root: root_logits}
        feats = []
        for lvl in self.levels[1:]:
            out[lvl] = torch.full((x.shape[0], self.num_classes(lvl)), float("-inf"), device=x.device, dtype=x.dtype)
        for k, (branch, heads) in enumerate(zip(self.branches, self.branch_heads)):
            f = gap(branch(shared))
            feats.append(f)
            for lvl in self.levels[1:]:
                idx = getattr(self, f"_members_{k}_{lvl}")
                out[lvl] = out[lvl].index_copy(1, idx, root_logp[:, k : k + 1] + heads[lvl](f).log_softmax(-1))
        return out, torch.cat(feats, dim=1)

    @property
    def gradcam_layer(self):
        return self.backbone.stages[-1]
