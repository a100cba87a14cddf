"""Scoring throughput: the local and Ray engines of explain.score against the model's raw forward pass.

In one run, on the same images and threads: (1) the raw forward pass of the model (batch 256,
images decoded beforehand: the ceiling), (2) ``explain.score`` with the local engine from the
archive (decoding, scores, kNN search and Parquet writes included), (3) the Ray engine on a
local Ray with the machine's CPUs. Prints images per second, the ratios local / raw and
Ray / local, and the largest absolute difference between the two engines' tables.

    python bench/bench_score.py [--model ndsb-bacnn] [--collection ndsb] [--split test] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def raw_forward(model_name: str, collection: str, split: str | None, batch: int = 256) -> dict:
    """Images per second of the model's forward pass alone on the collection's decoded images."""
    import numpy as np
    import torch

    from data.manifest import decoded_array
    from explain.score import job
    from models.base import images_to_tensor

    j = job(model_name, collection, split)
    images = np.asarray(decoded_array(j.src, j.rows, j.size, progress=False, colour=j.colour))
    model = j.lm.classifier.eval()
    with torch.no_grad():
        model.forward_raw(model.normalise(images_to_tensor(np.array(images[:batch]))))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            model.forward_raw(model.normalise(images_to_tensor(np.array(images[i:i + batch]))))
        seconds = time.perf_counter() - t0
    return {"images": len(images), "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 1)}


def engine_run(model_name: str, collection: str, split: str | None, engine: str) -> dict:
    """A fresh run of ``engine`` (its table removed first; the model's reference is reused)."""
    from explain.score import job, run

    folder = job(model_name, collection, split).folder
    shutil.rmtree(folder, ignore_errors=True)
    out = run(model_name, collection, split, engine=engine)
    return {"images": out["rows"], "seconds": out["seconds"], "images_per_s": out["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="zoo model (default: the zoo's default)")
    ap.add_argument("--collection", default="ndsb")
    ap.add_argument("--split", default="test")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import numpy as np
    import pandas as pd
    import torch

    from explain.score import reference, scored_table
    from models.handle import open_model
    from models.zoo import default_model_name

    name = args.model or default_model_name()
    split = args.split or None
    reference(open_model(name))  # built once (not timed)
    res = {"model": name, "collection": args.collection, "split": split, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}
    res["raw_forward"] = raw_forward(name, args.collection, split)
    res["local"] = engine_run(name, args.collection, split, "local")
    local = scored_table(name, args.collection, split)
    a, ea = local.table.copy(), np.asarray(local.embeddings, np.float32)
    res["local_vs_raw"] = round(res["local"]["images_per_s"] / res["raw_forward"]["images_per_s"], 3)
    if not args.no_ray:
        import ray

        from explain.score_ray import init

        init(num_cpus=os.cpu_count())
        try:
            res["ray"] = engine_run(name, args.collection, split, "ray")
        finally:
            ray.shutdown()
        b = scored_table(name, args.collection, split)
        num = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
        diff = max((float(np.nanmax(np.abs(a[c].to_numpy(float) - b.table[c].to_numpy(float))))
                    for c in num if a[c].notna().any()), default=0.0)
        same_labels = all(a[c].astype(str).equals(b.table[c].astype(str)) for c in a.columns if c not in num)
        res["ray_vs_local"] = round(res["ray"]["images_per_s"] / res["local"]["images_per_s"], 3)
        res["ray_max_abs_diff"] = diff
        res["ray_embeddings_max_abs_diff"] = float(np.abs(ea - np.asarray(b.embeddings, np.float32)).max())
        res["ray_same_labels"] = bool(same_labels)
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
