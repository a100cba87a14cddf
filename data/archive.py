"""A read-only file tree over a folder, a zip, or zips inside either (a UVP6 zip of zips).

:class:`FileTree` lists files by a POSIX relpath and reads their bytes in place (nothing is
extracted). A member of a nested zip is named ``<inner.zip>/<member>``. Whatever cannot be read
safely is refused and recorded in ``problems`` instead of raising: names with ``..`` or an absolute
path, path parts over 255 characters, zip bombs (a member whose uncompressed size or compression
ratio is absurd) and zips nested deeper than ``ArchiveLimits.max_depth``.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .sources import DatasetNotFound

ZIP_MAGIC = b"PK\x03\x04"
MAX_PART = 255  # longest file-name part on common file systems


class CollectionError(DatasetNotFound):
    """A collection that cannot be read at all; the message says why and what to do."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold before it is treated as hostile."""

    max_member_bytes: int = 512 * 2**20  # one member, uncompressed
    max_ratio: float = 200.0  # uncompressed / compressed, for members above ``ratio_floor``
    ratio_floor: int = 2**20
    max_total_bytes: int = 32 * 2**30  # all members of one archive, uncompressed
    max_depth: int = 2  # zips inside zips: the outer archive is depth 0


@dataclass(frozen=True)
class Problem:
    """One thing that was skipped or doubtful; ``kind`` is a short machine-readable reason."""

    path: str
    kind: str
    message: str


def check_path(path: str | Path) -> Path:
    """``path`` as a Path that exists; a :class:`CollectionError` / :class:`DatasetNotFound` otherwise
    (never an OSError traceback, e.g. for a name part over 255 characters)."""
    p = Path(path).expanduser()
    long = [part for part in p.parts if len(part.encode("utf-8", "surrogateescape")) > MAX_PART]
    if long:
        raise CollectionError(f"{str(p)[:80]}…: a folder or file name is {len(long[0])} characters long; "
                              f"file systems allow {MAX_PART}. Rename it or move the files.")
    try:
        exists = p.exists()
    except OSError as e:
        raise CollectionError(f"{str(p)[:200]} cannot be opened: {e.strerror or e}") from None
    if not exists:
        raise DatasetNotFound(f"{p} does not exist (no such file or folder).")
    return p


def unsafe_name(name: str) -> str | None:
    """Why an archive member name or a table's file name is refused, or None when it is safe."""
    n = name.replace("\\", "/")
    if n.startswith("/") or (len(n) > 1 and n[1] == ":"):
        return "an absolute path"
    parts = PurePosixPath(n).parts
    if ".." in parts:
        return "a '..' part (it points outside the collection)"
    if any(len(part.encode()) > MAX_PART for part in parts):
        return f"a name part over {MAX_PART} characters"
    if "\x00" in n:
        return "a NUL character"
    return None


