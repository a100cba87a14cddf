"""Score a whole collection once: one Parquet table per (model, collection) that every page reads.

Per image: the argmax and top-k labels with probabilities at every level, every logit OOD score
at every level (``ood_<score>_<level>``), the level-consistency flag, the kNN distance to the
model's training gallery (``knn_score``) with the neighbour vote, and a flag per score
(``flag_<column>``) against the threshold that keeps :data:`KEEP` of the model's own validation
images. The embeddings (float16) are in their own memory-mappable ``embeddings.npy``, and
every level's posterior probabilities (float16, one row per image, one column per class) in
``proba_<level>.npy`` (the validation images' in ``validation_proba.npz``): classify-and-count
reads the table, the probabilistic quantifiers (:mod:`explain.community`) these matrices.

The table is written in chunks of :data:`CHUNK` images (``parts/``); a run killed at any moment
and started again scores only the missing chunks, and the assembled table has exactly one row
per image. The folder's name holds the model's sha256, the collection's manifest fingerprint and
the reference's key, so a changed model or collection gives a new table (the stale one goes).

Engines (:data:`ENGINES`): ``local`` (this process, decoding the next chunk while the model
runs on the current one) and ``ray`` (Ray Data, :mod:`explain.score_ray`), writing the same chunks.

    python -m explain.score run --model NAME --collection NAME [--split SPLIT] [--engine local|ray]
                                [--address RAY_ADDRESS] [--json]
    python -m explain.score status --model NAME --collection NAME
    python -m explain.score export --model NAME --collection NAME --out BUNDLE.zip [--images]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data.decode import keeps_colour
from data.manifest import decode_rows
from data.paths import cache_dir, writer_temp
from data.sources import Source
from models.handle import LensModel, open_model

from .embeddings import compute_outputs, dataset_rows, predictions_frame, split_outputs
from .neighbours import KNN_K, Gallery, batch_vote, drop_self, load_gallery, normalise, search
from .ood import logit_score, score_names

SCHEMA_VERSION = 3  # 3: pred_<level> is the shown taxonomy path (models.path), top1_<level> the argmax
#: Images per chunk: the unit of resumption and of progress.
CHUNK = int(os.environ.get("PLANKTON_LENS_SCORE_CHUNK", "2048"))
BATCH = 256
TOP_K = 3
#: Share of the model's validation images a threshold keeps (its TPR on known images).
KEEP = 0.95
ProgressFn = Callable[[int, int, float], None]  # (images done, total, images per second)


class ScoreError(RuntimeError):
    """A collection that cannot be scored with a model (the message says why)."""


# --- the reference a model's scores are read against ------------------------------------------
def reference_limit() -> int | None:
    """Images per class and split of the model's own dataset used as gallery and validation
    reference (``PLANKTON_LENS_REFERENCE_LIMIT``; default: all of them)."""
    v = os.environ.get("PLANKTON_LENS_REFERENCE_LIMIT", "").strip()
    return int(v) if v else None


@dataclass
class Reference:
    """What a model's scores mean: its gallery of known training images and, per score column,
    the threshold that keeps :data:`KEEP` of its validation images."""

    gallery: Gallery | None
    thresholds: dict[str, float]
    key: str
    validation: pd.DataFrame | None = None  # the validation images' rows and score columns
    validation_proba: dict[str, np.ndarray] | None = None  # their posteriors per level (float16)
    train_counts: dict[str, int] | None = None  # images per leaf class the model was trained on


def score_columns(levels: tuple[str, ...] | list[str], with_knn: bool = True) -> list[str]:
    """The OOD score columns of a table: every logit score at every level, then ``knn_score``."""
    cols = [f"ood_{s}_{lvl}" for s in score_names("logits") for lvl in levels]
    return cols + (["knn_score"] if with_knn else [])


def reference_key(lm: LensModel) -> str:
    """What the model's reference depends on besides its weights: its dataset's manifest, the
    reference limit and the scoring constants (cheap: no image is decoded)."""
    limit = reference_limit()
    mkey = dataset_rows(lm.dataset, lm.manifest, limit)[2] if lm.dataset else "none"
    parts = [lm.dataset, mkey, limit, KNN_K, KEEP, "higher", TOP_K, score_names("logits"), sorted(lm.manifest.get("heldout") or [])]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


@lru_cache(maxsize=8)
def _reference(name: str, sha: str, limit: int | None) -> Reference:
    lm = open_model(name)
    if not lm.dataset:
        return Reference(None, {}, reference_key(lm))
    gallery = load_gallery(name, limit)
    val = split_outputs(name, lm.dataset, "val", limit_per_class=limit)
    known = ~val.rows["class"].isin(lm.manifest.get("heldout") or []).to_numpy()
    val = val.take(known)
    frame = score_outputs(lm, val.embeddings, val.logits, gallery, np.full(len(val.rows), -1))
    thresholds = {c: float(np.nanquantile(frame[c].to_numpy(np.float64), KEEP, method="higher"))
                  for c in score_columns(lm.levels) if len(frame) and frame[c].notna().any()}
    cols = [c for c in ("relpath", "dataset", "class") if c in val.rows]
    validation = pd.concat([val.rows[cols].reset_index(drop=True), frame], axis=1)
    return Reference(gallery, thresholds, reference_key(lm), validation, posteriors(val.logits), train_counts(lm))


def train_counts(lm: LensModel) -> dict[str, int]:
    """Images per leaf class in the model's training split (its known classes, at most the
    training's ``limit_per_class``): the class prior its posteriors carry (EM's starting point)."""
    limit = (lm.manifest.get("train_args") or {}).get("limit_per_class")
    rows = dataset_rows(lm.dataset, lm.manifest, limit)[1]
    known = set(lm.classifier.class_names[lm.levels[-1]])
    counts = rows.loc[rows["split"] == "train", "class"].value_counts()
    return {str(k): int(v) for k, v in counts.items() if k in known}


def posteriors(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every level's softmax of (calibrated) logits, float16 (N, classes)."""
    out = {}
    for lvl, z in logits.items():
        z = z - z.max(1, keepdims=True) if len(z) else z
        p = np.exp(z)
        out[lvl] = (p / np.maximum(p.sum(1, keepdims=True), 1e-30)).astype(np.float16)
    return out


