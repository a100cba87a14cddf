"""A CLIP-style model for plankton images, built with open_clip.

* The open_clip model config is a JSON file in ``models/configs/`` registered with
  ``open_clip.add_model_config``. Its image tower names a timm model that this module registers:
  the project's 1-channel :class:`~models.backbone.CompactResNet` (open_clip's own ViT and
  ResNet towers take 3-channel input). The text tower is open_clip's transformer with the
  bundled BPE tokenizer (no download).
* :class:`PlanktonClip` wraps an open_clip model with its tokenizer and preprocessing; it encodes
  foreground-polarity images in [0, 1] (as ``data.decode.load_for_model`` makes them) and text.
* Checkpoints are safetensors + a JSON manifest (``"kind": "clip"``), sha256-verified; weights
  load through ``open_clip.create_model(name, pretrained=<file>)``, the path real pretrained
  weights take. :func:`load_pretrained_local` loads real open_clip / BioCLIP weights from a
  local file, an open_clip model folder or a local Hugging Face cache, offline.
* :class:`ClipClassifier` turns a CLIP model into a ``HierarchicalClassifier`` (logits from
  prompt similarities), and :func:`zero_shot_eval` scores zero-shot identification.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime as _dt  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models import register_model  # noqa: E402
from torch import nn  # noqa: E402

from data.paths import cache_dir  # noqa: E402
from data.taxonomy import Taxonomy, load_taxonomy  # noqa: E402

from .backbone import CompactResNet, gap  # noqa: E402
from .base import HierarchicalClassifier, images_to_tensor  # noqa: E402
from .captions import class_prompts, descriptors_version  # noqa: E402
from .checkpoint import CheckpointError, code_version, read_manifest, sha256_file, verified_weights  # noqa: E402
from .metrics import topk_accuracy  # noqa: E402

__all__ = ["PlanktonClip", "ClipClassifier", "create_clip", "save_clip_checkpoint", "load_clip_checkpoint",
           "load_pretrained_local", "zero_shot_eval", "register_configs"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "plankton-clip-small"
FORMAT = "plankton-lens-checkpoint/1"
TOKENIZER = "open_clip SimpleTokenizer (bundled BPE, 49408 tokens)"

# --- image towers, registered as timm models so an open_clip JSON config can name them ---------
TOWERS: dict[str, dict] = {
    "plankton_cnn_small": {"widths": (32, 64, 128, 256), "depths": (1, 1, 2, 1), "stem": 24},
    "plankton_cnn_tiny": {"widths": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "stem": 8},
    # the supervised classifiers' default trunk (models.architectures), for locked-image tuning
    "plankton_cnn_base": {"widths": (48, 96, 192, 256), "depths": (1, 2, 2, 1), "stem": 32},
    "plankton_cnn_base_blur": {"widths": (48, 96, 192, 256), "depths": (1, 2, 2, 1), "stem": 32, "stem_mode": "blur"},
}


class PlanktonCNN(nn.Module):
    """A timm-compatible trunk (``num_features``, ``reset_classifier``, ``forward_features``,
    ``forward_head``) around the project's CompactResNet, for 1-channel input."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], stem: int, in_chans: int = 1,
                 num_classes: int = 0, global_pool: str = "avg", stem_mode: str = "stride2"):
        super().__init__()
        self.body = CompactResNet(in_chans, tuple(widths), tuple(depths), stem, stem_mode)
        self.num_features = int(widths[-1])
        self.default_cfg = self.pretrained_cfg = {"input_size": (in_chans, 64, 64), "pool_size": None}
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"PlanktonCNN supports only average pooling, not {global_pool!r}")
        self.global_pool = "avg"
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = gap(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _register_towers() -> None:
    for name, cfg in TOWERS.items():
        if timm.is_model(name):
            continue

        def entry(pretrained: bool = False, _cfg: dict = cfg, **kwargs) -> PlanktonCNN:
            if pretrained:
                raise RuntimeError("plankton CNN towers have no pretrained weights to download")
            keep = {k: v for k, v in kwargs.items() if k in ("in_chans", "num_classes", "global_pool")}
            return PlanktonCNN(**_cfg, **keep)

        entry.__name__ = entry.__qualname__ = name
        globals()[name] = entry  # timm's register_model lists it in this module's __all__
        register_model(entry)


_CONFIG_PATHS: set[str] = set()


def register_configs(path: str | Path = CONFIG_DIR) -> list[str]:
    """Register open_clip model configs (one JSON file or a folder of them); returns their names."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"open_clip config {p} does not exist")
    if str(p) not in _CONFIG_PATHS:
        open_clip.add_model_config(p)
        _CONFIG_PATHS.add(str(p))
    return [f.stem for f in ([p] if p.is_file() else sorted(p.glob("*.json")))]


_register_towers()
register_configs()


# --- the wrapper -------------------------------------------------------------------------------
class PlanktonClip(nn.Module):
    """An open_clip model with its tokenizer and preprocessing.

    ``preprocessing``: size, channels, polarity ("foreground": 0 = background as the project's
    arrays; "original": the image as recorded, for pretrained models trained on natural-looking
    images), mean and std (one value per channel or one for all).
    """

    def __init__(self, clip: nn.Module, tokenizer, preprocessing: dict, model_name: str,
                 open_clip_config: dict | None = None, taxonomy: Taxonomy | None = None,
                 heldout: list[str] | None = None):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.open_clip_config = open_clip_config
        self.preprocessing = dict(preprocessing)
        self.taxonomy = taxonomy if taxonomy is not None else load_taxonomy("ndsb")
        self.heldout = list(heldout or [])
        c = int(self.preprocessing.get("channels", 1))
        mean = torch.as_tensor(self.preprocessing.get("mean", 0.0), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(self.preprocessing.get("std", 1.0), dtype=torch.float32).reshape(-1)
        self.register_buffer("_mean", mean.expand(c).reshape(1, c, 1, 1).clone(), persistent=False)
        self.register_buffer("_std", std.expand(c).reshape(1, c, 1, 1).clone(), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._class_cache: dict[tuple, torch.Tensor] = {}

    # images
    @property
    def size(self) -> int:
        s = self.preprocessing.get("size", 64)
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) foreground images in [0, 1] → the image tower's normalised input."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.preprocessing.get("polarity", "foreground") != "foreground":
            x = 1.0 - x
        c = self._mean.shape[1]
        if x.shape[1] != c:
            x = x.expand(-1, c, -1, -1)
        return (x - self._mean) / self._std

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.clip.encode_image(self.prepare(x))
        return F.normalize(f, dim=-1) if normalize else f

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled trunk features, before its projection head (locked-image
        tuning trains the head and the text tower on these)."""
        return self.clip.visual.trunk(self.prepare(x))

    def embed_trunk_features(self, f: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Trunk features → image embeddings: ``encode_image(x)`` equals
        ``embed_trunk_features(trunk_features(x))``."""
        e = self.clip.visual.head(f)
        return F.normalize(e, dim=-1) if normalize else e

    @torch.no_grad()
    def image_features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """L2-normalised embeddings of uint8 foreground images (N, S, S)."""
        self.eval()
        out = [self.encode_image(images_to_tensor(np.array(images[i : i + batch_size], dtype=np.uint8))).cpu().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # text
    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1]) if hasattr(self.clip, "text_projection") else int(
            self.open_clip_config.get("embed_dim", 0))

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` with start and end tokens (compare with ``context_length``)."""
        enc = getattr(self.tokenizer, "encode", None)
        return len(enc(text)) + 2 if enc else 0

    def encode_text_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.clip.encode_text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        """L2-normalised text embeddings (N, D); cached per string while the model is in eval mode."""
        texts = list(texts)
        cache = not self.clip.training
        todo = list(dict.fromkeys(t for t in texts if not (cache and t in self._text_cache)))
        new = {}
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            emb = self.encode_text_tokens(self.tokenizer(chunk)).float()
            new.update(zip(chunk, emb))
        if cache:
            self._text_cache.update(new)
        src = self._text_cache if cache else new
        return torch.stack([src[t] for t in texts]) if texts else torch.zeros(0, self.embed_dim)

    def class_embeddings(self, classes: list[str] | None = None, taxonomy: Taxonomy | None = None) -> torch.Tensor:
        """One embedding per class: the normalised mean of its prompt ensemble (captions.class_prompts)."""
        tax = taxonomy or self.taxonomy
        classes = list(tax.classes if classes is None else classes)
        key = (tax.version, tuple(classes), descriptors_version())
        if self.clip.training or key not in self._class_cache:
            prompts = [class_prompts(tax, c) for c in classes]
            flat = self.encode_text([p for ps in prompts for p in ps])
            out, i = [], 0
            for ps in prompts:
                out.append(F.normalize(flat[i : i + len(ps)].mean(0), dim=-1))
                i += len(ps)
            emb = torch.stack(out)
            if self.clip.training:
                return emb
            self._class_cache[key] = emb
        return self._class_cache[key]

    def clear_cache(self) -> None:
        self._text_cache.clear()
        self._class_cache.clear()

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp().clamp(max=100.0))

    @property
    def gradcam_layer(self) -> nn.Module | None:
        """The last convolutional stage of a PlanktonCNN tower (None for other towers)."""
        trunk = getattr(self.clip.visual, "trunk", None)
        return trunk.body.stages[-1] if isinstance(trunk, PlanktonCNN) else None


# --- creation, checkpoints ------------------------------------------------------------------------
def _config_name(config: str | Path) -> str:
    p = Path(config)
    if p.suffix == ".json" and p.is_file():
        return register_configs(p)[0]
    return str(config)


def create_clip(config: str | Path = DEFAULT_CONFIG, preprocessing: dict | None = None,
                taxonomy: Taxonomy | None = None, heldout: list[str] | None = None, seed: int = 0) -> PlanktonClip:
    """A new, randomly initialised CLIP from a registered config name or a JSON config file."""
    name = _config_name(config)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"no open_clip config named {name!r}; registered: {open_clip.list_models()[-5:]}…")
    torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded: expected here
    try:
        clip = open_clip.create_model(name, pretrained=None)
    finally:
        root.setLevel(level)
    pp = {"size": int(cfg["vision_cfg"].get("image_size", 64)), "channels": 1, "polarity": "foreground",
          "mean": 0.0, "std": 1.0, **(preprocessing or {})}
    return PlanktonClip(clip, open_clip.get_tokenizer(name), pp, name, cfg, taxonomy, heldout)


