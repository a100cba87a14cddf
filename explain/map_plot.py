"""The Neighbourhoods map as a Plotly figure, light to send and to draw at any collection size.

Up to :data:`SCATTER_MAX` images the map is a WebGL scatter (float32 coordinates and int32 table
rows as typed arrays, one trace per (label, colour category) so hover labels live in the traces).
Above it, the browser would stall, so the map is drawn server-side as a density image (a 2-D
histogram as a heatmap, or the mean of a score per cell); a box (or a click) on it picks a region,
whose points (at most :data:`REGION_MAX`, a seeded sample beyond) are then drawn as a scatter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

#: Above this many points the whole map is drawn as a density image.
SCATTER_MAX = 200_000
#: At most this many points of a zoomed region are drawn (a seeded random sample beyond).
REGION_MAX = 50_000
#: Cells per side of the density image.
DENSITY_BINS = 256
#: Cells per side of the (invisible) grid of clickable points over the density image.
PICK_BINS = 64
#: At most this many anomaly rings over a density image (the highest-scoring ones).
RING_MAX = 2_000
#: Above this many (label, colour category) pairs the scatter falls back to one trace per colour
#: category with the labels as per-point hover text.
MAX_TRACES = 260
PALETTE = qualitative.Dark24 + qualitative.Light24 + qualitative.Alphabet
ANOMALY = "#D55E00"
FLAGGED = "anomaly (above threshold)"

Region = tuple[float, float, float, float]  # x0, x1, y0, y1


@dataclass
class Mark:
    """One highlighted position: the selected image (a ring) or an upload (a star)."""

    x: float
    y: float
    name: str
    symbol: str = "star"
    colour: str = "#F0E442"
    size: int = 18
    row: int = -1  # its table row (-1: not a table image)


@dataclass
class MapFigure:
    """A drawn map: the figure, ``kind`` ("scatter" or "density"), the points drawn as markers and
    the points in view (the whole map or the region)."""

    figure: go.Figure
    kind: str
    drawn: int
    total: int


def hover_label(text: object) -> str:
    """Text baked into a hovertemplate or a legend name (Plotly reads ``%{`` as a placeholder and
    ``<`` as markup)."""
    return str(text).replace("%{", "%\u200b{").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def view_range(x: np.ndarray, y: np.ndarray, pad: float = 0.06) -> Region:
    """The central 99 % of the points, padded (a few far outliers would squash the map)."""
    out = []
    for v in (x, y):
        v = v[np.isfinite(v)]
        lo, hi = (np.percentile(v, [0.5, 99.5]) if len(v) else (0.0, 1.0))
        p = pad * ((hi - lo) or 1.0)
        out += [float(lo - p), float(hi + p)]
    return out[0], out[1], out[2], out[3]


def with_marks(view: Region, marks, pad: float = 0.04) -> Region:
    """``view`` widened to show every mark (an upload placed off the central 99 % stays visible)."""
    x0, x1, y0, y1 = view
    for mk in marks:
        if np.isfinite(mk.x) and np.isfinite(mk.y):
            px, py = pad * (x1 - x0), pad * (y1 - y0)
            x0, x1 = min(x0, mk.x - px), max(x1, mk.x + px)
            y0, y1 = min(y0, mk.y - py), max(y1, mk.y + py)
    return x0, x1, y0, y1


def in_region(x: np.ndarray, y: np.ndarray, region: Region) -> np.ndarray:
    x0, x1, y0, y1 = region
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def region_from_selection(selection: dict, full: Region, window: float = 0.125) -> Region | None:
    """The region a density-image selection picks: a box, a lasso's bounding box, or a window
    (``window`` of the map's span) around a clicked point; None when nothing was picked."""
    for kind in ("box", "lasso"):
        for shape in selection.get(kind) or []:
            xs, ys = [float(v) for v in shape.get("x") or []], [float(v) for v in shape.get("y") or []]
            if xs and ys and max(xs) > min(xs) and max(ys) > min(ys):
                return min(xs), max(xs), min(ys), max(ys)
    pts = [p for p in selection.get("points") or [] if "x" in p and "y" in p]
    if len(pts) == 1:
        hx, hy = window * (full[1] - full[0]) / 2, window * (full[3] - full[2]) / 2
        px, py = float(pts[0]["x"]), float(pts[0]["y"])
        return px - hx, px + hx, py - hy, py + hy
    if len(pts) > 1:
        xs, ys = [float(p["x"]) for p in pts], [float(p["y"]) for p in pts]
        if max(xs) > min(xs) and max(ys) > min(ys):
            return min(xs), max(xs), min(ys), max(ys)
    return None


def map_figure(pts: pd.DataFrame, colour: pd.Series, option: str, continuous: bool, flagged: np.ndarray,
               marks: list[Mark] | tuple = (), region: Region | None = None, revision: str = "map",
               seed: int = 0, colour_in_hover: bool = True, flag_scores: np.ndarray | None = None) -> MapFigure:
    """The map of ``pts`` (index: table rows; columns ``x``, ``y``, ``label``: the hover name)
    coloured by ``colour`` (aligned with ``pts``; categories, or numbers when ``continuous``),
    ``flagged`` points circled, ``marks`` on top. A scatter up to :data:`SCATTER_MAX` points or in
    a ``region``; a density image of the whole map above. ``colour_in_hover``: False when the
    colour categories are the labels themselves (then the hover shows the label only);
    ``flag_scores`` (aligned with ``pts``) picks the rings a density image keeps (the highest)."""
    flagged = np.asarray(flagged, bool)
    if region is not None:
        m = in_region(pts["x"].to_numpy(), pts["y"].to_numpy(), region)
        total = int(m.sum())
        pick = np.flatnonzero(m)
        if len(pick) > REGION_MAX:
            pick = np.sort(np.random.default_rng(seed).choice(pick, size=REGION_MAX, replace=False))
        fig = _scatter(pts.iloc[pick], colour.iloc[pick], option, continuous, flagged[pick], marks, revision, region,
                       colour_in_hover)
        return MapFigure(fig, "scatter", len(pick), total)
    if len(pts) > SCATTER_MAX:
        fig, drawn = _density(pts, colour, option, continuous, flagged, marks, revision, seed, flag_scores)
        return MapFigure(fig, "density", drawn, len(pts))
    x, y = pts["x"].to_numpy(np.float32), pts["y"].to_numpy(np.float32)
    fig = _scatter(pts, colour, option, continuous, flagged, marks, revision, with_marks(view_range(x, y), marks),
                   colour_in_hover)
    return MapFigure(fig, "scatter", len(pts), len(pts))


# --- the two drawings -------------------------------------------------------------------------------
_BASE = dict(type="scattergl", mode="markers")


def _layout(revision: str, view: Region, dragmode: str) -> dict:
    return dict(height=620, margin=dict(l=10, r=10, t=10, b=10), dragmode=dragmode, uirevision=revision,
                legend=dict(orientation="h", yanchor="top", y=-0.01, x=0, itemsizing="constant", font=dict(size=11)),
                xaxis=dict(visible=False, range=[view[0], view[1]]), yaxis=dict(visible=False, range=[view[2], view[3]]))


def _mark_traces(marks, idx_dtype=np.int32) -> list[dict]:
    out = []
    for mk in marks:
        if not (np.isfinite(mk.x) and np.isfinite(mk.y)):
            continue
        line = dict(color="black", width=1.5 if mk.symbol == "star" else 2.5)
        out.append({**_BASE, "x": np.array([mk.x], np.float32), "y": np.array([mk.y], np.float32),
                    "customdata": np.array([mk.row], idx_dtype), "name": mk.name,
                    "hovertemplate": f"{hover_label(mk.name)}<extra></extra>",
                    "marker": dict(size=mk.size, symbol=mk.symbol, color=mk.colour, line=line)})
    return out


def _scatter(pts: pd.DataFrame, colour: pd.Series, option: str, continuous: bool, flagged: np.ndarray, marks,
             revision: str, view: Region, colour_in_hover: bool = True) -> go.Figure:
    """The WebGL scatter: float32 coordinates and int32 table rows (``customdata``) as typed arrays,
    one trace per (label, colour category), colour categories as legend groups, no per-property
    validation."""
    idx = pts.index.to_numpy(np.int32)
    x, y = pts["x"].to_numpy(np.float32), pts["y"].to_numpy(np.float32)
    lab_codes, lab_names = pd.factorize(pts["label"].astype(str), sort=True)
    lab_names = np.asarray(lab_names, dtype=object)
    traces: list[dict] = []
    opt = hover_label(option)

    def points(m: np.ndarray) -> dict:
        return {"x": x[m], "y": y[m], "customdata": idx[m]}

    if continuous:
        v = colour.to_numpy(np.float32)
        fin = v[np.isfinite(v)]
        lo, hi = (float(fin.min()), float(fin.max())) if len(fin) else (0.0, 1.0)
        for j, c in enumerate(lab_names):
            m = lab_codes == j
            traces.append({**_BASE, **points(m), "name": hover_label(c), "showlegend": False,
                           "hovertemplate": f"<b>{hover_label(c)}</b><br>{opt}: %{{marker.color:.3f}}<extra></extra>",
                           "marker": dict(size=4, color=v[m], colorscale="Viridis", cmin=lo, cmax=hi, opacity=0.85,
                                          showscale=j == 0, colorbar=dict(title=dict(text=opt[:28]), thickness=12))})
    else:
        codes, cats = pd.factorize(colour.astype(str), sort=True)
        n = max(len(cats), 1)
        legend = len(cats) <= 30
        pair = lab_codes.astype(np.int64) * n + codes
        order = np.argsort(pair, kind="stable")
        keys, starts = np.unique(pair[order], return_index=True)
        if len(keys) <= MAX_TRACES:
            shown: set[int] = set()
            for key, members in zip(keys, np.split(order, starts[1:])):
                j, k = divmod(int(key), n)
                label = f"<b>{hover_label(lab_names[j])}</b>"
                if colour_in_hover:
                    label += f"<br>{opt}: {hover_label(cats[k])}"
                traces.append({**_BASE, "x": x[members], "y": y[members], "customdata": idx[members],
                               "name": hover_label(cats[k]), "legendgroup": str(cats[k]),
                               "showlegend": legend and k not in shown, "hovertemplate": label + "<extra></extra>",
                               "marker": dict(size=4, color=PALETTE[k % len(PALETTE)], opacity=0.85)})
                shown.add(k)
        else:  # many pairs: one trace per category, the label as per-point hover text
            for k, c in enumerate(cats):
                m = codes == k
                traces.append({**_BASE, **points(m), "name": hover_label(c), "legendgroup": str(c), "showlegend": legend,
                               "text": lab_names[lab_codes[m]].astype(str),
                               "hovertemplate": f"<b>%{{text}}</b><br>{opt}: {hover_label(c)}<extra></extra>",
                               "marker": dict(size=4, color=PALETTE[k % len(PALETTE)], opacity=0.85)})
    if flagged.any():
        traces.append(_rings(x[flagged], y[flagged], idx[flagged], lab_names[lab_codes[flagged]], FLAGGED))
    traces += _mark_traces(marks)
    return go.Figure(data=traces, layout=_layout(revision, view, "pan"), _validate=False)


def _rings(x: np.ndarray, y: np.ndarray, idx: np.ndarray, text: np.ndarray, name: str, size: int = 9) -> dict:
    return {**_BASE, "x": x, "y": y, "customdata": idx, "name": name, "text": np.asarray(text).astype(str),
            "hovertemplate": "<b>%{text}</b><br>flagged<extra></extra>",
            "marker": dict(size=size, color="rgba(0,0,0,0)", line=dict(color=ANOMALY, width=1.5))}


def grid_counts(x: np.ndarray, y: np.ndarray, bins: int, rng: list[list[float]],
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.histogram2d(x, y, bins, range=rng, weights=weights)`` on equal bins, by one
    ``bincount`` of the cell index (a million points: 15 ms instead of 370 ms; the
    right edge belongs to the last bin, points outside the range are left out, as there)."""
    (x0, x1), (y0, y1) = rng
    xe, ye = np.linspace(x0, x1, bins + 1), np.linspace(y0, y1, bins + 1)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    ix = np.minimum(((x[inside] - x0) * (bins / max(x1 - x0, 1e-300))).astype(np.int64), bins - 1)
    iy = np.minimum(((y[inside] - y0) * (bins / max(y1 - y0, 1e-300))).astype(np.int64), bins - 1)
    w = None if weights is None else weights[inside]
    counts = np.bincount(ix * bins + iy, weights=w, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    return counts, xe, ye


def _density(pts: pd.DataFrame, colour: pd.Series, option: str, continuous: bool, flagged: np.ndarray, marks,
             revision: str, seed: int, flag_scores: np.ndarray | None = None) -> tuple[go.Figure, int]:
    """The density image: images per cell (log colour scale), or the mean of a score per cell; an
    invisible grid of clickable points (select a box, or click, to zoom in); anomaly rings (at most
    :data:`RING_MAX`); the marks. Returns the figure and the markers drawn."""
    x, y = pts["x"].to_numpy(np.float64), pts["y"].to_numpy(np.float64)
    view = view_range(x, y)
    rng = [[view[0], view[1]], [view[2], view[3]]]
    counts, xe, ye = grid_counts(x, y, DENSITY_BINS, rng)
    counts = counts.T  # rows: y
    xc, yc = ((xe[:-1] + xe[1:]) / 2).astype(np.float32), ((ye[:-1] + ye[1:]) / 2).astype(np.float32)
    empty = counts == 0
    opt = hover_label(option)
    if continuous:
        v = colour.to_numpy(np.float64)
        ok = np.isfinite(v)
        sums, _, _ = grid_counts(x[ok], y[ok], DENSITY_BINS, rng, weights=v[ok])
        n_ok, _, _ = grid_counts(x[ok], y[ok], DENSITY_BINS, rng)
        z = np.where(n_ok.T > 0, sums.T / np.maximum(n_ok.T, 1), np.nan).astype(np.float32)
        heat = dict(colorscale="Viridis", colorbar=dict(title=dict(text=f"mean {opt}"[:28]), thickness=12),
                    hovertemplate=f"%{{customdata:,}} images<br>mean {opt}: %{{z:.3f}}<extra></extra>")
    else:
        z = np.where(empty, np.nan, np.log10(1 + counts)).astype(np.float32)
        top = int(np.ceil(np.log10(1 + max(counts.max(), 1))))
        ticks = [10 ** i for i in range(top + 1)]
        heat = dict(colorscale="Blues", reversescale=True, colorbar=dict(title=dict(text="images per cell"), thickness=12,
                                                        tickvals=[float(np.log10(1 + t)) for t in ticks],
                                                        ticktext=[f"{t:,}" for t in ticks]),
                    hovertemplate="%{customdata:,} images<extra></extra>")
    traces: list[dict] = [{"type": "heatmap", "x": xc, "y": yc, "z": z, "customdata": counts.astype(np.int32),
                           "zsmooth": False, "name": "images (density)", "showscale": True, **heat}]
    pc, pxe, pye = grid_counts(x, y, PICK_BINS, rng)
    gy, gx = np.nonzero(pc.T)
    pxc, pyc = (pxe[:-1] + pxe[1:]) / 2, (pye[:-1] + pye[1:]) / 2
    traces.append({**_BASE, "x": pxc[gx].astype(np.float32), "y": pyc[gy].astype(np.float32),
                   "customdata": np.full(len(gx), -1, np.int32), "name": "zoom in here", "showlegend": False,
                   "hovertemplate": "click, or drag a box, to draw these images<extra></extra>",
                   "marker": dict(size=10, color="rgba(0,0,0,0)", opacity=0.0)})
    drawn = 0
    fl = np.flatnonzero(flagged)
    if len(fl):
        if len(fl) <= RING_MAX:
            shown, name = fl, FLAGGED
        elif flag_scores is not None:
            top = np.argsort(-np.nan_to_num(np.asarray(flag_scores, np.float64)[fl], nan=-np.inf), kind="stable")
            shown, name = np.sort(fl[top[:RING_MAX]]), f"{FLAGGED}: the {RING_MAX:,} highest of {len(fl):,}"
        else:
            shown = np.sort(np.random.default_rng(seed).choice(fl, RING_MAX, replace=False))
            name = f"{FLAGGED}: {RING_MAX:,} of {len(fl):,}"
        traces.append(_rings(x[shown].astype(np.float32), y[shown].astype(np.float32),
                             pts.index.to_numpy(np.int32)[shown], pts["label"].to_numpy()[shown].astype(str), name, size=7))
        drawn = len(shown)
    traces += _mark_traces(marks)
    return go.Figure(data=traces, layout=_layout(revision, with_marks(view, marks), "select"), _validate=False), drawn
