"""Anomalies: images the model cannot give a valid answer for, found by the flatness of its logits.

A usual activation has one class clearly above the rest; a flat one means "none of the classes
I know". The page reads the scored table of the sidebar's collection (explain/score.py: every
image scored once, labelled or not) and draws, per taxonomic level, the chosen score's histogram
for the model's own validation images (known, the reference of every threshold) beside the
collection's images: split, where the collection is labelled, into classes the model knows and
classes it does not. A threshold with live TPR / FPR / AUROC; the most anomalous images of the
collection with links to the explain page and the neighbourhood view.
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from data.decode import ImageDecodeError, keeps_colour, load_for_model
from explain.ood import CONFIG, auroc, fpr_at_tpr, get_score, is_log_probability, rates_at
from pages.common import (COMPUTE_LOCK, ScoredView, get_source, md_text, page_fragment, run_page, scored_collection,
                          thumbnail)

log = logging.getLogger("plankton_lens.anomalies")
ROOT = Path(__file__).resolve().parent.parent
SEL_KEY = "anomalies_selected"  # (model key, collection, table row)
GALLERY_N = 12
VAL = "known (validation)"
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9"]  # Okabe-Ito


def image_sets(view: ScoredView) -> dict[str, pd.DataFrame]:
    """The histograms' image sets: the model's validation images (known), then the collection's
    readable images, split where it is labelled into known classes / classes unknown to the
    model (held-out ones included) / unlabelled images. For the model's own dataset the known
    classes are its test split (images it never trained on)."""
    out: dict[str, pd.DataFrame] = {}
    if view.scored.validation is not None and len(view.scored.validation):
        out[VAL] = view.scored.validation
    t = view.table[view.table["readable"]]
    leaf_names = set(view.lm.classifier.class_names[view.levels[-1]])
    heldout = set(view.lm.manifest.get("heldout") or [])
    unlabelled = t["class"] == "unlabelled"
    unknown = ~unlabelled & (~t["class"].isin(leaf_names) | t["class"].isin(heldout))
    known = ~unlabelled & ~unknown
    own = view.collection == view.lm.dataset
    if own:
        known &= t["split"] == "test"
    parts = {f"{view.collection}: test images of known classes" if own else f"{view.collection}: known classes": known,
             f"{view.collection}: held-out classes" if own else f"{view.collection}: classes unknown to the model": unknown,
             f"{view.collection}: unlabelled": unlabelled}
    for name, m in parts.items():
        if m.any():
            out[name] = t[m]
    return out


def score_options(view: ScoredView) -> dict[str, str]:
    """Score id → label, for the scores the table holds (logit scores per level, kNN distance)."""
    have = set(view.table.columns)
    out = {}
    for name in dict.fromkeys(c[len("ood_"):].rsplit("_", 1)[0] for c in view.scored.meta["score_columns"] if c.startswith("ood_")):
        if any(f"ood_{name}_{lvl}" in have for lvl in view.levels):
            out[name] = get_score(name).label
    if "knn_score" in have and view.table["knn_score"].notna().any():
        out["knn"] = get_score("knn").label if _registered("knn") else "kNN distance"
    return out


def _registered(name: str) -> bool:
    try:
        get_score(name)
        return True
    except KeyError:
        return False


def column(score: str, level: str) -> str:
    return "knn_score" if score == "knn" else f"ood_{score}_{level}"


@st.cache_data(show_spinner=False, max_entries=256)
def _logits(model_key: str, dataset: str, relpath: str, _view: ScoredView) -> dict[str, np.ndarray] | None:
    """The calibrated logits of one image, per level (one forward pass; None when unreadable)."""
    from explain.embeddings import compute_outputs

    src, model = get_source(dataset), _view.lm.classifier
    try:
        fg, _, _ = load_for_model(src.read_bytes(relpath), int(model.preprocessing["size"]), mode=src.mode,
                                  background=src.background, colour=keeps_colour(model.preprocessing, src.mode))
    except (ImageDecodeError, OSError, KeyError):
        return None
    with COMPUTE_LOCK:
        _, logits = compute_outputs(model, fg[None])
    return {k: v[0] for k, v in logits.items()}


def _robust_range(values: list[np.ndarray]) -> tuple[float, float]:
    v = np.concatenate([x[np.isfinite(x)] for x in values if len(x)]) if values else np.zeros(0)
    if not len(v):
        return 0.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    return float(lo), float(hi)


def _hist(v: np.ndarray, lo: float, hi: float, nbins: int, **bar) -> go.Bar:
    """A probability-density histogram of ``v`` clipped to [lo, hi], binned here: a million
    scores would otherwise travel to the browser (12 MB of JSON per set) and be binned there."""
    v = np.clip(v[np.isfinite(v)], lo, hi)
    dens, edges = np.histogram(v, bins=nbins, range=(lo, hi), density=len(v) > 0)
    return go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=dens, width=float(edges[1] - edges[0]),
                  customdata=np.c_[edges[:-1], edges[1:]],
                  hovertemplate="%{customdata[0]:.4g} – %{customdata[1]:.4g}<br>density %{y:.3g}<extra>%{fullData.name}</extra>",
                  **bar)


@st.cache_data(show_spinner=False, max_entries=64)
def _binned(folder: str, stamp: int, key: tuple, lo: float, hi: float, nbins: int, _v: np.ndarray) -> go.Bar:
    """:func:`_hist` of one set's scores (``key``: what ``_v`` is: model, set, column), once per
    table, set, column and range: the slider does not change it."""
    return _hist(_v, lo, hi, nbins)


@st.cache_data(show_spinner=False, max_entries=64)
def _range(folder: str, stamp: int, key: tuple, _values: list[np.ndarray]) -> tuple[float, float]:
    """:func:`_robust_range` of ``_values`` (``key``: which sets and columns they are), once per table."""
    return _robust_range(_values)


@st.cache_data(show_spinner=False, max_entries=64)
def _top_cached(folder: str, stamp: int, key: tuple, col: str, n: int, _sets: dict[str, pd.DataFrame],
                names: list[str]) -> pd.DataFrame:
    """:func:`_top`, once per table, model, score column and sets (not per threshold)."""
    return _top(_sets, names, col, n)


def _top(sets: dict[str, pd.DataFrame], names: list[str], col: str, n: int) -> pd.DataFrame:
    """The ``n`` highest-scoring images of the sets ``names`` (ties: the set order, then the table
    order), with their set in ``_set``: the few candidates are found on the score column alone."""
    parts = []
    for name in names:
        v = sets[name][col].to_numpy(np.float64)
        v = np.where(np.isnan(v), -np.inf, v)
        k = min(n, len(v))
        if k == 0:
            continue
        cut = np.partition(v, len(v) - k)[len(v) - k]  # the k-th largest; every tie with it is kept
        parts.append(sets[name].iloc[np.flatnonzero(v >= cut)].assign(_set=name))
    if not parts:
        return sets[names[0]].iloc[:0].assign(_set=names[0])
    return pd.concat(parts).sort_values(col, ascending=False, kind="stable").head(n)


@st.cache_data(show_spinner=False, max_entries=64)
def _separation(folder: str, stamp: int, col: str, known: str, ref: str, _known_s: np.ndarray,
                _ref_s: np.ndarray) -> tuple[float, float]:
    """AUROC and FPR at the configured TPR of ``ref`` against ``known`` on score ``col`` (they do
    not depend on the slider: once per table, score and reference set)."""
    return auroc(_known_s, _ref_s), fpr_at_tpr(_known_s, _ref_s)


def _page_link(page: str, label: str, link: str | None) -> None:
    if not link or not (ROOT / page).exists():
        return
    try:
        st.page_link(page, label=label, query_params={"image": link})
    except Exception:  # noqa: BLE001 - page not registered in this navigation: plain link
        st.markdown(f"[{label}](/{Path(page).stem}?{urlencode({'image': link})})")


def _logit_bars(logits: np.ndarray, names: list[str], title: str, y_range: tuple[float, float], top: int = 30) -> go.Figure:
    order = np.argsort(-logits, kind="stable")[:top]
    p = np.exp(logits - np.nanmax(logits))
    p = p / np.nansum(p)
    short = [names[i] if len(names[i]) <= 22 else names[i][:21] + "…" for i in order]
    fig = go.Figure(go.Bar(x=list(range(len(order))), y=logits[order], marker_color="#0072B2",
                           customdata=[[names[i], float(p[i])] for i in order],
                           hovertemplate="%{customdata[0]}<br>logit %{y:.2f}<br>p %{customdata[1]:.3f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(order))), ticktext=short)
    fig.update_layout(title=title, height=340, margin=dict(t=40, l=10, r=10, b=10), yaxis_title="logit",
                      yaxis_range=list(y_range), xaxis_tickangle=-60, xaxis_tickfont_size=9)
    return fig


# --- page -------------------------------------------------------------------------------------
def main() -> None:
    view = scored_collection("Anomalies", "A classifier's usual activation has one class clearly above the rest; a "
                             "**flat** activation means it cannot give a valid answer. Scores: higher = more "
                             "anomalous. TPR = the model's known validation images kept (score ≤ threshold), "
                             "FPR = images of the reference set kept.")
    if view is None:
        return
    lm, levels, leaf = view.lm, view.levels, view.levels[-1]
    sets = image_sets(view)
    coll_sets = [n for n in sets if n != VAL]
    if not coll_sets:
        st.warning(f"No readable image in {md_text(view.collection)}.")
        return
    colours = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(sets)}
    scores = score_options(view)
    c1, c2, c3 = st.columns([1.2, 1, 1.4])
    if st.session_state.get("ood_score") not in scores:
        st.session_state.pop("ood_score", None)
    score = c1.selectbox("Score", list(scores), format_func=scores.get, key="ood_score",
                         help="Logit scores measure how flat one level's logits are; the kNN distance how far the "
                              "image's embedding lies from the model's training images.")
    is_logit = score != "knn"
    level = c2.selectbox("Level", list(levels), index=len(levels) - 1, key="ood_level", disabled=not is_logit,
                         help="Taxonomic level whose logits are scored (the kNN distance does not depend on it).")
    level = level if is_logit else leaf
    col = column(score, level)
    default_ref = next((n for n in coll_sets if "held-out" in n or "unknown" in n), coll_sets[0])
    ref = c3.selectbox("Reference set for FPR / AUROC", coll_sets, index=coll_sets.index(default_ref), key="ood_ref")
    shown = st.multiselect("Sets shown", list(sets), default=list(sets), key="ood_shown")
    if VAL not in sets:
        st.info(f"{md_text(lm.name)} has no validation images here (no training dataset), so thresholds and TPR are "
                f"read off {md_text(view.collection)} itself.")
    if is_logit and score in ("max_logit", "energy") and VAL in sets and \
            lm.classifier.num_classes(level) > 1 and _log_prob_level(view, level):
        st.warning(f"This model's {level!r} outputs are already log-probabilities (they are summed from the level below), "
                   "so max logit and energy carry no information there; use the leaf level or another score.")
    s = {n: df[col].to_numpy(np.float64) for n, df in sets.items() if col in df}
    known_name = VAL if VAL in s else coll_sets[0]
    known_s, ref_s = s[known_name], s[ref]
    thr95 = float(view.scored.thresholds.get(col, np.nanquantile(known_s, CONFIG["tpr"], method="higher")))
    folder = view.scored.folder
    stamp = (folder / "meta.json").stat().st_mtime_ns
    lo, hi = _range(str(folder), stamp, (lm.key, view.collection, col, tuple(n for n in shown if n in s), known_name, ref),
                    [s[n] for n in shown if n in s] + [known_s, ref_s])
    lo, hi = min(lo, thr95), max(hi, thr95)
    if hi <= lo:
        hi = lo + 1e-6
    top = _top_cached(str(folder), stamp, (lm.key, view.collection), col, GALLERY_N, sets, coll_sets)
    _threshold_panel(view, sets, s, shown, colours, score, scores[score], level, col, ref, known_name, thr95, lo, hi,
                     int(top.index[0]))
    if is_logit and len(levels) > 1:
        with st.expander("Every level", expanded=False):
            pf = make_subplots(rows=1, cols=len(levels), subplot_titles=list(levels))
            for j, lvl in enumerate(levels, 1):
                c_ = column(score, lvl)
                vals = {n: sets[n][c_].to_numpy(np.float64) for n in shown if c_ in sets[n]}
                a, b = _range(str(folder), stamp, (lm.key, view.collection, c_, tuple(vals)), list(vals.values()))
                for n, v in vals.items():
                    bar = _binned(str(folder), stamp, (lm.key, view.collection, n, c_), a, max(b, a + 1e-6), 40, v)
                    pf.add_trace(bar.update(opacity=0.55, marker_color=colours[n], name=n, showlegend=j == 1,
                                            legendgroup=n), 1, j)
            pf.update_layout(barmode="overlay", bargap=0, height=300, margin=dict(t=30, l=10, r=10, b=10),
                             legend=dict(orientation="h", y=-0.3))
            st.plotly_chart(pf, key="ood_levels")

    _known_group(view, sets, score, shown)
    _gallery(view, top, col)


@page_fragment("anomalies")
def _threshold_panel(view: ScoredView, sets: dict[str, pd.DataFrame], s: dict[str, np.ndarray], shown: list[str],
                     colours: dict[str, str], score: str, label: str, level: str, col: str, ref: str, known_name: str,
                     thr95: float, lo: float, hi: float, top_row: int) -> None:
    """The threshold slider and everything it moves (rates, histogram, activations). A fragment:
    moving the slider reruns this panel only, not the page (its tables, gallery and sidebar)."""
    lm, folder = view.lm, view.scored.folder
    stamp = (folder / "meta.json").stat().st_mtime_ns
    known_s, ref_s = s[known_name], s[ref]
    thr = st.slider("Threshold (flag as anomalous above)", min_value=lo, max_value=hi, value=thr95, step=(hi - lo) / 400,
                    format="%.4f", key=f"ood_thr::{lm.name}::{view.collection}::{col}",
                    help=f"Starts at the threshold that keeps {view.scored.meta['keep']:.0%} of the model's validation images.")
    r = rates_at(known_s, ref_s, thr)
    m = st.columns(4)
    m[0].metric("TPR (known images kept)", f"{r['tpr']:.1%}")
    m[1].metric(f"FPR ({ref} kept)", f"{r['fpr']:.1%}")
    a_u, f_t = _separation(str(folder), stamp, col, known_name, ref, known_s, ref_s)
    m[2].metric(f"AUROC ({ref})", f"{a_u:.3f}")
    m[3].metric(f"FPR at {CONFIG['tpr']:.0%} TPR", f"{f_t:.1%}")

    # the collection's most anomalous images; the selection (gallery buttons set it)
    sel = st.session_state.get(SEL_KEY)
    if not (sel and sel[0] == lm.key and sel[1] == view.collection and sel[2] in view.table.index):
        sel = (lm.key, view.collection, top_row)
    sel_row = view.table.loc[sel[2]]
    sel_score = float(sel_row[col])

    fig = go.Figure()
    for n in shown:
        if n not in s:
            continue
        bar = _binned(str(folder), stamp, (lm.key, view.collection, n, col), lo, hi, 60, s[n])
        fig.add_trace(bar.update(name=f"{n} ({int(np.isfinite(s[n]).sum()):,})", opacity=0.55, marker_color=colours[n]))
    fig.add_vline(x=thr, line_dash="dash", line_color="#333", annotation_text="threshold", annotation_position="top left")
    fig.add_vline(x=float(np.clip(sel_score, lo, hi)), line_color="#D55E00", line_width=3, annotation_text="selected image",
                  annotation_position="top right")
    fig.update_layout(barmode="overlay", bargap=0, height=380, margin=dict(t=30, l=10, r=10, b=10),
                      xaxis_title=label + (f" · {level}" if score != "knn" else ""), yaxis_title="density",
                      legend=dict(orientation="h", y=-0.25))
    st.plotly_chart(fig, key="ood_hist")
    st.caption(f"Values outside the 0.5–99.5 % range ({lo:.3g} … {hi:.3g}) are drawn at its edges. Flagged above the "
               f"threshold ({thr:.4g}): " + ", ".join(f"{md_text(n)} {np.mean(s[n] > thr):.0%}" for n in shown if n in s))

    _activations(view, sets, score, label, level, col, thr, sel_row)


def _log_prob_level(view: ScoredView, level: str) -> bool:
    val = view.scored.validation
    row = val.iloc[0] if val is not None and len(val) else None
    if row is None:
        return False
    z = _logits(view.lm.key, view.lm.dataset, str(row["relpath"]), view)
    return z is not None and is_log_probability(z[level][None])


def _typical(view: ScoredView, sets: dict[str, pd.DataFrame], col: str) -> pd.Series | None:
    """A usual activation: the correctly classified validation image with the median score."""
    val = sets.get(VAL)
    if val is None or not len(val):
        return None
    leaf = view.levels[-1]
    ok = val[val[f"pred_{leaf}"] == val["class"]] if "class" in val else val
    ok = ok if len(ok) else val
    ok = ok.sort_values(col, kind="stable")
    return ok.iloc[len(ok) // 2]


def _activations(view: ScoredView, sets, score: str, label: str, level: str, col: str, thr: float,
                 sel_row: pd.Series) -> None:
    """The selected image's logits beside a typical known image's."""
    st.subheader("Usual and flat activations")
    typ = _typical(view, sets, col)
    items = []
    if typ is not None:
        items.append(("Typical known image", view.lm.dataset, typ))
    items.append(("Selected image", view.collection, sel_row))
    zs = [_logits(view.lm.key, ds, str(r["relpath"]), view) for _, ds, r in items]
    fin = np.concatenate([z[level][np.isfinite(z[level])] for z in zs if z is not None] or [np.zeros(1)])
    y_range = (float(min(0.0, fin.min())) - 0.5, float(fin.max()) + 0.5)
    names = view.lm.classifier.class_names[level]
    cols = st.columns(2)
    for c, (title, ds, r), z in zip(cols, items, zs):
        with c:
            a, b = st.columns([1, 2.2])
            img = thumbnail(ds, str(r["relpath"]), 160)
            if img is not None:
                a.image(img, width=160)
            truth = r.get("class")
            truth = "no validated label" if truth in (None, "unlabelled") else f"label {md_text(truth, code=True)}"
            v = float(r[col])
            b.markdown(f"**{title}**  \n{md_text(ds)} · {truth}  \npredicted {md_text(r[f'pred_{view.levels[-1]}'], code=True)}  \n"
                       f"{label}: **{v:.4g}** ({'flagged' if v > thr else 'kept'})")
            if title.startswith("Typical"):
                b.caption("The correctly classified validation image with the median score: a usual activation.")
            if z is not None:
                st.plotly_chart(_logit_bars(np.where(np.isfinite(z[level]), z[level], np.nan), names,
                                            f"{level} logits (top 30 of {len(names)})", y_range), key=f"ood_bars_{title[:4]}")


def _known_group(view: ScoredView, sets, score: str, shown: list[str]) -> None:
    """Peaked group head and flat leaf head: a known group, an unknown class."""
    levels = view.levels
    grp = "group" if "group" in levels else (levels[-2] if len(levels) > 1 else None)
    if grp is None or score == "knn":
        return
    cg, cl = column(score, grp), column(score, levels[-1])
    tg, tl = view.scored.thresholds.get(cg), view.scored.thresholds.get(cl)
    if tg is None or tl is None:
        return
    st.subheader("Known group, unknown class")
    st.caption(f"Peaked {grp} head and flat {levels[-1]} head: {grp} score below and {levels[-1]} score above the "
               f"thresholds that keep {view.scored.meta['keep']:.0%} of the model's validation images at each level.")
    kc = st.columns(len(shown) or 1)
    for c, n in zip(kc, shown):
        df = sets[n]
        hit = (df[cg] <= tg) & (df[cl] > tl)
        c.metric(md_text(n), f"{hit.mean():.1%}")
        c.caption(f"{int(hit.sum()):,} of {len(df):,} images")


def _gallery(view: ScoredView, top: pd.DataFrame, col: str) -> None:
    st.subheader("Most anomalous images")
    st.caption(f"The {len(top)} highest-scoring images of {md_text(view.collection)}; each links to the explain page and the "
               "neighbourhood view.")
    leaf = view.levels[-1]
    for k, (i, rw) in enumerate(top.iterrows()):
        if k % 6 == 0:
            gcols = st.columns(6)
        with gcols[k % 6]:
            img = thumbnail(rw["dataset"], rw["relpath"], 112)
            if img is not None:
                st.image(img, width=112)
            truth = "" if rw["class"] == "unlabelled" else f"{md_text(rw['class'], code=True)} · "
            st.caption(f"{truth}predicted {md_text(rw[f'pred_{leaf}'], code=True)} · {rw[col]:.3g}")
            if st.button("Select", key=f"ood_pick_{k}", width="stretch"):
                st.session_state[SEL_KEY] = (view.lm.key, view.collection, int(i))
                st.rerun()
            link = f"{rw['dataset']}:{rw['relpath']}"
            _page_link("pages/classify.py", "Explain", link)
            _page_link("pages/neighbourhoods.py", "Neighbours", link)


run_page(main, "anomalies")
