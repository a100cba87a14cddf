"""The "Anomalies" page: AppTest runs (scores, levels, threshold, gallery selection) and a real
browser session (the threshold slider moves, the gallery renders)."""
from __future__ import annotations

import re
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from explain.ood import get_score, score_names
from tests.conftest import ARTIFACTS, REPO, requires_data, requires_full_data, wait_for_app

pytestmark = requires_data
PAGE = "pages/anomalies.py"


def _app():
    from streamlit.testing.v1 import AppTest

    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900)
    at.run()
    assert not at.exception, at.exception
    return at.switch_page(PAGE).run()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _metric(at, prefix: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(prefix))


def _selected_text(at) -> str:
    return next(m.value for m in at.markdown if "**Selected image**" in m.value)


@requires_full_data  # its TPR figure is that of the full test split
def test_page_scores_threshold_and_gallery():
    at = _app()
    _ok(at)
    assert at.title[0].value == "Anomalies"
    labels = [m.label for m in at.metric]
    assert any(lbl.startswith("TPR") for lbl in labels) and any(lbl.startswith("AUROC") for lbl in labels)
    assert _metric(at, "TPR") == "95.0%"  # the slider starts at the 95 %-TPR threshold
    assert len(at.get("plotly_chart")) >= 3  # histogram + two logit bar charts
    buttons = [b for b in at.button if b.key and b.key.startswith("ood_pick_")]
    assert len(buttons) == 12

    # Moving the threshold to the slider's minimum flags almost everything: TPR falls.
    sl = at.slider[0]
    sl.set_value(sl.min).run()
    _ok(at)
    assert float(_metric(at, "TPR").rstrip("%")) < 50.0

    # Selecting a gallery image shows it beside the typical image.
    first = _selected_text(at)
    at.button(key="ood_pick_5").click().run()
    _ok(at)
    assert _selected_text(at) != first


@pytest.mark.parametrize("score", [s for s in score_names() if s != "msp"])  # msp: the default, tested above
def test_every_score_runs(score):
    at = _app()
    at.selectbox(key="ood_score").set_value(score).run()
    _ok(at)
    assert _metric(at, "AUROC")
    level_box = at.selectbox(key="ood_level")
    assert level_box.disabled == (get_score(score).reads == "features")


def test_a_registered_logit_score_is_offered_and_runs():
    """A score added to the registry (test-local, removed afterwards) is one more option of the
    page's score picker, scored per level like the others."""
    from explain import ood

    @ood.register_score("test_margin", "− top-2 logit margin (test)", "logits")
    def _margin(logits):
        top = np.sort(np.asarray(logits, dtype=np.float64), -1)
        return top[:, -2] - top[:, -1]

    try:
        at = _app()
        _ok(at)
        box = at.selectbox(key="ood_score")
        assert box.options == [e.label for e in ood.list_scores()] and box.options[-1] == "− top-2 logit margin (test)"
        box.set_value("test_margin").run()
        _ok(at)
        assert _metric(at, "AUROC") and not at.selectbox(key="ood_level").disabled
        assert "− top-2 logit margin (test): **" in _selected_text(at)
    finally:
        ood.unregister_score("test_margin")


def test_levels_and_known_group_unknown_class():
    at = _app()
    levels = at.selectbox(key="ood_level").options
    assert len(levels) >= 2
    for lvl in levels[:-1]:
        at.selectbox(key="ood_level").set_value(lvl).run()
        _ok(at)
    assert any(s.value == "Known group, unknown class" for s in at.subheader)
    # Another OOD reference set changes the FPR label.
    ref = at.selectbox(key="ood_ref")
    other = [o for o in ref.options if o != ref.value][0]
    ref.set_value(other).run()
    _ok(at)
    assert any(m.label == f"FPR ({other} kept)" for m in at.metric)


