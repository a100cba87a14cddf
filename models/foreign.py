"""Models trained elsewhere, behind the project's classifier interface.

A biologist's network (a timm or torchvision architecture with a ``state_dict``, a timm /
Hugging Face style folder, a TorchScript file, or — only when trusted — a whole pickled model)
becomes a :class:`ForeignClassifier`: the project's 1-channel foreground input is mapped to what
the network expects (polarity, channels replicated, per-channel mean / std), its head gives the
leaf logits, every higher level sums leaf probabilities along the taxonomy, its embedding is the
input of its classifier head, and GradCAM targets its last convolutional block (or, for a vision
transformer, the last block's token grid). :func:`load_imported` rebuilds one from the manifest
written by ``python -m models add`` (:mod:`models.importer`).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from data.taxonomy import Taxonomy

from .architectures import _log_sum_to_levels
from .base import HierarchicalClassifier
from .checkpoint import CheckpointError, sha256_file

IMPORT_FORMAT = "plankton-lens-import/1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: What an imported model was trained on: dark organisms on a light background (ZooScan, ISIIS,
#: FlowCam, EcoTaxa vignettes) or light organisms on a dark background (dark-field: UVP, ZooLake;
#: the project's own foreground arrays). Every image, whatever its instrument, is given to the
#: model in its polarity: the foreground (0 = background), inverted for "dark-on-light".
POLARITIES = ("dark-on-light", "light-on-dark")


class ModelImportError(ValueError):
    """A file or option that cannot become a model; the message says what to do."""


# --- reading weights ------------------------------------------------------------------------------
def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file (never unpickling
    arbitrary objects unless ``trust_pickle``; then a whole ``nn.Module`` may come back). Nested
    ``{"state_dict": …}`` / ``{"model": …}`` and DataParallel's ``module.`` prefix are unwrapped."""
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ModelImportError(f"{path.name} looks like a safetensors file but cannot be read ({e}).") from None
    if kind == "torchscript":
        raise ModelImportError(f"{path.name} is a TorchScript file: import it without --arch (it is detected).")
    if kind not in ("torch-zip", "pickle"):
        raise ModelImportError(f"{path.name} is not a model file (expected safetensors, a torch.save file or TorchScript).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickled objects
        if not trust_pickle:
            raise ModelImportError(
                f"{path.name} holds pickled Python objects (a whole model saved with torch.save?), which are never "
                "unpickled by default: unpickling runs code from the file. Save a state_dict or TorchScript instead, "
                f"or, only if you trust the file, pass --trust-pickle. ({type(e).__name__})") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise ModelImportError(f"{path.name} cannot be read even as a trusted pickle ({type(e2).__name__}: {e2}).") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for k in ("state_dict", "model_state_dict", "model", "net"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            return tensors
    raise ModelImportError(f"{path.name} holds no tensors of a model ({type(obj).__name__}).")


def sniff(path: Path) -> str:
    """What a file is, from its bytes: "safetensors", "torchscript", "torch-zip" (torch.save),
    "pickle" (legacy torch.save), "json", or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return "unknown"
    if head[:1] == b"\x80":
        return "pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


# --- building networks ----------------------------------------------------------------------------
def candidate_networks(arch: str, num_classes: int, in_chans: int, kwargs: dict):
    """(library, network) pairs that ``arch`` may name: "timm/NAME", "torchvision/NAME", or a bare
    name (timm's, then torchvision's: the weights' keys decide between them)."""
    import timm
    import torchvision

    lib, _, name = arch.partition("/") if "/" in arch else ("", "", arch)
    found = False
    if lib in ("", "timm") and timm.is_model(name):
        found = True
        yield "timm", timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if lib in ("", "torchvision") and name in torchvision.models.list_models():
        found = True
        if in_chans != 3:
            raise ModelImportError(f"torchvision's {name} reads 3 channels; the weights read {in_chans}.")
        tv_kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        if "image_size" in torchvision.models.get_model_builder(name).__code__.co_varnames and "img_size" in kwargs:
            tv_kwargs["image_size"] = kwargs["img_size"]
        yield "torchvision", torchvision.models.get_model(name, weights=None, num_classes=num_classes, **tv_kwargs)
    if not found:
        where = {"timm": "timm", "torchvision": "torchvision"}.get(lib, "timm or torchvision")
        raise ModelImportError(f"Unknown architecture {arch!r}: it is not a model name of {where} "
                               "(e.g. resnet18, efficientnet_b0, vit_tiny_patch16_224, convnext_tiny).")


def infer_in_chans(arch: str, state: dict[str, torch.Tensor], num_classes: int, kwargs: dict) -> int:
    """Input channels the weights were trained with: those of the architecture's first
    convolution (in module order) as the state_dict holds it; 3 when it cannot be told."""
    try:
        for _lib, net in candidate_networks(arch, num_classes, 3, kwargs):
            first = next((n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
            w = state.get(f"{first}.weight") if first else None
            if w is not None and w.ndim == 4:
                return int(w.shape[1])
    except ModelImportError:
        raise
    except Exception:  # noqa: BLE001 - an architecture that cannot be built: build_network says why
        pass
    return 3


def _fit(lib: str, net: nn.Module, obj: dict, arch: str, num_classes: int) -> str | None:
    """Why ``obj`` cannot be loaded into ``net`` (None when it can)."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in want if k not in obj]
    unexpected = [k for k in obj if k not in want]
    if missing or unexpected:
        return (f"The weights do not fit {lib} {arch!r}: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is --arch the architecture it was trained as?")
    head = head_module(net)
    if head is not None:
        hname = next(n for n, m in net.named_modules() if m is head)
        hw = obj.get(f"{hname}.weight")
        if hw is not None and hw.shape[0] != num_classes:
            return (f"The model's head has {hw.shape[0]} outputs but the class list has {num_classes} classes: "
                    "give the class list it was trained with.")
    bad = [k for k in want if tuple(obj[k].shape) != want[k]]
    if bad:
        return (f"The weights do not fit {arch!r} at these options: {bad[0]} is {tuple(obj[bad[0]].shape)}, "
                f"expected {want[bad[0]]} (input size or channels differ?).")
    return None


def head_module(net: nn.Module) -> nn.Module | None:
    """The classifier head (the last ``nn.Linear``; timm's ``get_classifier()`` when it has one)."""
    if isinstance(net, torch.jit.ScriptModule):
        return None
    get = getattr(net, "get_classifier", None)
    if callable(get):
        h = get()
        if isinstance(h, nn.Linear):
            return h
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def build_network(source: dict, num_classes: int, trust_pickle: bool = False) -> nn.Module:
    """The network a manifest's ``source`` describes, with its weights loaded."""
    fmt, weights = source["format"], Path(source["weights"])
    if fmt == "torchscript":
        try:
            return torch.jit.load(str(weights), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelImportError(f"{weights.name} cannot be loaded as TorchScript ({type(e).__name__}: {e}).") from None
    obj = read_state_dict(weights, trust_pickle=trust_pickle or fmt == "pickle")
    if fmt == "pickle":
        if not isinstance(obj, nn.Module):
            raise ModelImportError(f"{weights.name} holds a state_dict, not a whole model: import it with --arch.")
        return obj
    if isinstance(obj, nn.Module):
        raise ModelImportError(f"{weights.name} holds a whole pickled model; import it with --trust-pickle (no --arch).")
    reasons = []
    for lib, net in candidate_networks(source["arch"], num_classes, int(source.get("in_chans", 3)), source.get("kwargs", {})):
        why = _fit(lib, net, obj, source["arch"], num_classes)
        if why is None:
            net.load_state_dict(obj, strict=True)
            return net
        reasons.append(why)
    head = [r for r in reasons if "head has" in r]
    raise ModelImportError((head or reasons)[0])


# --- GradCAM layers -------------------------------------------------------------------------------
class TokenGrid(nn.Module):
    """Identity on a transformer's tokens that exposes the patch tokens as a (N, D, h, w) grid, for
    GradCAM: ``view`` is the module GradCAM hooks; ``restore`` puts the tokens back."""

    def __init__(self, inner: nn.Module, prefix: int, layout: str = "tokens"):
        super().__init__()
        self.inner, self.prefix, self.layout = inner, prefix, layout
        self.view = _GridView()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.layout == "nhwc":
            return self.view(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        n, t, d = y.shape
        side = int(round((t - self.prefix) ** 0.5))
        if side * side != t - self.prefix:
            return y
        grid = self.view(y[:, self.prefix:].transpose(1, 2).reshape(n, d, side, side))
        return torch.cat([y[:, : self.prefix], grid.reshape(n, d, side * side).transpose(1, 2)], dim=1)


class _GridView(nn.Identity):
    """The identity module GradCAM hooks: its output is the token grid (N, D, h, w)."""


def install_gradcam_layer(net: nn.Module, size: int, in_chans: int, layer: str | None = None) -> tuple[nn.Module | None, str | None]:
    """The module GradCAM should target and its name: ``layer`` when named; for a ViT / DeiT the
    last block's first norm seen as a token grid; for Swin its last stage in NCHW; otherwise the
    last module whose output is a feature map (N, C, h, w) with h, w ≥ 2 (the last convolutional
    block). (None, None) for TorchScript."""
    if isinstance(net, torch.jit.ScriptModule):
        return None, None
    if layer:
        try:
            return net.get_submodule(layer), layer
        except AttributeError:
            raise ModelImportError(f"The model has no layer named {layer!r} (for --layer).") from None
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(net, "patch_embed") and hasattr(blocks[-1], "norm1"):
        prefix = int(getattr(net, "num_prefix_tokens", 1))
        wrapped = TokenGrid(blocks[-1].norm1, prefix)
        blocks[-1].norm1 = wrapped
        wrapped.view.block = [blocks[-1]]  # the block whose weights the sanity check randomises
        return wrapped.view, f"blocks.{len(blocks) - 1}.norm1 (token grid)"
    if "swin" in type(net).__name__.lower() and hasattr(net, "layers"):
        last = net.layers[-1]
        wrapped = TokenGrid(last, 0, layout="nhwc")
        net.layers[-1] = wrapped
        wrapped.view.block = [last]
        return wrapped.view, f"layers.{len(net.layers) - 1} (NCHW view)"
    seen: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in net.named_modules()}

    def hook(m, _inp, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) >= 2 and m is not net:
            seen.append((names.get(m, "?"), m))

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            was = net.training
            net.eval()
            net(torch.zeros(1, in_chans, size, size))
            net.train(was)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return None, None
    name, module = seen[-1]
    return module, name


# --- the classifier -------------------------------------------------------------------------------
class ForeignClassifier(HierarchicalClassifier):
    """A network trained elsewhere as a ``HierarchicalClassifier`` (see the module docstring).
    ``config["head_classes"]`` is the head's class order; outputs follow the taxonomy's order."""

    arch = "foreign"

    def __init__(self, net: nn.Module, taxonomy: Taxonomy, config: dict):
        super().__init__(taxonomy, config)
        self.net = net
        pp = self.preprocessing
        self.polarity = pp.get("polarity", "dark-on-light")
        self._head = head_module(net)
        for lvl in self.levels[:-1]:
            m = torch.from_numpy(taxonomy.level_matrix(lvl))
            self.register_buffer(f"_logmask_{lvl}", torch.log(m), persistent=False)
        head_order = config.get("head_classes")
        perm = None
        if head_order and list(head_order) != list(taxonomy.classes):
            pos = {c: i for i, c in enumerate(head_order)}
            perm = torch.tensor([pos[c] for c in taxonomy.classes])
        self.register_buffer("_perm", perm, persistent=False)
        self._cam, self.gradcam_layer_name = install_gradcam_layer(net, int(pp["size"]), int(pp.get("channels", 3)),
                                                                   config.get("gradcam_layer_name"))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.polarity == "dark-on-light":
            x = 1.0 - x
        return (x - self._mean) / self._std

    def forward_raw(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if x.shape[1] == 1 and int(self.preprocessing.get("channels", 3)) > 1 and self._mean.ndim == 0:
            x = x.expand(-1, int(self.preprocessing["channels"]), -1, -1)
        handle, store = None, {}
        if self._head is not None:  # the head's input is the embedding (one dict per call: thread-safe)
            handle = self._head.register_forward_pre_hook(lambda _m, inp: store.__setitem__("f", inp[0]))
        try:
            leaf = self.net(x)
        finally:
            if handle is not None:
                handle.remove()
        if isinstance(leaf, (tuple, list)):
            leaf = leaf[0]
        if not isinstance(leaf, torch.Tensor) or leaf.ndim != 2:
            raise CheckpointError(f"The model returned {type(leaf).__name__} instead of a (N, classes) logit tensor.")
        if self._perm is not None:  # the head's class order → the taxonomy's (sorted) order
            leaf = leaf.index_select(1, self._perm)
        feats = store.get("f")
        if feats is None or feats.ndim != 2:
            feats = leaf
        out = _log_sum_to_levels(leaf.log_softmax(-1), {lvl: getattr(self, f"_logmask_{lvl}") for lvl in self.levels[:-1]})
        out[self.levels[-1]] = leaf
        return {lvl: out[lvl] for lvl in self.levels}, feats

    @property
    def gradcam_block(self) -> nn.Module:
        """The block holding the GradCAM layer's weights (for a transformer, its last block)."""
        return getattr(self.gradcam_layer, "block", [self.gradcam_layer])[0]

    @property
    def gradcam_layer(self) -> nn.Module:
        if self._cam is None:
            raise NotImplementedError("GradCAM needs a layer to target; this model (TorchScript?) exposes none. "
                                      "Name one with python -m models add … --layer NAME.")
        return self._cam


def load_imported(path: str | Path) -> tuple[ForeignClassifier, dict]:
    """Rebuild an imported model from its manifest (refusing weights whose sha256 changed)."""
    p = Path(path)
    try:
        manifest = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Model manifest {p} is not valid JSON ({e}).") from None
    source = manifest.get("source") or {}
    weights = Path(source.get("weights", ""))
    if not weights.is_file():
        raise CheckpointError(f"The weights of {manifest.get('name')!r} are gone: {weights} does not exist. "
                              "Register the model again with python -m models add.")
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        raise CheckpointError(f"Model {manifest.get('name')!r} failed its integrity check: {weights.name}'s sha256 "
                              f"({digest[:12]}…) no longer matches the one recorded when it was added "
                              f"({str(manifest.get('sha256'))[:12]}…). Register it again if the change is yours.")
    try:
        taxonomy = Taxonomy.from_dict(manifest["taxonomy"])
        net = build_network(source, len(taxonomy.classes), trust_pickle=bool(source.get("trusted_pickle")))
        model = ForeignClassifier(net, taxonomy, manifest["config"]).eval()
    except (ModelImportError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"Model {manifest.get('name')!r} cannot be loaded: {e}") from None
    return model, manifest
