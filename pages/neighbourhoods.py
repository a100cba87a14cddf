"""Neighbourhoods: where an image sits among known organisms (UMAP map + FAISS nearest neighbours).

The map, the neighbours, the vote and the scores all come from ``explain/`` (embeddings,
neighbours, projection, ood); this page caches them and lays them out.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from data.decode import MAX_ASPECT, ImageDecodeError, fit_square, keeps_colour, load_for_model
from data.sources import DatasetNotFound
from explain.embeddings import compute_embeddings
from explain.neighbours import KNN_K, Gallery, knn_score, neighbour_table, neighbour_vote
from explain.projection import gallery_map_rows, map_cached, map_frame, place, placed_frame, quick_place
from models.handle import open_model
from pages.common import (dataset_embeddings, gallery, get_sources, logit_scores, md_text, model_with_dataset,
                          run_with_progress, size_choice, thumbnail)

log = logging.getLogger("plankton_lens.neighbourhoods")

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
def _reducer_future(model_name: str, sha: str, limit: int | None) -> Future:
    """The fitted UMAP, loaded and warmed up (numba compilation of ``transform``) in a background
    thread as soon as the map is shown, so placing an upload is quick."""
    from explain.projection import embedding_map, warm_up

    def job():
        r = embedding_map(model_name, limit_per_class=limit).reducer()
        warm_up(r)
        return r

    return ThreadPoolExecutor(1, thread_name_prefix="umap-warm-up").submit(job)


def _reducer_if_ready(model_name: str, sha: str, limit: int | None):
    """The warmed-up UMAP when its background preparation has finished, else None (never waits)."""
    fut = _reducer_future(model_name, sha, limit)
    return fut.result() if fut.done() else None


@st.cache_resource(show_spinner=False, max_entries=4)
def _gallery_rows_on_map(model_name: str, sha: str, limit: int | None) -> np.ndarray:
    """Map row of every gallery image (for placing an upload among its nearest known images)."""
    return gallery_map_rows(gallery(model_name, sha, limit).rows, _frame(model_name, sha, limit))


@st.cache_resource(show_spinner="Placing ZooLake images on the map…", max_entries=4)
def _zoolake(model_name: str, sha: str, limit: int | None) -> pd.DataFrame:
    return placed_frame(model_name, "zoolake", limit_per_class=3, map_limit=limit)


# --- helpers ---------------------------------------------------------------------------------------
def _size_choice(model_name: str) -> int | None:
    """Full map or quick sample; the full map is the default once it is cached."""
    return size_choice("nb", map_cached(model_name), "Map", "Full dataset",
                       "The full map embeds every image (minutes on a CPU the first time, then cached).",
                       "The full map has not been computed for this model yet: it embeds every image of the "
                       "dataset and runs UMAP once (several minutes on a CPU), then opens in about a second.",
                       "Build the full map now")


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


#: Above this many (class, colour category) pairs the map falls back to one trace per colour
#: category with the class names as per-point hover text.
MAX_TRACES = 260
PALETTE = qualitative.Dark24 + qualitative.Light24 + qualitative.Alphabet


def _hover_label(text: str) -> str:
    """A label baked into a hovertemplate (Plotly reads ``%{`` as a placeholder)."""
    return str(text).replace("%{", "%\u200b{").replace("<", "&lt;")


def _figure(df: pd.DataFrame, option: str, values: pd.Series, continuous: bool, flagged: np.ndarray,
            extra: pd.DataFrame | None, upload: tuple[np.ndarray, str] | None, revision: str = "map") -> go.Figure:
    """The WebGL scatter, built to be light to send and to draw: float32 coordinates and int32
    row numbers (``customdata``) as Plotly typed arrays, one trace per (class, colour category)
    so that hover labels live in the traces rather than in 30k per-point strings, colour categories
    as legend groups, and no per-property validation. ``upload``: (xy (1, 2), legend name)."""
    idx = df.index.to_numpy(np.int32)
    x, y = df["x"].to_numpy(np.float32), df["y"].to_numpy(np.float32)
    cls_codes, cls_names = pd.factorize(df["class"].astype(str), sort=True)
    base = dict(type="scattergl", mode="markers")
    traces: list[dict] = []
    same = option == "class (true)"

    def points(m: np.ndarray) -> dict:
        return {"x": x[m], "y": y[m], "customdata": idx[m]}

    if continuous:
        v = values.to_numpy(np.float32)
        lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if len(v) else (0.0, 1.0)
        for j, c in enumerate(cls_names):
            m = cls_codes == j
            traces.append({**base, **points(m), "name": str(c), "showlegend": False,
                           "hovertemplate": f"<b>{_hover_label(c)}</b><br>{_hover_label(option)}: %{{marker.color:.3f}}<extra></extra>",
                           "marker": dict(size=4, color=v[m], colorscale="Viridis", cmin=lo, cmax=hi, opacity=0.85,
                                          showscale=j == 0,
                                          colorbar=dict(title=dict(text=option[:28]), thickness=12))})
    else:
        codes, cats = pd.factorize(values.astype(str), sort=True)
        n = len(cats)
        legend = n <= 30
        pair = cls_codes.astype(np.int64) * n + codes
        order = np.argsort(pair, kind="stable")
        keys, starts = np.unique(pair[order], return_index=True)
        if len(keys) <= MAX_TRACES:
            shown: set[int] = set()
            for key, members in zip(keys, np.split(order, starts[1:])):
                j, k = divmod(int(key), n)
                label = f"<b>{_hover_label(cls_names[j])}</b>"
                if not same:
                    label += f"<br>{_hover_label(option)}: {_hover_label(cats[k])}"
                traces.append({**base, "x": x[members], "y": y[members], "customdata": idx[members],
                               "name": str(cats[k]), "legendgroup": str(cats[k]),
                               "showlegend": legend and k not in shown, "hovertemplate": label + "<extra></extra>",
                               "marker": dict(size=4, color=PALETTE[k % len(PALETTE)], opacity=0.85)})
                shown.add(k)
        else:  # many pairs (e.g. predicted class): one trace per category, the true class as hover text
            for k, c in enumerate(cats):
                m = codes == k
                traces.append({**base, **points(m), "name": str(c), "legendgroup": str(c), "showlegend": legend,
                               "text": cls_names.to_numpy()[cls_codes[m]],
                               "hovertemplate": f"<b>%{{text}}</b><br>{_hover_label(option)}: {_hover_label(c)}<extra></extra>",
                               "marker": dict(size=4, color=PALETTE[k % len(PALETTE)], opacity=0.85)})
    if flagged.any():
        traces.append({**base, **points(flagged), "name": "anomaly (above threshold)",
                       "text": cls_names.to_numpy()[cls_codes[flagged]],
                       "hovertemplate": "<b>%{text}</b><br>flagged<extra></extra>",
                       "marker": dict(size=9, color="rgba(0,0,0,0)", line=dict(color=ANOMALY, width=1.5))})
    if extra is not None and len(extra):
        traces.append({**base, "x": extra["x"].to_numpy(np.float32), "y": extra["y"].to_numpy(np.float32),
                       "customdata": -1 - np.arange(len(extra), dtype=np.int32), "name": "ZooLake (placed)",
                       "text": (extra["class"].astype(str) + " (ZooLake)").to_numpy(dtype=str),
                       "hovertemplate": "%{text}<extra></extra>",
                       "marker": dict(size=7, symbol="x", color="#000000", opacity=0.8)})
    if upload is not None:
        xy, name = upload
        traces.append({**base, "x": xy[:, 0], "y": xy[:, 1], "name": name, "hovertemplate": f"{name}<extra></extra>",
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
            im = thumbnail(r["dataset"], r["relpath"])
            with col:
                if im is not None:
                    st.image(im, width=THUMB)
                st.caption(f"**{md_text(r[g.levels[-1]])}**  \nd = {r['distance']:.3f}")
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
        up = _placed_upload(model_name, sha, limit, df)
        if up is None:
            return
        if "error" in up:
            st.error(md_text(f"{name}: {up['error']}"))
            return
        score = float(knn_score(g.index, up["emb"][None], KNN_K)[0])
        left, right = st.columns([1, 3])
        with left:
            st.image(up["display"], caption=md_text(name), width=160)
            _score_line(score, scores_ref)
            if up["how"] == EXACT:
                st.caption("Placed on the map with UMAP `transform` (the yellow star).")
            else:
                st.caption(f"Placed on the map approximately (the yellow star): at the weighted mean position of "
                           f"its nearest known images. The exact UMAP `transform` placement replaces it as soon as "
                           f"UMAP is ready (its first use compiles code, once per server start).")
                _await_exact_placement(model_name, sha, limit)
        with right:
            _neighbour_panel(g, up["emb"], k, None, None, None)
        return
    ds, rel = kind, name
    hit = df.index[(df["dataset"] == ds) & (df["relpath"] == rel)]
    if len(hit) == 0:
        st.warning(f"{md_text(f'{ds}:{rel}')} is not on this map (try the full map, or check the path).")
        return
    row = df.loc[hit[0]]
    emb_all = dataset_embeddings(model_name, sha, limit, g.dataset)
    emb = emb_all[int(hit[0])] if ds == g.dataset else None
    if emb is None:
        st.warning("Neighbours are shown for images of the model's own dataset only.")
        return
    gid = g.rows.index[(g.rows["relpath"] == rel)]
    exclude = int(gid[0]) if len(gid) else None
    left, right = st.columns([1, 3])
    with left:
        im = thumbnail(ds, rel)
        if im is not None:
            st.image(im, caption=md_text(rel.rsplit("/", 1)[-1]), width=160)
        st.markdown(f"**{md_text(row['class'])}**  \n{row['split']} split" + (" · held-out class" if row["heldout"] else ""))
        st.caption(f"Model predicts **{md_text(row['pred_class'])}** ({row['pred_conf_class']:.0%})")
        _score_line(float(row["knn_score"]), scores_ref)
        st.page_link("pages/classify.py", label="Explain this image", icon=":material/biotech:",
                     query_params={"image": f"{ds}:{rel}"})
    with right:
        truth = {lvl: row[lvl] for lvl in g.levels}
        pred = {lvl: row[f"pred_{lvl}"] for lvl in g.levels}
        _neighbour_panel(g, emb, k, exclude, truth, pred)
    return


EXACT = "UMAP transform"
QUICK_PLACE = "nearest known images"


def _placed_upload(model_name: str, sha: str, limit: int | None, df: pd.DataFrame) -> dict | None:
    """The uploaded image's embedding, display image and map position, or ``{"error": message}``
    for a file that is not a usable image. Computed once per upload and map.

    The position is UMAP's ``transform`` (``"how": EXACT``) once the fitted UMAP is ready; until
    then (its first use waits for numba compilation, a minute or more on a busy CPU) it is the
    weighted mean position of the image's nearest known images (``"how": QUICK_PLACE``), which
    is where ``transform`` starts from. The exact placement replaces it on a later rerun."""
    data, fid = st.session_state.get("nb_upload_bytes"), st.session_state.get("nb_upload_id")
    if data is None:
        return None
    key = (fid, model_name, sha, limit)
    got = st.session_state.get("nb_upload_placed")
    if not got or got["key"] != key:
        model = open_model(model_name).classifier
        try:
            fg, _, square = load_for_model(data, int(model.preprocessing["size"]), mode="L", max_aspect=MAX_ASPECT,
                                           colour=keeps_colour(model.preprocessing))
        except ImageDecodeError as e:
            got = {"key": key, "error": e.message}
        else:
            emb = compute_embeddings(model, fg[None])[0]
            coords = df[["x", "y"]].to_numpy(np.float32)
            got = {"key": key, "emb": emb, "how": QUICK_PLACE,
                   "xy": quick_place(coords, gallery(model_name, sha, limit), _gallery_rows_on_map(model_name, sha, limit),
                                     emb[None]),
                   "display": np.asarray(fit_square(square, 160, 255).convert("RGB"))}
        st.session_state["nb_upload_placed"] = got
    if "emb" in got and got["how"] != EXACT:
        reducer = _reducer_if_ready(model_name, sha, limit)
        if reducer is not None:
            got = {**got, "xy": place(reducer, got["emb"][None]), "how": EXACT}
            st.session_state["nb_upload_placed"] = got
    return got


@st.fragment(run_every=2)
def _await_exact_placement(model_name: str, sha: str, limit: int | None) -> None:
    """While an upload shows its quick placement, check every 2 s whether UMAP is ready, and
    then rerun the page so the star moves to the exact placement."""
    got = st.session_state.get("nb_upload_placed")
    if got and got.get("how") == QUICK_PLACE and _reducer_future(model_name, sha, limit).done():
        st.rerun()


def _score_line(score: float, ref: np.ndarray) -> None:
    pct = float((ref < score).mean() * 100) if len(ref) else float("nan")
    st.metric(f"kNN distance (k={KNN_K})", f"{score:.3f}", help="Distance to the 10th nearest known image; "
              "higher = less like anything the model was trained on (Sun et al. 2022).")
    st.caption(f"Higher than {pct:.0f}% of validation images.")


# --- page ------------------------------------------------------------------------------------------
def main() -> None:
    picked = model_with_dataset("Neighbourhoods", "Which known organisms does an image sit near? A 2-D UMAP map of "
                                "the model's embeddings, and the nearest images of the training set for any image.", "map")
    if picked is None:
        return
    model, manifest, model_name, sha, dataset = picked

    link = st.query_params.get("image")
    if link and link != st.session_state.get(LINK_KEY):
        st.session_state[LINK_KEY] = link
        parsed = _parse_link(link)
        if parsed is None:
            st.error(f"The link {md_text('?image=' + link, code=True)} is not of the form `?image=<dataset>:<relative path>`.")
        else:
            st.session_state[SEL_KEY] = parsed

    limit = _size_choice(model_name)
    if not map_cached(model_name, limit_per_class=limit):
        run_with_progress("Building the map once…", lambda on_progress: map_frame(model_name, limit, on_progress=on_progress))
    df = _frame(model_name, sha, limit)
    g = gallery(model_name, sha, limit)
    scores = logit_scores(model_name, sha, limit, dataset)
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
            st.warning(md_text(e))

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
                     f"{md_text(dataset + ':' + df['relpath'].iloc[0], code=True)}.")
        else:
            st.session_state[SEL_KEY] = parsed
    if up is not None and st.session_state.get("nb_upload_id") != up.file_id:
        st.session_state["nb_upload_id"] = up.file_id
        st.session_state["nb_upload_bytes"] = up.getvalue()
        st.session_state[SEL_KEY] = ("upload", up.name)

    star = None
    sel = st.session_state.get(SEL_KEY)
    if sel and sel[0] == "upload":  # placed before the map is drawn, so the star shows on it
        up = _placed_upload(model_name, sha, limit, df)
        if up and "xy" in up:
            star = (up["xy"], "your image" + (" (approximate)" if up["how"] != EXACT else ""))
    with p[0]:
        fig = _figure(df, option, values, continuous, flagged, extra, star, revision=f"{sha}-{limit}")
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
    st.error(f"Something went wrong on this page ({type(e).__name__}: {md_text(e)}). The rest of the app still works.")
