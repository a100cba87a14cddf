"""Speed of the "Classify & explain" page.

    python bench/bench_explain.py [--model NAME] [--repeats 20] [--runs 3] [--no-browser] [--scripts app.py serve.py]
                                  [--store disk|empty|both]

Prints, for the default zoo model on this machine:
1. warm predict + Integrated Gradients (32 steps) + GradCAM for one real NDSB test image
   (median and 90th percentile over ``--repeats`` runs; budget 0.5 s);
2. the page's first render: ``streamlit run serve.py`` (the demo's command; and ``app.py``, which
   skips the warm-up, for the ratio) is started and ``/classify`` opened in
   headless Chromium (Playwright, Debian's /usr/bin/chromium); times from the server's start
   until the server answers, the predictions are shown, the main saliency map is shown and the
   page has finished (maps, faithfulness badges and export for every level; budget 5 s), the
   median of ``--runs`` interleaved runs, with a new browser profile and with a browser that has
   opened the app before, and the CPU seconds the server and the browser used meanwhile; with
   the opening image's explanation already on disk (a restarted server) and with an empty
   explanation store (a first start ever).
The machine's load average is printed too: other processes on the cores slow everything
(and torch's spinning OpenMP threads suffer most: compare ``--threads 1``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streamlit_server import streamlit_server  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py and serve.py set it

WARM_BUDGET_S = 0.5
RENDER_BUDGET_S = 5.0
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _image(model):
    """A real NDSB test image as the model's input tensor, and its deep-link id."""
    from data.decode import keeps_colour, load_for_model
    from data.manifest import build_manifest
    from data.sources import open_source
    from models.base import images_to_tensor

    src = open_source("ndsb")
    man = build_manifest(src, progress=False)
    rel = man.loc[man["split"] == "test", "relpath"].iloc[0]
    fg, _, _ = load_for_model(src.read_bytes(rel), model.preprocessing["size"], mode=src.mode, background=src.background,
                              colour=keeps_colour(model.preprocessing, src.mode))
    return images_to_tensor(fg), f"ndsb:{rel}"


