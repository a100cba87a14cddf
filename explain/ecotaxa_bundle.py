"""A model's scored table exported back to EcoTaxa: an import bundle (zip) of one TSV and its images.

:func:`export_bundle` writes ``ecotaxa_<name>.tsv`` (header row, ``[t]``/``[f]`` type row, one row
per image) and, when it can read them, the images under ``images/``. Per object it writes
EcoTaxa's annotation (the model's leaf prediction as ``predicted``, or the reviewer's decision as
``validated`` / ``dubious`` with their name, date and time) and, as free columns, the predicted
label at every level (``object_pl_pred_<level>``, ``[t]``), its probability
(``object_pl_p_<level>``, ``[f]``) and the OOD scores (``object_pl_ood_<score>_<level>``,
``object_pl_knn``, ``[f]``): EcoTaxa sets the score of an imported prediction to 1.0, so these
columns are how the model's confidence survives the import. An EcoTaxa collection's own columns
(:func:`read_original`) are carried through unchanged. Every text cell goes through
:func:`data.safe_text.safe_text`. :func:`~explain.ecotaxa_rules.check_ecotaxa_tsv` checks the result.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import unicodedata
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import pandas as pd

from data.archive import ArchiveLimits
from data.ecotaxa import read_table
from data.paths import writer_temp
from data.safe_text import safe_text
from data.sources import IMAGE_EXTS
from explain.ecotaxa_rules import (ENCODING, MAX_ID_CHARS, MAX_TEXT_CHARS, PREDEFINED, check_ecotaxa_tsv,
                                   is_import_column)
from explain.review_store import ECOTAXA_STATUS

__all__ = ["export_bundle", "read_original", "check_ecotaxa_tsv", "PREFIX", "IMAGE_DIR"]

#: Prefix of the free columns this exporter writes (Plankton Lens).
PREFIX = "object_pl_"
#: Folder of the images inside the bundle.
IMAGE_DIR = "images"
#: Human annotations in a collection that an export keeps unless a reviewer decided again.
HUMAN_STATUSES = ("validated", "dubious")
#: EcoTaxa columns this exporter owns: an original's value of these is never carried through
#: (``object_annotation_category_id`` would override the written category, the e-mail belongs
#: to the original annotator).
_OWNED_PREFIX = "object_annotation_"
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def column_name(*parts: str) -> str:
    """An EcoTaxa column name from parts: lower-case ASCII, every other character run an ``_``."""
    text = unicodedata.normalize("NFKD", "_".join(parts)).encode("ascii", "ignore").decode().lower()
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]+", "_", text)).strip("_")


def derived_object_id(dataset: str, relpath: str) -> str:
    """An object id from the collection name and the image's relpath, as the review TSV makes it
    (``ndsb_train_copepod_1`` for ``train/copepod/1.jpg``); a ``#<object>`` suffix is kept."""
    file, sep, tail = relpath.partition("#")
    stem = PurePosixPath(file).with_suffix("").as_posix().replace("/", "_")
    text = _SAFE_CHARS.sub("_", f"{dataset}_{stem}" + (f"_{tail}" if sep else ""))
    return _bounded(text, MAX_ID_CHARS)


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]


def read_original(src: Any) -> pd.DataFrame:
    """An EcoTaxa collection's original table rows (every table of it, all columns as text, names
    lower-case), for :func:`export_bundle`'s ``original``; ``attrs["types"]`` holds each column's
    ``t`` / ``f`` from the type rows (absent in EcoTaxa exports)."""
    frames, types = [], {}
    for rel in src.tables:
        t = read_table(src.tree.read(rel), rel)
        frames.append(pd.DataFrame(t.rows, columns=t.columns, dtype=object))
        for c, v in t.types.items():
            types.setdefault(c, v)
    df = pd.concat(frames, ignore_index=True).fillna("") if frames else pd.DataFrame()
    df.attrs["types"] = types
    return df


# --- cells --------------------------------------------------------------------------------------
def _missing(v: Any) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, (float, np.floating)) and not math.isfinite(v))


