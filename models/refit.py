"""Refit a trained classifier's level heads on its frozen training features.

    python -m models.refit --model ndsb-bacnn --export-dir models/zoo

Training fits each level's final linear layer on augmented images, through dropout, and the
weight average (EMA) or the epoch kept averages it with earlier heads. Once training is done, the
trunk is fixed: each head's input on the *un-augmented* training images is a plain feature
table. This command refits every level's linear head there as an L2-regularised multinomial
logistic regression (full-batch L-BFGS on standardised features; the strength chosen per level
on the validation split's log loss), folds the standardisation back into the layer, refits the
temperatures on validation, scores the test split and writes a new checkpoint whose manifest
keeps the training run's manifest (arguments, history) and adds ``refit`` (what was done and the
figures before and after). The trunk, the embeddings and every other weight are unchanged, so
embeddings, neighbours and saliency of the trunk stay those of the trained model.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import HierarchicalClassifier, images_to_tensor
from .checkpoint import CheckpointError, save_checkpoint
from .data import ArraySet, load_dataset, subset
from .handle import open_model
from .metrics import evaluate_predictions
from .train import fit_temperature, predict_arrays

C_GRID = (0.03, 0.1, 0.3)
KEPT = ("dataset", "split_seed", "heldout", "holdout", "train_args", "command", "history",
        "train_images", "train_time_s")


@torch.no_grad()
def head_inputs(model: HierarchicalClassifier, images: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """Per level with a linear head, that head's input for every image (eval mode: no dropout)."""
    heads = model.linear_heads()
    got: dict[str, list[np.ndarray]] = {lvl: [] for lvl in heads}
    hooks = [h.register_forward_hook(lambda _m, inp, _out, lvl=lvl: got[lvl].append(inp[0].double().numpy()))
             for lvl, h in heads.items()]
    model.eval()
    try:
        for i in range(0, len(images), batch):
            model(images_to_tensor(images[i:i + batch]).contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return {lvl: np.concatenate(v) if v else np.zeros((0, heads[lvl].in_features)) for lvl, v in got.items()}


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, iters: int = 100,
                init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression minimising mean cross-entropy + |W|² / (2 c n) (the
    objective of scikit-learn's ``LogisticRegression(C=c)`` divided by n); weights and bias
    (float32; ``init``: a warm start, as from the previous strength of a path)."""
    xt, yt = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    w0, b0 = init if init is not None else (np.zeros((n_classes, x.shape[1])), np.zeros(n_classes))
    w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")
    lam = 1.0 / (2.0 * c * len(x))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt) + lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def _log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    z = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T + np.asarray(b, dtype=np.float64)
    return float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(np.asarray(y, dtype=np.int64))))


def refit_heads(model: HierarchicalClassifier, train: ArraySet, val: ArraySet, c_grid=C_GRID) -> dict:
    """Refit every linear head of ``model`` in place (see the module docstring); per level, the
    strength kept and the validation log loss of the head before and after (temperature 1)."""
    heads = model.linear_heads()
    if not heads:
        raise CheckpointError(f"a {model.arch} model has no linear level heads to refit")
    xtr, xva = head_inputs(model, train.images), head_inputs(model, val.images)
    report = {}
    for lvl, head in heads.items():
        mean, std = xtr[lvl].mean(0), xtr[lvl].std(0) + 1e-6
        s_tr, s_va = (xtr[lvl] - mean) / std, (xva[lvl] - mean) / std
        w0 = head.weight.detach().double().numpy()
        b0 = head.bias.detach().double().numpy()
        before = _log_loss(xva[lvl], val.labels[lvl], w0, b0)
        fits: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        for c in sorted(c_grid):  # strongest first, each warm-starting the next
            fits[c] = fit_softmax(s_tr, train.labels[lvl], head.out_features, c, init=fits[max(fits)] if fits else None)
        losses = {c: _log_loss(s_va, val.labels[lvl], *wb) for c, wb in fits.items()}
        c = min(losses, key=losses.get)
        w, b = fits[c]
        with torch.no_grad():  # fold the standardisation into the layer
            head.weight.copy_(torch.from_numpy(w / std))
            head.bias.copy_(torch.from_numpy(b - (w / std) @ mean))  # float64 → the layer's float32
        report[lvl] = {"c": c, "val_log_loss_before": round(before, 4), "val_log_loss_after": round(losses[c], 4),
                       "val_log_loss_by_c": {str(k): round(v, 4) for k, v in losses.items()}}
    return report


def _summary(rep: dict) -> dict:
    return {"leaf_accuracy": round(rep["leaf"]["accuracy"], 4), "leaf_log_loss": round(rep["leaf"]["log_loss"], 4),
            "level_accuracy": {lvl: round(v["accuracy"], 4) for lvl, v in rep["levels"].items()},
            "level1_balanced_accuracy": round(rep["level1_recall"]["balanced_accuracy"], 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.refit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="zoo name or manifest path of a trained classifier")
    ap.add_argument("--name", default=None, help="checkpoint name (default: the model's)")
    ap.add_argument("--export-dir", default="runs/refit")
    ap.add_argument("--c", type=float, nargs="+", default=list(C_GRID), help="strengths tried per level")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit-per-class", type=int, default=None, help="tiny subsets for tests")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        lm = open_model(args.model)
        if lm.kind != "classifier" or not lm.classifier.linear_heads():
            raise CheckpointError(f"{args.model}: only a trained Plankton Lens classifier with linear level heads "
                                  f"(flat, bcnn, bacnn) can be refitted, not this {lm.kind} ({lm.classifier.arch})")
        model, manifest = lm.classifier, dict(lm.manifest)
        model = type(model)(model.taxonomy, model.config)  # a private copy: the cached model stays as loaded
        model.load_state_dict(lm.classifier.state_dict())
        _, df, images, tax, _ = load_dataset(manifest.get("dataset", "ndsb"), int(model.preprocessing["size"]), manifest.get("holdout"),
                                          limit_per_class=args.limit_per_class)
        if tax.classes != model.class_names["class"]:
            raise CheckpointError(f"{args.model} was trained on other classes than the dataset's current taxonomy")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sets = {s: subset(df, images, model.taxonomy, s) for s in ("train", "val", "test")}
    before = evaluate_predictions(predict_arrays(model, sets["test"].images), sets["test"].labels, model.taxonomy)
    heads = refit_heads(model, sets["train"], sets["val"], tuple(args.c))
    temps = fit_temperature(model, sets["val"])
    after = evaluate_predictions(predict_arrays(model, sets["test"].images), sets["test"].labels, model.taxonomy)
    name = args.name or manifest["name"]
    command = "python -m models.refit " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    refit = {"from": manifest["name"], "from_sha256": manifest.get("sha256"), "command": command, "heads": heads,
             "test_before": _summary(before), "test_after": _summary(after), "seconds": round(time.time() - t0, 1)}
    mpath = save_checkpoint(model, Path(args.export_dir) / name, **{k: manifest[k] for k in KEPT if k in manifest},
                            temperature=temps, metrics={"test": after}, refit=refit)
    print(f"saved {mpath}: test leaf accuracy {before['leaf']['accuracy']:.4f} -> {after['leaf']['accuracy']:.4f}, "
          f"log loss {before['leaf']['log_loss']:.4f} -> {after['leaf']['log_loss']:.4f} ({refit['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
