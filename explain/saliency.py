"""Captum saliency maps for one level of a hierarchical classifier, from a registry of methods.

``attribute(model, x, level, target, method)`` returns an (H, W) float32 map for a single image
``x`` (1, C, H, W) in the model's input space (foreground polarity, 0 = background).

Every method is one :class:`SaliencyMethod` entry, added with :func:`register_method` (in the
style of timm's model registry): its id, the label shown to users, whether its map is signed by
nature, whether it needs a target layer (``model.gradcam_layer``) and whether it reports a
convergence delta. Its function has Captum's uniform shape, ``fn(forward, x, target, *,
signed, layer, **options) -> (attributions like x, delta or None)``, so the same entry serves
a classifier level (:func:`attribute`) and any other scalar-per-image forward module, such as
a CLIP image tower's similarity to a prompt (:func:`attribute_forward`). Registered here:
Integrated Gradients (baseline = all background), Saliency, GradCAM (LayerGradCam on the layer,
upsampled), Occlusion and SmoothGrad (NoiseTunnel over Saliency).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.base import HierarchicalClassifier, LevelOutput

#: ``fn(forward, x, target, *, signed, layer, n_steps, internal_batch_size, window, nt_samples,
#: stdev, seed, ...)`` → (attributions shaped like ``x``, convergence delta or None). Functions
#: take the options they use by keyword and ignore the rest (``**_``).
AttributionFn = Callable[..., tuple[torch.Tensor, "float | None"]]


@dataclass(frozen=True)
class SaliencyMethod:
    """One registered saliency method."""

    name: str  #: id, as the pages and the explanation store key it
    label: str  #: shown to users
    fn: AttributionFn
    signed: bool = False  #: its map is signed by nature (evidence for > 0, against < 0)
    needs_layer: bool = False  #: needs a target layer (``model.gradcam_layer``)
    has_delta: bool = False  #: reports a convergence delta (``return_delta``)


_METHODS: dict[str, SaliencyMethod] = {}

#: Captum's layer methods put hooks on the shared (cached) model, which would also see other
#: threads' forward passes: every explain/ function runs its model calls under this lock.
MODEL_LOCK = threading.RLock()


def register_method(name: str, label: str, *, signed: bool = False, needs_layer: bool = False,
                    has_delta: bool = False) -> Callable[[AttributionFn], AttributionFn]:
    """Decorator that registers ``fn`` as the saliency method ``name`` (a duplicate id is an error)."""
    def deco(fn: AttributionFn) -> AttributionFn:
        if name in _METHODS:
            raise ValueError(f"saliency method {name!r} is already registered")
        _METHODS[name] = SaliencyMethod(name, label, fn, signed=signed, needs_layer=needs_layer, has_delta=has_delta)
        return fn
    return deco


def unregister_method(name: str) -> SaliencyMethod:
    """Remove a registered method (e.g. a test's or a plugin's) and return its entry."""
    return _METHODS.pop(name)


def list_methods() -> list[SaliencyMethod]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def get_method(name: str) -> SaliencyMethod:
    """The entry of method ``name``; KeyError naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {list(_METHODS)}") from None


def target_layer(model: nn.Module) -> nn.Module | None:
    """The model's layer for layer methods (``model.gradcam_layer``), None when it has none
    (the property raises NotImplementedError or AttributeError, or returns None)."""
    try:
        return model.gradcam_layer
    except (NotImplementedError, AttributeError):
        return None


def available_methods(model: nn.Module) -> list[SaliencyMethod]:
    """The registered methods that work for ``model``: those needing a layer only when it has one."""
    has_layer = target_layer(model) is not None
    return [m for m in _METHODS.values() if has_layer or not m.needs_layer]


# --- the methods --------------------------------------------------------------------------------
# Captum is imported on first use: it (and the matplotlib it loads) costs ~0.4 s, which the
# dashboard's first paint of the predictions should not wait for.
@register_method("integrated_gradients", "Integrated Gradients", signed=True, has_delta=True)
def _integrated_gradients(fwd: nn.Module, x: torch.Tensor, target: int | None, *, n_steps: int = 32,
                          internal_batch_size: int | None = None, **_) -> tuple[torch.Tensor, float]:
    """IG from an all-background baseline; delta = max |Σ attributions − output difference|."""
    from captum.attr import IntegratedGradients

    attr, d = IntegratedGradients(fwd).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=n_steps,
                                                 internal_batch_size=internal_batch_size or n_steps,
                                                 return_convergence_delta=True)
    return attr, float(d.abs().max())


@register_method("saliency", "Saliency (gradient)")
def _saliency(fwd: nn.Module, x: torch.Tensor, target: int | None, *, signed: bool = False, **_) -> tuple[torch.Tensor, None]:
    """The input gradient (its magnitude unless ``signed``)."""
    from captum.attr import Saliency

    return Saliency(fwd).attribute(x.clone().requires_grad_(True), target=target, abs=not signed), None


