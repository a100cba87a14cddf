"""Classify & explain: an image's prediction at every taxonomic level and why (Captum saliency).

Images come from the dataset gallery, from uploads, or from a deep link
``?image=<dataset>:<relative path>``. All computation is in ``explain/``; this page caches
and lays it out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from data.decode import keeps_colour
from data.manifest import decoded_array
from explain import export
from explain.faithfulness import randomisation_check
from explain.predict import Prediction, ground_truth_path, predict
from explain.saliency import available_methods, get_method, is_signed, list_methods, target_layer
from models.base import images_to_tensor
from models.train import predict_arrays
from models.handle import open_model
from pages import image_picker as picker
from pages.common import (
    COMPUTE_LOCK, DEFAULT_METHOD, current_collection, current_model, gallery_sample, get_manifest, get_source,
    get_sources, run_page)
from pages.common import explanation_attribution as _attr
from pages.common import explanation_contrast as _contrast
from pages.common import explanation_faithfulness as _faith
from pages.common import explanation_references as _references
from pages.common import md_text
from pages.common import image_key as _key
from pages.image_picker import PickedImage
from pages.state import CLASSIFY_PICKER

ORDERS = ["random", "misclassified only", "least confident"]
KEYS = CLASSIFY_PICKER  # the picker's keys: "classify_selected" is the (collection, relpath) being explained
BLUE, ORANGE, GREY = "#0072B2", "#E69F00", "#B8C4CE"  # Okabe-Ito: colour-blind safe


# --- cached computations ---------------------------------------------------------------------
@st.cache_data(show_spinner="Scoring these test images once for this model…", max_entries=32)
def _subset_predictions(model_name: str, sha: str, dataset: str, relpaths: tuple[str, ...]) -> pd.DataFrame:
    """Leaf prediction and confidence of each image (model name + sha key the cache)."""
    model = open_model(model_name).classifier
    man = get_manifest(dataset)
    sub = man.set_index("relpath").loc[list(relpaths)].reset_index()
    src = get_source(dataset)
    arr = decoded_array(src, sub, model.preprocessing["size"], progress=False, colour=keeps_colour(model.preprocessing, src.mode))
    leaf = model.levels[-1]
    probs = predict_arrays(model, np.array(arr))[leaf]  # a writable copy of the memory-mapped cache
    names = np.array(model.class_names[leaf])
    return pd.DataFrame({"relpath": list(relpaths), "predicted": names[probs.argmax(1)], "confidence": probs.max(1)})


# --- image choice (pages.image_picker) -------------------------------------------------------------
def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _gallery(model, manifest: dict) -> PickedImage | None:
    """Filters and thumbnails of the sidebar's collection; returns the selected image."""
    sources = get_sources()
    if not sources:
        st.warning("No dataset found, so there is no gallery; upload an image instead.")
        return None
    ds = current_collection() or next(iter(sources))
    c = st.columns([1, 1, 1.4, 1.8, 1.3])
    c[0].caption("Images")
    c[0].markdown(f"**{md_text(ds)}**" + (" (sample)" if sources[ds].sample else ""), help="Choose the collection in the sidebar.")
    man = get_manifest(ds)
    split = c[1].selectbox("Split", ["test", "val", "train", "all"], key="g_split",
                           help="Test images were never seen in training.")
    groups = ["all"] + sorted(man["group"].dropna().unique().tolist())
    group = c[2].selectbox("Group (level 2)", groups, key=f"g_group_{ds}")
    sub = man if group == "all" else man[man["group"] == group]
    classes = ["all"] + sorted(sub["class"].unique().tolist())
    cls = c[3].selectbox("Class", classes, key=f"g_class_{ds}_{group}")
    order = c[4].selectbox("Show", ORDERS, key="g_order")
    if cls != "all":
        sub = sub[sub["class"] == cls]
    if order != "random" and split != "test":
        st.caption(f"“{order}” looks at the test split (predictions over it are computed once and cached).")
        split = "test"
    if split != "all":
        sub = sub[sub["split"] == split]
    if sub.empty:
        st.info("No image matches these filters.")
        return _current_selection(model)

    seed = picker.gallery_seed(KEYS)
    captions = {}
    if order == "random":
        shown = gallery_sample(sub, seed)
    else:
        preds = _subset_predictions(manifest.get("name"), manifest.get("sha256"), ds, tuple(sub["relpath"]))
        sub = sub.merge(preds, on="relpath")
        if order == "misclassified only":
            if not sub["class"].isin(model.class_names[model.levels[-1]]).any():
                st.info("These images' classes are not in the model's taxonomy, so there is no misclassification to show.")
                return _current_selection(model)
            sub = sub[sub["class"] != sub["predicted"]]
            st.caption(f"{len(sub):,} misclassified test images" + (f" of {len(preds):,}" if len(preds) else ""))
            shown = gallery_sample(sub, seed) if len(sub) else sub
        else:
            shown = sub.nsmallest(12, "confidence")
            st.caption(f"The 12 test images (of {len(sub):,}) where the model's top class has the lowest probability.")
        captions = {r: f"→ {md_text(_short(p))} ({c:.0%})" for r, p, c in zip(shown["relpath"], shown["predicted"], shown["confidence"])}
    if shown.empty:
        st.info("No image matches these filters.")
        return _current_selection(model)
    picker.thumbnails(KEYS, ds, shown, captions)
    return _current_selection(model)


