"""Nearest known images: a FAISS index over cached embeddings, neighbour votes, the kNN OOD score.

The gallery of "known" images is the model's training split minus its held-out classes. Vectors
are L2-normalised (cosine geometry), so distances lie in [0, 2] and the distance to the k-th
neighbour is the kNN out-of-distribution score of Sun et al. 2022 (higher = more anomalous).

    python -m explain.neighbours query --model NAME --image PATH --k 10 --json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from models.handle import open_model

#: Up to this many vectors the index is exact (IndexFlat); beyond, IVF.
EXACT_MAX = 1_000_000
#: k of the kNN OOD score everywhere (pages, review queue, CLI), so scores are comparable.
KNN_K = 10


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 C-contiguous."""
    v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if v.ndim == 1:
        v = v[None]
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(n, 1e-12), dtype=np.float32)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors (≈ √n, a power of two: about 1,000 vectors a list,
    and k-means training that stays in seconds on a laptop CPU)."""
    return int(2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def tune_nprobe(index: faiss.IndexIVF, x: np.ndarray, target_recall: float = 0.95, k: int = 10,
                n_queries: int = 100, metric: int = faiss.METRIC_L2) -> float:
    """Set ``nprobe`` to twice the smallest power of two whose recall@k against exact search
    reaches ``target_recall`` on a sample of the indexed vectors (their self match left out).
    The doubling is a margin: indexed vectors sit closer to the k-means centroids than new
    queries do (on the 1M benchmark, held-out queries got 0.94 at the sample's 0.95 setting).
    Returns the recall reached on the sample."""
    rng = np.random.default_rng(1)
    q = np.ascontiguousarray(x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)])
    _, exact = faiss.knn(q, x, k + 1, metric=metric)
    exact = exact[:, 1:]
    recall = 0.0
    nprobe = 1
    while True:
        index.nprobe = nprobe
        _, got = index.search(q, k + 1)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got[:, 1:], exact)]))
        if recall >= target_recall or nprobe >= index.nlist:
            index.nprobe = min(nprobe * 2, index.nlist)
            return recall
        nprobe = min(nprobe * 2, index.nlist)


def build_index(vectors: np.ndarray, metric: str = "l2", kind: str = "auto", exact_max: int = EXACT_MAX,
                nlist: int | None = None, nprobe: int | None = None, gpu: bool | None = None,
                target_recall: float = 0.95) -> faiss.Index:
    """A FAISS index over ``vectors`` (N, D).

    ``kind="auto"`` is exact (IndexFlat) up to ``exact_max`` vectors and IVF-Flat beyond;
    "flat", "ivf" and "hnsw" force one. An IVF index gets the given ``nprobe``, else the smallest
    one reaching ``target_recall`` (recall@10 against exact search, see :func:`tune_nprobe`).
    ``metric`` is "l2" or "ip" (inner product). The index is moved to the GPU only when
    ``faiss.get_num_gpus() > 0`` (and ``gpu`` is not False).
    """
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty (N, D) array of vectors, got shape {x.shape}")
    n, d = x.shape
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', not {metric!r}")
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index.add(x)
    elif kind == "ivf":
        nl = min(nlist or ivf_nlist(n), max(1, n // 39))
        quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nl, fmetric)
        rng = np.random.default_rng(0)
        sample = x[np.sort(rng.choice(n, size=min(n, nl * 64), replace=False))]
        index.cp.niter = 12
        index.train(sample)
        index.add(x)
        if nprobe:
            index.nprobe = nprobe
        else:
            tune_nprobe(index, x, target_recall, metric=fmetric)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, fmetric)
        index.hnsw.efConstruction = 80
        index.add(x)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"kind must be auto, flat, ivf or hnsw, not {kind!r}")
    if kind != "hnsw" and gpu is not False and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int,
           vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest indexed vectors of each query: (distances, ids), each (Q, k).

    For an L2 index the distances are Euclidean (not squared); for an inner-product index they
    are the similarities. Missing neighbours (k > N) have id -1 and distance inf.

    ``vectors`` (the indexed vectors, row ``i`` = id ``i``): the found neighbours' distances are
    recomputed exactly, in float64 from the differences, and the neighbours re-sorted by them.
    FAISS computes ``|q|² + |v|² − 2 q·v`` in float32, which loses precision for near neighbours
    (the square root amplifies it: ±1e-5 at a distance of 0.04) and depends on how many queries
    are searched together, so the same image would score differently in batches of another size.
    """
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None]
    if k < 1:
        raise ValueError("k must be at least 1")
    dist, ids = index.search(q, int(k))
    if vectors is not None:
        return _exact(q, vectors, ids, index.metric_type == faiss.METRIC_L2)
    if index.metric_type == faiss.METRIC_L2:
        dist = np.sqrt(np.maximum(dist, 0.0))
    dist = np.where(ids < 0, np.inf, dist).astype(np.float32)
    return dist, ids


