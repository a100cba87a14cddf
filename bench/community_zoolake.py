"""The real test of the Community view's corrections (issue 16): ZooLake's test split, by week.

ZooLake is labelled and time-stamped (its SPC file names carry the acquisition time). With the
zoo's model trained on ZooLake's training split, this scores the test split (once; cached),
groups it by week at the leaf level and prints, for each estimator (classify-and-count,
probabilistic CC, adjusted CC, EM prior shift), its mean absolute error against the true
relative abundance over weeks and classes, and the same over weeks with at least
``--min-images`` images. It skips, saying why, while the zoo has no ZooLake model (or ZooLake is
not here).

    python bench/community_zoolake.py [--model zoolake-bacnn] [--boot 200] [--min-images 20] [--json]

The confusion matrix (ACC) and the thresholds come from the model's validation images: run it
without ``PLANKTON_LENS_REFERENCE_LIMIT`` (every validation image) for the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def zoolake_model(name: str | None) -> str | None:
    """``name``, else the zoo's classifier trained on ZooLake (``zoolake-bacnn`` first)."""
    from models.zoo import list_models

    own = [m["name"] for m in list_models() if "error" not in m and m.get("dataset") == "zoolake"
           and m.get("kind", "classifier") == "classifier"]
    if name:
        return name
    return "zoolake-bacnn" if "zoolake-bacnn" in own else (own[0] if own else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the zoo's model trained on ZooLake")
    ap.add_argument("--by", default="week")
    ap.add_argument("--level", default=None, help="default: the model's finest level")
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--min-images", type=int, default=20, help="also report weeks with at least this many images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from data.sources import available_sources

    if "zoolake" not in available_sources():
        print("skipped: the ZooLake dataset was not found (set PLANKTON_DATASETS)")
        return 0
    model = zoolake_model(args.model)
    if model is None:
        print("skipped: the zoo has no model trained on ZooLake yet (train one: python -m models.train --arch bacnn "
              "--dataset zoolake), so there is nothing to evaluate")
        return 0
    from explain.community import run_estimate
    from explain.quantify import ESTIMATORS, SHORT
    from explain.score import reference_limit

    t0 = time.time()
    est, ctx = run_estimate("zoolake", args.by, model, "test", args.level, n_boot=args.boot, reviews=False,
                            progress=not args.json)
    seconds = time.time() - t0
    gr = est.grouped
    err = est.error()
    per_group = est.group_errors()
    big = gr.images >= args.min_images
    out = {"model": model, "collection": "zoolake", "split": "test", "by": args.by, "level": ctx["level"],
           "groups": gr.n_groups, "images": int(gr.images.sum()), "median_images_per_group": float(np.median(gr.images)),
           "reference_limit": reference_limit(), "n_boot": args.boot, "mae": err,
           f"mae_groups_with_{args.min_images}_images": ({e: float(per_group[e][big].mean()) for e in ESTIMATORS}
                                                          if big.any() else None),
           "groups_with_min_images": int(big.sum()),
           "images_of_classes_the_model_does_not_know": int(gr.truth[:, -1].sum()) if gr.truth is not None else None,
           "seconds": round(seconds, 1), "load_1min": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"ZooLake test split by {args.by} at {ctx['level']} with {model}: {gr.n_groups} groups, "
          f"{int(gr.images.sum()):,} images (median {np.median(gr.images):.0f} per group)")
    print("mean absolute error vs the true relative abundance (over groups and classes):")
    for e in ESTIMATORS:
        extra = f"   groups with ≥ {args.min_images} images ({int(big.sum())}): {per_group[e][big].mean():.4f}" if big.any() else ""
        print(f"  {SHORT[e]:>3}  {err[e]:.4f}{extra}")
    best = min(err, key=err.get)
    print(f"best: {SHORT[best]}; CC {'is beaten by every correction' if all(err[e] < err['classify_and_count'] for e in ESTIMATORS if e != 'classify_and_count') else 'is not beaten by every correction'}")
    foreign = float(gr.truth[:, -1].sum() / max(gr.images.sum(), 1)) if gr.truth is not None else 0.0
    if foreign > 0:
        print(f"note: {foreign:.0%} of the images are of classes {model} does not know (the error counts the "
              "model's classes only): use a model trained on ZooLake")
    if reference_limit():
        print(f"note: PLANKTON_LENS_REFERENCE_LIMIT={reference_limit()}: the confusion comes from that many validation "
              "images per class; unset it for the figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
