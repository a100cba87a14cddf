"""EcoTaxa TSV tables and the bundles they describe (imports and exports), as a Source.

An **import** table has a header row, then a type row (``[t]`` text / ``[f]`` float per column);
its ``img_file_name`` is relative to the table's folder (one folder per sample, or one flat
bundle). An **export** has every field double-quoted and no type row; ``img_file_name`` reads
``images/<category>/<file>`` and ``object_annotation_hierarchy`` holds ``>``-separated ranks.

Labels: only ``validated`` objects are ground truth. :meth:`EcoTaxaCollection.files` gives their
category as the class and :data:`~data.folders.UNLABELLED` for every other object (predicted,
dubious, empty); EcoTaxa's category stays in :meth:`~EcoTaxaCollection.metadata` as its prediction.
A table with categories but no ``object_annotation_status`` column at all is a hand-labelled table
(EcoTaxa always writes the status), so its categories count as validated.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from .archive import CollectionError, Problem, unsafe_name
from .folders import META_COLUMNS, UNLABELLED, UNLABELLED_PATH, CollectionSource, _typed, is_image_name
from .taxonomy import Taxonomy, taxonomy_from_hierarchies, taxonomy_from_paths

_TYPE = re.compile(r"^\[[tf]\]$", re.IGNORECASE)
_STATUS = {"p": "predicted", "v": "validated", "d": "dubious", "predicted": "predicted",
           "validated": "validated", "dubious": "dubious", "": ""}
#: object_* columns that are not free numeric features.
_CORE = {"object_id", "object_lat", "object_lon", "object_date", "object_time", "object_link",
         "object_depth_min", "object_depth_max"}
_LIVING = {"living": "living", "biota": "living", "not-living": "non-living", "non-living": "non-living",
           "not living": "non-living"}


@dataclass
class Table:
    """One parsed TSV: lower-case column names, their ``[t]``/``[f]`` types (imports), rows."""

    relpath: str
    kind: str  # "import" (type row) or "export" (no type row)
    columns: list[str]
    types: dict[str, str]
    rows: list[dict[str, str]]
    problems: list[Problem] = field(default_factory=list)


def decode_text(data: bytes, name: str, problems: list[Problem] | None = None) -> str:
    """UTF-8 (BOM stripped), else latin-1 (as the UVP6 software writes), noted in ``problems``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if problems is not None:
            problems.append(Problem(name, "encoding", f"{name} is not UTF-8 (byte {data[e.start]:#x} at {e.start}); "
                                    "read as latin-1"))
        return data.decode("latin-1")


def sniff_table(head: bytes) -> str | None:
    """"import" / "export" when ``head`` (the first bytes of a file) starts an EcoTaxa TSV, else None."""
    text = decode_text(head, "")
    lines = text.splitlines()
    if not lines or "\t" not in lines[0] and lines[0].strip('"').lower() not in ("img_file_name", "object_id"):
        return None
    cols = [c.strip().strip('"').lower() for c in lines[0].split("\t")]
    if not ({"img_file_name", "object_id"} & set(cols)):
        return None
    second = lines[1].split("\t") if len(lines) > 1 else []
    if second and all(_TYPE.match(v.strip()) for v in second if v.strip()) and any(v.strip() for v in second):
        return "import"
    return "export"


def read_table(data: bytes, relpath: str) -> Table:
    """Parse one EcoTaxa TSV (import or export). Empty and header-only tables give no rows and a problem."""
    problems: list[Problem] = []
    text = decode_text(data, relpath, problems)
    if not text.strip():
        problems.append(Problem(relpath, "empty_table", f"{relpath} is empty"))
        return Table(relpath, "import", [], {}, [], problems)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"')
    header = [c.strip().lower() for c in next(reader)]
    rows, types, kind = [], {}, "export"
    for i, rec in enumerate(reader):
        if not any(v.strip() for v in rec):
            continue
        if i == 0 and all(_TYPE.match(v.strip()) for v in rec if v.strip()):
            types = {c: v.strip().lower()[1] for c, v in zip(header, rec)}
            kind = "import"
            continue
        if len(rec) != len(header):
            problems.append(Problem(relpath, "ragged_row", f"{relpath} row {i + 2} has {len(rec)} fields, "
                                    f"the header {len(header)}"))
        rows.append({c: (rec[k].strip() if k < len(rec) else "") for k, c in enumerate(header)})
    if not rows:
        problems.append(Problem(relpath, "empty_table", f"{relpath} has a header but no rows"))
    return Table(relpath, kind, header, types, rows, problems)


