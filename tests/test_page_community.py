"""The "Community" page: AppTest runs on a labelled collection (grouping, level, estimators,
threshold, error table, downloads), on an unlabelled one, and on the real EcoTaxa VPR bundle (the
offline map), and a browser session on the VPR bundle that makes no request outside the app."""
from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest

import os
from pathlib import Path

from tests.conftest import ARTIFACTS, REPO, app_on_page, assert_page_ok, requires_data, requires_zoolake, wait_for_app

pytestmark = requires_data
PAGE = "pages/community.py"


def _app(collection: str, model: str | None = None):
    return app_on_page(PAGE, collection, model)


_ok = assert_page_ok


def _metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _specs(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_page_on_a_labelled_collection(scored_sample):
    at = _app(scored_sample)
    _ok(at)
    assert at.title[0].value == "Community"
    assert at.selectbox(key="cm_by").value == "all" and at.selectbox(key="cm_level").value == "class"
    assert _metric(at, "Groups") == "1" and _metric(at, "Images") == "1,209"
    at.selectbox(key="cm_by").set_value("split").run()
    _ok(at)
    assert _metric(at, "Groups") == "3" and _metric(at, "Moved to unknown") == "0"
    assert len(at.get("plotly_chart")) >= 3  # bars, comparison, Bray–Curtis
    errors = [d.value for d in at.dataframe if "MAE" in d.value.columns]
    assert errors and len(errors[0]) == 4 and (errors[0]["MAE"] < 0.1).all()
    assert any("Mean absolute error" in m.value for m in at.markdown)
    assert len(at.radio(key="cm_estimator").options) == 4
    for e in ("classify_and_count", "probabilistic_classify_and_count", "adjusted_classify_and_count", "em"):
        at.radio(key="cm_estimator").set_value(e).run()
        _ok(at)

    # a threshold on the MSP score: starts at the 95 % threshold; its minimum moves most images
    at.selectbox(key="cm_score").set_value("ood_msp_class").run()
    _ok(at)
    moved_95 = int(_metric(at, "Moved to unknown").replace(",", ""))
    sl = next(s for s in at.slider if s.key.startswith("cm_thr::"))
    sl.set_value(sl.min).run()
    _ok(at)
    moved_min = int(_metric(at, "Moved to unknown").replace(",", ""))
    assert moved_min > moved_95 and moved_min > 600
    assert any(s.value == "The anomaly threshold's effect" for s in at.subheader)
    titles = [sp["layout"].get("title", {}).get("text", "") for sp in _specs(at)]
    assert any("threshold's effect" in t for t in titles)

    at.selectbox(key="cm_level").set_value("group").run()
    _ok(at)
    assert len(at.selectbox(key="cm_taxon").options) == 15
    diversity = [d.value for d in at.dataframe if "shannon" in d.value.columns]
    assert diversity and len(diversity[0]) == 3 and (diversity[0]["richness"] > 0).all()
    assert at.get("download_button"), "no download button"


def test_page_on_an_unlabelled_collection(scored_cruise):
    at = _app(scored_cruise)
    _ok(at)
    assert at.selectbox(key="cm_by").value == "all" and _metric(at, "Images") == "48"
    assert not [d for d in at.dataframe if "MAE" in d.value.columns]  # no truth, no error table
    assert any("no positions" in c.value for c in at.caption)


def test_page_on_the_vpr_bundle_draws_an_offline_map(vpr):
    at = _app(vpr)
    _ok(at)
    assert at.selectbox(key="cm_by").value == "week"  # it has times (and positions, depths)
    from explain.community_groups import SPECIAL

    assert {SPECIAL["station"], SPECIAL["day"], SPECIAL["depth"]} <= set(at.selectbox(key="cm_by").options)
    at.selectbox(key="cm_by").set_value("station").run()
    _ok(at)
    specs = _specs(at)
    maps = [s for s in specs if "longitude" in json.dumps(s["layout"].get("xaxis", {}))]
    assert maps and maps[0]["data"][0]["type"] == "scatter"
    for s in specs:  # plain axes only: no geo or tile-based map that would fetch files
        assert not any(t.get("type", "").startswith(("scattergeo", "scattermap", "choropleth", "densitymap"))
                       for t in s["data"])
        assert "geo" not in s["layout"] and "mapbox" not in s["layout"] and "map" not in s["layout"]
    at.selectbox(key="cm_by").set_value("day").run()
    _ok(at)
    assert len(at.get("plotly_chart")) >= 3  # bars, time series, comparison, map


ZL_MODEL = "zoolake-bacnn"


@pytest.fixture(scope="module")
def lake_weeks() -> str:
    """A labelled user collection of real ZooLake test images from its three fullest weeks (at most
    50 images a week), as an ImageFolder zip whose SPC file names carry the acquisition time,
    scored by the zoo's ZooLake model."""
    import zipfile

    import pandas as pd

    from data.collections import add_collection, user_collections
    from explain.embeddings import dataset_rows
    from explain.score import run
    from models.handle import open_model
    from models.zoo import model_names

    if ZL_MODEL not in model_names():
        pytest.skip(f"no {ZL_MODEL} in the zoo")
    src, rows, _ = dataset_rows("zoolake", open_model(ZL_MODEL).manifest)
    meta = src.metadata()[["relpath", "timestamp"]]
    test = rows[rows["split"] == "test"].merge(meta, on="relpath")
    test["week"] = test["timestamp"].dt.tz_localize(None).dt.to_period("W")
    weeks = test["week"].value_counts().index[:3]
    pick = pd.concat([test[test["week"] == w].sort_values("relpath").iloc[::3][:50] for w in weeks])
    name = "lake-weeks"
    if name not in user_collections():
        path = Path(os.environ["PLANKTON_LENS_DATA"]) / "uploads" / "lake_weeks.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as z:
            for rel, cls in zip(pick["relpath"], pick["class"]):
                z.writestr(f"{cls}/{Path(rel).name}", src.read_bytes(rel))
        add_collection(name, path)
    run(ZL_MODEL, name)
    return name


@requires_zoolake
def test_page_on_zoolake_weeks(lake_weeks):
    """ZooLake, labelled and time-stamped, with the ZooLake model: grouped by week by default, the
    true relative abundance beside each estimate, and every estimator's error table."""
    at = _app(lake_weeks, ZL_MODEL)
    _ok(at)
    assert at.session_state["model_name"] == ZL_MODEL
    assert at.selectbox(key="cm_by").value == "week"
    assert _metric(at, "Groups") == "3"
    errors = [d.value for d in at.dataframe if "MAE" in d.value.columns]
    assert errors and len(errors[0]) == 4 and (errors[0]["MAE"] < 0.1).all()
    at.selectbox(key="cm_level").set_value("group").run()
    _ok(at)
    assert len(at.selectbox(key="cm_taxon").options) == 10  # ZooLake's ten groups
    assert "Counts table (CSV)" in [b.proto.label for b in at.get("download_button")]


@requires_zoolake
def test_browser_page_on_zoolake_weeks(streamlit_server, browser, lake_weeks):
    """The page in Chromium on ZooLake weeks, opened by a deep link that names the model and the
    collection: the error table of the four estimators is shown, with no exception."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.set_default_timeout(120_000)
    page.goto(streamlit_server, timeout=300_000)  # the root first: app.py registers the pages
    page.locator("[data-testid='stSidebar']").get_by_text("Plankton Lens", exact=True).wait_for(timeout=300_000)
    page.goto(f"{streamlit_server}/community?model={ZL_MODEL}&collection={lake_weeks}", timeout=300_000)
    page.get_by_text("Mean absolute error against the true relative abundance").first.wait_for(timeout=600_000)
    wait_for_app(page, 300_000)
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()[:2000]
    scored = page.get_by_text(f"images scored by {ZL_MODEL}").first  # the caption names the table's model
    assert lake_weeks in scored.inner_text(), scored.inner_text()
    assert page.locator("[data-testid='stPlotlyChart']").count() >= 3
    page.close()


def test_browser_page_on_the_vpr_bundle(streamlit_server, browser, vpr):
    """The page in Chromium on the VPR bundle, opened with ?collection=vpr: no exception, no console
    error, and every request the page makes goes to the app's own server (the map fetches nothing)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append((m.text, m.location.get("url"))) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append((str(e), "")))
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(120_000)
    page.goto(streamlit_server, timeout=300_000)  # the root first: app.py registers the pages
    page.locator("[data-testid='stSidebar']").get_by_text("Plankton Lens", exact=True).wait_for(timeout=300_000)
    page.goto(f"{streamlit_server}/community?collection={vpr}", timeout=300_000)
    page.get_by_text("Groups by position").first.wait_for(timeout=600_000)
    wait_for_app(page, 300_000)
    exc = page.locator("[data-testid='stException']")
    assert exc.count() == 0, exc.first.inner_text()[:2000]
    assert page.locator("[data-testid='stPlotlyChart']").count() >= 3
    page.set_viewport_size({"width": 1500, "height": 3800})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "community.png"), full_page=True)
    host = urlparse(streamlit_server).netloc
    outside = [u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).netloc != host]
    assert not outside, outside
    bad = [(t, u) for t, u in errors if not (urlparse(u or "").path.endswith(("/_stcore/health", "/_stcore/host-config"))
                                             and urlparse(u or "").path.count("/") > 2)]
    assert not bad, bad
    ctx.close()


