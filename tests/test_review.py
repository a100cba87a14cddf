"""The review store: round trip, undo, restarts, exports parsed back, kill -9 mid-write, concurrent writers."""
from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from explain.review_store import (ECOTAXA_COLUMNS, Decision, ReviewError, ReviewStore, read_ecotaxa_tsv)
from tests.conftest import REPO


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANKTON_LENS_DATA", str(tmp_path / "data"))
    return ReviewStore()


def _d(i: int, decision: str = "not_anomaly", **kw) -> Decision:
    return Decision(dataset="ndsb", relpath=f"train/copepod_calanoid/{i}.jpg", decision=decision,
                    reviewer=kw.pop("reviewer", "Ada"), predicted="copepod_calanoid", model="ndsb-test", **kw)


def test_store_lives_in_user_data_dir_in_wal_mode(store, tmp_path):
    assert store.path == tmp_path / "data" / "reviews.sqlite"
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_round_trip_and_restart(store):
    a = store.record(_d(1, "confirm_anomaly", reason="kNN 0.9 ≥ 0.5", score=0.9, comment="odd shape"))
    b = store.record(_d(2, "assign_label", label="crustaceans", label_level="group", comment="a\ttab\nand newline"))
    c = store.record(_d(3))
    assert a < b < c
    again = ReviewStore(store.path)  # a restart: a new store object on the same file
    df = again.decisions()
    assert list(df["id"]) == [a, b, c]
    first = df.iloc[0]
    assert (first["decision"], first["reason"], first["score"], first["comment"]) == ("confirm_anomaly", "kNN 0.9 ≥ 0.5", 0.9, "odd shape")
    assert (df.iloc[1]["label"], df.iloc[1]["label_level"]) == ("crustaceans", "group")
    assert df["created"].str.match(r"\d{4}-\d\d-\d\dT").all()
    # A newer decision on the same image replaces it in the current view, not in the history.
    store.record(_d(1, "not_anomaly", reviewer="Bo"))
    cur = store.current().set_index("relpath")
    assert len(cur) == 3 and cur.loc["train/copepod_calanoid/1.jpg", "reviewer"] == "Bo"
    assert len(store.decisions()) == 4


@pytest.mark.parametrize("bad, message", [
    (dict(reviewer=" "), "reviewer"),
    (dict(decision="assign_label"), "label"),
    (dict(decision="delete everything"), "Unknown decision"),
])
def test_invalid_decisions_are_refused_and_not_stored(store, bad, message):
    d = _d(5, **{k: v for k, v in bad.items() if k != "decision"})
    if "decision" in bad:
        d.decision = bad["decision"]
    with pytest.raises(ReviewError, match=message):
        store.record(d)
    assert store.decisions(include_undone=True).empty


def test_the_database_refuses_incomplete_rows_even_without_the_api(store):
    con = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO decisions (dataset, relpath, decision, reviewer, created) VALUES ('ndsb','x.jpg','assign_label','Ada','t')")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO decisions (dataset, relpath, decision, reviewer, created) VALUES ('ndsb','x.jpg','not_anomaly','','t')")
    con.close()


def test_undo_by_session_reviewer_and_id(store):
    a1 = store.record(_d(1, session="A"))
    b1 = store.record(_d(2, session="B", reviewer="Bo"))
    a2 = store.record(_d(3, session="A"))
    assert store.undo(session="A")["id"] == a2
    assert set(store.decisions()["id"]) == {a1, b1}
    assert store.undo(session="A")["id"] == a1
    assert store.undo(session="A") is None  # nothing left for A; B's decision untouched
    assert list(store.decisions()["id"]) == [b1]
    assert store.undo(reviewer="Bo")["id"] == b1
    assert store.decisions().empty
    hist = store.decisions(include_undone=True)
    assert len(hist) == 3 and hist["undone"].notna().all()  # kept for the audit trail
    c = store.record(_d(9))
    assert store.undo(decision_id=c)["id"] == c and store.undo(decision_id=c) is None


def test_csv_export_parses_back(store):
    store.record(_d(1, "confirm_anomaly", comment='quote " and, comma'))
    store.record(_d(2, "assign_label", label="copepod_cyclopoid_oithona", label_level="class"))
    store.undo(session="")  # undo the second (all in session "")
    back = pd.read_csv(io.StringIO(store.to_csv(include_undone=True)))
    orig = store.decisions(include_undone=True)
    assert list(back["id"]) == list(orig["id"])
    assert back.loc[0, "comment"] == 'quote " and, comma'
    assert back["undone"].isna().tolist() == [True, False]
    assert len(pd.read_csv(io.StringIO(store.to_csv()))) == 1


