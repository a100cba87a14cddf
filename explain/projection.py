"""A 2-D UMAP map of a scored collection (:mod:`explain.score`), computed once and cached beside its table.

UMAP is fitted on a seeded random sample of at most :data:`MAP_FIT_MAX` of the table's readable
images; the rest are placed with the fitted reducer's ``transform`` in batches, so a collection of
a million images costs one 50k fit and a linear pass. The coordinates (row-aligned with the table,
NaN for unreadable images) and the fitted reducer (to place uploads) live in the table's folder,
keyed by the UMAP settings and :data:`MAP_VERSION`.

UMAP's neighbour graph comes from a FAISS search, and the same FAISS index answers
``transform``'s neighbour queries, so placing an upload takes well under a second once numba has
compiled ``transform`` (:func:`warm_up`); until then :func:`approximate_place` puts it at the
weighted mean of its nearest fitted images, where ``transform`` starts from.
"""
from __future__ import annotations

import json
import pickle
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from data.paths import writer_temp

from .neighbours import build_index, normalise, search

#: UMAP settings of the cached map (part of the cache key, with MAP_VERSION).
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1}
MAP_VERSION = 3
#: UMAP is fitted on at most this many images (a seeded random sample); the rest are placed with ``transform``.
MAP_FIT_MAX = 50_000
#: Fewer readable images than this get a message instead of a map.
MAP_MIN = 5
#: Images placed per ``transform`` call (one progress step).
TRANSFORM_BATCH = 10_000
#: Seed of the fitted sample (part of the cache key).
MAP_SEED = 0
ProgressFn = Callable[[float, str], None]


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


# --- the map of a scored table ----------------------------------------------------------------------
class MapTooSmall(ValueError):
    """A collection with too few readable images for a map (the message says how many)."""


@dataclass
class TableMap:
    """The map of one scored table: ``coords`` (N, 2) float32 row-aligned with the table (NaN for
    images not on the map), ``fitted`` the table rows UMAP was fitted on (the rest were placed)."""

    coords: np.ndarray
    fitted: np.ndarray
    reducer_path: Path
    key: str
    seconds: float  # time to build (0 when read from the cache)

    @property
    def placed(self) -> int:
        """Images placed with ``transform`` (on the map but not in the fitted sample)."""
        return int(np.isfinite(self.coords[:, 0]).sum()) - len(self.fitted)

    def reducer(self):
        """The fitted UMAP (loaded from disk; needed only to place new images)."""
        with open(self.reducer_path, "rb") as f:
            return pickle.load(f)


def map_key() -> str:
    """What a cached map depends on besides its table: UMAP settings, the sample size and seed, the version."""
    return (f"umap-n{UMAP_PARAMS['n_neighbors']}-d{UMAP_PARAMS['min_dist']}-f{MAP_FIT_MAX}-s{MAP_SEED}"
            f"-b{TRANSFORM_BATCH}-v{MAP_VERSION}")


def map_paths(folder: Path) -> tuple[Path, Path]:
    """(coordinates .npz, fitted reducer .pkl) of the current :func:`map_key` in a table's folder."""
    base = Path(folder) / f"map__{map_key()}"
    return base.with_name(base.name + ".coords.npz"), base.with_name(base.name + ".umap.pkl")


def mappable(scored) -> np.ndarray:
    """Table rows that go on the map: the readable images."""
    t = scored.table
    ok = t["readable"].to_numpy(bool) if "readable" in t else np.ones(len(t), bool)
    return np.flatnonzero(ok)


def fit_sample(rows: np.ndarray, limit: int | None = None, seed: int = MAP_SEED) -> np.ndarray:
    """The rows UMAP is fitted on: all of ``rows`` up to ``limit`` (default :data:`MAP_FIT_MAX`),
    else a seeded random sample of ``limit`` of them (sorted)."""
    limit = MAP_FIT_MAX if limit is None else limit
    rows = np.asarray(rows, np.int64)
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


