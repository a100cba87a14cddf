"""Speed of the "Classify & explain" page.

    python bench/bench_explain.py [--model NAME] [--repeats 20] [--no-browser] [--scripts app.py serve.py]

Prints, for the default zoo model on this machine:
1. warm predict + Integrated Gradients (32 steps) + GradCAM for one real NDSB test image
   (median and 90th percentile over ``--repeats`` runs; budget 0.5 s);
2. the page's first render: ``streamlit run serve.py`` (the demo's command; and ``app.py``, which
   skips the warm-up, for the ratio) is started and ``/classify`` opened in
   headless Chromium (Playwright, Debian's /usr/bin/chromium); times from the server's start
   until the server answers, the predictions are shown, the main saliency map is shown and the
   page has finished (maps, faithfulness badges and export for every level; budget 5 s).
The machine's load average is printed too: other processes on the cores slow everything
(and torch's spinning OpenMP threads suffer most: compare ``--threads 1``).
"""
from __future__ import annotations

import argparse
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
    from data.decode import load_for_model
    from data.manifest import build_manifest
    from data.sources import open_source
    from models.base import images_to_tensor

    src = open_source("ndsb")
    man = build_manifest(src, progress=False)
    rel = man.loc[man["split"] == "test", "relpath"].iloc[0]
    fg, _, _ = load_for_model(src.read_bytes(rel), model.preprocessing["size"], mode=src.mode, background=src.background)
    return images_to_tensor(fg), f"ndsb:{rel}"


def bench_warm(name: str, repeats: int) -> dict:
    """Median / p90 seconds of predict + IG(32) + GradCAM on one image, after 3 warm-up runs."""
    import torch

    from explain.predict import predict
    from explain.saliency import attribute
    from models.zoo import load_model

    model, manifest = load_model(name)
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


def bench_first_render(script: str = "serve.py", timeout_s: float = 300.0, delay_s: float = 0.0) -> dict:
    """Seconds from ``streamlit run <script>`` to the Classify & explain page's milestones;
    ``delay_s``: how long after the server answers the browser opens the page (a person
    typing the URL takes a few seconds; 0 is the worst case)."""
    from playwright.sync_api import sync_playwright

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-explain-streamlit-{Path(script).stem}.log"
    out: dict[str, float] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        t0 = time.perf_counter()
        try:
            with streamlit_server(REPO / script, log_path, start_timeout_s=60, poll_s=0.05) as (url, _):
                out["server_ready"] = time.perf_counter() - t0
                time.sleep(delay_s)
                ms = int(timeout_s * 1000)
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
                out["exceptions"] = page.locator("[data-testid='stException']").count()
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_explain.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo model (default: the dashboard's default model)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true", help="skip the first-render measurement")
    ap.add_argument("--scripts", nargs="+", default=["app.py", "serve.py"],
                    help="server entry points to compare (serve.py warms the caches at start; make demo uses it)")
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
    print("first render of /classify after the server starts (headless Chromium opens it as soon as the server "
          "answers; cold caches):")
    done = {}
    for script in args.scripts:
        r = done[script] = bench_first_render(script)
        ok = "PASS" if r["complete"] <= RENDER_BUDGET_S and not r["exceptions"] else "FAIL"
        print(f"  streamlit run {script}: server answers {r['server_ready']:.2f} s · predictions shown {r['predictions']:.2f} s · "
              f"saliency map shown {r['saliency']:.2f} s · page complete (every level + badges) {r['complete']:.2f} s"
              f"  [budget {RENDER_BUDGET_S} s: {ok}]")
    if len(done) > 1:
        a, b = args.scripts[:2]
        print(f"  ratio page complete {a} / {b}: {done[a]['complete'] / done[b]['complete']:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