def _current_selection(model) -> PickedImage | None:
    return picker.selection(KEYS, model.preprocessing["size"], model.preprocessing)


def _uploads(model) -> PickedImage | None:
    """Upload one or several images (bad files get a message each); several are classified in a table."""
    good = picker.uploads(KEYS, model.preprocessing["size"], keeps_colour(model.preprocessing),
                          prompt="Upload one or more plankton images to classify them.")
    if len(good) > 1:
        with st.spinner("Classifying uploads…"):
            probs = predict_arrays(model, np.stack([g.fg for g in good]))
        leaf = model.levels[-1]
        table = pd.DataFrame({"image": [g.label for g in good],
                              "predicted class": [model.class_names[leaf][i] for i in probs[leaf].argmax(1)],
                              "probability": probs[leaf].max(1)})
        st.dataframe(table, hide_index=True, width="stretch",
                     column_config={"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent")})
    return picker.choose_upload(KEYS, good)


# --- layout pieces ---------------------------------------------------------------------------
def _bars(levels: list[str], pred: Prediction, truth_path: dict) -> go.Figure:
    """Top-k bars of every level side by side, in one figure (one Plotly chart draws much
    faster in the browser than one per level)."""
    from plotly.subplots import make_subplots

    titles = [f"<b>{lvl}</b>" + (" ⚠" if lvl in pred.contradictions else "") for lvl in levels]
    fig = make_subplots(rows=1, cols=len(levels), subplot_titles=titles, horizontal_spacing=0.13)
    for i, lvl in enumerate(levels, start=1):
        items = pred.topk[lvl][::-1]
        truth = truth_path.get(lvl)
        colors = [ORANGE if n == truth else (BLUE if n == pred.path[lvl] else GREY) for n, _ in items]
        fig.add_trace(go.Bar(x=[p for _, p in items], y=[n for n, _ in items], orientation="h", marker_color=colors,
                             customdata=[n for n, _ in items], name=lvl,
                             text=[f"{p:.0%}" for _, p in items], textposition="auto",
                             hovertemplate="%{customdata}: %{x:.3f}<extra></extra>"), row=1, col=i)
        fig.update_xaxes(range=[0, 1], tickformat=".0%", row=1, col=i)
        # full names as categories (two classes can share a shortened name), short tick labels
        fig.update_yaxes(automargin=True, tickvals=[n for n, _ in items], ticktext=[_short(n, 18) for n, _ in items], row=1, col=i)
    fig.update_layout(height=230, margin=dict(l=4, r=4, t=28, b=4), showlegend=False)
    return fig