def read_map(scored) -> TableMap | None:
    """The cached map of ``scored`` (an :class:`explain.score.ScoredTable`), or None when absent or damaged."""
    coords_path, reducer_path = map_paths(scored.folder)
    if not (coords_path.exists() and reducer_path.exists()):
        return None
    try:
        with np.load(coords_path) as z:
            coords, fitted = z["coords"], z["fitted"]
    except (OSError, ValueError, KeyError):
        return None
    if coords.shape != (len(scored.table), 2):
        return None
    return TableMap(coords, fitted, reducer_path, map_key(), 0.0)


def table_map(scored, on_progress: ProgressFn | None = None) -> TableMap:
    """The map of ``scored``: read from its folder, or built (UMAP fitted on :func:`fit_sample`,
    the other readable images placed in batches of :data:`TRANSFORM_BATCH`) and written there.
    ``on_progress(fraction, message)`` follows the build. :class:`MapTooSmall` below :data:`MAP_MIN`."""
    got = read_map(scored)
    if got is not None:
        return got
    rows = mappable(scored)
    if len(rows) < MAP_MIN:
        raise MapTooSmall(f"{len(rows)} readable image{'s' if len(rows) != 1 else ''}: a map needs at least "
                          f"{MAP_MIN}.")
    t0 = time.time()
    fitted = fit_sample(rows)
    if on_progress:
        on_progress(0.0, f"Fitting UMAP on {len(fitted):,} of {len(rows):,} images (once; then cached)…")
    emb = scored.embeddings
    reducer = fit_umap(np.asarray(emb[fitted], np.float32))
    coords = np.full((len(scored.table), 2), np.nan, np.float32)
    coords[fitted] = np.asarray(reducer.embedding_, np.float32)
    rest = np.setdiff1d(rows, fitted, assume_unique=True)
    for start in range(0, len(rest), TRANSFORM_BATCH):
        if on_progress:
            on_progress((len(fitted) + start) / len(rows),
                        f"Placing the other images with UMAP transform: {start:,} / {len(rest):,}")
        part = rest[start:start + TRANSFORM_BATCH]
        coords[part] = place(reducer, np.asarray(emb[part], np.float32))
    _write(scored.folder, reducer, coords, fitted, time.time() - t0)
    if on_progress:
        on_progress(1.0, f"Map of {len(rows):,} images ready")
    return TableMap(coords, fitted, map_paths(scored.folder)[1], map_key(), time.time() - t0)


def _write(folder: Path, reducer, coords: np.ndarray, fitted: np.ndarray, seconds: float) -> None:
    """Reducer first, then the coordinates (whose presence marks the pair complete); older maps go."""
    coords_path, reducer_path = map_paths(folder)
    tmp = writer_temp(reducer_path)
    with open(tmp, "wb") as f:
        pickle.dump(reducer, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(reducer_path)
    tmp = writer_temp(coords_path)
    with open(tmp, "wb") as f:
        np.savez(f, coords=coords, fitted=np.asarray(fitted, np.int64),
                 info=np.array(json.dumps({"key": map_key(), "seconds": round(seconds, 2)})))
    tmp.replace(coords_path)
    for p in Path(folder).glob("map__*"):
        if p not in (coords_path, reducer_path) and not p.name.startswith("."):
            p.unlink(missing_ok=True)


def sample_index(scored, m: TableMap) -> faiss.Index:
    """An exact FAISS index over the fitted images' normalised embeddings (ids: positions in ``m.fitted``)."""
    return build_index(normalise(np.asarray(scored.embeddings[m.fitted], np.float32)), kind="flat", gpu=False)


def approximate_place(m: TableMap, index: faiss.Index, embeddings: np.ndarray,
                      k: int = UMAP_PARAMS["n_neighbors"]) -> np.ndarray:
    """Map positions (M, 2) of new images from their ``k`` nearest fitted images (``index``:
    :func:`sample_index`), by :func:`neighbour_position`: milliseconds, no numba."""
    dist, ids = search(index, normalise(embeddings), k)
    rows = np.where(ids >= 0, m.fitted[np.clip(ids, 0, None)], -1)
    return neighbour_position(m.coords, rows, dist)