def reference(lm: LensModel) -> Reference:
    """The model's :class:`Reference` (built once per process and weights; its inputs are cached on disk)."""
    return _reference(lm.name, lm.sha256, reference_limit())


# --- scoring one batch of images ---------------------------------------------------------------
def score_outputs(lm: LensModel, embeddings: np.ndarray, logits: dict[str, np.ndarray], gallery: Gallery | None,
                  own: np.ndarray) -> pd.DataFrame:
    """The scored columns for model outputs: predictions and top-k per level, consistency, logit
    OOD scores, and (with a gallery) the kNN score and neighbour vote. ``own`` is each image's id
    in the gallery (-1 when it is not in it): an image is never its own neighbour."""
    model = lm.classifier
    df = predictions_frame(logits, model)
    n = len(df)
    for lvl in model.levels:
        z = logits[lvl] - logits[lvl].max(1, keepdims=True) if n else logits[lvl]
        p = np.exp(z)
        p /= np.maximum(p.sum(1, keepdims=True), 1e-30)
        order = np.argsort(-p, axis=1, kind="stable")[:, :TOP_K]
        names = np.asarray(model.class_names[lvl], dtype=object)
        for j in range(min(TOP_K, p.shape[1])):
            df[f"top{j + 1}_{lvl}"] = names[order[:, j]] if n else np.zeros(0, object)
            df[f"top{j + 1}_p_{lvl}"] = p[np.arange(n), order[:, j]].astype(np.float32)
    for s in score_names("logits"):
        for lvl in model.levels:
            df[f"ood_{s}_{lvl}"] = logit_score(logits[lvl], s).astype(np.float32) if n else np.zeros(0, np.float32)
    if gallery is not None and n:
        dist, ids = search(gallery.index, normalise(embeddings), KNN_K + 1, gallery.vectors)
        dist, ids = drop_self(dist, ids, own, KNN_K)
        df["knn_score"] = dist[:, KNN_K - 1].astype(np.float32)
        df["nn_distance"] = dist[:, 0].astype(np.float32)
        for lvl in gallery.levels:
            df[f"vote_{lvl}"], share = batch_vote(gallery, ids, lvl)
            df[f"vote_share_{lvl}"] = share.astype(np.float32)
    else:
        df["knn_score"] = np.full(n, np.nan, np.float32)
        df["nn_distance"] = np.full(n, np.nan, np.float32)
    return df


