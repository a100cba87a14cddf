"""Can two CLIP models' anomaly parts together do better than either? (issue 7, exploration)

    python bench/clip_two_model_anomaly.py [A B]     (default: ndsb-clip-oe ndsb-clip)

The outlier-exposure fine-tune (ndsb-clip-oe) separates chimeras and natural images by MCM
but its kNN part fell to chance, while the plain ndsb-clip's kNN part is strong on natural
images. This scores the same sets as ``python bench/clip_benchmark.py`` (known-class test
images against 1,000 test chimeras, the scikit-image natural images, the ZooLake sample and the
held-out taxa) with each model's MCM and kNN parts, z-scored on validation images and weighted
by max(0, AUROC − 0.5) on chimeras of validation images, as the benchmark does, and prints the
AUROC (%) of each part and of the combinations A alone, B alone, A's MCM + B's kNN, and all four.
Not part of the benchmark.
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.handle import open_model  # noqa: E402
from explain.clip import AnomalyScorer, above_chance_weights, auroc, make_chimeras, natural_images, zoolake_images  # noqa: E402
from models.data import load_dataset  # noqa: E402

SETS = ["chimeras", "natural", "zoolake", "heldout"]


def report(sel: list[str], z: dict, w_auc: dict) -> None:
    """AUROC (%) per set of the weighted sum of the z-scored parts ``sel``."""
    w = above_chance_weights({p: w_auc[p] for p in sel})
    comb = {s: sum(w[p] * z[p][s] for p in sel) for s in ["test", *SETS]}
    print(" + ".join(f"{p}×{w[p]:.2f}" for p in sel), {s: round(100 * auroc(comb["test"], comb[s]), 1) for s in SETS})


def main(names: list[str]) -> int:
    pcs = {n: (open_model(n).require_clip(), open_model(n).manifest) for n in names}
    pc0, man = pcs[names[0]]
    tax = pc0.taxonomy
    _, df, images, _, held = load_dataset(man.get("dataset", "ndsb"), 64, man.get("holdout") or "default")
    held = man.get("heldout") or held
    known = [c for c in tax.classes if c not in held]
    rows = {s: df[(df["split"] == s) & ~df["heldout"]] for s in ("train", "val", "test")}
    img = lambda r: np.asarray(images[r.index.to_numpy()])  # noqa: E731
    leaf_index = {c: i for i, c in enumerate(tax.classes)}
    leaf_of = lambda r: r["class"].map(leaf_index).to_numpy()  # noqa: E731
    sets_img = {"val_chim": make_chimeras(img(rows["val"]), leaf_of(rows["val"]), 1000, 1),
                "chimeras": make_chimeras(img(rows["test"]), leaf_of(rows["test"]), 1000, 0),
                "natural": natural_images(64), "zoolake": zoolake_images(64, None),
                "heldout": np.asarray(images[df[(df["split"] == "test") & df["heldout"]].index.to_numpy()])}
    parts = {}
    for n, (pc, _) in pcs.items():
        t = time.time()
        f = {s: pc.image_features(img(r)) for s, r in rows.items()}
        fs = {s: pc.image_features(a) for s, a in sets_img.items()}
        sc = AnomalyScorer.fit(pc, f["train"], known, f["val"])
        for s, feats in [("val", f["val"]), ("test", f["test"])] + list(fs.items()):
            for part, v in sc.components(feats).items():
                parts.setdefault(f"{n}:{part}", {})[s] = v
        print(n, "features", round(time.time() - t), "s", file=sys.stderr)
    # z-score each part on val, weight by val-chimera AUROC - 0.5
    z = {p: {s: (v - d["val"].mean()) / (d["val"].std() or 1) for s, v in d.items()} for p, d in parts.items()}
    w_auc = {p: auroc(d["val"], d["val_chim"]) for p, d in parts.items()}
    print("validation-chimera AUROC per part:", {p: round(a, 3) for p, a in w_auc.items()})
    for p in parts:
        print(p, {s: round(100 * auroc(parts[p]["test"], parts[p][s]), 1) for s in SETS})
    a, b = names[:2]
    for sel in ([f"{a}:mcm", f"{a}:knn"], [f"{b}:mcm", f"{b}:knn"], [f"{a}:mcm", f"{b}:knn"], list(parts)):
        report(sel, z, w_auc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["ndsb-clip-oe", "ndsb-clip"]))