def _number(v: Any) -> str:
    """A number's shortest exact text (float32 as float32: ``0.9``, not ``0.8999999761581421``)."""
    if _missing(v):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, np.float32):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v).strip()  # a number carried as text (an original's "18.0")


def _text(v: Any, limit: int | None = None) -> str:
    if _missing(v) or (isinstance(v, float) and math.isnan(v)):
        return ""
    s = safe_text(str(v))
    return s[:limit] if limit else s


def _col(df: pd.DataFrame, name: str) -> list:
    return df[name].tolist() if name in df else [None] * len(df)


def _numbers(df: pd.DataFrame, name: str) -> list[str]:
    """A numeric column as text; float32 columns keep their float32 values (``tolist`` would widen
    them to float64 first)."""
    if name not in df:
        return [""] * len(df)
    s = df[name]
    values = s.to_numpy() if s.dtype == np.float32 else s.tolist()
    return [_number(v) for v in values]


# --- images -------------------------------------------------------------------------------------
def image_file(relpath: str, object_id: str = "", rank: Any = "") -> str:
    """The file behind a table relpath: ``x.jpg#<object_id>`` (several objects on one image) is
    ``x.jpg``; a ``#`` that is part of the file's own name stays."""
    if "#" not in relpath:
        return relpath
    head, tail = relpath.rsplit("#", 1)
    if tail in (object_id, f"{object_id}-{rank}") or head.lower().endswith(IMAGE_EXTS):
        return head
    return relpath


def _zip_names(files: list[str]) -> dict[str, str]:
    """A safe, unique (also without regard to case) name under :data:`IMAGE_DIR` for each file."""
    out, used = {}, set()
    for f in files:
        p = PurePosixPath(f)
        ext = p.suffix.lower() if p.suffix.lower() in IMAGE_EXTS else _SAFE_CHARS.sub("_", p.suffix.lower())
        stem = _bounded(_SAFE_CHARS.sub("_", p.with_suffix("").as_posix().replace("/", "_")).lstrip("._-") or "image", 180)
        name, n = f"{stem}{ext}", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}_{n}{ext}"
        used.add(name.lower())
        out[f] = f"{IMAGE_DIR}/{name}"
    return out


# --- the export ---------------------------------------------------------------------------------
def _decisions_by_image(decisions: pd.DataFrame | None) -> dict[tuple[str, str], dict]:
    if decisions is None or decisions.empty:
        return {}
    d = decisions.sort_values("id") if "id" in decisions else decisions
    return {(str(r["dataset"]), str(r["relpath"])): r for r in d.to_dict("records")}


def _object_ids(rows: pd.DataFrame) -> list[str]:
    """The table's object_id where present and unique among the rows, else one derived from
    dataset + relpath; made unique in the end (``_2``, ``_3`` …)."""
    own = [str(v).strip() if not _missing(v) else "" for v in _col(rows, "object_id")]
    counts = pd.Series(own).value_counts()
    out, used = [], set()
    for oid, ds, rel in zip(own, _col(rows, "dataset"), rows["relpath"]):
        base = oid if oid and counts[oid] == 1 and len(oid) <= MAX_ID_CHARS else derived_object_id(str(ds or ""), str(rel))
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out.append(name)
    return out


def _annotation(row: dict, decision: dict | None, leaf: str, keep_validated: bool) -> tuple[str, str, str, str, str]:
    """(category, status, person, date, time) of one object."""
    pred = _text(row.get(f"pred_{leaf}"))
    if decision is not None:
        when = pd.Timestamp(decision["created"])
        when = when.tz_convert("UTC") if when.tzinfo else when
        cat = decision["label"] if decision["decision"] == "assign_label" else pred
        return (_text(cat), ECOTAXA_STATUS[decision["decision"]], _text(decision["reviewer"]),
                when.strftime("%Y%m%d"), when.strftime("%H%M%S"))
    status, cat = str(row.get("status") or ""), _text(row.get("category"))
    if keep_validated and status in HUMAN_STATUSES and cat:
        return cat, status, _text(row.get("annotator")), "", ""
    return pred, "predicted", "", "", ""


