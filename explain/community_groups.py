"""Group keys of a scored table's images: sample, station, day, week, depth bin, or any column.

:func:`group_keys` gives each image its group's label (None: no value, left out) and a table of
the groups in their natural order (time for days and weeks, depth for depth bins, numbers for a
numeric column), with each group's mean position, time and depth where the images have them.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

#: Groupings that are not a column of the table (name → what it is).
SPECIAL = {"all": "the whole collection", "sample": "EcoTaxa sample (sample_id)",
           "station": "position (lat, lon, rounded)", "day": "day (UTC)", "week": "week (from Monday, UTC)",
           "depth": "depth bin"}
MAX_GROUPS = 500
#: Columns never offered for grouping (per-image ids, scores, predictions, the truth itself).
_NOT_OFFERED = {"row", "relpath", "dataset", "readable", "width", "height", "bytes", "object_id", "img_rank",
                "inconsistent", "inconsistency", "lat", "lon", "timestamp", "depth_min", "depth_max", "hierarchy",
                "knn_score", "nn_distance", "class"}
_NOT_OFFERED_PREFIX = ("pred_", "top", "ood_", "flag_", "vote_", "object_")


class GroupingError(ValueError):
    """A grouping the table cannot give (the message says why and what it can)."""


def _text(values: pd.Series) -> pd.Series:
    s = values.astype("string").str.strip()
    return s.where(s.notna() & (s != ""), None).astype(object)


def _natural(label: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(label))]


def _has(table: pd.DataFrame, col: str) -> bool:
    """Whether some image has a value in ``col`` (an empty text is no value)."""
    if col not in table or not table[col].notna().any():
        return False
    c = table[col]
    if c.dtype == object or pd.api.types.is_string_dtype(c):
        return bool((c.dropna().astype(str).str.strip() != "").any())
    return True


def _ns(col: pd.Series) -> np.ndarray:
    """Nanoseconds since 1970 (UTC) of a time column; NaT → INT64 min."""
    ts = pd.Series(pd.to_datetime(col, utc=True, errors="coerce")).dt.as_unit("ns")
    return ts.array.asi8


_NAT = np.iinfo(np.int64).min
_DAY_NS = 86_400 * 10**9


def _factorize_sorted(key: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (-1 where not ``valid``) into the sorted unique keys, and those keys."""
    codes = np.full(len(key), -1, np.int32)
    uniq, inv = np.unique(key[valid], return_inverse=True, axis=0 if key.ndim > 1 else None)
    codes[valid] = inv.ravel()
    return codes, uniq


