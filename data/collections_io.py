"""A biologist's own image collection, from a folder or a zip: what it is, and a Source to read it.

:func:`detect_collection` tells the layout from the content (never from file names):

* ``"ecotaxa-import"``: EcoTaxa import tables (a header row, then a ``[t]``/``[f]`` type row) beside
  their images, one folder per sample or one flat bundle, or a zip of such (UVP6: a zip of zips);
* ``"ecotaxa-export"``: EcoTaxa export tables (quoted fields, no type row) with ``images/<category>/``;
* ``"imagefolder"``: one folder of images per class (at least two), under the root or its one top folder;
* ``"flat"``: unlabelled images anywhere below the root.

:func:`open_collection` returns the matching :class:`~data.folders.CollectionSource`
(:class:`~data.ecotaxa.EcoTaxaCollection`, :class:`~data.folders.ImageFolderCollection`,
:class:`~data.folders.FlatCollection`): a Source for ``build_manifest`` and the pages, with
``metadata()`` and ``problems``.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

from .decode import Background, ImageDecodeError, decode_image, estimate_background
from .archive import ArchiveLimits, CollectionError, FileTree, Problem, check_path
from .ecotaxa import EcoTaxaCollection, sniff_table
from .folders import CollectionSource, FlatCollection, ImageFolderCollection, is_image_name

KINDS = ("ecotaxa-import", "ecotaxa-export", "imagefolder", "flat")
_SNIFF_BYTES = 64 * 1024
_MAX_TABLE_BYTES = 1 << 30


def _tables(tree: FileTree, only: str | None = None) -> tuple[dict[str, str], list[Problem]]:
    """EcoTaxa tables in the tree ({relpath: "import" | "export"}), found by their first line."""
    found, problems = {}, []
    for n in [only] if only else tree.names():
        if is_image_name(n):
            continue
        size = tree.size(n)
        if size > _MAX_TABLE_BYTES:
            continue
        if size == 0 or not tree.read(n)[:_SNIFF_BYTES].strip():
            if only or n.lower().endswith((".tsv", ".txt")):
                problems.append(Problem(n, "empty_table", f"{n} is empty"))
            continue
        kind = sniff_table(tree.read(n)[:_SNIFF_BYTES])
        if kind:
            found[n] = kind
        elif only:
            problems.append(Problem(n, "not_ecotaxa", f"{n} is not an EcoTaxa table: its first line names "
                                    "neither img_file_name nor object_id"))
    return found, problems


def _classify(tree: FileTree, tables: dict[str, str]) -> tuple[str, str]:
    """(kind, prefix) of a tree; prefix is the folder holding <class>/ folders for "imagefolder"."""
    if tables:
        return ("ecotaxa-export" if all(k == "export" for k in tables.values()) else "ecotaxa-import"), ""
    images = [n for n in tree.names() if is_image_name(n)]
    if not images:
        raise CollectionError(f"{tree.root} holds no images and no EcoTaxa table (looked for .jpg, .png, .tif, "
                              ".bmp images and TSV files whose first line names img_file_name)"
                              + _why(tree.problems))
    parents = [PurePosixPath(n).parent for n in images]
    depth = Counter(len(p.parts) for p in parents)
    if set(depth) == {1} and len({p.parts[0] for p in parents}) >= 2:
        return "imagefolder", ""
    if set(depth) == {2} and len({p.parts[0] for p in parents}) == 1 and len({p.parts[1] for p in parents}) >= 2:
        return "imagefolder", parents[0].parts[0]
    return "flat", ""


def _why(problems: list[Problem]) -> str:
    return (" — " + "; ".join(p.message for p in problems[:3])) if problems else ""


def _open_tree(path: str | Path, limits: ArchiveLimits) -> tuple[FileTree, str | None]:
    """The tree to read and, when ``path`` is one table file, that table's relpath."""
    p = check_path(path)
    if p.is_file() and not _is_zip(p):
        return FileTree(p.parent, limits), p.name
    return FileTree(p, limits), None


def _is_zip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def detect_collection(path: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> str:
    """One of :data:`KINDS` for a folder, a zip or one EcoTaxa table; :class:`CollectionError` with a
    message for anything else (:class:`~data.sources.DatasetNotFound` when the path does not exist)."""
    tree, only = _open_tree(path, limits)
    tables, problems = _tables(tree, only)
    if only and not tables:
        raise CollectionError(_why(problems).removeprefix(" — ") or f"{path} is not an EcoTaxa table")
    return _classify(tree, tables)[0]


def open_collection(path: str | Path, name: str | None = None, limits: ArchiveLimits = ArchiveLimits()) -> CollectionSource:
    """A Source for the collection at ``path`` (folder, zip, or one EcoTaxa TSV), named ``name``
    (default: the folder / file stem). Archive members and rows that were refused or are missing
    are listed in its ``problems``."""
    tree, only = _open_tree(path, limits)
    tables, problems = _tables(tree, only)
    if only and not tables:
        raise CollectionError(_why(problems).removeprefix(" — ") or f"{path} is not an EcoTaxa table")
    kind, prefix = _classify(tree, tables)
    p = Path(path)
    name = name or (p.stem if p.suffix else p.name)
    common = dict(tree=tree, kind=kind, problems=[*tree.problems, *problems])
    if kind.startswith("ecotaxa"):
        src: CollectionSource = EcoTaxaCollection(name, tree.root, "", tables=sorted(tables), **common)
        src.metadata()  # parse now: a table without readable rows fails here, with its message
    else:
        cls = ImageFolderCollection if kind == "imagefolder" else FlatCollection
        src = cls(name, tree.root, prefix, **common)
    src.background = _background(src)
    return src


def _background(src: CollectionSource, n: int = 7) -> int | Background:
    """The collection's background, once for all its images: the majority polarity of the image
    borders of the first ``n`` readable images (:func:`data.decode.estimate_background`) and their
    median grey level; 255 (white, ZooScan / shadowgraph) or 0 (black, UVP / dark-field) when the
    level is near either end, 255 when no image can be read."""
    votes: list[Background] = []
    for rel, _ in src.files()[:n]:
        try:
            votes.append(estimate_background(decode_image(src.read_bytes(rel), mode="L").image))
        except (ImageDecodeError, OSError, ValueError):
            continue
    if not votes:
        return 255
    dark = [v for v in votes if v.polarity == "dark-on-light"]
    light = [v for v in votes if v.polarity == "light-on-dark"]
    side = dark if len(dark) >= len(light) else light
    level = int(sorted(v.level for v in side)[len(side) // 2])
    if side is dark and level >= 235:
        return 255
    if side is light and level <= 20:
        return 0
    return Background(level, side[0].polarity)