def parameter_count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def save_clip_checkpoint(pc: PlanktonClip, path: str | Path, **extra) -> Path:
    """Write ``<path>.safetensors`` (the open_clip state dict) and ``<path>.json``; returns the manifest path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in pc.clip.state_dict().items()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"open_clip_model": pc.model_name})
    tmp.replace(weights)
    visual, params = pc.clip.visual, parameter_count(pc.clip)
    manifest = {
        "name": path.stem, "format": FORMAT, "kind": "clip", "arch": "clip",
        "open_clip_model": pc.model_name, "open_clip_config": pc.open_clip_config,
        "tokenizer": {"type": TOKENIZER, "context_length": pc.context_length},
        "preprocessing": pc.preprocessing,
        "parameters": params, "parameters_image": parameter_count(visual), "parameters_text": params - parameter_count(visual),
        "taxonomy": pc.taxonomy.to_dict(), "heldout": pc.heldout, "descriptors_version": descriptors_version(),
        "weights": weights.name, "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size,
        "code_version": code_version(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    mpath = path.with_suffix(".json")
    mtmp = mpath.with_name(mpath.name + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=1, default=float))
    mtmp.replace(mpath)
    return mpath


def _registered_name(name: str, cfg: dict | None) -> str:
    """A registered open_clip config name holding ``cfg`` (registering a copy when the repo's differs)."""
    if cfg is None or open_clip.get_model_config(name) == cfg:
        return name
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    alias = f"{name}-{digest}"
    if open_clip.get_model_config(alias) is None:
        d = cache_dir() / "open_clip_configs"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{alias}.json"
        f.write_text(json.dumps(cfg, indent=1))
        register_configs(f)
    return alias


def load_clip_checkpoint(path: str | Path, verify: bool = True) -> tuple[PlanktonClip, dict]:
    """Rebuild a CLIP checkpoint from its manifest; refuses a sha256 mismatch (CheckpointError)."""
    manifest = read_manifest(path)
    if manifest.get("kind") != "clip":
        raise CheckpointError(f"Checkpoint {manifest.get('name')!r} is not a CLIP model (kind {manifest.get('kind', 'classifier')!r}).")
    weights = verified_weights(path, manifest, verify)
    try:
        name = _registered_name(manifest["open_clip_model"], manifest.get("open_clip_config"))
        clip = open_clip.create_model(name, pretrained=str(weights))
        tax = Taxonomy.from_dict(manifest["taxonomy"]) if "taxonomy" in manifest else load_taxonomy(manifest.get("dataset", "ndsb"))
        pc = PlanktonClip(clip, open_clip.get_tokenizer(name), manifest["preprocessing"], name,
                          open_clip.get_model_config(name), tax, manifest.get("heldout"))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"CLIP checkpoint {manifest.get('name')!r} cannot be loaded: {type(e).__name__}: {e}") from None
    pc.eval()
    return pc, manifest


