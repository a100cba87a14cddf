"""Train the plankton CLIP model on NDSB images paired with taxonomy and descriptor captions.

    python -m models.clip_train --minutes 40 --threads 2

The held-out classes (``data/heldout_ndsb.json``) are left out of training, for zero-shot
evaluation. Each image is paired with a random caption of its class (``models.captions``:
name, descriptor and coarse templates). The loss is a symmetric multi-positive contrastive loss:
every caption that describes an image's class is a positive for it (UniCL, Yang et al. 2022), so
a caption shared by several classes of a batch ("a shadowgraph image of crustaceans") is never
a negative. Progress bar, validation every epoch (known-class accuracy by prompts and held-out
zero-shot top-1, for monitoring only), resumable (re-run the same command; state is also saved
every few minutes), ``--minutes`` bounds the time spent in training steps across resumes (the
learning rate anneals to whichever of ``--epochs`` and ``--minutes`` ends first; validation and
the final evaluation add about 2-4 minutes), then the model is evaluated on the test split and
exported to the zoo (default ``models/zoo/ndsb-clip``; the manifest records ``train_time_s``
and the whole run's ``wall_time_s``).

Locked-image tuning (LiT, Zhai et al. 2022): ``--lock-image-from ndsb-bacnn-heldout`` starts the
image tower from a supervised classifier's trunk (trained without the same held-out classes) and
keeps it fixed; only the tower's projection head and the text tower learn. The trunk's features
of every training image are computed once (``--lit-views`` views: the image as it is, then
random rotations, flips and gains) and reused every epoch, so a step costs the text tower alone.

    python -m models.clip_train --lock-image-from ndsb-bacnn-heldout --name ndsb-clip-lit --epochs 40 --minutes 20
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
from tqdm import tqdm

from data.splits import DEFAULT_SEED

from .captions import caption_table
from .checkpoint import load_training_state, save_training_state
from .handle import open_model
from .clip_model import (DEFAULT_CONFIG, ClipClassifier, PlanktonClip, create_clip, save_clip_checkpoint,
                         zero_shot_eval)
from .data import labels_for, load_dataset, subset
from .base import images_to_tensor
from .metrics import evaluate_predictions
from .train import augment, class_weights, predict_arrays

REPO = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO / "models" / "zoo"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m models.clip_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="open_clip config name or JSON file (models/configs/)")
    ap.add_argument("--dataset", default="ndsb")
    ap.add_argument("--name", default=None, help="checkpoint name (default: <dataset>-clip)")
    ap.add_argument("--holdout", default="default", help="held-out class set of data/heldout_<dataset>.json")
    ap.add_argument("--epochs", type=int, default=40, help="upper bound on epochs")
    ap.add_argument("--minutes", type=float, default=None, help="training-time budget in minutes (across resumes)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--sampler", choices=["uniform", "sqrt", "balanced"], default="sqrt",
                    help="class-weighted resampling: sqrt weighs classes by 1/sqrt(n), balanced by 1/n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-per-class", type=int, default=None, help="tiny subsets for tests")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (tests)")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between mid-epoch saves of the run state")
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("--export-dir", default=str(ZOO_DIR))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fresh", action="store_true", help="ignore a previous run's state instead of resuming")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--init-from", default=None, metavar="NAME",
                    help="fine-tune a zoo CLIP model of the same config instead of starting from random weights")
    ap.add_argument("--outlier-exposure", choices=CLIP_OE_KINDS, default="none",
                    help="known outliers made from each batch (chimeras of two organisms, heavy corruptions, or both) "
                         "whose similarities to the batch's captions are pushed to uniform (flat), as in issue 5")
    ap.add_argument("--oe-weight", type=float, default=0.5, help="weight of the outlier-exposure term")
    ap.add_argument("--oe-fraction", type=float, default=0.25, help="share of each batch turned into outliers")
    ap.add_argument("--freeze-bn", choices=["auto", "yes", "no"], default="auto",
                    help="keep the image tower's batch-norm statistics fixed (auto: yes with --init-from)")
    ap.add_argument("--lock-image-from", default=None, metavar="NAME",
                    help="locked-image tuning: the image trunk of this supervised zoo classifier, kept fixed "
                         "(trained with the same held-out classes; its compact backbone)")
    ap.add_argument("--lit-views", type=int, default=4,
                    help="with --lock-image-from: views of each training image whose trunk features are cached "
                         "(the first as it is, the others augmented)")
    return ap


LIT_CONFIGS = {"stride2": "plankton-clip-lit", "blur": "plankton-clip-lit-blur"}


def lock_image_tower(pc: PlanktonClip, classifier: torch.nn.Module) -> None:
    """Copy a supervised classifier's compact trunk into ``pc``'s image tower and freeze it
    (requires_grad off, batch-norm in eval mode: see :func:`set_train_mode`)."""
    from .backbone import CompactResNet

    src = getattr(classifier, "backbone", None)
    if not isinstance(src, CompactResNet):
        raise SystemExit(f"--lock-image-from: {type(classifier).__name__} has no compact backbone to lock "
                         "(timm trunks are not supported as CLIP towers)")
    body = pc.clip.visual.trunk.body
    if body.widths != src.widths or len(body.stages) != len(src.stages):
        raise SystemExit(f"--lock-image-from: trunk widths {src.widths} do not match the tower's {body.widths}")
    try:
        body.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise SystemExit(f"--lock-image-from: the trunk does not fit the CLIP tower: {e}") from None
    for q in pc.clip.visual.trunk.parameters():
        q.requires_grad_(False)


def set_train_mode(pc: PlanktonClip, freeze_bn: bool, locked: bool) -> None:
    """Training mode, with the image tower's batch-norm statistics fixed for a fine-tune and
    the whole locked trunk in eval mode for locked-image tuning."""
    pc.train()
    if locked:
        pc.clip.visual.trunk.eval()
    if freeze_bn:  # a fine-tune keeps the base model's batch-norm statistics (see models.train)
        for m in pc.clip.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def cached_trunk_features(pc: PlanktonClip, images: np.ndarray, views: int, seed: int, path: Path,
                          source: str = "", progress: bool = True, batch_size: int = 512) -> torch.Tensor:
    """(views, N, F) trunk features of uint8 images: view 0 the image as it is, the others
    augmented (``models.train.augment``). Stored in ``path`` (reused by a resumed run when the
    trunk's ``source`` (its sha256), the image count, views and seed match)."""
    key = {"source": source, "n": int(len(images)), "views": int(views), "seed": int(seed)}
    if path.exists():
        st = load_training_state(path)
        if st.get("key") == json.dumps(key):
            return st["features"]
    pc.eval()
    out = []
    bar = tqdm(total=views * len(images), desc="locked trunk features", disable=not progress, unit="img")
    for v in range(views):
        g = torch.Generator().manual_seed(seed * 7919 + v)
        feats = []
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(np.asarray(images[i : i + batch_size]))
            feats.append(pc.trunk_features(x if v == 0 else augment(x, g)))
            bar.update(len(x))
        out.append(torch.cat(feats))
    bar.close()
    f = torch.stack(out).contiguous()
    save_training_state(path, {"key": json.dumps(key), "features": f})
    return f


CLIP_OE_KINDS = ["none", "chimera", "corruption", "mixed"]


def clip_outliers(x: torch.Tensor, leaf: torch.Tensor, kind: str, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Known outliers made from a batch: chimeras of two organisms of different classes
    (``models.outliers.chimeras``) and/or heavy corruptions; ``fraction`` of the batch size."""
    from .outliers import chimeras, corruptions

    n = max(2, int(round(fraction * x.shape[0])))
    idx = torch.randperm(x.shape[0], generator=g)[:n]
    kinds = ("chimera", "corruption") if kind == "mixed" else (kind,)
    out = []
    for k, sel in zip(kinds, torch.tensor_split(idx, len(kinds))):
        if len(sel) == 0:
            continue
        if k == "chimera":  # partners from the whole batch, so a small part still finds other classes
            out.append(chimeras(torch.cat([x[sel], x]), torch.cat([leaf[sel], leaf]), g)[0][: len(sel)])
        elif k == "corruption":
            out.append(corruptions(x[sel], g))
        else:
            raise ValueError(f"unknown outlier kind {k!r}; known: {CLIP_OE_KINDS[1:]}")
    return torch.cat(out)


def flat_similarity_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the uniform distribution over the texts to softmax(``logits``), minus
    its minimum log(T): zero when an outlier is equally similar to every caption."""
    return -(logits.log_softmax(1).mean(1)).mean() - math.log(logits.shape[1])


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where ``positives`` (images × texts, bool) marks every match."""
    p = positives.float()
    li = -(p / p.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    lt = -(p.T / p.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (li + lt)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels; none on biases, norms, embeddings, logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CaptionSampler:
    """Tokenised captions of the training classes and one random caption per image."""

    def __init__(self, pc: PlanktonClip, taxonomy, classes: list[str]):
        self.captions, self.valid = caption_table(taxonomy, classes)
        self.tokens = pc.tokenizer(self.captions)
        self.per_class = [np.flatnonzero(self.valid[:, j]) for j in range(len(classes))]

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens of the distinct captions drawn, positives matrix images × captions)."""
        idx = np.array([c[rng.integers(len(c))] for c in (self.per_class[y] for y in labels)])
        uniq = np.unique(idx)
        pos = torch.from_numpy(self.valid[uniq][:, labels].T.copy())
        return self.tokens[torch.from_numpy(uniq)], pos


def train_step(pc: PlanktonClip, opt: torch.optim.Optimizer, x: torch.Tensor, tokens: torch.Tensor,
               positives: torch.Tensor, outliers: torch.Tensor | None = None, oe_weight: float = 0.0,
               trunk_features: torch.Tensor | None = None) -> float:
    """One contrastive step; with ``outliers``, plus ``oe_weight`` × their flat-similarity loss
    against the same captions (one image-tower pass for both). With ``trunk_features`` (locked-
    image tuning) the images are those cached features and ``x`` is not used."""
    clip = pc.clip
    if trunk_features is not None:
        n = trunk_features.shape[0]
        img = pc.embed_trunk_features(trunk_features)
    else:
        n = x.shape[0]
        img = pc.encode_image(x if outliers is None else torch.cat([x, outliers]).contiguous(memory_format=torch.channels_last))
    txt = pc.encode_text_tokens(tokens)
    logits = clip.logit_scale.exp() * img @ txt.T
    loss = multi_positive_loss(logits[:n], positives)
    if outliers is not None and oe_weight > 0:
        loss = loss + oe_weight * flat_similarity_loss(logits[n:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for q in clip.parameters() if q.requires_grad], 5.0)
    opt.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0, math.log(100))
    return float(loss.item())


@torch.no_grad()
def validate(pc: PlanktonClip, known_val, held_val, known_classes: list[str], heldout: list[str], taxonomy,
             limit: int = 3000) -> dict:
    """Known-class val accuracy by prompts and held-out val zero-shot top-1 (monitoring only)."""
    pc.eval()
    pc.clear_cache()
    out = {}
    if len(known_val.images):
        n = min(limit, len(known_val.images))
        idx = np.linspace(0, len(known_val.images) - 1, n).astype(int)
        f = torch.from_numpy(pc.image_features(known_val.images[idx]))
        pred = (f @ pc.class_embeddings(known_classes, taxonomy).T).argmax(1).numpy()
        out["val_known_accuracy"] = round(float((pred == known_val.labels["class"][idx]).mean()), 4)
    if heldout and len(held_val.images):
        z = zero_shot_eval(pc, held_val.images, held_val.rows["class"].tolist(), heldout, taxonomy, ks=(1,))
        out["val_heldout_zero_shot_top1"] = round(z["heldout_names"]["top1"], 4)
    pc.clear_cache()
    return out


def evaluate_test(pc: PlanktonClip, df, images, taxonomy, heldout: list[str]) -> dict:
    """Test-split metrics: the CLIP as a classifier over all names, on all test images and on
    the known classes' ones, and zero-shot identification of the held-out classes."""
    pc.eval()
    pc.clear_cache()
    clf = ClipClassifier(pc, taxonomy).eval()
    rows = df[df["split"] == "test"]
    probs = predict_arrays(clf, np.asarray(images[rows.index.to_numpy()]))
    labels = labels_for(rows, taxonomy)
    known = ~rows["heldout"].to_numpy()
    metrics = {"test": evaluate_predictions(probs, labels, taxonomy)}
    if (~known).any():
        metrics["test_known"] = evaluate_predictions({k: v[known] for k, v in probs.items()},
                                                     {k: v[known] for k, v in labels.items()}, taxonomy)
        held = rows[~known]
        metrics["zero_shot"] = zero_shot_eval(pc, np.asarray(images[held.index.to_numpy()]), held["class"].tolist(),
                                              heldout, taxonomy)
    return metrics


def train(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    name = args.name or f"{args.dataset}-clip"
    run_dir = Path(args.runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m models.clip_train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    progress = not args.no_progress

    src, df, images, known_tax, held = load_dataset(args.dataset, 64, args.holdout, limit_per_class=args.limit_per_class)
    taxonomy = src.taxonomy()
    known_classes = list(known_tax.classes)
    train_set = subset(df, images, known_tax, "train")
    known_val = subset(df, images, known_tax, "val")
    held_val = subset(df, images, known_tax, "val", heldout=True)
    mean, std = float(train_set.images.mean() / 255.0), float(train_set.images.std() / 255.0)
    pp = {"size": 64, "channels": 1, "polarity": "foreground", "mean": round(mean, 4), "std": round(std, 4)}
    base, init_sha, locked, lock_sha = None, None, None, None
    if args.lock_image_from:
        if args.init_from or args.outlier_exposure != "none":
            raise SystemExit("--lock-image-from cannot be combined with --init-from or --outlier-exposure")
        lm = open_model(args.lock_image_from)
        if lm.kind != "classifier":
            raise SystemExit(f"--lock-image-from {args.lock_image_from}: a supervised classifier is needed, not kind {lm.kind!r}")
        if sorted(lm.manifest.get("heldout") or []) != sorted(held):
            raise SystemExit(f"--lock-image-from {args.lock_image_from}: it was trained with other held-out classes "
                             "(the zero-shot classes must be unseen by the image tower too)")
        locked, lock_sha = lm.classifier, lm.sha256
        pp = dict(lm.preprocessing)
        if args.config == DEFAULT_CONFIG:
            args.config = LIT_CONFIGS.get(str(lm.manifest.get("config", {}).get("stem_mode", "stride2")), args.config)
    if args.init_from:
        lm = open_model(args.init_from)
        base, base_man = lm.require_clip(), lm.manifest
        if sorted(base_man.get("heldout") or []) != sorted(held):
            raise SystemExit(f"--init-from {args.init_from}: it was trained with other held-out classes")
        pp, init_sha = dict(base_man["preprocessing"]), base_man.get("sha256")
    pc = create_clip(args.config, pp, taxonomy, held, seed=args.seed)
    if base is not None:
        if base.model_name != pc.model_name:
            raise SystemExit(f"--init-from {args.init_from}: config {base.model_name!r}, not {pc.model_name!r}")
        pc.clip.load_state_dict(base.clip.state_dict())
        del base
    if locked is not None:
        lock_image_tower(pc, locked)
        del locked
    freeze_bn = args.freeze_bn == "yes" or (args.freeze_bn == "auto" and bool(args.init_from))
    pc.clip.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(pc.clip, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    captions = CaptionSampler(pc, taxonomy, known_classes)

    n_train = len(train_set.images)
    bs = min(args.batch_size, n_train)
    spe = max(1, n_train // bs)
    total = spe * args.epochs
    warm = max(1, min(300, total // 20))
    budget = args.minutes * 60 if args.minutes else None

    state_path = run_dir / "last.pt"
    lit_features = None
    if args.lock_image_from:
        lit_features = cached_trunk_features(pc, train_set.images, max(1, args.lit_views), args.seed,
                                             run_dir / "lit_features.pt", lock_sha or "", progress)
    epoch, batch, step, elapsed, history, wall0 = 0, 0, 0, 0.0, [], 0.0
    t_start = time.time()
    if state_path.exists() and not args.fresh:
        st = load_training_state(state_path)
        if st.get("config") != pc.model_name:
            raise SystemExit(f"{state_path} was trained with config {st.get('config')!r}; use --fresh to start over")
        pc.clip.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        epoch, batch, step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        elapsed, history, wall0 = float(st["elapsed"]), json.loads(st["history"]), float(st.get("wall", 0.0))
        print(f"resuming {name} at epoch {epoch + 1}, step {step}, {elapsed / 60:.1f} min trained", file=sys.stderr)

    def progress_of(step: int, elapsed: float) -> float:
        p = step / total
        return max(p, elapsed / budget) if budget else p

    def save_state() -> None:
        save_training_state(state_path, {"model": pc.clip.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                         "batch": batch, "step": step, "elapsed": elapsed, "config": pc.model_name,
                                         "wall": wall0 + time.time() - t_start,
                                         "history": json.dumps(history)})

    labels = train_set.labels["class"]
    probs = class_weights(labels, args.sampler)
    done = progress_of(step, elapsed) >= 1 or (args.max_steps is not None and step >= args.max_steps)
    last_save = time.time()
    while epoch < args.epochs and not done:
        set_train_mode(pc, freeze_bn, lit_features is not None)
        rng = np.random.default_rng(args.seed * 1000 + epoch)
        order = rng.choice(n_train, n_train, p=probs) if probs is not None else rng.permutation(n_train)
        g = torch.Generator().manual_seed(args.seed * 1000003 + epoch * 1009 + batch)
        crng = np.random.default_rng([args.seed, epoch, batch])
        bar = tqdm(range(batch, spe), desc=f"{name} epoch {epoch + 1}/{args.epochs}", disable=not progress, unit="step")
        run_loss, t_epoch, seen = None, time.time(), 0
        for b in bar:
            t0 = time.time()
            p = progress_of(step, elapsed)
            if p >= 1 or (args.max_steps is not None and step >= args.max_steps):
                done = True
                break
            lr = args.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            idx = np.sort(order[b * bs : (b + 1) * bs])
            tokens, pos = captions.sample(labels[idx], crng)
            x, xo, tf = None, None, None
            if lit_features is not None:
                views = crng.integers(lit_features.shape[0], size=len(idx))
                tf = lit_features[torch.from_numpy(views), torch.from_numpy(idx)]
            else:
                x = augment(images_to_tensor(train_set.images[idx]), g).contiguous(memory_format=torch.channels_last)
            if args.outlier_exposure != "none":
                xo = clip_outliers(x, torch.from_numpy(labels[idx].astype(np.int64)), args.outlier_exposure,
                                   args.oe_fraction, g)
            loss = train_step(pc, opt, x, tokens, pos, xo, args.oe_weight, tf)
            step, batch, seen = step + 1, b + 1, seen + len(idx)
            elapsed += time.time() - t0
            run_loss = loss if run_loss is None else 0.98 * run_loss + 0.02 * loss
            bar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{lr:.1e}", T=f"{pc.logit_scale:.0f}",
                            ips=f"{seen / max(1e-9, time.time() - t_epoch):.0f}")
            if time.time() - last_save > args.save_every * 60:
                save_state()
                last_save = time.time()
        bar.close()
        if batch >= spe:
            entry = {"epoch": epoch + 1, "step": step, "train_loss": round(run_loss or float("nan"), 4),
                     "images_per_s": round(seen / max(1e-9, time.time() - t_epoch), 1), "trained_min": round(elapsed / 60, 2),
                     **validate(pc, known_val, held_val, known_classes, held, taxonomy)}
            history.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            epoch, batch = epoch + 1, 0
        save_state()
        last_save = time.time()

    metrics = evaluate_test(pc, df, images, taxonomy, held)
    pc.cpu().eval()
    pc.clip.to(memory_format=torch.contiguous_format)
    mpath = save_clip_checkpoint(
        pc, Path(args.export_dir) / name, dataset=args.dataset, split_seed=DEFAULT_SEED, holdout=args.holdout,
        command=command, metrics=metrics, history=history, train_args=vars(args), train_images=n_train,
        train_steps=step, train_time_s=round(elapsed, 1), wall_time_s=round(wall0 + time.time() - t_start, 1),
        captions=len(captions.captions), init_from=args.init_from, init_sha256=init_sha,
        locked_image_from=None if not args.lock_image_from else
        {"model": args.lock_image_from, "sha256": lock_sha, "views": max(1, args.lit_views)},
        outlier_exposure=None if args.outlier_exposure == "none" else
        {"kind": args.outlier_exposure, "weight": args.oe_weight, "fraction": args.oe_fraction, "freeze_bn": freeze_bn},
    )
    z = metrics.get("zero_shot", {}).get("heldout_names", {})
    print(f"saved {mpath}  test accuracy {metrics['test']['leaf']['accuracy']:.3f}  "
          f"zero-shot top-1 {z.get('top1', float('nan')):.3f}", file=sys.stderr)
    return {"manifest": str(mpath), "metrics": metrics, "history": history}


if __name__ == "__main__":
    train()
