"""kNN speed: the approximate index :mod:`explain.neighbours` builds beyond ~1M vectors, on synthetic
embedding-like vectors, against exact search (FAISS IndexFlatL2) and numpy brute force.

    python bench/bench_knn.py                     # 1M × 256, 300 queries (≈ 3 GiB RAM, a few minutes)
    python bench/bench_knn.py --n 200000 --json   # smaller

Vectors: clusters (like classes in an embedding space) with per-dimension noise of decaying scale
(like the spectrum of real embeddings), float32. Queries come from the same distribution but are
not indexed. Reported: median single-query latency of each method, recall@10 of the IVF index
against exact search, and the speed-up over numpy brute force measured in the same run.
Targets (issue 6): ≤ 5 ms per query (median) with recall@10 ≥ 0.95.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from explain.neighbours import build_index  # noqa: E402


def synthetic(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """``n`` clustered float32 vectors of dimension ``d``, generated in chunks (little extra memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32) * 2.0
    scale = (1.0 / np.sqrt(1.0 + np.arange(d) / 16.0)).astype(np.float32)  # decaying noise spectrum
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        out[i : i + m] = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d), dtype=np.float32) * scale
    return out


def per_query_ms(fn, queries: np.ndarray) -> np.ndarray:
    """Wall time of ``fn(one_query)`` for each query, in ms."""
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        fn(q[None])
        out[i] = (time.perf_counter() - t) * 1e3
    return out


def numpy_knn(x: np.ndarray, sq: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest ids by brute force: ‖x‖² − 2 x·q, top k (‖x‖² precomputed)."""
    d = sq - 2.0 * (x @ q[0])
    top = np.argpartition(d, k)[:k]
    return top[np.argsort(d[top])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="indexed vectors (default 1M)")
    ap.add_argument("--d", type=int, default=256, help="dimension (default 256)")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300, help="queries for latency and recall (default 300)")
    ap.add_argument("--numpy-queries", type=int, default=50, help="queries timed with numpy brute force")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.time()
    data = synthetic(args.n + args.queries, args.d, args.clusters)
    x, q = data[: args.n], np.ascontiguousarray(data[args.n :])
    gen_s = time.time() - t0

    t = time.time()
    ivf = build_index(x, kind="ivf", gpu=False)  # what build_index picks beyond EXACT_MAX vectors
    build_s = time.time() - t
    flat = faiss.IndexFlatL2(args.d)
    flat.add(x)

    _, exact = flat.search(q, args.k)  # the reference (batched)
    _, approx = ivf.search(q, args.k)
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(approx, exact)]))

    ivf_ms = per_query_ms(lambda v: ivf.search(v, args.k), q)
    nq = min(args.numpy_queries, len(q))
    flat_ms = per_query_ms(lambda v: flat.search(v, args.k), q[:nq])
    sq = (x.astype(np.float32) ** 2).sum(1)
    np_ms = per_query_ms(lambda v: numpy_knn(x, sq, v, args.k), q[:nq])
    agree = float(np.mean([len(set(numpy_knn(x, sq, q[i : i + 1], args.k)) & set(exact[i])) / args.k for i in range(min(nq, 10))]))

    res = {
        "n": args.n, "d": args.d, "queries": len(q), "k": args.k,
        "index": f"IVF-Flat nlist={ivf.nlist} nprobe={ivf.nprobe}",
        "ivf_median_ms": round(float(np.median(ivf_ms)), 3), "ivf_p95_ms": round(float(np.percentile(ivf_ms, 95)), 3),
        "recall_at_k": round(recall, 4),
        "flat_median_ms": round(float(np.median(flat_ms)), 2),
        "numpy_median_ms": round(float(np.median(np_ms)), 2),
        "speedup_vs_numpy": round(float(np.median(np_ms) / np.median(ivf_ms)), 1),
        "speedup_vs_flat": round(float(np.median(flat_ms) / np.median(ivf_ms)), 1),
        "numpy_matches_flat": round(agree, 3),
        "build_s": round(build_s, 1), "generate_s": round(gen_s, 1), "total_s": round(time.time() - t0, 1),
        "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "targets_met": bool(np.median(ivf_ms) <= 5.0 and recall >= 0.95),
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"kNN over {args.n:,} × {args.d} synthetic vectors, {len(q)} queries, k={args.k} "
              f"({res['threads']} FAISS threads, {res['cpus']} CPUs)")
        print(f"  {res['index']}: median {res['ivf_median_ms']} ms/query (p95 {res['ivf_p95_ms']}), "
              f"recall@{args.k} {res['recall_at_k']} vs exact IndexFlatL2  [built in {res['build_s']} s]")
        print(f"  exact IndexFlatL2: median {res['flat_median_ms']} ms/query ({nq} queries)")
        print(f"  numpy brute force: median {res['numpy_median_ms']} ms/query ({nq} queries; agrees with exact: {agree:.0%})")
        print(f"  IVF is {res['speedup_vs_numpy']}× faster than numpy, {res['speedup_vs_flat']}× faster than exact FAISS")
        print(f"  targets (≤ 5 ms median, recall ≥ 0.95): {'met' if res['targets_met'] else 'NOT met'}; total {res['total_s']} s")
    return 0 if res["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
