"""The Community view's data, laid out once per level and grouping (no threshold involved).

:func:`base` reads a scored table at one taxonomic level (predictions, truth, review decisions,
the model's training prior and validation images); :func:`group` groups it (:func:`group_keys`)
and lays the images the model counts out in group order, sorted by the OOD score a threshold will
cut, with cumulative posterior sums every :data:`BLOCK` images: any threshold then keeps a prefix
of each group, whose counts and posterior sums cost a bincount and two partial blocks per group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import quantify as Q
from .community_groups import group_keys

UNKNOWN = "unknown"
UNLABELLED = "unlabelled"
LAYOUT_SEED = 20021  # the random order of images within a group (EM's and the bands' subsets)


class CommunityError(ValueError):
    """A grouping or estimate that cannot be made as asked (the message says why)."""


# --- the model's taxonomy at one level -------------------------------------------------------
@dataclass
class Taxa:
    """The model's classes at ``level`` and how leaf classes and labels at any level map to them."""

    level: str
    names: list[str]
    leaf_paths: pd.DataFrame  # one row per leaf class (index), one column per level
    levels: list[str]

    @property
    def k(self) -> int:
        return len(self.names)

    def index(self, names: pd.Series | np.ndarray) -> np.ndarray:
        """Class indices at this level of leaf class names (-1: not a class the model knows)."""
        at = self.leaf_paths[self.level] if self.level in self.leaf_paths else pd.Series(dtype=object)
        lvl_name = pd.Series(np.asarray(names, dtype=object)).map(at)
        return _codes(lvl_name, self.names)

    def codes(self, names: pd.Series | np.ndarray) -> np.ndarray:
        """Class indices of names already at this level (-1 when not one of them)."""
        return _codes(pd.Series(np.asarray(names, dtype=object)), self.names)


def _codes(values: pd.Series, names: list[str]) -> np.ndarray:
    return pd.Categorical(values, categories=names).codes.astype(np.int32)


def taxa_of(class_names: dict[str, list[str]], taxonomy, level: str) -> Taxa:
    """The :class:`Taxa` of a model (its ``class_names`` per level and ``taxonomy``) at ``level``."""
    levels = list(class_names)
    if level not in class_names:
        raise CommunityError(f"level {level!r} is not one of the model's levels ({', '.join(levels)})")
    leaf = levels[-1]
    paths = pd.DataFrame([taxonomy.path(c) for c in class_names[leaf]], index=class_names[leaf])
    paths[leaf] = paths.index
    return Taxa(level, list(class_names[level]), paths[levels], levels)


# --- what does not depend on the threshold ---------------------------------------------------
@dataclass
class Base:
    """A scored table read at one level with the review decisions applied: what every grouping
    shares (per image, in the table's order)."""

    taxa: Taxa
    table: pd.DataFrame
    proba: np.ndarray | None  # (N, K) posteriors at the level (float16, may be memory-mapped)
    readable: np.ndarray
    pred: np.ndarray  # predicted class index at the level (-1: none)
    truth: np.ndarray | None  # true class index (K: a class the model does not know); None: not labelled
    kind: np.ndarray  # 0 the model's, 1 validated label, 2 confirmed anomaly, 3 not an anomaly
    label: np.ndarray  # the validated label's class index
    prior: np.ndarray | None  # (K,) the training prior (EM)
    validation: pd.DataFrame | None  # the model's validation images (score columns)
    val_true: np.ndarray | None
    val_pred: np.ndarray | None
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.taxa.k