# --- real pretrained weights from local files -----------------------------------------------------
def _force_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except Exception:  # noqa: BLE001
        pass


def load_pretrained_local(model_name: str, path: str | Path, name: str | None = None,
                          taxonomy: Taxonomy | None = None) -> tuple[PlanktonClip, dict]:
    """Load real pretrained CLIP weights without network access.

    ``path`` is a weights file (with ``model_name`` a registered open_clip config, e.g.
    "ViT-B-16"), an open_clip model folder (``open_clip_config.json`` + weights), or a local
    Hugging Face cache folder (with ``model_name`` "hf-hub:org/repo", e.g.
    "hf-hub:imageomics/bioclip"). The manifest records the model name and the preprocessing.
    """
    _force_offline()
    p = Path(path).expanduser()
    try:
        if p.is_file():
            ident, source, weights = model_name, "file", p
            clip = open_clip.create_model(model_name, pretrained=str(p))
            cfg = open_clip.get_model_config(model_name)
            tok = open_clip.get_tokenizer(model_name)
        elif p.is_dir() and (p / "open_clip_config.json").is_file():
            ident, source = f"local-dir:{p}", "local-dir"
            clip = open_clip.create_model(ident)
            cfg = open_clip.get_model_config(ident)
            tok = open_clip.get_tokenizer(ident)
            weights = Path(open_clip.factory._find_checkpoint_in_dir(p) or p)
        elif p.is_dir():
            hub_id = model_name.removeprefix("hf-hub:")
            ident, source = f"hf-hub:{hub_id}", "hf-cache"
            from open_clip.pretrained import download_pretrained_from_hf

            clip = open_clip.create_model(ident, cache_dir=str(p), require_pretrained=True)
            weights = Path(download_pretrained_from_hf(hub_id, cache_dir=str(p)))
            cfg = open_clip.factory._get_hf_config(hub_id, cache_dir=str(p)).get("model_cfg")
            tok = open_clip.get_tokenizer(ident, cache_dir=str(p))
        else:
            raise CheckpointError(f"{p} does not exist: give a weights file, an open_clip model folder or a Hugging Face cache folder.")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"Pretrained CLIP {model_name!r} could not be loaded offline from {p}: {type(e).__name__}: {e}") from None
    oc = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    size = oc.get("size", 224)
    ch = input_channels(clip)
    mean, std = list(oc.get("mean", open_clip.OPENAI_DATASET_MEAN)), list(oc.get("std", open_clip.OPENAI_DATASET_STD))
    preprocessing = {"size": int(size[0] if isinstance(size, (list, tuple)) else size), "channels": ch,
                     # Models trained on natural images expect them as recorded; plankton towers the project's polarity.
                     "polarity": "foreground" if ch == 1 else "original",
                     "mean": mean[:ch] if len(mean) >= ch else mean, "std": std[:ch] if len(std) >= ch else std}
    pc = PlanktonClip(clip, tok, preprocessing, ident, cfg, taxonomy)
    pc.eval()
    manifest = {
        "name": name or Path(str(model_name).replace(":", "-")).name, "format": FORMAT, "kind": "clip", "arch": "clip",
        "source": source, "open_clip_model": ident, "pretrained": str(p), "weights_file": str(weights),
        "sha256": sha256_file(weights) if weights.is_file() else None, "preprocessing": preprocessing,
        "open_clip_preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in oc.items()},
        "tokenizer": {"type": type(tok).__name__, "context_length": pc.context_length},
        "parameters": parameter_count(clip),
    }
    return pc, manifest