def parse_coordinate(text: str | float | None) -> float:
    """Decimal degrees from ``18.0``, ``-24.41``, degree-minute(-second) text such as ``43°0 0``,
    ``43°30.5'`` or ``12°30'15"S`` (a ``°`` or ``º``; S / W make it negative). NaN when unreadable."""
    if text is None:
        return math.nan
    s = str(text).strip()
    if not s:
        return math.nan
    try:
        return float(s)
    except ValueError:
        pass
    m = re.match(r"^([+-]?)(\d+(?:\.\d+)?)\s*[°º]\s*(\d+(?:\.\d+)?)?\s*['′]?\s*(\d+(?:\.\d+)?)?\s*(?:\"|''|″)?\s*([NSEWnsew])?$", s)
    if not m:
        return math.nan
    sign, deg, minutes, seconds, hemi = m.groups()
    value = float(deg) + float(minutes or 0) / 60 + float(seconds or 0) / 3600
    if sign == "-" or (hemi or "").upper() in ("S", "W"):
        value = -value
    return value


def parse_timestamp(date: str | None, time: str | None) -> pd.Timestamp:
    """One UTC time from EcoTaxa's ``object_date`` (YYYYMMDD) and ``object_time``.

    The time is HHMMSS (fractional seconds kept: ``020139.315``) or ``HH:MM:SS``; up to four digits
    read as HHMM, as EcoTaxa does (the ZooScan import's ``420`` is exported as ``042000``, 04:20:00).
    A missing time is midnight; a missing or invalid date or time gives NaT.
    """
    d = (date or "").strip()
    if not re.fullmatch(r"\d{8}", d):
        return pd.NaT
    whole, _, frac = (time or "").strip().replace(":", "").partition(".")
    if (whole and not whole.isdigit()) or len(whole) > 6 or (frac and not frac.isdigit()):
        return pd.NaT
    whole = whole.zfill(4) + "00" if len(whole) <= 4 else whole.zfill(6)
    try:
        return pd.Timestamp(f"{d[:4]}-{d[4:6]}-{d[6:]}T{whole[:2]}:{whole[2:4]}:{whole[4:]}"
                            + (f".{frac}" if frac else ""), tz="UTC")
    except ValueError:
        return pd.NaT


def levels_from_hierarchy(category: str, hierarchy: str) -> tuple[str, str, str]:
    """(living, group, subgroup) for a category from its EcoTaxa hierarchy (else from its name).

    living ← the root (Biota / living → living, not-living → non-living, other → unknown); group ←
    the second rank below the root (a phylum: Arthropoda); subgroup ← the fifth, or the deepest
    ancestor when shorter (Copepoda). ``egg<other`` without a hierarchy has group ``other``.
    """
    parts = [p.strip() for p in (hierarchy or "").split(">") if p.strip()]
    if parts and parts[-1] in (category, category.split("<")[0]):
        parts = parts[:-1]
    if not hierarchy and "<" in category:
        return "unknown", category.split("<", 1)[1], f"{category.split('<', 1)[1]} (other)"
    living = _LIVING.get(parts[0].lower(), "unknown") if parts else "unknown"
    rest = parts[1:]
    group = rest[1] if len(rest) >= 2 else (rest[0] if rest else f"{living} (other)")
    sub = rest[min(len(rest) - 1, 4)] if len(rest) >= 3 else f"{group} (other)"
    return living, group, sub