def base(table: pd.DataFrame, taxa: Taxa, proba: np.ndarray | None = None, validation: pd.DataFrame | None = None,
         train_counts: dict[str, int] | None = None, sampler: str = "uniform",
         decisions: pd.DataFrame | None = None) -> Base:
    """Read a scored ``table`` at ``taxa.level``: ``proba`` its posteriors at that level (N, K;
    PCC and EM need them), ``validation`` the model's validation images (ACC's confusion),
    ``train_counts`` its training images per leaf class (EM's prior, reweighted by its
    ``sampler``), ``decisions`` the collection's current review decisions
    (:meth:`explain.review_store.ReviewStore.current`)."""
    notes: list[str] = []
    n = len(table)
    readable = table["readable"].to_numpy(bool) if "readable" in table else np.ones(n, bool)
    pred_col = f"pred_{taxa.level}"
    if pred_col not in table:
        raise CommunityError(f"the table has no {pred_col!r} column")
    pred = taxa.codes(table[pred_col].to_numpy())
    if (readable & (pred < 0)).any():
        notes.append(f"{int((readable & (pred < 0)).sum())} predictions are not classes at {taxa.level!r}: unknown.")
    kind = np.zeros(n, np.int8)
    label = np.full(n, -1, np.int32)
    if decisions is not None and len(decisions):
        kind, label, unmapped = _apply_decisions(table, decisions, taxa, proba)
        if unmapped:
            notes.append(f"{unmapped} validated label(s) are not classes of this model at {taxa.level!r}: "
                         "counted as unknown.")
    truth = None
    if "class" in table:
        cls = table["class"].to_numpy()[readable]
        if len(cls) and not ((cls == UNLABELLED).any() or pd.isna(cls).any()):
            t = taxa.index(table["class"].to_numpy())
            truth = np.where(t < 0, taxa.k, t).astype(np.int32)
    if proba is None:
        notes.append("The table has no posterior probabilities (scored before they were kept): PCC and EM are "
                     "not available; score the collection again.")
    prior = None
    if train_counts:
        leaf_names = np.array(taxa.leaf_paths.index, dtype=object)
        counts = np.array([train_counts.get(c, 0) for c in leaf_names], np.float64)
        at = taxa.index(leaf_names)
        w = Q.training_prior(counts, sampler)
        prior = np.bincount(at[at >= 0], weights=w[at >= 0], minlength=taxa.k)[:taxa.k]
        prior = Q.shares(prior) if prior.sum() > 0 else None
    if prior is None:
        notes.append("The model's training class counts are unknown: EM is not available.")
    val_true = val_pred = None
    if validation is not None and len(validation) and "class" in validation and pred_col in validation:
        val_true = taxa.index(validation["class"].to_numpy())
        val_pred = taxa.codes(validation[pred_col].to_numpy())
    else:
        validation = None
        notes.append("The model has no validation images here: ACC is not available.")
    return Base(taxa, table, proba, readable, pred, truth, kind, label, prior, validation, val_true, val_pred, notes)


@dataclass
class Grouped:
    """A :class:`Base` grouped, ready for :func:`estimate` at any threshold.

    The usable images (readable, with a value for the grouping) that the model counts (no
    validated label, no confirmed anomaly) are laid out in group order (``seg`` the offsets) and,
    within a group, by ``score`` (ascending; an image marked "not an anomaly" first): the images a
    threshold keeps are a prefix of each group, whose posteriors' sum comes from cumulative sums
    kept every :data:`BLOCK` images. ``rank`` is a seeded random rank (EM's and the bands'
    subsets: the kept images of lowest rank)."""

    base: Base
    by: str
    score: str | None  # the OOD score column the layout is sorted by (None: no threshold)
    groups: pd.DataFrame  # one row per group: group, images, lat, lon, time, depth
    rows: np.ndarray  # table row of each laid-out image
    g: np.ndarray  # its group
    seg: np.ndarray  # (G + 1,) offsets of the groups in the layout
    pred: np.ndarray  # its predicted class index
    sorted_score: np.ndarray  # its score (-inf: never moved)
    rank: np.ndarray  # its random rank
    checkpoints: np.ndarray | None  # (len(rows) // BLOCK + 1, K) cumulative posterior sums
    pred_counts: np.ndarray  # (G, K) predictions of the laid-out images
    reviewed: np.ndarray  # (G, K) images with a validated label, per class
    anomalies: np.ndarray  # (G,) confirmed anomalies (and labels or predictions this model cannot place)
    images: np.ndarray  # (G,) usable images per group
    truth: np.ndarray | None  # (G, K + 1) true counts per class, the last: classes the model does not know
    dropped: int = 0  # readable images without a value for the grouping (left out)
    notes: list[str] = field(default_factory=list)
    group_kw: dict = field(default_factory=dict)

    @property
    def taxa(self) -> Taxa:
        return self.base.taxa

    @property
    def table(self) -> pd.DataFrame:
        return self.base.table

    @property
    def k(self) -> int:
        return self.base.k

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def labelled(self) -> bool:
        return self.truth is not None

    @property
    def has_proba(self) -> bool:
        return self.base.proba is not None

    def posteriors(self, idx: np.ndarray) -> np.ndarray:
        """The float32 posteriors of laid-out images ``idx``."""
        return np.asarray(self.base.proba[self.rows[idx]], np.float32)


