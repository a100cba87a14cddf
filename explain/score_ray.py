"""The Ray engine of :mod:`explain.score`: Ray Data decodes and scores, the driver writes the chunks.

Images are decoded by Ray tasks and scored in an actor pool (one model replica per actor, one
GPU per actor when the cluster has GPUs); batches come back in order and the driver writes them
as the same chunks the local engine writes, so a run resumes on either engine. ``ray.init()``
starts a local Ray when no address is given. Workers read the same zoo, collections and caches
as the driver (its ``PLANKTON_*`` variables and the repository on ``PYTHONPATH``).
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("PLANKTON_", "HF_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (quietly)."""
    import ray

    if ray.is_initialized():
        return
    kw = {"runtime_env": {"env_vars": _env()}, "include_dashboard": False, "log_to_driver": False,
          "configure_logging": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, **kw)


@lru_cache(maxsize=4)
def _source(collection: str):
    from data.sources import open_source

    return open_source(collection)


def _decode_batch(batch: dict, collection: str, size: int, colour: bool) -> dict:
    from data.manifest import decode_rows

    images, ok = decode_rows(_source(collection), list(batch["relpath"]), size, colour)
    return {"_pos": batch["_pos"], "dataset": batch["dataset"], "relpath": batch["relpath"], "image": images, "ok": ok}


class _Scorer:
    """One model replica (an actor of the pool)."""

    def __init__(self, model: str, threads: int):
        import torch

        from explain.score import reference
        from models.handle import open_model

        torch.set_num_threads(max(1, threads))
        self.lm = open_model(model)
        if torch.cuda.is_available():
            self.lm.classifier.to("cuda")
        self.ref = reference(self.lm)

    def __call__(self, batch: dict) -> dict:
        from explain.score import score_batch

        scored, emb, proba = score_batch(self.lm, self.ref, batch["image"], batch["ok"], batch["dataset"], batch["relpath"])
        scored.insert(0, "_pos", np.asarray(batch["_pos"]))
        out = {c: scored[c].to_numpy() for c in scored.columns}
        out["_emb"] = emb
        out.update({f"_proba_{lvl}": p for lvl, p in proba.items()})
        return out


def run_ray(j, todo: list[int], on_chunk, address: str | None = None) -> None:
    """Score the ``todo`` chunks of job ``j`` on Ray Data, calling ``on_chunk(i, frame, emb, proba)`` per chunk."""
    if not todo:
        return
    import ray
    import ray.data
    from explain.score import BATCH, CHUNK, chunk_table

    init(address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    pos = np.concatenate([np.arange(i * CHUNK, i * CHUNK + len(j.chunk_rows(i))) for i in todo])
    items = pd.DataFrame({"_pos": pos, "dataset": j.rows["dataset"].to_numpy()[pos].astype(str),
                          "relpath": j.rows["relpath"].to_numpy()[pos].astype(str)})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, gpus) if gpus else max(1, cpus // 2)
    threads = max(1, cpus // actors - 1) if not gpus else 2
    ds = ray.data.from_pandas([items.iloc[k:k + 4 * BATCH] for k in range(0, len(items), 4 * BATCH)])
    ds = ds.map_batches(_decode_batch, batch_size=BATCH, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"collection": j.collection, "size": j.size, "colour": j.colour})
    ds = ds.map_batches(_Scorer, batch_size=BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                        fn_constructor_kwargs={"model": j.lm.name, "threads": threads})
    want = {i: len(j.chunk_rows(i)) for i in todo}
    got: dict[int, list[tuple[pd.DataFrame, np.ndarray, dict]]] = {i: [] for i in todo}
    have = dict.fromkeys(todo, 0)
    levels = list(j.lm.levels)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        emb_all = np.asarray(batch.pop("_emb"))
        proba_all = {lvl: np.asarray(batch.pop(f"_proba_{lvl}")) for lvl in levels}
        frame_all = pd.DataFrame(batch)
        for i in np.unique(frame_all["_pos"].to_numpy() // CHUNK):
            m = (frame_all["_pos"].to_numpy() // CHUNK) == i
            i = int(i)
            got[i].append((frame_all[m], emb_all[m], {lvl: p[m] for lvl, p in proba_all.items()}))
            have[i] += int(m.sum())
            if have[i] == want[i]:
                parts = got.pop(i)
                frame = pd.concat([f for f, _, _ in parts])
                emb = np.concatenate([e for _, e, _ in parts])
                proba = {lvl: np.concatenate([pr[lvl] for _, _, pr in parts]) for lvl in levels}
                order = np.argsort(frame["_pos"].to_numpy(), kind="stable")
                frame = frame.iloc[order].drop(columns=["_pos"]).reset_index(drop=True)
                on_chunk(i, chunk_table(j.chunk_rows(i), frame), emb[order].astype(np.float16),
                         {lvl: p[order].astype(np.float16) for lvl, p in proba.items()})
    missing = list(got)
    if missing:
        raise RuntimeError(f"Ray returned incomplete chunks {missing[:5]}")
