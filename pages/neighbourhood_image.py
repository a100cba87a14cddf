"""The selected image on the Neighbourhoods page: its scores against the model's thresholds and its
nearest known images (the model's training images); an upload embedded by the model and placed on
the collection's map. Text from users (paths, file names, class names) is shown with :func:`pages.common.md_text`.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import streamlit as st

from data.decode import keeps_colour
from data.folders import UNLABELLED
from explain.embeddings import compute_embeddings
from explain.neighbours import KNN_K, Gallery, knn_score, neighbour_table, neighbour_vote
from explain.projection import TableMap, approximate_place, place, sample_index, warm_up
from explain.score import gallery_ids
from pages.common import (COMPUTE_LOCK, ScoredView, collection_annotation, get_sources, md_text, model_dataset_problem,
                          page_fragment, score_label, thumbnail)
from pages.image_picker import UploadError, decode_upload
from pages.state import key

SEL_KEY = key("neighbourhoods", "selected")  # ("image", collection, relpath) or ("upload", file name)
UPLOAD_ID, UPLOAD_BYTES = key("neighbourhoods", "upload_id"), key("neighbourhoods", "upload_bytes")  # the last upload
UPLOAD_PLACED = key("neighbourhoods", "upload_placed")  # its embedding and map position
THUMB = 96
EXACT, APPROX = "UMAP transform", "nearest collection images"


@st.cache_resource(show_spinner=False, max_entries=4)
def reducer_future(path: str, stamp: int) -> Future:
    """The fitted UMAP, loaded and warmed up (numba compilation of ``transform``) in a background
    thread as soon as the map is shown, so placing an upload is quick."""
    def job():
        import pickle

        with open(path, "rb") as f:
            r = pickle.load(f)
        warm_up(r)
        return r

    return ThreadPoolExecutor(1, thread_name_prefix="umap-warm-up").submit(job)


def reducer(m: TableMap) -> Future:
    """:func:`reducer_future` of a map (keyed by its reducer file, so a rebuilt map reloads)."""
    return reducer_future(str(m.reducer_path), m.reducer_path.stat().st_mtime_ns)


@st.cache_resource(show_spinner=False, max_entries=4)
def sample_index_of(folder: str, key: str, _scored, _m: TableMap):
    """FAISS index of the fitted images (approximate placement of uploads)."""
    return sample_index(_scored, _m)


@st.cache_resource(show_spinner=False, max_entries=8)
def rows_by_path(folder: str, stamp: int, _table: pd.DataFrame) -> pd.Index:
    """The table's relative paths as an index (path → table position), once per table."""
    return pd.Index(_table["relpath"].astype(str))


def labelled(t: pd.DataFrame) -> bool:
    """Whether any image of the table has a validated label."""
    return bool((t["class"] != UNLABELLED).any())


def score_columns(view: ScoredView) -> list[str]:
    """The table's score columns with values: the kNN distance first, then the logit scores."""
    t = view.table
    cols = ["knn_score", *[c for c in view.scored.meta.get("score_columns", []) if c != "knn_score"]]
    return [c for c in cols if c in t and t[c].notna().any()]


def threshold(view: ScoredView, col: str, keep: float) -> tuple[float, str]:
    """The threshold of a score column that keeps ``keep`` % of the model's validation images
    (the table's own at its default), and where it comes from."""
    meta_keep = 100 * float(view.scored.meta.get("keep", 0.95))
    if abs(keep - meta_keep) < 1e-9 and col in view.scored.thresholds:
        return float(view.scored.thresholds[col]), f"keeps {keep:g} % of the model's validation images"
    val = view.scored.validation
    if val is not None and col in val and val[col].notna().any():
        return (float(np.nanquantile(val[col].to_numpy(np.float64), keep / 100, method="higher")),
                f"keeps {keep:g} % of the model's validation images")
    v = view.table[col].to_numpy(np.float64)
    return (float(np.nanquantile(v, keep / 100, method="higher")) if np.isfinite(v).any() else float("inf"),
            f"keeps {keep:g} % of {md_text(view.collection)}'s own images (the model has no validation images)")