def group(b: Base, by: str, score: str | None = None, **group_kw) -> Grouped:
    """Group a :class:`Base` by ``by`` (:func:`group_keys`; ``group_kw``: its bin sizes), laid
    out for thresholds on ``score`` (a score column of the table, or None)."""
    notes = list(b.notes)
    if score is not None and score not in b.table:
        raise CommunityError(f"the table has no score column {score!r}")
    all_codes, info = group_keys(b.table, by, **group_kw)
    has = (all_codes >= 0) & b.readable
    dropped = int(((all_codes < 0) & b.readable).sum())
    if dropped:
        notes.append(f"{dropped:,} images have no value for {by!r} and are left out.")
    if not has.any():
        raise CommunityError(f"no readable image has a value for {by!r}")
    pos = np.flatnonzero(has)
    codes = all_codes[pos]
    present = np.bincount(codes, minlength=len(info)) > 0
    if not present.all():  # groups whose images are all unreadable
        codes = (np.cumsum(present) - 1)[codes].astype(np.int32)
        info = info[present].reset_index(drop=True)
    G, K = len(info), b.k
    kind = b.kind[pos].copy()
    kind[((kind == 0) | (kind == 3)) & (b.pred[pos] < 0)] = 2  # a prediction this level cannot place: unknown
    lab = kind == 1
    reviewed = np.bincount(codes[lab] * K + b.label[pos][lab], minlength=G * K).reshape(G, K).astype(np.int64)
    anomalies = np.bincount(codes[kind == 2], minlength=G).astype(np.int64)
    images = np.bincount(codes, minlength=G).astype(np.int64)
    truth = None
    if b.truth is not None:
        truth = np.bincount(codes * (K + 1) + b.truth[pos], minlength=G * (K + 1)).reshape(G, K + 1).astype(np.int64)

    model = (kind == 0) | (kind == 3)
    mpos, mcodes = pos[model], codes[model]
    rng = np.random.default_rng(LAYOUT_SEED)
    rank = rng.permutation(len(mpos)).astype(np.int64)
    sc = np.full(len(mpos), -np.inf, np.float32)
    if score is not None:
        sc = b.table[score].to_numpy(np.float32)[mpos]
        sc = np.where(np.isnan(sc) | (kind[model] == 3), -np.inf, sc).astype(np.float32)
    order = np.lexsort((rank, sc, mcodes))  # by group, then score, ties by the random rank
    rows, g = mpos[order], mcodes[order]
    seg = np.searchsorted(g, np.arange(G + 1)).astype(np.int64)
    pred = b.pred[rows]
    pred_counts = np.bincount(g * K + pred, minlength=G * K).reshape(G, K).astype(np.int64)
    ckpt = checkpoints(b.proba, rows) if b.proba is not None else None
    return Grouped(b, by, score, info.assign(images=images), rows, g, seg, pred, sc[order], rank[order], ckpt,
                   pred_counts, reviewed, anomalies, images, truth, dropped, notes, dict(group_kw))


#: Images between two kept cumulative sums of the posteriors (a threshold's sum reads at most 2 × BLOCK per group).
BLOCK = 1024


def checkpoints(proba: np.ndarray, rows: np.ndarray, block: int = BLOCK, chunk_blocks: int = 32) -> np.ndarray:
    """(len(rows) // block + 1, K) float64: the sum of ``proba[rows[:j * block]]`` for each j."""
    n, k = len(rows), proba.shape[1]
    nb = n // block
    sums = np.zeros((nb + 1, k), np.float64)
    for a in range(0, nb, chunk_blocks):
        b = min(nb, a + chunk_blocks)
        v = np.asarray(proba[rows[a * block:b * block]], np.float32).reshape(b - a, block, k)
        sums[a + 1:b + 1] = v.sum(1, dtype=np.float64)
    return np.cumsum(sums, axis=0)


