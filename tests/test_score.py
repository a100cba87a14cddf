"""Scoring a whole collection once (explain/score.py): exact, resumable after kill -9, local = Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, requires_data, unlabelled_zip

SAMPLE = REPO / "data" / "sample" / "ndsb_sample.zip"
MODEL = "ndsb-bacnn"
# Names of their own: the session's "sample" and "cruise" (tests/conftest.py) share the cache, and
# scoring another collection of the same name replaces their tables as stale.
SAMPLE_C, CRUISE_C = "score-sample", "score-cruise"
pytestmark = requires_data


@pytest.fixture
def collections(tmp_path, monkeypatch):
    """A user data folder with two collections: ``sample`` (the shipped NDSB sample, labelled)
    and ``cruise`` (a flat zip of its images, unlabelled)."""
    import shutil

    from data.collections import add_collection
    from data.paths import cache_dir

    # each test scores from scratch: a table an earlier test session left in the cache (same names,
    # same images) would be found complete, and nothing would run (a second `make test` failed so)
    for c in (SAMPLE_C, CRUISE_C):
        for old in (cache_dir() / "scored").glob(f"*/{c}__*"):
            shutil.rmtree(old, ignore_errors=True)
    monkeypatch.setenv("PLANKTON_LENS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PLANKTON_LENS_ROOTS", os.pathsep.join([str(SAMPLE.parent), str(tmp_path)]))
    add_collection(SAMPLE_C, SAMPLE)
    add_collection(CRUISE_C, unlabelled_zip(tmp_path / "cruise.zip"))
    return tmp_path


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explain.score", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_scored_table_has_one_row_per_image_and_the_json_summary(collections):
    from explain.score import scored_table, score_columns

    r = _cli("run", "--model", MODEL, "--collection", CRUISE_C, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info) == {"table", "rows", "images_per_s", "engine"} and info["engine"] == "local"
    assert info["rows"] == 48 and info["images_per_s"] > 0 and Path(info["table"]).is_file()
    t = scored_table(MODEL, CRUISE_C)
    assert t is not None and len(t.table) == 48 and t.table["relpath"].is_unique
    assert t.embeddings.dtype == np.float16 and t.embeddings.shape[0] == 48
    assert set(t.table["class"]) == {"unlabelled"}
    for lvl in t.levels:
        p = t.table[[f"top1_p_{lvl}", f"top2_p_{lvl}", f"top3_p_{lvl}"]].to_numpy()
        assert (np.diff(p, axis=1) <= 1e-7).all()
        consistent = ~t.table["inconsistent"]  # where the argmaxes agree with the taxonomy they are the shown path
        assert (t.table.loc[consistent, f"top1_{lvl}"] == t.table.loc[consistent, f"pred_{lvl}"]).all()
    from models.handle import open_model

    tax = open_model(MODEL).classifier.taxonomy
    shown = t.table[[f"pred_{lvl}" for lvl in t.levels]].to_numpy()
    assert all(tax.path(row[-1]) == dict(zip(t.levels, row)) for row in shown)  # one taxonomy path per image
    for lvl in t.levels:  # every level's posteriors beside the table (float16): their maximum is the top-1 probability
        p = np.asarray(t.proba(lvl), np.float32)
        assert p.shape[0] == 48 and np.allclose(p.sum(1), 1, atol=1e-2)
        np.testing.assert_allclose(p.max(1), t.table[f"top1_p_{lvl}"], atol=2e-3)
    assert t.validation_proba(t.levels[-1]).shape[0] == len(t.validation)
    assert sum(t.meta["train_counts"].values()) > 0 and t.meta["train_sampler"] == "uniform"
    cols = score_columns(t.levels)
    assert set(cols) <= set(t.table.columns) and set(t.thresholds) == set(cols)
    for c in cols:  # every score carries its threshold (95 % of validation images kept) and a flag
        assert (t.table[f"flag_{c}"] == (t.table[c] > t.thresholds[c])).all()
    # a second run reads the table: nothing is scored again
    from explain.score import run
    assert run(MODEL, CRUISE_C)["scored"] == 0


def test_scored_table_equals_a_direct_computation(collections):
    """NDSB test with the default model: predictions, confidences, kNN score, nearest distance and
    neighbour vote equal a direct computation from the cached model outputs (split_outputs +
    predictions_frame) and a FAISS search of the model's gallery (same gallery and images)."""
    from explain.embeddings import predictions_frame, split_outputs
    from explain.neighbours import KNN_K, batch_vote, load_gallery, normalise, search
    from explain.score import reference_limit, run, scored_table
    from models.handle import open_model

    run(MODEL, "ndsb", split="test")
    t = scored_table(MODEL, "ndsb", split="test").table
    o = split_outputs(MODEL, "ndsb", "test", limit_per_class=reference_limit())
    g = load_gallery(MODEL, reference_limit())
    assert not set(o.rows["relpath"]) & set(g.rows["relpath"])  # test images are not in the gallery
    dist, ids = search(g.index, normalise(o.embeddings), KNN_K)
    ref = pd.concat([o.rows.reset_index(drop=True)[["relpath"]], predictions_frame(o.logits, open_model(MODEL).classifier)],
                    axis=1)
    ref["knn_score"], ref["nn_distance"] = dist[:, KNN_K - 1], dist[:, 0]
    for lvl in g.levels:
        ref[f"vote_{lvl}"], ref[f"vote_share_{lvl}"] = batch_vote(g, ids, lvl)
    both = t.merge(ref, on="relpath", suffixes=("", "_ref"))
    assert len(both) >= min(len(ref), 200)
    for lvl in g.levels:
        assert (both[f"pred_{lvl}"] == both[f"pred_{lvl}_ref"]).mean() > 0.999
        np.testing.assert_allclose(both[f"pred_conf_{lvl}"], both[f"pred_conf_{lvl}_ref"], atol=1e-4)
        assert (both[f"vote_{lvl}"] == both[f"vote_{lvl}_ref"]).mean() > 0.99
        np.testing.assert_allclose(both[f"vote_share_{lvl}"], both[f"vote_share_{lvl}_ref"], atol=0.11)
    np.testing.assert_allclose(both["knn_score"], both["knn_score_ref"], atol=1e-3)
    np.testing.assert_allclose(both["nn_distance"], both["nn_distance_ref"], atol=1e-3)
    assert (both["inconsistent"] == both["inconsistent_ref"]).mean() > 0.999
    assert (t["knn_score"] >= t["nn_distance"]).all() and t["vote_share_class"].between(0.1, 1.0).all()


