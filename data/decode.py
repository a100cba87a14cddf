"""One image-decoding path for training, batch work and dashboard uploads.

``decode_image`` turns raw bytes into an 8-bit PIL image in the requested mode, handling EXIF
orientation, 16-bit, CMYK, palette and alpha images, and refusing what cannot be read sensibly
with one typed error, :class:`ImageDecodeError`, whose message a biologist can act on.
``fit_square`` then makes the fixed-size model input (aspect kept, padded with the background).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest image accepted, in pixels (a 2,832 px ZooLake image is 8 Mpx; 40 Mpx leaves room).
MAX_PIXELS = 40_000_000
#: Largest file accepted, in bytes.
MAX_BYTES = 100 * 1024 * 1024


class ImageDecodeError(ValueError):
    """An input that is not a usable image. ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit, mode "L" or "RGB"
    original_size: tuple[int, int]  # (width, height) as stored in the file
    source_mode: str  # PIL mode of the file before conversion
    notes: tuple[str, ...] = ()  # conversions applied, e.g. "16-bit scaled to 8-bit"


def _to_8bit(im: Image.Image) -> tuple[Image.Image, str]:
    """Scale a 16/32-bit or float single-channel image to 8 bits by its bit depth."""
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), "L"), "float image scaled to 8-bit"
    arr = arr.astype(np.int64)
    top = int(arr.max(initial=0))
    depth = 8
    for bits in (8, 10, 12, 14, 16, 32):
        if top < 2**bits:
            depth = bits
            break
    out = np.clip(arr, 0, None) * 255 // (2**depth - 1)
    return Image.fromarray(out.astype(np.uint8), "L"), f"{depth}-bit image scaled to 8-bit"


def decode_image(data: bytes, mode: str = "L", background: int = 255) -> DecodedImage:
    """Decode image bytes to an 8-bit image in ``mode`` ("L" or "RGB").

    ``background`` (0–255) is what transparent pixels are composited onto: white for
    shadowgraph (NDSB), black for dark-field (ZooLake).
    Raises :class:`ImageDecodeError` for empty, truncated, corrupt, non-image, oversized
    (decompression bomb) and multi-frame inputs.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', not {mode!r}")
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty", "The file is empty (0 bytes): nothing to classify.")
    if len(data) > MAX_BYTES:
        raise ImageDecodeError("too_large", f"The file is {len(data) / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not_image", "This file is not an image that can be read (expected PNG, JPEG, TIFF or BMP)."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("too_many_pixels", "The image has too many pixels to be read safely.") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
        raise ImageDecodeError("corrupt", f"The image file is damaged and cannot be read ({type(e).__name__}).") from None

    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(
            "too_many_pixels",
            f"The image is {w}×{h} pixels ({w * h / 1e6:.0f} Mpx); images above {MAX_PIXELS / 1e6:.0f} Mpx are refused "
            "(plankton crops are usually under 1 Mpx).",
        )
    if w == 0 or h == 0:
        raise ImageDecodeError("corrupt", "The image has no pixels.")
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ImageDecodeError(
            "multi_frame", f"The file holds {frames} frames (a stack or animation); upload a single image."
        )
    source_mode = im.mode
    notes: list[str] = []
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
    except OSError as e:
        text = str(e).lower()
        if "truncated" in text or "premature" in text:
            raise ImageDecodeError("truncated", "The image file is truncated (incomplete download or copy?).") from None
        raise ImageDecodeError("corrupt", f"The image file is damaged and cannot be read ({e}).") from None
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError("corrupt", f"The image file is damaged and cannot be read ({type(e).__name__}).") from None

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im, note = _to_8bit(im)
        notes.append(note)
    if im.mode == "CMYK":
        im = im.convert("RGB")
        notes.append("CMYK converted to RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
        notes.append("transparency flattened onto the background")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        try:
            im = im.convert("RGB")
        except Exception:  # noqa: BLE001
            raise ImageDecodeError("unsupported", f"Unsupported image mode {source_mode!r}.") from None
    if im.mode != mode:
        im = im.convert(mode)
    return DecodedImage(im, (w, h), source_mode, tuple(notes))


def fit_square(im: Image.Image, size: int, background: int = 255) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept) and pad to a centred square."""
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = im.resize((nw, nh), Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.BICUBIC)
    fill = background if im.mode == "L" else (background,) * 3
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def estimate_background(im: Image.Image) -> int:
    """Background grey level from the image border: ~255 for shadowgraph, ~0 for dark-field."""
    a = np.asarray(im.convert("L"), dtype=np.uint8)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return 255 if float(np.median(border)) >= 128 else 0


def to_foreground(square: Image.Image, background: int) -> np.ndarray:
    """uint8 grayscale array where 0 is background and 255 the strongest signal."""
    a = np.asarray(square.convert("L"), dtype=np.uint8)
    return (255 - a) if background >= 128 else a.copy()


def load_for_model(
    data: bytes, size: int, mode: str = "L", background: int | None = None
) -> tuple[np.ndarray, DecodedImage, Image.Image]:
    """Decode bytes into the model's input: a ``size``×``size`` uint8 foreground array
    (0 = background, see :func:`to_foreground`), plus the decode info and the padded square
    image in its original polarity (for display and overlays).

    ``background`` is the dataset's background (255 shadowgraph, 0 dark-field); None
    estimates it from the image border, as for an upload of unknown origin.
    """
    dec = decode_image(data, mode=mode, background=255 if background is None else background)
    bg = estimate_background(dec.image) if background is None else background
    square = fit_square(dec.image, size, bg)
    return to_foreground(square, bg), dec, square
