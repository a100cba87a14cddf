"""OOD evaluation data for a zoo model: what the Anomalies page shows and the OOD benchmark scores.

For a model trained on one dataset the evaluation sets are: its in-distribution test split,
its held-out leaf classes (every image of them: the model never saw any), a capped sample of
the other instrument's images (ZooLake for NDSB models), and known outliers made from test
images (chimeras, heavy corruptions, FGSM adversarial examples against the model). Dataset
outputs come from :func:`explain.embeddings.split_outputs` (shared cache); the other-instrument
sample and the known outliers are cached under ``cache_dir()/ood`` keyed by the model's sha256.

The leave-class-out / cross-instrument benchmark over these sets, its tables and its section
of docs/results.md are in ``bench/ood_benchmark.py``.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from data.decode import keeps_colour
from data.manifest import build_manifest, decoded_array
from data.paths import cache_dir, writer_temp
from data.sources import open_source
from models.base import HierarchicalClassifier, images_to_tensor
from models.outliers import adversarial, chimeras, corruptions
from models.handle import open_model

from .ood import CONFIG, feature_scorer, get_score, is_logit_score, logit_score

CACHE_VERSION = 1
OUTLIER_KINDS = ("chimera", "corruption", "adversarial")
DATASET_LABELS = {"ndsb": "NDSB", "zoolake": "ZooLake"}


@dataclass
class EvalSet:
    """One group of evaluation images: logits per level, embeddings, rows (relpath, dataset,
    class; empty relpath for synthetic images) and, for synthetic images, the images."""

    name: str
    kind: str  # "id" | "heldout" | "other" | "outlier"
    logits: dict[str, np.ndarray]
    embeddings: np.ndarray
    rows: pd.DataFrame
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Evaluation:
    """Everything the Anomalies page and the OOD benchmark (bench/ood_benchmark.py) need for one model."""

    model_name: str
    manifest: dict
    levels: tuple[str, ...]
    class_names: dict[str, list[str]]
    sets: dict[str, EvalSet]
    fit_embeddings: np.ndarray
    fit_labels: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def heldout(self) -> list[str]:
        return list(self.manifest.get("heldout") or [])

    def set_of(self, kind: str) -> list[str]:
        return [n for n, s in self.sets.items() if s.kind == kind]

    def scores(self, score: str, level: str | None = None) -> dict[str, np.ndarray]:
        """``{set name: scores}`` for a logit score at ``level`` (default: leaf) or a feature score."""
        level = level or self.levels[-1]
        is_logit = get_score(score).reads == "logits"  # KeyError for an unknown score
        key = (score, level if is_logit else None)
        if key not in self._cache:
            if is_logit:
                self._cache[key] = {n: logit_score(s.logits[level], score) if len(s) else np.zeros(0) for n, s in self.sets.items()}
            else:
                f = feature_scorer(score, self.fit_embeddings, self.fit_labels)
                self._cache[key] = {n: f(s.embeddings) if len(s) else np.zeros(0) for n, s in self.sets.items()}
        return self._cache[key]


# --- building the evaluation sets ---------------------------------------------------------------
def _rank(keys: pd.Series, salt: str) -> np.ndarray:
    h = [int.from_bytes(hashlib.sha1(f"{salt}:{k}".encode()).digest()[:8], "big") for k in keys]
    return np.argsort(np.array(h, dtype=np.uint64), kind="stable")


def other_sample(rows: pd.DataFrame, n: int, per_class: int) -> pd.DataFrame:
    """A deterministic sample: at most ``per_class`` images per class (by file-name hash), then
    the first ``n`` of those by hash."""
    r = rows.iloc[_rank(rows["relpath"], "ood-sample")]
    r = r.groupby("class", sort=False).head(per_class)
    return r.head(n).sort_values("relpath").reset_index(drop=True)


@torch.no_grad()
def _forward(model: HierarchicalClassifier, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from .embeddings import compute_outputs

    return compute_outputs(model, images)


def _label_index(model: HierarchicalClassifier, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    out = {}
    for lvl in model.levels:
        pos = {n: i for i, n in enumerate(model.class_names[lvl])}
        out[lvl] = torch.tensor(rows[lvl].map(pos).to_numpy(dtype=np.int64))
    return out


def make_known_outliers(model: HierarchicalClassifier, images: np.ndarray, rows: pd.DataFrame, n: int, seed: int,
                        eps: float) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """``{kind: (uint8 images, source rows)}``: chimeras, corruptions and FGSM examples made
    from ``n`` in-distribution images each (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    model.eval()
    for kind in OUTLIER_KINDS:
        idx = np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))
        x = images_to_tensor(np.asarray(images[idx]))
        lab = _label_index(model, rows.iloc[idx])
        if kind == "chimera":
            xo, j = chimeras(x, lab[model.levels[-1]], g)
            src = [f"{a} + {b}" for a, b in zip(rows["relpath"].iloc[idx], rows["relpath"].iloc[idx].to_numpy()[j.numpy()])]
        elif kind == "corruption":
            xo, src = corruptions(x, g), list(rows["relpath"].iloc[idx])
        else:
            xo, src = adversarial(model, x, lab, eps), list(rows["relpath"].iloc[idx])
        imgs = (xo.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        meta = pd.DataFrame({"relpath": "", "dataset": f"known outlier: {kind}", "class": kind, "source": src})
        out[kind] = (imgs, meta)
    return out


def sizes(limit_per_class: int | None) -> dict:
    """Sizes of the other-instrument sample and known-outlier sets (smaller for a quick sample)."""
    keys = ("other_instrument", "other_sample", "other_per_class", "outliers_per_kind", "outlier_seed", "outlier_fgsm_eps")
    out = {k: CONFIG[k] for k in keys}
    if limit_per_class:
        out.update(CONFIG["quick"])
    return out


def _extra_path(model_name: str, sha: str, limit_per_class: int | None) -> Path:
    h = hashlib.sha256(json.dumps(sizes(limit_per_class), sort_keys=True).encode()).hexdigest()[:8]
    tag = f"n{limit_per_class}" if limit_per_class else "full"
    return cache_dir() / "ood" / model_name / f"{sha[:16]}__{tag}__{h}__v{CACHE_VERSION}.npz"


def is_evaluated(model_name: str, limit_per_class: int | None = None) -> bool:
    """Whether the model's OOD evaluation (dataset outputs and extra sets) is already on disk."""
    from .embeddings import is_cached

    man = open_model(model_name).manifest
    return is_cached(model_name, man.get("dataset", "ndsb"), limit_per_class) and \
        _extra_path(model_name, man["sha256"], limit_per_class).exists()


def _extra_sets(model: HierarchicalClassifier, man: dict, model_name: str, id_images: np.ndarray, id_rows: pd.DataFrame,
                progress: bool, limit_per_class: int | None = None) -> dict[str, EvalSet]:
    """Other-instrument sample and known outliers, cached on disk per model sha256."""
    dataset = man.get("dataset", "ndsb")
    other = CONFIG["other_instrument"].get(dataset)
    path = _extra_path(model_name, man["sha256"], limit_per_class)
    size = sizes(limit_per_class)
    levels = list(model.levels)
    arrays: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # a truncated file from a killed run
            arrays = {}
    if not arrays:
        t0 = time.time()
        if other:
            try:
                osrc = open_source(other)
                orows = other_sample(build_manifest(osrc, progress=False), size["other_sample"], size["other_per_class"])
                oimg = decoded_array(osrc, orows, int(model.preprocessing["size"]), progress=progress,
                                     colour=keeps_colour(model.preprocessing, osrc.mode))
                emb, lg = _forward(model, oimg)
                arrays.update({"other_relpath": orows["relpath"].to_numpy().astype(str), "other_class": orows["class"].to_numpy().astype(str),
                               "other_emb": emb, **{f"other_logits_{k}": v for k, v in lg.items()}})
            except FileNotFoundError:  # the other dataset is not installed: no such set
                pass
        outl = make_known_outliers(model, id_images, id_rows, size["outliers_per_kind"], size["outlier_seed"],
                                   size["outlier_fgsm_eps"])
        for kind, (imgs, meta) in outl.items():
            emb, lg = _forward(model, imgs)
            arrays.update({f"{kind}_images": imgs, f"{kind}_source": meta["source"].to_numpy().astype(str), f"{kind}_emb": emb,
                           **{f"{kind}_logits_{k}": v for k, v in lg.items()}})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = writer_temp(path)
        np.savez(tmp, **arrays)
        tmp.replace(path)
        tag = path.name.split("__")[1]
        for p in path.parent.glob(f"*__{tag}__*.npz"):  # older weights or settings, same sample size
            if p != path and not p.name.startswith("."):  # not another writer's temporary file
                p.unlink(missing_ok=True)
        if progress:
            print(f"{model_name}: other-instrument sample and known outliers in {time.time() - t0:.1f} s", file=sys.stderr)
    sets: dict[str, EvalSet] = {}
    if "other_emb" in arrays:
        rows = pd.DataFrame({"relpath": arrays["other_relpath"], "dataset": other, "class": arrays["other_class"]})
        sets[DATASET_LABELS.get(other, other)] = EvalSet(DATASET_LABELS.get(other, other), "other",
                                                         {k: arrays[f"other_logits_{k}"] for k in levels}, arrays["other_emb"], rows)
    for kind in OUTLIER_KINDS:
        rows = pd.DataFrame({"relpath": "", "dataset": f"known outlier: {kind}", "class": kind, "source": arrays[f"{kind}_source"]})
        sets[f"known outliers: {kind}"] = EvalSet(f"known outliers: {kind}", "outlier", {k: arrays[f"{kind}_logits_{k}"] for k in levels},
                                                 arrays[f"{kind}_emb"], rows, arrays[f"{kind}_images"])
    return sets


def evaluation(model_name: str, limit_per_class: int | None = None, progress: bool = False,
               on_progress: Callable[[float, str], None] | None = None) -> Evaluation:
    """The OOD evaluation of a zoo model (computed once, then read from the caches).
    ``limit_per_class`` evaluates a quick sample (n images per class and split);
    ``on_progress(fraction, message)`` reports progress (for a UI progress bar)."""
    from .embeddings import dataset_manifest, split_outputs

    lm = open_model(model_name)
    model, man = lm.classifier, lm.manifest
    dataset = man.get("dataset", "ndsb")
    o = split_outputs(model_name, dataset, progress=progress, limit_per_class=limit_per_class,
                      on_progress=(lambda f, m: on_progress(0.9 * f, m)) if on_progress else None)
    rows = o.rows
    held = list(man.get("heldout") or [])
    leaf = model.levels[-1]
    known = rows["class"].isin(model.class_names[leaf]).to_numpy()
    is_held = rows["class"].isin(held).to_numpy()
    test = (rows["split"] == "test").to_numpy() & known & ~is_held
    fit = (rows["split"] == "train").to_numpy() & known & ~is_held
    cols = ["relpath", "dataset", "class", *[lvl for lvl in model.levels if lvl != "class"], "split"]
    label = DATASET_LABELS.get(dataset, dataset)
    sets = {f"in-distribution ({label} test)": EvalSet(f"in-distribution ({label} test)", "id", {k: v[test] for k, v in o.logits.items()},
                                                      o.embeddings[test], rows.loc[test, cols].reset_index(drop=True))}
    sets["held-out classes"] = EvalSet("held-out classes", "heldout", {k: v[is_held] for k, v in o.logits.items()},
                                       o.embeddings[is_held], rows.loc[is_held, cols].reset_index(drop=True))
    src, full_rows = dataset_manifest(dataset, man, limit_per_class)
    if on_progress:
        on_progress(0.9, "the other instrument's sample and known outliers")
    images = decoded_array(src, full_rows, int(model.preprocessing["size"]), progress=progress,
                           colour=keeps_colour(model.preprocessing, src.mode))
    id_idx = np.flatnonzero(test)
    sets.update(_extra_sets(model, man, model_name, np.asarray(images[id_idx]), rows.iloc[id_idx].reset_index(drop=True), progress,
                            limit_per_class))
    if on_progress:
        on_progress(1.0, "done")
    pos = {n: i for i, n in enumerate(model.class_names[leaf])}
    fit_labels = rows.loc[fit, "class"].map(pos).to_numpy(dtype=np.int64)
    return Evaluation(model_name, man, tuple(model.levels), dict(model.class_names), sets, o.embeddings[fit], fit_labels)


# --- helpers for the Anomalies page -----------------------------------------------------------------
def most_anomalous(ev: Evaluation, score: str, level: str | None, set_names: list[str], n: int = 12) -> pd.DataFrame:
    """The ``n`` highest-scoring images of ``set_names``: set, index in the set, score, class, link."""
    s = ev.scores(score, level)
    parts = []
    for name in set_names:
        es = ev.sets[name]
        if not len(es):
            continue
        top = np.argsort(-s[name], kind="stable")[:n]
        parts.append(pd.DataFrame({"set": name, "index": top, "score": s[name][top], "class": es.rows["class"].to_numpy()[top],
                                   "link": [deep_link(es, int(i)) for i in top]}))
    if not parts:
        return pd.DataFrame(columns=["set", "index", "score", "class", "link"])
    return pd.concat(parts).sort_values("score", ascending=False, kind="stable").head(n).reset_index(drop=True)


def typical_index(ev: Evaluation, score: str, level: str | None) -> int:
    """A "usual" activation: the correctly classified in-distribution test image with the median
    score (the median of all of them when none is correct)."""
    idn = ev.set_of("id")[0]
    s = ev.scores(score, level)[idn]
    es, leaf = ev.sets[idn], ev.levels[-1]
    pred = np.asarray(ev.class_names[leaf])[es.logits[leaf].argmax(1)] if len(es) else np.zeros(0, str)
    cand = np.flatnonzero(pred == es.rows["class"].to_numpy())
    if not len(cand):
        cand = np.arange(len(s))
    return int(cand[np.argsort(s[cand], kind="stable")[len(cand) // 2]])


def deep_link(es: EvalSet, i: int) -> str | None:
    """``<dataset>:<relpath>`` of a dataset image (None for a synthetic known outlier)."""
    r = es.rows.iloc[i]
    return f"{r['dataset']}:{r['relpath']}" if r["relpath"] else None


def display_image(ev: Evaluation, set_name: str, i: int, size: int = 128):
    """A square RGB PIL image of one evaluation image in its instrument's polarity."""
    from PIL import Image

    from data.decode import fit_square, load_for_model

    es = ev.sets[set_name]
    if es.images is not None:
        fg = es.images[i]
        bg = open_source(ev.manifest.get("dataset", "ndsb")).background
        arr = 255 - fg if bg >= 128 else fg
        return Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST).convert("RGB")
    r = es.rows.iloc[i]
    src = open_source(r["dataset"])
    _, dec, _ = load_for_model(src.read_bytes(r["relpath"]), size, mode=src.mode, background=src.background)
    return fit_square(dec.image, size, src.background).convert("RGB")


def group_level(ev: Evaluation) -> str | None:
    """The level above the leaf used for "known group, unknown class" (the group level when present)."""
    if "group" in ev.levels:
        return "group"
    return ev.levels[-2] if len(ev.levels) > 1 else None


def known_group_unknown(ev: Evaluation, score: str, tpr: float | None = None) -> dict[str, np.ndarray]:
    """Per set, which images have a peaked group head and a flat leaf head (thresholds keep
    ``tpr`` of in-distribution images at each level)."""
    from .ood import known_group_unknown_class, threshold_at_tpr

    grp, leaf = group_level(ev), ev.levels[-1]
    if grp is None or not is_logit_score(score):
        return {}
    sg, sl = ev.scores(score, grp), ev.scores(score, leaf)
    idn = ev.set_of("id")[0]
    tg, tl = threshold_at_tpr(sg[idn], tpr), threshold_at_tpr(sl[idn], tpr)
    return {n: known_group_unknown_class(sg[n], sl[n], tg, tl) for n in ev.sets}
