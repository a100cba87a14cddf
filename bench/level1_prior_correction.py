"""Issue 17: how far post-hoc prior correction moves the level-1 head (living / non-living /
unknown) toward the balanced-accuracy target, and what it costs in plain accuracy.

    python bench/level1_prior_correction.py --model ndsb-bacnn

Level-1 probabilities divided by the training prior to the power tau (logit adjustment,
Menon et al. 2021, applied after training); tau = 0 is the model as shipped (its level-1 argmax).
The shown path's level-1 figures are printed beside it. Prints one row per tau, for the
validation split (where a tau would be chosen) and the test split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.data import load_dataset, subset  # noqa: E402
from models.handle import open_model  # noqa: E402
from models.metrics import evaluate_predictions  # noqa: E402
from models.train import predict_arrays  # noqa: E402


def level1_figures(pred: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float, list[float]]:
    recalls = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(k)]
    return float((pred == y).mean()), float(np.nanmean(recalls)), recalls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ndsb-bacnn")
    ap.add_argument("--tta", action="store_true")
    args = ap.parse_args(argv)
    lm = open_model(args.model)
    model, manifest = lm.classifier, lm.manifest
    _, df, images, tax, _ = load_dataset(manifest.get("dataset", "ndsb"), int(model.preprocessing["size"]), manifest.get("holdout"))
    root = model.levels[0]
    names = model.class_names[root]
    prior = np.bincount(subset(df, images, model.taxonomy, "train").labels[root], minlength=len(names)) / 1.0
    prior /= prior.sum()
    print(f"{args.model}: level 1 = {names}, training prior {np.round(prior, 3).tolist()}")
    for split in ("val", "test"):
        data = subset(df, images, model.taxonomy, split)
        probs = predict_arrays(model, data.images, tta=args.tta)
        y = data.labels[root]
        rep = evaluate_predictions(probs, data.labels, model.taxonomy)
        rec = rep["level1_recall"]
        print(f"\n{split} ({len(y)} images); shown path: accuracy {100 * rep['levels'][root]['accuracy']:.1f}, "
              f"balanced {100 * rec['balanced_accuracy']:.1f}, recall " + ", ".join(f"{n} {100 * (rec[n] or 0):.1f}" for n in names))
        print("| tau | level-1 accuracy | balanced accuracy | " + " | ".join(f"recall {n}" for n in names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for tau in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
            pred = (np.log(probs[root] + 1e-12) - tau * np.log(prior)).argmax(1)
            acc, bal, recalls = level1_figures(pred, y, len(names))
            print(f"| {tau:.2f} | {100 * acc:.1f} | {100 * bal:.1f} | " + " | ".join(f"{100 * r:.1f}" for r in recalls) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
