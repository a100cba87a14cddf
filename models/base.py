"""The one interface every Plankton Lens classifier implements.

``model(x)`` maps a batch of preprocessed images (N, C, S, S) — foreground polarity in [0, 1],
0 = background (see ``data.decode.load_for_model``) — to ``{level: logits}`` for every taxonomic
level, root first. ``embed(x)`` gives the features the leaf head reads; ``gradcam_layer`` is the
convolutional block GradCAM should target; ``metadata()`` describes levels, class names,
taxonomy and preprocessing. Pages and explain functions use nothing else.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data.taxonomy import Taxonomy

DEFAULT_PREPROCESSING = {"size": 64, "channels": 1, "polarity": "foreground", "mean": 0.08, "std": 0.18}


def channel_tensor(value: float | list[float]) -> torch.Tensor:
    """A normalisation constant: a scalar, or one value per channel shaped (C, 1, 1), so that a
    1-channel foreground batch (N, 1, S, S) broadcasts to the network's C channels."""
    if isinstance(value, (list, tuple)):
        return torch.tensor([float(v) for v in value]).view(-1, 1, 1)
    return torch.tensor(float(value))


class HierarchicalClassifier(nn.Module):
    """Base class: holds taxonomy, config and preprocessing; subclasses define the network."""

    arch: str = "base"

    def __init__(self, taxonomy: Taxonomy, config: dict):
        super().__init__()
        self.taxonomy = taxonomy
        self.levels: tuple[str, ...] = tuple(taxonomy.levels)
        self.class_names: dict[str, list[str]] = {lvl: list(taxonomy.names(lvl)) for lvl in self.levels}
        self.config = dict(config)
        self.preprocessing = {**DEFAULT_PREPROCESSING, **config.get("preprocessing", {})}
        self.config["preprocessing"] = self.preprocessing
        self.register_buffer("_mean", channel_tensor(self.preprocessing["mean"]), persistent=False)
        self.register_buffer("_std", channel_tensor(self.preprocessing["std"]), persistent=False)
        # Per-level temperatures fitted on validation data (1 = none); stored with the weights.
        self.register_buffer("temperature", torch.ones(len(self.levels)))

    # --- to implement -------------------------------------------------------------------
    def forward_raw(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Uncalibrated logits per level and the embedding, from a normalised batch."""
        raise NotImplementedError

    @property
    def gradcam_layer(self) -> nn.Module:
        raise NotImplementedError

    def linear_heads(self) -> dict[str, nn.Linear]:
        """Per level, the final ``nn.Linear`` whose output is that level's logits, for the levels
        that have one (``models.refit`` refits them); none by default."""
        return {}

    # --- shared -------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _ = self.forward_raw(self.normalise(x))
        return {lvl: logits[lvl] / self.temperature[i] for i, lvl in enumerate(self.levels)}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the leaf head), shape (N, D)."""
        return self.forward_raw(self.normalise(x))[1]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities per level."""
        return {k: v.softmax(-1) for k, v in self(x).items()}

    def num_classes(self, level: str) -> int:
        return len(self.class_names[level])

    def metadata(self) -> dict:
        return {
            "arch": self.arch,
            "levels": list(self.levels),
            "class_names": self.class_names,
            "taxonomy": {"name": self.taxonomy.name, "version": self.taxonomy.version},
            "preprocessing": self.preprocessing,
            "config": self.config,
            "parameters": int(sum(p.numel() for p in self.parameters())),
        }


class LevelOutput(nn.Module):
    """Wraps a classifier so ``forward`` returns one level's logits (for Captum)."""

    def __init__(self, model: HierarchicalClassifier, level: str, probabilities: bool = False):
        super().__init__()
        self.model, self.level, self.probabilities = model, level, probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)[self.level]
        return out.softmax(-1) if self.probabilities else out


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 foreground arrays → float tensor in [0, 1]: grey (N, S, S) or (S, S) → (N, 1, S, S);
    colour (N, S, S, 3) or (S, S, 3) (for a model that keeps colour) → (N, 3, S, S)."""
    a = np.asarray(images)
    if a.ndim == 3 and a.shape[-1] == 3 and a.shape[0] == a.shape[1] != 3:
        a = a[None]  # one colour image
    if a.ndim == 2:
        a = a[None]
    t = torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t.unsqueeze(1)