def bench_warm(name: str, repeats: int) -> dict:
    """Median / p90 seconds of predict + IG(32) + GradCAM on one image, after 3 warm-up runs."""
    import torch

    from explain.predict import predict
    from explain.saliency import attribute
    from models.handle import open_model

    lm = open_model(name)
    model, manifest = lm.classifier, lm.manifest
    model.eval()
    x, image_id = _image(model)
    leaf = model.levels[-1]
    parts: dict[str, list[float]] = {"predict": [], "integrated_gradients": [], "gradcam": [], "total": []}
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        p = predict(model, x)
        t1 = time.perf_counter()
        attribute(model, x, leaf, p.path[leaf], "integrated_gradients", n_steps=32)
        t2 = time.perf_counter()
        attribute(model, x, leaf, p.path[leaf], "gradcam")
        t3 = time.perf_counter()
        if i >= 3:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    tot = sorted(parts["total"])
    return {"model": name, "sha": manifest.get("sha256", "")[:12], "arch": manifest.get("arch"), "image": image_id,
            "threads": torch.get_num_threads(), "median": statistics.median(tot),
            "p90": tot[min(len(tot) - 1, int(0.9 * len(tot)))], "best": tot[0],
            **{f"{k}_median": statistics.median(v) for k, v in parts.items() if k != "total"}}


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes and their waited-for children (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in f[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _browser_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"chrom" in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@contextlib.contextmanager
def _server_cache(empty_store: bool):
    """Environment for a server whose disk caches (dataset indexes, embeddings…) are the usual
    ones but, with ``empty_store``, whose explanation store is empty: a temporary cache folder
    linking every entry of the real one except ``explanations``."""
    if not empty_store:
        yield {}
        return
    import tempfile

    from data.paths import cache_dir

    real = cache_dir()
    with tempfile.TemporaryDirectory(prefix="bench-explain-cache-") as tmp:
        for entry in real.iterdir():
            if entry.name != "explanations":
                (Path(tmp) / entry.name).symlink_to(entry)
        yield {"PLANKTON_LENS_CACHE": tmp}


def bench_first_render(script: str = "serve.py", timeout_s: float = 300.0, delay_s: float = 0.0,
                       browser_cache: bool = False, empty_store: bool = False) -> dict:
    """Seconds from ``streamlit run <script>`` to the Classify & explain page's milestones, and the
    CPU seconds the server and the browser used until the page was complete.

    ``delay_s``: how long after the server answers the browser opens the page (a person typing
    the URL takes a few seconds; 0 is the worst case). ``browser_cache``: the browser has opened
    the app before (a first server is started and visited on the same port, then stopped), as
    at a demo where the server is restarted; otherwise a new browser profile loads Streamlit's
    and Plotly's JavaScript for the first time. ``empty_store``: the measured server starts
    with no explanation on disk (a first start ever); otherwise the opening image's explanation
    is on disk from an earlier start (:mod:`explain.explanation_store`)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from bench.streamlit_server import free_port

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-explain-streamlit-{Path(script).stem}.log"
    out: dict[str, float] = {}
    port = free_port()
    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="bench-explain-profile-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args,
                                                    viewport={"width": 1500, "height": 1100})
        page = ctx.new_page()
        ms = int(timeout_s * 1000)
        try:
            if browser_cache:
                with _server_cache(empty_store) as env, \
                        streamlit_server(REPO / script, log_path, start_timeout_s=60, poll_s=0.05, port=port, env=env) as (url, _):
                    page.goto(url + "/classify")
                    page.wait_for_selector("text=Scores (JSON)", timeout=ms)
                page.goto("about:blank")
                time.sleep(1.0)
            cpu0 = _cpu_seconds(_browser_pids())
            t0 = time.perf_counter()
            with _server_cache(empty_store) as env, \
                    streamlit_server(REPO / script, log_path, start_timeout_s=60, poll_s=0.05, port=port, env=env) as (url, proc):
                out["server_ready"] = time.perf_counter() - t0
                time.sleep(delay_s)
                page.goto(url + "/classify")
                page.wait_for_selector("text=Predicted class", timeout=ms)
                out["predictions"] = time.perf_counter() - t0
                page.wait_for_selector("[data-testid='stImageCaption']:has-text(' · ')", timeout=ms)
                out["saliency"] = time.perf_counter() - t0
                page.wait_for_selector("text=Scores (JSON)", timeout=ms)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].every(i => i.complete && i.naturalWidth > 0)",
                    timeout=ms)
                out["complete"] = time.perf_counter() - t0
                out["server_cpu_s"] = _cpu_seconds([proc.pid])
                out["browser_cpu_s"] = _cpu_seconds(_browser_pids()) - cpu0
                out["exceptions"] = page.locator("[data-testid='stException']").count()
        finally:
            ctx.close()
    return out


BASELINE_PAGES = {
    "a one-line Streamlit page": 'import streamlit as st\nst.title("Plankton Lens baseline")\n',
    "the same with one Plotly chart": 'import plotly.graph_objects as go\nimport streamlit as st\nst.title("Plankton Lens baseline")\n'
                                      'st.plotly_chart(go.Figure(go.Bar(x=[0.6, 0.3, 0.1], y=["a", "b", "c"], orientation="h")))\n',
}


def bench_baseline_page(source: str, plotly: bool, timeout_s: float = 120.0) -> dict:
    """What Streamlit itself costs: seconds from opening a trivial page in a new browser profile
    until it is drawn (and its Plotly chart, if any), with the browser's CPU seconds."""
    import tempfile

    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    with tempfile.TemporaryDirectory(prefix="bench-explain-baseline-") as tmp, sync_playwright() as pw:
        script = Path(tmp) / "baseline.py"
        script.write_text(source)
        ctx = pw.chromium.launch_persistent_context(str(Path(tmp) / "profile"), executable_path=CHROMIUM, headless=True,
                                                    args=args, viewport={"width": 1500, "height": 1100})
        try:
            page = ctx.new_page()
            cpu0 = _cpu_seconds(_browser_pids())
            with streamlit_server(script, Path(tmp) / "server.log", start_timeout_s=60, poll_s=0.05) as (url, _):
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("text=Plankton Lens baseline", timeout=int(timeout_s * 1000))
                if plotly:
                    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=int(timeout_s * 1000))
                shown = time.perf_counter() - t0
                return {"shown": shown, "browser_cpu_s": _cpu_seconds(_browser_pids()) - cpu0}
        finally:
            ctx.close()


def first_render_runs(scripts: list[str], runs: int, browser_cache: bool, empty_store: bool = False) -> dict[str, list[dict]]:
    """``runs`` first renders of each script, interleaved (a, b, a, b…) so drift hits both alike."""
    done: dict[str, list[dict]] = {s: [] for s in scripts}
    for _ in range(runs):
        for s in scripts:
            done[s].append(bench_first_render(s, browser_cache=browser_cache, empty_store=empty_store))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_explain.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo model (default: the dashboard's default model)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true", help="skip the first-render measurement")
    ap.add_argument("--scripts", nargs="+", default=["app.py", "serve.py"],
                    help="server entry points to compare (serve.py warms the caches at start; make demo uses it)")
    ap.add_argument("--runs", type=int, default=3, help="first renders per script and browser state (median shown)")
    ap.add_argument("--store", choices=["disk", "empty", "both"], default="both",
                    help="explanation store at the server's start: the opening image explained on disk by an earlier start "
                         "(a restarted server), empty (a first start ever), or both")
    ap.add_argument("--threads", type=int, help="torch intra-op threads here and OMP_NUM_THREADS for the server "
                                                "(default: torch's own choice, as the app runs)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from models.zoo import default_model_name

    name = args.model or default_model_name()
    if name is None:
        print("No model in the zoo; train one first (python -m models.train).", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    print("Plankton Lens — Classify & explain benchmark")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"load average {load:.2f} (1 min) at start")
    w = bench_warm(name, args.repeats)
    ok = "PASS" if w["median"] <= WARM_BUDGET_S else "FAIL"
    print(f"model: {w['model']} ({w['arch']}, sha256 {w['sha']}…), torch threads {w['threads']}; image {w['image']}")
    print(f"warm predict + Integrated Gradients (32 steps) + GradCAM, one image: median {w['median']:.3f} s, "
          f"p90 {w['p90']:.3f} s, best {w['best']:.3f} s over {args.repeats} runs  [budget {WARM_BUDGET_S} s: {ok}]")
    print(f"  predict {w['predict_median'] * 1000:.1f} ms · Integrated Gradients {w['integrated_gradients_median'] * 1000:.1f} ms"
          f" · GradCAM {w['gradcam_median'] * 1000:.1f} ms")
    if args.no_browser:
        return 0
    if not Path(CHROMIUM).exists():
        print(f"first render: skipped ({CHROMIUM} not found)")
        return 0
    print("what Streamlit itself costs in a new browser profile (page opened once the server answers):")
    for label, source in BASELINE_PAGES.items():
        rs = [bench_baseline_page(source, "plotly" in source) for _ in range(args.runs)]
        print(f"  {label}: drawn {statistics.median(r['shown'] for r in rs):.2f} s after opening, browser CPU "
              f"{statistics.median(r['browser_cpu_s'] for r in rs):.2f} s (median of {len(rs)})")
    stores = {"disk": [False], "empty": [True], "both": [True, False]}[args.store]
    if False in stores:  # the opening image's explanation on disk, as an earlier start leaves it
        from pages.common import warm_first_explanation

        warm_first_explanation(name)
    for empty_store, cached in itertools.product(stores, (False, True)):
        print("first render of /classify after the server starts, headless Chromium opening it as soon as the server "
              "answers; " + ("empty explanation store (first start ever)" if empty_store else
                             "opening image's explanation on disk from an earlier start") + "; "
              + ("browser that has opened the app before" if cached else "new browser profile (first visit ever)") + ":")
        done = first_render_runs(args.scripts, args.runs, cached, empty_store)
        for script, rs in done.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            each = ", ".join(f"{r['complete']:.2f}" for r in rs)
            ok = "PASS" if med["complete"] <= RENDER_BUDGET_S and not any(r["exceptions"] for r in rs) else "FAIL"
            print(f"  streamlit run {script}, median of {len(rs)}: server answers {med['server_ready']:.2f} s · predictions shown "
                  f"{med['predictions']:.2f} s · saliency map shown {med['saliency']:.2f} s · page complete (every level + badges) "
                  f"{med['complete']:.2f} s (runs: {each})  [budget {RENDER_BUDGET_S} s: {ok}]")
            print(f"    CPU used until complete: server {med['server_cpu_s']:.2f} s, browser {med['browser_cpu_s']:.2f} s "
                  f"(2 cores: the page cannot complete before (server + browser) / 2 = "
                  f"{(med['server_cpu_s'] + med['browser_cpu_s']) / 2:.2f} s)")
        if len(done) > 1:
            a, b = args.scripts[:2]
            ratio = statistics.median(r["complete"] for r in done[a]) / statistics.median(r["complete"] for r in done[b])
            print(f"  ratio page complete {a} / {b}: {ratio:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
