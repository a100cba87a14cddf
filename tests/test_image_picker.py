"""The image picker's plain functions (pages.image_picker): deep-link parsing and validation, and
upload decoding, with real images of the shipped NDSB sample and broken, foreign and hostile inputs.
No Streamlit run is needed."""
from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from pages import state
from pages.image_picker import (MAX_LINK_CHARS, ImageLink, PickedImage, UploadError, decode_upload, link_problem,
                                malformed_link_message, parse_link)
from tests.conftest import REPO, shown

SAMPLE = REPO / "data" / "sample" / "ndsb_sample.zip"
HOSTILE_LINK = "[Click to re-login](https://evil.example)"


@pytest.fixture(scope="module")
def sample() -> dict[str, bytes]:
    """A few real images of the shipped sample, by relative path."""
    with zipfile.ZipFile(SAMPLE) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".jpg")][:: 200][:5]
        return {n: z.read(n) for n in names}


def _collections(sample: dict[str, bytes]):
    known = {"ndsb": set(sample)}
    return list(known), lambda c, r: r in known[c]


# --- deep links ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    ("ndsb:train/copepod/1.jpg", ("ndsb", "train/copepod/1.jpg")),
    ("  ndsb:train/a b.jpg \n", ("ndsb", "train/a b.jpg")),  # surrounding blanks ignored
    ("ndsb:a:b.jpg", ("ndsb", "a:b.jpg")),  # only the first colon separates
    ("x-_y_:[x](https://evil.example)", ("x-_y_", "[x](https://evil.example)")),  # parsed; the collection checks it
])
def test_parse_link(value, want):
    link = parse_link(value)
    assert link == ImageLink(*want) and link.value == ":".join(want)


@pytest.mark.parametrize("value", [None, "", "garbage", ":", "ndsb:", ":a.jpg", "   ", 42, b"ndsb:a.jpg",
                                   "ndsb:" + "a" * MAX_LINK_CHARS])
def test_parse_link_refuses(value):
    assert parse_link(value) is None


def test_link_problem_accepts_a_real_image(sample):
    names, has = _collections(sample)
    rel = next(iter(sample))
    assert link_problem(f"ndsb:{rel}", names, has) is None


@pytest.mark.parametrize("value, shows, says", [
    ("garbage", "?image=garbage", "is not of the form"),
    ("**bold**<b>x</b>", "?image=**bold**<b>x</b>", "is not of the form"),
    (f"ndsb:{HOSTILE_LINK}", HOSTILE_LINK, "there is no image at that path"),
    ("ndsb:../../etc/passwd", "../../etc/passwd", "there is no image at that path"),
    ("ndsb:train/**bold**<b>x</b>.jpg", "train/**bold**<b>x</b>.jpg", "there is no image at that path"),
    (f"{HOSTILE_LINK}:x.jpg", "[Click to re-login](https", "not available here"),
    ("zoolake:a.jpg", "'zoolake'", "not available here (known: ndsb)"),
])
def test_link_problem_messages_show_the_value_as_text(sample, value, shows, says):
    from tests.test_user_text import assert_literal

    names, has = _collections(sample)
    problem = link_problem(value, names, has)
    assert problem and says in shown(problem)
    assert_literal(problem, shows)


def test_link_problem_asks_only_about_known_collections():
    asked = []
    problem = link_problem("other:a.jpg", ["ndsb"], lambda c, r: asked.append((c, r)) or True)
    assert problem and asked == []
    assert "known: none" in shown(link_problem("ndsb:a.jpg", [], lambda c, r: True))


def test_a_very_long_link_is_shown_cut():
    value = "x" * (MAX_LINK_CHARS + 10)
    msg = malformed_link_message(value)
    assert len(msg) < 400 and "…" in msg
    assert link_problem(value, ["ndsb"], lambda c, r: True) == msg


