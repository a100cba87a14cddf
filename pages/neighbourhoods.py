"""Neighbourhoods: where the images of a collection sit among each other and among known organisms.

The page reads the scored table of the sidebar's collection (explain/score.py: every image scored
once, labelled or not) and draws its UMAP map (explain/projection.py: fitted once on a sample,
cached beside the table; explain/map_plot.py: a scatter, or a density image for large
collections). Any image (a map point, a path, a deep link or an upload) shows its scores against
the model's thresholds and its nearest known images, the model's own training images.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import streamlit as st

from data.folders import UNLABELLED
from explain import map_plot
from explain.map_plot import Mark, map_figure, region_from_selection, view_range
from explain.projection import MAP_MIN, TableMap, mappable, read_map, table_map
from explain.score import reference_limit
from pages.common import (ScoredView, current_collection, gallery, get_sources, md_text, page_fragment, run_page,
                          score_label, scored_collection)
from pages.state import key
from pages.image_picker import malformed_link_message, parse_link, upload_widget
from pages.neighbourhood_image import (EXACT, SEL_KEY, UPLOAD_BYTES, UPLOAD_ID, labelled, reducer, rows_by_path,
                                       score_columns, selected_panel, threshold, upload)

LINK_KEY = key("neighbourhoods", "last_link")  # the ?image= value already taken
REGION_KEY = key("neighbourhoods", "region")  # (model key, collection, region) of the zoomed density map
MAP_WAIT_S = 30.0  # the page waits this long for a map being built, then follows it in the background


# --- the map, built once per table in the background ------------------------------------------------
@dataclass
class _Build:
    future: Future
    state: dict = field(default_factory=lambda: {"fraction": 0.0, "message": "Starting…"})


@st.cache_resource(show_spinner=False)
def _executor() -> ThreadPoolExecutor:
    """One map build at a time in this server (two would share the same cores)."""
    return ThreadPoolExecutor(1, thread_name_prefix="umap-map")


@st.cache_resource(show_spinner=False, max_entries=4)
def _map_build(folder: str, stamp: int, _scored) -> _Build:
    """The map of a table (read from its folder, or built there) in the background; shared by sessions."""
    build = _Build(Future())
    got = read_map(_scored)
    if got is not None:  # on disk: no need to queue behind another collection's build
        build.future.set_result(got)
        return build

    def progress(fraction: float, message: str) -> None:
        build.state.update(fraction=fraction, message=message)

    build.future = _executor().submit(table_map, _scored, progress)
    return build


@page_fragment("neighbourhoods", run_every=2.0)
def _follow_build(folder: str, stamp: int, scored) -> None:
    """A progress bar that follows a map build; the page reloads when it is done."""
    b = _map_build(folder, stamp, scored)
    if b.future.done():
        st.rerun()
    st.progress(min(max(b.state["fraction"], 0.0), 1.0), text=b.state["message"])


def _map(view: ScoredView) -> TableMap | None:
    """The collection's map, or None with a message (too few images, being built, failed)."""
    scored = view.scored
    n = len(mappable(scored))
    if n < MAP_MIN:
        st.info(f"{md_text(view.collection)} has {n} readable image{'s' if n != 1 else ''}: too few for a map (it needs "
                f"{MAP_MIN}). Its images still show their scores and nearest known images: give a path below.",
                icon=":material/scatter_plot:")
        return None
    folder = str(scored.folder)
    stamp = (scored.folder / "meta.json").stat().st_mtime_ns
    b = _map_build(folder, stamp, scored)
    if not b.future.done():
        bar = st.progress(0.0, text=b.state["message"])
        t0 = time.time()
        while not b.future.done() and time.time() - t0 < MAP_WAIT_S:
            bar.progress(min(max(b.state["fraction"], 0.0), 1.0), text=b.state["message"])
            time.sleep(0.2)
        bar.empty()
    if not b.future.done():
        st.info(f"The map of {md_text(view.collection)} is being built (once; then it opens at once).",
                icon=":material/hourglass_top:")
        _follow_build(folder, stamp, scored)
        return None
    err = b.future.exception()
    if err is not None:
        logging.getLogger("plankton_lens.neighbourhoods").error("map of %s failed", folder, exc_info=err)
        st.error(f"The map of {md_text(view.collection)} could not be built ({type(err).__name__}: {md_text(err)}).")
        if st.button("Try again", key="nb_map_retry"):
            _map_build.clear()
            st.rerun()
        return None
    return b.future.result()


