"""What a scored collection says about the plankton community: counts per group, corrected.

A scored table (:mod:`explain.score`) is grouped by sample, station, day, week, depth bin or any
metadata column (:func:`group_keys`), at any taxonomic level of the model, and each group's
relative abundance is estimated four ways (:mod:`explain.quantify`: classify-and-count,
probabilistic classify-and-count, adjusted classify-and-count, EM prior shift), each with a
bootstrap band over images. Images whose chosen OOD score lies above a threshold move to
"unknown"; review decisions apply (a validated label replaces the prediction, a confirmed anomaly
stays "unknown", an image marked "not an anomaly" is never moved). Diversity per group (richness,
Shannon) and Bray–Curtis between groups come from scikit-bio (:mod:`explain.community_stats`).

Speed: :func:`prepare` (:mod:`explain.community_layout`) does what does not depend on the
threshold once per grouping and score (group codes, predictions, the images sorted by score within
each group, cumulative posterior sums); :func:`estimate` then costs a search per group, a bincount,
two partial blocks of posteriors per group and EM. EM runs on at most ``em_images`` kept images
per group (a seeded random subset, exact below that); the bands are described in
:mod:`explain.community_bands`.

    python -m explain.community estimate --collection NAME [--model NAME] [--split SPLIT] --by COLUMN
                                         [--level LEVEL] [--score COLUMN [--threshold X]] [--boot N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import quantify as Q
from .community_bands import bands
from .community_groups import MAX_GROUPS, GroupingError, group_keys, group_options  # noqa: F401 - re-exported
from .community_layout import (BLOCK, UNKNOWN, UNLABELLED, Base, CommunityError, Grouped, Taxa, base, group, prepare,
                               range_sums, taxa_of)

__all__ = ["BLOCK", "MAX_GROUPS", "UNKNOWN", "UNLABELLED", "Base", "CommunityError", "Estimate", "GroupingError", "Grouped",
           "Taxa", "base", "base_of", "counts_csv", "estimate", "from_scored", "group", "group_keys", "group_options", "main",
           "prepare", "run_estimate", "taxa_of", "to_json"]


# --- at one threshold ----------------------------------------------------------------------------
@dataclass
class Estimate:
    """Relative abundance per group and class (the last column: "unknown") by each estimator,
    with bootstrap bands, at one OOD threshold."""

    grouped: Grouped
    score: str | None
    threshold: float | None
    counts: np.ndarray  # (G, K) classify-and-count counts of the images kept, validated labels included
    moved: np.ndarray  # (G,) images moved to "unknown" by the threshold
    moved_counts: np.ndarray  # (G, K) what the model predicted for them
    shares: dict[str, np.ndarray]  # estimator → (G, K + 1)
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    em_images: np.ndarray  # (G,) images EM ran on
    n_boot: int
    notes: list[str] = field(default_factory=list)

    @property
    def taxa(self) -> list[str]:
        return self.grouped.taxa.names

    @property
    def true_shares(self) -> np.ndarray | None:
        """(G, K + 1) true relative abundance (the last column: classes the model does not know)."""
        t = self.grouped.truth
        return None if t is None else Q.shares(t)

    def bray_curtis_threshold(self) -> np.ndarray:
        """Per group: Bray–Curtis between the community (relative abundance of the model's
        predictions, validated labels included) with and without the images the threshold moves."""
        from .community_stats import bray_curtis_pairs

        return bray_curtis_pairs(self.counts + self.moved_counts, self.counts)

    def error(self) -> dict[str, float] | None:
        """Each estimator's mean absolute error against the true relative abundance, over groups
        and the model's classes (None when the collection is not labelled)."""
        t = self.true_shares
        if t is None:
            return None
        return {e: float(np.mean(np.abs(s[:, :-1] - t[:, :-1]))) if np.isfinite(s).all() else float("nan")
                for e, s in self.shares.items()}

    def group_errors(self) -> dict[str, np.ndarray] | None:
        t = self.true_shares
        return None if t is None else {e: np.abs(s[:, :-1] - t[:, :-1]).mean(1) for e, s in self.shares.items()}

    def group_frame(self) -> pd.DataFrame:
        """One row per group: its images, those moved and reviewed, and the threshold's effect."""
        gr = self.grouped
        df = gr.groups.copy()
        df["moved_to_unknown"] = self.moved
        df["confirmed_anomalies"] = gr.anomalies
        df["validated_labels"] = gr.reviewed.sum(1)
        df["bray_curtis_threshold"] = self.bray_curtis_threshold()
        ge = self.group_errors()
        for e, v in (ge or {}).items():
            df[f"error_{e}"] = v
        return df

    def frame(self) -> pd.DataFrame:
        """One row per group × class ("unknown" last): the classify-and-count count, each
        estimator's relative abundance with its band, and the true one when labelled."""
        gr = self.grouped
        G, K = gr.n_groups, gr.k
        names = np.array(self.taxa + [UNKNOWN], dtype=object)
        cnt = np.concatenate([self.counts, (self.moved + gr.anomalies)[:, None]], axis=1)
        out = {"group": np.repeat(gr.groups["group"].to_numpy(), K + 1), "taxon": np.tile(names, G),
               "images": np.repeat(gr.images, K + 1), "count": cnt.ravel()}
        t = self.true_shares
        if t is not None:
            out["true"] = t.ravel()
        for e in Q.ESTIMATORS:
            out[e] = self.shares[e].ravel()
            out[f"{e}_low"] = self.low[e].ravel()
            out[f"{e}_high"] = self.high[e].ravel()
        return pd.DataFrame(out)


