"""Readers for plankton datasets as published (NDSB, ZooLake); a biologist's own collections
(ImageFolder, EcoTaxa bundles) are in :mod:`data.collections_io`.

A :class:`Source` lists ``(relpath, class)`` pairs and reads the bytes of one file, from a zip
archive (read in place, never extracted into the repository) or from a folder.
"""
from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .decode import Background
from .paths import datasets_root
from .taxonomy import Taxonomy, load_taxonomy, taxonomy_from_paths

if TYPE_CHECKING:
    import pandas as pd

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif")


class DatasetNotFound(FileNotFoundError):
    """A dataset path that does not exist or does not have the expected layout."""


@dataclass
class Source:
    """One dataset: where it is, how to list and read it, its colour handling and taxonomy."""

    name: str
    root: Path  # a .zip file or a folder
    prefix: str  # folder inside root that holds <class>/ folders ("train", "images", "")
    mode: str = "L"  # decode mode: NDSB stores 3 identical channels → "L"
    background: int | Background = 255  # 255 shadowgraph (white), 0 dark-field (black), or a collection's override
    taxonomy_name: str | None = None
    sample: bool = False  # the small sample shipped with the project (data/sample), not the full dataset
    kind: str = "dataset"  # what the content is: "dataset" (NDSB, ZooLake), "imagefolder", "ecotaxa-export", …
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _files: list[tuple[str, str]] | None = field(default=None, repr=False)
    _taxonomy: Taxonomy | None = field(default=None, repr=False)
    _metadata: "pd.DataFrame | None" = field(default=None, repr=False)

    @property
    def is_zip(self) -> bool:
        return self.root.is_file() and zipfile.is_zipfile(self.root)

    def fingerprint(self) -> str:
        """Changes when the archive or folder changes (size, mtime, path)."""
        st = self.root.stat()
        key = f"{self.name}|{self.root.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.prefix}"
        if self.sample:  # its splits come from data/sample/ndsb_sample_splits.csv (data.sample)
            from .sample import SAMPLE_SPLITS

            key += "|" + (hashlib.sha256(SAMPLE_SPLITS.read_bytes()).hexdigest() if SAMPLE_SPLITS.is_file() else "")
        if not self.is_zip:
            key += f"|{sum(1 for _ in self._walk())}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _zip(self) -> zipfile.ZipFile:
        # One handle per thread and process: ZipFile objects are not safe to share.
        z = getattr(self._local, "zip", None)
        if z is None or getattr(self._local, "pid", None) != os.getpid():
            z = zipfile.ZipFile(self.root)
            self._local.zip, self._local.pid = z, os.getpid()
        return z

    def _walk(self):
        base = self.root / self.prefix if self.prefix else self.root
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.lower().endswith(IMAGE_EXTS):
                    yield Path(dirpath, f).relative_to(self.root).as_posix()

    def files(self) -> list[tuple[str, str]]:
        """Sorted ``(relpath, class)`` pairs; relpath is relative to the archive / folder root."""
        if self._files is None:
            if self.is_zip:
                names = [n for n in self._zip().namelist() if n.lower().endswith(IMAGE_EXTS)]
            else:
                names = list(self._walk())
            pre = f"{self.prefix}/" if self.prefix else ""
            out = []
            for n in names:
                if pre and not n.startswith(pre):
                    continue
                parts = n[len(pre):].split("/")
                if len(parts) == 2:
                    out.append((n, parts[0]))
            if not out:
                raise DatasetNotFound(f"{self.root} holds no images in {pre or './'}<class>/<file> layout")
            self._files = sorted(out)
        return self._files

    def read_bytes(self, relpath: str) -> bytes:
        """Raw bytes of one image."""
        if self.is_zip:
            try:
                return self._zip().read(relpath)
            except KeyError:
                raise FileNotFoundError(f"{relpath} is not in {self.root}") from None
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents:
            raise FileNotFoundError(f"{relpath} is outside {self.root}")
        return p.read_bytes()

    def metadata(self) -> "pd.DataFrame":
        """One row per image (:data:`data.folders.META_COLUMNS`): object id, the class as a validated
        category and, where the file names carry it (ZooLake), the acquisition time in UTC.
        Computed once per source (every page run's status check reads it); a copy is returned."""
        from .folders import files_metadata

        if self._metadata is None:
            self._metadata = files_metadata(self.files())
        return self._metadata.copy()

    def taxonomy(self) -> Taxonomy:
        if self._taxonomy is None:
            self._taxonomy = self._build_taxonomy()
        return self._taxonomy

    def _build_taxonomy(self) -> Taxonomy:
        if self.taxonomy_name:
            return load_taxonomy(self.taxonomy_name)
        return taxonomy_from_paths(self.name, known_paths(sorted({c for _, c in self.files()})))


def known_paths(classes: list[str]) -> dict[str, tuple[str, str, str]]:
    """{class: (living, group, subgroup)}: the NDSB / ZooLake path of a known class name, else unknown."""
    known: dict[str, tuple[str, str, str]] = {}
    for tname in ("ndsb", "zoolake"):
        for row in load_taxonomy(tname).table.itertuples(index=False):
            known.setdefault(row[3], (row[0], row[1], row[2]))
    return {c: known.get(c, ("unknown", "unknown (group)", "unknown (subgroup)")) for c in classes}


