"""Text from users and links is shown as text, never rendered as Markdown: ``pages.common.md_text``
(unit tests, and a round trip through Streamlit's own Markdown renderer in Chromium), and the
pages' messages that embed deep-link values, file and class names, collection and model names,
CLIP prompts and reviewer comments (AppTest)."""
from __future__ import annotations

import io
import json
import os
import re
import time

import pytest
from PIL import Image

from tests.conftest import REPO, requires_data, run_streamlit_server, shown, wait_for_app


LINK = "[Click to re-login](https://evil.example)"
HOSTILE = [
    LINK, "![img](https://evil.example/x.png)", "<https://evil.example>", "see https://evil.example/login",
    "HTTP://EVIL.EXAMPLE", "www.evil.example", "mail@evil.example", "**bold** __b__ *i* _i_ ~~s~~",
    "<b>x</b><script>alert(1)</script>", "`code` ``x``", "# heading", "1. list", "2) list", "- item", "+ item",
    "> quote", "---", "===", "| a | b |", "$x^2$ and $$y$$", "&amp; &#60; &lt;", ":smile: :material/home: :red[red]",
    ":green-badge[ok] :small[s]{x=1}", "back\\slash\\", "[x]: https://evil.example", "a-_b_", "line one\nline two",
    "ndsb:train/acantharia_protist/1.jpg", "x{#id} %{y} 100%",
]


def _strip_code(md: str) -> str:
    return re.sub(r"(?<![\\`])(`+).+?(?<!`)\1(?!`)", "", md)


def assert_literal(body: str, text: str) -> None:
    """``body`` (a Markdown body as Streamlit gets it) shows ``text`` literally, with no live link."""
    assert text.replace("\r\n", "\n") in shown(body), (text, body)
    outside = _strip_code(body)
    assert not re.search(r"(?<!\\)[\[\]<>]", outside), body  # no link, image, autolink or HTML
    assert "://" not in outside and not re.search(r"(?i)www\.|@\w", outside), body  # no bare URL or e-mail


# --- the helper ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", HOSTILE)
def test_md_text_escapes_everything_and_round_trips(text):
    from pages.common import md_text

    md = md_text(text)
    assert shown(md) == text  # what the user typed is what is shown
    bare = re.sub(r"\\[!-/:-@\[-`{-~]", "", md)
    assert not re.search(r"[!-/:-@\[-`{-~]", bare), md  # every punctuation character is escaped
    assert_literal(md, text)


@pytest.mark.parametrize("text", ["?image=ndsb:a`b.jpg", "``x``", "`", " a ", "https://evil.example", ":material/home:",
                                  "a\n\nb"])
def test_md_text_code_spans(text):
    from pages.common import md_text

    md = md_text(text, code=True)
    assert re.fullmatch(r"(`+).+(?<!`)\1", md), md
    assert shown(md) == re.sub(r"\s", " ", text)


def test_md_text_of_an_exception_and_of_none():
    from pages.common import md_text

    assert shown(md_text(ValueError(f"bad {LINK}"))) == f"bad {LINK}"
    assert md_text(None) == "None" and md_text("", code=True) == ""