def test_killed_run_resumes_to_the_same_table(collections):
    """kill -9 in the middle of a run; the next run scores the rest and the table equals an
    uninterrupted run's, with exactly one row per image."""
    from explain.score import job

    env = {"PLANKTON_LENS_SCORE_CHUNK": "128"}
    args = ("run", "--model", MODEL, "--collection", SAMPLE_C, "--json")
    p = subprocess.Popen([sys.executable, "-m", "explain.score", *args], cwd=REPO, env={**os.environ, **env},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        folder = job(MODEL, SAMPLE_C).folder
        deadline = time.time() + 300
        while time.time() < deadline and len(list((folder / "parts").glob("part-*.parquet"))) < 3:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        parts = len(list((folder / "parts").glob("part-*.parquet")))
        assert 3 <= parts < 10 and not (folder / "meta.json").exists(), "kill -9 did not land mid-run"
        r = _cli(*args, env=env)
        assert r.returncode == 0, r.stderr
        resumed = pd.read_parquet(folder / "table.parquet")
        emb_resumed = np.load(folder / "embeddings.npy")
        import shutil
        shutil.rmtree(folder)
        r = _cli(*args, env=env)
        assert r.returncode == 0, r.stderr
        fresh = pd.read_parquet(folder / "table.parquet")
    finally:
        if p.poll() is None:
            p.kill()
    assert len(resumed) == 1209 and resumed["relpath"].is_unique and (resumed["row"].to_numpy() == np.arange(1209)).all()
    pd.testing.assert_frame_equal(resumed, fresh)
    np.testing.assert_array_equal(emb_resumed, np.load(folder / "embeddings.npy"))


def test_ray_engine_writes_the_same_table_as_local(collections):
    """Ray Data on a local Ray (2 CPUs, started here) gives the local engine's table (≤ 1e-5)."""
    pytest.importorskip("ray")
    import ray

    from explain.score import run, scored_table
    from explain.score_ray import init

    init(num_cpus=2)
    try:
        run(MODEL, SAMPLE_C, split="test", engine="ray")
        via_ray = scored_table(MODEL, SAMPLE_C, split="test")
        assert via_ray.meta["engine"] == "ray"
        a, ea = via_ray.table.copy(), np.array(via_ray.embeddings)
    finally:
        ray.shutdown()
    import shutil
    shutil.rmtree(via_ray.folder)
    run(MODEL, SAMPLE_C, split="test", engine="local")
    local = scored_table(MODEL, SAMPLE_C, split="test")
    pd.testing.assert_frame_equal(a, local.table, check_exact=False, atol=1e-5)
    np.testing.assert_allclose(ea.astype(np.float32), np.asarray(local.embeddings, np.float32), atol=1e-3)


def test_cli_bad_input_is_a_message_not_a_traceback(collections):
    for args, expect in [(("--model", "no-such-model", "--collection", SAMPLE_C), "no-such-model"),
                         (("--model", MODEL, "--collection", "no-such-collection"), "no-such-collection"),
                         (("--model", MODEL, "--collection", SAMPLE_C, "--split", "nope"), "split"),
                         (("--model", MODEL, "--collection", SAMPLE_C, "--engine", "spark"), "spark")]:
        r = _cli("run", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and expect in r.stderr


def test_corrupt_image_is_left_out_and_the_rest_scored(collections, tmp_path):
    """A corrupt image inside a collection is skipped when the collection is indexed (and listed
    as unreadable); the others are scored, one row each."""
    from data.collections import add_collection
    from explain.score import run, scored_table

    src = unlabelled_zip(tmp_path / "ok.zip", 10)
    bad = tmp_path / "broken.zip"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(bad, "w") as out:
        names = z.namelist()
        for i, m in enumerate(names):
            out.writestr(m, z.read(m)[:40] if i == 3 else z.read(m))
    add_collection("broken", bad)
    run(MODEL, "broken")
    t = scored_table(MODEL, "broken").table
    assert len(t) == 9 and names[3] not in set(t["relpath"]) and t["readable"].all()
    assert t["pred_class"].notna().all() and t["knn_score"].notna().all()


def test_export_scored_and_reviewed_collection_reads_back_as_ecotaxa(collections, tmp_path):
    """`explain.score export`: a bundle EcoTaxa accepts (type row, unique ids, numeric [f]),
    read back by the project's own reader, with the review's statuses and neutralised text."""
    from data.collections_io import open_collection
    from explain.ecotaxa_rules import check_ecotaxa_tsv
    from explain.review_store import Decision, ReviewStore
    from explain.score import run, scored_table

    run(MODEL, CRUISE_C)
    t = scored_table(MODEL, CRUISE_C).table
    a, b = t["relpath"].iloc[0], t["relpath"].iloc[1]
    store = ReviewStore()
    store.record(Decision(CRUISE_C, a, "confirm_anomaly", "ana", comment='=HYPERLINK("http://x","y")'))
    store.record(Decision(CRUISE_C, b, "assign_label", "ben", label="copepod_calanoid", label_level="class"))
    out = tmp_path / "cruise_bundle.zip"
    r = _cli("export", "--model", MODEL, "--collection", CRUISE_C, "--out", str(out), "--images", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rows"] == len(t) and info["images"] == len(t)
    with zipfile.ZipFile(out) as z:
        tsv_name = next(n for n in z.namelist() if n.endswith(".tsv"))
        text = z.read(tsv_name).decode("utf-8-sig")
    assert check_ecotaxa_tsv(text) == []
    assert '=HYPERLINK' not in text.replace("'=HYPERLINK", "")
    back = open_collection(out, "back").metadata()
    assert len(back) == len(t)
    status = dict(zip(back["relpath"].map(lambda p: Path(p).name), back["status"]))
    assert status[Path(a).name] == "dubious" and status[Path(b).name] == "validated"
    assert (pd.Series(status).drop([Path(a).name, Path(b).name]) == "predicted").all()


def test_background_run_reports_progress_and_finishes(collections):
    """`start` scores in a process of its own (a page reload does not stop it); `status` follows it."""
    from explain.score import scored_table, start, status

    st = start(MODEL, CRUISE_C)
    assert st["state"] == "running" and st["total"] == 48
    assert start(MODEL, CRUISE_C)["state"] == "running"  # a second start does not start a second run
    deadline = time.time() + 300
    while status(MODEL, CRUISE_C)["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert status(MODEL, CRUISE_C)["state"] == "done"
    assert len(scored_table(MODEL, CRUISE_C).table) == 48


def test_neighbour_query_says_what_its_knn_distance_means(ndsb, ndsb_manifest):
    """`explain.neighbours query --json` carries the threshold that keeps 95 % of the model's
    validation images and whether the image lies above it (a bare 0.39 says nothing)."""
    from explain.score import reference
    from models.handle import open_model

    rel = ndsb_manifest[ndsb_manifest["split"] == "test"]["relpath"].iloc[0]
    r = subprocess.run([sys.executable, "-m", "explain.neighbours", "query", "--model", MODEL, "--image", f"ndsb:{rel}",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    thr = reference(open_model(MODEL)).thresholds["knn_score"]
    assert out["knn_threshold"] == pytest.approx(thr, abs=1e-5)
    assert out["knn_flagged"] == (out["knn_score"] > out["knn_threshold"]) and "95%" in out["knn_threshold_note"]
