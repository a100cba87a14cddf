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


def test_distances_with_the_indexed_vectors_are_exact_and_do_not_depend_on_the_batch():
    """Near neighbours of normalised vectors: FAISS's float32 |q|²+|v|²−2q·v loses digits (and
    differs with how many queries go together); with ``vectors`` the distances are float64-exact."""
    x = normalise(_clustered(3000, d=64))
    q = normalise(x[:300] + 0.01 * np.random.default_rng(3).normal(size=(300, 64)).astype(np.float32))
    index = build_index(x)
    dist, ids = search(index, q, 8, vectors=x)
    true = np.sqrt(((x[ids].astype(np.float64) - q[:, None].astype(np.float64)) ** 2).sum(-1))
    np.testing.assert_allclose(dist, true, rtol=1e-6, atol=1e-7)
    assert (np.diff(dist, axis=1) >= 0).all()  # re-sorted by the exact distance
    parts = [search(index, q[a:a + 7], 8, vectors=x) for a in range(0, 300, 7)]
    np.testing.assert_array_equal(np.concatenate([d for d, _ in parts]), dist)
    np.testing.assert_allclose(knn_score(index, q, k=8, vectors=x), dist[:, 7], rtol=1e-6)  # q normalised again
    # Inner-product indexes: exact similarities, best first; missing neighbours stay marked.
    s, i = search(build_index(x[:3], metric="ip"), q[:2], 5, vectors=x[:3])
    np.testing.assert_allclose(s[:, :3], (x[i[:, :3]] * q[:2, None]).sum(-1), rtol=1e-6)
    assert (np.diff(s[:, :3], axis=1) <= 0).all()
    assert (i[:, 3:] == -1).all() and np.isinf(s[:, 3:]).all()
    d3, i3 = search(build_index(x[:3]), q[:2], 5, vectors=x[:3])
    assert (i3[:, 3:] == -1).all() and np.isinf(d3[:, 3:]).all()


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


# --- the map of a scored table (synthetic: no model, no data) ----------------------------------------
def _scored(tmp_path, n: int = 1200, d: int = 24, centres: int = 6, unreadable: int = 3):
    """A stand-in :class:`explain.score.ScoredTable`: clustered float16 embeddings, ``readable``
    False for the first ``unreadable`` rows."""
    from explain.score import ScoredTable

    x = _clustered(n, d=d, centres=centres, seed=3)
    table = pd.DataFrame({"row": np.arange(n), "relpath": [f"{i}.png" for i in range(n)], "dataset": "syn",
                          "class": "unlabelled", "readable": np.arange(n) >= unreadable})
    folder = tmp_path / "table"
    folder.mkdir(parents=True, exist_ok=True)
    return ScoredTable(table, x.astype(np.float16), {"levels": ["class"], "rows": n}, folder)


@pytest.fixture(scope="module")
def small_fit_map(tmp_path_factory):
    """A map fitted on 300 of 1,197 readable images (MAP_FIT_MAX patched), the rest placed."""
    from explain import projection as P

    scored = _scored(tmp_path_factory.mktemp("map"))
    steps = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "MAP_FIT_MAX", 300)
        mp.setattr(P, "TRANSFORM_BATCH", 400)
        m = P.table_map(scored, on_progress=lambda f, msg: steps.append((f, msg)))
        yield scored, m, steps, mp


def test_map_is_fitted_on_a_sample_and_the_rest_placed(small_fit_map):
    from explain import projection as P

    scored, m, steps, _ = small_fit_map
    assert P.MAP_FIT_MAX == 300
    assert m.coords.shape == (1200, 2) and m.coords.dtype == np.float32
    assert np.isnan(m.coords[:3]).all() and np.isfinite(m.coords[3:]).all()  # unreadable rows stay off the map
    assert len(m.fitted) == 300 and len(np.unique(m.fitted)) == 300 and (m.fitted >= 3).all()
    assert m.placed == 1197 - 300
    assert len(m.reducer().embedding_) == 300
    np.testing.assert_array_equal(P.fit_sample(P.mappable(scored), 300), m.fitted)  # seeded: the same sample
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) >= 4  # 3 transform batches