def _assert_clean(pg, base: str) -> None:
    """No Streamlit exception and no console error, except an offline sandbox's failed external
    fetches and Streamlit's base-path probes (<page>/_stcore/health, host-config) on a deep URL."""
    exc = pg.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()[:2000]
    host, bad = urlparse(base).netloc, []
    for text, url in pg.console_log:
        u = urlparse(url or "")
        if (u.netloc and u.netloc != host) or (u.path.endswith(("/_stcore/health", "/_stcore/host-config")) and u.path.count("/") > 2):
            continue
        bad.append(f"{text} ({url})")
    assert not bad, bad


@requires_full_data  # its TPR figure is that of the full test split
def test_browser_slider_moves_and_gallery_renders(streamlit_server, browser):
    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    page.console_log = []
    page.on("console", lambda m: page.console_log.append((m.text, m.location.get("url"))) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.console_log.append((str(e), "")))
    page.set_default_timeout(120_000)
    # Through the home page, so that app.py's navigation is set up (a fresh server answering a
    # page URL first runs that page alone, Streamlit's pages/-folder fallback).
    page.goto(streamlit_server, timeout=300_000)
    wait_for_app(page, 300_000)
    nav = page.locator("[data-testid='stSidebarNavLink']")
    nav.filter(has_text="Classify & explain").wait_for(timeout=300_000)  # app.py's navigation is up
    nav.filter(has_text=re.compile(r"Anomalies$")).click()
    page.wait_for_selector("text=Most anomalous images", timeout=900_000)
    wait_for_app(page, 900_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].filter(i => i.complete && i.naturalWidth > 0).length >= 12",
        timeout=120_000)
    assert page.locator("[data-testid='stButton'] button", has_text="Select").count() == 12
    explain_links = page.get_by_role("link", name="Explain", exact=True)
    assert explain_links.count() >= 1 and page.get_by_role("link", name="Neighbours", exact=True).count() == explain_links.count()
    _assert_clean(page, streamlit_server)

    tpr = page.locator("[data-testid='stMetric']", has_text="in-distribution kept").locator("[data-testid='stMetricValue']")
    before = tpr.inner_text()
    thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
    v0 = thumb.input_value()
    thumb.focus()
    for _ in range(40):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => document.querySelector(\"[data-testid='stSlider'] input[type='range']\").value != {v0!r}",
                           timeout=30_000)
    page.wait_for_timeout(500)
    wait_for_app(page, 120_000)
    page.wait_for_function(
        "(b) => { const m = [...document.querySelectorAll('[data-testid=\"stMetric\"]')].find(e => e.innerText.includes('in-distribution kept'));"
        " return m && m.querySelector('[data-testid=\"stMetricValue\"]').innerText !== b; }", arg=before, timeout=60_000)
    assert float(tpr.inner_text().rstrip("%")) < float(before.rstrip("%"))
    page.set_viewport_size({"width": 1500, "height": 3600})  # the app scrolls inside its own container
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "anomalies.png"), full_page=True)
    page.set_viewport_size({"width": 1500, "height": 1100})
    _assert_clean(page, streamlit_server)

    # A gallery image's "Explain" link opens the explain page on that image (the page's first
    # gallery image with a dataset link, recomputed here from the same cached evaluation).
    from explain.ood_evaluation import evaluation, is_evaluated, most_anomalous
    from pages.anomalies import QUICK, GALLERY_N

    name = default_model_name()
    ev = evaluation(name, None if is_evaluated(name) else QUICK)
    top = most_anomalous(ev, "msp", ev.levels[-1], [n for n in ev.sets if len(ev.sets[n])], GALLERY_N)
    link = next(lk for lk in top["link"] if lk)
    explain_links.first.click()
    page.wait_for_selector("text=Predicted class", timeout=600_000)
    wait_for_app(page, 600_000)
    assert "/classify" in page.url
    assert page.locator("h2").first.inner_text().strip() == link.rsplit("/", 1)[-1]
    _assert_clean(page, streamlit_server)
    ctx.close()
    print(f"browser session took {time.time() - t0:.1f} s")
