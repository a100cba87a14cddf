"""Captum saliency maps for one level of a hierarchical classifier.

``attribute(model, x, level, target, method)`` returns an (H, W) float32 map for a single image
``x`` (1, C, H, W) in the model's input space (foreground polarity, 0 = background). Methods:
Integrated Gradients (baseline = all background), Saliency, GradCAM (LayerGradCam on
``model.gradcam_layer``, upsampled), Occlusion and SmoothGrad (NoiseTunnel over Saliency).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from models.base import HierarchicalClassifier, LevelOutput

#: method id → label shown to users.
METHODS: dict[str, str] = {
    "integrated_gradients": "Integrated Gradients",
    "saliency": "Saliency (gradient)",
    "gradcam": "GradCAM",
    "occlusion": "Occlusion",
    "smoothgrad": "SmoothGrad",
}
#: methods whose maps are signed by nature (evidence for > 0, against < 0).
NATURALLY_SIGNED = frozenset({"integrated_gradients", "occlusion"})

#: Captum's layer methods put hooks on the shared (cached) model, which would also see other
#: threads' forward passes: every explain/ function runs its model calls under this lock.
MODEL_LOCK = threading.RLock()


def target_index(model: HierarchicalClassifier, level: str, target: int | str | None, x: torch.Tensor | None = None) -> int:
    """Index of ``target`` (a name or index) at ``level``; None means the predicted class."""
    if level not in model.levels:
        raise KeyError(f"unknown level {level!r}; levels are {list(model.levels)}")
    names = model.class_names[level]
    if target is None:
        if x is None:
            raise ValueError("target=None needs the input to find the predicted class")
        with MODEL_LOCK, torch.no_grad():
            return int(model(x[:1])[level][0].argmax())
    if isinstance(target, str):
        if target not in names:
            raise KeyError(f"{target!r} is not a {level} of this model")
        return names.index(target)
    t = int(target)
    if not 0 <= t < len(names):
        raise IndexError(f"target {t} out of range for level {level!r} ({len(names)} classes)")
    return t


def is_signed(method: str, signed: bool | None = None) -> bool:
    """Whether ``attribute`` returns a signed map for these arguments."""
    return method in NATURALLY_SIGNED if signed is None else bool(signed)


def attribute(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None = None,
              method: str = "integrated_gradients", *, signed: bool | None = None, return_delta: bool = False,
              n_steps: int = 32, internal_batch_size: int | None = None, window: int | None = None,
              nt_samples: int = 16, stdev: float = 0.15, seed: int = 0):
    """Attribution map (H, W) of ``level``'s logit for ``target`` (default: the predicted class).

    ``signed`` keeps the sign of Saliency/SmoothGrad gradients and of GradCAM before its ReLU
    (default: the usual unsigned form; IG and Occlusion are always signed). With
    ``return_delta`` also returns IG's convergence delta (sum of attributions minus the output
    difference to the baseline), None for other methods.
    """
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    # Imported on first use: Captum (and the matplotlib it loads) costs ~0.4 s, which the
    # dashboard's first paint of the predictions should not wait for.
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency

    x = x[:1].detach().float()
    model.eval()
    t = target_index(model, level, target, x)
    sgn = is_signed(method, signed)
    fwd = LevelOutput(model, level)
    if method in ("saliency", "gradcam", "smoothgrad"):
        x = x.clone().requires_grad_(True)
    delta = None
    with MODEL_LOCK, torch.enable_grad():
        if method == "integrated_gradients":
            ig = IntegratedGradients(fwd)
            attr, d = ig.attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps,
                                   internal_batch_size=internal_batch_size or n_steps, return_convergence_delta=True)
            delta = float(d.abs().max())
        elif method == "saliency":
            attr = Saliency(fwd).attribute(x, target=t, abs=not sgn)
        elif method == "gradcam":
            cam = LayerGradCam(fwd, model.gradcam_layer).attribute(x, target=t, relu_attributions=not sgn)
            attr = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        elif method == "occlusion":
            w = window or max(4, x.shape[-1] // 8)
            c = x.shape[1]
            attr = Occlusion(fwd).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, max(1, w // 2), max(1, w // 2)),
                                            baselines=0.0, target=t, perturbations_per_eval=256)
        else:  # smoothgrad
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)  # NoiseTunnel draws from the global generator
            try:
                attr = NoiseTunnel(Saliency(fwd)).attribute(x, nt_type="smoothgrad", nt_samples=nt_samples,
                                                            nt_samples_batch_size=nt_samples, stdevs=stdev,
                                                            target=t, abs=not sgn)
            finally:
                torch.random.set_rng_state(gen_state)
    out = attr.detach()[0].sum(0).float().cpu().numpy()
    return (out, delta) if return_delta else out


def attribute_all_levels(model: HierarchicalClassifier, x: torch.Tensor, method: str = "integrated_gradients",
                         targets: dict[str, int | str | None] | None = None, **opts) -> dict[str, np.ndarray]:
    """The same method at every level (root first), each for ``targets[level]`` or its argmax."""
    targets = targets or {}
    return {lvl: attribute(model, x, lvl, targets.get(lvl), method, **opts) for lvl in model.levels}


def contrast(model: HierarchicalClassifier, x: torch.Tensor, level: str, a: int | str, b: int | str,
             method: str = "integrated_gradients", **opts) -> np.ndarray:
    """"Why A rather than B": signed map(A) − signed map(B) at ``level`` (> 0 favours A)."""
    opts.pop("signed", None)
    return (attribute(model, x, level, a, method, signed=True, **opts)
            - attribute(model, x, level, b, method, signed=True, **opts))
