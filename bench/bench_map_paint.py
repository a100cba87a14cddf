"""First paint of the Neighbourhoods map in headless Chromium, once the server's caches are warm.

Scores ``--collection`` (default: the default model's own dataset) with the default model and
builds its map first, in this process (both are cached on disk, so a second run only reads them).
Then starts ``streamlit run app.py`` for each ``--root`` (a checkout of this repository; default:
this one), opens the Neighbourhoods page at ``?collection=NAME`` once (caches warm up), waits until
the server is idle (UMAP's background warm-up done), then reloads the tab ``--reloads`` times and
times each reload until Plotly has drawn the map. With several roots the reloads alternate between
them, so both see the same machine load.

    python bench/bench_map_paint.py --reloads 5 --json
    python bench/bench_map_paint.py --collection sample --reloads 3
    python bench/bench_map_paint.py --root /tmp/before --root . --reloads 7   # A/B, interleaved
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.streamlit_server import streamlit_server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MAP_READY = ("() => { const g = document.querySelector('.js-plotly-plot'); "
             "return g && g.data && g.data.length > 0 && g._fullLayout; }")
N_POINTS = "() => document.querySelector('.js-plotly-plot')._fullData.reduce((n, t) => n + (t.x ? t.x.length : 0), 0)"


@contextlib.contextmanager
def server(root: Path, log_path: Path):
    """``streamlit run app.py`` of ``root`` on a free port; yields (url, pid)."""
    env = {"PLANKTON_DATASETS": os.environ.get("PLANKTON_DATASETS", str(REPO.parent / "shared" / "datasets")),
           "PLANKTON_LENS_ZOO": os.environ.get("PLANKTON_LENS_ZOO", str(REPO / "models" / "zoo"))}
    with streamlit_server(root / "app.py", log_path, env=env, start_timeout_s=120) as (url, proc):
        yield url, proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pids: list[int], quiet_s: float = 5.0, max_cpu: float = 0.3, timeout_s: float = 400.0) -> float:
    """Wait until the servers used under ``max_cpu`` CPU-seconds over ``quiet_s``; returns the wait."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(quiet_s)
        if sum(cpu_seconds(p) for p in pids) - before < max_cpu:
            break
    return time.time() - t0


def prepare(collection: str | None) -> tuple[str, int]:
    """Score ``collection`` with the default model and build its map (both cached); returns
    (collection, images on the map)."""
    import numpy as np

    from explain.projection import table_map
    from explain.score import run, scored_table
    from models.handle import open_model
    from models.zoo import default_model_name

    model = default_model_name()
    if model is None:
        raise SystemExit("no model in the zoo")
    collection = collection or open_model(model).dataset or "ndsb"
    run(model, collection, progress=True)
    m = table_map(scored_table(model, collection), on_progress=lambda f, msg: print(f"{f:4.0%} {msg}", file=sys.stderr))
    return collection, int(np.isfinite(m.coords[:, 0]).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", action="append", type=Path, help="repository checkout to serve (repeatable)")
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--collection", default=None, help="collection to map (default: the model's own dataset)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    roots = [r.resolve() for r in (args.root or [REPO])]
    collection, mapped = prepare(args.collection)
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(server(r, Path(f"/tmp/bench-map-paint-{i}.log"))) for i, r in enumerate(roots)]
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        pages = []
        for url, _ in servers:
            pg = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
            pg.goto(url)
            pg.locator("[data-testid='stSidebar']").get_by_text("Plankton Lens", exact=True).wait_for(timeout=300_000)
            pg.goto(f"{url}/neighbourhoods?collection={collection}")
            pg.wait_for_function(MAP_READY, timeout=600_000)
            pages.append(pg)
        idle = wait_idle([pid for _, pid in servers])
        times: list[list[float]] = [[] for _ in roots]
        points = [0] * len(roots)
        for _ in range(args.reloads + 1):  # the first reload of each is a warm-up, not counted
            for i, pg in enumerate(pages):
                t0 = time.time()
                pg.reload()
                pg.wait_for_function(MAP_READY, timeout=120_000)
                times[i].append(time.time() - t0)
                points[i] = pg.evaluate(N_POINTS)
                pg.wait_for_timeout(1500)
        browser.close()
    load = os.getloadavg()
    res = [{"root": str(r), "collection": collection, "mapped": mapped, "points": points[i], "seconds": [round(t, 3) for t in times[i][1:]],
            "median_s": round(statistics.median(times[i][1:]), 3), "min_s": round(min(times[i][1:]), 3),
            "max_s": round(max(times[i][1:]), 3)} for i, r in enumerate(roots)]
    out = {"load_avg": [round(x, 2) for x in load], "waited_for_idle_s": round(idle, 1), "runs": res}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in res:
            print(f"{r['root']}: {r['points']:,} points, median {r['median_s']:.2f} s "
                  f"({r['min_s']:.2f}–{r['max_s']:.2f} s) over {len(r['seconds'])} reloads")
        print(f"load average {out['load_avg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
