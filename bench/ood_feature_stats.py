"""Can a classifier's intermediate features tell ZooLake images from NDSB ones?

    python bench/ood_feature_stats.py [--model ndsb-bacnn] [--fit 6000]

Issue 5's cross-instrument target (ZooLake vs. NDSB AUROC ≥ 98 %) is far from the scores of
``python bench/ood_benchmark.py`` (best 88.9 %, kNN on the embedding). Feature statistics of
shallow layers are known to separate covariate shift (Lee et al. 2018, multi-layer
Mahalanobis), so this prints the AUROC of ZooLake (the benchmark's 2,000-image sample) against
the NDSB test split for: each backbone stage's per-channel mean and standard deviation (kNN
cosine distance, k = 10, and a single-Gaussian Mahalanobis distance, both fitted on ``--fit``
random NDSB training images), a sum of the standardised Mahalanobis distances over the stages,
and three plain pixel statistics of the model input (mean, standard deviation, foreground share).
An exploration for issue 5, not part of the benchmark.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.manifest import build_manifest, decoded_array  # noqa: E402
from data.sources import open_source  # noqa: E402
from explain.embeddings import dataset_manifest  # noqa: E402
from explain.neighbours import build_index, knn_score, normalise  # noqa: E402
from explain.ood import auroc  # noqa: E402
from explain.ood import CONFIG  # noqa: E402
from explain.ood_evaluation import other_sample  # noqa: E402
from models.base import images_to_tensor  # noqa: E402
from models.handle import open_model  # noqa: E402


def stage_statistics(model, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Per-stage channel means and standard deviations, and pixel statistics of the input."""
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = model.normalise(images_to_tensor(np.array(images[i:i + batch])))
            for k, s in enumerate(model.backbone.forward_stages(x)):
                out.setdefault(f"stage {k + 1} mean", []).append(s.mean((2, 3)).numpy())
                out.setdefault(f"stage {k + 1} std", []).append(s.std((2, 3)).numpy())
            lo = x.amin((1, 2, 3), keepdim=True)
            pix = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), (x > lo + 0.05).float().mean((1, 2, 3))], 1)
            out.setdefault("input pixels (mean, std, foreground share)", []).append(pix.numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/ood_feature_stats.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ndsb-bacnn")
    ap.add_argument("--fit", type=int, default=6000, help="NDSB training images the statistics are fitted on")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lm = open_model(args.model)
    model, man = lm.classifier, lm.manifest
    model.eval()
    size = int(model.preprocessing["size"])
    src, rows = dataset_manifest("ndsb", man, None)
    images = decoded_array(src, rows, size, progress=False)
    split = rows["split"].to_numpy()
    fit = np.sort(np.random.default_rng(0).choice(np.flatnonzero(split == "train"), args.fit, replace=False))
    test = np.flatnonzero(split == "test")
    osrc = open_source(CONFIG["other_instrument"]["ndsb"])
    orows = other_sample(build_manifest(osrc, progress=False), CONFIG["other_sample"], CONFIG["other_per_class"])
    other = decoded_array(osrc, orows, size, progress=False)
    t0 = time.time()
    f_fit, f_id, f_ood = (stage_statistics(model, a) for a in (images[fit], images[test], other))
    print(f"{args.model}: {len(fit)} fitting, {len(test)} NDSB test and {len(other)} ZooLake images; features in {time.time() - t0:.0f} s")
    print(f"{'features':45s} {'kNN AUROC':>10s} {'Mahalanobis AUROC':>18s}")
    maha: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in f_fit:
        mu, sd = f_fit[name].mean(0), f_fit[name].std(0) + 1e-6
        a, b, c = ((f[name] - mu) / sd for f in (f_fit, f_id, f_ood))
        index = build_index(normalise(a.astype(np.float32)))
        k_id, k_ood = (knn_score(index, normalise(v.astype(np.float32)), 10) for v in (b, c))
        prec = np.linalg.inv(np.cov(a, rowvar=False) + 1e-3 * np.eye(a.shape[1]))
        m_fit, m_id, m_ood = (np.einsum("ij,jk,ik->i", v, prec, v) for v in (a, b, c))
        maha[name] = (m_id, m_ood, m_fit)
        print(f"{name:45s} {100 * auroc(k_id, k_ood):9.1f}% {100 * auroc(m_id, m_ood):17.1f}%")
    stages = [n for n in maha if n.startswith("stage")]
    tot_id = sum((maha[n][0] - maha[n][2].mean()) / maha[n][2].std() for n in stages)  # scaled on the fitting images
    tot_ood = sum((maha[n][1] - maha[n][2].mean()) / maha[n][2].std() for n in stages)
    print(f"{'sum of standardised Mahalanobis, every stage':45s} {'':>10s} {100 * auroc(tot_id, tot_ood):17.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