def _metadata_columns(rows: pd.DataFrame) -> dict[str, tuple[str, list[str]]]:
    """EcoTaxa's position, time, depth, sample and acquisition columns from the table's metadata."""
    ts = pd.to_datetime(pd.Series(_col(rows, "timestamp"), dtype=object), utc=True, errors="coerce")
    cols = {
        "img_rank": ("f", _numbers(rows, "img_rank")),
        "object_lat": ("f", _numbers(rows, "lat")),
        "object_lon": ("f", _numbers(rows, "lon")),
        "object_date": ("t", ["" if pd.isna(t) else t.strftime("%Y%m%d") for t in ts]),
        "object_time": ("t", ["" if pd.isna(t) else t.strftime("%H%M%S") for t in ts]),
        "object_depth_min": ("f", _numbers(rows, "depth_min")),
        "object_depth_max": ("f", _numbers(rows, "depth_max")),
        "sample_id": ("t", [_text(v) for v in _col(rows, "sample_id")]),
        "acq_id": ("t", [_text(v) for v in _col(rows, "acq_id")]),
        "acq_instrument": ("t", [_text(v) for v in _col(rows, "instrument")]),
    }
    return {k: v for k, v in cols.items() if any(v[1])}


def _model_columns(rows: pd.DataFrame, meta: dict) -> dict[str, tuple[str, list[str]]]:
    """The model's labels, probabilities and scores as free ``object_pl_*`` columns."""
    levels = list(meta["levels"])
    cols: dict[str, tuple[str, list[str]]] = {PREFIX + "model": ("t", [_text(meta.get("model", ""), MAX_TEXT_CHARS)] * len(rows))}
    for lvl in levels:
        cols[column_name(PREFIX + "pred", lvl)] = ("t", [_text(v, MAX_TEXT_CHARS) for v in _col(rows, f"pred_{lvl}")])
        cols[column_name(PREFIX + "p", lvl)] = ("f", _numbers(rows, f"pred_conf_{lvl}"))
    for c in rows.columns:
        lvl = next((lv for lv in sorted(levels, key=len, reverse=True) if c.startswith("ood_") and c.endswith(f"_{lv}")), None)
        if lvl and len(c) > len(lvl) + 5:
            cols[column_name(PREFIX + "ood", c[4:-len(lvl) - 1], lvl)] = ("f", _numbers(rows, c))
    if "knn_score" in rows:
        cols[PREFIX + "knn"] = ("f", _numbers(rows, "knn_score"))
    if "inconsistent" in rows:
        cols[PREFIX + "inconsistent"] = ("f", [_number(bool(v)) if not _missing(v) else "" for v in rows["inconsistent"]])
    if "inconsistency" in rows:
        cols[PREFIX + "inconsistency"] = ("t", [_text(v, MAX_TEXT_CHARS) for v in rows["inconsistency"]])
    return cols


def _original_columns(rows: pd.DataFrame, original: pd.DataFrame, skip: set[str]) -> tuple[dict, list[dict | None], list[str]]:
    """The original's columns (but ``skip``, the annotation ones and those EcoTaxa's import would
    refuse, such as an export's ``objid``: listed third), each row's original row matched by
    (object_id, img_rank), else by object_id alone."""
    orig = original.copy()
    orig.columns = [str(c).strip().lower() for c in orig.columns]
    types = {str(k).lower(): v for k, v in original.attrs.get("types", {}).items()}
    records = orig.to_dict("records")
    by_key: dict[tuple[str, str], dict] = {}
    by_id: dict[str, dict] = {}
    for r in records:
        oid = str(r.get("object_id", "")).strip()
        by_key.setdefault((oid, _rank(r.get("img_rank"))), r)
        by_id.setdefault(oid, r)
    matched = []
    for oid, rank in zip(_col(rows, "object_id"), _col(rows, "img_rank")):
        oid = "" if _missing(oid) else str(oid).strip()
        matched.append(by_key.get((oid, _rank(rank))) or by_id.get(oid) if oid else None)
    cols, dropped = {}, []
    for c in orig.columns:
        if c in skip or c.startswith(_OWNED_PREFIX) or c == "img_file_name" or c == "object_id":
            continue
        if not is_import_column(c):
            dropped.append(c)
            continue
        kind = types.get(c) or ("f" if PREDEFINED.get(c) == "n" else _infer_type(c, orig[c]))
        cols[c] = (kind, [("" if m is None else (_number if kind == "f" else _text)(m.get(c, ""))) for m in matched])
    return cols, matched, dropped