def test_md_text_in_chromium(tmp_path, browser):
    """The round trip through Streamlit's real Markdown renderer: every hostile text shown in an
    error box, a markdown block, a caption and a code span reads back as typed, with no link,
    image, emphasis, heading, list or icon."""
    (tmp_path / "cases.json").write_text(json.dumps(HOSTILE))
    (tmp_path / "show.py").write_text(f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import streamlit as st
from pages.common import md_text
for i, text in enumerate(json.load(open("cases.json"))):
    st.error(f"E{{i}}: " + md_text(text))
    st.markdown(f"M{{i}}: " + md_text(text))
    st.caption(f"C{{i}}: " + md_text(text))
    st.warning(f"K{{i}}: " + md_text(text, code=True))
""")
    with run_streamlit_server("streamlit-md-text.log", script=str(tmp_path / "show.py")) as url:
        pg = browser.new_page()
        pg.goto(url, timeout=120_000)
        wait_for_app(pg, 120_000)
        pg.locator("[data-testid='stMarkdownContainer']", has_text=f"K{len(HOSTILE) - 1}:").wait_for(timeout=60_000)
        # Poll: an element can be re-rendered (empty for a moment) while the page settles.
        deadline, seen = time.monotonic() + 60, {}
        while True:
            got = pg.evaluate("""() => [...document.querySelectorAll(
                "[data-testid='stMarkdownContainer'], [data-testid='stCaptionContainer']")].map(e => [
                e.innerText, e.querySelectorAll("a, img, strong, em, del, h1, h2, h3, h4, h5, h6, ul, ol, li, blockquote, hr, "
                + "table, b, script, .katex, [role=img], [class*=Colored], [class*=Badge]").length,
                e.querySelectorAll("code").length])""")
            seen = {}
            for text, markup, code in got:
                if m := re.match(r"([EMCK])(\d+): ", text):
                    seen[m.group(1), int(m.group(2))] = (text[m.end():].replace("\u2060", ""), markup, code)
            if len(seen) == 4 * len(HOSTILE) or time.monotonic() > deadline:
                break
            pg.wait_for_timeout(500)
        pg.close()
    missing = sorted({(k, i) for k in "EMCK" for i in range(len(HOSTILE))} - set(seen))
    assert not missing, (missing, [g[0][:80] for g in got if not re.match(r"[EMCK]\d+: ", g[0])])
    for (kind, i), (text, markup, code) in seen.items():
        typed = HOSTILE[i]
        want = re.sub(r"\s+", " ", typed).strip() if kind == "K" else typed
        got_text = re.sub(r"\s+", " ", text).strip() if kind == "K" else text
        assert (got_text, markup, code) == (want, 0, kind == "K"), (kind, typed)


# --- pages -----------------------------------------------------------------------------------------
def _app(page: str, query: dict | None = None, at=None, collection: str | None = None):
    """AppTest of app.py opened on ``page`` (``at``: an open session, to rerun with new query params;
    ``collection``: the sidebar's collection of a new session)."""
    from streamlit.testing.v1 import AppTest

    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    if at is None:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
        if collection:
            at.session_state["collection"] = collection
        at.run()
    if query:
        at.query_params.update(query)
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _bodies(at, *kinds: str) -> list[str]:
    return [str(e.value) for k in kinds for e in getattr(at, k)]


def _one_with(at, kinds: tuple[str, ...], text: str) -> str:
    """The only body among ``kinds`` that shows ``text``; it shows it literally."""
    hits = [b for b in _bodies(at, *kinds) if text in shown(b)]
    assert len(hits) == 1, (text, _bodies(at, *kinds))
    assert_literal(hits[0], text)
    return hits[0]


@requires_data
def test_classify_deep_links_show_their_values_as_text():
    at = None
    for link, shows in [(f"ndsb:{LINK}", LINK),  # no such image
                        ("ndsb:train/**bold**<b>x</b>.jpg", "train/**bold**<b>x</b>.jpg"),  # missing file
                        (f"{LINK}:x.jpg", "[Click to re-login](https"),  # no such dataset
                        ("**bold**<b>x</b>", "?image=**bold**<b>x</b>")]:  # not <dataset>:<path>
        at = _app("pages/classify.py", {"image": link}, at)
        _one_with(at, ("error",), shows)
        assert at.header, "the page keeps explaining a gallery image"


def _png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 200).save(buf, "PNG")
    return buf.getvalue()


@requires_data
def test_classify_upload_names_are_text():
    at = _app("pages/classify.py")
    at.radio(key="source").set_value("Upload images").run()
    bad, good = f"{LINK} **x**.png", "<b>good</b> [y](https://evil.example).png"
    at.file_uploader(key="uploads").set_value([(bad, b"not an image", "image/png"), (good, _png(), "image/png")]).run()
    assert not at.exception, [e.value for e in at.exception]
    _one_with(at, ("error",), bad)
    assert_literal(at.header[0].value, good)
    captions = [c for im in at.get("image") for c in im.captions]
    assert_literal(next(c for c in captions if good in shown(c)), good)


@pytest.fixture
def hostile_collection(tmp_path, monkeypatch, ndsb_bytes):
    """A collection named ``x-_y_`` (emphasis in Markdown) of two class folders whose names, and
    their files', are Markdown and HTML; yields (collection, class names, file names)."""
    from data.collections import add_collection

    monkeypatch.setenv("PLANKTON_LENS_DATA", str(tmp_path / "user"))
    classes = ["[Click](https:evil.example) _c_", "<i>two `t` :red[r] &amp;"]
    names = [f"**b{i}** <img src=x onerror=alert({i})>.jpg" for i in range(2)]
    for k, cls in enumerate(classes):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            (tmp_path / "images" / cls / name).write_bytes(ndsb_bytes[2 * k + i])
    add_collection("x-_y_", tmp_path / "images")
    yield "x-_y_", classes, names


@requires_data
def test_collection_class_and_file_names_are_text(hostile_collection):
    coll, classes, names = hostile_collection
    at = _app("pages/home.py")
    labels = [m.label for m in at.metric if coll in shown(m.label)]
    assert len(labels) == 1, [m.label for m in at.metric]
    assert_literal(labels[0], coll)
    at.session_state["collection"] = coll
    at = _app("pages/classify.py", at=at)
    assert not at.error, [e.value for e in at.error]
    assert_literal(next(m for m in _bodies(at, "markdown") if shown(m) == f"**{coll}**"), coll)
    # the first gallery image is explained: its file name, class and link are shown as text
    name = shown(at.header[0].value)
    assert name in names
    assert_literal(at.header[0].value, name)
    truth = next(m for m in _bodies(at, "markdown") if m.startswith("#### ") and shown(m)[5:] in classes)
    cls = shown(truth)[5:]
    assert_literal(truth, cls)
    assert any(f"?image={coll}:{cls}/{name}" in shown(c) for c in _bodies(at, "caption"))
    for c in _bodies(at, "caption", "markdown", "info", "warning"):
        assert not re.search(r"(?<!\\)\]\(", _strip_code(c)), c
    for c in [c for im in at.get("image") for c in im.captions]:
        assert not re.search(r"(?<!\\)[\[\]<>]", _strip_code(c)), c
    # the gallery: each thumbnail's Explain tooltip ("<class> · <path>") and caption (its class, shortened)
    helps = [b.help for b in at.get("button") if b.help and " · " in shown(b.help)]
    assert helps
    for h in helps:
        cls = next(c for c in classes if shown(h).startswith(f"{c} · {c}/"))
        assert shown(h)[len(f"{cls} · {cls}/"):] in names
        assert_literal(h, shown(h))
        short = next(c for c in _bodies(at, "caption") if shown(c) == cls[:13] + "…")
        assert_literal(short, cls[:13] + "…")


@requires_data
def test_home_form_errors_show_the_typed_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANKTON_LENS_DATA", str(tmp_path / "user"))
    monkeypatch.setenv("PLANKTON_LENS_ROOTS", str(tmp_path))
    at = _app("pages/home.py")
    at.text_input(key="col_name").set_value(LINK)
    at.text_input(key="col_path").set_value(str(tmp_path))
    next(b for b in at.get("button") if getattr(b, "label", "") == "Add collection").click().run()
    assert not at.exception, [e.value for e in at.exception]
    _one_with(at, ("error",), repr(LINK))

    at.text_input(key="add_name").set_value(LINK)
    at.text_input(key="add_path").set_value(str(tmp_path))
    next(b for b in at.get("button") if getattr(b, "label", "") == "Add model").click().run()
    assert not at.exception, [e.value for e in at.exception]
    _one_with(at, ("error",), repr(LINK))


@requires_data
def test_broken_zoo_entry_name_is_text(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANKTON_LENS_ZOO", str(tmp_path))
    name = "[Click](https:evil.example) **b**"
    (tmp_path / f"{name}.json").write_text("{ not json")
    at = _app("pages/home.py")
    _one_with(at, ("warning",), repr(name))


@requires_data
def test_clip_link_and_prompt_are_text():
    from models.zoo import model_names

    if "ndsb-clip" not in model_names(kind="clip"):
        pytest.skip("no ndsb-clip model in the zoo")
    at = _app("pages/clip.py", {"image": f"ndsb:{LINK}"})
    _one_with(at, ("error",), LINK)
    at = _app("pages/clip.py", {"image": "**bold**<b>x</b>"}, at)
    _one_with(at, ("error",), "?image=**bold**<b>x</b>")

    prompt = f"**spiny** <b>x</b> {LINK} :red[y] $z$"
    at.text_input(key="clip_prompt").set_value(prompt).run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c for im in at.get("image") for c in im.captions if prompt in shown(c)]
    assert len(captions) == 1, [c for im in at.get("image") for c in im.captions]
    assert_literal(captions[0], prompt)


@requires_data
def test_neighbourhoods_links_are_text(scored_cruise):
    from models.zoo import default_model_name
    from tests.conftest import scored_map

    scored_map(default_model_name(), scored_cruise)  # the map is there (an earlier test may have rebuilt it)
    at = _app("pages/neighbourhoods.py", {"image": f"{scored_cruise}:{LINK}"}, collection=scored_cruise)
    _one_with(at, ("warning",), f"{scored_cruise}:{LINK}")
    at = _app("pages/neighbourhoods.py", {"image": "**bold**<b>x</b>"}, at)
    _one_with(at, ("error",), "?image=**bold**<b>x</b>")


@requires_data
def test_review_reviewer_and_comment_are_text(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANKTON_LENS_DATA", str(tmp_path / "user"))
    at = _app("pages/review.py")
    if not at.warning or not any(w.value.startswith("**Flagged:**") for w in at.warning):
        pytest.skip("nothing flagged in the quick sample")
    reviewer, comment = f"**Ada** {LINK}", f"<b>looks</b> like _this_ {LINK}"
    at.text_input(key="rv_reviewer").set_value(reviewer)
    at.radio(key="rv_decision").set_value("not_anomaly")
    at.text_area(key="rv_comment").set_value(comment)
    next(b for b in at.get("button") if getattr(b, "label", "") == "Record decision").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "comment" in d.value.columns)
    assert (table["reviewer"].iloc[0], table["comment"].iloc[0]) == (reviewer, comment)  # a table cell: plain text


@requires_data
def test_hostile_deep_link_in_chromium(streamlit_server, browser):
    """The deep link of the report, in a real browser: its value is shown, as text, and nothing
    on the page links to the outside site."""
    from urllib.parse import quote

    from tests.test_browser_console import open_and_record

    pg, problems = open_and_record(browser, f"{streamlit_server}/classify?image={quote('ndsb:' + LINK)}")
    try:
        alert = pg.locator("[data-testid='stAlert']", has_text="Click to re-login").first
        alert.wait_for(timeout=120_000)
        assert LINK in alert.inner_text().replace("\u2060", "")
        assert pg.locator("a[href*='evil']").count() == 0 and alert.locator("a").count() == 0
    finally:
        pg.context.close()
    assert not problems, problems
