"""Anomalies, Neighbourhoods and Review on a 1,000,000-row scored table, in Chromium.

The table is built from a real scored table: the shipped NDSB sample (``data/sample/ndsb_sample.zip``,
1,209 images) registered as a user collection in a temporary ``PLANKTON_LENS_DATA`` and scored by the
default model in a temporary ``PLANKTON_LENS_CACHE`` (its other caches, the model's reference inputs
among them, are linked from ``--cache-from`` so nothing is embedded twice). Its readable rows are then
drawn again ``--rows`` times with jitter: every OOD score, the kNN distance and the nearest-image
distance get Gaussian noise (5 % of the column's spread), the embeddings get noise (5 % of their
spread) and the posteriors are the drawn rows' own. Relative paths repeat (each copy shows its
source image, so thumbnails and decisions work; a decision on one copy marks every copy of that
image as reviewed, as it would for one image). The table goes where :func:`explain.score.scored_table`
finds it for that collection (``job().folder``), so the real pages read it; its ``meta.json`` keeps
the collection's own row count (``is_complete`` compares the two), so the pages' caption says
"1,209 images scored" over a million-row table.

The map is installed before timing and is synthetic too: UMAP fitted on the 1,209 source images,
each copy placed at its source's position plus noise (1 % of the map's extent), in the map cache
the page reads (``explain.projection.map_paths``). Over 200,000 points, so the page draws the
density image. Building a real map of a million images (a 50,000-image fit and 950,000
``transform`` placements) is not timed here.

Then ``serve.py`` runs on that data and cache, and Chromium measures, on a warm server:

- Anomalies: the threshold slider's answer time: from the first of the 8 key presses that move it
  (Streamlit's slider waits 200 ms after a change before it sends it) until the page is idle and
  shows the new "flagged above the threshold" figures (the caption names the threshold, so every
  move changes it); budget ≤ 1 s.
- Neighbourhoods: the map's first paint: a fresh tab opening the page until Plotly has drawn the
  map (the page is opened once before, so the server's caches are warm); budget ≤ 3 s.
- Review: from clicking "Record decision" until the next image's panel is shown and the page is
  idle; budget ≤ 1 s.

Beside the map, Streamlit's own floor in the same run (``bench/bench_pages.py``'s one-line page
with one Plotly chart, a fresh tab each time) and the map's ratio to it.

    python bench/bench_ui_scale.py [--rows 1000000] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PLANKTON_DATASETS", str(REPO.parent / "shared" / "datasets"))
#: the model's reference (kNN gallery, validation images for the thresholds): 10 images per class
#: by default, as bench_community.py and the tests use (set it empty for all of them)
os.environ.setdefault("PLANKTON_LENS_REFERENCE_LIMIT", "10")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
COLLECTION = "uibench"
IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
MAP_READY = ("() => { const g = document.querySelector('.js-plotly-plot'); "
             "return g && g.data && g.data.length > 0 && g._fullLayout; }")
BUDGETS = {"anomalies_slider_s": 1.0, "neighbourhoods_first_paint_s": 3.0, "review_next_image_s": 1.0}


# --- the synthetic table ----------------------------------------------------------------------------
def synthetic(scored, rows: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``rows`` readable rows of ``scored`` (an ``explain.score.ScoredTable``) drawn with jitter:
    (table, embeddings float16, source row of each new row). Scores and embeddings get noise;
    everything else (relpath, predictions, labels) is the source row's."""
    rng = np.random.default_rng(seed)
    t = scored.table
    ok = np.flatnonzero(t["readable"].to_numpy(bool))
    src = np.sort(ok[rng.integers(0, len(ok), rows)])
    src[: min(rows, len(ok))] = ok[: min(rows, len(ok))]  # every source row at least once (where rows allow)
    src = np.sort(src)
    df = t.iloc[src].reset_index(drop=True)
    for c in [c for c in df.columns if c.startswith("ood_") or c in ("knn_score", "nn_distance")]:
        v = df[c].to_numpy(np.float64)
        spread = float(np.nanstd(t[c].to_numpy(np.float64))) if np.isfinite(v).any() else 0.0
        df[c] = (v + rng.normal(0, 0.05 * spread + 1e-9, rows)).astype(t[c].dtype if t[c].dtype.kind == "f" else np.float64)
    df["row"] = np.arange(rows, dtype=np.int64)
    e0 = np.asarray(scored.embeddings, np.float32)
    scale = 0.05 * float(np.nanstd(e0[ok])) if len(ok) else 0.0
    emb = np.empty((rows, e0.shape[1]), np.float16)
    for a in range(0, rows, 1 << 16):
        b = min(rows, a + (1 << 16))
        emb[a:b] = e0[src[a:b]] + rng.normal(0, scale, (b - a, e0.shape[1])).astype(np.float32)
    return df, emb, src


