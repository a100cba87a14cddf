"""A 2-D UMAP map of a model's embeddings, computed once and cached; new images placed with ``transform``.

UMAP's neighbour graph comes from an exact FAISS search (faster than NN-descent at this size),
and the same FAISS index answers ``transform``'s neighbour queries, so placing an upload on the
map takes well under a second. The map's table (:func:`map_frame`) joins coordinates, manifest
columns, the model's per-level predictions and the kNN score, for colouring and selection.
"""
from __future__ import annotations

import pickle
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.paths import cache_dir

from .neighbours import build_index, normalise, search
from models.handle import open_model

#: UMAP settings of the cached map (part of the cache key, with MAP_VERSION).
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1}
MAP_VERSION = 2


class FaissKNN:
    """The neighbour search UMAP's ``transform`` calls (``query``), over an exact FAISS index.
    Pickles as its vectors; the index is rebuilt on load."""

    _angular_trees = False

    def __init__(self, vectors: np.ndarray):
        self._x = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = build_index(self._x, kind="flat", gpu=False)

    def query(self, X: np.ndarray, k: int, epsilon: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        dist, ids = search(self._index, np.asarray(X, dtype=np.float32), k)
        return ids.astype(np.int32), dist.astype(np.float32)

    def __getstate__(self) -> dict:
        return {"x": self._x}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["x"])


def fit_umap(embeddings: np.ndarray, n_neighbors: int = UMAP_PARAMS["n_neighbors"],
             min_dist: float = UMAP_PARAMS["min_dist"], random_state: int | None = None, verbose: bool = False,
             init: str = "pca"):
    """A fitted ``umap.UMAP`` on L2-normalised ``embeddings`` (its ``embedding_`` is the 2-D map).

    The neighbour graph comes from FAISS (IVF with recall@10 ≥ 0.95 above 5,000 images, exact
    below); the initial layout is PCA (Kobak & Linderman 2021: keeps the global structure, and
    skips the spectral eigensolver, a third of the time on 30k images).
    ``random_state=None`` lets UMAP use every core (the layout then varies slightly run to run).
    """
    import umap

    x = normalise(embeddings)
    k = int(min(n_neighbors, len(x) - 1))
    if k < 2:
        raise ValueError(f"need at least 3 images for a map, got {len(x)}")
    graph = build_index(x, kind="ivf" if len(x) > 5000 else "flat", gpu=False)
    dist, ids = search(graph, x, k)
    knn = FaissKNN(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, metric="euclidean", random_state=random_state,
                            transform_seed=42, init=init, precomputed_knn=(ids.astype(np.int32), dist, knn),
                            verbose=verbose)
        reducer.fit(x)
    return reducer


_TRANSFORM_LOCK = threading.Lock()


def place(reducer, embeddings: np.ndarray) -> np.ndarray:
    """Map coordinates (M, 2) of new images' embeddings, with the fitted reducer's ``transform``.

    The layout step runs single-threaded with a fixed seed (reproducible, and no thread start-up
    per epoch). The first call in a process compiles UMAP's numba code: see :func:`warm_up`.
    """
    with _TRANSFORM_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reducer.random_state is None:
            reducer.random_state = 0
        return np.asarray(reducer.transform(normalise(embeddings)), dtype=np.float32)


def warm_up(reducer) -> None:
    """Run ``transform`` once on an indexed vector, so the numba compilation it triggers (tens of
    seconds on a busy CPU) is done before a user's first upload."""
    place(reducer, np.asarray(reducer._raw_data[:1]))


@dataclass
class EmbeddingMap:
    """The cached map of one model over one dataset: coordinates aligned with ``rows``."""

    model_name: str
    dataset: str
    coords: np.ndarray
    rows: pd.DataFrame
    reducer_path: Path
    seconds: float  # time of the UMAP fit (0 when read from the cache)

    def reducer(self):
        """The fitted UMAP (loaded from disk; needed only to place new images)."""
        with open(self.reducer_path, "rb") as f:
            return pickle.load(f)


def _paths(model_name: str, dataset: str, limit_per_class: int | None) -> tuple[Path, Path]:
    from .embeddings import cache_path, dataset_rows

    man = open_model(model_name).manifest
    _, _, key = dataset_rows(dataset, man, limit_per_class)
    emb = cache_path(model_name, man["sha256"], dataset, key)
    tag = f"umap-n{UMAP_PARAMS['n_neighbors']}-d{UMAP_PARAMS['min_dist']}-v{MAP_VERSION}"
    base = cache_dir() / "maps" / model_name / f"{emb.stem}__{tag}"
    return base.with_name(base.name + ".coords.npy"), base.with_name(base.name + ".umap.pkl")


