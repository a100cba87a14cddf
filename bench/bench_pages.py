"""Every page's first render on a warm server, in Chromium, as a ratio to Streamlit's own floor.

The floor is a one-line Streamlit page with one Plotly chart, served and opened the same way in
the same run. Each page is opened twice in a fresh browser context (no browser cache): the
first visit warms the server (models, tables, maps), the second is the figure. Pages are opened
on a scored collection (``--collection``, default: the shipped NDSB sample registered as a user
collection and scored first), so Anomalies, Neighbourhoods and Review read its table.

    python bench/bench_pages.py [--runs 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.streamlit_server import streamlit_server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLOOR = ('import plotly.graph_objects as go\nimport streamlit as st\nst.title("Plankton Lens baseline")\n'
         'st.plotly_chart(go.Figure(go.Bar(x=[0.6, 0.3, 0.1], y=["a", "b", "c"], orientation="h")))\n')
#: page url → what shows that its first content is complete
PAGES = {"": "text=Your collections", "classify": "text=Integrated Gradients at every level",
         "anomalies": "text=Most anomalous images", "neighbourhoods": ".js-plotly-plot .main-svg",
         "review": "text=images to review", "clip": "text=CLIP explanations"}
IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"


def _open(browser, url: str, marker: str, timeout_ms: int = 600_000) -> float:
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(url, timeout=timeout_ms)
        page.wait_for_selector(marker, timeout=timeout_ms)
        page.wait_for_function(IDLE, timeout=timeout_ms)
        return time.perf_counter() - t0
    finally:
        ctx.close()


def floor(browser, runs: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bench-pages-floor-") as tmp:
        script = Path(tmp) / "floor.py"
        script.write_text(FLOOR)
        with streamlit_server(script, Path(tmp) / "server.log", start_timeout_s=60, poll_s=0.05) as (url, _):
            _open(browser, url, ".js-plotly-plot .main-svg")  # the server's first run
            return [_open(browser, url, ".js-plotly-plot .main-svg") for _ in range(runs)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="measured visits per page (after one warm-up visit)")
    ap.add_argument("--collection", default=None, help="a scored collection (default: the shipped sample)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    data = Path(tempfile.mkdtemp(prefix="bench-pages-data-"))
    env = {"PLANKTON_LENS_DATA": str(data), "PLANKTON_LENS_SCORE_AT_START": "0"}
    os.environ.update(env)
    from data.collections import add_collection
    from explain.score import run
    from models.zoo import default_model_name

    collection = args.collection
    if collection is None:
        collection = "sample"
        dst = data / "uploads" / "sample.zip"
        dst.parent.mkdir(parents=True)
        shutil.copy(REPO / "data" / "sample" / "ndsb_sample.zip", dst)
        add_collection(collection, dst)
    run(default_model_name(), collection)
    res: dict = {"collection": collection, "load_average": round(os.getloadavg()[0], 2), "pages": {}}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            f = floor(browser, args.runs)
            res["floor_s"] = round(statistics.median(f), 2)
            with streamlit_server(REPO / "serve.py", data / "server.log", env=env, start_timeout_s=120) as (url, _):
                for slug, marker in PAGES.items():
                    page_url = f"{url}/{slug}?collection={collection}"
                    first = _open(browser, page_url, marker)
                    warm = [_open(browser, page_url, marker) for _ in range(args.runs)]
                    med = statistics.median(warm)
                    res["pages"][slug or "home"] = {"first_visit_s": round(first, 2), "warm_s": round(med, 2),
                                                    "ratio_to_floor": round(med / res["floor_s"], 2)}
        finally:
            browser.close()
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(data, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"floor (one-line page + one Plotly chart): {res['floor_s']} s")
        for k, v in res["pages"].items():
            print(f"{k:>15}: {v['warm_s']:6.2f} s warm ({v['ratio_to_floor']:.2f}× floor), first visit {v['first_visit_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
