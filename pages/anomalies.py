"""Anomalies: images the model cannot give a valid answer for, found by the flatness of its logits.

A usual activation has one class clearly above the rest; a flat one means "none of the classes
I know". Histograms per taxonomic level of the chosen score for in-distribution test images,
held-out classes, the other instrument (ZooLake for NDSB models) and known outliers; a
threshold with live TPR / FPR / AUROC; the most anomalous images with links to the explain
page and the neighbourhood view. All computation is in ``explain/ood.py`` and
``explain/ood_evaluation.py``; this page caches and lays it out.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from data.decode import ImageDecodeError
from data.sources import DatasetNotFound
from explain.ood import CONFIG, auroc, fpr_at_tpr, is_log_probability, list_scores, rates_at, threshold_at_tpr
from explain.ood_evaluation import (Evaluation, display_image, evaluation, group_level, is_evaluated, known_group_unknown,
                                   most_anomalous, typical_index)
from models.checkpoint import CheckpointError
from pages.common import current_model, dataset_missing_message, md_text, model_dataset_problem, run_with_progress, size_choice

log = logging.getLogger("plankton_lens.anomalies")
ROOT = Path(__file__).resolve().parent.parent
SEL_KEY = "anomalies_selected"  # (model name, set name, index)
#: Images per class and split of the quick sample (the same subset, and cache, as the neighbourhood map's).
QUICK = int(os.environ.get("PLANKTON_LENS_QUICK_MAP", "10"))
GALLERY_N = 12
KIND_COLOURS = {"id": "#0072B2", "heldout": "#E69F00", "other": "#009E73"}  # Okabe-Ito
OUTLIER_COLOURS = ["#CC79A7", "#D55E00", "#56B4E9", "#F0E442"]


@st.cache_resource(show_spinner=False, max_entries=4)
def get_evaluation(name: str, sha: str, limit: int | None) -> Evaluation:
    """The model's OOD evaluation (disk-cached; ``sha`` keys a retrained model)."""
    return evaluation(name, limit)


@st.cache_data(show_spinner=False, max_entries=1024)
def _image(name: str, sha: str, limit: int | None, set_name: str, i: int, size: int) -> np.ndarray | None:
    try:
        return np.asarray(display_image(get_evaluation(name, sha, limit), set_name, i, size))
    except (ImageDecodeError, OSError, KeyError):
        return None


def _size_choice(name: str) -> int | None:
    """Full evaluation or quick sample; the full one is the default once it is cached."""
    return size_choice("ood", is_evaluated(name), "Evaluation set", "Full test split",
                       "The full evaluation scores every image of the dataset (minutes on a CPU the first time, then "
                       "cached); the quick sample a few per class.",
                       "The full evaluation has not been computed for this model yet: it scores every image of the "
                       f"dataset, {CONFIG['other_sample']:,} images of the other instrument and "
                       f"{3 * CONFIG['outliers_per_kind']} known outliers once (several minutes on a CPU).",
                       "Compute the full evaluation now", QUICK)


def _ensure(name: str, limit: int | None) -> None:
    """Compute the evaluation once with a progress bar (outside the resource cache)."""
    if is_evaluated(name, limit):
        return
    run_with_progress("Scoring images once for this model…",
                      lambda on_progress: evaluation(name, limit, on_progress=on_progress), prefix="Scoring: ")


def _colours(ev: Evaluation) -> dict[str, str]:
    out, k = {}, 0
    for n, s in ev.sets.items():
        if s.kind in KIND_COLOURS:
            out[n] = KIND_COLOURS[s.kind]
        else:
            out[n] = OUTLIER_COLOURS[k % len(OUTLIER_COLOURS)]
            k += 1
    return out


def _robust_range(values: list[np.ndarray]) -> tuple[float, float]:
    v = np.concatenate([x[np.isfinite(x)] for x in values if len(x)]) if values else np.zeros(0)
    if not len(v):
        return 0.0, 1.0
    lo, hi = np.percentile(v, [0.5, 99.5])
    return float(lo), float(hi)


def _page_link(page: str, label: str, link: str | None) -> None:
    if not link or not (ROOT / page).exists():
        return
    try:
        st.page_link(page, label=label, query_params={"image": link})
    except Exception:  # noqa: BLE001 - page not registered in this navigation: plain link
        from urllib.parse import urlencode

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
st.title("Anomalies")
st.caption("A classifier's usual activation has one class clearly above the rest; a **flat** activation means it "
           "cannot give a valid answer. Scores: higher = more anomalous. TPR = in-distribution images kept (score ≤ "
           "threshold), FPR = OOD images kept.")

picked = current_model()
if picked is None:
    st.stop()
model, man = picked.classifier, picked.manifest
name, sha = picked.name, picked.sha256
if (problem := model_dataset_problem(picked, "score")):
    st.warning(problem)
    st.stop()
limit = _size_choice(name)
try:
    _ensure(name, limit)
    ev = get_evaluation(name, sha, limit)
except DatasetNotFound:
    dataset_missing_message()
    st.stop()