def neighbour_panel(g: Gallery, emb: np.ndarray, k: int, exclude: int | None, truth: dict | None,
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
    st.markdown(f"**Neighbour vote** over the {len(t)} nearest known images (the model's training images)")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.markdown("**Nearest known images** (distance between L2-normalised embeddings, 0 = identical, 2 = opposite)")
    per_row = 5
    for start in range(0, len(t), per_row):
        cols = st.columns(per_row)
        for col, r in zip(cols, t.iloc[start:start + per_row].to_dict("records")):
            im = thumbnail(r["dataset"], r["relpath"])
            with col:
                if im is not None:
                    st.image(im, width=THUMB)
                st.caption(f"{md_text(r[g.levels[-1]])}  \nd = {r['distance']:.3f}")
                st.page_link("pages/classify.py", label="explain", icon=":material/biotech:",
                             query_params={"image": f"{r['dataset']}:{r['relpath']}"})


def knn_line(view: ScoredView, score: float, keep: float) -> None:
    """The kNN distance with the table's threshold and whether it is flagged."""
    thr, where = threshold(view, "knn_score", keep)
    st.metric(f"kNN distance (k={KNN_K})", f"{score:.3f}",
              help="Distance to the 10th nearest known image (L2-normalised embeddings): higher = less like "
                   "anything the model was trained on (Sun et al. 2022).")
    verdict = "**flagged**: above" if score > thr else "not flagged: at or below"
    st.caption(f"{verdict} the threshold {thr:.3f}, which {where}.")


def scores_table(view: ScoredView, row: pd.Series, keep: float) -> None:
    """Every score of the image with its threshold and verdict."""
    out, where = [], ""
    for c in score_columns(view):
        v = row.get(c)
        if v is None or not np.isfinite(v):
            continue
        thr, where = threshold(view, c, keep)
        out.append({"score": score_label(c, view.levels), "value": round(float(v), 4), "threshold": round(thr, 4),
                    "flagged": "yes" if float(v) > thr else "no"})
    if out:
        with st.expander("Every score of this image"):
            st.caption(f"Higher = more anomalous. Each threshold {where}; an image above it is flagged.")
            st.dataframe(pd.DataFrame(out), hide_index=True, width="stretch")


def image_panel(view: ScoredView, g: Gallery | None, r: int, k: int, keep: float) -> None:
    """An image of the collection (table row ``r``): the image, label, prediction, scores and neighbours
    (its embedding from the table; a gallery image is not its own neighbour)."""
    t = view.table
    row = t.loc[r]
    leaf = view.levels[-1]
    left, right = st.columns([1, 3])
    with left:
        im = thumbnail(row["dataset"], row["relpath"], 160)
        if im is not None:
            st.image(im, width=160)
        has_label = row["class"] != UNLABELLED
        note = None if has_label else collection_annotation(row["dataset"], row["relpath"])
        where = f"{view.collection}:{row['relpath']}"
        st.markdown(f"{md_text(where, code=True)}  \n"
                    + (f"label **{md_text(row['class'])}**" if has_label else
                       "no validated label" + (f" · {md_text(note)}" if note else ""))
                    + f"  \n{row['split']} split")
        if not row["readable"]:
            st.warning("This file could not be read as an image, so it has no scores.")
            return
        st.caption(f"Model predicts **{md_text(row[f'pred_{leaf}'])}** ({row[f'pred_conf_{leaf}']:.0%})")
        if np.isfinite(row.get("knn_score", np.nan)):
            knn_line(view, float(row["knn_score"]), keep)
        st.page_link("pages/classify.py", label="Explain this image", icon=":material/biotech:",
                     query_params={"image": f"{row['dataset']}:{row['relpath']}"})
        scores_table(view, row, keep)
    with right:
        if g is None:
            st.warning(model_dataset_problem(view.lm, "compare with") or "This model has no known images to compare with.")
            return
        emb = np.asarray(view.scored.embeddings[r], np.float32)
        own = int(gallery_ids(g, t.loc[[r]])[0])
        truth = {lvl: row[lvl] for lvl in view.levels if lvl in row} if has_label else None
        pred = {lvl: row[f"pred_{lvl}"] for lvl in view.levels}
        neighbour_panel(g, emb, k, own if own >= 0 else None, truth, pred)


def _upload_name() -> str:
    sel = st.session_state.get(SEL_KEY)
    return str(sel[1]) if sel and sel[0] == "upload" else "upload"


def upload(view: ScoredView, m: TableMap | None) -> dict | None:
    """The upload's embedding, display image and map position (``how``: :data:`EXACT` once the
    fitted UMAP is ready, else :data:`APPROX`, at its nearest fitted collection images), or
    ``{"error": Markdown}`` for a file that is not an image. Embedded once per upload and model."""
    data, fid = st.session_state.get(UPLOAD_BYTES), st.session_state.get(UPLOAD_ID)
    if data is None:
        return None
    key = (fid, view.lm.key, str(view.scored.folder), m.key if m else None)
    got = st.session_state.get(UPLOAD_PLACED)
    if not got or got["key"] != key:
        model = view.lm.classifier
        try:
            img = decode_upload(_upload_name(), data, int(model.preprocessing["size"]), keeps_colour(model.preprocessing),
                                display_px=160)
        except UploadError as e:
            got = {"key": key, "error": e.markdown}
        else:
            with COMPUTE_LOCK:
                emb = compute_embeddings(model, img.fg[None])[0]
            got = {"key": key, "emb": emb, "how": None, "xy": None, "display": np.asarray(img.display)}
            if m is not None:
                index = sample_index_of(str(view.scored.folder), m.key, view.scored, m)
                got.update(how=APPROX, xy=approximate_place(m, index, emb[None]))
        st.session_state[UPLOAD_PLACED] = got
    if m is not None and "emb" in got and got["how"] == APPROX and reducer(m).done():
        got = {**got, "xy": place(reducer(m).result(), got["emb"][None]), "how": EXACT}
        st.session_state[UPLOAD_PLACED] = got
    return got


@page_fragment("neighbourhoods", run_every=2.0)
def await_exact_placement(path: str, stamp: int) -> None:
    """While an upload shows its approximate placement, check every 2 s whether UMAP is ready,
    and then rerun the page so the star moves to the exact placement."""
    got = st.session_state.get(UPLOAD_PLACED)
    if got and got.get("how") == APPROX and reducer_future(path, stamp).done():
        st.rerun()


def upload_panel(view: ScoredView, g: Gallery | None, m: TableMap | None, name: str, k: int, keep: float) -> None:
    """An uploaded image: where it is placed, its kNN distance and its neighbours."""
    up = upload(view, m)
    if up is None:
        return
    if "error" in up:
        st.error(up["error"], icon=":material/broken_image:")
        return
    left, right = st.columns([1, 3])
    with left:
        st.image(up["display"], width=160)
        st.markdown(f"Uploaded: {md_text(name, code=True)}")
        if g is not None:
            knn_line(view, float(knn_score(g.index, up["emb"][None], KNN_K, vectors=g.vectors)[0]), keep)
        if up["how"] == EXACT:
            st.caption("Placed on the map with UMAP `transform` (the yellow star).")
        elif up["how"] == APPROX:
            st.caption(f"Placed on the map approximately (the yellow star): at the weighted mean position of its "
                       f"nearest images of {md_text(view.collection)}. The exact UMAP `transform` placement replaces it as soon "
                       "as UMAP is ready (its first use compiles code, once per server start).")
            await_exact_placement(str(m.reducer_path), m.reducer_path.stat().st_mtime_ns)
    with right:
        if g is None:
            st.warning(model_dataset_problem(view.lm, "compare with") or "This model has no known images to compare with.")
        else:
            neighbour_panel(g, up["emb"], k, None, None, None)


def selected_panel(view: ScoredView, g: Gallery | None, m: TableMap | None, keep: float) -> None:
    """The chosen image (map point, path, deep link or upload): the image, its scores, its neighbours."""
    sel = st.session_state.get(SEL_KEY)
    k = st.slider("Neighbours shown", 5, 30, 10, step=5, key="nb_k")
    if not sel:
        st.info("Click a point on the map (or give an image path / upload an image above) to see its nearest known images.")
        return
    if sel[0] == "upload":
        upload_panel(view, g, m, sel[1], k, keep)
        return
    _, ds, rel = sel
    if ds != view.collection:
        link = md_text(f"{ds}:{rel}", code=True)
        st.warning(f"{link} is an image of {md_text(ds)}, not of {md_text(view.collection)}: choose {md_text(ds)} under "
                   "Images in the sidebar." if ds in get_sources() else
                   f"{link}: there is no collection {md_text(ds)} here (known: {md_text(', '.join(get_sources()))}).")
        return
    stamp = (view.scored.folder / "meta.json").stat().st_mtime_ns
    pos = rows_by_path(str(view.scored.folder), stamp, view.table).get_indexer([rel])[0]
    if pos < 0:
        st.warning(f"There is no image {md_text(f'{ds}:{rel}', code=True)} in {md_text(view.collection)}.")
        return
    image_panel(view, g, int(view.table.index[pos]), k, keep)