# --- what the map shows -----------------------------------------------------------------------------
def _colour_options(view: ScoredView) -> dict[str, tuple[str, str]]:
    """Label → (kind, column): predicted levels, true levels (labelled collections only), split,
    held-out class (labelled only) and every score column."""
    t, levels = view.table, view.levels
    out: dict[str, tuple[str, str]] = {}
    if labelled(t):
        out.update({f"{lvl} (true)": ("cat", lvl) for lvl in reversed(levels) if lvl in t})
    out.update({f"{lvl} (predicted)": ("cat", f"pred_{lvl}") for lvl in reversed(levels) if f"pred_{lvl}" in t})
    out["split"] = ("cat", "split")
    if labelled(t):
        out["held-out class"] = ("heldout", "class")
    for c in score_columns(view):
        out[score_label(c, levels)] = ("num", c)
    return out


def _colour_values(view: ScoredView, rows: pd.Index, kind: str, col: str) -> pd.Series:
    """The values of the chosen colour for the table ``rows`` on the map (one column read, not the table)."""
    v = view.table[col].loc[rows]
    if kind == "num":
        return v.astype(np.float32)
    if kind == "heldout":
        known = set(view.lm.classifier.class_names[view.levels[-1]])
        held = set(view.lm.manifest.get("heldout") or [])
        c = v.astype(str)
        out = np.where(c == UNLABELLED, "unlabelled",
                       np.where(~c.isin(known) | c.isin(held), "held out or unknown to the model", "known class"))
        return pd.Series(out, index=rows)
    return v.astype(str)


@st.cache_resource(show_spinner=False, max_entries=4)
def _points(folder: str, key: str, _view: ScoredView, _m: TableMap) -> pd.DataFrame:
    """The images on the map (read-only, once per table and map): x, y and the hover label (the
    true class, else the predicted one)."""
    view, m = _view, _m
    t = view.table
    ok = np.isfinite(m.coords[:, 0])
    rows = t.index[ok]
    leaf = view.levels[-1]
    cls = t.loc[rows, "class"].astype(str)
    pred = t.loc[rows, f"pred_{leaf}"].astype(str)
    label = np.where(cls == UNLABELLED, pred, cls)
    return pd.DataFrame({"x": m.coords[ok, 0], "y": m.coords[ok, 1], "label": label}, index=rows)


# --- page -------------------------------------------------------------------------------------------
def _take_link() -> str | None:
    """A new ``?image=<collection>:<relpath>`` selects that image (and, once, its collection in the
    sidebar); returns an error message for a malformed link."""
    link = st.query_params.get("image")
    if not link or link == st.session_state.get(LINK_KEY):
        return None
    st.session_state[LINK_KEY] = link
    parsed = parse_link(link)
    if parsed is None:
        return malformed_link_message(link)
    st.session_state[SEL_KEY] = ("image", parsed.collection, parsed.relpath)
    coll = parsed.collection
    if coll != current_collection() and coll in get_sources() and st.query_params.get("collection") != coll:
        st.query_params["collection"] = coll  # the sidebar's picker takes it on the rerun
        st.rerun()
    return None


def _take_path(view: ScoredView, path: str) -> None:
    if not path or path == st.session_state.get("nb_last_path"):
        return
    st.session_state["nb_last_path"] = path
    parsed = parse_link(path)
    if parsed is None:
        example = f"{view.collection}:{view.table['relpath'].iloc[0]}" if len(view.table) else f"{view.collection}:a.jpg"
        st.error(f"Write the image as `<collection>:<relative path>`, e.g. {md_text(example, code=True)} "
                 f"(not {md_text(path, code=True)}).")
    else:
        st.session_state[SEL_KEY] = ("image", parsed.collection, parsed.relpath)


