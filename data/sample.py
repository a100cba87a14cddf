"""The NDSB sample that ships with the project: a few real images per class, used when no dataset is found.

    python -m data.sample build [--archive PATH] [--per-class 10]

builds ``data/sample/ndsb_sample.zip`` from the published NDSB archive (``train/<class>/<file>``,
the same layout): for every class, the ``per_class`` files whose names hash lowest under a fixed
key, so the pick is deterministic and independent of the archive's listing order. The images
are copied byte for byte (never re-encoded); ``data/sample/README.md`` cites their source.
``data.sources.open_source("ndsb")`` opens the sample when the full dataset is not found.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLE_ZIP = SAMPLE_DIR / "ndsb_sample.zip"
#: Each sample image's split in the full archive's manifest (relpath, split), written with the zip.
SAMPLE_SPLITS = SAMPLE_DIR / "ndsb_sample_splits.csv"
PER_CLASS = 10
KEY = "plankton-lens-sample-v1"
MAX_BYTES = 3 * 1024 * 1024


def _rank(name: str) -> str:
    return hashlib.sha1(f"{KEY}:{name}".encode()).hexdigest()


def sample_splits() -> dict[str, str]:
    """{relpath: split} of the sample's images in the full NDSB manifest (empty when absent)."""
    import csv

    if not SAMPLE_SPLITS.is_file():
        return {}
    with open(SAMPLE_SPLITS, newline="") as f:
        return {r["relpath"]: r["split"] for r in csv.DictReader(f)}


def build_sample(archive: Path, out: Path = SAMPLE_ZIP, per_class: int = PER_CLASS) -> dict:
    """Write the sample zip from the NDSB archive, and each image's split in the full archive's
    manifest (:data:`SAMPLE_SPLITS`); returns its counts and size."""
    from .manifest import build_manifest
    from .sources import Source

    full = build_manifest(Source("ndsb", archive, "train", "L", 255, taxonomy_name="ndsb"), progress=False)
    split_of = dict(zip(full["relpath"], full["split"]))
    by_class: dict[str, list[zipfile.ZipInfo]] = defaultdict(list)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[0] == "train" and parts[2].lower().endswith(".jpg"):
                by_class[parts[1]].append(info)
        if not by_class:
            raise SystemExit(f"{archive} holds no train/<class>/<file>.jpg images: is it the NDSB training archive?")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        n = 0
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as w:
            for cls in sorted(by_class):
                for info in sorted(by_class[cls], key=lambda i: _rank(i.filename))[:per_class]:
                    zi = zipfile.ZipInfo(info.filename, date_time=(2015, 3, 16, 0, 0, 0))  # fixed: same bytes every build
                    w.writestr(zi, z.read(info))
                    n += 1
        tmp.replace(out)
    with zipfile.ZipFile(out) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
    SAMPLE_SPLITS.write_text("relpath,split\n" + "".join(f"{n},{split_of[n]}\n" for n in names))
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"the sample is {size / 2**20:.1f} MB, above {MAX_BYTES / 2**20:.0f} MB: lower --per-class")
    return {"path": str(out), "classes": len(by_class), "images": n, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    from .paths import datasets_root

    ap = argparse.ArgumentParser(prog="python -m data.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build data/sample/ndsb_sample.zip from the NDSB archive")
    b.add_argument("--archive", type=Path, help="ndsb_train.zip (default: the datasets folder's)")
    b.add_argument("--per-class", type=int, default=PER_CLASS)
    args = ap.parse_args(argv)
    archive = args.archive or ((datasets_root() or Path(".")) / "ndsb" / "ndsb_train.zip")
    if not archive.is_file():
        print(f"error: {archive} not found: pass --archive PATH", file=sys.stderr)
        return 2
    r = build_sample(archive, per_class=args.per_class)
    print(f"{r['path']}: {r['images']} images of {r['classes']} classes, {r['bytes'] / 2**20:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
