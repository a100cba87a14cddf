"""EcoTaxa's rules for an import TSV, and :func:`check_ecotaxa_tsv`, which finds what breaks them.

The rules are EcoTaxa's own (``ecotaxa/ecotaxa_back``, ``py/BO/Mappings.py``, ``py/BO/TSVFile.py``,
``py/DB/Object.py``): a header row of ``<prefix>_<field>`` names, then a type row of ``[t]`` / ``[f]``,
then one row per (object, image). Besides EcoTaxa's predefined columns (``object_id``,
``img_file_name``, ``object_annotation_*`` …), free columns take the prefix ``object_``, ``sample_``,
``acq_`` or ``process_`` (a custom ``img_*`` column is refused); any ``sample_`` / ``acq_`` /
``process_`` column needs that table's ``*_id`` column. A project holds at most 500 numeric and 20
text free ``object_`` columns, a free text value at most 250 characters and an object id 255.
EcoTaxa reads a TSV as latin-1 unless it starts with a UTF-8 byte-order mark, so a writer of
non-ASCII text must write one (:data:`ENCODING`).
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter

from data.ecotaxa import parse_coordinate
from data.safe_text import safe_text

#: How a bundle's TSV is encoded: UTF-8 with a byte-order mark (else EcoTaxa reads latin-1).
ENCODING = "utf-8-sig"
#: EcoTaxa's predefined columns and their stored type (n: numeric, t: text); the type row is
#: ignored for them.
PREDEFINED = {
    "object_id": "t", "sample_id": "t", "acq_id": "t", "process_id": "t", "object_lat": "n", "object_lon": "n",
    "object_date": "t", "object_time": "t", "object_link": "t", "object_depth_min": "n", "object_depth_max": "n",
    "object_annotation_category": "t", "object_annotation_category_id": "n", "object_annotation_date": "t",
    "object_annotation_person_name": "t", "object_annotation_status": "t", "object_annotation_hierarchy": "t",
    "complement_info": "t", "img_rank": "n", "img_file_name": "t", "sample_dataportal_descriptor": "t",
    "acq_instrument": "t",
}
#: Read by EcoTaxa beside a predefined column (the annotation's time, the annotator's e-mail).
DOUBLED = {"object_annotation_time", "object_annotation_person_email"}
#: Prefixes of free columns.
FREE_PREFIXES = ("object", "sample", "acq", "process")
#: Values of ``object_annotation_status`` EcoTaxa accepts.
STATUSES = ("predicted", "validated", "dubious", "discarded")
MAX_FREE_NUMERIC, MAX_FREE_TEXT, MAX_TEXT_CHARS, MAX_ID_CHARS = 500, 20, 250, 255
#: What EcoTaxa takes as a column name once it has stripped and lower-cased it: UVP6 tables name
#: features ``object_perim.`` and ``object_%area``, which it maps like any other; columns this
#: project creates are stricter (``[a-z0-9_]``, :func:`explain.ecotaxa_bundle.column_name`).
_NAME = re.compile(r"^[^\s\"'A-Z]+$")
_DATE = re.compile(r"^\d{8}$|^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{1,6}(\.\d+)?$|^\d{2}:\d{2}:\d{2}$")


def is_free_column(name: str) -> bool:
    """A free (project-defined) column: a known prefix, not predefined, not read beside one."""
    prefix, _, rest = name.partition("_")
    return bool(rest) and prefix in FREE_PREFIXES and name not in PREDEFINED and name not in DOUBLED


def is_import_column(name: str) -> bool:
    """A column EcoTaxa's import accepts: predefined, read beside one, or a free column (a name
    without spaces, quotes or capitals)."""
    return bool(_NAME.match(name)) and (name in PREDEFINED or name in DOUBLED or is_free_column(name))


def header_problems(header: list[str]) -> list[str]:
    """What is wrong with a header row (names, prefixes, duplicates, the ``*_id`` each table needs)."""
    out = []
    for name, n in Counter(header).items():
        if n > 1:
            out.append(f"column {name!r} appears {n} times")
    for name in header:
        if not _NAME.match(name):
            out.append(f"column {name!r}: a name holds no spaces, quotes or capitals")
        elif name not in PREDEFINED and name not in DOUBLED and not is_free_column(name):
            out.append(f"column {name!r}: not an EcoTaxa column and no free-column prefix "
                       f"({', '.join(p + '_' for p in FREE_PREFIXES)})")
    for prefix in ("sample", "acq", "process"):
        if any(h.startswith(prefix + "_") for h in header) and f"{prefix}_id" not in header:
            out.append(f"{prefix}_id is missing: EcoTaxa needs it beside the other {prefix}_ columns")
    return out


def _numeric_ok(name: str, value: str) -> bool:
    if name in ("object_lat", "object_lon"):
        v = parse_coordinate(value)
        return math.isfinite(v) and abs(v) <= (90 if name == "object_lat" else 180)
    try:
        return float(value) != -math.inf
    except ValueError:
        return False


def check_ecotaxa_tsv(text: str, *, one_row_per_object: bool = True) -> list[str]:
    """Problems that would make EcoTaxa refuse (or misread) an import TSV; empty when it is fine.

    Checks: the header (:func:`header_problems`), the ``[t]``/``[f]`` type row, the free-column
    limits, row lengths, missing and duplicate object ids (one row per object unless
    ``one_row_per_object`` is False, when only a repeated object-and-image pair counts), non-numeric
    values in ``[f]`` and numeric predefined columns, positions out of range, bad dates, times and
    statuses, over-long texts, and text cells a spreadsheet would run as a formula or that hold a
    tab or line break (what :func:`~data.safe_text.safe_text` prevents).
    """
    rows = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), delimiter="\t", quotechar='"'))
    rows = [r for r in rows if any(v.strip() for v in r)]
    if not rows:
        return ["the table is empty"]
    header = [h.strip().lower() for h in rows[0]]
    problems = header_problems(header)
    body = rows[1:]
    if not body or not all(v.strip() in ("[t]", "[f]") for v in body[0]) or len(body[0]) != len(header):
        problems.append("line 2 is not the type row: one [t] or [f] per column")
        types = {h: ("f" if PREDEFINED.get(h) == "n" else "t") for h in header}
    else:
        types = {h: v.strip()[1] for h, v in zip(header, body[0])}
        body = body[1:]
    free = Counter(types[h] for h in header if h.startswith("object_") and is_free_column(h))
    if free["f"] > MAX_FREE_NUMERIC or free["t"] > MAX_FREE_TEXT:
        problems.append(f"{free['f']} numeric and {free['t']} text free object_ columns: EcoTaxa holds at most "
                        f"{MAX_FREE_NUMERIC} and {MAX_FREE_TEXT}")
    if not body:
        problems.append("the table has no rows")
    seen: dict[object, int] = {}
    first = len(rows) - len(body) + 1
    for n, rec in enumerate(body, start=first):
        if len(rec) != len(header):
            problems.append(f"line {n}: {len(rec)} fields, the header has {len(header)}")
        row = {h: (rec[i] if i < len(rec) else "") for i, h in enumerate(header)}
        oid = row.get("object_id", "").strip()
        if not oid:
            problems.append(f"line {n}: no object_id")
        elif len(oid) > MAX_ID_CHARS:
            problems.append(f"line {n}: object_id is {len(oid)} characters long (at most {MAX_ID_CHARS})")
        key = oid if one_row_per_object else (oid, row.get("img_file_name", "").strip())
        if oid and key in seen:
            problems.append(f"line {n}: object_id {oid!r} repeats line {seen[key]}")
        seen.setdefault(key, n)
        for h, raw in row.items():
            v = raw.strip()
            if not v:
                continue
            numeric = PREDEFINED.get(h) == "n" or (h not in PREDEFINED and types.get(h) == "f" and h.startswith("object_"))
            if numeric:
                if not _numeric_ok(h, v):
                    problems.append(f"line {n}: {h} = {v[:40]!r} is not a number{' in range' if 'lat' in h or 'lon' in h else ''}")
                continue
            if safe_text(raw) != raw:
                problems.append(f"line {n}: {h} = {raw[:40]!r} would run as a spreadsheet formula or holds "
                                "a tab or line break")
            if h in ("object_date", "object_annotation_date") and not _DATE.match(v):
                problems.append(f"line {n}: {h} = {v!r} is not a date (YYYYMMDD)")
            elif h in ("object_time", "object_annotation_time") and not _TIME.match(v):
                problems.append(f"line {n}: {h} = {v!r} is not a time (HHMMSS)")
            elif h == "object_annotation_status" and v.lower() not in STATUSES:
                problems.append(f"line {n}: status {v!r} is not one of {', '.join(STATUSES)}")
            elif is_free_column(h) and len(v) > MAX_TEXT_CHARS:
                problems.append(f"line {n}: {h} holds {len(v)} characters (at most {MAX_TEXT_CHARS})")
    return problems
