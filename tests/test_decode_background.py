"""Decoding that fits each instrument: background level and polarity from the border (any grey
level), the foreground normalised to the model's convention, colour and aspect-ratio notes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data.decode import Background, crop_aspect, estimate_background, load_for_model, to_foreground


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _blob(bg: int, obj: int, shape=(80, 80)) -> np.ndarray:
    a = np.full(shape, bg, np.uint8)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    a[((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1] = obj
    return a


def test_white_and_black_backgrounds_keep_the_plain_inversion():
    a = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    im = Image.fromarray(a)
    assert (to_foreground(im, 255) == 255 - a).all()
    assert (to_foreground(im, 0) == a).all()


def test_mid_grey_bright_field_background_becomes_zero():
    """An IFCB-like bright-field image: grey 180 background, darker organism."""
    a = _blob(180, 60)
    bg = estimate_background(Image.fromarray(a))
    assert bg == Background(180, "dark-on-light")
    fg, dec, _ = load_for_model(_png(a), 64)
    assert fg[0, 0] == 0 and fg[:2].max() == 0  # background → 0, not a grey veil
    assert fg[32, 32] == round((180 - 60) * 255 / 180)
    assert any("background grey level 180" in n for n in dec.notes)
    # a grey-110 background with a lighter organism (below 128, yet not dark-field black)
    b = _blob(110, 230)
    assert estimate_background(Image.fromarray(b)) == Background(110, "light-on-dark")
    fg2, _, _ = load_for_model(_png(b), 64)
    assert fg2[0, 0] == 0 and fg2[32, 32] == round((230 - 110) * 255 / 145)


def test_polarity_can_be_given_once_for_a_collection():
    a = _blob(200, 120)
    fg, _, _ = load_for_model(_png(a), 64, background=Background(200, "dark-on-light"))
    assert fg[0, 0] == 0 and fg[32, 32] > 90


def test_extreme_aspect_ratio_keeps_the_organism_visible():
    chain = np.full((20, 600), 255, np.uint8)  # a 30:1 chain, dark on white
    chain[6:14, 20:580] = 40
    fg_whole, _, _ = load_for_model(_png(chain), 64)
    fg, dec, square = load_for_model(_png(chain), 64, max_aspect=4.0)
    thick_whole = int((fg_whole[:, 32] > 0).sum())
    thick = int((fg[:, 32] > 0).sum())
    assert thick_whole <= 2 and thick >= 3 * thick_whole and thick >= 6  # 8/20 of the short side survives
    assert any("extreme aspect ratio 30:1" in n for n in dec.notes)
    assert square.size == (64, 64)
    im, note = crop_aspect(Image.fromarray(_blob(255, 0, (40, 60))), Background.of(255), 4.0)
    assert note is None and im.size == (60, 40)


def test_colour_to_grey_is_noted():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[10:30, 10:30] = (10, 200, 30)
    _, dec, _ = load_for_model(_png(rgb), 32)
    assert "colour converted to grey" in dec.notes
    grey = np.stack([_blob(255, 0, (40, 40))] * 3, -1)
    _, dec2, _ = load_for_model(_png(grey), 32)
    assert "colour converted to grey" not in dec2.notes