class FileTree:
    """The files of a folder or zip, nested zips included, by relpath."""

    def __init__(self, root: str | Path, limits: ArchiveLimits = ArchiveLimits()):
        self.root = check_path(root)
        self.limits = limits
        self.problems: list[Problem] = []
        self._where: dict[str, tuple[str | None, str]] = {}  # relpath → (zip key or None, member / file path)
        self._zips: dict[str, bytes | Path] = {}  # zip key → the zip's bytes (nested) or path
        self._local = threading.local()
        if self.root.is_dir():
            self._scan_folder()
        elif _is_zip_file(self.root):
            self._scan_zip("", self.root, 0)
        else:
            raise CollectionError(f"{self.root} is neither a folder nor a zip archive")

    @property
    def is_zip(self) -> bool:
        return self.root.is_file()

    def names(self) -> list[str]:
        """Every readable file, sorted."""
        return sorted(self._where)

    def __contains__(self, relpath: str) -> bool:
        return relpath in self._where

    def fingerprint(self) -> str:
        """Changes when the archive or folder changes (path, size, mtime; file list for folders)."""
        st = self.root.stat()
        key = f"{self.root.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if not self.is_zip:
            for rel in self.names():
                zkey, path = self._where[rel]
                if zkey is None:
                    s = os.stat(path)
                    key += f"|{rel}|{s.st_size}|{s.st_mtime_ns}"
            for zkey, src in sorted(self._zips.items()):
                if isinstance(src, Path):  # a zip inside the folder
                    s = src.stat()
                    key += f"|{zkey}|{s.st_size}|{s.st_mtime_ns}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def size(self, relpath: str) -> int:
        zkey, member = self._where[relpath]
        if zkey is None:
            return os.stat(member).st_size
        return self._zip(zkey).getinfo(member).file_size

    def read(self, relpath: str) -> bytes:
        """The bytes of one file; FileNotFoundError when the tree does not hold it."""
        if relpath not in self._where:
            raise FileNotFoundError(f"{relpath} is not in {self.root}")
        zkey, member = self._where[relpath]
        if zkey is None:
            return Path(member).read_bytes()
        return self._read_member(self._zip(zkey), member)

    # --- scanning ----------------------------------------------------------------------
    def _add(self, rel: str, where: tuple[str | None, str]) -> None:
        self._where[rel] = where

    def _scan_folder(self) -> None:
        base = self.root
        for dirpath, dirs, files in os.walk(base):
            dirs.sort()
            for f in sorted(files):
                full = Path(dirpath, f)
                rel = full.relative_to(base).as_posix()
                if full.is_symlink() and base.resolve() not in full.resolve().parents:
                    self.problems.append(Problem(rel, "unsafe_name", f"{rel} is a link to outside the folder; skipped"))
                    continue
                if _is_zip_file(full):
                    self._scan_zip(rel + "/", full, 1)
                else:
                    self._add(rel, (None, str(full)))

    def _read_member(self, z: zipfile.ZipFile, member: str) -> bytes:
        cap = self.limits.max_member_bytes
        with z.open(member) as f:  # a header that lies about the size is caught here
            data = f.read(cap + 1)
        if len(data) > cap:
            raise ValueError(f"{member} is larger than {cap} bytes uncompressed")
        return data

    def _scan_zip(self, prefix: str, source: bytes | Path, depth: int) -> None:
        label = prefix.rstrip("/") or self.root.name
        if depth > self.limits.max_depth:
            self.problems.append(Problem(label, "nested_too_deep", f"{label} is a zip nested {depth} levels deep "
                                         f"(at most {self.limits.max_depth}); its contents were skipped"))
            return
        try:
            z = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
            infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            self.problems.append(Problem(label, "bad_zip", f"{label} is a damaged zip archive ({e}); skipped"))
            return
        self._zips[prefix] = source
        total = 0
        for info in infos:
            if info.is_dir():
                continue
            name, rel = info.filename, prefix + info.filename
            why = unsafe_name(name)
            if why:
                self.problems.append(Problem(rel, "unsafe_name", f"archive member {name[:120]!r} has {why}; refused"))
                continue
            ratio = info.file_size / max(1, info.compress_size)
            if info.file_size > self.limits.max_member_bytes or (
                    info.file_size > self.limits.ratio_floor and ratio > self.limits.max_ratio):
                self.problems.append(Problem(rel, "zip_bomb", f"{name} would unpack to {info.file_size:,} bytes "
                                             f"(compression ratio {ratio:.0f}:1); refused as a zip bomb"))
                continue
            total += info.file_size
            if total > self.limits.max_total_bytes:
                self.problems.append(Problem(label, "zip_bomb", f"{label} would unpack to over "
                                             f"{self.limits.max_total_bytes:,} bytes; the remaining members were refused"))
                break
            try:
                with z.open(info) as f:
                    head = f.read(4)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as e:
                self.problems.append(Problem(rel, "bad_member", f"{name} cannot be read from the archive ({e}); skipped"))
                continue
            if head == ZIP_MAGIC:
                if depth + 1 > self.limits.max_depth:
                    self.problems.append(Problem(rel, "nested_too_deep", f"{rel} is a zip nested {depth + 1} levels "
                                                 f"deep (at most {self.limits.max_depth}); its contents were skipped"))
                    continue
                try:
                    inner = self._read_member(z, name)
                except ValueError as e:
                    self.problems.append(Problem(rel, "zip_bomb", f"{e}; refused"))
                    continue
                self._scan_zip(rel + "/", inner, depth + 1)
            else:
                self._add(rel, (prefix, name))

    def _zip(self, key: str) -> zipfile.ZipFile:
        # One handle per thread and process: ZipFile objects are not safe to share.
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.handles, self._local.pid = {}, os.getpid()
        z = self._local.handles.get(key)
        if z is None:
            src = self._zips[key]
            z = zipfile.ZipFile(io.BytesIO(src) if isinstance(src, bytes) else src)
            self._local.handles[key] = z
        return z


def _is_zip_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == ZIP_MAGIC and zipfile.is_zipfile(p)
    except OSError:
        return False