def _exact(q: np.ndarray, vectors: np.ndarray, ids: np.ndarray, l2: bool, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact (float64) distances or similarities of ``q`` to ``vectors[ids]``, neighbours re-sorted by them."""
    dist = np.empty(ids.shape, np.float64)
    for a in range(0, len(q), block):
        i = ids[a:a + block]
        v = np.asarray(vectors[np.maximum(i, 0)], np.float64)
        qq = q[a:a + block, None, :].astype(np.float64)
        dist[a:a + block] = np.sqrt(((v - qq) ** 2).sum(-1)) if l2 else (v * qq).sum(-1)
    dist[ids < 0] = np.inf if l2 else -np.inf
    order = np.argsort(dist if l2 else -dist, axis=1, kind="stable")
    dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
    if not l2:
        dist[ids < 0] = np.inf
    return dist.astype(np.float32), ids


def knn_score(index: faiss.Index, queries: np.ndarray, k: int = KNN_K, exclude_self: bool = False,
              vectors: np.ndarray | None = None) -> np.ndarray:
    """kNN OOD score (Sun et al. 2022): Euclidean distance from each L2-normalised query to its
    k-th nearest neighbour in ``index`` (which must hold L2-normalised vectors). Higher = more anomalous.

    ``exclude_self=True`` means query ``i`` is indexed vector ``i`` (scoring the gallery itself):
    its own match is left out. ``vectors``: the indexed vectors, for exact distances (:func:`search`).
    """
    q = normalise(queries)
    if not exclude_self:
        return search(index, q, k, vectors)[0][:, k - 1]
    dist, ids = search(index, q, k + 1, vectors)
    return drop_self(dist, ids, np.arange(len(q)), k)[0][:, k - 1]


# --- the gallery of known images ------------------------------------------------------------------
@dataclass
class Gallery:
    """Known images of a model: normalised embeddings, manifest rows and their FAISS index."""

    model_name: str
    dataset: str
    levels: tuple[str, ...]
    vectors: np.ndarray
    rows: pd.DataFrame
    index: faiss.Index

    def __len__(self) -> int:
        return len(self.rows)


def make_gallery(model_name: str, dataset: str, levels: tuple[str, ...], embeddings: np.ndarray,
                 rows: pd.DataFrame) -> Gallery:
    v = normalise(embeddings)
    return Gallery(model_name, dataset, tuple(levels), v, rows.reset_index(drop=True), build_index(v))


@lru_cache(maxsize=4)
def _gallery(model_name: str, sha: str, limit_per_class: int | None, progress: bool) -> Gallery:
    from .embeddings import split_outputs

    lm = open_model(model_name)
    model, man = lm.classifier, lm.manifest
    dataset = man.get("dataset", "ndsb")
    o = split_outputs(model_name, dataset, "train", progress=progress, limit_per_class=limit_per_class)
    keep = ~o.rows["class"].isin(man.get("heldout") or []).to_numpy()
    return make_gallery(model_name, dataset, tuple(model.levels), o.embeddings[keep], o.rows[keep])


def load_gallery(model_name: str, limit_per_class: int | None = None, progress: bool = False) -> Gallery:
    """The gallery of ``model_name``: its dataset's training split minus held-out classes
    (built once per process and model weights)."""

    return _gallery(model_name, open_model(model_name).manifest["sha256"], limit_per_class, progress)


def drop_self(dist: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From (Q, k+1) results keep k per row: without the row's ``own`` id where present, else
    without the farthest hit."""
    match = ids == own[:, None]
    drop = np.where(match.any(1), match.argmax(1), ids.shape[1] - 1)
    keep = np.ones_like(match)
    keep[np.arange(len(ids)), drop] = False
    return dist[keep].reshape(len(ids), -1)[:, :k], ids[keep].reshape(len(ids), -1)[:, :k]


def neighbour_table(gallery: Gallery, embedding: np.ndarray, k: int = 10, exclude_id: int | None = None) -> pd.DataFrame:
    """The ``k`` nearest known images of one embedding: rank, gallery id, manifest columns, distance."""
    extra = 1 if exclude_id is not None else 0
    dist, ids = search(gallery.index, normalise(embedding), k + extra, gallery.vectors)
    dist, ids = dist[0], ids[0]
    ok = (ids >= 0) & (ids != (exclude_id if exclude_id is not None else -2))
    dist, ids = dist[ok][:k], ids[ok][:k]
    cols = ["relpath", "dataset", *gallery.levels]
    t = gallery.rows.iloc[ids][cols].reset_index(drop=True)
    t.insert(0, "rank", np.arange(1, len(t) + 1))
    t.insert(1, "gallery_id", ids)
    t["distance"] = dist
    return t


def neighbour_vote(table: pd.DataFrame, levels: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """Majority label per level among neighbours (ties go to the label of the closer neighbour):
    ``{level: {"label", "votes", "share"}}``."""
    out = {}
    for lvl in levels:
        if table.empty:
            out[lvl] = {"label": None, "votes": 0, "share": 0.0}
            continue
        counts = table.groupby(lvl, sort=False).agg(votes=("distance", "size"), best=("distance", "min"))
        counts = counts.sort_values(["votes", "best"], ascending=[False, True])
        label, votes = counts.index[0], int(counts["votes"].iloc[0])
        out[lvl] = {"label": str(label), "votes": votes, "share": votes / len(table)}
    return out


def batch_vote(gallery: Gallery, ids: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
    """Majority label (as a string array) and its share at ``level`` for many queries' neighbour ids (Q, k)."""
    codes, names = pd.factorize(gallery.rows[level])
    c = np.where(ids >= 0, codes[np.clip(ids, 0, None)], -1)
    onehot = np.zeros((len(c), len(names) + 1), np.int32)
    np.add.at(onehot, (np.repeat(np.arange(len(c)), c.shape[1]), c.ravel()), 1)
    onehot = onehot[:, :-1]  # the -1 (missing) column
    best = onehot.argmax(1)
    share = onehot[np.arange(len(c)), best] / np.maximum((c >= 0).sum(1), 1)
    return np.asarray(names)[best], share


def embed_bytes(model, data: bytes, background: int | None = None) -> np.ndarray:
    """Embedding (D,) of one image file's bytes (raises ``data.decode.ImageDecodeError`` on bad input)."""
    from data.decode import MAX_ASPECT, keeps_colour, load_for_model

    from .embeddings import compute_embeddings

    arr, _, _ = load_for_model(data, int(model.preprocessing["size"]), mode="L", background=background,
                               max_aspect=MAX_ASPECT if background is None else None, colour=keeps_colour(model.preprocessing))
    return compute_embeddings(model, arr[None])[0]


def query(model_name: str, image_bytes: bytes, k: int = 10, background: int | None = None,
          limit_per_class: int | None = None, source: tuple[str, str] | None = None) -> dict:
    """Neighbours, per-level vote and kNN score of one image, as the CLI prints them.
    ``source`` = (dataset, relpath) of a dataset image: when it is in the gallery it is not its
    own neighbour."""

    model = open_model(model_name).classifier
    g = load_gallery(model_name, limit_per_class)
    emb = embed_bytes(model, image_bytes, background)
    own = -1
    if source is not None:
        hit = np.flatnonzero((g.rows["dataset"] == source[0]).to_numpy() & (g.rows["relpath"] == source[1]).to_numpy())
        own = int(hit[0]) if len(hit) else -1
    t = neighbour_table(g, emb, k, exclude_id=own if own >= 0 else None)
    vote = neighbour_vote(t, g.levels)
    dist, ids = search(g.index, normalise(emb), KNN_K + 1, g.vectors)
    score = drop_self(dist, ids, np.array([own]), KNN_K)[0][0, KNN_K - 1]
    out = {
        "neighbours": [{"path": r["relpath"], "dataset": r["dataset"], "label": r[g.levels[-1]],
                        "distance": round(float(r["distance"]), 5)} for r in t.to_dict("records")],
        "vote": {lvl: v["label"] for lvl, v in vote.items()},
        "vote_share": {lvl: round(v["share"], 3) for lvl, v in vote.items()},
        "knn_score": round(float(score), 5),
        "knn_k": KNN_K,
    }
    return {**out, **score_meaning(model_name, float(score), limit_per_class)}


def score_meaning(model_name: str, score: float, limit_per_class: int | None) -> dict:
    """What a kNN distance means: the threshold that keeps :data:`explain.score.KEEP` of the
    model's validation images (with the same gallery) and whether ``score`` lies above it."""
    from .score import KEEP, reference, reference_limit

    if limit_per_class != reference_limit():
        return {"knn_threshold": None, "knn_flagged": None,
                "knn_threshold_note": "no threshold for a gallery of another size than the model's reference"}
    thr = reference(open_model(model_name)).thresholds.get("knn_score")
    if thr is None:
        return {"knn_threshold": None, "knn_flagged": None, "knn_threshold_note": "the model has no validation images"}
    return {"knn_threshold": round(thr, 5), "knn_flagged": bool(score > thr),
            "knn_threshold_note": f"the threshold keeps {KEEP:.0%} of the model's validation images; "
                                  "above it the image is flagged as unlike the known images"}


def read_image_arg(arg: str) -> tuple[bytes, int | None, tuple[str, str] | None]:
    """Bytes of ``--image`` (a file path, or ``dataset:relpath`` inside a known dataset), the
    background to assume (None: estimated) and the (dataset, relpath) it names, if any."""
    p = Path(arg)
    if p.is_file():
        return p.read_bytes(), None, None
    if ":" in arg and not p.exists():
        from data.sources import open_source

        ds, rel = arg.split(":", 1)
        src = open_source(ds)
        return src.read_bytes(rel), src.background, (ds, rel)
    raise FileNotFoundError(f"{arg}: no such file")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explain.neighbours", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("query", help="nearest known images of one image")
    q.add_argument("--model", required=True, help="zoo model name")
    q.add_argument("--image", required=True, help="image file, or dataset:relpath (e.g. ndsb:train/x/1.jpg)")
    q.add_argument("--k", type=int, default=10, help="number of neighbours (default 10)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                   help="gallery of the first N training images per class only (default: the model's "
                        "reference, $PLANKTON_LENS_REFERENCE_LIMIT or all)")
    args = ap.parse_args(argv)
    from data.decode import ImageDecodeError
    from data.sources import DatasetNotFound
    from models.checkpoint import CheckpointError

    if args.k < 1:
        print("error: --k must be at least 1", file=sys.stderr)
        return 2
    from .score import reference_limit

    try:
        data, bg, source = read_image_arg(args.image)
        limit = args.limit_per_class if args.limit_per_class is not None else reference_limit()
        res = query(args.model, data, args.k, bg, limit, source)
    except ImageDecodeError as e:
        print(f"error: {args.image}: {e.message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DatasetNotFound, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"kNN score (k={KNN_K}): {res['knn_score']:.4f}" + (
        f" ({'flagged: above' if res['knn_flagged'] else 'below'} the threshold {res['knn_threshold']:.4f}, "
        f"which keeps 95 % of the model's validation images)" if res["knn_threshold"] is not None else ""))
    print("vote: " + ", ".join(f"{lvl} {lab} ({res['vote_share'][lvl]:.0%})" for lvl, lab in res["vote"].items()))
    for i, nb in enumerate(res["neighbours"], 1):
        print(f"{i:>3}. {nb['distance']:.4f}  {nb['label']:<32} {nb['dataset']}:{nb['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