def range_sums(gr: "Grouped", start: np.ndarray, stop: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """(len(start), K): the posteriors of laid-out images ``start[i]:stop[i]`` summed, from the
    checkpoints plus at most two partial blocks each."""
    start, stop = np.asarray(start, np.int64), np.asarray(stop, np.int64)
    ja = -(-start // block)  # first checkpoint at or after start
    jb = stop // block  # last checkpoint at or before stop
    whole = ja <= jb
    out = np.zeros((len(start), gr.k), np.float64)
    out[whole] = gr.checkpoints[jb[whole]] - gr.checkpoints[ja[whole]]
    parts, owner = [], []
    for i in range(len(start)):
        if whole[i]:
            pieces = [(start[i], min(ja[i] * block, stop[i])), (max(jb[i] * block, start[i]), stop[i])]
        else:
            pieces = [(start[i], stop[i])]
        for a, b in pieces:
            if b > a:
                parts.append(np.arange(a, b))
                owner.append(np.full(b - a, i))
    if parts:
        idx, own = np.concatenate(parts), np.concatenate(owner)
        out += segment_sum(gr.base.proba, own, len(start), gr.rows[idx])
    return out


def prepare(table: pd.DataFrame, taxa: Taxa, by: str, proba: np.ndarray | None = None,
            validation: pd.DataFrame | None = None, train_counts: dict[str, int] | None = None,
            sampler: str = "uniform", decisions: pd.DataFrame | None = None, score: str | None = None,
            **group_kw) -> Grouped:
    """:func:`base` then :func:`group` (see both)."""
    return group(base(table, taxa, proba, validation, train_counts, sampler, decisions), by, score, **group_kw)


def _apply_decisions(table: pd.DataFrame, decisions: pd.DataFrame, taxa: Taxa,
                     proba: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per image: its decision kind (0 none, 1 validated label, 2 confirmed anomaly, 3 not an
    anomaly) and the label's class index at the level. A label finer than the level counts for
    its ancestor; a coarser one for its most probable descendant (the image's posteriors at the
    level, ``proba``, restricted to its descendants); a label this model does not know is "unknown"."""
    n = len(table)
    d = decisions.drop_duplicates(["relpath"], keep="last").set_index("relpath")
    hit = pd.Index(d.index).get_indexer(table["relpath"].to_numpy())
    kind = np.zeros(n, np.int8)
    label_idx = np.full(n, -1, np.int32)
    dec = d["decision"].to_numpy()
    unmapped = 0
    levels = taxa.levels
    at = levels.index(taxa.level)
    paths = taxa.leaf_paths
    for i in np.flatnonzero(hit >= 0):
        j = hit[i]
        what = dec[j]
        if what == "confirm_anomaly":
            kind[i] = 2
        elif what == "not_anomaly":
            kind[i] = 3
        elif what == "assign_label":
            label = str(d["label"].iloc[j])
            lvl = str(d["label_level"].iloc[j] or "") if "label_level" in d else ""
            if lvl not in levels or not (paths[lvl] == label).any():
                lvl = next((lv for lv in reversed(levels) if (paths[lv] == label).any()), "")
            idx = -1
            if lvl:
                under = paths[paths[lvl] == label]
                if levels.index(lvl) >= at:  # as fine as the level or finer: its ancestor
                    idx = int(taxa.codes(under[taxa.level].iloc[:1].to_numpy())[0])
                else:  # coarser: its most probable descendant at the level
                    cand = taxa.codes(under[taxa.level].unique())
                    row = np.asarray(proba[i], np.float32)[cand] if proba is not None else np.zeros(len(cand))
                    idx = int(cand[np.argmax(np.nan_to_num(row, nan=-1.0))])
            if idx >= 0:
                kind[i], label_idx[i] = 1, idx
            else:
                kind[i] = 2
                unmapped += 1
    return kind, label_idx, unmapped


def segment_sum(values: np.ndarray, g: np.ndarray, n_groups: int, rows: np.ndarray | None = None,
                chunk: int = 1 << 15) -> np.ndarray:
    """Per group, the sum of ``values[rows]`` (N, K; any float dtype; all rows when ``rows`` is
    None) with ``g`` (the group of each, sorted) → (G, K) float64, in chunks (float16 summed in float32)."""
    out = np.zeros((n_groups, values.shape[1]), np.float64)
    for a in range(0, len(g), chunk):
        v = np.asarray(values[a:a + chunk] if rows is None else values[rows[a:a + chunk]], dtype=np.float32)
        gg = g[a:a + chunk]
        if not len(gg):
            continue
        starts = np.concatenate([[0], np.flatnonzero(np.diff(gg)) + 1])
        out[gg[starts]] += np.add.reduceat(v, starts, axis=0)
    return out