def moved_mask(gr: Grouped, threshold: float | None) -> np.ndarray:
    """Which laid-out images a threshold on ``gr.score`` moves to "unknown"."""
    kept_n = kept_per_group(gr, threshold)
    return (np.arange(len(gr.rows)) - gr.seg[gr.g]) >= kept_n[gr.g]


def estimate(gr: Grouped, score: str | None = None, threshold: float | None = None, n_boot: int = 100,
             seed: int = 0, em_images: int = 2000, band_images: int = 200, band: float = 0.95) -> Estimate:
    """Every estimator's relative abundance per group at one threshold (images whose ``score``,
    by default the one ``gr`` is laid out for, is above ``threshold`` move to "unknown"; none
    without a threshold), with ``band`` bootstrap bands from ``n_boot``
    replicates (``seed``: reproducible); see the module docstring for ``em_images`` and
    ``band_images``. BLAS runs on one thread meanwhile: these are many small products and solves,
    which threads waiting on each other slowed 10-100x on a busy 2-core machine."""
    score = score or gr.score
    if score != gr.score:  # laid out for another score: regroup (pass the score to group() to do it once)
        gr = group(gr.base, gr.by, score, **gr.group_kw)
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _estimate(gr, score if threshold is not None else None, threshold, n_boot, seed, em_images,
                         band_images, band)


_CONTROLLER: list = []


