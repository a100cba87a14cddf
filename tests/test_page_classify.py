"""The "Classify & explain" page: AppTest runs (gallery, uploads incl. bad files, deep links,
level / method / contrast switches) and a real browser session against ``streamlit run``."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ARTIFACTS, REPO, requires_data, shown, wait_for_app

pytestmark = requires_data
PAGE = "pages/classify.py"


def _app(query: dict | None = None):
    from streamlit.testing.v1 import AppTest

    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    if query:
        at.query_params.update(query)
    return at.switch_page(PAGE).run()


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [h.value for h in at.header]
    return "\n".join(shown(str(p)) for p in parts)


def _headline(at, label: str) -> str:
    """The value shown under a caption ``label`` (predicted class, ground truth)."""
    caps = [c.value for c in at.caption]
    assert label in caps, caps
    md = [m.value for m in at.markdown if m.value.startswith("#### ")]
    return shown(md[["Predicted class", "Ground truth"].index(label)][5:])


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_home_page_runs():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    _ok(at)


def test_gallery_pick_level_method_and_contrast(ndsb_manifest):
    at = _app()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert _headline(at, "Predicted class")
    assert "at every level" in "\n".join(s.value for s in at.subheader)
    assert sum(1 for im in at.get("image") for c in im.captions if "Integrated Gradients" in c) == 1
    first = at.header[0].value

    # Gallery pick: the third thumbnail becomes the explained image and the deep link follows.
    at.button(key="pick_2").click().run()
    _ok(at)
    link = at.query_params["image"]
    ds, rel = link.split(":", 1)
    assert ds == "ndsb" and shown(at.header[0].value) == Path(rel).name != shown(first)
    truth = ndsb_manifest.loc[ndsb_manifest["relpath"] == rel, "class"].iloc[0]
    assert _headline(at, "Ground truth") == truth
    # top-k bars of every level in one chart; the true class is orange wherever it is shown
    import json

    bars = {b["name"]: b for b in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}
    leaf_bars = bars[list(bars)[-1]]
    assert list(bars)[-1] == "class" and len(leaf_bars["x"]) == 5
    assert all(c == "#E69F00" for n, c in zip(leaf_bars["customdata"], leaf_bars["marker"]["color"]) if n == truth)

    # Level switch: the target list becomes that level's names.
    at.radio(key="level").set_value("group").run()
    _ok(at)
    target = next(s for s in at.selectbox if s.label == "Explain class")
    from models.handle import open_model
    from models.zoo import default_model_name

    model = open_model(default_model_name()).classifier
    assert {o.rsplit(" (", 1)[0] for o in target.options} == set(model.class_names["group"])

    # The method picker offers every registered method that works for the model; a switch, then
    # "why A rather than B".
    from explain.saliency import available_methods

    assert at.selectbox(key="method").options == [m.label for m in available_methods(model)]
    for method in ("gradcam", "saliency"):
        at.selectbox(key="method").set_value(method).run()
        _ok(at)
    target = next(s for s in at.selectbox if s.label == "Explain class")
    b = next(n for n in model.class_names["group"] if n != target.value)
    next(s for s in at.selectbox if s.label == "…rather than").set_value(b).run()
    _ok(at)
    assert any("rather than" in c for im in at.get("image") for c in im.captions)

    # Sanity check on request.
    at.button(key="sanity_btn").click().run()
    _ok(at)
    assert any("randomised" in df.value.columns for df in at.dataframe)
    assert at.get("download_button") and len(at.get("download_button")) == 2


def test_gallery_misclassified_and_least_confident():
    at = _app()
    at.selectbox(key="g_group_ndsb").set_value("molluscs").run()
    _ok(at)
    for order in ("misclassified only", "least confident"):
        at.selectbox(key="g_order").set_value(order).run()
        _ok(at)
        assert "test images" in _texts(at)
        assert any(c.value.startswith("→ ") or "\n→ " in c.value for c in at.caption) or at.info


def test_deep_link_and_bad_links(ndsb_manifest):
    row = ndsb_manifest[ndsb_manifest["split"] == "test"].iloc[7]
    at = _app({"image": f"ndsb:{row['relpath']}"})
    _ok(at)
    assert shown(at.header[0].value) == Path(row["relpath"]).name
    assert _headline(at, "Ground truth") == row["class"]

    at = _app({"image": "ndsb:train/not_a_class/1.jpg"})
    _ok(at)
    assert any("no image at that path" in e.value for e in at.error)
    assert _headline(at, "Predicted class")  # the page keeps working on a gallery image

    at = _app({"image": "garbage"})
    _ok(at)
    assert any("not of the form" in e.value for e in at.error)


def test_uploads_good_and_bad(ndsb_bytes):
    good = ndsb_bytes[0]
    cmyk = _png(Image.open(io.BytesIO(good)).convert("CMYK"), "JPEG")
    sixteen = _png(Image.fromarray(np.asarray(Image.open(io.BytesIO(good)).convert("L")).astype(np.uint16) * 257))
    bad = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "truncated.jpg": good[: len(good) // 2],
        "empty.png": b"",
        "notes.png": b"sample,count\ncopepod,3\n",
        "huge.png": _png(Image.new("1", (7000, 7000))),
    }
    at = _app()
    at.radio(key="source").set_value("Upload images").run()
    _ok(at)
    files = [("good.jpg", good, "image/jpeg"), ("cmyk.jpg", cmyk, "image/jpeg"), ("sixteen.png", sixteen, "image/png")]
    files += [(n, b, "image/png") for n, b in bad.items()]
    at.file_uploader(key="uploads").set_value(files).run()
    _ok(at)
    errors = "\n".join(shown(e.value) for e in at.error)
    for name in bad:
        assert name in errors, (name, errors)
    assert "good.jpg" not in errors and "cmyk.jpg" not in errors and "sixteen.png" not in errors
    table = at.dataframe[0].value
    assert list(table["image"]) == ["good.jpg", "cmyk.jpg", "sixteen.png"]
    assert _headline(at, "Predicted class")
    at.selectbox(key="upload_pick").set_value(1).run()
    _ok(at)
    assert "CMYK converted to RGB" in _texts(at)
    at.selectbox(key="upload_pick").set_value(2).run()
    _ok(at)
    assert "16-bit image scaled to 8-bit" in _texts(at)

    # Only bad files: messages, no explanation, no exception.
    at.file_uploader(key="uploads").set_value([("empty.png", b"", "image/png")]).run()
    _ok(at)
    assert any("empty" in e.value for e in at.error) and not at.metric


# --- browser ---------------------------------------------------------------------------------
def _console_problems(pg, base: str) -> list[str]:
    """Console errors except an offline sandbox's failed external fetches (Google-hosted
    material icons) and Streamlit's base-path probes (<page>/_stcore/health, host-config)."""
    host = urlparse(base).netloc
    out = []
    for text, url in pg.console_log:
        u = urlparse(url or "")
        if u.netloc and u.netloc != host:
            continue
        if u.path.endswith(("/_stcore/health", "/_stcore/host-config")) and u.path.count("/") > 2:
            continue
        out.append(f"{text} ({url})")
    return out


