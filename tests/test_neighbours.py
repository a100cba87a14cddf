"""Embeddings, their cache, the FAISS index, neighbour votes, the kNN score, the UMAP map and the CLIs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pandas as pd
import pytest

from explain.neighbours import (KNN_K, batch_vote, build_index, drop_self, knn_score, make_gallery, neighbour_table,
                                neighbour_vote, normalise, search)
from tests.conftest import REPO, requires_data
from models.handle import open_model

LIMIT = 10  # images per class and split in the real-data tests (fast on a CPU)


def _clustered(n: int, d: int = 32, centres: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32) * 4
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None]
    ids = np.argsort(d2, 1)[:, :k]
    return np.sqrt(np.maximum(np.take_along_axis(d2, ids, 1), 0)), ids


# --- index and scores on synthetic vectors ---------------------------------------------------------
def test_exact_index_matches_numpy_brute_force():
    x, q = _clustered(3000), _clustered(50, seed=1)
    index = build_index(x)
    assert isinstance(index, faiss.IndexFlatL2) or faiss.get_num_gpus() > 0
    dist, ids = search(index, q, 10)
    bd, bi = _brute(x, q, 10)
    np.testing.assert_allclose(dist, bd, rtol=1e-3, atol=1e-3)  # Euclidean, not squared
    assert (ids == bi).mean() > 0.99


def test_index_kind_is_chosen_by_size_and_approximate_search_has_high_recall():
    both = _clustered(20_200)
    x, q = both[:20_000], both[20_000:]  # queries from the same distribution, not indexed
    ivf = build_index(x, exact_max=10_000, gpu=False)
    assert isinstance(ivf, faiss.IndexIVFFlat)
    assert isinstance(build_index(x[:5000], exact_max=10_000, gpu=False), faiss.IndexFlatL2)
    hnsw = build_index(x, kind="hnsw")
    exact = _brute(x, q, 10)[1]
    for index in (ivf, hnsw):
        got = search(index, q, 10)[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        assert recall >= 0.9, (type(index).__name__, recall)
    with pytest.raises(ValueError):
        build_index(x, kind="lsh")
    with pytest.raises(ValueError):
        build_index(np.zeros((0, 8), np.float32))


def test_missing_neighbours_are_marked():
    dist, ids = search(build_index(_clustered(3)), _clustered(1, seed=2), 5)
    assert (ids[0, 3:] == -1).all() and np.isinf(dist[0, 3:]).all()


def test_knn_score_is_the_kth_distance_on_normalised_features():
    x, q = _clustered(2000), _clustered(40, seed=1)
    xn = normalise(x)
    index = build_index(xn)
    s = knn_score(index, q, k=7)
    bd, _ = _brute(xn, normalise(q), 7)
    np.testing.assert_allclose(s, bd[:, 6], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(knn_score(index, q * 13.0, k=7), s, rtol=1e-4, atol=1e-5)  # scale-free
    # Far-away points score higher than points from the training clusters.
    far = _clustered(40, seed=9, centres=3) + 40
    assert np.median(knn_score(index, far)) > np.percentile(knn_score(index, x, exclude_self=True), 99)


def test_knn_score_excludes_self_matches():
    x = normalise(_clustered(500))
    index = build_index(x)
    with_self = knn_score(index, x, k=5)
    without = knn_score(index, x, k=5, exclude_self=True)
    d, i = _brute(x, x, 6)
    np.testing.assert_allclose(with_self, d[:, 4], atol=1e-4)
    np.testing.assert_allclose(without, d[:, 5], atol=1e-4)
    # drop_self keeps order and removes exactly the own id
    dist, ids = search(index, x[:3], 6)
    dd, ii = drop_self(dist, ids, np.arange(3), 5)
    assert ii.shape == (3, 5) and not (ii == np.arange(3)[:, None]).any()


def test_neighbour_vote_majority_and_tie_break():
    t = pd.DataFrame({"group": ["a", "b", "b", "a", "c"], "class": ["a1", "b1", "b2", "a2", "c1"],
                      "distance": [0.1, 0.2, 0.3, 0.4, 0.5]})
    v = neighbour_vote(t, ["group", "class"])
    assert v["group"] == {"label": "a", "votes": 2, "share": 0.4}  # a and b tie; a is closer
    assert v["class"]["label"] == "a1"
    rows = pd.DataFrame({"relpath": [f"{i}.jpg" for i in range(6)], "dataset": "x",
                         "group": ["a", "a", "a", "b", "b", "c"], "class": list("pqrstu")})
    g = make_gallery("m", "x", ("group", "class"), np.eye(6, dtype=np.float32), rows)
    labels, share = batch_vote(g, np.array([[0, 1, 3], [3, 4, 5], [5, -1, -1]]), "group")
    assert labels.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(share, [2 / 3, 2 / 3, 1.0])
    nt = neighbour_table(g, np.eye(6, dtype=np.float32)[2], k=3, exclude_id=2)
    assert 2 not in nt["gallery_id"].tolist() and len(nt) == 3 and nt["distance"].is_monotonic_increasing


# --- real model and data ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_name():
    from models.zoo import default_model_name

    name = default_model_name()
    if name is None:
        pytest.skip("no model in the zoo")
    return name


@requires_data
def test_compute_embeddings_batches_are_consistent(model_name, ndsb, ndsb_manifest):
    from data.manifest import decoded_array
    from explain.embeddings import compute_embeddings

    model = open_model(model_name).classifier
    rows = ndsb_manifest.groupby("class").head(1).head(40).reset_index(drop=True)
    imgs = np.asarray(decoded_array(ndsb, rows, 64, progress=False))
    e = compute_embeddings(model, imgs, batch_size=16)
    assert e.dtype == np.float32 and e.shape[0] == 40 and np.isfinite(e).all()
    np.testing.assert_allclose(compute_embeddings(model, imgs[:3], batch_size=256), e[:3], rtol=1e-4, atol=1e-4)
    assert compute_embeddings(model, imgs[:0]).shape == (0, e.shape[1])


@requires_data
def test_gallery_neighbours_include_their_own_class(model_name):
    """Images of the gallery find images of their own class among their 10 nearest other known images
    far more often than chance; for a trained model (leaf accuracy ≥ 0.5) for most of them."""
    from explain.embeddings import split_outputs
    from explain.neighbours import load_gallery

    g = load_gallery(model_name, LIMIT)
    man = open_model(model_name).manifest
    assert not g.rows["class"].isin(man.get("heldout") or []).any()
    assert (g.rows["split"] == "train").all()
    dist, ids = search(g.index, g.vectors, 11)
    dist, ids = drop_self(dist, ids, np.arange(len(g)), 10)
    cls = g.rows["class"].to_numpy()
    own = (cls[ids] == cls[:, None]).any(1).mean()
    chance = (cls[np.random.default_rng(0).permutation(len(cls))][ids] == cls[:, None]).any(1).mean()
    assert own > 3 * chance, (own, chance)
    acc = man.get("metrics", {}).get("test", {}).get("levels", {}).get("class", {}).get("accuracy", 0)
    if acc >= 0.5:
        assert own >= 0.6, (own, acc)
    # The CLI-level helper on one gallery image: the image itself comes first, then its class.
    o = split_outputs(model_name, g.dataset, "train", limit_per_class=LIMIT)
    t = neighbour_table(g, o.embeddings[0], 10)
    assert t.iloc[0]["relpath"] == o.rows.iloc[0]["relpath"] and t.iloc[0]["distance"] < 1e-3


@requires_data
def test_cache_is_reused_and_rebuilt_when_the_model_changes(model_name, tmp_path, monkeypatch):
    import torch

    from explain import embeddings as E
    from models.checkpoint import save_checkpoint

    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PLANKTON_LENS_ZOO", f"{tmp_path / 'zoo'}{os.pathsep}{os.environ.get('PLANKTON_LENS_ZOO', '')}")
    lm = open_model(model_name)
    model, man = lm.classifier, lm.manifest
    extra = {k: man[k] for k in ("dataset", "split_seed", "heldout") if k in man}
    save_checkpoint(model, tmp_path / "zoo" / "lens-test", **extra)
    e1, rows = E.split_embeddings("lens-test", "ndsb", limit_per_class=1)
    files = list((tmp_path / "cache" / "embeddings" / "lens-test").glob("*.npz"))
    assert len(files) == 1 and len(e1) == len(rows) > 121
    assert set(rows["split"]) == {"train", "val", "test"}
    e_test, r_test = E.split_embeddings("lens-test", "ndsb", "test", limit_per_class=1)
    assert (r_test["split"] == "test").all() and len(e_test) < len(e1)

    # Reused: a second call does not run the model.
    monkeypatch.setattr(E, "compute_outputs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(E.split_embeddings("lens-test", "ndsb", limit_per_class=1)[0], e1)
    monkeypatch.undo()
    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PLANKTON_LENS_ZOO", f"{tmp_path / 'zoo'}{os.pathsep}{os.environ.get('PLANKTON_LENS_ZOO', '')}")

    # Retrained (other weights, same name): a new sha256, so a new cache file replaces the old one.
    changed = open_model("lens-test").classifier
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(changed, tmp_path / "zoo" / "lens-test", **extra)
    e2, _ = E.split_embeddings("lens-test", "ndsb", limit_per_class=1)
    files2 = list((tmp_path / "cache" / "embeddings" / "lens-test").glob("*.npz"))
    assert len(files2) == 1 and files2 != files
    assert not np.allclose(e1, e2)
    # A different dataset subset (another manifest) is another cache entry.
    E.split_embeddings("lens-test", "ndsb", limit_per_class=2)
    assert len(list((tmp_path / "cache" / "embeddings" / "lens-test").glob("*.npz"))) == 2


@requires_data
def test_dataset_neighbours_scores_and_votes(model_name):
    from explain.neighbours import image_frame

    df = image_frame(model_name, LIMIT)
    assert len(df) == len(df.dropna(subset=["knn_score"]))
    assert df["in_gallery"].sum() > 0 and (~df["in_gallery"]).sum() > 0
    assert (df.loc[df["in_gallery"], "split"] == "train").all()
    # gallery images do not count themselves: their nearest neighbour is another image
    assert (df.loc[df["in_gallery"], "nn_distance"] >= 0).all()
    assert (df["knn_score"] >= df["nn_distance"]).all()
    assert df["vote_share_class"].between(0.1, 1.0).all()
    assert set(df["inconsistent"].unique()) <= {True, False}
    assert (df.loc[df["inconsistent"], "inconsistency"].str.len() > 0).all()


@requires_data
def test_umap_map_is_cached_and_transform_places_images_near_their_fit(model_name):
    from explain.embeddings import split_embeddings
    from explain.projection import embedding_map, map_cached, place

    m = embedding_map(model_name, limit_per_class=3)
    assert m.coords.shape == (len(m.rows), 2) and np.isfinite(m.coords).all()
    assert map_cached(model_name, limit_per_class=3)
    again = embedding_map(model_name, limit_per_class=3)
    assert again.seconds == 0.0
    np.testing.assert_array_equal(again.coords, m.coords)
    emb, _ = split_embeddings(model_name, m.dataset, limit_per_class=3)
    idx = np.arange(0, len(emb), max(1, len(emb) // 20))
    xy = place(m.reducer(), emb[idx])
    spread = np.linalg.norm(m.coords.max(0) - m.coords.min(0))
    err = np.linalg.norm(xy - m.coords[idx], axis=1)
    assert np.median(err) < 0.1 * spread, (np.median(err), spread)


def test_neighbour_position_is_a_weighted_mean_of_the_neighbours():
    from explain.projection import gallery_map_rows, neighbour_position

    coords = np.array([[0, 0], [10, 0], [0, 10], [5, 5]], np.float32)
    # equal distances: the plain mean; missing neighbours (-1, inf) are ignored
    xy = neighbour_position(coords, np.array([[0, 1, -1]]), np.array([[0.3, 0.3, np.inf]]))
    np.testing.assert_allclose(xy, [[5, 0]], atol=1e-6)
    # the closer neighbour weighs more; no neighbour at all gives NaN
    xy = neighbour_position(coords, np.array([[0, 1], [-1, -1]]), np.array([[0.1, 0.5], [np.inf, np.inf]]))
    assert xy[0, 0] < 5 and np.isnan(xy[1]).all()
    rows = pd.DataFrame({"dataset": ["d"] * 3, "relpath": ["a", "b", "c"]})
    gal = pd.DataFrame({"dataset": ["d", "d", "e"], "relpath": ["c", "a", "a"]})
    np.testing.assert_array_equal(gallery_map_rows(gal, rows), [2, 0, -1])


def test_quick_place_lands_in_the_cluster_of_the_neighbours():
    from explain.projection import gallery_map_rows, quick_place

    x = _clustered(2000, centres=8)
    rows = pd.DataFrame({"dataset": "syn", "relpath": [f"{i}.png" for i in range(len(x))], "class": "c"})
    centre = normalise(x) @ np.ones((x.shape[1], 2), np.float32)  # a stand-in 2-D "map" of the vectors
    g = make_gallery("m", "syn", ("class",), x[::2], rows.iloc[::2])
    q = x[1::2][:50]
    xy = quick_place(centre, g, gallery_map_rows(g.rows, rows), q, k=15)
    truth = centre[1::2][:50]
    spread = np.linalg.norm(centre.max(0) - centre.min(0))
    assert np.median(np.linalg.norm(xy - truth, axis=1)) < 0.1 * spread


@requires_data
def test_quick_placement_is_near_umap_transform(model_name):
    """The instant placement of an upload (mean of its nearest known images on the map) lands
    close to UMAP's exact ``transform``, which it stands in for until numba is ready."""
    from explain.embeddings import split_embeddings
    from explain.neighbours import load_gallery
    from explain.projection import embedding_map, gallery_map_rows, place, quick_place

    m = embedding_map(model_name, limit_per_class=3)
    emb, rows = split_embeddings(model_name, m.dataset, limit_per_class=3)
    g = load_gallery(model_name, 3)
    to_map = gallery_map_rows(g.rows, rows)
    assert (to_map >= 0).all()
    idx = np.flatnonzero((rows["split"] != "train").to_numpy())[::5][:30]  # images outside the gallery
    quick = quick_place(m.coords, g, to_map, emb[idx])
    exact = place(m.reducer(), emb[idx])
    spread = np.linalg.norm(m.coords.max(0) - m.coords.min(0))
    assert np.isfinite(quick).all()
    assert np.median(np.linalg.norm(quick - exact, axis=1)) < 0.15 * spread