def _blas_controller():
    """threadpoolctl's controller, built once (it scans the loaded libraries)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


def _estimate(gr: Grouped, score: str | None, threshold: float | None, n_boot: int, seed: int, em_images: int,
              band_images: int, band: float) -> Estimate:
    G, K = gr.n_groups, gr.k
    notes = list(gr.notes)
    kept_n = kept_per_group(gr, threshold if score is not None else None)
    keep = (np.arange(len(gr.rows)) - gr.seg[gr.g]) < kept_n[gr.g]
    kept_counts = np.bincount(gr.g[keep] * K + gr.pred[keep], minlength=G * K).reshape(G, K)
    moved_counts = gr.pred_counts - kept_counts
    n_moved = np.diff(gr.seg) - kept_n
    n_kept = kept_n
    n = gr.images.astype(np.float64)

    # each estimator's shares among the kept images the model counts
    within: dict[str, np.ndarray] = {"classify_and_count": Q.shares(kept_counts)}
    rates, vkeep = _rates(gr, score, threshold)
    within["adjusted_classify_and_count"] = (Q.adjusted_classify_and_count(within["classify_and_count"], rates)
                                             if rates is not None else np.full((G, K), np.nan))
    pcc_sum = None
    if gr.has_proba:
        pcc_sum = np.maximum(range_sums(gr, gr.seg[:-1], gr.seg[:-1] + kept_n), 0.0)
        within["probabilistic_classify_and_count"] = np.divide(pcc_sum, n_kept[:, None], out=np.zeros((G, K)),
                                                               where=n_kept[:, None] > 0)
    else:
        within["probabilistic_classify_and_count"] = np.full((G, K), np.nan)
    prior = _kept_prior(gr, vkeep)
    subsets = _subsets(gr, kept_n, em_images) if gr.has_proba else None
    em_n = np.zeros(G, np.int64)
    if subsets is not None and prior is not None:
        em_hat = np.zeros((G, K))
        for i, idx in enumerate(subsets):
            if len(idx):
                em_hat[i] = Q.em(gr.posteriors(idx), prior)
                em_n[i] = len(idx)
        within["em"] = em_hat
        if (n_kept > em_images).any():
            notes.append(f"EM ran on a random {em_images:,} of the kept images in groups with more.")
    else:
        within["em"] = np.full((G, K), np.nan)

    def combine(w: np.ndarray, reviewed: np.ndarray, kept: np.ndarray, unknown: np.ndarray, tot: np.ndarray) -> np.ndarray:
        taxa = (reviewed + kept[..., None] * w) / tot[..., None]
        return np.concatenate([taxa, (unknown / tot)[..., None]], axis=-1)

    unknown = n_moved + gr.anomalies
    shares = {e: combine(within[e], gr.reviewed, n_kept, unknown, n) for e in Q.ESTIMATORS}
    low, high = bands(gr, within, kept_counts, n_moved, rates, vkeep, prior, subsets, em_n, n_boot, seed,
                       band_images, band, shares)
    return Estimate(gr, score, threshold, kept_counts + gr.reviewed, n_moved, moved_counts, shares, low, high,
                    em_n, n_boot, notes)


def _rates(gr: Grouped, score: str | None, threshold: float | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ACC's confusion on the model's validation images kept by the threshold, and that keep mask."""
    if gr.base.val_true is None:
        return None, None
    vkeep = np.ones(len(gr.base.val_true), bool)
    if score is not None and threshold is not None and score in gr.base.validation:
        vkeep = ~(gr.base.validation[score].to_numpy(np.float32) > threshold)
    m, _ = Q.confusion_rates(gr.base.val_true[vkeep], gr.base.val_pred[vkeep], gr.k)
    return m, vkeep


def _kept_prior(gr: Grouped, vkeep: np.ndarray | None) -> np.ndarray | None:
    """EM's prior for the kept images: the training prior times each class's share of validation
    images the threshold keeps (selection on x leaves p(y | x) alone but shifts the prior)."""
    if gr.base.prior is None:
        return None
    if vkeep is None or vkeep.all():
        return gr.base.prior
    ok = (gr.base.val_true >= 0)
    tot = np.bincount(gr.base.val_true[ok], minlength=gr.k)[:gr.k]
    kept = np.bincount(gr.base.val_true[ok & vkeep], minlength=gr.k)[:gr.k]
    rate = np.where(tot > 0, kept / np.maximum(tot, 1), 1.0)
    return Q.shares(gr.base.prior * rate) if (gr.base.prior * rate).sum() > 0 else gr.base.prior


def kept_per_group(gr: Grouped, threshold: float | None) -> np.ndarray:
    """(G,) laid-out images per group whose score is at most ``threshold`` (all without one)."""
    n = np.diff(gr.seg)
    if threshold is None or gr.score is None:
        return n
    return np.array([np.searchsorted(gr.sorted_score[a:b], np.float32(threshold), side="right")
                     for a, b in zip(gr.seg[:-1], gr.seg[1:])], dtype=np.int64)


def _subsets(gr: Grouped, kept_n: np.ndarray, cap: int) -> list[np.ndarray]:
    """Per group, the layout positions of its ``cap`` kept images of lowest random rank (all when
    fewer), in rank order: a seeded random subset, whose first m are a random subset too."""
    out = []
    for a, c in zip(gr.seg[:-1], kept_n):
        r = gr.rank[a:a + c]
        idx = np.argpartition(r, cap)[:cap] if c > cap else np.arange(c)
        out.append(a + idx[np.argsort(r[idx], kind="stable")])
    return out


# --- from a scored table, and the command line ---------------------------------------------------
def default_model(collection: str) -> str | None:
    """The zoo's classifier trained on ``collection`` (the default model first when it is one),
    else the zoo's default model."""
    from models.zoo import default_model_name, list_models

    default = default_model_name()
    own = [m["name"] for m in list_models() if "error" not in m and m.get("kind", "classifier") == "classifier"
           and m.get("dataset") == collection]
    if default in own:
        return default
    return own[0] if own else default


