"""``python -m models add PATH --name NAME [...]`` / ``python -m models remove NAME``: bring your own model.

Examples (one per format):
  python -m models add lab_resnet18.pth --name lab-resnet18 --arch resnet18 --classes classes.txt
  python -m models add effnet.safetensors --name lab-effnet --arch torchvision/efficientnet_b0 --dataset ndsb
  python -m models add hub_cache/timm-convnext/ --name lab-convnext            (config.json + model.safetensors)
  python -m models add traced.pt --name lab-traced --classes classes.txt       (TorchScript)
  python -m models add whole_model.pt --name lab-whole --classes classes.txt --trust-pickle
  python -m models add bioclip/ --name bioclip --dataset ndsb                  (open_clip folder)
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="register a model trained elsewhere in the user's model folder")
    a.add_argument("path", help="weights file, TorchScript file, or timm / Hugging Face / open_clip folder")
    a.add_argument("--name", required=True, help="the name pages and commands will know it by")
    a.add_argument("--arch", help="timm or torchvision architecture (timm/NAME, torchvision/NAME), or open_clip model name")
    a.add_argument("--classes", help="class list: text (one per line), JSON, or an EcoTaxa export TSV")
    a.add_argument("--taxonomy", help="CSV (class + one column per level) or EcoTaxa hierarchy strings")
    a.add_argument("--dataset", help="the dataset its classes come from (ndsb, zoolake): taxonomy and test images")
    a.add_argument("--size", type=int, help="input size in pixels (default: the folder's config, else 224)")
    a.add_argument("--mean", type=_floats, help="per-channel mean, e.g. '0.485 0.456 0.406' (default ImageNet)")
    a.add_argument("--std", type=_floats, help="per-channel std (default ImageNet)")
    a.add_argument("--polarity", choices=("dark-on-light", "light-on-dark"),
                   help="what the model was trained on: dark organisms on a light background (default: ZooScan, "
                        "ISIIS, FlowCam) or light ones on a dark background (dark-field: UVP, ZooLake); every "
                        "image is shown to it in that polarity, whatever its instrument")
    a.add_argument("--layer", help="module name GradCAM should target (default: found automatically)")
    a.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole model saved with torch.save (unpickling runs code from the file: only for files you trust)")
    a.add_argument("--json", action="store_true", help="print the manifest as JSON")
    r = sub.add_parser("remove", help="unregister a model added with 'add'")
    r.add_argument("name")
    args = ap.parse_args(argv)

    from .foreign import ModelImportError
    from .importer import add_model, remove_model

    try:
        if args.cmd == "remove":
            print(f"removed {remove_model(args.name)}")
            return 0
        if args.trust_pickle:
            print("warning: --trust-pickle unpickles the file, which can run any code it holds; use it only for files you trust.",
                  file=sys.stderr)
        cmd = "python -m models " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        man = add_model(args.path, args.name, arch=args.arch, classes=args.classes, taxonomy=args.taxonomy,
                        size=args.size, mean=args.mean, std=args.std, polarity=args.polarity, layer=args.layer,
                        dataset=args.dataset, trust_pickle=args.trust_pickle, command=cmd)
    except ModelImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(man, indent=1, default=str))
    else:
        from .zoo import user_zoo_dir

        lv = ", ".join(f"{lvl} ({len(man['class_names'][lvl]) if 'class_names' in man else '?'})" for lvl in man.get("levels", []))
        print(f"added {man['name']} ({man.get('arch')}, {man['preprocessing']['size']} px) to {user_zoo_dir()}"
              + (f"; levels: {lv}" if lv else "") + (f"; GradCAM layer: {man.get('gradcam_layer')}" if man.get("gradcam_layer") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