# --- commands --------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@requires_data
def test_query_command_json(model_name, ndsb, ndsb_manifest, tmp_path):

    b = _cli("explain.embeddings", "build", "--model", model_name, "--limit-per-class", str(LIMIT), "--json")
    assert b.returncode == 0, b.stderr
    info = json.loads(b.stdout)
    assert info["images"] > 1000 and info["dim"] > 0
    rel = ndsb_manifest[ndsb_manifest["split"] == "test"]["relpath"].iloc[0]
    img = tmp_path / "query.jpg"
    img.write_bytes(ndsb.read_bytes(rel))
    r = _cli("explain.neighbours", "query", "--model", model_name, "--image", str(img), "--k", "10", "--json",
             "--limit-per-class", str(LIMIT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["neighbours"]) == 10
    assert set(out["neighbours"][0]) >= {"path", "dataset", "label", "distance"}
    d = [n["distance"] for n in out["neighbours"]]
    assert d == sorted(d) and all(n["dataset"] == "ndsb" for n in out["neighbours"])
    model = open_model(model_name).classifier
    assert list(out["vote"]) == list(model.levels)
    assert out["knn_score"] >= d[-1] - 1e-4 or KNN_K != 10
    # A gallery image named as dataset:relpath is not its own neighbour.
    from explain.embeddings import dataset_manifest

    _, rows = dataset_manifest("ndsb", open_model(model_name).manifest, LIMIT)
    own = rows[rows["split"] == "train"]["relpath"].iloc[0]
    r = _cli("explain.neighbours", "query", "--model", model_name, "--image", f"ndsb:{own}", "--json",
             "--limit-per-class", str(LIMIT))
    assert r.returncode == 0, r.stderr
    assert own not in [n["path"] for n in json.loads(r.stdout)["neighbours"]]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    r = _cli("explain.neighbours", "query", "--model", model_name, "--image", str(bad), "--limit-per-class", str(LIMIT))
    assert r.returncode == 2 and "not an image" in r.stderr and "Traceback" not in r.stderr
    r = _cli("explain.neighbours", "query", "--model", "no-such-model", "--image", str(img))
    assert r.returncode == 2 and "no-such-model" in r.stderr and "Traceback" not in r.stderr


def test_truncated_cache_files_are_rebuilt_not_raised(tmp_path):
    """A cache file cut short (a run killed while writing it, a full disk) reads as absent:
    numpy raises zipfile.BadZipFile for a truncated .npz, which is not an OSError."""
    import numpy as np

    from explain.embeddings import _load

    path = tmp_path / "outputs.npz"
    np.savez(path, embeddings=np.zeros((50, 8), np.float32), logits_class=np.zeros((50, 3), np.float32))
    assert _load(path, ["class"]) is not None
    path.write_bytes(path.read_bytes()[:300])
    assert _load(path, ["class"]) is None
