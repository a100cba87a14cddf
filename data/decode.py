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
    background = Background.of(background).level
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
        if im.mode == "RGB" and mode == "L":
            rgb = np.asarray(im, dtype=np.int16)
            if int(np.abs(rgb - rgb.mean(-1, keepdims=True)).max(initial=0)) > 8:
                notes.append("colour converted to grey")
        im = im.convert(mode)
    return DecodedImage(im, (w, h), source_mode, tuple(notes))


def fit_square(im: Image.Image, size: int, background: "int | Background" = 255) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept) and pad to a centred square."""
    background = Background.of(background).level
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = im.resize((nw, nh), Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.BICUBIC)
    fill = background if im.mode == "L" else (background,) * 3
    canvas = Image.new(im.mode, (size, size), fill)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


@dataclass(frozen=True)
class Background:
    """An image's background: its grey ``level`` (0–255) and whether organisms are darker
    ("dark-on-light", shadowgraph and bright-field) or lighter ("light-on-dark", dark-field)."""

    level: int
    polarity: str

    @classmethod
    def of(cls, value: "Background | int") -> "Background":
        """A dataset's fixed background (255 shadowgraph, 0 dark-field) as a Background."""
        if isinstance(value, Background):
            return value
        v = int(value)
        return cls(v, "dark-on-light" if v >= 128 else "light-on-dark")


#: Grey levels an object pixel must differ from the background by to count for the polarity.
OBJECT_CONTRAST = 24


def estimate_background(im: Image.Image) -> Background:
    """The background from the image border (its median grey level, any level: white
    shadowgraph, mid-grey bright-field, black dark-field) and the polarity from the pixels that
    differ from it: organisms darker or lighter than the background, by their summed contrast."""
    a = np.asarray(im.convert("L"), dtype=np.int16)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    level = int(np.median(border))
    d = a - level
    darker = float(np.clip(-d - OBJECT_CONTRAST, 0, None).sum())
    lighter = float(np.clip(d - OBJECT_CONTRAST, 0, None).sum())
    if darker == lighter:
        return Background.of(level)
    return Background(level, "dark-on-light" if darker > lighter else "light-on-dark")


def to_foreground(square: Image.Image, background: Background | int) -> np.ndarray:
    """uint8 array where 0 is background and 255 the strongest signal: the contrast to the
    background level, on the organisms' side, stretched to the full range (for a white or black
    background this is the plain inversion or the image itself). Grey (S, S) for an "L" image,
    per channel (S, S, 3) for an "RGB" one (a model that keeps colour)."""
    bg = Background.of(background)
    a = np.asarray(square if square.mode == "RGB" else square.convert("L"), dtype=np.float32)
    if bg.polarity == "dark-on-light":
        out = (bg.level - a) * (255.0 / max(bg.level, 1))
    else:
        out = (a - bg.level) * (255.0 / max(255 - bg.level, 1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: Longest side / shortest side kept for uploads and user collections (``max_aspect``): a 30:1
#: diatom chain fitted whole into 64 px would be 2 px thick.
MAX_ASPECT = 4.0


def crop_aspect(im: Image.Image, background: Background, max_aspect: float) -> tuple[Image.Image, str | None]:
    """For an image more elongated than ``max_aspect``, the window of ``max_aspect`` × its short
    side along the long axis, centred on the organism's mass (and a note); else the image."""
    w, h = im.size
    long_, short = max(w, h), min(w, h)
    if short == 0 or long_ / short <= max_aspect:
        return im, None
    keep = int(round(max_aspect * short))
    fg = to_foreground(im.convert("L"), background).astype(np.float64)
    profile = fg.sum(0 if w > h else 1)
    centre = float((profile * np.arange(len(profile))).sum() / profile.sum()) if profile.sum() > 0 else long_ / 2
    start = int(min(max(0, round(centre - keep / 2)), long_ - keep))
    box = (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)
    return im.crop(box), (f"extreme aspect ratio {long_ / short:.0f}:1: the {max_aspect:.0f}:1 window around the "
                          "organism is shown to the model, so that it is not shrunk to a few pixels")


def keeps_colour(preprocessing: dict, source_mode: str = "RGB") -> bool:
    """Whether a model's input keeps an image's colour: a 3-channel model that asks for it
    (``preprocessing["colour"]``, models imported with ``python -m models add``) reading colour
    images; every other model (and a grey source) gets the grey foreground, replicated to its
    channels by its normalisation."""
    return int(preprocessing.get("channels", 1)) == 3 and bool(preprocessing.get("colour")) and source_mode == "RGB"


def load_for_model(
    data: bytes, size: int, mode: str = "L", background: Background | int | None = None,
    max_aspect: float | None = None, colour: bool = False,
) -> tuple[np.ndarray, DecodedImage, Image.Image]:
    """Decode bytes into the model's input: a ``size``×``size`` uint8 foreground array
    (0 = background, see :func:`to_foreground`), plus the decode info and the padded square
    image in its original polarity (for display and overlays).

    ``background`` is the dataset's background (255 shadowgraph, 0 dark-field, or a
    :class:`Background`); None estimates level and polarity from the image border, as for an
    upload of unknown origin. ``max_aspect`` (uploads, user collections) crops images more
    elongated than that (:func:`crop_aspect`); the datasets the models were trained on pass None.
    ``colour`` (see :func:`keeps_colour`) decodes in colour and gives an (S, S, 3) foreground.
    """
    mode = "RGB" if colour else mode
    dec = decode_image(data, mode=mode, background=255 if background is None else Background.of(background).level)
    if colour:  # the colour is kept: no "converted to grey" note
        dec = DecodedImage(dec.image, dec.original_size, dec.source_mode, tuple(n for n in dec.notes if "to grey" not in n))
    bg = estimate_background(dec.image) if background is None else Background.of(background)
    image = dec.image
    if max_aspect:
        image, note = crop_aspect(image, bg, max_aspect)
        if note:
            dec = DecodedImage(dec.image, dec.original_size, dec.source_mode, (*dec.notes, note))
    if background is None and bg.level not in (0, 255):
        dec = DecodedImage(dec.image, dec.original_size, dec.source_mode,
                           (*dec.notes, f"background grey level {bg.level} ({bg.polarity}) set to 0"))
    square = fit_square(image, size, bg.level)
    return to_foreground(square if colour else square.convert("L"), bg), dec, square