def _rank(v: Any) -> str:
    try:
        return str(int(float(v)))
    except (TypeError, ValueError):
        return "0"


def _infer_type(name: str, values: pd.Series) -> str:
    """[f] for an original's free object_ column whose every value is a number (or that is empty,
    as an export's unused features are: EcoTaxa holds 500 numeric but only 20 text ones), else [t]."""
    if pd.api.types.is_numeric_dtype(values):
        return "f"
    if not name.startswith("object_"):
        return "t"
    text = [str(v).strip() for v in values if not _missing(v) and str(v).strip()]
    try:
        [float(v) for v in text]
    except ValueError:
        return "t"
    return "f"


def _with_images(rows: pd.DataFrame, read_image: Callable[[str], bytes] | None
                 ) -> tuple[pd.DataFrame, list[str], dict[str, bytes], list[str]]:
    """(rows kept, each row's img_file_name, {name in the zip: bytes}, relpaths whose image could
    not be read). Without ``read_image`` every row is kept and names its file in the collection."""
    files = [image_file(str(r), "" if _missing(o) else str(o), rk)
             for r, o, rk in zip(rows["relpath"], _col(rows, "object_id"), _col(rows, "img_rank"))]
    if read_image is None:
        return rows, files, {}, []
    data: dict[str, bytes] = {}
    for rel, f in zip(rows["relpath"], files):
        if f not in data:  # several objects on one file: read and stored once
            try:
                data[f] = read_image(str(rel))
            except (OSError, KeyError, ValueError):
                data[f] = b""
    keep = [bool(data[f]) for f in files]
    unread = [str(r) for r, k in zip(rows["relpath"], keep) if not k]
    names = _zip_names(sorted(f for f, b in data.items() if b))
    kept = [names[f] for f, k in zip(files, keep) if k]
    return rows[np.asarray(keep, dtype=bool)], kept, {names[f]: data[f] for f in names}, unread


def _tsv(columns: dict[str, tuple[str, list[str]]], n: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quotechar='"')
    w.writerow(list(columns))
    w.writerow([f"[{t}]" for t, _ in columns.values()])
    values = [v for _, v in columns.values()]
    for i in range(n):
        w.writerow([v[i] for v in values])
    return buf.getvalue()


