"""The "CLIP explanations" page: AppTest of its sections and inputs, and a browser check.

A tiny CLIP model is trained here with the real command into a temporary zoo named
``ndsb-clip`` that ``PLANKTON_LENS_ZOO`` puts before models/zoo, so the page is tested
whether or not the real model has been trained.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import (ARTIFACTS, REPO, assert_no_streamlit_errors, explain_with_model, requires_data,
                            requires_full_data, run_streamlit_server, wait_for_app)
from tests.test_clip import train_tiny

pytestmark = requires_data


@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clippage")
    train_tiny(tmp, "ndsb-clip", steps=3)
    zoo = str(tmp / "zoo")
    old = os.environ.get("PLANKTON_LENS_ZOO")
    os.environ["PLANKTON_LENS_ZOO"] = os.pathsep.join([zoo, *([old] if old else [])])
    yield zoo
    if old is None:
        os.environ.pop("PLANKTON_LENS_ZOO", None)
    else:
        os.environ["PLANKTON_LENS_ZOO"] = old


def _app():
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    return at


def _texts(at) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.info] + \
            [e.value for e in at.error] + [e.value for e in at.warning] + [m.label for m in at.metric]
    return "\n".join(str(p) for p in parts)


def test_page_sections_and_inputs(clip_zoo):
    at = _app()
    at.switch_page("pages/clip.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "CLIP explanations"
    assert at.sidebar.selectbox(key="clip_model_name").value == "ndsb-clip"
    text = _texts(at)
    assert "Zero-shot names" in text and "Anomaly score" in text
    assert [t.label for t in at.tabs] == ["Ranked prompts", "Why A rather than B", "Your prompt", "Model & benchmarks"]
    frames = [d.value for d in at.dataframe]
    ranked = next(f for f in frames if "prompt" in f.columns and "kind" in f.columns)
    assert len(ranked) == 15 and (ranked["similarity"].diff().dropna() <= 0).all()
    zero = next(f for f in frames if "probability" in f.columns)
    assert len(zero) == 5

    # Only non-living prompts.
    at.multiselect(key="clip_kinds").set_value(["non-living"]).run()
    ranked = next(d.value for d in at.dataframe if "kind" in d.value.columns)
    assert set(ranked["kind"]) == {"non-living"}

    # A typed prompt: score, rank, saliency; an empty one gives a message, not an error.
    at.text_input(key="clip_prompt").set_value("a long thin transparent worm").run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert "similarity" in labels and "rank among the prompt bank" in labels
    # Every saliency method the registry offers for this tower, on the similarity to the prompt.
    from explain.saliency import list_methods

    assert at.radio(key="clip_sal_method").options == [m.label for m in list_methods()]  # a convolutional tower: all
    for m in list_methods():
        at.radio(key="clip_sal_method").set_value(m.name).run()
        assert not at.exception, (m.name, [e.value for e in at.exception])
        assert any(c.startswith(f"{m.label} for “") for im in at.get("image") for c in im.captions), m.name
    at.text_input(key="clip_prompt").set_value("   ").run()
    assert not at.exception and any("Type a prompt" in i.value for i in at.info)

    # Why A rather than B with two chosen classes, then the same class twice.
    a = next(s for s in at.selectbox if s.label == "Why A…")
    b = next(s for s in at.selectbox if s.label == "…rather than B")
    a.set_value("copepod_calanoid").run()
    assert not at.exception and any(m.label == "score(A) − score(B)" for m in at.metric)
    b = next(s for s in at.selectbox if s.label == "…rather than B")
    b.set_value("copepod_calanoid").run()
    assert any("two different classes" in i.value for i in at.info)

    # A held-out class is offered and flagged.
    at.selectbox(key="clip_class").set_value("tunicate_salp").run()
    assert not at.exception and "held out of CLIP training" in _texts(at)

    # Model & benchmarks: the zero-shot table in the seed's layout.
    frames = [d.value for d in at.dataframe]
    z = next(f for f in frames if "among the 12 held-out names" in f.columns)
    assert list(z[""]) == ["top-1", "top-2", "top-5", "top-10"]


@requires_full_data  # its links name images of the full archive
def test_deep_link_and_bad_links(clip_zoo):
    at = _app()
    at.switch_page("pages/clip.py")
    at.query_params["image"] = "ndsb:train/copepod_calanoid/100010.jpg"
    at.run()
    assert not at.exception and not at.error
    assert "True class: **copepod\\_calanoid**" in _texts(at)
    assert at.session_state["clip_selected"] == ("ndsb", "train/copepod_calanoid/100010.jpg")
    at2 = _app()
    at2.switch_page("pages/clip.py")
    at2.query_params["image"] = "ndsb:train/no_such_class/1.jpg"
    at2.run()
    assert not at2.exception and any("no image" in e.value for e in at2.error)


def test_page_without_clip_model(clip_zoo, tmp_path, monkeypatch):
    import models.zoo

    monkeypatch.setattr(models.zoo, "ZOO_DIR", tmp_path)
    monkeypatch.setenv("PLANKTON_LENS_ZOO", str(tmp_path))
    at = _app()
    at.switch_page("pages/clip.py").run()
    assert not at.exception
    assert any("No CLIP model" in i.value for i in at.info)


# --- browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_server(clip_zoo):
    """A Streamlit server that sees the tiny CLIP zoo (the shared server may predate it)."""
    with run_streamlit_server("streamlit-clip-server.log") as url:
        yield url


def _no_errors(page, expected: list[str]) -> None:
    """assert_no_streamlit_errors, less the console lines of expected failed loads: Streamlit's
    base-path probes (``<page>/_stcore/health``, ``host-config``) when a page URL is opened
    directly, and resources from other hosts (this machine is offline: Google's icon font of
    the page icon, Streamlit's metrics). Their console lines carry no URL, so one line is
    forgiven per expected failure."""
    n = len(expected)
    kept = []
    for e in page.console_errors:
        if n and "Failed to load resource" in e and ("404" in e or "ERR_NAME_NOT_RESOLVED" in e or "ERR_INTERNET" in e):
            n -= 1
        else:
            kept.append(e)
    page.console_errors[:] = kept
    assert_no_streamlit_errors(page)


def _watch(page, base: str) -> list[str]:
    expected: list[str] = []
    page.on("response", lambda r: expected.append(r.url)
            if r.status == 404 and re.search(r"/_stcore/(health|host-config)$", r.url) and not r.url.startswith(base + "/_stcore") else None)
    page.on("requestfailed", lambda r: expected.append(r.url) if not r.url.startswith(base) else None)
    return expected


@requires_full_data  # its deep link names an image of the full archive
def test_page_in_a_browser(clip_server, page):
    probes = _watch(page, clip_server)
    # The server's first run must be app.py (st.navigation); then the deep link.
    page.goto(clip_server, timeout=120_000)
    page.get_by_text("CLIP explanations").first.wait_for(timeout=180_000)  # app.py's navigation is up
    wait_for_app(page, 180_000)
    page.goto(clip_server + "/clip?image=ndsb:train/chaetognath_other/100065.jpg", timeout=120_000)
    wait_for_app(page, 180_000)
    page.get_by_text("Zero-shot names").wait_for(timeout=120_000)
    page.get_by_text("Anomaly score").wait_for(timeout=120_000)
    _no_errors(page, probes)
    assert page.get_by_text("True class: chaetognath_other").is_visible()
    page.get_by_role("tab", name="Ranked prompts").wait_for(timeout=120_000)
    wait_for_app(page, 120_000)
    page.get_by_role("tab", name="Your prompt").click()
    box = page.get_by_label("Type any prompt")
    box.fill("arrow worm with lateral fins")
    box.press("Enter")
    wait_for_app(page, 120_000)
    page.get_by_text("rank among the prompt bank").wait_for(timeout=60_000)
    page.get_by_text("Integrated Gradients for “arrow worm with lateral fins”").wait_for(timeout=120_000)
    wait_for_app(page, 120_000)
    assert page.locator("[data-testid='stImage']").count() >= 3
    _no_errors(page, probes)
    assert page.get_by_text("Plankton Lens").first.is_visible()  # the app's sidebar, not a bare page
    page.set_viewport_size({"width": 1400, "height": 2000})
    wait_for_app(page, 60_000)
    page.screenshot(path=str(ARTIFACTS / "clip_page.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    # A damaged upload gives a message, not a traceback.
    page.get_by_text("Upload images").click()
    wait_for_app(page, 60_000)
    page.locator("input[type='file']").set_input_files(
        files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n not really"}])
    page.get_by_text("broken.png:").wait_for(timeout=60_000)
    _no_errors(page, probes)


# --- the CLIP model as the app's classifier (sidebar picker, explain page, other pages) ------------
def _app_with_model(name: str):
    """app.py with ``name`` picked in the shared sidebar model picker."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["model_name"] = name  # what choosing it in the sidebar stores
    at.run()
    assert not at.exception, at.exception
    return at


def test_sidebar_picker_offers_clip_models_marked(clip_zoo):
    from models.zoo import default_model_name

    at = _app_with_model("ndsb-clip")
    sb = at.sidebar.selectbox(key="_model_select")
    assert "ndsb-clip (CLIP)" in sb.options and sb.value == "ndsb-clip"
    assert default_model_name() != "ndsb-clip"  # the default model stays a classifier


def test_classify_page_with_the_clip_model(clip_zoo):
    from explain.saliency import get_method
    from models.handle import open_model

    at = _app_with_model("ndsb-clip")
    at.switch_page("pages/classify.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["model_name"] == "ndsb-clip"
    assert any("CLIP model used as a classifier" in i.value for i in at.info)
    model = open_model("ndsb-clip").classifier
    # Predictions at every level, each level's top-5 bars.
    assert "Predicted class" in [c.value for c in at.caption]
    steps = next(m.value for m in at.markdown if m.value.startswith(f"**{model.levels[0]}**"))
    assert all(f"**{lvl}**: " in steps for lvl in model.levels)
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert [b["name"] for b in bars] == list(model.levels) and all(len(b["x"]) == min(5, model.num_classes(b["name"])) for b in bars)
    # A saliency map for the chosen level and one per level.
    captions = [c for im in at.get("image") for c in im.captions]
    assert sum(c.startswith("Integrated Gradients · class: ") for c in captions) == 1
    assert all(any(c.startswith(f"{lvl}: ") for c in captions) for lvl in model.levels)
    for method in ("gradcam", "occlusion", "smoothgrad"):
        at.selectbox(key="method").set_value(method).run()
        assert not at.exception, (method, [e.value for e in at.exception])
        assert any(c.startswith(f"{get_method(method).label} · class: ") for im in at.get("image") for c in im.captions), method
    at.radio(key="level").set_value("group").run()
    target = next(s for s in at.selectbox if s.label == "Explain class")
    assert {o.rsplit(" (", 1)[0] for o in target.options} == set(model.class_names["group"])
    at.button(key="sanity_btn").click().run()
    assert not at.exception and any("randomised" in df.value.columns for df in at.dataframe)


def test_other_pages_with_the_clip_model(clip_zoo, cruise, tmp_path, monkeypatch):
    """Anomalies, Neighbourhoods and Review on a collection scored with the CLIP image tower (its
    own cache folder: the test model must not evict a real ndsb-clip's files)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from explain.score import run
    from tests.conftest import scored_map

    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path / "cache"))
    assert run("ndsb-clip", cruise)["rows"] == 48
    scored_map("ndsb-clip", cruise)
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["model_name"] = "ndsb-clip"
    at.session_state["collection"] = cruise
    at.run()
    assert not at.exception, at.exception
    for page, title in (("pages/anomalies.py", "Anomalies"), ("pages/neighbourhoods.py", "Neighbourhoods"),
                        ("pages/review.py", "Review")):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        assert at.title[0].value == title and at.session_state["model_name"] == "ndsb-clip"
        if page != "pages/review.py":
            assert at.get("plotly_chart"), page


def test_clip_model_on_the_explain_page_in_a_browser(clip_server, page):
    """Pick the CLIP model in the sidebar, open Classify & explain: predictions and maps, no error."""
    probes = _watch(page, clip_server)
    explain_with_model(page, clip_server, "ndsb-clip (CLIP)", expect="CLIP model used as a classifier")
    _no_errors(page, probes)
    page.screenshot(path=str(ARTIFACTS / "classify_clip_model.png"), full_page=True)
