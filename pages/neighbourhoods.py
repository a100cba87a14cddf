"""Neighbourhoods: where an image sits among known organisms (UMAP map + FAISS nearest neighbours).

The map, the neighbours, the vote and the scores all come from ``explain/`` (embeddings,
neighbours, projection, ood); this page caches them and lays them out.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from data.decode import ImageDecodeError, decode_image, fit_square, load_for_model
from data.sources import DatasetNotFound
from explain.embeddings import compute_embeddings, load_zoo_model
from explain.neighbours import KNN_K, Gallery, knn_score, load_gallery, neighbour_table, neighbour_vote
from explain.projection import map_cached, map_frame, place, placed_frame
from pages.common import MODEL_KEY, current_model, get_source, get_sources

log = logging.getLogger("plankton_lens.neighbourhoods")

#: Images per class and split of the quick map (the full map covers the whole dataset).
QUICK = int(os.environ.get("PLANKTON_LENS_QUICK_MAP", "10"))
SEL_KEY = "nb_selected"  # ("dataset", relpath) or ("upload", name)
UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"]
THUMB = 96
LINK_KEY = "nb_last_link"
ANOMALY = "#D55E00"


# --- cached data -----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def _frame(model_name: str, sha: str, limit: int | None) -> pd.DataFrame:
    """The map table (read-only: never modified by the page)."""
    return map_frame(model_name, limit)


@st.cache_resource(show_spinner=False, max_entries=4)
def _embeddings(model_name: str, sha: str, limit: int | None) -> np.ndarray:
    """Embeddings of every image on the map, aligned with the map table (read-only)."""
    from explain.embeddings import split_embeddings

    return split_embeddings(model_name, load_zoo_model(model_name)[1].get("dataset", "ndsb"), None,
                            limit_per_class=limit)[0]


@st.cache_resource(show_spinner=False, max_entries=4)
def _gallery(model_name: str, sha: str, limit: int | None) -> Gallery:
    return load_gallery(model_name, limit)


@st.cache_resource(show_spinner=False, max_entries=4)
def _reducer_future(model_name: str, sha: str, limit: int | None) -> Future:
    """The fitted UMAP, loaded and warmed up (numba compilation of ``transform``) in a background
    thread as soon as the map is shown, so placing an upload is quick."""
    from explain.projection import embedding_map, warm_up

    def job():
        r = embedding_map(model_name, limit_per_class=limit).reducer()
        warm_up(r)
        return r

    return ThreadPoolExecutor(1, thread_name_prefix="umap-warm-up").submit(job)


def _reducer(model_name: str, sha: str, limit: int | None):
    fut = _reducer_future(model_name, sha, limit)
    if not fut.done():
        with st.spinner("Preparing UMAP's transform (once per server start)…"):
            return fut.result()
    return fut.result()


@st.cache_resource(show_spinner="Placing ZooLake images on the map…", max_entries=4)
def _zoolake(model_name: str, sha: str, limit: int | None) -> pd.DataFrame:
    return placed_frame(model_name, "zoolake", limit_per_class=3, map_limit=limit)


@st.cache_data(show_spinner=False, max_entries=4)
def _logit_scores(model_name: str, sha: str, limit: int | None, dataset: str) -> dict[str, np.ndarray]:
    """OOD scores from the logits (explain.ood), per score and level, when that module is present."""
    from explain.embeddings import split_outputs

    try:
        from explain import ood
    except ImportError:
        return {}
    o = split_outputs(model_name, dataset, None, limit_per_class=limit)
    out = {}
    for name in ("msp", "entropy", "energy"):
        for lvl, z in o.logits.items():
            out[f"{ood.SCORE_LABELS.get(name, name)} ({lvl})"] = ood.logit_score(z, name).astype(np.float32)
    return out


@st.cache_data(show_spinner=False, max_entries=4096)
def _thumb(dataset: str, relpath: str) -> np.ndarray | None:
    src = get_source(dataset)
    try:
        dec = decode_image(src.read_bytes(relpath), mode=src.mode, background=src.background)
    except (ImageDecodeError, FileNotFoundError, KeyError):
        return None
    return np.asarray(fit_square(dec.image, THUMB, src.background).convert("RGB"))


# --- helpers ---------------------------------------------------------------------------------------
def _build(model_name: str, limit: int | None) -> None:
    """Compute the map once (embeddings, neighbours, UMAP), with a progress bar."""
    bar = st.progress(0.0, text="Building the map once…")
    map_frame(model_name, limit, on_progress=lambda f, m: bar.progress(min(max(f, 0.0), 1.0), text=m))
    bar.empty()


def _size_choice(model_name: str) -> int | None:
    """Full map or quick sample; the full map is the default once it is cached."""
    full_ready = map_cached(model_name)
    options = ["Full dataset", f"Quick sample ({QUICK} per class and split)"]
    choice = st.radio("Map", options, index=0 if full_ready else 1, horizontal=True, key="nb_size",
                      help="The full map embeds every image (minutes on a CPU the first time, then cached).")
    if choice == options[1]:
        return QUICK
    if not full_ready and not st.session_state.get("nb_build_full"):
        st.info("The full map has not been computed for this model yet: it embeds every image of the "
                "dataset and runs UMAP once (several minutes on a CPU), then opens in about a second.")
        if st.button("Build the full map now", icon=":material/play_arrow:", key="nb_build"):
            st.session_state["nb_build_full"] = True
            st.rerun()
        st.stop()
    return None


def _colour_options(df: pd.DataFrame, levels: tuple[str, ...], scores: dict) -> list[str]:
    return ([f"{lvl} (true)" for lvl in reversed(levels)] + [f"{lvl} (predicted)" for lvl in reversed(levels)]
            + ["split", "dataset", "held-out class", "kNN distance (embedding)", *scores])


def _colour_values(df: pd.DataFrame, option: str, scores: dict) -> tuple[pd.Series, bool]:
    """Values to colour by and whether they are continuous."""
    if option.endswith(" (true)"):
        return df[option[:-7]].astype(str), False
    if option.endswith(" (predicted)"):
        return df["pred_" + option[:-12]].astype(str), False
    if option == "held-out class":
        return df["heldout"].map({True: "held out (unknown to the model)", False: "known class"}), False
    if option == "kNN distance (embedding)":
        return df["knn_score"].astype(float), True
    if option in scores:
        return pd.Series(scores[option], index=df.index), True
    return df[option].astype(str), False


def _figure(df: pd.DataFrame, option: str, values: pd.Series, continuous: bool, flagged: np.ndarray,
            extra: pd.DataFrame | None, upload_xy: np.ndarray | None, revision: str = "map") -> go.Figure:
    """The WebGL scatter. Built without plotly's per-property validation, with numeric colours
    (codes on a discrete colour scale) and fixed-width string arrays: 30k points stay fast to send."""
    traces = []
    idx = df.index.to_numpy(np.int32)
    x, y = df["x"].to_numpy(np.float32), df["y"].to_numpy(np.float32)
    hover = df["class"].astype(str)
    if option != "class (true)":
        hover = hover + "<br>" + option + ": " + (values.round(3).astype(str) if continuous else values.astype(str))
    hover = hover.to_numpy(dtype=str)
    palette = px.colors.qualitative.Dark24 + px.colors.qualitative.Light24 + px.colors.qualitative.Alphabet
    base = dict(type="scattergl", mode="markers", hovertemplate="%{text}<extra></extra>")
    if continuous:
        traces.append({**base, "x": x, "y": y, "customdata": idx, "text": hover, "name": option, "showlegend": False,
                       "marker": dict(size=4, color=values.to_numpy(np.float32), colorscale="Viridis", opacity=0.85,
                                      colorbar=dict(title=dict(text=option[:28]), thickness=12))})
    else:
        codes, cats = pd.factorize(values, sort=True)
        n = len(cats)
        if n <= 30:
            for j, c in enumerate(cats):
                m = codes == j
                traces.append({**base, "x": x[m], "y": y[m], "customdata": idx[m], "text": hover[m], "name": str(c),
                               "marker": dict(size=4, color=palette[j % len(palette)], opacity=0.85)})
        else:
            scale = [[min(1.0, (j + e) / n), palette[j % len(palette)]] for j in range(n) for e in (0, 1)]
            traces.append({**base, "x": x, "y": y, "customdata": idx, "text": hover, "name": option, "showlegend": False,
                           "marker": dict(size=4, color=codes.astype(np.float32) + 0.5, cmin=0, cmax=n, colorscale=scale,
                                          opacity=0.85)})
    if flagged.any():
        traces.append({**base, "x": x[flagged], "y": y[flagged], "customdata": idx[flagged], "text": hover[flagged],
                       "name": "anomaly (above threshold)", "hovertemplate": "%{text}<br><b>flagged</b><extra></extra>",
                       "marker": dict(size=9, color="rgba(0,0,0,0)", line=dict(color=ANOMALY, width=1.5))})
    if extra is not None and len(extra):
        traces.append({**base, "x": extra["x"].to_numpy(np.float32), "y": extra["y"].to_numpy(np.float32),
                       "customdata": -1 - np.arange(len(extra)), "name": "ZooLake (placed)",
                       "text": (extra["class"].astype(str) + " (ZooLake)").to_numpy(dtype=str),
                       "marker": dict(size=7, symbol="x", color="#000000", opacity=0.8)})
    if upload_xy is not None:
        traces.append({**base, "x": upload_xy[:, 0], "y": upload_xy[:, 1], "name": "your image",
                       "hovertemplate": "your image<extra></extra>",
                       "marker": dict(size=18, symbol="star", color="#F0E442", line=dict(color="black", width=1.5))})
    # The view spans the central 99 % of points (a few far outliers would squash the map);
    # "autoscale" in the toolbar shows everything.
    (x0, x1), (y0, y1) = (np.percentile(v, [0.5, 99.5]) if len(v) else (0.0, 1.0) for v in (x, y))
    px_, py_ = 0.06 * (x1 - x0 or 1), 0.06 * (y1 - y0 or 1)
    layout = dict(height=620, margin=dict(l=10, r=10, t=10, b=10), dragmode="pan", uirevision=revision,
                  legend=dict(orientation="h", yanchor="top", y=-0.01, x=0, itemsizing="constant", font=dict(size=11)),
                  xaxis=dict(visible=False, range=[float(x0 - px_), float(x1 + px_)]),
                  yaxis=dict(visible=False, range=[float(y0 - py_), float(y1 + py_)]))
    return go.Figure(data=traces, layout=layout, _validate=False)  # plotly's own flag: skip per-property checks


def _parse_link(value: str) -> tuple[str, str] | None:
    ds, sep, rel = (value or "").partition(":")
    return (ds, rel) if sep and ds and rel else None


def _neighbour_panel(g: Gallery, emb: np.ndarray, k: int, exclude: int | None, truth: dict | None,
                     pred: dict | None) -> None:
    """Vote table and neighbour thumbnails of one embedding."""
    t = neighbour_table(g, emb, k, exclude_id=exclude)
    vote = neighbour_vote(t, g.levels)
    rows = []
    for lvl in g.levels:
        r = {"level": lvl, "neighbour vote": vote[lvl]["label"], "votes": f"{vote[lvl]['votes']}/{len(t)}"}
        if pred:
            r["model predicts"] = pred.get(lvl)
        if truth:
            r["true label"] = truth.get(lvl)
        rows.append(r)
    st.markdown(f"**Neighbour vote** over the {len(t)} nearest known images (training split)")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.markdown("**Nearest known images** (distance between L2-normalised embeddings, 0 = identical, 2 = opposite)")
    per_row = 5
    for start in range(0, len(t), per_row):
        cols = st.columns(per_row)
        for col, r in zip(cols, t.iloc[start : start + per_row].to_dict("records")):
            im = _thumb(r["dataset"], r["relpath"])
            with col:
                if im is not None:
                    st.image(im, width=THUMB)
                st.caption(f"**{r[g.levels[-1]]}**  \nd = {r['distance']:.3f}")
                st.page_link("pages/classify.py", label="explain", icon=":material/biotech:",
                             query_params={"image": f"{r['dataset']}:{r['relpath']}"})


def _selected_panel(df: pd.DataFrame, g: Gallery, model_name: str, sha: str, limit: int | None,
                    scores_ref: np.ndarray) -> None:
    """The chosen image (map point, path or upload): shows it, its scores and its neighbours."""
    sel = st.session_state.get(SEL_KEY)
    k = st.slider("Neighbours shown", 5, 30, 10, step=5, key="nb_k")
    if not sel:
        st.info("Click a point on the map (or give an image path / upload an image above) to see its nearest known images.")
        return
    kind, name = sel
    if kind == "upload":
        up = _placed_upload(model_name, sha, limit)
        if up is None:
            return
        if "error" in up:
            st.error(f"{name}: {up['error']}")
            return
        score = float(knn_score(g.index, up["emb"][None], KNN_K)[0])
        left, right = st.columns([1, 3])
        with left:
            st.image(up["display"], caption=name, width=160)
            _score_line(score, scores_ref)
            st.caption("Placed on the map with UMAP `transform` (the yellow star).")
        with right:
            _neighbour_panel(g, up["emb"], k, None, None, None)
        return
    ds, rel = kind, name
    hit = df.index[(df["dataset"] == ds) & (df["relpath"] == rel)]
    if len(hit) == 0:
        st.warning(f"{ds}:{rel} is not on this map (try the full map, or check the path).")
        return
    row = df.loc[hit[0]]
    emb_all = _embeddings(model_name, sha, limit)
    emb = emb_all[int(hit[0])] if ds == g.dataset else None
    if emb is None:
        st.warning("Neighbours are shown for images of the model's own dataset only.")
        return
    gid = g.rows.index[(g.rows["relpath"] == rel)]
    exclude = int(gid[0]) if len(gid) else None
    left, right = st.columns([1, 3])
    with left:
        im = _thumb(ds, rel)
        if im is not None:
            st.image(im, caption=rel.rsplit("/", 1)[-1], width=160)
        st.markdown(f"**{row['class']}**  \n{row['split']} split" + (" · held-out class" if row["heldout"] else ""))
        st.caption(f"Model predicts **{row['pred_class']}** ({row['pred_conf_class']:.0%})")
        _score_line(float(row["knn_score"]), scores_ref)
        st.page_link("pages/classify.py", label="Explain this image", icon=":material/biotech:",
                     query_params={"image": f"{ds}:{rel}"})
    with right:
        truth = {lvl: row[lvl] for lvl in g.levels}
        pred = {lvl: row[f"pred_{lvl}"] for lvl in g.levels}
        _neighbour_panel(g, emb, k, exclude, truth, pred)
    return


def _placed_upload(model_name: str, sha: str, limit: int | None) -> dict | None:
    """The uploaded image's embedding, display image and map position (computed once per upload
    and map), or ``{"error": message}`` for a file that is not a usable image."""
    data, fid = st.session_state.get("nb_upload_bytes"), st.session_state.get("nb_upload_id")
    if data is None:
        return None
    key = (fid, model_name, sha, limit)
    got = st.session_state.get("nb_upload_placed")
    if got and got["key"] == key:
        return got
    model, _ = load_zoo_model(model_name)
    try:
        fg, _, square = load_for_model(data, int(model.preprocessing["size"]), mode="L")
    except ImageDecodeError as e:
        got = {"key": key, "error": e.message}
    else:
        emb = compute_embeddings(model, fg[None])[0]
        got = {"key": key, "emb": emb, "xy": place(_reducer(model_name, sha, limit), emb[None]),
               "display": np.asarray(fit_square(square, 160, 255).convert("RGB"))}
    st.session_state["nb_upload_placed"] = got
    return got


def _score_line(score: float, ref: np.ndarray) -> None:
    pct = float((ref < score).mean() * 100) if len(ref) else float("nan")
    st.metric(f"kNN distance (k={KNN_K})", f"{score:.3f}", help="Distance to the 10th nearest known image; "
              "higher = less like anything the model was trained on (Sun et al. 2022).")
    st.caption(f"Higher than {pct:.0f}% of validation images.")


# --- page ------------------------------------------------------------------------------------------
def main() -> None:
    st.title("Neighbourhoods")
    st.caption("Which known organisms does an image sit near? A 2-D UMAP map of the model's embeddings, "
               "and the nearest images of the training set for any image.")
    loaded = current_model()
    if loaded is None:
        return
    model, manifest = loaded
    model_name = manifest.get("name") or st.session_state.get(MODEL_KEY)
    sha = manifest["sha256"]
    dataset = manifest.get("dataset", "ndsb")
    if dataset not in get_sources():
        st.warning(f"The {dataset} dataset this model was trained on was not found, so there is nothing to map.")
        return

    link = st.query_params.get("image")
    if link and link != st.session_state.get(LINK_KEY):
        st.session_state[LINK_KEY] = link
        parsed = _parse_link(link)
        if parsed is None:
            st.error(f"The link `?image={link}` is not of the form `?image=<dataset>:<relative path>`.")
        else:
            st.session_state[SEL_KEY] = parsed

    limit = _size_choice(model_name)
    if not map_cached(model_name, limit_per_class=limit):
        _build(model_name, limit)
    df = _frame(model_name, sha, limit)
    g = _gallery(model_name, sha, limit)
    scores = _logit_scores(model_name, sha, limit, dataset)
    val = (df["split"] == "val") & ~df["heldout"]

    c = st.columns([2, 2, 1, 1])
    options = _colour_options(df, model.levels, scores)
    option = c[0].selectbox("Colour by", options, index=0, key="nb_colour")
    score_names = ["kNN distance (embedding)", *scores]
    anomaly_by = c[1].selectbox("Highlight anomalies by", ["none", *score_names], index=1, key="nb_anomaly",
                                help="Images scoring above the threshold are circled in orange.")
    keep = c[2].number_input("Threshold keeps % of validation", 50.0, 99.9, 95.0, step=0.5, key="nb_tpr",
                             help="The threshold is set so that this share of validation images (known "
                                  "classes) scores below it.")
    zoo = c[3].checkbox("Add ZooLake", key="nb_zoolake", disabled="zoolake" not in get_sources(),
                        help="A ZooLake sample (freshwater, another camera: far out of distribution) placed on the map.")

    values, continuous = _colour_values(df, option, scores)
    flagged = np.zeros(len(df), bool)
    ref = df.loc[val, "knn_score"].to_numpy()
    if anomaly_by != "none":
        s = df["knn_score"].to_numpy() if anomaly_by == score_names[0] else scores[anomaly_by]
        thr = float(np.quantile(s[val.to_numpy()], keep / 100)) if val.any() else float("inf")
        flagged = s > thr
        st.caption(f"{flagged.sum():,} of {len(df):,} images above the threshold {thr:.3f} ({anomaly_by}).")
    extra = None
    if zoo:
        try:
            extra = _zoolake(model_name, sha, limit)
        except DatasetNotFound as e:
            st.warning(str(e))

    p = st.columns([3, 2])
    with p[1]:
        path = st.text_input("Image path", placeholder=f"{dataset}:train/<class>/<file>.jpg", key="nb_path",
                             help="An image of the dataset as <dataset>:<relative path>.")
        up = st.file_uploader("…or upload an image", type=UPLOAD_TYPES, key="nb_upload")
    if path and path != st.session_state.get("nb_last_path"):
        st.session_state["nb_last_path"] = path
        parsed = _parse_link(path.strip())
        if parsed is None:
            st.error("Write the image as `<dataset>:<relative path>`, e.g. "
                     f"`{dataset}:{df['relpath'].iloc[0]}`.")
        else:
            st.session_state[SEL_KEY] = parsed
    if up is not None and st.session_state.get("nb_upload_id") != up.file_id:
        st.session_state["nb_upload_id"] = up.file_id
        st.session_state["nb_upload_bytes"] = up.getvalue()
        st.session_state[SEL_KEY] = ("upload", up.name)

    upload_xy = None
    sel = st.session_state.get(SEL_KEY)
    if sel and sel[0] == "upload":  # placed before the map is drawn, so the star shows on it
        up = _placed_upload(model_name, sha, limit)
        upload_xy = up.get("xy") if up else None
    with p[0]:
        fig = _figure(df, option, values, continuous, flagged, extra, upload_xy, revision=f"{sha}-{limit}")
        event = st.plotly_chart(fig, key="nb_map", on_select="rerun", selection_mode=("points", "box", "lasso"),
                                config={"scrollZoom": True, "displaylogo": False})
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    ids = [int(pt["customdata"]) for pt in points if isinstance(pt.get("customdata"), (int, float)) and pt["customdata"] >= 0]
    sig = tuple(ids[:50])
    if ids and sig != st.session_state.get("nb_last_sel"):
        st.session_state["nb_last_sel"] = sig
        r = df.loc[ids[0]]
        st.session_state[SEL_KEY] = (r["dataset"], r["relpath"])
    with p[1]:
        if len(ids) > 1:
            comp = df.loc[ids, "class"].value_counts().head(8).rename_axis("class").reset_index(name="images")
            st.markdown(f"**{len(ids)} points selected** — most common classes:")
            st.dataframe(comp, hide_index=True, width="stretch")
        st.caption(f"{len(df):,} images of {dataset} ({'full dataset' if limit is None else f'{limit} per class and split'}); "
                   f"the gallery of known images is the training split ({len(g):,} images"
                   + (f", without {len(manifest.get('heldout') or [])} held-out classes" if manifest.get("heldout") else "")
                   + ").")
    st.divider()
    _selected_panel(df, g, model_name, sha, limit, ref)
    _reducer_future(model_name, sha, limit)  # start loading UMAP for uploads in the background


try:
    main()
except Exception as e:  # noqa: BLE001 - never a traceback in the UI; Streamlit's control flow is BaseException
    log.exception("neighbourhoods page failed")
    st.error(f"Something went wrong on this page ({type(e).__name__}: {e}). The rest of the app still works.")