def install(scored, folder: Path, df: pd.DataFrame, emb: np.ndarray, src: np.ndarray, seed: int = 0,
            with_map: bool = True) -> dict:
    """Write the synthetic table into ``folder`` (the collection's scored-table folder), with a
    synthetic map (``with_map``); ``meta.json`` last (it marks the table complete). ``scored``'s
    posteriors are read from its folder, which must not be ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from explain.projection import _write, fit_umap

    folder = Path(folder)
    meta = dict(scored.meta)
    old = Path(scored.folder)
    (folder / "meta.json").unlink(missing_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / "table.parquet")
    np.save(folder / "embeddings.npy", emb)
    for lvl in scored.levels:
        p0 = np.load(old / f"proba_{lvl}.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(folder / f"proba_{lvl}.npy.tmp", mode="w+", dtype=np.float16, shape=(len(src), p0.shape[1]))
        for a in range(0, len(src), 1 << 16):
            out[a:a + (1 << 16)] = p0[src[a:a + (1 << 16)]]
        out.flush()
        del out
        os.replace(folder / f"proba_{lvl}.npy.tmp", folder / f"proba_{lvl}.npy")
    if not with_map:
        meta["synthetic_rows"], meta["created"] = len(df), time.time()
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return {"rows": len(df), "sources": int(len(np.unique(src))), "map_s": 0.0}
    # the map: UMAP fitted on the source images, each copy at its source's place plus noise
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    base = np.unique(src)
    saved = old / "source_umap.pkl"
    if saved.exists():
        with open(saved, "rb") as f:
            reducer = pickle.load(f)
    else:
        reducer = fit_umap(np.asarray(scored.embeddings[base], np.float32), random_state=0)
        with open(saved, "wb") as f:
            pickle.dump(reducer, f, protocol=pickle.HIGHEST_PROTOCOL)
    pos = np.full((len(scored.table), 2), np.nan, np.float32)
    pos[base] = np.asarray(reducer.embedding_, np.float32)
    coords = pos[src]
    extent = np.nanmax(coords, 0) - np.nanmin(coords, 0)
    coords = (coords + rng.normal(0, 0.01, coords.shape) * extent).astype(np.float32)
    first = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])  # one copy of each source image: "fitted"
    _write(folder, reducer, coords, first, time.perf_counter() - t0)
    meta["synthetic_rows"] = len(df)  # meta["rows"] stays the collection's (is_complete compares them)
    meta["created"] = time.time()
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"rows": len(df), "sources": int(len(base)), "map_s": round(time.perf_counter() - t0, 1)}


def prepare(rows: int, data: Path, cache: Path, cache_from: Path, seed: int = 0) -> dict:
    """Register and score the sample in ``data`` / ``cache`` (once: a copy of the real table is kept
    in ``data/source``), then install ``rows`` synthetic rows as its table. Sets the environment
    (the server inherits it)."""
    cache.mkdir(parents=True, exist_ok=True)
    if cache_from.is_dir():  # the model's reference inputs, datasets' manifests, …: not recomputed
        for p in cache_from.iterdir():
            if p.name not in ("scored", "maps") and not (cache / p.name).exists():
                (cache / p.name).symlink_to(p)
    os.environ.update({"PLANKTON_LENS_DATA": str(data), "PLANKTON_LENS_CACHE": str(cache),
                       "PLANKTON_LENS_SCORE_AT_START": "0"})
    from data.collections import add_collection, user_collections
    from explain.score import job, read, run, scored_table
    from models.zoo import default_model_name

    model = default_model_name()
    if model is None:
        raise SystemExit("no model in the zoo")
    if COLLECTION not in user_collections():
        dst = data / "uploads" / "sample.zip"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "data" / "sample" / "ndsb_sample.zip", dst)
        add_collection(COLLECTION, dst)
    j = job(model, COLLECTION)
    source = data / "source"  # a copy of the real scored table (and its map's reducer): later runs start from it
    t0 = time.perf_counter()
    if not (source / "meta.json").exists():
        run(model, COLLECTION)
        assert scored_table(model, COLLECTION) is not None
        shutil.copytree(j.folder, source, ignore=shutil.ignore_patterns("map__*", "progress.json", "job.log", "parts"))
    score_s = time.perf_counter() - t0
    scored = read(source)
    scored.embeddings = np.array(scored.embeddings)
    t0 = time.perf_counter()
    df, emb, src = synthetic(scored, rows, seed)
    build_s = time.perf_counter() - t0
    j.folder.mkdir(parents=True, exist_ok=True)
    for f in source.glob("validation*"):
        shutil.copy(f, j.folder / f.name)
    t0 = time.perf_counter()
    info = install(scored, j.folder, df, emb, src, seed)
    install_s = time.perf_counter() - t0
    got = scored_table(model, COLLECTION)
    assert got is not None and len(got.table) == rows, "the synthetic table is not where scored_table() looks"
    return {"model": model, "collection": COLLECTION, "rows": rows, "source_rows": int(len(scored.table)),
            "score_source_s": round(score_s, 1), "build_s": round(build_s, 1), "install_s": round(install_s, 1), **info}


# --- the browser -----------------------------------------------------------------------------------
def _idle(page, timeout_ms: int = 300_000) -> None:
    page.wait_for_timeout(150)
    page.wait_for_function(IDLE, timeout=timeout_ms)


def _caption(page) -> str:
    return page.evaluate("() => { const e = [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')]"
                         ".find(e => e.innerText.includes('Flagged above the threshold')); return e ? e.innerText : ''; }")


def anomalies(browser, url: str, repeats: int) -> list[float]:
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    page.goto(f"{url}/anomalies?collection={COLLECTION}", timeout=600_000)
    page.get_by_text("Most anomalous images").wait_for(timeout=600_000)
    _idle(page)
    slider = page.locator("[data-testid='stSlider'] input[type='range'], [data-testid='stSlider'] [role='slider']").first
    out = []
    for i in range(repeats + 1):  # the first move is a warm-up
        before = _caption(page)
        slider.focus()
        key = "ArrowLeft" if i % 2 == 0 else "ArrowRight"
        # Timed from the first key press: the presses take about as long as the slider's debounce,
        # so an early commit can answer before the last one (timed from there, a move read 0.02 s).
        t0 = time.perf_counter()
        for _ in range(8):
            page.keyboard.press(key)
        page.wait_for_function("(b) => { const e = [...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')]"
                               ".find(e => e.innerText.includes('Flagged above the threshold')); "
                               "return e && e.innerText !== b && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }",
                               arg=before, timeout=300_000)
        page.wait_for_function(IDLE, timeout=300_000)
        out.append(time.perf_counter() - t0)
        page.wait_for_timeout(500)
    ctx.close()
    return out[1:]


def neighbourhoods(browser, url: str, repeats: int) -> list[float]:
    out = []
    for i in range(repeats + 1):  # the first visit warms the server (table, map, points)
        ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(f"{url}/neighbourhoods?collection={COLLECTION}", timeout=600_000)
        page.wait_for_function(MAP_READY, timeout=600_000)
        out.append(time.perf_counter() - t0)
        _idle(page)
        ctx.close()
    return out[1:]


def review(browser, url: str, repeats: int) -> list[float]:
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    page.goto(f"{url}/review?collection={COLLECTION}", timeout=600_000)
    page.get_by_text("images to review").first.wait_for(timeout=600_000)
    _idle(page)
    page.get_by_label("Reviewer").fill("bench")
    page.get_by_label("Reviewer").press("Enter")
    _idle(page)
    out = []
    for _ in range(repeats + 1):  # the first decision is a warm-up
        current = page.locator("[data-testid='stCaptionContainer'] code").first.inner_text()
        page.get_by_text("Confirm anomaly", exact=False).first.click()
        t0 = time.perf_counter()
        page.get_by_role("button", name="Record decision").click()
        page.wait_for_function("(c) => { const e = document.querySelector('[data-testid=\"stCaptionContainer\"] code'); "
                               "return e && e.innerText !== c && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }",
                               arg=current, timeout=300_000)
        page.wait_for_function(IDLE, timeout=300_000)
        out.append(time.perf_counter() - t0)
        page.wait_for_timeout(500)
    ctx.close()
    return out[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5, help="timed moves / visits / decisions per page (after one warm-up)")
    ap.add_argument("--cache-from", type=Path, default=Path.home() / ".cache" / "plankton-lens",
                    help="cache whose other entries (the model's reference inputs) are linked into the temporary one")
    ap.add_argument("--pages", default="anomalies,neighbourhoods,review")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="data and cache folder, kept (a second run skips scoring the sample); default: a temporary one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tmp = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ui-scale-"))
    res: dict = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    try:
        res["table"] = prepare(args.rows, tmp / "data", tmp / "cache", args.cache_from)
        from playwright.sync_api import sync_playwright

        from bench.streamlit_server import streamlit_server

        env = {k: os.environ[k] for k in ("PLANKTON_LENS_DATA", "PLANKTON_LENS_CACHE", "PLANKTON_LENS_SCORE_AT_START",
                                           "PLANKTON_DATASETS", "PLANKTON_LENS_REFERENCE_LIMIT")}
        res["load_average_before_browser"] = [round(x, 2) for x in os.getloadavg()]
        with streamlit_server(REPO / "serve.py", tmp / "server.log", env=env, start_timeout_s=180) as (url, _), \
                sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                fns = {"anomalies": ("anomalies_slider_s", anomalies), "neighbourhoods": ("neighbourhoods_first_paint_s", neighbourhoods),
                       "review": ("review_next_image_s", review)}
                for name in args.pages.split(","):
                    key, fn = fns[name]
                    try:
                        times = fn(browser, url, args.repeats)
                    except Exception:
                        for ctx in browser.contexts:  # what the page showed, for the failure's report
                            for i, pg in enumerate(ctx.pages):
                                pg.screenshot(path=str(tmp / f"failed-{name}-{i}.png"), full_page=True)
                                (tmp / f"failed-{name}-{i}.html").write_text(pg.content())
                        raise
                    res[key] = {"median": round(statistics.median(times), 2), "min": round(min(times), 2),
                                "max": round(max(times), 2), "runs": [round(t, 2) for t in times],
                                "budget": BUDGETS[key], "met": statistics.median(times) <= BUDGETS[key],
                                "load_average": [round(x, 2) for x in os.getloadavg()]}
                    if name == "neighbourhoods":
                        # Streamlit's own floor in the same run: a fresh tab of a one-line page with one
                        # Plotly chart (bench_pages.py's), so the map's figure reads against this machine.
                        from bench.bench_pages import floor

                        f = statistics.median(floor(browser, args.repeats))
                        res["floor_s"] = round(f, 2)
                        res[key]["ratio_to_floor"] = round(statistics.median(times) / f, 2)
            finally:
                browser.close()
    finally:
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    else:
        t = res["table"]
        print(f"table: {t['rows']:,} rows from {t['source_rows']:,} scored images (built {t['build_s']} s, installed {t['install_s']} s)")
        for k in BUDGETS:
            if k in res:
                v = res[k]
                print(f"{k:>30}: median {v['median']:.2f} s ({v['min']:.2f}–{v['max']:.2f}) budget {v['budget']} s "
                      f"{'met' if v['met'] else 'NOT met'} · load {v['load_average']}"
                      + (f" · {v['ratio_to_floor']:.2f}× Streamlit's floor ({res['floor_s']} s)" if "ratio_to_floor" in v else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
