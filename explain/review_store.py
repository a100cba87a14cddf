"""Review decisions on flagged images, stored in SQLite in the user's data folder.

Each decision is one row written in its own transaction (WAL journal, full sync), so a process
killed mid-write leaves it either stored whole or absent; several sessions can write at once.
Undo marks a decision as undone (it stays in the audit trail). Exports: CSV (every column) and
an EcoTaxa-importable TSV (header line, then the ``[t]`` type line, then one row per image); every
text cell of both goes through :func:`data.safe_text.safe_text` (no live spreadsheet formulas, no
tabs or line breaks inside a cell).

The second half builds the review queue: images flagged by an OOD score above a threshold, by
inconsistent predictions across taxonomic levels, or by neighbours that disagree with the model.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data.paths import user_data_dir
from data.safe_text import safe_frame, safe_text

DB_NAME = "reviews.sqlite"
DECISIONS = ("confirm_anomaly", "assign_label", "not_anomaly")
DECISION_TEXT = {"confirm_anomaly": "Confirm anomaly", "assign_label": "Assign a label", "not_anomaly": "Not an anomaly"}
#: EcoTaxa status per decision: a new label or an accepted prediction is validated; an anomaly is dubious.
ECOTAXA_STATUS = {"confirm_anomaly": "dubious", "assign_label": "validated", "not_anomaly": "validated"}
ECOTAXA_COLUMNS = ["img_file_name", "object_id", "object_annotation_category", "object_annotation_status",
                   "object_annotation_person_name", "object_annotation_date", "object_annotation_time",
                   "object_review_decision", "object_review_comment"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL CHECK (length(dataset) > 0),
    relpath TEXT NOT NULL CHECK (length(relpath) > 0),
    model TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL CHECK (decision IN ('confirm_anomaly', 'assign_label', 'not_anomaly')),
    label TEXT NOT NULL DEFAULT '',
    label_level TEXT NOT NULL DEFAULT '',
    predicted TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    score REAL,
    comment TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL CHECK (length(trim(reviewer)) > 0),
    session TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    undone TEXT,
    CHECK (decision != 'assign_label' OR length(label) > 0)
);
CREATE INDEX IF NOT EXISTS decisions_image ON decisions (dataset, relpath);
"""


class ReviewError(ValueError):
    """A decision that cannot be stored as given (message says why)."""


@dataclass
class Decision:
    """One reviewer's decision about one image."""

    dataset: str
    relpath: str
    decision: str
    reviewer: str
    label: str = ""
    label_level: str = ""
    predicted: str = ""
    model: str = ""
    reason: str = ""
    score: float | None = None
    comment: str = ""
    session: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def validate(self) -> None:
        if self.decision not in DECISIONS:
            raise ReviewError(f"Unknown decision {self.decision!r}; expected one of {', '.join(DECISIONS)}.")
        if not self.reviewer or not self.reviewer.strip():
            raise ReviewError("Enter a reviewer name before recording a decision.")
        if not self.dataset or not self.relpath:
            raise ReviewError("The decision is not attached to an image.")
        if self.decision == "assign_label" and not self.label:
            raise ReviewError("Pick a label to assign.")
        if self.score is not None and not np.isfinite(self.score):
            self.score = None


def default_path() -> Path:
    return user_data_dir() / DB_NAME