def test_csv_and_tsv_exports_neutralise_spreadsheet_formulas(store):
    formula = '=HYPERLINK("http://x","y")'
    store.record(_d(1, "confirm_anomaly", comment=formula, score=-2.5))
    store.record(_d(2, "assign_label", label="-detritus\tlarge", label_level="class", reviewer="@bo",
                    comment="+1\r\nsecond line"))
    text = store.to_csv()
    assert ",-2.5," in text and "'-2.5" not in text  # a number stays a number
    back = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert back.loc[0, "comment"] == "'" + formula
    assert back.loc[1, "label"] == "'-detritus large" and back.loc[1, "reviewer"] == "'@bo"
    assert back.loc[1, "comment"] == "'+1 second line"
    df = read_ecotaxa_tsv(store.to_ecotaxa_tsv()).set_index("img_file_name")
    assert df.loc["train/copepod_calanoid/1.jpg", "object_review_comment"] == "'" + formula
    assert df.loc["train/copepod_calanoid/2.jpg", "object_annotation_category"] == "'-detritus large"
    assert df.loc["train/copepod_calanoid/2.jpg", "object_annotation_person_name"] == "'@bo"
    assert df.loc["train/copepod_calanoid/2.jpg", "object_review_comment"] == "'+1 second line"


def test_ecotaxa_export_parses_back(store):
    store.record(_d(1, "confirm_anomaly", comment="multi\nline\tcomment"))
    store.record(_d(2, "assign_label", label="crustaceans", label_level="group", reviewer="Bo"))
    store.record(_d(3, "not_anomaly"))
    text = store.to_ecotaxa_tsv()
    lines = text.splitlines()
    assert lines[0].split("\t") == ECOTAXA_COLUMNS
    assert set(lines[1].split("\t")) == {"[t]"}  # EcoTaxa's type line
    assert len(lines) == 2 + 3
    df = read_ecotaxa_tsv(text).set_index("img_file_name")
    assert df.loc["train/copepod_calanoid/1.jpg", "object_annotation_status"] == "dubious"
    assert df.loc["train/copepod_calanoid/1.jpg", "object_annotation_category"] == "copepod_calanoid"
    assert df.loc["train/copepod_calanoid/1.jpg", "object_review_comment"] == "multi line comment"
    assert df.loc["train/copepod_calanoid/2.jpg", "object_annotation_category"] == "crustaceans"
    assert df.loc["train/copepod_calanoid/2.jpg", "object_annotation_status"] == "validated"
    assert df.loc["train/copepod_calanoid/2.jpg", "object_annotation_person_name"] == "Bo"
    assert df.loc["train/copepod_calanoid/3.jpg", "object_annotation_status"] == "validated"
    assert df["object_annotation_date"].str.fullmatch(r"20\d{6}").all()
    assert df["object_annotation_time"].str.fullmatch(r"\d{6}").all()
    assert df["object_id"].is_unique


WRITER = """
import sys
from explain.review_store import Decision, ReviewStore
s = ReviewStore(sys.argv[1])
i = 0
while True:
    i += 1
    s.record(Decision(dataset="ndsb", relpath=f"train/x/{sys.argv[2]}-{i}.jpg", decision="assign_label",
                      label="copepod_calanoid", label_level="class", reviewer=sys.argv[2],
                      comment="c" * 2000, reason="r" * 500, score=float(i)))
    print(i, flush=True)
    if i >= int(sys.argv[3]):
        break
"""


def _writer(path, name: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _complete(df: pd.DataFrame) -> bool:
    need = ["dataset", "relpath", "decision", "label", "reviewer", "comment", "reason", "created", "score"]
    return bool(df[need].notna().all().all() and (df["comment"] == "c" * 2000).all()
                and (df["reason"] == "r" * 500).all() and (df["label"] == "copepod_calanoid").all())


def test_kill_9_mid_write_leaves_whole_rows_only(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path)
    p = _writer(path, "killed", 10**9)
    reported = 0
    deadline = time.time() + 60
    while reported < 40 and time.time() < deadline:
        reported = int(p.stdout.readline() or reported)
    time.sleep(0.05)  # land the kill in the middle of later writes
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    assert p.returncode == -signal.SIGKILL
    store = ReviewStore(path)
    assert store.integrity_ok()
    df = store.decisions()
    assert len(df) >= reported >= 40  # every decision reported as stored is there
    assert _complete(df)
    assert sorted(df["score"]) == list(map(float, range(1, len(df) + 1)))  # no gaps, no half rows


def test_two_sessions_writing_at_once_keep_all_decisions(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path)
    n = 60
    procs = [_writer(path, name, n) for name in ("ada", "bo")]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    df = ReviewStore(path).decisions()
    assert len(df) == 2 * n
    assert df.groupby("reviewer").size().to_dict() == {"ada": n, "bo": n}
    assert _complete(df)
