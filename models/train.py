"""Train a hierarchical classifier on a real plankton dataset.

    python -m models.train --arch bacnn --dataset ndsb --epochs 8

Progress bar, per-level validation metrics every epoch, the best checkpoint kept, resumable
(re-run the same command after an interruption), seeded, all CPU cores, ``--device cuda``.
The best model is exported as ``<export>/<name>.safetensors`` + ``.json`` manifest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .architectures import create_model, list_architectures
from .base import HierarchicalClassifier, images_to_tensor
from .checkpoint import load_training_state, save_checkpoint, save_training_state
from .data import ArraySet, load_dataset, subset
from .metrics import evaluate_predictions
from data.splits import DEFAULT_SEED

REPO = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO / "models" / "zoo"


# --- augmentation ---------------------------------------------------------------------------
def augment(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.9, 1.12)) -> torch.Tensor:
    """Plankton augmentation on a foreground batch (0 = background): rotation by any angle,
    flips, small scale jitter and shift, gain and gamma (brightness / contrast)."""
    n = x.shape[0]
    r = lambda: torch.rand(n, generator=g)  # noqa: E731
    theta = r() * 2 * math.pi
    s = 1.0 / (scale[0] + (scale[1] - scale[0]) * r())
    flip = torch.where(r() < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(theta) * s, torch.sin(theta) * s
    tx, ty = (r() - 0.5) * 0.1, (r() - 0.5) * 0.1
    A = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(A.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = (0.75 + 0.5 * r()).view(n, 1, 1, 1).to(x.device)
    gamma = torch.exp((r() - 0.5) * 0.5).view(n, 1, 1, 1).to(x.device)
    return (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)


# --- losses ------------------------------------------------------------------------------------
def level_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce", gamma: float = 2.0) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    if kind == "focal":
        nll = (1 - torch.exp(-nll)) ** gamma * nll
    return nll.mean()


def loss_weights(arch: str, levels: tuple[str, ...], progress: float) -> list[float]:
    """Per-level loss weights. B-CNN / BA-CNN follow Zhu & Bain's schedule, shifting weight
    from coarse to fine levels over training; the others weigh every level equally."""
    L = len(levels)
    if arch not in ("bcnn", "bacnn"):
        return [1.0] * L
    start = np.array([0.4, 0.3, 0.2, 0.1][:L])
    end = np.array([0.1, 0.15, 0.25, 0.5][:L])
    w = start + (end - start) * min(1.0, progress / 0.6)
    return list(w / w.sum() * L)


# --- inference helper ----------------------------------------------------------------------------
@torch.no_grad()
def predict_arrays(model: HierarchicalClassifier, images: np.ndarray, batch_size: int = 256,
                   device: str = "cpu", progress: bool = False, tta: bool = False) -> dict[str, np.ndarray]:
    """Probabilities per level for uint8 foreground images (N, S, S); ``tta`` averages the 8
    rotations/flips of the dihedral group."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {lvl: [] for lvl in model.levels}
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="predicting", unit="batch"):
        x = images_to_tensor(images[i : i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        views = [x] if not tta else [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
        acc = None
        for v in views:
            p = {k: t.softmax(-1) for k, t in model(v).items()}
            acc = p if acc is None else {k: acc[k] + p[k] for k in p}
        for k in out:
            out[k].append((acc[k] / len(views)).float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, model.num_classes(k)), np.float32) for k, v in out.items()}


def fit_temperature(model: HierarchicalClassifier, val: ArraySet, device: str = "cpu") -> list[float]:
    """Per-level temperature scaling on validation logits (Guo et al. 2017); sets model.temperature."""
    model.eval()
    model.temperature.fill_(1.0)
    with torch.no_grad():
        logits = {lvl: [] for lvl in model.levels}
        for i in range(0, len(val.images), 512):
            x = images_to_tensor(val.images[i : i + 512]).to(device).contiguous(memory_format=torch.channels_last)
            for k, v in model(x).items():
                logits[k].append(v.float().cpu())
    temps = []
    for lvl in model.levels:
        z = torch.cat(logits[lvl])
        y = torch.from_numpy(val.labels[lvl])
        best_t, best = 1.0, float("inf")
        for t in np.exp(np.linspace(np.log(0.5), np.log(3.0), 41)):
            loss = F.cross_entropy(z / float(t), y).item()
            if loss < best:
                best_t, best = float(t), loss
        temps.append(best_t)
    model.temperature.copy_(torch.tensor(temps))
    return temps


# --- training --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list_architectures(), required=True)
    ap.add_argument("--dataset", default="ndsb")
    ap.add_argument("--name", help="checkpoint name (default: <dataset>-<arch>)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--size", type=int, default=64, help="input size in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", default=None, help="held-out class set from data/heldout_<dataset>.json (e.g. default)")
    ap.add_argument("--sampler", choices=["uniform", "sqrt", "balanced"], default="uniform",
                    help="class-weighted resampling: sqrt weighs classes by 1/sqrt(n), balanced by 1/n")
    ap.add_argument("--loss", choices=["ce", "focal"], default="ce")
    ap.add_argument("--focal-gamma", type=float, default=2.0)
    ap.add_argument("--outlier-exposure", choices=["none", "adversarial", "chimera", "corruption", "mixed"], default="none",
                    help="add a flat-logit loss on known outliers made from each batch (models/outlier_exposure.py)")
    ap.add_argument("--oe-weight", type=float, default=0.5, help="weight of the outlier-exposure term")
    ap.add_argument("--freeze-bn", choices=["auto", "yes", "no"], default="auto",
                    help="keep batch-norm statistics fixed (eval mode) while training; auto: yes when fine-tuning "
                         "(--init-from), so the loss sees the network exactly as it runs at test time")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune: start from this zoo model's weights (same architecture and classes)")
    ap.add_argument("--limit-per-class", type=int, default=None, help="tiny subsets for tests")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (tests)")
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("--export-dir", default=str(ZOO_DIR))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fresh", action="store_true", help="ignore a previous run's state instead of resuming")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--ema", type=float, default=0.999,
                    help="decay of the exponential moving average of the weights, validated beside the raw weights; the better of the two is exported (0 = off)")
    ap.add_argument("--backbone", default="compact",
                    help="compact (the project's ResNet) or timm/NAME (any timm architecture, random init; flat, bcnn, bacnn)")
    ap.add_argument("--stem", choices=["blur", "stride2"], default="blur",
                    help="backbone stem: full-resolution conv + anti-aliased pooling (blur) or the first zoo's stride-2 conv")
    return ap


