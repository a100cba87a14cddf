"""Issue 17: does the image's original size carry information the model's input has lost?

    python bench/size_probe.py [--model ndsb-bacnn] [--json]

The decoder fits every image to the model's square (the longer side fills it), so a 40-pixel
copepod and a 400-pixel one reach the network alike. The manifest keeps each image's width and
height. This probe fits two multinomial logistic regressions on the model's frozen embeddings of
the training split: one on the embeddings alone, one on the embeddings plus five size features
(log width, log height, log longer side, log shorter side, aspect ratio), both standardised, and
scores both on the validation and test splits (held-out classes excluded). The gap between the
two is what a size input could add on top of this trunk; the model's own leaf head is printed
beside them. No checkpoint is written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.data import load_dataset, subset  # noqa: E402
from models.handle import open_model  # noqa: E402
from models.metrics import log_loss  # noqa: E402
from models.base import images_to_tensor  # noqa: E402
from models.train import predict_arrays  # noqa: E402


def size_features(rows) -> np.ndarray:
    """Five features of each image's stored size (pixels, as in the manifest)."""
    w = rows["width"].to_numpy(dtype=np.float64).clip(1)
    h = rows["height"].to_numpy(dtype=np.float64).clip(1)
    big, small = np.maximum(w, h), np.minimum(w, h)
    return np.stack([np.log(w), np.log(h), np.log(big), np.log(small), small / big], 1)


@torch.no_grad()
def embeddings(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = [model.embed(images_to_tensor(images[i:i + batch])).float().numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out)


def probe(x_train, y_train, xs: dict, n_classes: int, c: float) -> dict:
    """A standardised multinomial logistic regression fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
    clf.fit(x_train, y_train)
    out = {}
    for split, (x, y) in xs.items():
        p = np.zeros((len(x), n_classes))
        p[:, clf[-1].classes_] = clf.predict_proba(x)
        out[split] = {"accuracy": round(float((p.argmax(1) == y).mean()), 4), "log_loss": round(log_loss(y, p), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ndsb-bacnn")
    ap.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of both probes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    lm = open_model(args.model)
    model, manifest = lm.classifier, lm.manifest
    _, df, images, tax, _ = load_dataset(manifest.get("dataset", "ndsb"), int(model.preprocessing["size"]), manifest.get("holdout"))
    leaf = model.levels[-1]
    n = len(model.class_names[leaf])
    sets = {s: subset(df, images, model.taxonomy, s) for s in ("train", "val", "test")}
    emb = {s: embeddings(model, d.images) for s, d in sets.items()}
    size = {s: size_features(d.rows) for s, d in sets.items()}
    y = {s: d.labels[leaf] for s, d in sets.items()}
    head = {}
    for s in ("val", "test"):
        p = predict_arrays(model, sets[s].images)[leaf]
        head[s] = {"accuracy": round(float((p.argmax(1) == y[s]).mean()), 4), "log_loss": round(log_loss(y[s], p), 4)}
    both = {s: np.concatenate([emb[s], size[s]], 1) for s in emb}
    result = {
        "model": args.model, "embedding_dim": int(emb["train"].shape[1]), "c": args.c,
        "n_images": {s: int(len(v)) for s, v in y.items()},
        "model_head": head,
        "probe_embedding": probe(emb["train"], y["train"], {s: (emb[s], y[s]) for s in ("val", "test")}, n, args.c),
        "probe_embedding_size": probe(both["train"], y["train"], {s: (both[s], y[s]) for s in ("val", "test")}, n, args.c),
        "probe_size_only": probe(size["train"], y["train"], {s: (size[s], y[s]) for s in ("val", "test")}, n, args.c),
    }
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.model}: leaf accuracy / log loss (val, test); embedding {result['embedding_dim']}-d, C = {args.c}")
    print("| classifier | val | test |\n|---|---|---|")
    for k in ("model_head", "probe_embedding", "probe_embedding_size", "probe_size_only"):
        r = result[k]
        print(f"| {k} | " + " | ".join(f"{100 * r[s]['accuracy']:.1f} % / {r[s]['log_loss']:.3f}" for s in ("val", "test")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
