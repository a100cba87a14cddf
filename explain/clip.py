"""CLIP explanations: prompts that match an image, zero-shot names, anomaly scores, prompt saliency.

* :func:`rank_prompts` — the prompt bank (taxonomy paths, morphological descriptors,
  non-living descriptors; ``models.captions.prompt_bank``) ranked by similarity to an image.
* :func:`class_scores` — zero-shot scores of every class name (held-out classes included).
* :func:`contrast_prompts` — "why A rather than B": the image's score gap between the two
  classes split exactly into one contribution per prompt of A and of B.
* :func:`prompt_score`, :func:`prompt_saliency` — any typed prompt's score and a Captum map of
  the image for it (the image tower against the prompt's text embedding), by any method of
  the saliency registry (``explain.saliency.available_methods(pc)``: those that work for its tower).
* :class:`AnomalyScorer` — maximum concept matching (Ming et al. 2022) on the known classes'
  prompts plus the kNN distance to known images (Sun et al. 2022), z-scored on validation images.

The zero-shot and anomaly benchmark of a zoo CLIP model (tables in docs/results.md) is
``python bench/clip_benchmark.py``; the CLIP page shows its last result (:func:`stored_benchmark`).
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.decode import load_for_model
from data.paths import cache_dir
from models.base import images_to_tensor
from models.captions import class_prompts, descriptors_version, prompt_bank
from models.clip_model import ClipClassifier, PlanktonClip, load_pretrained_local, zero_shot_eval  # noqa: F401 (re-exported)
from models.zoo import model_names

DEFAULT_CLIP = "ndsb-clip"
KS = (1, 2, 5, 10)
KNN_K = 10
MAX_PROMPT_CHARS = 300
_LOCK = threading.RLock()


class PromptError(ValueError):
    """A prompt that cannot be scored (empty or too long); the message says why."""


def default_clip_name() -> str | None:
    names = model_names(kind="clip")
    return DEFAULT_CLIP if DEFAULT_CLIP in names else (names[0] if names else None)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return images_to_tensor(np.array(image, dtype=np.uint8))


@torch.no_grad()
def image_embedding(pc: PlanktonClip, image: np.ndarray) -> torch.Tensor:
    """Normalised embedding (D,) of one uint8 foreground image (S, S)."""
    pc.eval()
    return pc.encode_image(_tensor(image))[0]


# --- prompt rankings ------------------------------------------------------------------------------
_BANKS: dict[tuple, pd.DataFrame] = {}


def bank_for(pc: PlanktonClip) -> pd.DataFrame:
    """The prompt bank of the model's taxonomy: prompt, kind, taxon, level."""
    t = pc.taxonomy
    key = (t.name, t.version, descriptors_version())
    if key not in _BANKS:
        _BANKS[key] = prompt_bank(t)
    return _BANKS[key].copy()


def rank_prompts(pc: PlanktonClip, image: np.ndarray, kinds: list[str] | None = None, top: int | None = None,
                 bank: pd.DataFrame | None = None) -> pd.DataFrame:
    """Bank prompts ranked by cosine similarity to the image (column ``similarity``, then ``rank``)."""
    bank = bank_for(pc) if bank is None else bank.copy()
    if kinds:
        bank = bank[bank["kind"].isin(kinds)]
    f = image_embedding(pc, image)
    bank["similarity"] = (pc.encode_text(bank["prompt"].tolist()) @ f).numpy() if len(bank) else []
    out = bank.sort_values("similarity", ascending=False).reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.head(top) if top else out


def class_scores(pc: PlanktonClip, image: np.ndarray, classes: list[str] | None = None) -> pd.DataFrame:
    """Zero-shot scores of every class name: similarity to its prompt ensemble and the softmax
    probability at the model's temperature; ``heldout`` marks classes never seen in training."""
    tax = pc.taxonomy
    classes = list(tax.classes if classes is None else classes)
    f = image_embedding(pc, image)
    sim = (pc.class_embeddings(classes, tax) @ f).numpy()
    prob = torch.softmax(torch.from_numpy(sim) * pc.logit_scale, 0).numpy()
    paths = tax.table.set_index("class").loc[classes]
    df = pd.DataFrame({"class": classes, "similarity": sim, "probability": prob,
                       "subgroup": paths["subgroup"].to_numpy(), "group": paths["group"].to_numpy(),
                       "heldout": [c in pc.heldout for c in classes]})
    return df.sort_values("similarity", ascending=False).reset_index(drop=True)