def _locate(base: Path, archive: str, folder: str) -> tuple[Path, str] | None:
    """Find a dataset as its zip or as an extracted folder under ``base``."""
    z = base / archive
    if z.is_file():
        return z, folder
    if (base / folder).is_dir():
        return base, folder
    stem = base / Path(archive).stem
    if (stem / folder).is_dir():
        return stem, folder
    return None


KNOWN = {
    # name: (subfolder, archive, inner folder, decode mode, background)
    "ndsb": ("ndsb", "ndsb_train.zip", "train", "L", 255),
    "zoolake": ("zoolake", "zoolake_v1.zip", "images", "RGB", 0),
}


#: Samples shipped with the project, opened when the full dataset is not found (data/sample.py).
SAMPLES = {"ndsb": Path(__file__).resolve().parent / "sample" / "ndsb_sample.zip"}


def open_source(name: str, root: str | Path | None = None) -> Source:
    """Open a dataset by name ("ndsb", "zoolake") from ``root`` (default: :func:`datasets_root`);
    without ``root``, NDSB falls back to the sample shipped in ``data/sample`` (``Source.sample``).

    For "imagefolder" pass the folder as ``root``; for "ecotaxa" pass the TSV file or the bundle
    (folder or zip). Both are read by :func:`data.collections_io.open_collection`.
    """
    if name in ("imagefolder", "ecotaxa") or (root is not None and name not in KNOWN):
        from .collections_io import open_collection

        if root is None:
            raise DatasetNotFound(f"{name}: pass the folder, zip or table to read as root")
        return open_collection(root, None if name in ("imagefolder", "ecotaxa") else name)
    if name not in KNOWN:
        from .collections import user_collections

        entry = user_collections().get(name)
        if entry is not None:
            return open_path(name, Path(entry["path"]), entry.get("overrides") or {})
        raise DatasetNotFound(f"unknown dataset {name!r}; known: {sorted(KNOWN)}, the user collections "
                              f"({', '.join(user_collections()) or 'none'}), imagefolder, ecotaxa")
    sub, archive, folder, mode, bg = KNOWN[name]
    base = Path(root) if root else datasets_root()
    if base is not None:
        for cand in (base / sub, base):
            hit = _locate(cand, archive, folder)
            if hit:
                return Source(name, hit[0], hit[1], mode, bg, taxonomy_name=name)
    if root is None and name in SAMPLES and SAMPLES[name].is_file():
        return Source(name, SAMPLES[name], folder, mode, bg, taxonomy_name=name, sample=True)
    if base is None:
        raise DatasetNotFound(f"dataset {name!r} not found: no datasets folder is set")
    raise DatasetNotFound(f"dataset {name!r} not found under {base} (looked for {sub}/{archive} or {sub}/{folder}/)")


#: user collections stored as one file (a zip, a table), opened once per (name, file stamp, overrides)
_OPENED: dict[tuple, Source] = {}
_OPENED_LOCK = threading.Lock()


def open_path(name: str, path: Path, overrides: dict | None = None) -> Source:
    """A user collection at ``path`` (:func:`data.collections_io.open_collection`: its format
    detected from the content), with the collection's ``overrides`` of the estimated background:
    ``polarity`` ("dark-on-light" / "light-on-dark") and / or ``background`` (grey level).

    Every page run asks for its collection, and opening one scans the archive and decodes a few
    images for the background (0.7 s for a 1,209-image zip), so a collection stored as one file is
    opened once per file stamp (size, modification time) and overrides. A folder is opened anew
    each time: its stamp does not see a file changed deep inside it."""
    overrides = overrides or {}
    key = None
    if path.is_file():
        stat = path.stat()
        key = (name, str(path.resolve()), stat.st_size, stat.st_mtime_ns, tuple(sorted(overrides.items())))
        with _OPENED_LOCK:
            hit = _OPENED.get(key)
        if hit is not None:
            return hit
    src = _open_path(name, path, overrides)
    if key is not None:
        with _OPENED_LOCK:
            for k in [k for k in _OPENED if k[0] == name]:  # the collection's earlier versions
                del _OPENED[k]
            _OPENED[key] = src
    return src


def _open_path(name: str, path: Path, overrides: dict) -> Source:
    from .collections_io import open_collection

    src = open_collection(path, name)
    if "background" in overrides or "polarity" in overrides:
        level = int(overrides.get("background", 255 if overrides.get("polarity", "dark-on-light") == "dark-on-light" else 0))
        src.background = Background(level, overrides.get("polarity") or Background.of(level).polarity)
    return src


def available_sources(root: str | Path | None = None) -> dict[str, Source]:
    """The known datasets present under ``root`` (default: :func:`datasets_root`), then the
    user collections that can be opened (without ``root``)."""
    out = {}
    for name in KNOWN:
        try:
            out[name] = open_source(name, root)
        except DatasetNotFound:
            pass
    if root is None:
        from .collections import user_collections

        for name, entry in user_collections().items():
            try:
                out[name] = open_path(name, Path(entry["path"]), entry.get("overrides") or {})
            except (DatasetNotFound, OSError):
                pass
    return out