def export_bundle(table: pd.DataFrame, meta: dict, out: Path, *, decisions: pd.DataFrame | None = None,
                  read_image: Callable[[str], bytes] | None = None, original: pd.DataFrame | None = None,
                  keep_validated: bool = True) -> dict:
    """Write an EcoTaxa import bundle (zip) of a scored table to ``out``, atomically.

    ``table``: one row per image (``explain.score``'s scored table); ``meta``: its meta dict
    (``levels``, ``model``, …). ``decisions``: review decisions (:meth:`ReviewStore.current`), the
    latest per (dataset, relpath) wins. ``read_image(relpath)``: the image's bytes; when given,
    each image is stored once under ``images/`` (several objects on one file share it) and a row
    whose image cannot be read is left out. ``original``: the collection's original TSV rows
    (:func:`read_original`), whose columns are carried through unchanged (matched by object_id and
    img_rank), except the annotation (``object_annotation_*``), ``img_file_name`` and ``object_id``,
    which this export writes. ``keep_validated``: an object a person validated (or marked dubious)
    in the collection keeps that annotation unless a reviewer decided again; False writes the
    model's prediction over it. Unreadable rows (``readable`` False) have no prediction and are
    left out. Returns ``{"path", "rows", "images", "columns", "skipped", "dropped", "problems", "tsv"}``
    (``skipped``: relpaths left out; ``dropped``: original columns EcoTaxa's import would refuse;
    ``problems``: :func:`check_ecotaxa_tsv` on the written TSV; ``tsv``: its name in the zip).
    """
    out = Path(out)
    dropped: list[str] = []
    leaf = list(meta["levels"])[-1]
    rows = table
    if "readable" in rows:
        rows = rows[rows["readable"].fillna(False).astype(bool)]
    pred = rows.get(f"pred_{leaf}", pd.Series("", index=rows.index))
    rows = rows[pred.notna() & (pred.astype(str) != "")]
    skipped = sorted(set(table["relpath"].astype(str)) - set(rows["relpath"].astype(str)))

    rows, img_names, images, unread = _with_images(rows, read_image)
    skipped = sorted(set(skipped) | set(unread))
    rows = rows.reset_index(drop=True)

    by_image = _decisions_by_image(decisions)
    records = rows.to_dict("records")
    notes = [by_image.get((str(r.get("dataset", "")), str(r["relpath"]))) for r in records]
    ann = [_annotation(r, d, leaf, keep_validated) for r, d in zip(records, notes)]
    columns: dict[str, tuple[str, list[str]]] = {
        "object_id": ("t", _object_ids(rows)),
        "img_file_name": ("t", [_text(n) for n in img_names]),
    }
    for i, name in enumerate(["object_annotation_category", "object_annotation_status", "object_annotation_person_name",
                              "object_annotation_date", "object_annotation_time"]):
        columns[name] = ("t", [a[i] for a in ann])
    mine = _metadata_columns(rows)
    model = _model_columns(rows, meta)
    if decisions is not None:
        model[PREFIX + "review_decision"] = ("t", [_text(d["decision"]) if d else "" for d in notes])
        model[PREFIX + "review_comment"] = ("t", [_text(d["comment"], MAX_TEXT_CHARS) if d else "" for d in notes])
    if original is not None:
        carried, matched, dropped = _original_columns(rows, original, set(model))
        for i, m in enumerate(matched):  # a kept human annotation keeps its date and time
            if m is not None and ann[i][1] in HUMAN_STATUSES and notes[i] is None and keep_validated:
                columns["object_annotation_date"][1][i] = _text(m.get("object_annotation_date", ""))
                columns["object_annotation_time"][1][i] = _text(m.get("object_annotation_time", ""))
        columns.update(carried)
        columns.update({k: v for k, v in mine.items() if k not in carried})
    else:
        columns.update(mine)
    for prefix in ("sample", "acq", "process"):
        if f"{prefix}_id" not in columns and any(c.startswith(prefix + "_") for c in columns):
            columns[f"{prefix}_id"] = ("t", [_text(v) for v in _col(rows, f"{prefix}_id")])
    clash = set(model) & set(columns)
    if clash:
        raise ValueError(f"columns written twice: {sorted(clash)}")
    columns.update(model)

    text = _tsv(columns, len(rows))
    name = column_name(out.stem) or "bundle"
    tsv_name = f"ecotaxa_{name}.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = writer_temp(out)
    try:
        with zipfile.ZipFile(tmp, "w") as z:
            data = text.encode(ENCODING)
            z.writestr(tsv_name, data, compress_type=_compression(data))
            for name, b in images.items():
                z.writestr(name, b, compress_type=_compression(b))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": out, "rows": len(rows), "images": len(images), "columns": list(columns), "skipped": skipped,
            "dropped": dropped, "problems": check_ecotaxa_tsv(text), "tsv": tsv_name}


def _compression(data: bytes) -> int:
    """Deflate, unless the member would compress so well that a reader takes it for a zip bomb
    (:class:`~data.archive.ArchiveLimits`: above 1 MiB, ratio over 200)."""
    limits = ArchiveLimits()
    if len(data) > limits.ratio_floor and len(data) / max(1, len(zlib.compress(data, 6))) > limits.max_ratio / 2:
        return zipfile.ZIP_STORED
    return zipfile.ZIP_DEFLATED