def input_channels(clip: nn.Module) -> int:
    """Channels the image tower reads (its first convolution's input channels; 3 if none)."""
    for m in clip.visual.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


# --- CLIP as a hierarchical classifier ----------------------------------------------------------
class ClipClassifier(HierarchicalClassifier):
    """A CLIP model as a ``HierarchicalClassifier``: leaf logits are the scaled cosine
    similarities to each class's prompt ensemble; higher levels sum leaf probabilities along
    the taxonomy. Held-out classes are named too (zero-shot). Inputs are the usual
    foreground images in [0, 1]; the CLIP normalises them itself."""

    arch = "clip"

    def __init__(self, clip: PlanktonClip, taxonomy: Taxonomy | None = None):
        taxonomy = taxonomy or clip.taxonomy
        pp = {"size": clip.size, "channels": 1, "polarity": "foreground", "mean": 0.0, "std": 1.0}
        super().__init__(taxonomy, {"preprocessing": pp, "open_clip_model": clip.model_name})
        self.clip = clip
        with torch.no_grad():
            self.register_buffer("class_text", clip.class_embeddings(taxonomy.classes, taxonomy).clone(), persistent=False)
        for lvl in self.levels[:-1]:
            self.register_buffer(f"_logmask_{lvl}", torch.log(torch.from_numpy(taxonomy.level_matrix(lvl))), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_raw(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        f = self.clip.encode_image(x)
        leaf = self.clip.clip.logit_scale.exp().clamp(max=100.0) * f @ self.class_text.T
        logp = leaf.log_softmax(-1)
        out = {lvl: torch.logsumexp(logp.unsqueeze(2) + getattr(self, f"_logmask_{lvl}").unsqueeze(0), dim=1)
               for lvl in self.levels[:-1]}
        out[self.levels[-1]] = leaf
        return out, f

    @property
    def gradcam_layer(self) -> nn.Module:
        layer = self.clip.gradcam_layer
        if layer is None:
            raise NotImplementedError("GradCAM needs a convolutional image tower")
        return layer


# --- zero-shot evaluation -----------------------------------------------------------------------
@torch.no_grad()
def zero_shot_eval(pc: PlanktonClip, images: np.ndarray, labels: list[str], heldout: list[str],
                   taxonomy: Taxonomy | None = None, ks: tuple[int, ...] = (1, 2, 5, 10),
                   features: np.ndarray | None = None) -> dict:
    """Zero-shot identification of images of held-out classes by text prompts.

    Top-k accuracy among the held-out names and among all names of the taxonomy, and the
    parent-level accuracy: how often the top-1 class among all names has the true parent
    (subgroup); ``group_accuracy`` the same one level up; ``parent_accuracy_summed`` the parent
    with the highest summed leaf probability (as the CLIP classifier predicts higher levels);
    ``per_class_parent`` per held-out class, with ``parent_siblings``, the other classes of its
    parent. ``labels`` are the images' true class names (all in ``heldout``).
    """
    tax = taxonomy or pc.taxonomy
    feats = torch.from_numpy(pc.image_features(images) if features is None else features).float()
    names = list(tax.classes)
    pos = {c: i for i, c in enumerate(names)}
    y_all = np.array([pos[c] for c in labels], dtype=np.int64)
    hpos = {c: i for i, c in enumerate(heldout)}
    y_held = np.array([hpos[c] for c in labels], dtype=np.int64)
    s_all = (feats @ pc.class_embeddings(names, tax).T).numpy()
    s_held = s_all[:, [pos[c] for c in heldout]]
    pred = [names[i] for i in s_all.argmax(1)]
    parent, grand = tax.levels[-2], tax.levels[-3]
    paths = tax.table.set_index(tax.levels[-1])
    same = {lvl: paths[lvl].loc[pred].to_numpy() == paths[lvl].loc[list(labels)].to_numpy() for lvl in (parent, grand)}
    per_class = {c: float((s_held.argmax(1)[y_held == i] == i).mean()) for c, i in hpos.items() if (y_held == i).any()}
    labels_arr = np.asarray(labels)
    per_class_parent = {c: float(same[parent][labels_arr == c].mean()) for c in heldout if (labels_arr == c).any()}
    # the parent as a hierarchical classifier predicts it: leaf probabilities summed per parent
    probs = torch.softmax(torch.from_numpy(s_all) * pc.logit_scale, 1).numpy()
    parents = sorted(set(paths[parent]))
    ppos = {p: i for i, p in enumerate(parents)}
    summed = np.zeros((len(labels), len(parents)))
    np.add.at(summed.T, np.array([ppos[p] for p in paths[parent].loc[names]]), probs.T)
    true_parent = np.array([ppos[p] for p in paths[parent].loc[list(labels)]]) if len(labels) else np.zeros(0, int)
    siblings = {c: int((paths[parent] == paths[parent].loc[c]).sum() - 1) for c in heldout}
    return {
        "heldout_names": {f"top{k}": topk_accuracy(y_held, s_held, k) for k in ks},
        "all_names": {f"top{k}": topk_accuracy(y_all, s_all, k) for k in ks},
        "parent_accuracy": float(same[parent].mean()) if len(labels) else float("nan"), "parent_level": parent,
        "group_accuracy": float(same[grand].mean()) if len(labels) else float("nan"),
        "parent_accuracy_summed": float((summed.argmax(1) == true_parent).mean()) if len(labels) else float("nan"),
        "per_class_parent": per_class_parent, "parent_siblings": siblings,
        "n_images": int(len(labels)), "n_heldout_names": len(heldout),
        "n_all_names": len(names), "chance_top1_heldout": 1.0 / max(1, len(heldout)), "per_class_top1": per_class,
    }