def _consistent(paths: dict[str, tuple[str, str, str]]) -> dict[str, tuple[str, str, str]]:
    """Rename nodes so that every node has one parent and sits at one level."""
    groups = {p[1] for p in paths.values()}
    parents: dict[str, set[str]] = {}
    for liv, grp, sub in paths.values():
        parents.setdefault(grp, set()).add(liv)
        parents.setdefault("\0" + sub, set()).add(grp)
    out = {}
    for c, (liv, grp, sub) in paths.items():
        if grp in _LIVING.values() or len(parents[grp]) > 1:
            grp = f"{grp} ({liv})"
        if sub in groups or len(parents["\0" + sub]) > 1:
            sub = f"{sub} ({grp})"
        out[c] = (liv, grp, sub)
    return out


@dataclass
class EcoTaxaCollection(CollectionSource):
    """The objects of one or more EcoTaxa tables with their images, read in place."""

    tables: list[str] = field(default_factory=list)  # relpaths in the tree
    _meta: pd.DataFrame | None = field(default=None, repr=False)
    _all: pd.DataFrame | None = field(default=None, repr=False)

    def files(self) -> list[tuple[str, str]]:
        """Sorted (relpath, class): the category of validated objects, else :data:`UNLABELLED`."""
        if self._files is None:
            m = self.metadata()
            cls = np.where(m["status"] == "validated", m["category"], UNLABELLED)
            self._files = sorted(zip(m["relpath"], cls))
        return self._files

    def read_bytes(self, relpath: str) -> bytes:
        if relpath not in self.tree and "#" in relpath:  # one image file shared by several objects
            relpath = relpath.rsplit("#", 1)[0]
        return self.tree.read(relpath)

    def metadata(self, include_missing: bool = False) -> pd.DataFrame:
        """One row per image (keyed by relpath): :data:`~data.folders.META_COLUMNS`, ``table``, ``image``
        (the file; relpath adds ``#<object_id>`` when several objects share it) and every numeric
        ``object_*`` feature as float. ``include_missing`` adds the rows whose image is absent
        (``relpath`` empty)."""
        if self._meta is None:
            self._load()
        return self._all.copy() if include_missing else self._meta.copy()

    def _load(self) -> None:
        rows, numeric = [], set()
        seen_rank: dict[tuple[str, str], str] = {}
        users: set[str] = set()
        for trel in self.tables:
            table = read_table(self.tree.read(trel), trel)
            self.problems.extend(table.problems)
            base = PurePosixPath(trel).parent
            has_status = "object_annotation_status" in table.columns
            for c in table.columns:
                if c.startswith("object_") and c not in _CORE and not c.startswith("object_annotation"):
                    t = table.types.get(c)
                    if t == "f" or (t is None and _all_numeric(r.get(c, "") for r in table.rows)):
                        numeric.add(c)
            for r in table.rows:
                rows.append(self._row(r, base, trel, has_status, seen_rank, users))
        rows = [r for r in rows if r is not None]
        if not rows:
            why = "; ".join(p.message for p in self.problems[:5]) or "no rows"
            raise CollectionError(f"{self.root} has no EcoTaxa objects to read: {why}")
        df = pd.DataFrame(rows)
        for c in META_COLUMNS:
            if c not in df:
                df[c] = None
        df = _typed(df)
        feat = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce").astype(float) for c in sorted(numeric)},
                            index=df.index)
        df = pd.concat([df[[*META_COLUMNS, "table", "image"]], feat], axis=1)
        self._all = df.reset_index(drop=True)
        self._meta = df[df["relpath"] != ""].sort_values("relpath").reset_index(drop=True)
        if self._meta.empty:
            raise CollectionError(f"{self.root}: none of the {len(df)} objects' images were found "
                                  f"(e.g. {self.problems[0].message if self.problems else ''})")
        listed = {i for i in self._all["image"]}
        for n in self.tree.names():
            if n not in listed and n not in self.tables and is_image_name(n):
                self.report(n, "unlisted_image", f"{n} is not listed in any table; not loaded")

    def _row(self, r: dict, base: PurePosixPath, trel: str, has_status: bool,
             seen_rank: dict, users: set) -> dict | None:
        img = r.get("img_file_name", "").replace("\\", "/")
        oid = r.get("object_id", "") or PurePosixPath(img).stem
        rank = r.get("img_rank", "") or "0"
        cat = r.get("object_annotation_category", "")
        status = _STATUS.get(r.get("object_annotation_status", "").lower())
        if status is None:
            self.report(trel, "bad_status", f"{trel}: object {oid} has status {r['object_annotation_status']!r}; "
                        "treated as predicted")
            status = "predicted"
        if not status:
            status = "empty" if not cat else ("predicted" if has_status else "validated")
        out = dict(r, object_id=oid, img_rank=rank, category=cat, status=status, table=trel,
                   hierarchy=r.get("object_annotation_hierarchy", ""), annotator=r.get("object_annotation_person_name", ""),
                   instrument=r.get("acq_instrument", ""), sample_id=r.get("sample_id", ""), acq_id=r.get("acq_id", ""),
                   lat=parse_coordinate(r.get("object_lat")), lon=parse_coordinate(r.get("object_lon")),
                   timestamp=parse_timestamp(r.get("object_date"), r.get("object_time")),
                   depth_min=r.get("object_depth_min"), depth_max=r.get("object_depth_max"), relpath="", image="")
        for k in ("lat", "lon"):
            raw = r.get(f"object_{k}", "")
            if raw and math.isnan(out[k]):
                self.report(trel, "bad_coordinate", f"{trel}: object {oid} has {k} {raw!r}, which is not a position")
        if not img:
            self.report(trel, "no_image", f"{trel}: object {oid} names no image (img_file_name is empty)")
            return out
        why = unsafe_name(img)
        if why:
            self.report(trel, "unsafe_name", f"{trel}: object {oid}'s image {img[:120]!r} has {why}; refused")
            return out
        rel = (base / img).as_posix().removeprefix("./")
        out["image"] = rel
        if rel not in self.tree:
            self.report(rel, "missing_image", f"{rel} (object {oid} in {trel}) is missing")
            return out
        key = (oid, rank)
        if key in seen_rank:
            same = seen_rank[key] == rel
            self.report(rel, "duplicate_object", f"object {oid} (image rank {rank}) is listed twice in the tables"
                        + ("; the repeat was dropped" if same else f"; both images kept ({seen_rank[key]}, {rel})"))
            if same:
                return None
        seen_rank.setdefault(key, rel)
        rp = rel if rel not in users else f"{rel}#{oid}"
        if rp in users:
            rp = f"{rel}#{oid}-{rank}"
        users.add(rp)
        out["relpath"] = rp
        return out

    def _build_taxonomy(self) -> Taxonomy:
        """living / group / subgroup from each category's hierarchy (see :func:`levels_from_hierarchy`)."""
        m = self.metadata()
        hier = dict(zip(m["category"], m["hierarchy"]))
        paths = {c: levels_from_hierarchy(c, h) for c, h in hier.items() if c}
        paths = _consistent(paths)
        if UNLABELLED in {c for _, c in self.files()}:
            paths[UNLABELLED] = UNLABELLED_PATH
        return taxonomy_from_paths(self.name, paths)

    def hierarchy_taxonomy(self, max_levels: int = 3) -> Taxonomy:
        """The categories' own ranks (``level1`` … below the ranks all share), from the hierarchy
        strings with :func:`~data.taxonomy.taxonomy_from_hierarchies`; categories without one are
        placed by their name (``egg<other`` under ``other``)."""
        m = self.metadata()
        hier = {c: (h or ">".join(reversed(c.split("<")))) for c, h in zip(m["category"], m["hierarchy"]) if c}
        if not hier:
            raise CollectionError(f"{self.root} has no categories")
        return taxonomy_from_hierarchies(self.name, hier, max_levels)


def _all_numeric(values) -> bool:
    got = False
    for v in values:
        if v == "":
            continue
        try:
            float(v)
        except ValueError:
            return False
        got = True
    return got