def _predictions(model, img: PickedImage, pred: Prediction, truth_path: dict | None, heldout: list[str]) -> None:
    left, right = st.columns([1, 2.4])
    with left:
        st.image(img.display, caption=md_text(img.label), width="stretch")
        if img.notes:
            st.caption("Decoding: " + md_text("; ".join(img.notes)))
    with right:
        leaf = model.levels[-1]
        m = st.columns([2.2, 1, 2.2])
        with m[0]:
            st.caption("Predicted class")
            st.markdown(f"#### {md_text(pred.path[leaf])}")
        m[1].metric("Probability", f"{pred.probability(leaf, model.class_names[leaf]):.1%}")
        with m[2]:
            st.caption("Ground truth")
            if truth_path:
                ok = truth_path[leaf] == pred.path[leaf]
                st.markdown(f"#### {md_text(truth_path[leaf])}")
                st.markdown(":green-badge[:material/check: correct]" if ok else ":red-badge[:material/close: misclassified]")
            elif img.truth:
                st.markdown(f"#### {md_text(img.truth)}")
                st.markdown(":gray-badge[not in the model's taxonomy]")
            else:
                st.markdown("#### —")
                st.markdown(":gray-badge[no validated label]" if img.link else ":gray-badge[unknown (uploaded image)]")
                if img.annotation:
                    st.text(img.annotation)
        steps = []
        for lvl in model.levels:
            p = pred.probability(lvl, model.class_names[lvl])
            mark = ""
            if truth_path:
                mark = " ✓" if truth_path[lvl] == pred.path[lvl] else f" ✗ (truth: {md_text(truth_path[lvl])})"
            flag = " ⚠" if lvl in pred.contradictions else ""
            steps.append(f"**{md_text(lvl)}**: {md_text(pred.path[lvl])} ({p:.0%}){flag}{mark}")
        st.markdown("  \n".join(steps))
        for lvl, msg in pred.contradictions.items():
            st.warning(f"Hierarchy contradiction at **{md_text(lvl)}**: {md_text(msg)}. The path shown is the one of "
                       "highest joint probability, which respects the taxonomy.", icon=":material/warning:")
        if img.truth and img.truth in heldout:
            st.info(f"{md_text(repr(img.truth))} was held out of this model's training: it has never seen this class"
                    + (" (a CLIP model still names it, zero-shot, from its text prompts)." if model.arch == "clip" else "."))
    st.plotly_chart(_bars(list(model.levels), pred, truth_path or {}), width="stretch", key="bars",
                    config={"displayModeBar": False})
    st.caption("Blue: predicted · orange: ground truth · ⚠: the level's own top class is not a child of the level above's "
               "(the path shown is the taxonomy path of highest joint probability).")


def _badge(f: dict) -> str:
    """A coloured verdict badge with the deletion / insertion AUCs and the random-order AUC."""
    color = {"faithful": "green", "partial": "orange"}.get(f["verdict"], "red")
    return (f":{color}-badge[{f['verdict']}] deletion AUC **{f['deletion_auc']:.3f}** · insertion AUC "
            f"**{f['insertion_auc']:.3f}** · random order {f['random_auc']:.3f}")


def _curve_fig(f: dict) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=f["fractions"], y=f["deletion"], name="deletion", line=dict(color=BLUE))
    fig.add_scatter(x=f["fractions"], y=f["insertion"], name="insertion", line=dict(color=ORANGE, dash="dash"))
    fig.add_hline(y=float(f["random_auc"]), line=dict(color="grey", dash="dot"), annotation_text="random-order AUC")
    fig.update_layout(height=230, margin=dict(l=4, r=4, t=24, b=4), xaxis_title="fraction of pixels removed / added",
                      yaxis_title="probability", legend=dict(orientation="h", y=1.15), yaxis=dict(rangemode="tozero"))
    return fig


def _sanity(model, mkey: str, img: PickedImage, x, level: str, target: str, method: str) -> None:
    """The cascading model-randomisation check, run on request (Adebayo et al. 2018)."""
    st.caption("Randomises the weights from the output heads downwards and measures how similar the map stays "
               "(Spearman rank correlation and SSIM of |map|). A faithful method's map should change a lot.")
    skey = "|".join(("sanity", mkey, img.key, level, target, method))
    if st.button("Run model-randomisation check", key="sanity_btn"):
        with st.spinner("Randomising layers and recomputing the map…"):
            st.session_state[skey] = randomisation_check(model, x, level, target, method)
    if skey in st.session_state:
        res = pd.DataFrame(st.session_state[skey])
        st.dataframe(res, hide_index=True, width="stretch")
        first = res.iloc[0]["spearman"]
        (st.success if abs(first) < 0.5 else st.warning)(
            f"After randomising the heads the map's rank correlation with the original is {first:.2f}: "
            + ("it depends on the learned weights." if abs(first) < 0.5 else "it changes little — treat it with care."))