def embedding_map(model_name: str, dataset: str | None = None, limit_per_class: int | None = None,
                  progress: bool = False) -> EmbeddingMap:
    """The UMAP map of every image of ``dataset`` (default: the model's own) embedded by ``model_name``;
    fitted on first use and cached on disk (coordinates and the fitted reducer)."""
    from .embeddings import split_embeddings

    dataset = dataset or open_model(model_name).manifest.get("dataset", "ndsb")
    coords_path, reducer_path = _paths(model_name, dataset, limit_per_class)
    emb, rows = split_embeddings(model_name, dataset, None, progress=progress, limit_per_class=limit_per_class)
    if coords_path.exists() and reducer_path.exists():
        try:
            coords = np.load(coords_path)
            if len(coords) == len(rows):
                return EmbeddingMap(model_name, dataset, coords, rows, reducer_path, 0.0)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    t0 = time.time()
    reducer = fit_umap(emb, verbose=progress)
    seconds = time.time() - t0
    coords = np.asarray(reducer.embedding_, dtype=np.float32)
    coords_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = reducer_path.with_name(reducer_path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(reducer, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(reducer_path)
    tmp = coords_path.with_name(coords_path.name + ".tmp.npy")
    np.save(tmp, coords)
    tmp.replace(coords_path)  # written last: its presence means the pair is complete
    from .embeddings import evict_stale

    evict_stale(coords_path.parent, coords_path)
    return EmbeddingMap(model_name, dataset, coords, rows, reducer_path, seconds)


def map_cached(model_name: str, dataset: str | None = None, limit_per_class: int | None = None) -> bool:
    """Whether the map is already on disk (then :func:`embedding_map` only reads it)."""

    dataset = dataset or open_model(model_name).manifest.get("dataset", "ndsb")
    coords, reducer = _paths(model_name, dataset, limit_per_class)
    return coords.exists() and reducer.exists()


def map_frame(model_name: str, limit_per_class: int | None = None, progress: bool = False,
              on_progress=None) -> pd.DataFrame:
    """:func:`explain.neighbours.image_frame` with the map coordinates ``x``, ``y``."""
    from .neighbours import image_frame

    df = image_frame(model_name, limit_per_class, progress, on_progress)
    if on_progress:
        on_progress(1.0, f"UMAP map of {len(df):,} images (computed once, then cached)")
    m = embedding_map(model_name, limit_per_class=limit_per_class, progress=progress)
    df.insert(len(m.rows.columns), "x", m.coords[:, 0])
    df.insert(len(m.rows.columns) + 1, "y", m.coords[:, 1])
    return df


def placed_frame(model_name: str, dataset: str, limit_per_class: int | None = 5,
                 map_limit: int | None = None) -> pd.DataFrame:
    """Images of another dataset (e.g. ZooLake) placed on the model's map with ``transform``:
    manifest columns, x, y, predictions per level, the kNN score and neighbour vote against the
    model's gallery (built with ``map_limit``, as the map)."""
    from .embeddings import predictions_frame, split_outputs
    from .neighbours import KNN_K, batch_vote, load_gallery

    model = open_model(model_name).classifier
    o = split_outputs(model_name, dataset, None, limit_per_class=limit_per_class)
    m = embedding_map(model_name, limit_per_class=map_limit)
    xy = place(m.reducer(), o.embeddings)
    g = load_gallery(model_name, map_limit)
    dist, ids = search(g.index, normalise(o.embeddings), KNN_K)
    df = o.rows.copy()
    df["heldout"] = False
    df["x"], df["y"] = xy[:, 0], xy[:, 1]
    df = pd.concat([df, predictions_frame(o.logits, model)], axis=1)
    df["knn_score"], df["nn_distance"], df["in_gallery"] = dist[:, KNN_K - 1], dist[:, 0], False
    for lvl in g.levels:
        df[f"vote_{lvl}"], df[f"vote_share_{lvl}"] = batch_vote(g, ids, lvl)
    return df


def gallery_map_rows(gallery_rows: pd.DataFrame, map_rows: pd.DataFrame) -> np.ndarray:
    """For each gallery image, its row number in the map table (matched on dataset and relpath),
    or -1 when it is not on the map."""
    pos = {(d, r): i for i, (d, r) in enumerate(zip(map_rows["dataset"], map_rows["relpath"]))}
    return np.array([pos.get((d, r), -1) for d, r in zip(gallery_rows["dataset"], gallery_rows["relpath"])],
                    dtype=np.int64)


def neighbour_position(coords: np.ndarray, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Approximate map positions (M, 2) of new images: the weighted mean of the map coordinates
    of their nearest known images.

    ``ids`` (M, k) are row numbers into ``coords`` (-1: no neighbour), ``dist`` (M, k) the
    distances. The weights are UMAP's fuzzy memberships, ``exp(-(d - d_nearest) / sigma)`` with
    sigma the mean excess distance, which is also how UMAP's ``transform`` initialises a new point
    before refining it (so this is its starting position, available without numba).
    """
    ids = np.atleast_2d(np.asarray(ids))
    dist = np.atleast_2d(np.asarray(dist, dtype=np.float64))
    coords = np.asarray(coords, dtype=np.float64)
    out = np.full((len(ids), 2), np.nan, dtype=np.float32)
    for i, (row, d) in enumerate(zip(ids, dist)):
        ok = (row >= 0) & np.isfinite(d)
        if not ok.any():
            continue
        row, d = row[ok], d[ok]
        excess = d - d.min()
        sigma = excess.mean()
        w = np.exp(-excess / sigma) if sigma > 0 else np.ones_like(d)
        out[i] = (w[:, None] * coords[row]).sum(0) / w.sum()
    return out


def quick_place(coords: np.ndarray, gallery, to_map: np.ndarray, embeddings: np.ndarray,
                k: int = UMAP_PARAMS["n_neighbors"]) -> np.ndarray:
    """Map positions (M, 2) of new images' embeddings from their ``k`` nearest known images in
    ``gallery`` (an :class:`explain.neighbours.Gallery`): see :func:`neighbour_position`.
    ``to_map`` is :func:`gallery_map_rows` of the gallery and the map. Milliseconds, no UMAP."""
    dist, ids = search(gallery.index, normalise(embeddings), k)
    rows = np.where(ids >= 0, to_map[np.clip(ids, 0, None)], -1)
    return neighbour_position(coords, rows, dist)
