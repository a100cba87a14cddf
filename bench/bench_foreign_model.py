"""A biologist's own model: register a 224 px ResNet-18 and explain one image, beside the default model.

    python bench/bench_foreign_model.py [--repeats 10] [--size 224]

Builds a timm ``resnet18`` over NDSB's 121 classes (random weights: speed does not depend on
them), saves its ``state_dict`` and registers it with ``python -m models add`` into a temporary
model folder, then prints, in one run on this machine: the time to register it, to open it
(``models.open_model``, sha256 check included) and, warm, predict + Integrated Gradients
(32 steps) + GradCAM on one real NDSB test image (``bench/bench_explain.py``'s measurement),
for the imported model and for the dashboard's default model, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_foreign_model.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import timm
    import torch

    from bench.bench_explain import bench_warm
    from data.taxonomy import load_taxonomy
    from models.handle import clear_cache, open_model
    from models.zoo import default_model_name

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PLANKTON_LENS_ZOO"] = tmp
        classes = load_taxonomy("ndsb").classes
        weights = Path(tmp) / "lab_resnet18.pth"
        torch.save(timm.create_model("resnet18", num_classes=len(classes)).state_dict(), weights)
        (Path(tmp) / "classes.txt").write_text("\n".join(classes))
        from models.__main__ import main as models_cli

        t0 = time.perf_counter()
        rc = models_cli(["add", str(weights), "--name", "bench-resnet18", "--arch", "resnet18",
                         "--classes", str(Path(tmp) / "classes.txt"), "--size", str(args.size)])
        t_add = time.perf_counter() - t0
        if rc != 0:
            return rc
        clear_cache()
        t0 = time.perf_counter()
        open_model("bench-resnet18")
        t_open = time.perf_counter() - t0
        foreign = bench_warm("bench-resnet18", args.repeats)
        default = bench_warm(default_model_name(), args.repeats)
    out = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "register_s": round(t_add, 3),
           "open_s": round(t_open, 3), "foreign": foreign, "default": default,
           "ratio_median": round(foreign["median"] / default["median"], 2)}
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"threads {out['threads']}, load average {out['load_average']:.2f}")
    print(f"register (python -m models add, {args.size} px ResNet-18): {t_add:.2f} s; open_model (sha256 + build): {t_open:.2f} s")
    for label, r in (("imported resnet18", foreign), (f"default {default['model']}", default)):
        print(f"{label:<24} predict + IG(32) + GradCAM: median {r['median']:.3f} s, p90 {r['p90']:.3f} s "
              f"(predict {r['predict_median']:.3f}, IG {r['integrated_gradients_median']:.3f}, GradCAM {r['gradcam_median']:.3f})")
    print(f"ratio imported / default (median): {out['ratio_median']:.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