def contrast_prompts(pc: PlanktonClip, image: np.ndarray, a: str, b: str) -> tuple[pd.DataFrame, float]:
    """"Why A rather than B" for one image.

    A class's score is the cosine between the image and the normalised mean of its prompt
    embeddings, so score(A) − score(B) is exactly a sum over prompts: a prompt of A adds its
    similarity to the image times A's weight, a prompt of B subtracts it times B's weight, and
    a prompt both share nets the difference of the weights. Returns the prompts sorted from
    most in favour of A to most in favour of B (``contribution``) and the total gap.
    """
    tax = pc.taxonomy
    for c in (a, b):
        if c not in tax.classes:
            raise KeyError(f"{c!r} is not a class of taxonomy {tax.name!r}")
    f = image_embedding(pc, image)
    rows: dict[str, dict] = {}
    for cls, sign in ((a, 1.0), (b, -1.0)):
        prompts = class_prompts(tax, cls)
        e = pc.encode_text(prompts)
        w = 1.0 / (len(prompts) * float(e.mean(0).norm()))
        sims = (e @ f).numpy()
        for p, s in zip(prompts, sims):
            r = rows.setdefault(p, {"prompt": p, "similarity": float(s), "contribution": 0.0, "of": []})
            r["contribution"] += sign * w * float(s)
            r["of"].append(cls)
    df = pd.DataFrame(rows.values())
    df["favours"] = np.where(df["of"].str.len() > 1, "both (shared)", np.where(df["contribution"] > 0, a, b))
    df["of"] = df["of"].str.join(" & ")
    df = df.sort_values("contribution", ascending=False).reset_index(drop=True)
    gap = float((pc.class_embeddings([a, b], tax) @ f).numpy() @ np.array([1.0, -1.0]))
    return df[["prompt", "of", "favours", "similarity", "contribution"]], gap


def check_prompt(text: str) -> str:
    """The prompt, stripped; PromptError for an empty or over-long one."""
    t = " ".join(str(text or "").split())
    if not t:
        raise PromptError("Type a prompt, e.g. “transparent body with long spines”.")
    if len(t) > MAX_PROMPT_CHARS:
        raise PromptError(f"The prompt is {len(t)} characters long; keep it under {MAX_PROMPT_CHARS}.")
    return t


def prompt_score(pc: PlanktonClip, image: np.ndarray, text: str) -> dict:
    """A typed prompt's similarity to the image, its rank among the bank's prompts for this
    image, and whether the tokenizer had to cut it (``truncated``)."""
    t = check_prompt(text)
    ranked = rank_prompts(pc, image)
    sim = float(pc.encode_text([t])[0] @ image_embedding(pc, image))
    n_tokens = pc.token_count(t)
    higher = int((ranked["similarity"] > sim).sum())
    return {"prompt": t, "similarity": sim, "rank": higher + 1, "of": len(ranked) + 1,
            "percentile": float((ranked["similarity"] < sim).mean() * 100),
            "tokens": n_tokens, "context_length": pc.context_length, "truncated": n_tokens > pc.context_length}


class _PromptSimilarity(torch.nn.Module):
    """Image → cosine similarity to one fixed text embedding (a Captum forward function)."""

    def __init__(self, pc: PlanktonClip, text: torch.Tensor):
        super().__init__()
        self.pc, self.text = pc, text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pc.encode_image(x) @ self.text


def prompt_saliency(pc: PlanktonClip, image: np.ndarray, text: str, method: str = "integrated_gradients",
                    n_steps: int = 32, signed: bool | None = None) -> np.ndarray:
    """(S, S) map of where the image supports the prompt by any registered saliency method
    (:mod:`explain.saliency`), applied to the image tower's cosine similarity to the prompt's
    text embedding: e.g. Integrated Gradients (baseline = empty background; signed) or GradCAM
    on the last convolutional stage (unsigned). ``signed`` as in :func:`explain.saliency.attribute`.
    KeyError for an unknown method, NotImplementedError for a layer method on a tower without
    a convolutional stage."""
    from .saliency import attribute_forward, get_method

    m = get_method(method)
    t = check_prompt(text)
    pc.eval()
    fwd = _PromptSimilarity(pc, pc.encode_text([t])[0].detach())
    with _LOCK:
        out, _ = attribute_forward(fwd, _tensor(image), m.name, None, layer=pc.gradcam_layer if m.needs_layer else None,
                                   signed=signed, n_steps=n_steps)
    return out