class WeightEMA:
    """Exponential moving average of a model's weights (Polyak averaging, as timm's ``ModelEmaV2``;
    buffers such as batch-norm statistics are copied), with the warm-up ``min(decay, (1 + t) / (10 + t))`` so that short runs
    average recent weights rather than the initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.parameters(), model.parameters()):
            e.mul_(d).add_(m.detach(), alpha=1 - d)
        for e, m in zip(self.module.buffers(), model.buffers()):  # batch-norm statistics: copied
            e.copy_(m)  # (exact when a fine-tune keeps them fixed)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, st: dict) -> None:
        self.module.load_state_dict(st["module"])
        self.updates = int(st["updates"])


def class_weights(labels: np.ndarray, kind: str) -> np.ndarray | None:
    if kind == "uniform":
        return None
    counts = np.bincount(labels)
    w = 1.0 / (np.sqrt(counts) if kind == "sqrt" else counts)
    p = w[labels]
    return p / p.sum()


def train(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    name = args.name or f"{args.dataset}-{args.arch}"
    run_dir = Path(args.runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m models.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    progress = not args.no_progress

    src, df, images, tax, held = load_dataset(args.dataset, args.size, args.holdout, limit_per_class=args.limit_per_class)
    train_set, val_set = subset(df, images, tax, "train"), subset(df, images, tax, "val")
    mean = float(train_set.images.mean() / 255.0)
    std = float(train_set.images.std() / 255.0)
    config = {
        "preprocessing": {"size": args.size, "channels": 1, "polarity": "foreground", "mean": round(mean, 4), "std": round(std, 4)},
        "dropout": 0.2,
        "stem_mode": args.stem,
        "backbone": args.backbone,
    }
    init = None
    if args.init_from:
        from .handle import open_model

        init = open_model(args.init_from).classifier
        # A fine-tune keeps the network it starts from (stem, backbone, normalisation).
        config = {**config, "preprocessing": dict(init.preprocessing),
                  "stem_mode": init.config.get("stem_mode", "stride2"), "backbone": init.config.get("backbone", "compact")}
    torch.manual_seed(args.seed)
    model = create_model(args.arch, tax, config).to(args.device).to(memory_format=torch.channels_last)
    if init is not None:
        if init.arch != args.arch or init.class_names != model.class_names:
            raise SystemExit(f"--init-from {args.init_from}: a {init.arch} model over other classes cannot initialise this one")
        model.load_state_dict(init.state_dict())
        model.temperature.fill_(1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_train = len(train_set.images)
    steps_per_epoch = max(1, n_train // args.batch_size)
    total = steps_per_epoch * args.epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))

    ema = WeightEMA(model, args.ema) if args.ema > 0 else None
    state_path = run_dir / "last.pt"
    start_epoch, best, history = 0, -1.0, []
    if state_path.exists() and not args.fresh:
        st = load_training_state(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best, history = int(st["epoch"]), float(st["best"]), json.loads(st["history"])
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
        print(f"resuming {name} from epoch {start_epoch}", file=sys.stderr)

    labels_t = {k: torch.from_numpy(v) for k, v in train_set.labels.items()}
    oe_term = None
    if args.outlier_exposure != "none":
        from .outlier_exposure import make_oe_term

        oe_term = make_oe_term(args.outlier_exposure)
    probs = class_weights(train_set.labels["class"], args.sampler)
    step = start_epoch * steps_per_epoch
    t0 = time.time()
    freeze_bn = args.freeze_bn == "yes" or (args.freeze_bn == "auto" and bool(args.init_from))
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if freeze_bn:
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        torch.manual_seed(args.seed * 1000 + epoch)
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        rng = np.random.default_rng(args.seed * 1000 + epoch)
        order = rng.choice(n_train, n_train, p=probs) if probs is not None else rng.permutation(n_train)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{args.epochs}", disable=not progress, unit="step")
        run_loss = 0.0
        for b in bar:
            if args.max_steps is not None and step >= args.max_steps:
                break
            idx = np.sort(order[b * args.batch_size : (b + 1) * args.batch_size])
            x = augment(images_to_tensor(train_set.images[idx]).to(args.device), g).contiguous(memory_format=torch.channels_last)
            out = model(x)
            w = loss_weights(args.arch, model.levels, step / total)
            loss = sum(wi * level_loss(out[lvl], labels_t[lvl][idx].to(args.device), args.loss, args.focal_gamma)
                       for wi, lvl in zip(w, model.levels))
            if oe_term is not None:
                ys = {lvl: labels_t[lvl][idx].to(args.device) for lvl in model.levels}
                loss = loss + args.oe_weight * oe_term(model, x, ys, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            run_loss = 0.98 * run_loss + 0.02 * loss.item() if b else loss.item()
            bar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        evaluated = ema.module if ema is not None else model
        rep = evaluate_predictions(predict_arrays(evaluated, val_set.images, device=args.device), val_set.labels, tax)
        acc = {lvl: round(rep["levels"][lvl]["accuracy"], 4) for lvl in model.levels}
        entry = {"epoch": epoch + 1, "train_loss": round(run_loss, 4), "val_accuracy": acc,
                 "val_log_loss": round(rep["leaf"]["log_loss"], 4), "elapsed_s": round(time.time() - t0, 1)}
        if ema is not None:  # the raw weights' figures, for the EMA ablation
            raw = evaluate_predictions(predict_arrays(model, val_set.images, device=args.device), val_set.labels, tax)
            entry["val_accuracy_raw"] = {lvl: round(raw["levels"][lvl]["accuracy"], 4) for lvl in model.levels}
            entry["val_log_loss_raw"] = round(raw["leaf"]["log_loss"], 4)
        # The better of the EMA and the raw weights on validation is the epoch's candidate (the
        # EMA first on a tie): with few steps per epoch the EMA spans many epochs, and the batch-norm
        # statistics it copies belong to the raw weights (ZooLake at 24 epochs: 89.4 vs 90.2 %).
        candidates = [(rep["leaf"]["accuracy"], "ema" if ema is not None else "raw", evaluated)]
        if ema is not None:
            candidates.append((raw["leaf"]["accuracy"], "raw", model))
        score, entry["kept"], kept = max(candidates, key=lambda c: c[0])
        history.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if score > best:
            best = score
            torch.save(kept.state_dict(), run_dir / "best.pt")
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": epoch + 1, "best": best, "history": json.dumps(history)}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_training_state(state_path, state)
        if args.max_steps is not None and step >= args.max_steps:
            break

    model.load_state_dict(torch.load(run_dir / "best.pt", map_location=args.device, weights_only=True))
    temps = fit_temperature(model, val_set, args.device)
    test_set = subset(df, images, tax, "test")
    test_rep = evaluate_predictions(predict_arrays(model, test_set.images, device=args.device), test_set.labels, tax)
    model.cpu()
    mpath = save_checkpoint(
        model, Path(args.export_dir) / name,
        dataset=args.dataset, split_seed=DEFAULT_SEED, heldout=held,
        holdout=args.holdout, train_args=vars(args), command=command, temperature=temps,
        metrics={"test": test_rep}, history=history,
        train_images=n_train, train_time_s=round(sum(h.get("elapsed_s", 0) for h in history[-1:]), 1),
    )
    print(f"saved {mpath}  test leaf accuracy {test_rep['leaf']['accuracy']:.3f}  log loss {test_rep['leaf']['log_loss']:.3f}", file=sys.stderr)
    return {"manifest": str(mpath), "test": test_rep, "history": history}


if __name__ == "__main__":
    train()