except (CheckpointError, OSError, ValueError) as e:
    log.exception("OOD evaluation failed")
    st.error(md_text(f"The OOD evaluation of {name!r} could not be computed: {e}"))
    st.stop()

id_name = ev.set_of("id")[0]
ood_names = [n for n in ev.sets if n != id_name and len(ev.sets[n])]
colours = _colours(ev)
leaf = ev.levels[-1]

c1, c2, c3 = st.columns([1.2, 1, 1.4])
scores = {e.name: e for e in list_scores()}
if st.session_state.get("ood_score") not in scores:
    st.session_state.pop("ood_score", None)
score = c1.selectbox("Score", list(scores), format_func=lambda s: scores[s].label, key="ood_score",
                     help="Logit scores measure how flat one level's logits are; feature scores ("
                          + ", ".join(e.label for e in scores.values() if e.reads == "features")
                          + ") measure how far the image's embedding lies from the training images.")
score_label = scores[score].label
is_logit = scores[score].reads == "logits"
level = c2.selectbox("Level", list(ev.levels), index=len(ev.levels) - 1, key="ood_level", disabled=not is_logit,
                     help="Taxonomic level whose logits are scored (feature scores do not depend on it).")
level = level if is_logit else leaf
default_ref = "held-out classes" if len(ev.sets["held-out classes"]) else (ood_names[0] if ood_names else None)
if default_ref is None:
    st.warning("There is no OOD image set for this model (the other instrument's dataset is missing).")
    st.stop()
ref = c3.selectbox("OOD set for TPR / FPR / AUROC", ood_names, index=ood_names.index(default_ref), key="ood_ref")
shown = st.multiselect("Sets shown", [n for n in ev.sets if len(ev.sets[n])], default=[n for n in ev.sets if len(ev.sets[n])],
                       key="ood_shown")
if not len(ev.sets["held-out classes"]):
    st.info(f"{md_text(name)} was trained on every class, so its held-out histogram is empty. Pick a held-out model "
            "(trained with `--holdout default`, e.g. ndsb-bacnn-heldout) in the sidebar to see unseen classes.")
if is_logit and score in ("max_logit", "energy") and is_log_probability(ev.sets[id_name].logits[level]):
    st.warning(f"This model's {md_text(repr(level))} outputs are already log-probabilities (they are summed from the level "
               "below), so max logit and energy carry no information there; use the leaf level or another score.")

try:
    s = ev.scores(score, level)
except (ValueError, np.linalg.LinAlgError) as e:
    st.error(f"The {score_label} score cannot be computed for this model: {md_text(e)}")
    st.stop()
id_s, ref_s = s[id_name], s[ref]
thr95 = threshold_at_tpr(id_s)
lo, hi = _robust_range([s[n] for n in shown] + [id_s, ref_s])
lo, hi = min(lo, thr95), max(hi, thr95)
if hi <= lo:
    hi = lo + 1e-6
thr = st.slider("Threshold (flag as anomalous above)", min_value=lo, max_value=hi, value=float(thr95), step=(hi - lo) / 400,
                format="%.4f", key=f"ood_thr::{name}::{score}::{level}",
                help=f"Starts at the threshold that keeps {CONFIG['tpr']:.0%} of in-distribution test images.")
r = rates_at(id_s, ref_s, thr)
m = st.columns(4)
m[0].metric("TPR (in-distribution kept)", f"{r['tpr']:.1%}")
m[1].metric(f"FPR ({ref} kept)", f"{r['fpr']:.1%}")
m[2].metric(f"AUROC ({ref})", f"{auroc(id_s, ref_s):.3f}")
m[3].metric(f"FPR at {CONFIG['tpr']:.0%} TPR", f"{fpr_at_tpr(id_s, ref_s):.1%}")

# selection (gallery buttons set it; default: the most anomalous shown image)
top = most_anomalous(ev, score, level, shown or [ref], GALLERY_N)
sel = st.session_state.get(SEL_KEY)
if not (sel and sel[0] == name and sel[1] in ev.sets and 0 <= sel[2] < len(ev.sets[sel[1]])):
    sel = (name, str(top.iloc[0]["set"]), int(top.iloc[0]["index"])) if len(top) else (name, id_name, 0)
sel_set, sel_i = sel[1], sel[2]
sel_score = float(s[sel_set][sel_i])

# histogram of the chosen level
fig = go.Figure()
for n in shown:
    v = np.clip(s[n], lo, hi)
    fig.add_trace(go.Histogram(x=v, name=f"{n} ({len(v):,})", histnorm="probability density", opacity=0.55, nbinsx=60,
                               marker_color=colours[n]))
fig.add_vline(x=thr, line_dash="dash", line_color="#333", annotation_text="threshold", annotation_position="top left")
fig.add_vline(x=float(np.clip(sel_score, lo, hi)), line_color="#D55E00", line_width=3, annotation_text="selected image",
              annotation_position="top right")