def test_map_is_cached_in_the_table_folder_and_read_back(small_fit_map):
    from explain import projection as P

    scored, m, _, mp = small_fit_map
    coords_path, reducer_path = P.map_paths(scored.folder)
    assert coords_path.parent == scored.folder and coords_path.exists() and reducer_path.exists()
    assert not list(scored.folder.glob(".*tmp*"))  # atomic writes leave no temporary file
    mp.setattr(P, "fit_umap", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refitted")))
    again = P.table_map(scored)
    assert again.seconds == 0.0
    np.testing.assert_array_equal(again.coords, m.coords)
    np.testing.assert_array_equal(again.fitted, m.fitted)
    # other UMAP settings are another map; a damaged file reads as absent
    mp.setattr(P, "UMAP_PARAMS", {**P.UMAP_PARAMS, "min_dist": 0.5})
    assert P.read_map(scored) is None
    mp.setattr(P, "UMAP_PARAMS", {**P.UMAP_PARAMS, "min_dist": 0.1})
    assert P.read_map(scored) is not None


def test_transform_places_held_back_images_near_their_fitted_neighbours(small_fit_map):
    from explain import projection as P

    scored, m, _, _ = small_fit_map
    emb = normalise(np.asarray(scored.embeddings, np.float32))
    rest = np.setdiff1d(np.arange(3, 1200), m.fitted)
    _, nn = search(build_index(emb[m.fitted]), emb[rest], 1)
    err = np.linalg.norm(m.coords[rest] - m.coords[m.fitted[nn[:, 0]]], axis=1)
    spread = np.linalg.norm(np.nanmax(m.coords, 0) - np.nanmin(m.coords, 0))
    assert np.median(err) < 0.1 * spread, (np.median(err), spread)
    # an upload placed approximately (nearest fitted images) lands near UMAP's exact transform
    q = np.asarray(scored.embeddings[rest[:40]], np.float32)
    quick = P.approximate_place(m, P.sample_index(scored, m), q)
    exact = P.place(m.reducer(), q)
    assert np.isfinite(quick).all()
    assert np.median(np.linalg.norm(quick - exact, axis=1)) < 0.15 * spread


def test_tiny_collection_gets_a_message_not_a_map(tmp_path):
    from explain.projection import MAP_MIN, MapTooSmall, table_map

    with pytest.raises(MapTooSmall, match=f"at least {MAP_MIN}"):
        table_map(_scored(tmp_path, n=6, unreadable=3))


def test_neighbour_position_is_a_weighted_mean_of_the_neighbours():
    from explain.projection import neighbour_position

    coords = np.array([[0, 0], [10, 0], [0, 10], [5, 5]], np.float32)
    # equal distances: the plain mean; missing neighbours (-1, inf) are ignored
    xy = neighbour_position(coords, np.array([[0, 1, -1]]), np.array([[0.3, 0.3, np.inf]]))
    np.testing.assert_allclose(xy, [[5, 0]], atol=1e-6)
    # the closer neighbour weighs more; no neighbour at all gives NaN
    xy = neighbour_position(coords, np.array([[0, 1], [-1, -1]]), np.array([[0.1, 0.5], [np.inf, np.inf]]))
    assert xy[0, 0] < 5 and np.isnan(xy[1]).all()


def test_grid_counts_equal_numpy_histogram2d():
    """The density image's binning (one bincount) gives numpy's 2-D histogram exactly: counts,
    weighted sums, edges, the right edge in the last bin and points outside the range left out."""
    from explain.map_plot import grid_counts, view_range

    rng = np.random.default_rng(1)
    xy = np.concatenate([rng.normal(0, 1, (200_000, 2)), rng.normal(5, 0.3, (50_000, 2))])
    x, y = xy[:, 0], xy[:, 1]
    v = view_range(x, y)
    for r in ([[v[0], v[1]], [v[2], v[3]]], [[-1.0, 1.0], [-2.0, 0.5]]):  # the whole map, and a window
        for bins in (256, 64, 7):
            ref, xe, ye = np.histogram2d(x, y, bins=bins, range=r)
            got, gxe, gye = grid_counts(x, y, bins, r)
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_allclose(gxe, xe) and np.testing.assert_allclose(gye, ye)
        w = rng.random(len(x))
        np.testing.assert_allclose(grid_counts(x, y, 64, r, weights=w)[0], np.histogram2d(x, y, 64, range=r, weights=w)[0])
    edge = np.array([0.0, 1.0, 1.0, 1.5, -0.25])
    np.testing.assert_array_equal(grid_counts(edge, edge[::-1], 4, [[0, 1], [0, 1]])[0],
                                  np.histogram2d(edge, edge[::-1], 4, range=[[0, 1], [0, 1]])[0])


def test_map_of_a_large_table_is_a_density_image_that_zooms_into_points(monkeypatch):
    """Above SCATTER_MAX points the map is a 2-D histogram drawn as a heatmap; a box on it gives a
    region whose points (at most REGION_MAX) are drawn as a scatter."""
    import plotly.io as pio

    from explain import map_plot as M

    monkeypatch.setattr(M, "SCATTER_MAX", 5_000)
    monkeypatch.setattr(M, "REGION_MAX", 2_000)
    monkeypatch.setattr(M, "RING_MAX", 500)
    rng = np.random.default_rng(0)
    n = 60_000
    xy = np.concatenate([rng.normal(0, 1, (n // 2, 2)), rng.normal(6, 1, (n // 2, 2))]).astype(np.float32)
    pts = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "label": np.where(np.arange(n) < n // 2, "a", "b")},
                       index=pd.RangeIndex(n) + 7)
    cat = pd.Series(pts["label"].to_numpy(), index=pts.index)
    flagged = rng.random(n) < 0.05
    mark = M.Mark(6.0, 6.0, "your image")
    mf = M.map_figure(pts, cat, "class (true)", False, flagged, [mark], flag_scores=xy[:, 0])
    assert mf.kind == "density" and mf.total == n and mf.drawn == 500
    types = [t.type for t in mf.figure.data]
    assert types[0] == "heatmap" and "scattergl" in types
    heat = mf.figure.data[0]
    view = M.view_range(xy[:, 0], xy[:, 1])
    inside = M.in_region(xy[:, 0], xy[:, 1], view).sum()
    assert int(np.asarray(heat.customdata).sum()) == inside  # every image in view counted once
    rings = next(t for t in mf.figure.data if t.name.startswith(M.FLAGGED))
    assert len(rings.x) == 500 and "the 500 highest" in rings.name  # the highest-scoring flagged images
    assert np.min(rings.x) >= np.sort(xy[flagged, 0])[-500] - 1e-6
    assert any(t.name == "your image" for t in mf.figure.data)
    size = len(pio.to_json(mf.figure, validate=False))
    assert size < 1_500_000, size  # a 256² image, not 60,000 points
    # a score colours the cells by their mean
    score = pd.Series(xy[:, 0].astype(np.float32), index=pts.index)
    num = M.map_figure(pts, score, "kNN distance", True, np.zeros(n, bool))
    z = np.asarray(num.figure.data[0].z, np.float64)
    assert np.nanmin(z) >= xy[:, 0].min() - 1e-3 and np.nanmax(z) <= xy[:, 0].max() + 1e-3
    # a box selection → a region → its points as a scatter, capped at REGION_MAX
    region = M.region_from_selection({"box": [{"xref": "x", "yref": "y", "x": [5.0, 7.0], "y": [7.0, 5.0]}],
                                      "points": []}, view)
    assert region == (5.0, 7.0, 5.0, 7.0)
    zoomed = M.map_figure(pts, cat, "class (true)", False, flagged, [mark], region=region)
    assert zoomed.kind == "scatter" and zoomed.total == M.in_region(xy[:, 0], xy[:, 1], region).sum() > 2_000
    assert zoomed.drawn == 2_000
    rows = np.concatenate([np.asarray(t.customdata) for t in zoomed.figure.data
                           if t.name not in ("your image", M.FLAGGED)])
    assert len(rows) == 2_000 and set(rows) <= set(pts.index)
    sub = pts.loc[rows]
    assert M.in_region(sub["x"].to_numpy(), sub["y"].to_numpy(), region).all()
    # a click on the density image zooms into a window around it; small maps stay a scatter
    r = M.region_from_selection({"points": [{"x": 1.0, "y": 2.0, "customdata": -1}]}, view)
    assert r[0] < 1.0 < r[1] and r[2] < 2.0 < r[3]
    small = M.map_figure(pts.head(1000), cat.head(1000), "class (true)", False, flagged[:1000], [M.Mark(50.0, -40.0, "far")])
    assert small.kind == "scatter" and small.drawn == 1000
    xr, yr = small.figure.layout.xaxis.range, small.figure.layout.yaxis.range
    assert xr[0] < 50 < xr[1] and yr[0] < -40 < yr[1]  # a mark off the central 99 % stays in view


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
