"""``python -m data info [--json]``: what datasets were found and what they hold."""
from __future__ import annotations

import argparse
import json
import sys

from .info import all_info
from .paths import WHERE_TO_GET, datasets_root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="summarise the datasets found")
    p.add_argument("--json", action="store_true", help="print JSON keyed by dataset name")
    a = sub.add_parser("add", help="register a collection of your own images under a name")
    a.add_argument("name")
    a.add_argument("path", help="a folder or zip: EcoTaxa export or import bundle, ImageFolder, or unlabelled images")
    a.add_argument("--polarity", choices=("dark-on-light", "light-on-dark"), help="override the detected polarity")
    a.add_argument("--background", type=int, metavar="LEVEL", help="override the background grey level (0-255)")
    r = sub.add_parser("remove", help="unregister a user collection (its files stay)")
    r.add_argument("name")
    args = ap.parse_args(argv)
    if args.cmd in ("add", "remove"):
        from .collections import CollectionError, add_collection, remove_collection

        try:
            if args.cmd == "add":
                e = add_collection(args.name, args.path, polarity=args.polarity, background=args.background)
                print(f"added collection {args.name}: {e['kind']}, {e['images']:,} images ({e['path']})")
            else:
                e = remove_collection(args.name)
                print(f"removed collection {args.name} ({e['path']}; its files are untouched)")
        except CollectionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    info = all_info(progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info else 1
    if not info:
        print(WHERE_TO_GET, file=sys.stderr)
        return 1
    print(f"datasets folder: {datasets_root()}")
    if any(d.get("sample") for d in info.values()):
        print("No full dataset was found: the pages run on the small NDSB sample in data/sample/ "
              "(10 images per class). " + WHERE_TO_GET.splitlines()[1])
    for name, d in info.items():
        if "error" in d:
            print(f"\n{name}  ({d['path']})\n  cannot be read: {d['error']}")
            continue
        print(f"\n{name}  ({d['format']}: {d['path']})")
        print(f"  images {d['images']:,} ({d['labelled']:,} with a validated label)   classes {d['classes']}   "
              f"taxonomy depth {d['taxonomy_depth']} (v{d['taxonomy_version']})   kind {d['kind']}"
              + (f"   {d['problems']} problems (skipped or unreadable files)" if d["problems"] else ""))
        print("  classes per level: " + ", ".join(f"{k} {v}" for k, v in d["levels"].items()))
        print("  splits: " + ", ".join(f"{k} {v:,}" for k, v in d["splits"].items()))
        print(f"  images per class: {d['images_per_class']['min']}–{d['images_per_class']['max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
