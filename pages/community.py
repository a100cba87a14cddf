"""Community: what a scored collection says about the plankton community, per sample, station,
day, week, depth bin or any metadata column, corrected for the classifier's errors and anomalies.

The page reads the scored table of the sidebar's collection (explain/score.py) and lays out what
:mod:`explain.community` computes: relative abundance per group by four estimators with
bootstrap bands, their comparison (and their error where the collection is labelled), the OOD
threshold's effect, diversity and Bray–Curtis (scikit-bio), a map of the groups on plain
longitude / latitude axes (offline), and the downloads (counts table CSV, figures PNG / SVG).
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import streamlit as st

from explain.community import CommunityError, GroupingError, base_of, counts_csv, estimate, group, group_options
from explain.quantify import ESTIMATORS
from pages import community_figures as F
from pages.common import ScoredView, md_text, run_page, score_label, scored_collection

log = logging.getLogger("plankton_lens.community")
N_BOOT = 100


def _decisions(collection: str) -> pd.DataFrame:
    from explain.community import review_decisions

    try:
        return review_decisions(collection)
    except Exception:  # noqa: BLE001 - an unreadable review store: no decisions, said on the page
        log.exception("review decisions could not be read")
        st.warning("The review decisions could not be read; they are not applied.")
        return pd.DataFrame()


def _key(df: pd.DataFrame) -> str:
    if df is None or not len(df):
        return "none"
    cols = [c for c in ("id", "relpath", "decision", "label", "label_level") if c in df]
    return hashlib.sha1(pd.util.hash_pandas_object(df[cols], index=False).to_numpy().tobytes()).hexdigest()[:12]


@st.cache_data(show_spinner=False, max_entries=8)
def _options(folder: str, stamp: int, levels: tuple[str, ...], _table: pd.DataFrame) -> dict[str, str]:
    return group_options(_table, levels)


@st.cache_resource(show_spinner="Reading the table at this level…", max_entries=6)
def _base(folder: str, stamp: int, model_key: str, level: str, decisions_key: str, _view: ScoredView, _decisions):
    return base_of(_view.scored, _view.lm, level, _decisions)


@st.cache_resource(show_spinner="Grouping…", max_entries=8)
def _group(folder: str, stamp: int, model_key: str, level: str, decisions_key: str, by: str, score: str | None,
           depth_bin: float, _base):
    return group(_base, by, score, depth_bin=depth_bin)


@st.cache_resource(show_spinner="Estimating…", max_entries=24)
def _estimate(folder: str, stamp: int, model_key: str, level: str, decisions_key: str, by: str, score: str | None,
              depth_bin: float, threshold: float | None, n_boot: int, _gr):
    return estimate(_gr, score, threshold, n_boot=n_boot, seed=0)


def _chart(fig, key: str, name: str) -> None:
    """A figure with its PNG / SVG downloads (kaleido, rendered when clicked)."""
    st.plotly_chart(fig, key=key, config={"toImageButtonOptions": {"format": "svg", "filename": name}})
    if F.can_export():
        c = st.columns([1, 1, 6])
        c[0].download_button("PNG", data=lambda: F.figure_bytes(fig, "png"), file_name=f"{name}.png", mime="image/png",
                             key=f"{key}_png", icon=":material/image:", on_click="ignore")
        c[1].download_button("SVG", data=lambda: F.figure_bytes(fig, "svg"), file_name=f"{name}.svg",
                             mime="image/svg+xml", key=f"{key}_svg", icon=":material/draw:", on_click="ignore")


def _threshold(view: ScoredView, level: str) -> tuple[str | None, float | None]:
    """The OOD score and threshold pickers (images above move to "unknown")."""
    t = view.table
    cols = [c for c in view.scored.meta.get("score_columns", []) if c in t and t[c].notna().any()]
    cols = sorted(cols, key=lambda c: (not c.endswith("_" + level), c != f"ood_msp_{level}", c))
    c1, c2 = st.columns([1, 2])
    score = c1.selectbox("Anomaly score", [None, *cols], key="cm_score",
                         format_func=lambda c: "none (keep every image)" if c is None else score_label(c, view.levels),
                         help="Images whose score is above the threshold move to “unknown”. Higher = more anomalous.")
    if score is None:
        return None, None
    v = t[score].to_numpy(np.float64)
    val = view.scored.validation
    ref = val[score].to_numpy(np.float64) if val is not None and score in val else v
    lo, hi = np.nanpercentile(np.concatenate([v, ref]), [0.5, 99.5])
    thr95 = float(view.scored.thresholds.get(score, np.nanquantile(ref, 0.95)))
    lo, hi = float(min(lo, thr95)), float(max(hi, thr95))
    hi = hi if hi > lo else lo + 1e-6
    thr = c2.slider("Threshold (move to unknown above)", min_value=lo, max_value=hi, value=thr95, step=(hi - lo) / 400,
                    format="%.4f", key=f"cm_thr::{view.lm.name}::{view.collection}::{score}",
                    help=f"Starts at the threshold that keeps {view.scored.meta.get('keep', 0.95):.0%} of the model's "
                         "validation images.")
    return score, float(thr)


def main() -> None:
    view = scored_collection(
        "Community", "Counts and relative abundance per group, corrected for the classifier's confusion (ACC), its "
        "calibrated posteriors (PCC, EM) and its anomalies. The corrections assume that what the model did on its "
        "validation images holds for this collection (the same confusion; only the class prior changed).")
    if view is None:
        return
    levels = view.levels
    folder = str(view.scored.folder)
    stamp = int(view.scored.meta.get("created", 0) * 1000)
    opts = _options(folder, stamp, tuple(levels), view.table)
    c = st.columns([1.2, 1, 1, 1])
    by = c[0].selectbox("Group by", list(opts), format_func=lambda k: opts[k], key="cm_by",
                        index=list(opts).index(next((k for k in ("week", "sample", "station") if k in opts), "all")))
    level = c[1].selectbox("Level", list(levels), index=len(levels) - 1, key="cm_level")
    depth_bin = float(c[2].number_input("Depth bin (m)", 0.5, 1000.0, 10.0, step=0.5, key="cm_depth_bin",
                                        disabled=by != "depth"))
    n_boot = int(c[3].number_input("Bootstrap replicates", 0, 500, N_BOOT, step=50, key="cm_boot",
                                   help="Seeded; 0: no bands."))
    score, thr = _threshold(view, level)
    decisions = _decisions(view.collection)
    use_reviews = st.checkbox(f"Apply the Review page's decisions ({len(decisions)} on this collection)", value=True,
                              key="cm_reviews", disabled=not len(decisions),
                              help="A validated label replaces the prediction; a confirmed anomaly stays “unknown”; "
                                   "“not an anomaly” is never moved by the threshold.")
    dec = decisions if use_reviews else pd.DataFrame()
    dkey = _key(dec)
    try:
        b = _base(folder, stamp, view.lm.key, level, dkey, view, dec)
        gr = _group(folder, stamp, view.lm.key, level, dkey, by, score, depth_bin, b)
        est = _estimate(folder, stamp, view.lm.key, level, dkey, by, score, depth_bin, thr, n_boot, gr)
    except (CommunityError, GroupingError) as e:
        st.warning(md_text(e))
        return
    _overview(est)
    estimator = st.radio("Estimator shown", list(ESTIMATORS), format_func=lambda e: F.LABEL[e], horizontal=True,
                         key="cm_estimator", help="For the bars, the series, the diversity and the map.")
    if not np.isfinite(est.shares[estimator]).all():
        st.info(f"{F.LABEL[estimator]} is not available for this table (see the notes below): showing classify and count.")
        estimator = "classify_and_count"
    _chart(F.stacked_bars(est, estimator), "cm_bars", "community-abundance")
    fig = F.series(est, estimator)
    if fig is not None:
        _chart(fig, "cm_series", "community-series")
    _comparison(est)
    _threshold_effect(est)
    _diversity(est, estimator)
    _map(est, estimator)
    _downloads(view, est)
    for note in est.notes:
        st.caption(md_text(note))


def _overview(est) -> None:
    gr = est.grouped
    m = st.columns(5)
    m[0].metric("Groups", f"{gr.n_groups:,}")
    m[1].metric("Images", f"{int(gr.images.sum()):,}")
    m[2].metric("Moved to unknown", f"{int(est.moved.sum()):,}",
                help="Images whose anomaly score is above the threshold.")
    m[3].metric("Validated labels", f"{int(gr.reviewed.sum()):,}")
    m[4].metric("Confirmed anomalies", f"{int(gr.anomalies.sum()):,}")
    if gr.dropped:
        st.caption(f"{gr.dropped:,} images have no value for this grouping and are left out.")


def _comparison(est) -> None:
    st.subheader("The four estimates")
    st.caption("CC counts the predictions; PCC sums the posteriors; ACC corrects CC by the model's confusion on its "
               "validation images (clipped, renormalised); EM re-estimates the prior the posteriors imply (Saerens et "
               "al. 2002). Bands: 95 % bootstrap over images (CC, ACC exact; PCC, EM on up to 200 images per group, "
               "rescaled to the group's size).")
    mean = np.nan_to_num(est.shares["classify_and_count"][:, :-1]).mean(0)
    order = [int(i) for i in np.argsort(-mean, kind="stable")]
    taxon = st.selectbox("Class", order, format_func=lambda i: est.taxa[i], key="cm_taxon")
    _chart(F.comparison(est, taxon), "cm_compare", "community-estimators")
    err = est.error()
    if err is not None:
        st.markdown("**Mean absolute error against the true relative abundance** (over groups and classes)")
        st.dataframe(pd.DataFrame({"estimator": [F.LABEL[e] for e in err], "MAE": list(err.values())}),
                     hide_index=True, column_config={"MAE": st.column_config.NumberColumn(format="%.4f")})


def _threshold_effect(est) -> None:
    st.subheader("The anomaly threshold's effect")
    if est.score is None and not est.grouped.anomalies.any():
        st.caption("Pick an anomaly score above to move images to “unknown” and see how the community changes.")
        return
    st.caption("Per group: the images moved to “unknown” and the Bray–Curtis dissimilarity between the community "
               "(relative abundance of the predicted classes) with and without them.")
    _chart(F.threshold_effect(est), "cm_effect", "community-threshold")


def _diversity(est, estimator: str) -> None:
    from explain.community_stats import bray_curtis_between, diversity

    st.subheader("Diversity")
    st.caption(f"By {F.LABEL[estimator]}: richness (classes with at least one image) and Shannon's index (nats), with "
               "scikit-bio; “unknown” is not a class.")
    st.dataframe(diversity(est, estimator), hide_index=True, key="cm_diversity",
                 column_config={"shannon": st.column_config.NumberColumn(format="%.3f")})
    if 2 <= est.grouped.n_groups <= 80:
        _chart(F.bray_curtis_heatmap(bray_curtis_between(est, estimator)), "cm_bc", "community-bray-curtis")


def _map(est, estimator: str) -> None:
    taxon = st.session_state.get("cm_taxon")
    taxon = int(taxon) if taxon is not None and 0 <= int(taxon) < est.grouped.k else 0
    fig = F.group_map(est, estimator, taxon)
    st.subheader("Map")
    if fig is None:
        st.caption("This collection's images have no positions.")
        return
    st.caption("Groups at their images' mean position, on plain longitude / latitude axes (drawn here, no map tiles "
               "fetched: it works offline). Colour: the class picked above.")
    _chart(fig, "cm_map", "community-map")


def _downloads(view: ScoredView, est) -> None:
    st.subheader("Export")
    st.download_button("Counts table (CSV)", data=counts_csv(est), file_name=f"{view.collection}-community.csv",
                       mime="text/csv", icon=":material/download:", key="cm_csv",
                       help="One row per group × class: the classify-and-count count, each estimator's relative "
                            "abundance with its band, the true one when labelled, and the group's metadata.")
    if F.can_export():
        st.caption("Each figure's PNG and SVG buttons render it with kaleido (a few seconds the first time); the camera "
                   "icon on a chart saves an SVG in the browser.")
    else:
        st.caption("kaleido or a Chromium is not installed here: save a figure as SVG with the camera icon on the chart.")


run_page(main, "community", "The scored table is kept; pick another grouping or level.")