class ReviewStore:
    """Decisions in one SQLite file; a fresh connection per operation (safe across threads/processes)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA busy_timeout=30000")
        con.row_factory = sqlite3.Row
        return con

    def record(self, d: Decision) -> int:
        """Store one decision in its own transaction; returns its id."""
        d.validate()
        row = asdict(d)
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute(f"INSERT INTO decisions ({cols}) VALUES ({marks})", row)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def undo(self, decision_id: int | None = None, reviewer: str | None = None, session: str | None = None) -> dict | None:
        """Mark a decision undone: the given id, else the latest active one of ``reviewer`` / ``session``.
        Returns the undone decision, or None when there was nothing to undo."""
        where, args = ["undone IS NULL"], []
        if decision_id is not None:
            where.append("id = ?")
            args.append(int(decision_id))
        if reviewer:
            where.append("reviewer = ?")
            args.append(reviewer)
        if session:
            where.append("session = ?")
            args.append(session)
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                row = con.execute(f"SELECT * FROM decisions WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT 1",
                                  args).fetchone()
                if row is not None:
                    con.execute("UPDATE decisions SET undone = ? WHERE id = ?", (now, row["id"]))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return None if row is None else {**dict(row), "undone": now}

    def decisions(self, include_undone: bool = False) -> pd.DataFrame:
        """All decisions, oldest first (undone ones only when asked)."""
        q = "SELECT * FROM decisions" + ("" if include_undone else " WHERE undone IS NULL") + " ORDER BY id"
        with closing(self._connect()) as con:
            return pd.read_sql_query(q, con)

    def current(self) -> pd.DataFrame:
        """The latest active decision per image."""
        df = self.decisions()
        return df.drop_duplicates(["dataset", "relpath"], keep="last").reset_index(drop=True)

    def decided_images(self) -> set[tuple[str, str]]:
        return set(zip(*[self.current()[c] for c in ("dataset", "relpath")]))

    def integrity_ok(self) -> bool:
        with closing(self._connect()) as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # --- exports ------------------------------------------------------------------------------
    def to_csv(self, include_undone: bool = False) -> str:
        """Every decision as CSV text (one row per decision), text cells made safe (:func:`safe_frame`)."""
        return safe_frame(self.decisions(include_undone)).to_csv(index=False)

    def to_ecotaxa_tsv(self) -> str:
        """The current decision per image as an EcoTaxa-importable TSV (with the type line)."""
        return ecotaxa_tsv(self.current())


def ecotaxa_category(row: dict) -> str:
    """The category written for a decision: the assigned label, else the model's prediction."""
    return row["label"] if row["decision"] == "assign_label" else (row.get("predicted") or "")


def ecotaxa_tsv(current: pd.DataFrame) -> str:
    """EcoTaxa TSV text for one decision per image; every cell through :func:`safe_text`."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(ECOTAXA_COLUMNS)
    w.writerow(["[t]"] * len(ECOTAXA_COLUMNS))
    for r in current.to_dict("records"):
        when = _dt.datetime.fromisoformat(r["created"])
        w.writerow([safe_text(str(v)) for v in (
            r["relpath"], f"{r['dataset']}_{Path(r['relpath']).with_suffix('').as_posix().replace('/', '_')}",
            ecotaxa_category(r), ECOTAXA_STATUS[r["decision"]], r["reviewer"], when.strftime("%Y%m%d"),
            when.strftime("%H%M%S"), r["decision"], r["comment"])])
    return buf.getvalue()


def read_ecotaxa_tsv(text: str) -> pd.DataFrame:
    """Parse an EcoTaxa TSV (skipping its type line), as EcoTaxa's importer reads it."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    return pd.DataFrame(rows[1:] if rows and str(rows[0].get("img_file_name", "")).startswith("[") else rows)


# --- the review queue -----------------------------------------------------------------------------
FLAG_KINDS = {"score": "OOD score above threshold", "inconsistent": "level inconsistency",
              "neighbours": "neighbour disagreement"}


def flag_by_score(frame: pd.DataFrame, column: str, threshold: float, label: str) -> pd.DataFrame:
    """Rows whose ``column`` score is at least ``threshold``, with a reason, highest first."""
    hit = frame[frame[column] >= threshold].sort_values(column, ascending=False).copy()
    hit["score"] = hit[column]
    hit["reason"] = [f"{label} {s:.3f} ≥ threshold {threshold:.3f}" for s in hit[column]]
    return hit


def flag_inconsistent(frame: pd.DataFrame, levels: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Rows whose predictions at two adjacent levels do not lie on one taxonomy path."""
    hit = frame[frame["inconsistent"]].copy()
    hit["score"] = hit.get("pred_conf_" + levels[-1], pd.Series(np.nan, index=hit.index))
    hit["reason"] = hit["inconsistency"].map(lambda s: f"levels disagree: {s}")
    return hit.sort_values("score", ascending=True)


def flag_neighbour_disagreement(frame: pd.DataFrame, level: str, min_share: float = 0.6) -> pd.DataFrame:
    """Rows where the neighbour vote at ``level`` (with at least ``min_share`` of the votes)
    differs from the model's prediction."""
    hit = frame[(frame[f"vote_{level}"] != frame[f"pred_{level}"]) & (frame[f"vote_share_{level}"] >= min_share)].copy()
    hit = hit.sort_values(f"vote_share_{level}", ascending=False)
    hit["score"] = hit[f"vote_share_{level}"]
    hit["reason"] = [f"model says {p!r} at {level} but {s:.0%} of the nearest known images are {v!r}"
                     for p, v, s in zip(hit[f"pred_{level}"], hit[f"vote_{level}"], hit[f"vote_share_{level}"])]
    return hit