@register_method("gradcam", "GradCAM", needs_layer=True)
def _gradcam(fwd: nn.Module, x: torch.Tensor, target: int | None, *, layer: nn.Module, signed: bool = False,
             **_) -> tuple[torch.Tensor, None]:
    """LayerGradCam on ``layer`` (ReLU unless ``signed``), upsampled bilinearly to the input."""
    from captum.attr import LayerAttribution, LayerGradCam

    x = x.clone().requires_grad_(True)
    cam = LayerGradCam(fwd, layer).attribute(x, target=target, relu_attributions=not signed)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear"), None


@register_method("occlusion", "Occlusion", signed=True)
def _occlusion(fwd: nn.Module, x: torch.Tensor, target: int | None, *, window: int | None = None,
               **_) -> tuple[torch.Tensor, None]:
    """Output drop when a background square (default: 1/8 of the side) slides over the image."""
    from captum.attr import Occlusion

    w = window or max(4, x.shape[-1] // 8)
    c = x.shape[1]
    return Occlusion(fwd).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, max(1, w // 2), max(1, w // 2)),
                                    baselines=0.0, target=target, perturbations_per_eval=256), None


@register_method("smoothgrad", "SmoothGrad")
def _smoothgrad(fwd: nn.Module, x: torch.Tensor, target: int | None, *, signed: bool = False, nt_samples: int = 16,
                stdev: float = 0.15, seed: int = 0, **_) -> tuple[torch.Tensor, None]:
    """NoiseTunnel (SmoothGrad) over Saliency, seeded without touching the global generator."""
    from captum.attr import NoiseTunnel, Saliency

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # NoiseTunnel draws from the global generator
    try:
        attr = NoiseTunnel(Saliency(fwd)).attribute(x.clone().requires_grad_(True), nt_type="smoothgrad",
                                                    nt_samples=nt_samples, nt_samples_batch_size=nt_samples,
                                                    stdevs=stdev, target=target, abs=not signed)
    finally:
        torch.random.set_rng_state(gen_state)
    return attr, None


# --- attributions -------------------------------------------------------------------------------
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
    """Whether ``attribute`` returns a signed map for these arguments (default: the method's nature)."""
    return get_method(method).signed if signed is None else bool(signed)


def attribute_forward(fwd: nn.Module, x: torch.Tensor, method: str, target: int | None = None, *,
                      layer: nn.Module | None = None, signed: bool | None = None,
                      **options) -> tuple[np.ndarray, float | None]:
    """Map (H, W) and delta (None unless the method ``has_delta``) of ``method`` for the forward
    module ``fwd`` on one image ``x`` (1, C, H, W): ``target`` indexes its output (None for a
    module with one output per image); ``layer`` is required by methods that ``needs_layer``.
    ``options`` go to the method's function (n_steps, window, nt_samples, …)."""
    m = get_method(method)
    if m.needs_layer and layer is None:
        raise NotImplementedError(f"{m.label} needs a target layer (a convolutional block); this model has none")
    x = x[:1].detach().float()
    with MODEL_LOCK, torch.enable_grad():
        attr, delta = m.fn(fwd, x, target, layer=layer, signed=is_signed(method, signed), **options)
    return attr.detach()[0].sum(0).float().cpu().numpy(), (None if delta is None else float(delta))


def attribute(model: HierarchicalClassifier, x: torch.Tensor, level: str, target: int | str | None = None,
              method: str = "integrated_gradients", *, signed: bool | None = None, return_delta: bool = False,
              n_steps: int = 32, internal_batch_size: int | None = None, window: int | None = None,
              nt_samples: int = 16, stdev: float = 0.15, seed: int = 0):
    """Attribution map (H, W) of ``level``'s logit for ``target`` (default: the predicted class)
    by the registered ``method``.

    ``signed`` keeps the sign of Saliency/SmoothGrad gradients and of GradCAM before its ReLU
    (default: the method's nature, :attr:`SaliencyMethod.signed`; IG and Occlusion are always
    signed). With ``return_delta`` also returns the method's convergence delta (IG: sum of
    attributions minus the output difference to the baseline), None for methods without one.
    """
    m = get_method(method)
    x = x[:1].detach().float()
    model.eval()
    t = target_index(model, level, target, x)
    layer = model.gradcam_layer if m.needs_layer else None  # raises NotImplementedError when there is none
    out, delta = attribute_forward(LevelOutput(model, level), x, method, t, layer=layer, signed=signed, n_steps=n_steps,
                                   internal_batch_size=internal_batch_size, window=window, nt_samples=nt_samples,
                                   stdev=stdev, seed=seed)
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