fig.update_layout(barmode="overlay", height=380, margin=dict(t=30, l=10, r=10, b=10),
                  xaxis_title=f"{score_label}" + (f" · {level}" if is_logit else ""), yaxis_title="density",
                  legend=dict(orientation="h", y=-0.25))
st.plotly_chart(fig, key="ood_hist")
st.caption(f"Values outside the 0.5–99.5 % range ({lo:.3g} … {hi:.3g}) are drawn at its edges. "
           f"Flagged above the threshold: " + ", ".join(f"{n} {np.mean(s[n] > thr):.0%}" for n in shown))

if is_logit and len(ev.levels) > 1:
    with st.expander("Every level", expanded=False):
        pf = make_subplots(rows=1, cols=len(ev.levels), subplot_titles=list(ev.levels))
        for j, lvl in enumerate(ev.levels, 1):
            sl = ev.scores(score, lvl)
            a, b = _robust_range([sl[n] for n in shown])
            for n in shown:
                pf.add_trace(go.Histogram(x=np.clip(sl[n], a, max(b, a + 1e-6)), histnorm="probability density", opacity=0.55,
                                          nbinsx=40, marker_color=colours[n], name=n, showlegend=j == 1, legendgroup=n), 1, j)
        pf.update_layout(barmode="overlay", height=300, margin=dict(t=30, l=10, r=10, b=10), legend=dict(orientation="h", y=-0.3))
        st.plotly_chart(pf, key="ood_levels")

# the selected image's logits beside a typical in-distribution image's
st.subheader("Usual and flat activations")
bar_level = level
t_i = typical_index(ev, score, level)
z_typ = ev.sets[id_name].logits[bar_level][t_i]
z_sel = ev.sets[sel_set].logits[bar_level][sel_i]
fin = np.concatenate([z_typ[np.isfinite(z_typ)], z_sel[np.isfinite(z_sel)]])
y_range = (float(min(0.0, fin.min())) - 0.5, float(fin.max()) + 0.5) if len(fin) else (0.0, 1.0)
names = ev.class_names[bar_level]
cols = st.columns(2)
for col, (title, set_name, i, z) in zip(cols, [("Typical in-distribution image", id_name, t_i, z_typ),
                                               ("Selected image", sel_set, sel_i, z_sel)]):
    with col:
        a, b = st.columns([1, 2.2])
        img = _image(name, sha, limit, set_name, i, 160)
        if img is not None:
            a.image(img, width=160)
        row = ev.sets[set_name].rows.iloc[i]
        b.markdown(f"**{title}**  \n{set_name} · class {md_text(row['class'], code=True)}  \n"
                   f"{score_label}: **{float(s[set_name][i]):.4g}**"
                   + (f" ({'flagged' if s[set_name][i] > thr else 'kept'})"))
        if title.startswith("Typical"):
            b.caption("The correctly classified test image with the median score: a usual activation.")
        if title == "Selected image" and row.get("source"):
            b.caption(f"made from {md_text(row['source'])}")
        st.plotly_chart(_logit_bars(np.where(np.isfinite(z), z, np.nan), names, f"{bar_level} logits (top 30 of {len(names)})",
                                    y_range), key=f"ood_bars_{title[:4]}")

# known group, unknown class
grp = group_level(ev)
if grp and is_logit:
    kgu = known_group_unknown(ev, score)
    st.subheader("Known group, unknown class")
    st.caption(f"Peaked {grp} head and flat {leaf} head: {grp} score below and {leaf} score above the thresholds that keep "
               f"{CONFIG['tpr']:.0%} of in-distribution images at each level.")
    kc = st.columns(len(shown) or 1)
    for col, n in zip(kc, shown):
        col.metric(n, f"{kgu[n].mean():.1%}")
        col.caption(f"{int(kgu[n].sum()):,} of {len(kgu[n]):,} images")
    if sel_set in kgu and kgu[sel_set][sel_i]:
        g_name = ev.class_names[grp][int(np.nanargmax(ev.sets[sel_set].logits[grp][sel_i]))]
        st.success(f"The selected image is a case of **known group, unknown class**: {grp} {md_text(g_name, code=True)}, "
                   "class unknown.")

# gallery of the most anomalous images
st.subheader("Most anomalous images")
st.caption("Among the sets shown, by the chosen score. Dataset images link to the explain page and the neighbourhood view.")
for k, rw in top.iterrows():
    if k % 6 == 0:
        gcols = st.columns(6)
    with gcols[k % 6]:
        img = _image(name, sha, limit, rw["set"], int(rw["index"]), 112)
        if img is not None:
            st.image(img, width=112)
        st.caption(f"{rw['set']}  \n{md_text(rw['class'], code=True)} · {rw['score']:.3g}")
        if st.button("Select", key=f"ood_pick_{k}", width="stretch"):
            st.session_state[SEL_KEY] = (name, str(rw["set"]), int(rw["index"]))
            st.rerun()
        _page_link("pages/classify.py", "Explain", rw["link"])
        _page_link("pages/neighbourhoods.py", "Neighbours", rw["link"])
