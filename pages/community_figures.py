"""The Community page's figures (Plotly, no Streamlit) and their export for slides.

Every figure is drawn from an :class:`explain.community.Estimate`. The map draws the groups on
plain longitude / latitude axes (equal distances, no map tiles or files fetched: it works
offline). :func:`figure_bytes` renders a figure to PNG or SVG with kaleido and the local
Chromium, MathJax off and Plotly's own bundled plotly.js (nothing fetched).
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explain.quantify import ESTIMATORS, SHORT

UNKNOWN_COLOUR, OTHER_COLOUR = "#7f7f7f", "#d0d0d0"
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#332288", "#117733",
           "#882255", "#44AA99", "#999933", "#AA4499", "#6699CC"]
EST_COLOUR = dict(zip(ESTIMATORS, ["#7f7f7f", "#0072B2", "#E69F00", "#009E73"]))
LABEL = {"classify_and_count": "classify and count (CC)", "probabilistic_classify_and_count": "probabilistic CC (PCC)",
         "adjusted_classify_and_count": "adjusted CC (ACC)", "em": "EM prior shift"}
TIME_GROUPINGS = ("day", "week")


def top_taxa(est, estimator: str, n: int = 10) -> list[int]:
    """Indices of the ``n`` classes with the largest mean share over groups."""
    s = np.nan_to_num(est.shares[estimator][:, :-1]).mean(0)
    return [int(i) for i in np.argsort(-s, kind="stable")[:n] if s[i] > 0]


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(t=50, l=10, r=10, b=10), legend=dict(orientation="h", y=-0.2),
                      template="plotly_white")
    return fig


def stacked_bars(est, estimator: str, n: int = 10) -> go.Figure:
    """Relative abundance per group: the ``n`` most abundant classes, the rest, and "unknown"."""
    s = est.shares[estimator]
    groups = [str(g) for g in est.grouped.groups["group"]]
    top = top_taxa(est, estimator, n)
    fig = go.Figure()
    for j, i in enumerate(top):
        fig.add_bar(x=groups, y=s[:, i], name=est.taxa[i], marker_color=PALETTE[j % len(PALETTE)])
    rest = np.nan_to_num(s[:, :-1]).sum(1) - np.nan_to_num(s[:, top]).sum(1)
    if (rest > 1e-9).any():
        fig.add_bar(x=groups, y=rest, name="other classes", marker_color=OTHER_COLOUR)
    fig.add_bar(x=groups, y=s[:, -1], name="unknown", marker_color=UNKNOWN_COLOUR)
    fig.update_layout(barmode="stack", yaxis_title="relative abundance", yaxis_tickformat=".0%", xaxis_type="category")
    return _layout(fig, f"Relative abundance per group · {LABEL[estimator]}")


def series(est, estimator: str, n: int = 6) -> go.Figure | None:
    """Time series (grouped by day or week) or depth profile (by depth bin) of the ``n`` most
    abundant classes, each with its bootstrap band; None for other groupings."""
    by = est.grouped.by
    gdf = est.grouped.groups
    if len(gdf) < 2:
        return None
    if by in TIME_GROUPINGS and gdf["time"].notna().any():
        pos, axis = gdf["time"], "time"
    elif by == "depth" and gdf["depth"].notna().any():
        pos, axis = gdf["depth"], "depth"
    else:
        return None
    s, lo, hi = est.shares[estimator], est.low[estimator], est.high[estimator]
    fig = go.Figure()
    for j, i in enumerate(top_taxa(est, estimator, n)):
        c = PALETTE[j % len(PALETTE)]
        if axis == "time":
            if np.isfinite(lo[:, i]).all():
                fig.add_scatter(x=list(pos) + list(pos[::-1]), y=list(hi[:, i]) + list(lo[::-1, i]), fill="toself",
                                line=dict(width=0), fillcolor=c, opacity=0.2, hoverinfo="skip", showlegend=False,
                                legendgroup=est.taxa[i])
            fig.add_scatter(x=pos, y=s[:, i], mode="lines+markers", name=est.taxa[i], line_color=c, legendgroup=est.taxa[i])
        else:
            err = dict(type="data", symmetric=False, array=hi[:, i] - s[:, i], arrayminus=s[:, i] - lo[:, i]) \
                if np.isfinite(lo[:, i]).all() else None
            fig.add_scatter(x=s[:, i], y=pos, mode="lines+markers", name=est.taxa[i], line_color=c, error_x=err)
    if axis == "time":
        fig.update_layout(xaxis_title="time (UTC)", yaxis_title="relative abundance", yaxis_tickformat=".0%")
        return _layout(fig, f"Time series · {LABEL[estimator]} with {est_band(est)}")
    fig.update_layout(yaxis_title="depth (m)", yaxis_autorange="reversed", xaxis_title="relative abundance",
                      xaxis_tickformat=".0%")
    return _layout(fig, f"Depth profile · {LABEL[estimator]} with {est_band(est)}", 520)


def est_band(est) -> str:
    return f"95 % bootstrap bands ({est.n_boot} replicates)" if est.n_boot else "no bands"


def comparison(est, taxon: int) -> go.Figure:
    """One class's relative abundance per group by each estimator, with its band, and the true
    one when the collection is labelled."""
    groups = [str(g) for g in est.grouped.groups["group"]]
    x = np.arange(len(groups), dtype=np.float64)
    fig = go.Figure()
    for j, e in enumerate(ESTIMATORS):
        s, lo, hi = est.shares[e][:, taxon], est.low[e][:, taxon], est.high[e][:, taxon]
        if not np.isfinite(s).any():
            continue
        err = dict(type="data", symmetric=False, array=hi - s, arrayminus=s - lo) if np.isfinite(lo).all() else None
        fig.add_scatter(x=x + (j - 1.5) * 0.15, y=s, mode="markers", name=SHORT[e], marker=dict(color=EST_COLOUR[e], size=8),
                        error_y=err, customdata=groups, hovertemplate="%{customdata}: %{y:.2%}<extra>" + SHORT[e] + "</extra>")
    t = est.true_shares
    if t is not None:
        fig.add_scatter(x=x, y=t[:, taxon], mode="markers", name="true", marker=dict(color="black", symbol="diamond-open",
                                                                                    size=11))
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=groups)
    fig.update_layout(yaxis_title="relative abundance", yaxis_tickformat=".1%")
    return _layout(fig, f"{est.taxa[taxon]}: the four estimates per group with {est_band(est)}")


def threshold_effect(est) -> go.Figure:
    """Per group: images moved to "unknown" by the threshold (and confirmed anomalies), and the
    Bray–Curtis dissimilarity between the community with and without them."""
    groups = [str(g) for g in est.grouped.groups["group"]]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=groups, y=est.moved, name="moved by the threshold", marker_color="#D55E00")
    if est.grouped.anomalies.any():
        fig.add_bar(x=groups, y=est.grouped.anomalies, name="confirmed anomalies (review)", marker_color=UNKNOWN_COLOUR)
    fig.add_scatter(x=groups, y=est.bray_curtis_threshold(), name="Bray–Curtis with / without them", mode="lines+markers",
                    line_color="#0072B2", secondary_y=True)
    fig.update_layout(barmode="stack", xaxis_type="category")
    fig.update_yaxes(title_text="images", secondary_y=False)
    fig.update_yaxes(title_text="Bray–Curtis", range=[0, 1], secondary_y=True)
    return _layout(fig, "The anomaly threshold's effect per group")


def bray_curtis_heatmap(bc) -> go.Figure:
    """The groups × groups Bray–Curtis matrix (a DataFrame)."""
    fig = go.Figure(go.Heatmap(z=bc.to_numpy(), x=list(bc.columns), y=list(bc.index), zmin=0, zmax=1,
                               colorscale="Viridis", colorbar_title="BC"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return _layout(fig, "Bray–Curtis dissimilarity between groups", 460)


def group_map(est, estimator: str, taxon: int) -> go.Figure | None:
    """The groups at their mean position, sized by images and coloured by one class's share, on
    plain longitude / latitude axes (equal distances); None without positions."""
    g = est.grouped.groups
    ok = np.isfinite(g["lat"].to_numpy(np.float64)) & np.isfinite(g["lon"].to_numpy(np.float64))
    if not ok.any():
        return None
    lat, lon = g["lat"].to_numpy(np.float64)[ok], g["lon"].to_numpy(np.float64)[ok]
    n = est.grouped.images[ok]
    share = est.shares[estimator][ok, taxon]
    size = 10 + 30 * np.sqrt(n / max(n.max(), 1))
    fig = go.Figure(go.Scatter(
        x=lon, y=lat, mode="markers", customdata=np.stack([g["group"].to_numpy(object)[ok], n, share], axis=1),
        marker=dict(size=size, color=share, colorscale="Viridis", cmin=0, cmax=max(float(np.nanmax(share)), 1e-9),
                    colorbar=dict(title=est.taxa[taxon][:18], tickformat=".0%"), line=dict(width=1, color="#333")),
        hovertemplate="%{customdata[0]}<br>%{customdata[1]} images<br>share %{customdata[2]:.1%}<extra></extra>"))
    pad = max(0.01, 0.1 * max(float(np.ptp(lat)), float(np.ptp(lon))))
    mid = float(np.mean(lat))
    fig.update_xaxes(title="longitude (°E)", range=[lon.min() - pad, lon.max() + pad], showgrid=True)
    fig.update_yaxes(title="latitude (°N)", range=[lat.min() - pad, lat.max() + pad], scaleanchor="x",
                     scaleratio=1 / max(math.cos(math.radians(mid)), 0.05))
    return _layout(fig, f"Groups by position · size: images · colour: {est.taxa[taxon]} ({SHORT[estimator]})", 520)


# --- export -----------------------------------------------------------------------------------
#: kaleido's page options: no MathJax (it would be fetched from a CDN); plotly.js from the plotly package.
KALEIDO_OPTIONS = {"mathjax": False}


def can_export() -> bool:
    """Whether kaleido and a Chrome / Chromium are here to render PNG and SVG files."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    import os

    return bool(os.environ.get("BROWSER_PATH") or any(shutil.which(b) for b in
                                                        ("chromium", "chromium-browser", "google-chrome", "chrome")))


def figure_bytes(fig: go.Figure, fmt: str, width: int = 1200, height: int | None = None, scale: float = 2.0) -> bytes:
    """``fig`` as a PNG or SVG file (kaleido, local Chromium; nothing fetched)."""
    import kaleido

    h = height or int(fig.layout.height or 500)
    return kaleido.calc_fig_sync(fig.to_dict(), opts=dict(format=fmt, width=width, height=h, scale=scale if fmt == "png" else 1),
                                 kopts=dict(KALEIDO_OPTIONS))
