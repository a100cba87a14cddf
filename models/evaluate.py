"""Evaluate a zoo model on a split of its dataset.

    python -m models.evaluate --model ndsb-bacnn --split test --json [--tta] [--write-results]

Per level accuracy, macro F1 / precision / recall of the shown path (the taxonomy path of highest
joint probability, :mod:`models.path`; ``argmax_levels``: each level's own argmax, a diagnostic);
leaf top-5 and log loss; ``path_consistency`` (the shown path's, 1) beside ``consistency`` (the
argmaxes' agreement with the taxonomy); level-1 recall per class and balanced accuracy; mistake
severity. ``--write-results`` also regenerates the
classifier table of docs/results.md from every NDSB zoo model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import load_dataset, subset
from .metrics import evaluate_predictions
from .report import write_results_section
from .train import predict_arrays
from .handle import open_model
from .zoo import list_models

SEED_TABLE = """| model (seed talk, ZooScan) | level 1 (acc F1 P R) | level 2 | level 3 |
|---|---|---|---|
| flat baseline | – | – | 88.5 89.6 91.2 88.5 |
| B-CNN | 97.1 97.1 97.1 97.1 | 95.8 95.8 95.1 94.7 | 92.3 92.3 92.6 90.6 |
| BA-CNN | 98.7 98.7 98.7 98.7 | 95.9 95.8 95.5 94.9 | 92.2 92.1 92.3 89.5 |
| SBA-CNN | 97.2 97.2 97.2 97.2 | 90.2 90.8 89.1 90.2 | 83.7 88.4 89.7 83.7 |"""


def evaluate(name: str, split: str = "test", tta: bool = False, progress: bool = False) -> dict:
    """The metrics report of zoo model ``name`` on ``split`` of its dataset (held-out classes excluded)."""
    lm = open_model(name)
    model, manifest = lm.classifier, lm.manifest
    size = int(model.preprocessing["size"])
    _, df, images, tax, _ = load_dataset(manifest.get("dataset", "ndsb"), size, manifest.get("holdout"))
    if tax.classes != model.class_names["class"]:
        raise CheckpointError(f"model {name!r} was trained on other classes than the dataset's current taxonomy")
    data = subset(df, images, model.taxonomy, split)
    probs = predict_arrays(model, data.images, progress=progress, tta=tta)
    rep = evaluate_predictions(probs, data.labels, model.taxonomy)
    return {"model": name, "split": split, "tta": tta, **rep}


def _fmt(m: dict) -> str:
    return " ".join(f"{100 * m[k]:.1f}" for k in ("accuracy", "f1", "precision", "recall"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def results_table(reports: list[dict]) -> str:
    levels = reports[0]["levels"].keys()
    head = "| model | " + " | ".join(f"{lvl} (acc F1 P R)" for lvl in levels) + " | leaf top-5 | log loss | level-1 balanced acc | argmax consistency | path consistency | mistake severity |"
    rows = [head, "|" + "---|" * (len(levels) + 7)]
    for r in reports:
        rows.append(f"| {r['model']}{' +TTA' if r['tta'] else ''} | " + " | ".join(_fmt(r["levels"][lvl]) for lvl in levels)
                    + f" | {100 * r['leaf']['top5']:.1f} | {r['leaf']['log_loss']:.3f} | {_pct(r.get('level1_recall', {}).get('balanced_accuracy'))}"
                    + f" | {100 * r['consistency']:.1f} | {_pct(r.get('path_consistency'))} | {r['mistake_severity']:.2f} |")
    return "\n".join(rows)


def learning_curves(names: list[str]) -> str:
    """Validation accuracy per epoch (from the training history in each manifest), as a table.
    A name is a zoo model or a manifest's path (shown by its stem)."""
    from .checkpoint import read_manifest
    from .zoo import manifest_path

    rows = ["| model | epoch | train loss | val acc living | group | subgroup | class | val log loss | elapsed (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        is_path = name.endswith(".json")
        n, m = (Path(name).stem, read_manifest(name)) if is_path else (name, read_manifest(manifest_path(name)))
        for h in m.get("history", []):
            a = h["val_accuracy"]
            rows.append(f"| {n} | {h['epoch']} | {h['train_loss']:.3f} | " + " | ".join(f"{100 * a[k]:.1f}" for k in a)
                        + f" | {h['val_log_loss']:.3f} | {h['elapsed_s']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo model name (default: every NDSB classifier without held-out classes)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--tta", action="store_true", help="average the 8 rotations/flips")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-results", action="store_true", help="write the table into docs/results.md")
    args = ap.parse_args(argv)
    names = [args.model] if args.model else [m["name"] for m in list_models()
                                             if m.get("kind") == "classifier" and m.get("dataset") == "ndsb" and not m.get("heldout")]
    try:
        reports = [evaluate(n, args.split, args.tta, progress=not args.json) for n in names]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports[0] if args.model else reports, indent=2))
    else:
        print(results_table(reports))
    if args.write_results and reports:
        cmd = f"python -m models.evaluate --split {args.split}{' --tta' if args.tta else ''} --write-results"
        text = (f"## Hierarchical classifiers on NDSB ({args.split} split, {reports[0]['n_images']:,} images)\n\n"
                f"Reproduce: `{cmd}` (each model: `python -m models.zoo` prints its training command).\n"
                f"Percentages; levels from the root. Log loss is the NDSB 2015 competition metric on the 121 leaf classes.\n\n"
                + results_table(reports) + "\n\nThe seed talk's table, for reference (ZooScan images, not NDSB):\n\n" + SEED_TABLE)
        write_results_section(f"classifiers-{args.split}{'-tta' if args.tta else ''}", text)
        write_results_section("learning-curves", "## Learning curves (validation split, from each manifest's history)\n\n"
                              "Elapsed time is wall-clock on the shared 2-core machine (other jobs ran beside the training).\n\n"
                              + learning_curves(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