def _factorize_text(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes into the distinct non-empty texts (stripped) in natural order (numbers inside
    compared as numbers); -1 for no value. Only the distinct values are cleaned."""
    raw, uniq = pd.factorize(values, use_na_sentinel=True)
    clean = _text(pd.Series(uniq, dtype=object))
    ok = clean.notna().to_numpy()
    names = sorted(set(clean[ok]), key=_natural)
    rank = {v: i for i, v in enumerate(names)}
    to = np.array([rank[v] if o else -1 for v, o in zip(clean, ok)] + [-1], dtype=np.int32)
    return to[np.where(raw >= 0, raw, len(uniq))], np.array(names, dtype=object)


def depth_of(table: pd.DataFrame) -> pd.Series:
    """Each image's depth: the mean of ``depth_min`` and ``depth_max`` where both are known."""
    cols = [c for c in ("depth_min", "depth_max") if c in table]
    if not cols:
        return pd.Series(np.nan, index=table.index)
    return table[cols].apply(pd.to_numeric, errors="coerce").mean(axis=1)


def group_options(table: pd.DataFrame, levels: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The groupings this table can give: name → description (special ones first, then columns
    with 2 to :data:`MAX_GROUPS` distinct values)."""
    out = {"all": SPECIAL["all"]}
    if _has(table, "sample_id"):
        out["sample"] = SPECIAL["sample"]
    if _has(table, "lat") and _has(table, "lon"):
        out["station"] = SPECIAL["station"]
    if _has(table, "timestamp"):
        out["day"], out["week"] = SPECIAL["day"], SPECIAL["week"]
    if depth_of(table).notna().any():
        out["depth"] = SPECIAL["depth"]
    for c in table.columns:
        if c in _NOT_OFFERED or c in levels or c.startswith(_NOT_OFFERED_PREFIX) or c in out:
            continue
        n = table[c].nunique(dropna=True)
        if 2 <= n <= MAX_GROUPS and n < table[c].notna().sum():  # not a per-image id
            out[c] = f"column {c}"
    return out


def group_keys(table: pd.DataFrame, by: str, depth_bin: float = 10.0, station_decimals: int = 2
               ) -> tuple[np.ndarray, pd.DataFrame]:
    """(each image's group code, -1 where it has no value; the groups in order: ``group`` (its
    label), ``lat``, ``lon``, ``time``, ``depth``). Vectorised: the labels are made from the
    distinct values only."""
    n = len(table)
    time_key = None
    if by == "all":
        codes, labels = np.zeros(n, np.int32), np.array(["all"], dtype=object)
    elif by == "sample":
        if not _has(table, "sample_id"):
            raise GroupingError("this collection has no sample ids (sample_id)")
        codes, labels = _factorize_text(table["sample_id"])
    elif by in ("day", "week"):
        if not _has(table, "timestamp"):
            raise GroupingError(f"no image of this collection has a time: it cannot be grouped by {by}")
        ns = _ns(table["timestamp"])
        ok = ns != _NAT
        day = np.floor_divide(ns, _DAY_NS)
        key = day if by == "day" else day - (day + 3) % 7  # 1970-01-01 was a Thursday; weeks start on Monday
        codes, uniq = _factorize_sorted(key, ok)
        time_key = pd.to_datetime(uniq * _DAY_NS, utc=True)
        labels = np.asarray(time_key.strftime("%Y-%m-%d"), dtype=object)
    elif by == "depth":
        d = depth_of(table).to_numpy(np.float64)
        if not np.isfinite(d).any():
            raise GroupingError("no image of this collection has a depth: it cannot be grouped by depth")
        if not depth_bin > 0:
            raise GroupingError("the depth bin must be a positive number of metres")
        ok = np.isfinite(d)
        codes, uniq = _factorize_sorted(np.floor(np.where(ok, d, 0) / depth_bin).astype(np.int64), ok)
        labels = np.array([f"{v * depth_bin:g}–{(v + 1) * depth_bin:g} m" for v in uniq], dtype=object)
    elif by == "station":
        if not (_has(table, "lat") and _has(table, "lon")):
            raise GroupingError("this collection has no positions (lat, lon): it cannot be grouped by station")
        ll = table[["lat", "lon"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(ll).all(1)
        scale = 10.0 ** station_decimals
        codes, uniq = _factorize_sorted(np.rint(np.where(ok[:, None], ll, 0) * scale).astype(np.int64), ok)
        labels = np.array([f"{a / scale:.{station_decimals}f}, {b / scale:.{station_decimals}f}" for a, b in uniq],
                          dtype=object)
    else:
        if by not in table:
            opts = ", ".join(group_options(table))
            raise GroupingError(f"there is no column {by!r} in this scored table; group by one of: {opts}")
        col = table[by]
        if pd.api.types.is_datetime64_any_dtype(col):
            ns = _ns(col)
            codes, uniq = _factorize_sorted(ns, ns != _NAT)
            time_key = pd.to_datetime(uniq, utc=True)
            labels = np.asarray(time_key.astype(str), dtype=object)
        elif pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            v = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
            codes, uniq = _factorize_sorted(v, np.isfinite(v))
            labels = np.array([f"{x:g}" for x in uniq], dtype=object)
        else:
            codes, labels = _factorize_text(col)
    if len(labels) > MAX_GROUPS:
        raise GroupingError(f"{by!r} has {len(labels):,} distinct values (at most {MAX_GROUPS} groups): group by a "
                            "coarser column (a week, a depth bin, a sample)")
    return codes, _group_info(table, codes, labels, time_key)


def _group_info(table: pd.DataFrame, codes: np.ndarray, labels: np.ndarray, time_key) -> pd.DataFrame:
    """Per group: its label and the mean position and depth, and the first time, of its images."""
    G = len(labels)
    ok = codes >= 0
    c = codes[ok]
    info = pd.DataFrame({"group": np.asarray(labels, dtype=object)})

    def mean(values) -> np.ndarray:
        v = np.asarray(pd.to_numeric(values, errors="coerce"), np.float64)[ok]
        f = np.isfinite(v)
        s = np.bincount(c[f], weights=v[f], minlength=G)
        k = np.bincount(c[f], minlength=G)
        return np.divide(s, k, out=np.full(G, np.nan), where=k > 0)

    info["lat"] = mean(table["lat"]) if "lat" in table else np.nan
    info["lon"] = mean(table["lon"]) if "lon" in table else np.nan
    info["depth"] = mean(depth_of(table))
    if time_key is not None:
        info["time"] = pd.Series(time_key)
    elif "timestamp" in table and table["timestamp"].notna().any():
        ns = _ns(table["timestamp"])[ok]
        f = ns != _NAT
        first = pd.Series(ns[f]).groupby(c[f]).min().reindex(range(G))
        info["time"] = pd.to_datetime(first.to_numpy(np.float64), utc=True)
    else:
        info["time"] = pd.Series(pd.NaT, index=range(G), dtype="datetime64[ns, UTC]")
    return info