def _watch(pg) -> None:
    """Record console errors with their URL; generous timeouts for a loaded 2-core machine."""
    pg.set_default_timeout(240_000)
    pg.set_default_navigation_timeout(240_000)
    pg.console_log = []
    pg.on("console", lambda m: pg.console_log.append((m.text, m.location.get("url"))) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_log.append((str(e), "")))


def _wait_explained(pg, timeout_ms: int = 240_000) -> None:
    pg.wait_for_selector("text=Predicted class", timeout=timeout_ms)
    pg.wait_for_selector("text=at every level", timeout=timeout_ms)
    wait_for_app(pg, timeout_ms)
    pg.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].filter(i => i.complete && i.naturalWidth > 0).length >= 6",
                         timeout=timeout_ms)


def _screenshot(pg, name: str) -> None:
    """The whole page: Streamlit scrolls inside its own container, so grow the viewport first."""
    height = pg.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    pg.set_viewport_size({"width": 1500, "height": min(max(int(height) + 50, 1100), 6000)})
    pg.wait_for_timeout(1000)
    pg.screenshot(path=str(ARTIFACTS / name))


def _assert_clean(pg, base: str) -> None:
    exc = pg.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()[:2000]
    assert not _console_problems(pg, base), _console_problems(pg, base)


def test_browser_gallery_pick_and_deep_link(streamlit_server, browser, ndsb_manifest):
    if not os.environ.get("PLANKTON_LENS_ZOO") and not (REPO / "models" / "zoo").is_dir():
        pytest.skip("no model in the zoo")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = ctx.new_page()
    _watch(pg)
    t0 = time.time()
    pg.goto(streamlit_server)
    wait_for_app(pg, 120_000)
    link = pg.locator("[data-testid='stSidebarNavLink']", has_text="Classify & explain")
    link.wait_for(timeout=240_000)
    link.dispatch_event("click")  # no actionability wait: a starved renderer can keep it "unstable" for long
    _wait_explained(pg)
    _assert_clean(pg, streamlit_server)
    first = pg.locator("h2").first.inner_text()

    # Pick the fourth gallery image.
    pg.locator(".st-key-pick_3 button:visible").first.click()
    pg.wait_for_function(f"() => document.querySelector('h2') && document.querySelector('h2').innerText != {first!r}",
                         timeout=240_000)
    _wait_explained(pg)
    _screenshot(pg, "classify-gallery.png")
    _assert_clean(pg, streamlit_server)
    assert "image=ndsb" in pg.url
    ctx.close()

    # A deep link opened in a fresh tab shows that image.
    row = ndsb_manifest[ndsb_manifest["split"] == "test"].iloc[11]
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = ctx.new_page()
    _watch(pg)
    pg.goto(f"{streamlit_server}/classify?image=ndsb:{row['relpath']}")
    _wait_explained(pg)
    assert pg.locator("h2").first.inner_text().strip() == Path(row["relpath"]).name
    _screenshot(pg, "classify-deeplink.png")
    _assert_clean(pg, streamlit_server)
    ctx.close()
    print(f"browser session took {time.time() - t0:.1f} s")