# --- zero-shot --------------------------------------------------------------------------------
def zero_shot_table(z: dict) -> pd.DataFrame:
    """The seed's top-k layout: rows top-1/2/5/10, columns among the held-out names and among
    all names (percent)."""
    rows = []
    for k in KS:
        key = f"top{k}"
        if key in z.get("heldout_names", {}):
            rows.append({"": f"top-{k}", f"among the {z.get('n_heldout_names', '')} held-out names": 100 * z["heldout_names"][key],
                         f"among all {z.get('n_all_names', '')} names": 100 * z["all_names"][key]})
    return pd.DataFrame(rows)


def gallery_rows(rows: pd.DataFrame, per_class: int = 1, split: str = "test", classes: list[str] | None = None) -> pd.DataFrame:
    """Example images: the first ``per_class`` images of each class in ``split`` (by file name)."""
    r = rows[rows["split"] == split]
    if classes is not None:
        r = r[r["class"].isin(classes)]
    return r.sort_values("relpath").groupby("class", sort=True).head(per_class).reset_index(drop=True)


# --- anomaly detection ---------------------------------------------------------------------------
def above_chance_weights(aurocs: dict[str, float]) -> dict[str, float]:
    """Weights of score parts from their AUROC on known outliers: ``max(0, AUROC − 0.5)``,
    normalised to sum to 1 (equal weights when no part is above chance)."""
    raw = {n: max(0.0, a - 0.5) for n, a in aurocs.items()}
    total = sum(raw.values())
    return {n: (w / total if total > 0 else 1.0 / len(raw)) for n, w in raw.items()}


@dataclass
class AnomalyScorer:
    """Anomaly score of images for a CLIP model: MCM (1 − max softmax of the scaled similarities
    to the known classes' prompt ensembles) and kNN (distance to the k-th nearest known image
    embedding), each z-scored on inlier validation images; ``combined`` is their weighted sum.

    The weights come from known outliers when :meth:`fit` gets some (chimeras made from
    validation images): each part's weight is how far its AUROC on them is above chance,
    ``max(0, AUROC − 0.5)``, normalised; without known outliers the parts count equally. A
    model trained with outlier exposure separates such outliers by MCM and the plain model by
    kNN, and the weights follow; the test sets are never used."""

    pc: PlanktonClip
    known: list[str]
    index: object
    k: int
    stats: dict[str, tuple[float, float]]
    calibration: np.ndarray  # combined scores of the calibration images, sorted
    weights: dict[str, float] = field(default_factory=dict)  # per part; empty: equal
    weight_aurocs: dict[str, float] = field(default_factory=dict)  # each part's AUROC on the known outliers

    @classmethod
    def fit(cls, pc: PlanktonClip, gallery_features: np.ndarray, known: list[str], calib_features: np.ndarray,
            k: int = KNN_K, outlier_features: np.ndarray | None = None) -> "AnomalyScorer":
        from .neighbours import build_index, normalise

        k = max(1, min(k, len(gallery_features)))
        sc = cls(pc, list(known), build_index(normalise(gallery_features)), k, {}, np.zeros(0))
        comp = sc.components(calib_features)
        sc.stats = {n: (float(v.mean()), float(v.std() or 1.0)) for n, v in comp.items()}
        if outlier_features is not None and len(outlier_features):
            out = sc.components(outlier_features)
            sc.weight_aurocs = {n: auroc(comp[n], out[n]) for n in comp}
            sc.weights = above_chance_weights(sc.weight_aurocs)
        sc.calibration = np.sort(sc.score_features(calib_features)["combined"])
        return sc

    def components(self, features: np.ndarray) -> dict[str, np.ndarray]:
        from .neighbours import knn_score

        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        sims = f @ self.pc.class_embeddings(self.known).T
        mcm = 1.0 - torch.softmax(sims * self.pc.logit_scale, 1).max(1).values.numpy()
        return {"mcm": mcm.astype(np.float64), "knn": knn_score(self.index, features, self.k).astype(np.float64)}

    def score_features(self, features: np.ndarray) -> dict[str, np.ndarray]:
        comp = self.components(features)
        if self.stats:
            w = self.weights or {n: 1.0 / len(self.stats) for n in self.stats}
            comp["combined"] = np.sum([w[n] * (comp[n] - m) / s for n, (m, s) in self.stats.items()], axis=0)
        return comp

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.score_features(self.pc.image_features(np.asarray(images)))

    def percentile(self, combined: float) -> float:
        """Share (%) of the calibration inliers that score lower than ``combined``."""
        return float(np.searchsorted(self.calibration, combined) / max(1, len(self.calibration)) * 100)


