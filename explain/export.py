"""Rendering for explanations: colour overlays of maps on images, a PNG panel and a JSON record.

Colormaps are colour-blind safe: perceptually uniform sequential maps (viridis, cividis, magma)
for unsigned maps, ColorBrewer's red–blue diverging map for signed ones (red = evidence for).
"""
from __future__ import annotations

import functools
import io
import json
from datetime import datetime, timezone

import numpy as np
from PIL import Image

SEQUENTIAL_CMAPS = ("viridis", "cividis", "magma")
DIVERGING_CMAP = "RdBu_r"


def normalise_map(attr: np.ndarray, signed: bool, percentile: float = 99.0) -> np.ndarray:
    """Scale to [0, 1] (unsigned) or [-1, 1] (signed) by the ``percentile`` of |attr|, clipped."""
    a = np.nan_to_num(np.asarray(attr, dtype=np.float32))
    if not signed:
        a = np.clip(a, 0, None) if a.min() >= 0 else np.abs(a)
    scale = float(np.percentile(np.abs(a), percentile)) or float(np.abs(a).max()) or 1.0
    return np.clip(a / scale, -1.0 if signed else 0.0, 1.0)


LUT_SIZE = 256  # matplotlib's default colormap resolution


@functools.lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """The (256, 3) float RGB table of a matplotlib colormap. Importing matplotlib costs about
    0.3 s at a server's start, on the way to the first saliency map, so the tables are kept in
    the cache folder after their first use and read from there (a 3 KB file)."""
    from data.paths import cache_dir, writer_temp

    path = cache_dir() / "colormaps" / f"{name}-{LUT_SIZE}.npy"
    try:
        lut = np.load(path, allow_pickle=False)
        if lut.shape == (LUT_SIZE, 3) and np.isfinite(lut).all():
            return lut
    except (OSError, ValueError, EOFError):
        pass
    from matplotlib import colormaps

    lut = np.asarray(colormaps[name].resampled(LUT_SIZE)(np.arange(LUT_SIZE))[:, :3], dtype=np.float64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = writer_temp(path)
        np.save(tmp, lut)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the import next time
    return lut


def colorize(attr: np.ndarray, signed: bool, cmap: str = "viridis") -> np.ndarray:
    """uint8 RGB (H, W, 3) rendering of a map; signed maps use the diverging map centred on 0.
    Same colours as matplotlib's ``colormaps[cmap](x)`` (its 256-entry table, floor indexing)."""
    n = normalise_map(attr, signed)
    x = (n + 1) / 2 if signed else n
    lut = colormap_lut(DIVERGING_CMAP if signed else cmap)
    idx = np.clip((x * LUT_SIZE).astype(np.int64), 0, LUT_SIZE - 1)
    return (lut[idx] * 255).astype(np.uint8)


def _resize_map(attr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height)."""
    a = np.asarray(attr, dtype=np.float32)
    if a.shape[::-1] == tuple(size):
        return a
    return np.asarray(Image.fromarray(a, mode="F").resize(size, Image.Resampling.BILINEAR))


def overlay(image: Image.Image | np.ndarray, attr: np.ndarray, alpha: float = 0.5, signed: bool = False,
            cmap: str = "viridis") -> np.ndarray:
    """The map, coloured and resized to the image, alpha-blended over the image (uint8 RGB).

    The blend is weighted by the map's strength, so weak attributions leave the image visible;
    ``alpha`` = 0 shows the image alone, 1 the strongest attributions in full colour.
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    a = _resize_map(attr, (w, h))
    col = colorize(a, signed, cmap).astype(np.float32)
    strength = np.abs(normalise_map(a, signed))[..., None]
    weight = float(np.clip(alpha, 0, 1)) * (0.35 + 0.65 * strength)
    return (img.astype(np.float32) * (1 - weight) + col * weight).round().clip(0, 255).astype(np.uint8)


def upscale(image: Image.Image, size: int = 256) -> Image.Image:
    """A larger copy of a small square image for display (nearest-free, bicubic)."""
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def panel_png(image: Image.Image, maps: list[tuple[str, np.ndarray]], title: str,
              prediction: dict, ground_truth: dict | None = None, notes: list[str] | None = None, dpi: int = 150) -> bytes:
    """A slide-ready PNG: the image, the overlays (title, uint8 RGB) side by side, and the
    top-3 per level below; ``prediction`` is ``Prediction.to_dict()``."""
    from matplotlib.figure import Figure

    n = 1 + len(maps)
    levels = list(prediction["top_k"])
    fig = Figure(figsize=(2.6 * max(n, len(levels)), 5.6), dpi=dpi, layout="constrained")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.35, 1])
    axes = top.subplots(1, max(n, len(levels)))
    axes = np.atleast_1d(axes)
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(np.asarray(image.convert("RGB")))
    axes[0].set_title("image", fontsize=9)
    for ax, (name, rgb) in zip(axes[1:], maps):
        ax.imshow(rgb)
        ax.set_title(name, fontsize=9)
    bars = np.atleast_1d(bottom.subplots(1, len(levels)))
    for ax, lvl in zip(bars, levels):
        items = prediction["top_k"][lvl][:3][::-1]
        names = [i["name"][:22] for i in items]
        probs = [i["probability"] for i in items]
        truth = (ground_truth or {}).get(lvl)
        top = prediction["path"][lvl]
        colors = ["#E69F00" if nm == truth else "#0072B2" if nm == top else "#B8C4CE" for nm in (i["name"] for i in items)]
        ax.barh(names, probs, color=colors)
        ax.set_xlim(0, 1)
        flag = " ⚠" if lvl in prediction.get("contradictions", {}) else ""
        ax.set_title(f"{lvl}{flag}", fontsize=9)
        ax.tick_params(labelsize=7)
    notes = ["bars: blue = predicted, orange = ground truth, grey = runners-up"] + list(notes or [])
    bottom.supxlabel("\n".join(notes), fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def explanation_json(record: dict) -> str:
    """A JSON document of predictions and scores, stamped with the time (numpy values made plain)."""
    def plain(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record},
                      indent=2, default=plain, ensure_ascii=False)