def _take_selection(view: ScoredView, event, kind: str, full) -> list[int]:
    """Apply a map selection: on the density image a region to zoom into, else the first picked
    image becomes the selection. Returns the picked table rows."""
    sel = (event or {}).get("selection", {}) if event else {}
    points = sel.get("points", []) or []
    sig = (kind, repr(sel.get("box")), repr(sel.get("lasso")),
           tuple((p.get("curve_number"), p.get("point_index")) for p in points[:50]))
    new = bool(points or sel.get("box") or sel.get("lasso")) and sig != st.session_state.get("nb_last_sel")
    ids = [int(p["customdata"]) for p in points if isinstance(p.get("customdata"), (int, float)) and p["customdata"] >= 0]
    zoom = kind == "density" and (sel.get("box") or sel.get("lasso") or not ids)
    if new:
        st.session_state["nb_last_sel"] = sig
        if zoom:  # a box, a lasso or a click on the density image: draw that region's points
            region = region_from_selection({**sel, "points": [] if ids else points}, full)
            if region is not None:
                st.session_state[REGION_KEY] = (view.lm.key, view.collection, region)
                st.rerun()
        elif ids:
            st.session_state[SEL_KEY] = ("image", view.collection, str(view.table.at[ids[0], "relpath"]))
    return ids


def main() -> None:
    link_error = _take_link()
    view = scored_collection("Neighbourhoods", "Where do the images of a collection sit among each other, and which "
                             "known organisms (the model's training images) is each one nearest to? A 2-D UMAP map "
                             "of the model's embeddings of the collection, and the nearest known images of any image.")
    if view is None:
        return
    if link_error:
        st.error(link_error)
    t, levels = view.table, view.levels
    g = gallery(view.lm.name, view.lm.sha256, reference_limit()) if view.lm.dataset else None
    m = _map(view)

    c = st.columns([2, 2, 1])
    options = _colour_options(view)
    if st.session_state.get("nb_colour") not in options:
        st.session_state.pop("nb_colour", None)
    option = c[0].selectbox("Colour by", list(options), key="nb_colour", disabled=m is None)
    scores = score_columns(view)
    if st.session_state.get("nb_anomaly") not in ["none", *scores]:
        st.session_state.pop("nb_anomaly", None)
    anomaly_by = c[1].selectbox("Circle anomalies by", ["none", *scores], index=1 if scores else 0, key="nb_anomaly",
                                format_func=lambda s: s if s == "none" else score_label(s, levels),
                                help="Images scoring above the threshold are circled in orange.")
    keep = c[2].number_input("Threshold keeps % of validation", 50.0, 99.9,
                             100 * float(view.scored.meta.get("keep", 0.95)), step=0.5, key="nb_tpr",
                             help="Each score's threshold is set so that this share of the model's validation images "
                                  "(known classes) scores at or below it; the default is the scored table's own.")

    p = st.columns([3, 2])
    with p[1]:
        path = st.text_input("Image path", key="nb_path", placeholder=f"{view.collection}:<relative path>",
                             help="An image of the sidebar's collection as <collection>:<relative path>.")
        up = upload_widget("…or upload an image", key="nb_upload")
    _take_path(view, path)
    if up is not None and st.session_state.get(UPLOAD_ID) != up.file_id:
        st.session_state[UPLOAD_ID] = up.file_id
        st.session_state[UPLOAD_BYTES] = up.getvalue()
        st.session_state[SEL_KEY] = ("upload", up.name)

    ids: list[int] = []
    if m is not None:
        ids = _draw(view, m, p, options[option], option, anomaly_by, keep)
    with p[1]:
        if len(ids) > 1:
            label = "class" if labelled(t) else f"pred_{levels[-1]}"
            comp = t.loc[ids, label].value_counts().head(8).rename_axis(label).reset_index(name="images")
            st.markdown(f"**{len(ids)} points selected** — most common {'classes' if label == 'class' else 'predictions'}:")
            st.dataframe(comp, hide_index=True, width="stretch")
        if g is not None:
            st.caption(f"Known images: the model's training images ({len(g):,}"
                       + (f", without {len(view.lm.manifest.get('heldout') or [])} held-out classes"
                          if view.lm.manifest.get("heldout") else "") + ").")
    st.divider()
    selected_panel(view, g, m, keep)
    if m is not None:
        reducer(m)  # start loading UMAP for uploads in the background


