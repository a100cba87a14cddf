"""CLIP explanations: the text prompts that match a plankton image, its zero-shot names, its
anomaly score, "why A rather than B" in words, and any prompt you type with its saliency map.

Images come from the dataset (test split), from an upload, or from a deep link
``?image=<dataset>:<relative path>``. All computation is in ``explain/clip.py``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from data.manifest import decoded_array
from explain import clip as xc
from explain.export import overlay
from explain.saliency import available_methods, is_signed, list_methods
from models.checkpoint import CheckpointError
from models.handle import open_model
from models.zoo import list_models
from pages import image_picker as picker
from pages import state
from pages.common import (DISPLAY_PX, current_collection, gallery_sample, get_manifest, get_sources, md_text,
                          run_page)
from pages.image_picker import PickedImage

CLIP_KEY = state.CLIP_MODEL
KEYS = state.CLIP_PICKER
BLUE, ORANGE, GREY = "#0072B2", "#E69F00", "#999999"  # Okabe-Ito: colour-blind safe
KIND_LABELS = {"taxonomy": "taxonomy path", "morphology": "morphology", "non-living": "non-living"}


# --- cached resources --------------------------------------------------------------------------
@st.cache_data(ttl=60, show_spinner=False)
def clip_models() -> list[dict]:
    return [m for m in list_models() if m.get("kind") == "clip" and "error" not in m]


@st.cache_resource(show_spinner="Embedding known images for the anomaly score (once per model)…")
def get_scorer(model_key: str, name: str, dataset: str) -> xc.AnomalyScorer | None:
    """Anomaly scorer with a gallery of 12 training and 6 validation images per known class
    (``model_key``, the model's ``name:sha256``, keys the cache)."""
    pc = open_model(name).require_clip()
    if dataset not in get_sources():
        return None
    man = get_manifest(dataset)
    known = [c for c in pc.taxonomy.classes if c not in pc.heldout]
    src = get_sources()[dataset]
    rows = {s: xc.gallery_rows(man, per_class=n, split=s, classes=known) for s, n in (("train", 12), ("val", 6))}
    if any(r.empty for r in rows.values()):
        return None
    arrays = {s: np.asarray(decoded_array(src, r, pc.size, progress=False)) for s, r in rows.items()}
    feats = {s: pc.image_features(a) for s, a in arrays.items()}
    leaf = rows["val"]["class"].map({c: i for i, c in enumerate(pc.taxonomy.classes)}).to_numpy()
    chimeras = xc.make_chimeras(arrays["val"], leaf, len(arrays["val"]), seed=1)  # known outliers for the weights
    return xc.AnomalyScorer.fit(pc, feats["train"], known, feats["val"], outlier_features=pc.image_features(chimeras))


@st.cache_data(show_spinner=False, max_entries=256)
def _ranked(model_key: str, image_key: str, _pc, _fg) -> pd.DataFrame:
    return xc.rank_prompts(_pc, _fg)


@st.cache_data(show_spinner=False, max_entries=256)
def _classes(model_key: str, image_key: str, _pc, _fg) -> pd.DataFrame:
    return xc.class_scores(_pc, _fg)


@st.cache_data(show_spinner="Computing the saliency map…", max_entries=256)
def _saliency(model_key: str, image_key: str, prompt: str, method: str, _pc, _fg) -> np.ndarray:
    return xc.prompt_saliency(_pc, _fg, prompt, method)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# --- image choice (pages.image_picker) -------------------------------------------------------------
def _gallery(pc) -> PickedImage | None:
    """The test images of one class of the sidebar's collection, as thumbnails; returns the selected image."""
    dataset = current_collection()
    if dataset not in get_sources():
        st.warning("No dataset or collection is available here; upload an image instead.")
        return None
    rows = get_manifest(dataset)
    test = rows[rows["split"] == "test"]
    if test.empty:
        st.info(md_text(f"{dataset} has no test images to show; upload an image instead."))
        return picker.selection(KEYS, pc.size, display_px=DISPLAY_PX)
    held = set(pc.heldout)
    classes = sorted(test["class"].unique())
    cls = st.selectbox("Class (test images, never used in training)", classes, key="clip_class",
                       format_func=lambda c: f"{c}  — held out of CLIP training" if c in held else c)
    sub = test[test["class"] == cls].sort_values("relpath")
    picker.thumbnails(KEYS, dataset, gallery_sample(sub, picker.gallery_seed(KEYS)))
    return picker.selection(KEYS, pc.size, display_px=DISPLAY_PX)


def _uploads(pc) -> PickedImage | None:
    good = picker.uploads(KEYS, pc.size, prompt="Upload a plankton image to explain it.", display_px=DISPLAY_PX)
    img = picker.choose_upload(KEYS, good)
    for note in img.notes if img else ():
        st.caption(md_text(f"Note: {note}."))
    return img


# --- sections -----------------------------------------------------------------------------------
def _contrast_chart(df: pd.DataFrame, a: str, b: str) -> go.Figure:
    colours = [BLUE if f == a else ORANGE if f == b else GREY for f in df["favours"]]
    fig = go.Figure(go.Bar(x=df["contribution"], y=df["prompt"], orientation="h", marker_color=colours,
                           hovertemplate="%{y}<br>contribution %{x:.4f}<extra></extra>"))
    fig.update_layout(height=max(260, 26 * len(df)), margin=dict(l=10, r=10, t=10, b=30),
                      yaxis=dict(autorange="reversed"), xaxis_title=f"← favours {b}   |   favours {a} →")
    return fig


def _ranked_section(pc, img: PickedImage, mkey: str) -> None:
    ranked = _ranked(mkey, img.key, pc, img.fg)
    c1, c2 = st.columns([3, 1])
    kinds = c1.multiselect("Prompt kinds", list(KIND_LABELS), default=list(KIND_LABELS), key="clip_kinds",
                           format_func=KIND_LABELS.get)
    top = c2.slider("Show", 5, 60, 15, key="clip_top")
    shown = ranked[ranked["kind"].isin(kinds)].head(top) if kinds else ranked.head(0)
    if shown.empty:
        st.info("Choose at least one kind of prompt.")
        return
    st.dataframe(shown[["rank", "prompt", "kind", "taxon", "similarity"]], hide_index=True, width="stretch",
                 column_config={"similarity": st.column_config.ProgressColumn(
                     "similarity", format="%.3f", min_value=float(min(0.0, ranked["similarity"].min())),
                     max_value=float(max(ranked["similarity"].max(), 1e-6))),
                     "rank": st.column_config.NumberColumn("rank", help=f"among all {len(ranked)} prompts")})
    st.caption(f"Cosine similarity between the image and each of the {len(ranked)} prompts (taxonomy paths of every "
               "taxon, curated morphological descriptors of living taxa, descriptors of non-living particles).")


def _contrast_section(pc, img: PickedImage, scores: pd.DataFrame) -> None:
    classes = scores["class"].tolist()
    c1, c2 = st.columns(2)
    a = c1.selectbox("Why A…", classes, index=0, key=f"clip_a_{img.key}")
    b = c2.selectbox("…rather than B", classes, index=1 if len(classes) > 1 else 0, key=f"clip_b_{img.key}")
    if a == b:
        st.info("Choose two different classes.")
        return
    df, gap = xc.contrast_prompts(pc, img.fg, a, b)
    st.metric("score(A) − score(B)", f"{gap:+.4f}",
              help="Difference of the cosine similarities of the image to the two classes' prompt ensembles; "
                   "the bars below add up to it exactly.")
    n = st.slider("Prompts shown on each side", 3, 15, 6, key="clip_contrast_n")
    show = pd.concat([df.head(n), df.tail(n)]).drop_duplicates("prompt")
    st.plotly_chart(_contrast_chart(show, a, b), width="stretch", key="clip_contrast", config={"displayModeBar": False})
    st.caption(f"Blue: prompts of {md_text(a)} (they raise A's score by how well the image matches them); orange: prompts of "
               f"{md_text(b)}; grey: prompts both share (their effect nearly cancels).")


def _prompt_section(pc, img: PickedImage, mkey: str) -> None:
    text = st.text_input("Type any prompt", "transparent body with long thin spines", key="clip_prompt", max_chars=xc.MAX_PROMPT_CHARS)
    try:
        res = xc.prompt_score(pc, img.fg, text)
    except xc.PromptError as e:
        st.info(md_text(e))
        return
    c = st.columns(3)
    c[0].metric("similarity", f"{res['similarity']:.3f}")
    c[1].metric("rank among the prompt bank", f"{res['rank']} of {res['of']}")
    c[2].metric("percentile", f"{res['percentile']:.0f}")
    if res["truncated"]:
        st.warning(f"The prompt has {res['tokens']} tokens; the model reads only the first {res['context_length']}.")
    methods = {m.name: m for m in available_methods(pc)}
    if st.session_state.get("clip_sal_method") not in methods:
        st.session_state.pop("clip_sal_method", None)
    dropped = [m.label for m in list_methods() if m.name not in methods]
    method = st.radio("Saliency method", list(methods), format_func=lambda n: methods[n].label, horizontal=True,
                      key="clip_sal_method", help="The Classify page's saliency methods, applied to the image tower's "
                      "similarity to the prompt." + (f" Not offered (this image tower has no convolutional layer): "
                                                     f"{', '.join(dropped)}." if dropped else ""))
    try:
        sal = _saliency(mkey, img.key, res["prompt"], method, pc, img.fg)
    except (KeyError, NotImplementedError) as e:
        st.info(md_text(str(e).strip("'\"")))
        return
    signed = is_signed(method)
    label = methods[method].label
    c1, c2 = st.columns(2)
    c1.image(img.display, caption="image", width="stretch")
    c2.image(overlay(img.display, sal, alpha=0.7, signed=signed), caption=f"{label} for “{md_text(res['prompt'])}”",
             width="stretch")
    st.caption(f"Red: pixels that raise the image's similarity to the prompt; blue: pixels that lower it ({label})." if signed
               else f"Bright: regions that matter most for the image's similarity to the prompt ({label}).")


def _model_section(man: dict) -> None:
    st.markdown(f"**{md_text(man['name'])}** — open_clip model {md_text(man.get('open_clip_model'), code=True)}, "
                f"{(man.get('parameters') or 0) / 1e6:.1f} M parameters"
                + (f", trained in {man['train_time_s'] / 60:.1f} min" if man.get("train_time_s") else "") + ".")
    if man.get("command"):
        st.code(man["command"], language="bash")
    met = man.get("metrics", {})
    z = met.get("zero_shot")
    if z:
        st.markdown(f"**Zero-shot identification** of the test images of the {z['n_heldout_names']} held-out classes "
                    "(never seen in training), by their prompts:")
        st.dataframe(xc.zero_shot_table(z), hide_index=True, column_config={
            c: st.column_config.NumberColumn(c, format="%.1f %%") for c in xc.zero_shot_table(z).columns[1:]})
        st.caption(f"Parent-level ({z.get('parent_level', 'subgroup')}) accuracy of the top-1 among all names: "
                   f"{_pct(z['parent_accuracy'])}; group level: {_pct(z.get('group_accuracy', float('nan')))}. "
                   f"Chance top-1 among the held-out names: {_pct(z['chance_top1_heldout'])}.")
    test = met.get("test")
    if test:
        st.markdown("**As a classifier** over all names (test split), accuracy per level: " + ", ".join(
            f"{md_text(lvl)} {_pct(v['accuracy'])}" for lvl, v in test["levels"].items()))
    bench = xc.stored_benchmark(man.get("sha256"))
    if bench:
        st.markdown("**Anomaly detection** (AUROC against the known classes' test images):")
        st.dataframe(pd.DataFrame([{"anomaly set": xc.SET_LABELS.get(s, s), "images": v["n"], "AUROC": 100 * v["auroc"],
                                    "MCM": 100 * v["auroc_mcm"], "kNN": 100 * v["auroc_knn"]} for s, v in bench["anomaly"].items()]),
                     hide_index=True, column_config={c: st.column_config.NumberColumn(c, format="%.1f %%") for c in ("AUROC", "MCM", "kNN")})
    else:
        st.caption("Anomaly AUROCs: run `python bench/clip_benchmark.py` (results in docs/results.md).")


# --- page ------------------------------------------------------------------------------------------
def main() -> None:
    st.title("CLIP explanations")
    st.caption("A CLIP-style model trained on plankton images and captions built from the taxonomy and from curated "
               "morphological descriptors: it scores how well any text describes an image.")
    models = clip_models()
    if not models:
        st.info("No CLIP model in the zoo yet. Train one (about 40 min on 2 CPU cores): "
                "`python -m models.clip_train --minutes 40`.")
        return
    names = [m["name"] for m in models]
    current = st.session_state.get(CLIP_KEY)
    if current not in names and st.session_state.get(state.MODEL) in names:
        current = st.session_state[state.MODEL]  # a CLIP model picked as the app's model
    default = current if current in names else (xc.DEFAULT_CLIP if xc.DEFAULT_CLIP in names else names[0])
    name = st.sidebar.selectbox("CLIP model", names, index=names.index(default), key=CLIP_KEY,
                                help="CLIP models of the zoo (kind “clip”).")
    try:
        lm = open_model(name)
        pc, man = lm.require_clip(), lm.manifest
    except CheckpointError as e:
        st.error(md_text(f"The CLIP model {name!r} could not be loaded: {e}"))
        return
    mkey = lm.key

    img = picker.pick(KEYS, lambda: _gallery(pc), lambda: _uploads(pc))
    if img is None:
        return

    scores = _classes(mkey, img.key, pc, img.fg)
    left, right = st.columns([1, 2])
    with left:
        st.image(img.display, caption=md_text(img.label), width="stretch")
        if img.truth:
            st.caption(f"True class: **{md_text(img.truth)}**" + (" — held out of CLIP training: zero-shot." if img.truth in pc.heldout else "."))
    with right:
        st.markdown("**Zero-shot names** (all classes, including those held out of training)")
        top = scores.head(5).copy()
        top["class"] = [c + ("  ★ held out" if h else "") for c, h in zip(top["class"], top["heldout"])]
        st.dataframe(top[["class", "subgroup", "similarity", "probability"]], hide_index=True, width="stretch",
                     column_config={"probability": st.column_config.ProgressColumn("probability", format="%.2f", min_value=0.0, max_value=1.0),
                                    "similarity": st.column_config.NumberColumn("similarity", format="%.3f")})
        scorer = get_scorer(mkey, name, man.get("dataset", "ndsb"))
        if scorer is not None:
            s = scorer.score(img.fg[None])
            pct = scorer.percentile(float(s["combined"][0]))
            verdict = "unusual for this model" if pct >= 95 else "typical of known plankton"
            w = scorer.weights or {"mcm": 0.5, "knn": 0.5}
            st.metric("Anomaly score", f"{s['combined'][0]:+.2f}", help="Weighted sum of the z-scored MCM (max concept matching "
                      "over the known classes' prompts) and kNN (distance to the 10th nearest known image) scores; the weights "
                      f"(MCM {w['mcm']:.2f}, kNN {w['knn']:.2f}) follow how well each part separates chimeras of validation "
                      "images from the images themselves.")
            st.caption(f"Higher than {pct:.0f} % of known validation images: {verdict} "
                       f"(MCM {s['mcm'][0]:.3f}, kNN distance {s['knn'][0]:.3f}).")

    tabs = st.tabs(["Ranked prompts", "Why A rather than B", "Your prompt", "Model & benchmarks"])
    with tabs[0]:
        _ranked_section(pc, img, mkey)
    with tabs[1]:
        _contrast_section(pc, img, scores)
    with tabs[2]:
        _prompt_section(pc, img, mkey)
    with tabs[3]:
        _model_section(man)


run_page(main, "clip")