def review_decisions(collection: str) -> pd.DataFrame:
    """The current review decisions on ``collection``'s images (:class:`explain.review_store.ReviewStore`)."""
    from .review_store import ReviewStore

    cur = ReviewStore().current()
    return cur[cur["dataset"] == collection] if len(cur) else cur


def base_of(scored, lm, level: str | None = None, decisions: pd.DataFrame | None = None) -> Base:
    """:func:`base` of a :class:`explain.score.ScoredTable` read with its model ``lm`` (the
    leaf level by default)."""
    level = level or lm.levels[-1]
    taxa = taxa_of(lm.classifier.class_names, lm.classifier.taxonomy, level)
    try:
        proba = scored.proba(level)
    except (OSError, ValueError):
        proba = None
    return base(scored.table, taxa, proba, scored.validation, scored.meta.get("train_counts"),
                scored.meta.get("train_sampler") or "uniform", decisions)


def from_scored(scored, lm, by: str, level: str | None = None, decisions: pd.DataFrame | None = None,
                score: str | None = None, **group_kw) -> Grouped:
    """:func:`base_of` then :func:`group`."""
    return group(base_of(scored, lm, level, decisions), by, score, **group_kw)


def score_column(name: str | None, level: str, columns) -> str | None:
    """A score column of the table from a column name or a score name (``msp``, ``entropy``,
    ``knn``…, read at ``level``); None for none."""
    if not name or name == "none":
        return None
    for c in (name, f"ood_{name}_{level}", "knn_score" if name in ("knn", "knn_score") else None):
        if c and c in columns:
            return c
    opts = sorted({c[4:].rsplit("_", 1)[0] for c in columns if c.startswith("ood_")} | {"knn"})
    raise CommunityError(f"no score {name!r} in the table; use one of: {', '.join(opts)} (or a column name)")


def _clean(v):
    if isinstance(v, (float, np.floating)):
        return None if not np.isfinite(v) else round(float(v), 6)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, pd.Timestamp):
        return None if pd.isna(v) else v.isoformat()
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return v


def to_json(est: Estimate, **context) -> dict:
    """The estimate as the CLI prints it: ``{"error": {estimator: MAE}`` (labelled collections
    only)``, "groups": [{group, images, moved…, "taxa": [{taxon, count, true, <estimator>,
    <estimator>_low, <estimator>_high}]}], ...context}``."""
    long = est.frame()
    gf = est.group_frame()
    groups = []
    for i, (_, g) in enumerate(gf.iterrows()):
        rec = {k: _clean(g[k]) for k in ("group", "images", "moved_to_unknown", "confirmed_anomalies", "validated_labels",
                                           "lat", "lon", "time", "depth", "bray_curtis_threshold") if k in g}
        errs = {e: _clean(g[f"error_{e}"]) for e in Q.ESTIMATORS if f"error_{e}" in g}
        if errs:
            rec["error"] = errs
        part = long.iloc[i * (est.grouped.k + 1):(i + 1) * (est.grouped.k + 1)]
        rec["taxa"] = [{k: _clean(v) for k, v in r.items() if k not in ("group", "images")} for r in part.to_dict("records")]
        groups.append(rec)
    out: dict = {}
    err = est.error()
    if err is not None:
        out["error"] = {e: _clean(v) for e, v in err.items()}
    out["groups"] = groups
    out.update({k: _clean(v) for k, v in context.items()})
    out.update({"score": est.score, "threshold": _clean(est.threshold), "n_boot": est.n_boot, "notes": est.notes})
    return out


def counts_csv(est: Estimate) -> str:
    """The counts table as CSV: one row per group × class (:meth:`Estimate.frame`) with the
    group's images, position, time, depth and threshold effect; text cells made safe for a
    spreadsheet (:func:`data.safe_text.safe_frame`: group labels are the collection's own text)."""
    from data.safe_text import safe_frame

    info = est.group_frame().drop(columns=["images"])
    return safe_frame(est.frame().merge(info, on="group", how="left")).to_csv(index=False)


