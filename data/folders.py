"""A biologist's own image folders (or zips): one folder per class, or unlabelled images.

:class:`CollectionSource` is a :class:`~data.sources.Source` over a :class:`~data.archive.FileTree`
with a ``problems`` list and a ``metadata()`` table; :class:`ImageFolderCollection` and
:class:`FlatCollection` are its two folder layouts (EcoTaxa bundles are in :mod:`data.ecotaxa`).
Also here: :func:`parse_spc_name`, the acquisition time in a ZooLake (Scripps Plankton Camera) name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pandas as pd

from .archive import CollectionError, FileTree, Problem
from .sources import IMAGE_EXTS, Source, known_paths
from .taxonomy import Taxonomy, taxonomy_from_paths

#: The class of an image with no ground-truth label (unlabelled, or only predicted by EcoTaxa).
UNLABELLED = "unlabelled"
#: Its taxonomy path.
UNLABELLED_PATH = ("unknown", "unlabelled (group)", "unlabelled (subgroup)")

#: Columns every ``metadata()`` table has, in this order (EcoTaxa adds its object_* features).
META_COLUMNS = ["relpath", "object_id", "img_rank", "sample_id", "acq_id", "instrument", "lat", "lon",
                "timestamp", "depth_min", "depth_max", "category", "hierarchy", "status", "annotator"]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not PurePosixPath(name).name.startswith(("._", "."))


@dataclass
class CollectionSource(Source):
    """A Source over a FileTree: files(), read_bytes(), fingerprint(), taxonomy() plus
    ``metadata()`` (one row per image, keyed by relpath; :meth:`Source.metadata`) and ``problems``
    (what was skipped)."""

    tree: FileTree | None = None
    kind: str = ""
    problems: list[Problem] = field(default_factory=list)
    #: build_manifest decodes every image and drops (and reports) the unreadable ones.
    skip_unreadable: bool = True

    @property
    def is_zip(self) -> bool:
        return self.tree.is_zip

    def fingerprint(self) -> str:
        return self.tree.fingerprint()

    def read_bytes(self, relpath: str) -> bytes:
        return self.tree.read(relpath)

    def report(self, relpath: str, kind: str, message: str) -> None:
        """Record a problem once (e.g. an image found unreadable while indexing)."""
        p = Problem(relpath, kind, message)
        if p not in self.problems:
            self.problems.append(p)

    def _build_taxonomy(self) -> Taxonomy:
        classes = sorted({c for _, c in self.files()})
        paths = known_paths(classes)
        if UNLABELLED in paths:
            paths[UNLABELLED] = UNLABELLED_PATH
        return taxonomy_from_paths(self.name, paths)


def files_metadata(files: list[tuple[str, str]]) -> pd.DataFrame:
    """:data:`META_COLUMNS` of images known only by their files: the object id is the file's stem,
    the folder's class a validated category (none for unlabelled images), and the acquisition time
    is read from names that carry one (ZooLake / Scripps Plankton Camera, :func:`parse_spc_name`)."""
    rows = []
    for r, c in files:
        spc = parse_spc_name(r)
        rows.append({"relpath": r, "object_id": PurePosixPath(r).stem, "img_rank": 0, "category": c,
                     "status": "validated" if c != UNLABELLED else "empty",
                     "timestamp": spc["timestamp"] if spc else pd.NaT,
                     "instrument": "SPC" if spc else None})
    return _typed(pd.DataFrame(rows, columns=META_COLUMNS))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Metadata dtypes: floats for positions and depths, UTC datetimes, strings elsewhere."""
    for c in ("lat", "lon", "depth_min", "depth_max"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["img_rank"] = pd.to_numeric(df["img_rank"], errors="coerce").fillna(0).astype(int)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    for c in ("object_id", "sample_id", "acq_id", "instrument", "category", "hierarchy", "status", "annotator"):
        df[c] = df[c].fillna("").astype(str)
    return df


@dataclass
class ImageFolderCollection(CollectionSource):
    """``<class>/<image>`` under the root (or under its one top folder): every image is labelled."""

    def files(self) -> list[tuple[str, str]]:
        if self._files is None:
            pre = f"{self.prefix}/" if self.prefix else ""
            out = []
            for n in self.tree.names():
                parts = n[len(pre):].split("/") if n.startswith(pre) else []
                if len(parts) == 2 and is_image_name(n):
                    out.append((n, parts[0]))
            if not out:
                raise CollectionError(f"{self.root} holds no images in {pre or './'}<class>/<file> layout")
            self._files = sorted(out)
        return self._files


@dataclass
class FlatCollection(CollectionSource):
    """Unlabelled images anywhere under the root: every image has class :data:`UNLABELLED`."""

    def files(self) -> list[tuple[str, str]]:
        if self._files is None:
            out = [(n, UNLABELLED) for n in self.tree.names() if is_image_name(n)]
            if not out:
                raise CollectionError(f"{self.root} holds no images (looked for {', '.join(IMAGE_EXTS)})")
            self._files = sorted(out)
        return self._files


# --- ZooLake / Scripps Plankton Camera file names -----------------------------------------
_SPC = re.compile(r"^SPC-(?P<site>[A-Za-z0-9]+)-(?P<camera>[0-9A-Za-z]+)-(?P<usec>\d{13,17})-(?P<clock>\d+)"
                  r"-(?P<frame>\d+)-(?P<roi>\d+)-(?P<x>\d+)-(?P<y>\d+)-(?P<w>\d+)-(?P<h>\d+)\.\w+$")


def parse_spc_name(name: str) -> dict | None:
    """The fields of a Scripps Plankton Camera (ZooLake) image name, or None for another name.

    ``SPC-EAWAG-0P5X-1570543372901157-3725350526242-001629-055-1224-2176-84-64.jpeg`` is site
    EAWAG, camera 0P5X (0.5× objective), acquired at Unix time 1570543372.901157 s (microseconds
    in the name) = 2019-10-08 14:02:52.901157 UTC, camera clock 3725350526242, frame 1629, region
    of interest 55 at x=1224, y=2176, 84×64 pixels. ``timestamp`` is a UTC ``pandas.Timestamp``.
    """
    m = _SPC.match(PurePosixPath(name.replace("\\", "/")).name)
    if not m:
        return None
    g = m.groupdict()
    return {"site": g["site"], "camera": g["camera"], "timestamp": pd.Timestamp(int(g["usec"]), unit="us", tz="UTC"),
            "clock": int(g["clock"]), "frame": int(g["frame"]), "roi": int(g["roi"]),
            "x": int(g["x"]), "y": int(g["y"]), "width": int(g["w"]), "height": int(g["h"])}


def spc_acquisition_time(name: str) -> pd.Timestamp | None:
    """The UTC acquisition time in a ZooLake / SPC image name (None when the name has none)."""
    p = parse_spc_name(name)
    return p["timestamp"] if p else None