def _explain(model, mkey: str, img: PickedImage, x, pred: Prediction, manifest: dict, truth_path: dict | None) -> None:
    st.subheader("Why? Saliency maps")
    has_cam = target_layer(model) is not None  # a CLIP with a ViT tower has no convolutional block
    methods = [m.name for m in available_methods(model)]
    dropped = [m.label for m in list_methods() if m.name not in methods]
    if st.session_state.get("method") not in methods:
        st.session_state.pop("method", None)
    c = st.columns([2.7, 1.5, 2, 2])
    level = c[0].radio("Level", list(model.levels), index=len(model.levels) - 1, horizontal=True, key="level")
    method = c[1].selectbox("Method", methods, index=methods.index(DEFAULT_METHOD), format_func=lambda n: get_method(n).label,
                            key="method", help="GradCAM is instant; Integrated Gradients is finer-grained (~0.2 s per level)."
                            + (f" Not offered: {', '.join(dropped)} (this model's image tower has no convolutional layer)."
                               if dropped else ""))
    if dropped:
        c[1].caption(f"No {', '.join(dropped)}: this model's image tower has no convolutional layer.")
    label = get_method(method).label

    def heading(esc=str) -> str:  # the map's title; esc=md_text for a caption
        return f"{label} · {esc(level)}: {esc(target)}" + ("" if other == "—" else f" rather than {esc(other)}")

    order = list(np.argsort(-pred.probs[level]))
    names = model.class_names[level]
    opts = [names[i] for i in order]
    fmt = {n: f"{n} ({pred.probs[level][names.index(n)]:.1%})" for n in opts}
    target = c[2].selectbox("Explain class", opts, format_func=fmt.get, key=f"target_{img.key}_{level}",
                            help="The predicted class by default; pick another to see what supports it.")
    other = c[3].selectbox("…rather than", ["—"] + [n for n in opts if n != target], format_func=lambda n: fmt.get(n, "— (no contrast)"),
                           key=f"contrast_{img.key}_{level}", help="“Why A rather than B”: map(A) − map(B), red favours A.")
    c2 = st.columns([2.7, 1.5, 2, 2])
    alpha = c2[0].slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="alpha")
    cmap = c2[1].selectbox("Colormap", export.SEQUENTIAL_CMAPS, key="cmap", help="Colour-blind-safe colormaps.")
    signed = c2[2].toggle("Signed map", value=is_signed(method), key=f"signed_{method}",
                          help="Red = evidence for the class, blue = against. "
                               + ", ".join(m.label for m in list_methods() if m.signed) + " are signed by nature; "
                               + ", ".join(m.label for m in list_methods() if not m.signed) + " are usually shown as magnitudes.")
    with st.spinner(f"Computing {label}…"):
        amap, delta = _attr(mkey, img.key, level, target, method, signed, model, x)
        shown, shown_signed, title = amap, is_signed(method, signed), heading()
        if other != "—":
            shown = _contrast(mkey, img.key, level, target, other, method, model, x)
            shown_signed = True
        grid_targets = {lvl: (target if lvl == level else pred.path[lvl]) for lvl in model.levels}
        refs = _references(mkey, img.key, tuple(grid_targets.items()), model, x)
        faith = _faith(mkey, img.key, level, target, _key(shown.astype(np.float32)), refs[level], model, x, shown)
    over = export.overlay(img.display, shown, alpha, shown_signed, cmap)
    a, b, d = st.columns([1, 1, 1.35])
    a.image(img.display, caption="image", width="stretch")
    b.image(over, caption=heading(md_text), width="stretch")
    b.caption(":red[red] = evidence for, :blue[blue] = evidence against" if shown_signed
              else f"{cmap}: brighter = more important")
    if not np.any(shown):  # an empty overlay needs a reason, or it reads as a broken page
        b.info("The map is zero at every pixel: " + (
            "no pixel moves this class's score under this method (a saturated output has zero gradients); "
            "try another method." if shown_signed else
            "this map keeps only evidence *for* the class, and there is none here (for Grad-CAM: no location "
            "of the last convolutional layer raises this class's score). Turn on *Signed map* to see the "
            "evidence against."))
    with d:
        st.markdown(_badge(faith))
        st.plotly_chart(_curve_fig(faith), width="stretch", key="curves", config={"displayModeBar": False})
        if delta is not None:
            total = abs(float(amap.sum())) or 1.0
            st.caption(f"{label} completeness gap (|Σ attributions − logit change|): {delta:.3f}, "
                       f"{delta / total:.1%} of Σ attributions (shrinks with more steps).")
    with st.expander("Sanity check: does the map depend on what the model learned? (Adebayo et al. 2018)"):
        if has_cam:
            _sanity(model, mkey, img, x, level, target, method)
        else:
            st.info("The model-randomisation check randomises the layers after the last convolutional block; "
                    "this model's image tower has none, so the check is not available for it.")

    st.subheader(f"{label} at every level")
    gcols = st.columns(len(model.levels))
    grid = []
    for col, lvl in zip(gcols, model.levels):
        with st.spinner(f"{lvl}…"):
            m_, _ = _attr(mkey, img.key, lvl, grid_targets[lvl], method, signed, model, x)
            f_ = _faith(mkey, img.key, lvl, grid_targets[lvl], _key(m_.astype(np.float32)), refs[lvl], model, x, m_)
        ov = export.overlay(img.display, m_, alpha, is_signed(method, signed), cmap)
        grid.append((f"{lvl}: {grid_targets[lvl]}", ov, f_))
        p_ = pred.probs[lvl][model.class_names[lvl].index(grid_targets[lvl])]
        col.image(ov, caption=f"{md_text(lvl)}: {md_text(grid_targets[lvl])} ({p_:.0%})", width="stretch")
        col.markdown(_badge(f_))

    st.subheader("Export")
    record = {
        "image": img.link or img.label, "model": {"name": manifest.get("name"), "sha256": manifest.get("sha256"), "arch": manifest.get("arch")},
        "prediction": pred.to_dict(), "ground_truth": truth_path,
        "explanation": {"method": method, "level": level, "target": target, "rather_than": None if other == "—" else other,
                        "signed": shown_signed, "ig_convergence_delta": delta,
                        "faithfulness": {k: v for k, v in faith.items() if isinstance(v, (str, float, int))}},
        "levels": {t: {k: v for k, v in f.items() if isinstance(v, (str, float, int))} for t, _, f in grid},
        "sanity_check": st.session_state.get("|".join(("sanity", mkey, img.key, level, target, method))),
    }
    stem = (img.link or img.label).replace("/", "_").replace(":", "_").rsplit(".", 1)[0]
    e = st.columns([1, 1, 3])
    e[0].download_button(
        "Panel (PNG)", icon=":material/image:", file_name=f"{stem}_{method}.png", mime="image/png", key="dl_png",
        data=lambda: export.panel_png(img.display, [(title, over)] + [(t, o) for t, o, _ in grid], f"{img.label} — {manifest.get('name')}",
                                      pred.to_dict(), truth_path, notes=[f"{title}: {faith['verdict']} (deletion AUC {faith['deletion_auc']:.3f}, "
                                             f"insertion AUC {faith['insertion_auc']:.3f}, random order {faith['random_auc']:.3f})"]))
    e[1].download_button("Scores (JSON)", icon=":material/data_object:", file_name=f"{stem}_{method}.json",
                         mime="application/json", key="dl_json", data=export.explanation_json(record))
    if img.link:
        e[2].caption(f"Link to this image: {md_text('?image=' + img.link, code=True)}")


# --- page ------------------------------------------------------------------------------------
def main() -> None:
    st.title("Classify & explain")
    st.caption("The model's prediction at every taxonomic level, and which pixels drove it.")
    loaded = current_model()
    if loaded is None:
        return
    model, manifest = loaded.classifier, loaded.manifest
    model.eval()
    mkey = loaded.key
    if model.arch == "clip":
        st.info(f"**{md_text(manifest.get('name'))}** is a CLIP model used as a classifier: a class's logit is the scaled "
                "similarity of the image to that class's text prompts, and the higher levels add up their classes' "
                "probabilities. The text prompts behind a prediction are on the *CLIP explanations* page.",
                icon=":material/translate:")

    img = picker.pick(KEYS, lambda: _gallery(model, manifest), lambda: _uploads(model))
    if img is None:
        return

    x = images_to_tensor(img.fg)
    with COMPUTE_LOCK:
        pred = predict(model, x, k=5)
    truth_path = ground_truth_path(model, img.truth)
    st.header(md_text(img.name), divider="gray")
    _predictions(model, img, pred, truth_path, list(manifest.get("heldout") or []))
    _explain(model, mkey, img, x, pred, manifest, truth_path)


run_page(main, "classify", "The rest of the app still works; try another image or method.")