def test_start_up_warm_up_explains_the_opening_image(monkeypatch):
    """serve.py's warm-up (pages.common.warm_first_explanation) fills exactly the cache entries
    the page's first view reads: after it, the page opens with no attribution computed."""
    from models.zoo import default_model_name
    from pages.common import warm_first_explanation

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    assert warm_first_explanation(default_model_name())

    import explain.faithfulness
    import explain.saliency

    def refuse(*a, **k):
        raise AssertionError("computed again: the warm-up missed a cache entry the page reads")

    monkeypatch.setattr(explain.saliency, "attribute", refuse)
    monkeypatch.setattr(explain.faithfulness, "faithfulness", refuse)
    at = _app()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    captions = [c for im in at.get("image") for c in im.captions]
    assert sum("Integrated Gradients" in c for c in captions) == 1  # the main map, from the warmed caches
    assert len(at.get("download_button")) == 2  # the page went on to the level grid and export
    # and a different image does compute (the patch is live): pick the second gallery image
    at.button(key="pick_1").click().run()
    assert any("computed again" in str(e.value) for e in at.error)


def test_restarted_server_reads_explanations_from_disk(monkeypatch, tmp_path):
    """Explanations persist on disk (explain.explanation_store): with the in-memory caches
    cleared, as in a restarted server, the page shows an image explained before with no
    attribution or faithfulness computed; a tampered entry is recomputed, not shown."""
    import streamlit as st

    import explain.faithfulness
    import explain.saliency
    from explain import explanation_store as store

    monkeypatch.setattr(store, "store_dir", lambda: tmp_path)
    st.cache_data.clear()
    at = _app()  # computes the opening image's explanation into the empty store
    _ok(at)
    from models.handle import open_model
    from models.zoo import default_model_name

    n_levels = len(open_model(default_model_name()).classifier.levels)
    assert sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.npz")) == \
        ["attribution"] * n_levels + ["faithfulness"] * n_levels + ["references"]

    real_attribute, real_faithfulness = explain.saliency.attribute, explain.faithfulness.faithfulness
    calls: list[str] = []

    def refuse(*a, **k):
        calls.append("refused")
        raise AssertionError("computed again although the explanation is on disk")

    monkeypatch.setattr(explain.saliency, "attribute", refuse)
    monkeypatch.setattr(explain.faithfulness, "faithfulness", refuse)
    st.cache_data.clear()  # a restarted server: nothing in memory
    at = _app()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert calls == []
    assert sum("Integrated Gradients" in c for im in at.get("image") for c in im.captions) == 1
    assert len(at.get("download_button")) == 2

    entries = list(tmp_path.rglob("attribution-*.npz"))
    for p in entries:
        p.write_bytes(b"not an npz file")

    def counting(*a, **k):
        calls.append("attribute")
        return real_attribute(*a, **k)

    monkeypatch.setattr(explain.saliency, "attribute", counting)
    monkeypatch.setattr(explain.faithfulness, "faithfulness", real_faithfulness)
    st.cache_data.clear()
    at = _app()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert calls == ["attribute"] * n_levels  # each tampered map recomputed once, then stored again
    assert all(store.load(p) is not None for p in entries)


@requires_data
def test_an_all_zero_map_says_why():
    """Grad-CAM of the default model is zero everywhere on this shipped test image (no location of
    the last convolutional layer raises the predicted class): the page says so instead of showing a
    blank overlay alone, and the signed map has evidence to show."""
    rel = "train/artifacts/102576.jpg"
    at = _app({"image": f"ndsb:{rel}"})
    _ok(at)
    at.selectbox(key="method").set_value("gradcam").run()
    _ok(at)
    assert any("zero at every pixel" in i.value and "Signed map" in i.value for i in at.info), [i.value for i in at.info]
    at.toggle(key="signed_gradcam").set_value(True).run()
    _ok(at)
    assert not any("zero at every pixel" in i.value for i in at.info)