def _draw(view: ScoredView, m: TableMap, p, colour: tuple[str, str], option: str, anomaly_by: str, keep: float) -> list[int]:
    """The map (scatter, density image or a zoomed region) with its captions; returns the picked rows."""
    t = view.table
    stamp = f"{m.key}-{view.scored.meta.get('created')}-{m.reducer_path.stat().st_mtime_ns}"
    pts = _points(str(view.scored.folder), stamp, view, m)
    values = _colour_values(view, pts.index, *colour)
    flagged, s = np.zeros(len(pts), bool), None
    note = ""
    if anomaly_by != "none":
        thr, where = threshold(view, anomaly_by, keep)
        s = t.loc[pts.index, anomaly_by].to_numpy(np.float64)
        flagged = s > thr
        note = (f"{int(flagged.sum()):,} of {len(pts):,} images circled: {score_label(anomaly_by, view.levels)} above "
                f"{thr:.3f}, the threshold that {where}.")
    zoom = st.session_state.get(REGION_KEY)
    region = zoom[2] if zoom and zoom[:2] == (view.lm.key, view.collection) and len(pts) > map_plot.SCATTER_MAX else None
    kind = "region" if region else ("density" if len(pts) > map_plot.SCATTER_MAX else "scatter")
    full = view_range(pts["x"].to_numpy(), pts["y"].to_numpy())
    # the map's selection (kept in its widget state) is applied before drawing, so the picked image is ringed at once
    ids = _take_selection(view, st.session_state.get(f"nb_map_{kind}"), kind, full)
    marks = []
    sel = st.session_state.get(SEL_KEY)
    if sel and sel[0] == "image" and sel[1] == view.collection:
        stamp = (view.scored.folder / "meta.json").stat().st_mtime_ns
        pos = rows_by_path(str(view.scored.folder), stamp, t).get_indexer([sel[2]])[0]
        if pos >= 0 and np.isfinite(m.coords[pos, 0]):
            marks.append(Mark(float(m.coords[pos, 0]), float(m.coords[pos, 1]), "selected image", symbol="circle-open",
                              colour="#000000", size=16, row=int(t.index[pos])))
    if sel and sel[0] == "upload":  # placed before the map is drawn, so the star shows on it
        up = upload(view, m)
        if up and up.get("xy") is not None:
            marks.append(Mark(float(up["xy"][0, 0]), float(up["xy"][0, 1]),
                              "your image" + (" (approximate)" if up["how"] != EXACT else "")))
    leaf = view.levels[-1]
    labels_only = option == f"{leaf} (true)" or (option == f"{leaf} (predicted)" and not labelled(t))
    mf = map_figure(pts, values, option, colour[0] == "num", flagged, marks, region,
                    revision=f"{view.lm.key}-{view.collection}-{m.key}", colour_in_hover=not labels_only,
                    flag_scores=s)
    with p[0]:
        st.plotly_chart(mf.figure, key=f"nb_map_{kind}", on_select="rerun", selection_mode=("points", "box", "lasso"),
                        config={"scrollZoom": True, "displaylogo": False})
        placed = f", {m.placed:,} placed with its `transform`" if m.placed > 0 else ""
        st.caption(f"{len(pts):,} images of {md_text(view.collection)}: UMAP fitted on {len(m.fitted):,}{placed}. {note}")
        if mf.kind == "density":
            st.caption(f"More than the {map_plot.SCATTER_MAX:,} points a browser draws smoothly, so the map is a density image"
                       + (f" (colour: the mean {option} per cell)" if colour[0] == "num" else "")
                       + ". Drag a box on it (or click) to draw that region's images.")
        elif region is not None:
            shown = f"a random {mf.drawn:,} of them drawn" if mf.drawn < mf.total else "all drawn"
            st.caption(f"Zoomed into a region: {mf.total:,} images, {shown}.")
            if st.button("Back to the whole map", icon=":material/zoom_out_map:", key="nb_unzoom"):
                st.session_state.pop(REGION_KEY, None)
                st.rerun()
    return ids


run_page(main, "neighbourhoods")
