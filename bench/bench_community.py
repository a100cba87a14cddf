"""Speed of the Community view on a 1,000,000-row scored table: regroup, then re-estimate per threshold.

The table is built from a real scored table (the shipped NDSB sample scored by the default model,
scored first when needed) by drawing its rows again with jitter: each copy's leaf posteriors are
mixed with a Dirichlet draw around them (and its prediction re-read from them), its OOD score
gets noise, and it gets a time over one year, a position and a depth. Then:

- ``base``: read the table at the leaf level (predictions, truth, review decisions: once per level);
- ``group``: group it by week, laid out for thresholds on the score (the rest of what does
  not depend on the threshold);
- ``estimate``: the four estimators with bootstrap bands at 5 thresholds (a slider's moves),
  each timed; the figure is the median (and the worst).

    python bench/bench_community.py [--rows 1000000] [--by week] [--level LEVEL] [--boot 100] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PLANKTON_LENS_REFERENCE_LIMIT", "10")


def real_table():
    """The shipped NDSB sample as a collection, scored by the default model."""
    from data.collections import add_collection, user_collections
    from explain.score import run, scored_table
    from models.handle import open_model
    from models.zoo import default_model_name

    model = default_model_name()
    if model is None:
        raise SystemExit("no model in the zoo")
    if "bench-sample" not in user_collections():
        add_collection("bench-sample", ROOT / "data" / "sample" / "ndsb_sample.zip")
    run(model, "bench-sample")
    return scored_table(model, "bench-sample"), open_model(model)


def synthetic(t, level: str, rows: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """``rows`` rows drawn from ``t`` (a ScoredTable) with jitter; (table, leaf posteriors float16)."""
    rng = np.random.default_rng(seed)
    base = t.table[t.table["readable"]].reset_index(drop=True)
    p0 = np.asarray(t.proba(level), np.float32)[t.table["readable"].to_numpy()]
    idx = rng.integers(0, len(base), rows)
    df = base.iloc[idx].reset_index(drop=True)
    proba = np.empty((rows, p0.shape[1]), np.float16)
    names = np.array(sorted(set(base[f"pred_{level}"])), dtype=object)
    from models.handle import open_model

    names = np.asarray(open_model(t.meta["model"]).classifier.class_names[level], dtype=object)
    pred = np.empty(rows, np.int64)
    for a in range(0, rows, 1 << 16):
        b = min(rows, a + (1 << 16))
        p = p0[idx[a:b]]
        noise = rng.dirichlet(np.ones(p.shape[1]), size=b - a).astype(np.float32)
        p = 0.9 * p + 0.1 * noise
        proba[a:b] = p
        pred[a:b] = p.argmax(1)
    df[f"pred_{level}"] = names[pred]
    for c in [c for c in df.columns if c.startswith("ood_") or c == "knn_score"]:
        v = df[c].to_numpy(np.float32)
        df[c] = v + rng.normal(0, 0.05 * np.nanstd(v) + 1e-6, rows).astype(np.float32)
    df["timestamp"] = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 365 * 86400, rows), unit="s")
    df["lat"] = 43.7 + rng.normal(0, 0.05, rows)
    df["lon"] = 7.3 + rng.normal(0, 0.05, rows)
    df["depth_min"] = df["depth_max"] = rng.uniform(0, 200, rows)
    df["sample_id"] = np.char.add("s", (rng.integers(0, 200, rows)).astype(str))
    df["row"] = np.arange(rows)
    df["relpath"] = np.char.add("synthetic/", np.arange(rows).astype(str))
    return df, proba


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--by", default="week")
    ap.add_argument("--level", default=None, help="default: the model's finest")
    ap.add_argument("--score", default=None, help="default: ood_msp_<level>")
    ap.add_argument("--boot", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from explain.community import base, estimate, group, taxa_of

    t, lm = real_table()
    level = args.level or lm.levels[-1]
    score = args.score or f"ood_msp_{level}"
    t0 = time.perf_counter()
    df, proba = synthetic(t, level, args.rows)
    build_s = time.perf_counter() - t0
    taxa = taxa_of(lm.classifier.class_names, lm.classifier.taxonomy, level)
    t0 = time.perf_counter()
    b = base(df, taxa, proba, t.validation, t.meta.get("train_counts"), t.meta.get("train_sampler") or "uniform")
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gr = group(b, args.by, score)
    group_s = time.perf_counter() - t0
    v = df[score].to_numpy(np.float32)
    thresholds = [float(np.quantile(v, q)) for q in (0.95, 0.9, 0.8, 0.99, 0.5)]
    times, point = [], []
    for thr in thresholds:
        t0 = time.perf_counter()
        estimate(gr, score, thr, n_boot=0)
        point.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        est = estimate(gr, score, thr, n_boot=args.boot)
        times.append(time.perf_counter() - t0)
    out = {"rows": args.rows, "groups": gr.n_groups, "classes": gr.k, "level": level, "by": args.by, "score": score,
           "n_boot": args.boot, "build_s": round(build_s, 2), "base_s": round(base_s, 3), "group_s": round(group_s, 3),
           "estimate_point_median_s": round(float(np.median(point)), 3),
           "estimate_median_s": round(float(np.median(times)), 3), "estimate_max_s": round(float(np.max(times)), 3),
           "moved_last": int(est.moved.sum()), "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