def gallery_ids(gallery: Gallery | None, rows: pd.DataFrame) -> np.ndarray:
    """Each row's id in ``gallery`` (matched by dataset and relpath), -1 where absent."""
    if gallery is None or not len(rows):
        return np.full(len(rows), -1, np.int64)
    pos = _gallery_positions(id(gallery), gallery)
    return np.array([pos.get((d, r), -1) for d, r in zip(rows["dataset"], rows["relpath"])], dtype=np.int64)


_POS: dict[int, dict] = {}


def _gallery_positions(key: int, gallery: Gallery) -> dict:
    if key not in _POS:
        _POS.clear()
        _POS[key] = {(d, r): i for i, (d, r) in enumerate(zip(gallery.rows["dataset"], gallery.rows["relpath"]))}
    return _POS[key]


def score_batch(lm: LensModel, ref: Reference, images: np.ndarray, readable: np.ndarray,
                dataset: np.ndarray, relpath: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Score decoded images (N, S, S[, 3]) with their ``readable`` mask and their ``dataset`` /
    ``relpath`` (to find them in the gallery) → (scored columns, float16 embeddings (N, D),
    float16 posteriors per level (N, classes)), as both engines do. Unreadable images keep their
    row (``readable`` False) with empty predictions, NaN scores and NaN posteriors;
    ``flag_<column>`` marks scores above the model's threshold."""
    emb, logits = compute_outputs(lm.classifier, images, batch_size=BATCH)
    ids = gallery_ids(ref.gallery, pd.DataFrame({"dataset": dataset, "relpath": relpath}))
    out = score_outputs(lm, emb, logits, ref.gallery, ids)
    proba = posteriors(logits)
    bad = ~np.asarray(readable, bool)
    for p in proba.values():
        p[bad] = np.nan
    if bad.any():
        for c in out.columns:
            if out[c].dtype == object:
                out.loc[bad, c] = None
            elif out[c].dtype == bool:
                out.loc[bad, c] = False
            else:
                out.loc[bad, c] = np.nan
    for c, t in ref.thresholds.items():
        if c in out:
            out[f"flag_{c}"] = (out[c] > t).to_numpy()
    out.insert(0, "readable", np.asarray(readable, bool))
    return out, emb.astype(np.float16), proba


def chunk_table(rows: pd.DataFrame, scored: pd.DataFrame) -> pd.DataFrame:
    """A chunk of the table: the collection's rows (manifest and metadata) beside their scores."""
    return pd.concat([rows.reset_index(drop=True), scored.reset_index(drop=True)], axis=1)


# --- where a table lives ----------------------------------------------------------------------
@dataclass
class Job:
    """One (model, collection, split) to score: its rows, source and table folder."""

    lm: LensModel
    collection: str
    split: str | None
    src: Source
    rows: pd.DataFrame
    folder: Path

    @property
    def ref(self) -> Reference:
        """The model's reference (computed on first use: it embeds the model's own dataset once)."""
        return reference(self.lm)

    @property
    def chunks(self) -> int:
        return (len(self.rows) + CHUNK - 1) // CHUNK

    def chunk_rows(self, i: int) -> pd.DataFrame:
        return self.rows.iloc[i * CHUNK:(i + 1) * CHUNK]

    @property
    def size(self) -> int:
        return int(self.lm.preprocessing["size"])

    @property
    def colour(self) -> bool:
        return keeps_colour(self.lm.preprocessing, self.src.mode)


def _collection_rows(collection: str, lm: LensModel, split: str | None) -> tuple[Source, pd.DataFrame, str]:
    src, rows, mkey = dataset_rows(collection, lm.manifest)
    rows = rows.reset_index(drop=True)
    rows.insert(0, "row", np.arange(len(rows), dtype=np.int64))
    meta = _metadata(src)
    if meta is not None:
        extra = [c for c in meta.columns if c != "relpath" and c not in rows.columns]
        rows = rows.merge(meta[["relpath", *extra]].drop_duplicates("relpath"), on="relpath", how="left")
    if split:
        if split not in set(rows["split"]):
            raise ScoreError(f"collection {collection!r} has no {split!r} split (it has: {sorted(set(rows['split']))})")
        rows = rows[rows["split"] == split].reset_index(drop=True)
    return src, rows, mkey


def _metadata(src: Source) -> pd.DataFrame | None:
    """The collection's per-image metadata (EcoTaxa ids, positions, times, …), where it has any."""
    fn = getattr(src, "metadata", None)
    if fn is None:
        return None
    m = fn()
    keep = [c for c in m.columns if not c.startswith("object_") or c == "object_id"]
    return m[keep]


def job(model: str, collection: str, split: str | None = None) -> Job:
    """The scoring job of ``collection`` (or one ``split`` of it) by zoo model ``model``."""
    lm = open_model(model)
    lm.classifier  # noqa: B018 - raises a clear CheckpointError now rather than in a worker
    src, rows, mkey = _collection_rows(collection, lm, split)
    name = f"{collection}__{split or 'all'}__{lm.sha256[:16]}__{mkey}__{reference_key(lm)}__v{SCHEMA_VERSION}"
    return Job(lm, collection, split, src, rows, cache_dir() / "scored" / lm.name / name)


def _stale(folder: Path) -> None:
    """Remove tables of the same model, collection and split built from other weights or data."""
    collection, split = folder.name.split("__")[:2]
    for p in folder.parent.glob(f"{collection}__{split}__*"):
        if p != folder and p.is_dir() and not _running(p):
            shutil.rmtree(p, ignore_errors=True)


# --- chunks, progress and assembly -------------------------------------------------------------
def _part(folder: Path, i: int) -> tuple[Path, Path, Path]:
    base = folder / "parts" / f"part-{i:06d}"
    return base.with_suffix(".parquet"), base.with_suffix(".emb.npy"), base.with_suffix(".proba.npz")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = writer_temp(path)
    write(tmp)
    tmp.replace(path)


def write_chunk(j: Job, i: int, frame: pd.DataFrame, emb: np.ndarray, proba: dict[str, np.ndarray]) -> None:
    """Store chunk ``i`` (embeddings and posteriors first, then the table part that marks it done)."""
    tab, e, pr = _part(j.folder, i)
    _write_atomic(e, lambda t: np.save(open(t, "wb"), emb))
    _write_atomic(pr, lambda t: np.savez(open(t, "wb"), **{lvl: proba[lvl].astype(np.float16) for lvl in j.lm.levels}))
    _write_atomic(tab, lambda t: frame.to_parquet(t, index=False))


def chunk_done(j: Job, i: int) -> bool:
    """Whether chunk ``i`` is on disk whole (a part cut short by a kill is redone)."""
    tab, e, pr = _part(j.folder, i)
    if not (tab.exists() and e.exists() and pr.exists()):
        return False
    n = len(j.chunk_rows(i))
    try:
        import pyarrow.parquet as pq

        with np.load(pr) as z:
            whole = all(z[lvl].shape[0] == n for lvl in j.lm.levels)
        return whole and pq.ParquetFile(tab).metadata.num_rows == n and np.load(e, mmap_mode="r").shape[0] == n
    except Exception:  # noqa: BLE001 - any unreadable part is simply scored again
        return False


def missing_chunks(j: Job) -> list[int]:
    return [i for i in range(j.chunks) if not chunk_done(j, i)]


def _progress_path(folder: Path) -> Path:
    return folder / "progress.json"


def _write_progress(j: Job, done: int, rate: float, engine: str, state: str = "running", stage: str = "scoring",
                    pid: int | None = None) -> None:
    info = {"done": done, "total": len(j.rows), "images_per_s": round(rate, 1), "engine": engine,
            "pid": pid or os.getpid(), "state": state, "stage": stage, "updated": time.time()}
    _write_atomic(_progress_path(j.folder), lambda t: t.write_text(json.dumps(info)))


_CHILDREN: list = []  # background runs started by this process (polled so they never linger as zombies)


def _running(folder: Path) -> bool:
    for p in list(_CHILDREN):
        if p.poll() is not None:
            _CHILDREN.remove(p)
    try:
        info = json.loads(_progress_path(folder).read_text())
    except (OSError, ValueError):
        return False
    if info.get("state") != "running":
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return False
    return time.time() - float(info.get("updated", 0)) < 600


def _assemble(j: Job, engine: str, seconds: float, rate: float) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [_part(j.folder, i) for i in range(j.chunks)]
    table_path = j.folder / "table.parquet"
    levels = list(j.lm.levels)
    if parts:
        tables = [pq.read_table(t) for t, _, _ in parts]
        table = pa.concat_tables(tables, promote_options="permissive")
        emb = np.concatenate([np.load(e) for _, e, _ in parts]) if parts else np.zeros((0, 0), np.float16)
        proba = {lvl: [] for lvl in levels}
        for _, _, pr in parts:
            with np.load(pr) as z:
                for lvl in levels:
                    proba[lvl].append(z[lvl])
        proba = {lvl: np.concatenate(v) for lvl, v in proba.items()}
    else:
        table = pa.Table.from_pandas(j.rows, preserve_index=False)
        emb = np.zeros((0, 0), np.float16)
        proba = {lvl: np.zeros((0, j.lm.classifier.num_classes(lvl)), np.float16) for lvl in levels}
    _write_atomic(j.folder / "embeddings.npy", lambda t: np.save(open(t, "wb"), emb.astype(np.float16)))
    for lvl in levels:
        _write_atomic(j.folder / f"proba_{lvl}.npy", lambda t, lvl=lvl: np.save(open(t, "wb"), proba[lvl].astype(np.float16)))
    if j.ref.validation_proba is not None:
        _write_atomic(j.folder / "validation_proba.npz", lambda t: np.savez(open(t, "wb"), **j.ref.validation_proba))
    _write_atomic(table_path, lambda t: pq.write_table(table, t))
    if j.ref.validation is not None:
        _write_atomic(j.folder / "validation.parquet", lambda t: j.ref.validation.to_parquet(t, index=False))
    meta = {"model": j.lm.name, "model_sha256": j.lm.sha256, "model_key": j.lm.key, "collection": j.collection,
            "split": j.split, "rows": len(j.rows), "levels": list(j.lm.levels), "thresholds": j.ref.thresholds,
            "keep": KEEP, "knn_k": KNN_K, "top_k": TOP_K, "engine": engine, "seconds": round(seconds, 2),
            "images_per_s": round(rate, 1), "schema": SCHEMA_VERSION, "created": time.time(),
            "train_counts": j.ref.train_counts, "train_sampler": (j.lm.manifest.get("train_args") or {}).get("sampler", "uniform"),
            "score_columns": [c for c in score_columns(j.lm.levels) if c in table.column_names]}
    _write_atomic(j.folder / "meta.json", lambda t: t.write_text(json.dumps(meta, indent=1)))
    _write_progress(j, len(j.rows), rate, engine, state="done")
    shutil.rmtree(j.folder / "parts", ignore_errors=True)
    return table_path


def is_complete(j: Job) -> bool:
    try:
        meta = json.loads((j.folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("rows") == len(j.rows) and (j.folder / "table.parquet").exists() \
        and (j.folder / "embeddings.npy").exists() and all((j.folder / f"proba_{lvl}.npy").exists() for lvl in j.lm.levels)


# --- engines ------------------------------------------------------------------------------------
def _decode(j: Job, i: int) -> tuple[np.ndarray, np.ndarray]:
    return decode_rows(j.src, j.chunk_rows(i)["relpath"].tolist(), j.size, j.colour)


def run_local(j: Job, todo: list[int], on_chunk: Callable[[int, pd.DataFrame, np.ndarray, dict], None], **_) -> None:
    """Score ``todo`` chunks in this process: the next chunk is decoded in a thread while the
    model runs on the current one (PyTorch uses every core for the forward pass)."""
    if not todo:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        nxt = pool.submit(_decode, j, todo[0])
        for k, i in enumerate(todo):
            images, ok = nxt.result()
            if k + 1 < len(todo):
                nxt = pool.submit(_decode, j, todo[k + 1])
            rows = j.chunk_rows(i)
            scored, emb, proba = score_batch(j.lm, j.ref, images, ok, rows["dataset"].to_numpy(), rows["relpath"].to_numpy())
            frame = chunk_table(rows, scored)
            on_chunk(i, frame, emb, proba)


def _run_ray(j: Job, todo: list[int], on_chunk, address: str | None = None, **_) -> None:
    from .score_ray import run_ray

    run_ray(j, todo, on_chunk, address=address)


ENGINES: dict[str, Callable] = {"local": run_local, "ray": _run_ray}


@contextmanager
def _heartbeat(j: Job, done: int, engine: str, every_s: float = 30.0):
    """Keep the progress file fresh during a long step without chunks (the reference), so that
    :func:`status` does not take the run for a dead one."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            _write_progress(j, done, 0.0, engine, stage="reference")

    t = threading.Thread(target=beat, daemon=True, name="score-heartbeat")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def run(model: str, collection: str, split: str | None = None, engine: str = "local", address: str | None = None,
        progress: bool = False, on_progress: ProgressFn | None = None) -> dict:
    """Score ``collection`` with ``model`` (resuming a run that was cut short) and return
    ``{"table", "rows", "images_per_s", "engine", "seconds", "scored"}`` (``scored``: images
    scored by this call; 0 when the table was already complete)."""
    if engine not in ENGINES:
        raise ScoreError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
    j = job(model, collection, split)
    if is_complete(j):
        meta = json.loads((j.folder / "meta.json").read_text())
        return {"table": str(j.folder / "table.parquet"), "rows": meta["rows"], "images_per_s": meta["images_per_s"],
                "engine": meta["engine"], "seconds": 0.0, "scored": 0}
    j.folder.mkdir(parents=True, exist_ok=True)
    _stale(j.folder)
    todo = missing_chunks(j)
    n_todo = sum(len(j.chunk_rows(i)) for i in todo)
    done = len(j.rows) - n_todo
    bar = tqdm(total=len(j.rows), initial=done, unit="img", desc=f"scoring {collection} with {model}",
               disable=not progress, smoothing=0.1)
    state = {"done": done, "new": 0}
    _write_progress(j, done, 0.0, engine, stage="reference")
    with _heartbeat(j, done, engine):
        j.ref  # noqa: B018 - the model's reference first (embeds its own dataset once, then cached)
    _write_progress(j, done, 0.0, engine)
    t0 = time.time()

    def on_chunk(i: int, frame: pd.DataFrame, emb: np.ndarray, proba: dict[str, np.ndarray]) -> None:
        write_chunk(j, i, frame, emb, proba)
        state["done"] += len(frame)
        state["new"] += len(frame)
        rate = state["new"] / max(time.time() - t0, 1e-9)
        bar.update(len(frame))
        bar.set_postfix_str(f"{rate:.0f} img/s")
        _write_progress(j, state["done"], rate, engine)
        if on_progress:
            on_progress(state["done"], len(j.rows), rate)

    ENGINES[engine](j, todo, on_chunk, address=address)
    bar.close()
    seconds = time.time() - t0
    rate = state["new"] / max(seconds, 1e-9)
    path = _assemble(j, engine, seconds, rate)
    return {"table": str(path), "rows": len(j.rows), "images_per_s": round(rate, 1), "engine": engine,
            "seconds": round(seconds, 2), "scored": state["new"]}


# --- reading a table ----------------------------------------------------------------------------
@dataclass
class ScoredTable:
    """A complete scored table: its rows, memory-mapped float16 embeddings and meta data."""

    table: pd.DataFrame
    embeddings: np.ndarray
    meta: dict
    folder: Path
    validation: pd.DataFrame | None = None  # the model's validation images' scores (thresholds come from them)

    @property
    def levels(self) -> list[str]:
        return list(self.meta["levels"])

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.meta.get("thresholds") or {})

    def proba(self, level: str) -> np.ndarray:
        """The posteriors at ``level`` (N, classes), float16, memory-mapped; NaN rows: unreadable images."""
        return np.load(self.folder / f"proba_{level}.npy", mmap_mode="r")

    def validation_proba(self, level: str) -> np.ndarray | None:
        """The validation images' posteriors at ``level`` (rows of :attr:`validation`), or None."""
        f = self.folder / "validation_proba.npz"
        if not f.exists():
            return None
        with np.load(f) as z:
            return z[level] if level in z.files else None


def scored_table(model: str, collection: str, split: str | None = None) -> ScoredTable | None:
    """The complete table of ``collection`` scored by ``model``, or None when it is not built (yet)."""
    j = job(model, collection, split)
    return read(j.folder) if is_complete(j) else None


@lru_cache(maxsize=8)
def _read_cached(folder: str, stamp: float) -> ScoredTable:
    f = Path(folder)
    meta = json.loads((f / "meta.json").read_text())
    val = pd.read_parquet(f / "validation.parquet") if (f / "validation.parquet").exists() else None
    return ScoredTable(pd.read_parquet(f / "table.parquet"), np.load(f / "embeddings.npy", mmap_mode="r"), meta, f, val)


def read(folder: str | Path) -> ScoredTable:
    """The complete table in ``folder`` (as :func:`status` names it)."""
    folder = Path(folder)
    return _read_cached(str(folder), (folder / "meta.json").stat().st_mtime_ns)


def status(model: str, collection: str, split: str | None = None) -> dict:
    """Where the table stands: ``{"state": "done"|"running"|"failed"|"partial"|"absent", "stage",
    "done", "total", "images_per_s", "folder", "log"}`` (``failed``: the last run stopped without
    finishing; ``log`` holds the end of its output)."""
    j = job(model, collection, split)
    if is_complete(j):
        return {"state": "done", "stage": "done", "done": len(j.rows), "total": len(j.rows), "folder": str(j.folder)}
    try:
        info = json.loads(_progress_path(j.folder).read_text())
    except (OSError, ValueError):
        info = {}
    done = len(j.rows) - sum(len(j.chunk_rows(i)) for i in missing_chunks(j)) if j.folder.exists() else 0
    if _running(j.folder):
        state = "running"
    elif info.get("state") == "running":
        state = "failed"
    else:
        state = "partial" if done else "absent"
    log = ""
    if state == "failed" and (j.folder / "job.log").exists():
        log = (j.folder / "job.log").read_text(errors="replace")[-2000:]
    return {"state": state, "stage": info.get("stage", ""), "done": done, "total": len(j.rows),
            "images_per_s": info.get("images_per_s"), "folder": str(j.folder), "log": log}


def _lower_priority() -> None:
    """In a background run: yield the CPU to the dashboard's interactive work."""
    try:
        os.nice(10)
    except OSError:
        pass


def start(model: str, collection: str, split: str | None = None, engine: str = "local") -> dict:
    """Score in a background process (``python -m explain.score run``) unless the table is done
    or a run is already going; returns :func:`status`. The process outlives the caller (a page
    reload, a closed browser), runs at a lower CPU priority than the dashboard, writes its progress
    beside the table and its output to ``job.log``."""
    import subprocess

    now = status(model, collection, split)
    if now["state"] in ("done", "running"):
        return now
    j = job(model, collection, split)
    j.folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "explain.score", "run", "--model", model, "--collection", collection,
           "--engine", engine, "--json", *(["--split", split] if split else [])]
    with open(j.folder / "job.log", "wb") as log:
        p = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_lower_priority)
    _CHILDREN.append(p)
    _write_progress(j, now["done"], 0.0, engine, stage="starting", pid=p.pid)
    return status(model, collection, split)


# --- command line -------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo model name (python -m models list)")
    p.add_argument("--collection", required=True, help="dataset or collection name (python -m data info)")
    p.add_argument("--split", default=None, help="only this split (train / val / test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explain.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="score a collection (resumes a run that was cut short)")
    _common(r)
    r.add_argument("--engine", default="local", choices=sorted(ENGINES))
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    s = sub.add_parser("status", help="how far the table of a collection is")
    _common(s)
    e = sub.add_parser("export", help="write the scored (and reviewed) collection as an EcoTaxa import bundle")
    _common(e)
    e.add_argument("--out", required=True, help="the bundle's path (.zip)")
    e.add_argument("--images", action="store_true", help="put the images in the bundle")
    args = ap.parse_args(argv)
    from data.sources import DatasetNotFound
    from models.checkpoint import CheckpointError

    try:
        if args.cmd == "run":
            out = run(args.model, args.collection, args.split, args.engine, args.address, progress=not args.json)
            info = {k: out[k] for k in ("table", "rows", "images_per_s", "engine")}
            if args.json:
                print(json.dumps(info))
            else:
                t = scored_table(args.model, args.collection, args.split)
                print(summary(t) if t is not None else json.dumps(info))
        elif args.cmd == "status":
            st = status(args.model, args.collection, args.split)
            print(json.dumps(st) if args.json else "\n".join(f"{k}: {v}" for k, v in st.items()))
        else:
            info = export(args.model, args.collection, Path(args.out), split=args.split, images=args.images)
            info = {k: str(info[k]) if k == "path" else info[k] for k in ("path", "rows", "images", "skipped") if k in info}
            info["skipped"] = len(info.get("skipped") or [])
            print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    except (CheckpointError, DatasetNotFound, ScoreError, OSError, ValueError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


def export(model: str, collection: str, out: Path, split: str | None = None, images: bool = False) -> dict:
    """Write the scored (and reviewed) ``collection`` as an EcoTaxa import bundle at ``out``
    (:func:`explain.ecotaxa_bundle.export_bundle`): predictions and scores per level, the Review
    page's decisions, an EcoTaxa collection's own columns, and the images when ``images``."""
    from .ecotaxa_bundle import export_bundle, read_original
    from .review_store import ReviewStore

    t = scored_table(model, collection, split)
    if t is None:
        raise ScoreError(f"{collection!r} has not been scored with {model!r} yet: "
                         f"python -m explain.score run --model {model} --collection {collection}")
    src = job(model, collection, split).src
    decisions = ReviewStore().current()
    decisions = decisions[decisions["dataset"] == collection] if len(decisions) else decisions
    original = read_original(src) if str(getattr(src, "kind", "")).startswith("ecotaxa") else None
    return export_bundle(t.table, t.meta, Path(out), decisions=decisions, read_image=src.read_bytes if images else None,
                         original=original)


def summary(t: ScoredTable) -> str:
    """A few lines on a scored table: rows, seconds, speed, the leaf's most frequent predictions, flags."""
    df, m = t.table, t.meta
    leaf = t.levels[-1]
    lines = [f"table: {t.folder / 'table.parquet'}", f"rows: {m['rows']:,} ({int((~df['readable']).sum())} unreadable)",
             f"engine: {m['engine']}, {m['seconds']} s, {m['images_per_s']} images/s"]
    top = df[f"pred_{leaf}"].value_counts().head(5)
    lines.append("most predicted: " + ", ".join(f"{k} {v:,}" for k, v in top.items()))
    for c in ("knn_score", f"ood_entropy_{leaf}"):
        if f"flag_{c}" in df:
            lines.append(f"flagged by {c} (threshold {t.thresholds[c]:.4g}, keeps {m['keep']:.0%} of validation images): "
                         f"{int(df[f'flag_{c}'].sum()):,}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