@lru_cache(maxsize=2)
def natural_images(size: int = 64, crops: int = 6, seed: int = 0) -> np.ndarray:
    """Non-plankton photographs bundled with scikit-image (no download): every bundled sample
    photo, whole and as random crops, plus its 200 LFW face crops, decoded like an upload."""
    import skimage.data as sd

    rng = np.random.default_rng(seed)
    names = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
             "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "motorcycle", "page",
             "retina", "rocket", "text", "colorwheel", "checkerboard"]
    photos = []
    for n in names:
        try:
            img = getattr(sd, n)()
        except Exception:  # noqa: BLE001 - a sample missing from this scikit-image build
            continue
        photos.append(img[0] if isinstance(img, tuple) else img)
    arrays = []
    for img in photos:
        a = np.asarray(img)
        a = (a * 255).astype(np.uint8) if a.dtype != np.uint8 else a
        arrays.append(a)
        h, w = a.shape[:2]
        for _ in range(crops):
            s = int(rng.integers(min(h, w) // 4, min(h, w) // 2 + 1))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            arrays.append(a[y : y + s, x : x + s])
    try:
        faces = sd.lfw_subset()
        arrays += [(f * 255).astype(np.uint8) for f in faces]
    except Exception:  # noqa: BLE001
        pass
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(load_for_model(buf.getvalue(), size, mode="L", background=None)[0])
    arr = np.stack(out)
    arr.flags.writeable = False
    return arr


def zoolake_images(size: int = 64, n: int | None = None) -> np.ndarray | None:
    """The ZooLake sample of the OOD benchmark (the same images; its first ``n`` when given),
    or None without the dataset."""
    from data.manifest import build_manifest, decoded_array
    from data.sources import DatasetNotFound, open_source

    from .ood import CONFIG
    from .ood_evaluation import other_sample

    try:
        src = open_source("zoolake")
    except DatasetNotFound:
        return None
    rows = other_sample(build_manifest(src, progress=False), CONFIG["other_sample"], CONFIG["other_per_class"])
    if n is not None:
        rows = rows.head(n)
    return np.asarray(decoded_array(src, rows, size, progress=False))


def make_chimeras(images: np.ndarray, leaf: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Chimeras of two NDSB organisms of different classes (``models.outliers.chimeras``:
    pasted side by side or blended), made from ``n`` of ``images``."""
    from models.outliers import chimeras

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), min(n, len(images)), replace=False))
    g = torch.Generator().manual_seed(seed)
    x, _ = chimeras(_tensor(images[idx]), torch.from_numpy(np.asarray(leaf)[idx]), g)
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    from .ood import auroc as _auroc

    return _auroc(inlier, outlier)


# --- the benchmark's last result (bench/clip_benchmark.py stores it, the CLIP page shows it) -------------
def _benchmark_path(sha256: str) -> Path:
    return cache_dir() / "clip" / f"benchmark-{sha256[:16]}.json"


def store_benchmark(res: dict) -> None:
    """Keep a benchmark result of a checkpoint (by sha256) for :func:`stored_benchmark`."""
    if not res.get("sha256"):
        return
    p = _benchmark_path(res["sha256"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1))


def stored_benchmark(sha256: str | None) -> dict | None:
    """The last benchmark result of a checkpoint (by sha256), if one was run on this machine."""
    if not sha256:
        return None
    p = _benchmark_path(sha256)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


SET_LABELS = {"chimeras": "chimeras of two NDSB organisms", "natural": "natural non-plankton images (scikit-image)",
              "zoolake": "ZooLake (other instrument)", "heldout_taxa": "held-out NDSB taxa (novel classes)"}