def test_figure_files_render_without_fetching_anything():
    """PNG and SVG for slides (kaleido + the local Chromium): plotly.js from the plotly package,
    MathJax off, so the page kaleido renders in names no URL."""
    import plotly.graph_objects as go

    from pages import community_figures as F

    if not F.can_export():
        pytest.skip("kaleido or a Chromium is not installed")
    from kaleido._page_generator import PageGenerator

    html = PageGenerator(**F.KALEIDO_OPTIONS).generate_index()
    assert "http://" not in html and "https://" not in html
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    assert F.figure_bytes(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert F.figure_bytes(fig, "svg").lstrip().startswith(b"<svg")


def test_every_figure_on_a_hand_made_time_series_with_positions_and_depths():
    """The figures the page draws, from an estimate over 3 days with positions and depths."""
    import numpy as np
    import pandas as pd

    from explain.community import Taxa, estimate, prepare
    from explain.community_stats import bray_curtis_between
    from pages import community_figures as F

    n = 60
    rng = np.random.default_rng(0)
    p = rng.dirichlet([2, 1, 1], size=n)
    names = np.array(["a1", "a2", "b1"])
    t = pd.DataFrame({"relpath": [f"i{i}" for i in range(n)], "readable": True, "class": names[p.argmax(1)],
                      "pred_class": names[p.argmax(1)], "ood_msp_class": rng.random(n).astype(np.float32),
                      "timestamp": pd.Timestamp("2024-05-01", tz="UTC") + pd.to_timedelta(np.arange(n) % 3, unit="D"),
                      "lat": 46.0 + (np.arange(n) % 3) * 0.1, "lon": 8.0, "depth_min": (np.arange(n) % 3) * 10.0})
    t["depth_max"] = t["depth_min"]
    paths = pd.DataFrame({"group": ["A", "A", "B"], "class": list(names)}, index=list(names))
    taxa = Taxa("class", list(names), paths, ["group", "class"])
    val = pd.DataFrame({"class": list(names) * 3, "pred_class": list(names) * 3, "ood_msp_class": 0.1})
    for by, series in (("day", True), ("depth", True), ("station", False)):
        gr = prepare(t, taxa, by, p.astype(np.float16), val, {"a1": 2, "a2": 1, "b1": 1}, score="ood_msp_class")
        est = estimate(gr, threshold=0.8, n_boot=20)
        assert est.grouped.n_groups == 3 and est.moved.sum() > 0
        figs = [F.stacked_bars(est, "em"), F.comparison(est, 0), F.threshold_effect(est),
                F.bray_curtis_heatmap(bray_curtis_between(est, "em")), F.group_map(est, "em", 1)]
        s = F.series(est, "em")
        assert (s is not None) == series
        for fig in figs + ([s] if s is not None else []):
            assert fig.data and fig.layout.title.text
        assert F.group_map(est, "em", 1).data[0].type == "scatter"


def test_model_deep_link_selects_a_zoo_model_only():
    """``?model=NAME`` picks that zoo model in the sidebar; any other value leaves the default."""
    from streamlit.testing.v1 import AppTest

    from models.zoo import default_model_name, model_names

    if ZL_MODEL not in model_names():
        pytest.skip(f"no {ZL_MODEL} in the zoo")
    for value, want in ((ZL_MODEL, ZL_MODEL), ("**nope**<b>", default_model_name())):
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
        at.query_params["model"] = value
        at.run()
        assert not at.exception, at.exception
        assert at.session_state["model_name"] == want and at.selectbox(key="_model_select").value == want