# --- uploads --------------------------------------------------------------------------------------
def test_decode_upload_of_real_images(sample):
    for rel, data in sample.items():
        img = decode_upload(rel.rsplit("/", 1)[-1], data, 64, display_px=128)
        assert isinstance(img, PickedImage)
        assert img.fg.shape == (64, 64) and img.fg.dtype == np.uint8
        assert img.display.size == (128, 128) and img.display.mode == "RGB"
        assert img.collection is None and img.link is None and img.truth is None
        assert img.label == img.name == rel.rsplit("/", 1)[-1]
        assert re.fullmatch(r"[0-9a-f]{16}", img.key)
    # the same bytes give the same key; a different image another one
    a, b = list(sample.values())[:2]
    assert decode_upload("a", a, 64).key == decode_upload("again", a, 64).key != decode_upload("b", b, 64).key


def test_decode_upload_in_colour_and_other_formats(sample):
    data = next(iter(sample.values()))
    im = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    assert decode_upload("c.png", buf.getvalue(), 32, colour=True).fg.shape == (32, 32, 3)
    buf = io.BytesIO()
    im.convert("CMYK").save(buf, "JPEG")
    assert any("CMYK" in n for n in decode_upload("cmyk.jpg", buf.getvalue(), 32).notes)


@pytest.mark.parametrize("name, data, says", [
    ("empty.png", b"", "empty"),
    ("broken.png", b"not a PNG at all" * 10, "This file is not an image"),
    ("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, ""),
    ("notes.csv", b"sample,count\ncopepod,3\n", "This file is not an image"),
    (f"{HOSTILE_LINK} **x**.png", b"<html><script>alert(1)</script></html>", "This file is not an image"),
])
def test_decode_upload_refuses_broken_and_foreign_files(name, data, says):
    from tests.test_user_text import assert_literal

    with pytest.raises(UploadError) as e:
        decode_upload(name, data, 64)
    err = e.value
    assert err.name == name and says in err.message
    assert_literal(err.markdown, name)  # the file name is shown as text
    assert shown(err.markdown).startswith(f"**{name}**: ")


def test_decode_upload_of_a_truncated_real_image(sample):
    data = next(iter(sample.values()))
    with pytest.raises(UploadError):
        decode_upload("half.jpg", data[: len(data) // 2], 64)


def test_an_unexpected_decoder_error_is_still_a_bad_upload(monkeypatch):
    import pages.image_picker as picker

    def boom(*a, **k):
        raise MemoryError("decoder")

    monkeypatch.setattr(picker, "load_for_model", boom)
    with pytest.raises(UploadError) as e:
        decode_upload("x.png", b"x", 64)
    assert shown(e.value.markdown) == "**x.png** could not be read as an image (MemoryError)."


def test_a_collection_image_links_to_itself():
    img = PickedImage("k", np.zeros((2, 2), np.uint8), Image.new("RGB", (2, 2)), collection="ndsb",
                      relpath="train/a/1.jpg", truth="a")
    assert img.link == img.label == "ndsb:train/a/1.jpg" and img.name == "1.jpg"


# --- session-state names ---------------------------------------------------------------------------
def test_state_keys():
    assert state.key("classify", "selected") == "classify_selected"
    assert state.key("neighbourhoods", "selected") == "nb_selected"
    assert state.key("review", "reviewer") == "rv_reviewer"
    with pytest.raises(ValueError):
        state.key("clip", "")
    k = state.CLASSIFY_PICKER
    assert (k.source, k.uploads, k.upload_pick, k.pick, k.selected, k.link) == (
        "source", "uploads", "upload_pick", "pick", "classify_selected", "classify_last_link")
    assert state.CLIP_PICKER.uploads == "clip_upload" and state.CLIP_PICKER.source == "clip_source"
    keys = [state.MODEL, state.COLLECTION, *vars(state.CLASSIFY_PICKER).values(), *vars(state.CLIP_PICKER).values()]
    assert len(set(keys)) == len(keys)  # no two pages share a key