def run_estimate(collection: str, by: str, model: str | None = None, split: str | None = None, level: str | None = None,
                 score: str | None = None, threshold: float | None = None, n_boot: int = 100, seed: int = 0,
                 reviews: bool = True, progress: bool = False, **kw) -> tuple[Estimate, dict]:
    """Score ``collection`` when needed, group it and estimate (the CLI's work): (estimate, context)."""
    from data.sources import available_sources

    from .score import run, scored_table
    from models.handle import open_model

    if collection not in available_sources():
        from data.sources import DatasetNotFound

        raise DatasetNotFound(f"no collection or dataset {collection!r} here (python -m data info lists them)")
    model = model or default_model(collection)
    if model is None:
        raise CommunityError("there is no model in the zoo: train one (python -m models.train)")
    lm = open_model(model)
    if level is not None and level not in lm.levels:
        raise CommunityError(f"level {level!r} is not one of {model}'s levels ({', '.join(lm.levels)})")
    t = scored_table(model, collection, split)
    if t is None:
        run(model, collection, split, progress=progress)
        t = scored_table(model, collection, split)
    col = score_column(score, level or lm.levels[-1], t.table.columns)
    if col is not None and threshold is None:
        threshold = t.thresholds.get(col)
        if threshold is None:
            raise CommunityError(f"the table has no threshold for {col!r}: give one with --threshold")
    gr = from_scored(t, lm, by, level, review_decisions(collection) if reviews else None, col,
                     **{k: v for k, v in kw.items() if k in ("depth_bin", "station_decimals")})
    est = estimate(gr, col, threshold, n_boot=n_boot, seed=seed,
                   **{k: v for k, v in kw.items() if k in ("em_images", "band_images")})
    ctx = {"collection": collection, "model": model, "split": split, "by": by, "level": gr.taxa.level}
    return est, ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explain.community", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="relative abundance per group, by four estimators, with bootstrap bands")
    e.add_argument("--collection", required=True, help="dataset or collection name (python -m data info)")
    e.add_argument("--model", default=None, help="zoo model (default: the one trained on the collection, else the default)")
    e.add_argument("--split", default=None, help="only this split (train / val / test)")
    e.add_argument("--by", required=True, help="all, sample, station, day, week, depth, or a column of the scored table")
    e.add_argument("--level", default=None, help="taxonomic level (default: the model's finest)")
    e.add_argument("--score", default=None, help="OOD score whose threshold moves images to unknown (msp, entropy, knn, "
                                                 "or a column); default: none")
    e.add_argument("--threshold", type=float, default=None, help="default: the table's (keeps 95%% of validation images)")
    e.add_argument("--boot", type=int, default=100, help="bootstrap replicates (0: no bands)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--depth-bin", type=float, default=10.0, help="metres per depth bin (--by depth)")
    e.add_argument("--em-images", type=int, default=2000, help="EM's images per group at most (a random subset)")
    e.add_argument("--band-images", type=int, default=200, help="images per group the PCC / EM bootstrap resamples")
    e.add_argument("--no-reviews", action="store_true", help="ignore the Review page's decisions")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    from data.sources import DatasetNotFound
    from models.checkpoint import CheckpointError

    from .score import ScoreError

    try:
        est, ctx = run_estimate(args.collection, args.by, args.model, args.split, args.level, args.score, args.threshold,
                                args.boot, args.seed, not args.no_reviews, progress=not args.json,
                                depth_bin=args.depth_bin, em_images=args.em_images, band_images=args.band_images)
    except (CheckpointError, DatasetNotFound, ScoreError, CommunityError, GroupingError, OSError, ValueError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(est, **ctx)))
    else:
        print(summary(est, ctx))
    return 0


def summary(est: Estimate, ctx: dict) -> str:
    """A few lines: the groups, the threshold's effect, each estimator's error when labelled."""
    gr = est.grouped
    lines = [f"{ctx['collection']} by {ctx['by']} at {ctx['level']} ({ctx['model']}): {gr.n_groups} groups, "
             f"{int(gr.images.sum()):,} images"]
    if est.score:
        lines.append(f"{est.score} > {est.threshold:.4g}: {int(est.moved.sum()):,} images moved to unknown")
    err = est.error()
    if err:
        lines.append("mean absolute error vs the true relative abundance: "
                     + ", ".join(f"{Q.SHORT[e]} {v:.4f}" for e, v in err.items()))
    top = est.frame()
    for g, part in list(top.groupby("group", sort=False))[:10]:
        best = part[part["taxon"] != UNKNOWN].nlargest(3, "em" if np.isfinite(part["em"]).all() else "classify_and_count")
        lines.append(f"  {g}: " + ", ".join(f"{r.taxon} {r.classify_and_count:.0%} (EM {r.em:.0%})" for r in best.itertuples()))
    lines.extend(est.notes)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
