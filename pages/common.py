"""Shared UI helpers for every page: cached loaders, the model picker, error display.

Everything shown comes from plain functions in data/, models/ and explain/; this module only
caches them (``st.cache_resource`` / ``st.cache_data``) and lays things out.

Text from a user or a link (deep-link values, file names and paths, prompts, model, collection
and class names, reviewer comments, messages that embed them) goes through :func:`md_text`
wherever Streamlit renders Markdown (st.error / warning / info / success, captions, markdown,
headers, image captions, metric labels, spinners, help tooltips).
"""
from __future__ import annotations

import functools
import hashlib
import re
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from data.decode import ImageDecodeError, decode_image, fit_square
from data.folders import UNLABELLED
from data.manifest import build_manifest
from data.sources import DatasetNotFound, Source, available_sources, open_source
from models.checkpoint import CheckpointError
from models.handle import LensModel, open_model
from models.zoo import CLASSIFIER_KINDS, default_model_name, list_models, model_names
from pages import state

MODEL_KEY = state.MODEL

#: Every ASCII punctuation character: CommonMark lets a backslash escape each of them, and
#: Markdown, GFM, math or Streamlit's ``:directives:`` and ``:material/icons:`` give most a meaning.
_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")
#: Where GFM would turn bare text into a link (``https://``, ``www.``, ``name@host``).
_AUTOLINK = re.compile(r"(?<=:)(?=//)|(?i:(?<=www)(?=\.))|(?<=@)")
WORD_JOINER = "\u2060"  # invisible, zero-width


def md_text(value: object, code: bool = False) -> str:
    """``value`` as Markdown that Streamlit shows as exactly that text: never a link, image,
    emphasis, heading, list, HTML, math, colour or icon. For text from a user or a link inside
    any Markdown-rendering call (st.error, st.caption, st.markdown, headers, image captions...).

    Each ASCII punctuation character is backslash-escaped and line breaks are kept. GFM also makes links
    of bare URLs and e-mail addresses after escaping, so an invisible word joiner (U+2060) goes
    after the ``:`` of ``://``, after ``www`` before ``.`` and after ``@``. ``code=True`` gives
    an inline code span instead, whose content Markdown shows as is (a fence longer than any
    run of backticks in ``value``; line breaks become spaces), for paths and links."""
    text = str(value)
    if code:
        if not text:
            return ""
        # a blank line would end the span; Streamlit reads ":material/" even in code
        text = re.sub(r"\s", " ", text).replace(":material/", ":" + WORD_JOINER + "material/")
        fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    text = _MD_SPECIAL.sub(r"\\\1", _AUTOLINK.sub(WORD_JOINER, text))
    return re.sub(r"\r\n?|\n", "  \n", text)


def _use_app_navigation() -> None:
    """Run app.py's navigation even when a server's very first request is a page URL.

    Until app.py has called ``st.navigation`` once, Streamlit treats the ``pages/`` folder as an
    old-style multipage app and runs the page script alone (no sidebar, no model picker, and
    ``common.py`` listed as a page). Every page imports this module, so the first such run turns
    the fallback off and reruns, and app.py then opens the requested page itself.
    """
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if PagesManager.uses_pages_directory and get_script_run_ctx() is not None:
        PagesManager.uses_pages_directory = False
        st.rerun()


_use_app_navigation()


def _zoo_stamp() -> tuple:
    """Changes when a model is added to, removed from or rewritten in a zoo folder (each write
    replaces a file, which changes its folder's mtime)."""
    from models.zoo import zoo_dirs

    out = []
    for d in zoo_dirs():
        try:
            out.append((str(d), d.stat().st_mtime_ns))
        except OSError:
            out.append((str(d), None))
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=8)
def _zoo_table(stamp: tuple) -> list[dict]:
    return list_models()


def zoo_table() -> list[dict]:
    """The zoo's entries (:func:`models.zoo.list_models`), read again whenever a zoo folder changes."""
    return _zoo_table(_zoo_stamp())


def _registry_stamp() -> int:
    """Changes when a collection is added or removed (here, in another session, or by the CLI)."""
    from data.collections import registry_path

    try:
        return registry_path().stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_resource(show_spinner=False, max_entries=4)
def _sources(stamp: int) -> dict[str, Source]:
    return available_sources()


def get_sources() -> dict[str, Source]:
    """The known datasets and the user's collections (opened once per registry version)."""
    return _sources(_registry_stamp())


@st.cache_resource(show_spinner=False, max_entries=64)
def _source(name: str, stamp: int) -> Source:
    return open_source(name)


def get_source(name: str) -> Source:
    return _source(name, _registry_stamp())


@st.cache_data(show_spinner="Indexing dataset (once)…", max_entries=64)
def _manifest(name: str, stamp: int) -> pd.DataFrame:
    return build_manifest(get_source(name), progress=False)


def get_manifest(name: str) -> pd.DataFrame:
    """The manifest of a dataset or collection (once per server and registry version; on disk,
    :func:`data.manifest.build_manifest` rebuilds it when the files change)."""
    return _manifest(name, _registry_stamp())


def model_picker() -> str | None:
    """Sidebar model selector shared by every page (kept in ``st.session_state``): the zoo's
    classifiers and its CLIP models (marked "(CLIP)"), which classify by their class prompts. A deep
    link ``?model=NAME`` selects a model of the zoo (any other value is ignored)."""
    names = model_names(kinds=CLASSIFIER_KINDS)
    if not names:
        st.sidebar.warning("No trained model found in the zoo.")
        return None
    clip = set(model_names(kind="clip"))
    current = st.session_state.get(MODEL_KEY)
    if current not in names:
        current = default_model_name() or names[0]
    linked = st.query_params.get("model")
    if linked in names and st.session_state.get(state.MODEL_LINKED) != linked:
        st.session_state[state.MODEL_LINKED] = linked
        current = linked
        st.session_state[state.MODEL_WIDGET] = linked
    st.session_state[MODEL_KEY] = st.sidebar.selectbox(
        "Model", names, index=names.index(current), key=state.MODEL_WIDGET,
        format_func=lambda n: f"{n} (CLIP)" if n in clip else n,
        help="Models of the zoo (models/zoo); every page uses the one chosen here. A CLIP model classifies an "
             "image by its similarity to each class's text prompts.")
    return st.session_state[MODEL_KEY]


COLLECTION_KEY = state.COLLECTION


def collection_picker() -> str | None:
    """Sidebar collection selector shared by every page (kept in ``st.session_state``): the known
    datasets found and the user's collections (Home page, ``python -m data add``). The default is
    the current model's own dataset."""
    names = list(get_sources())
    if not names:
        return None
    current = st.session_state.get(COLLECTION_KEY)
    if current not in names:
        model = st.session_state.get(MODEL_KEY) or default_model_name()
        own = next((m.get("dataset") for m in zoo_table() if m["name"] == model and "error" not in m), None)
        current = own if own in names else names[0]
    sources = get_sources()
    linked = st.query_params.get("collection")  # a deep link (?collection=NAME): only a known name is taken
    if linked in names and st.session_state.get(state.COLLECTION_LINKED) != linked:
        st.session_state[state.COLLECTION_LINKED] = linked
        current = linked
        st.session_state[state.COLLECTION_WIDGET] = linked
    st.session_state[COLLECTION_KEY] = st.sidebar.selectbox(
        "Images", names, index=names.index(current), key=state.COLLECTION_WIDGET,
        format_func=lambda n: f"{n} (sample)" if sources[n].sample else n,
        help="The collection whose images the galleries show: NDSB, ZooLake, or one of your own (add it on the "
             "Home page or with python -m data add NAME PATH).")
    return st.session_state[COLLECTION_KEY]


def current_collection() -> str | None:
    """The collection chosen in the sidebar (None when there is none)."""
    name = st.session_state.get(COLLECTION_KEY)
    return name if name in get_sources() else (next(iter(get_sources()), None))


def current_model() -> LensModel | None:
    """The model chosen in the sidebar (:func:`models.handle.open_model`: a classifier, or a CLIP
    model behind a ``ClipClassifier``), or None (with a message) when it cannot be loaded."""
    name = st.session_state.get(MODEL_KEY) or default_model_name()
    if not name:
        st.info("No model in the zoo yet. Train one: `python -m models.train --arch bacnn --dataset ndsb`.")
        return None
    try:
        with st.spinner(f"Loading {md_text(name)}…"):
            return open_model(name)
    except CheckpointError as e:
        st.error(md_text(f"Model {name!r} could not be loaded: {e}"))
        return None


# --- dataset images (pages.image_picker decodes them for a model) ------------------------------------
def image_key(fg: np.ndarray) -> str:
    """A short stable id of a decoded image (keys the pages' caches)."""
    return hashlib.sha1(np.ascontiguousarray(fg).tobytes()).hexdigest()[:16]


@st.cache_data(show_spinner=False, max_entries=4096)
def read_image_bytes(dataset: str, relpath: str) -> bytes:
    """The raw bytes of a dataset image (cached)."""
    return get_source(dataset).read_bytes(relpath)


@st.cache_data(show_spinner=False, max_entries=16)
def _metadata(dataset: str, stamp: int) -> pd.DataFrame | None:
    src = get_source(dataset)
    if not hasattr(src, "metadata"):
        return None
    return src.metadata().set_index("relpath")


def collection_annotation(dataset: str, relpath: str) -> str | None:
    """What a collection says of an image besides ground truth (an EcoTaxa category that is not
    validated), as a sentence, or None."""
    meta = _metadata(dataset, _registry_stamp())
    if meta is None or relpath not in meta.index:
        return None
    r = meta.loc[relpath]
    cat, status = str(r.get("category") or ""), str(r.get("status") or "")
    if not cat or cat == UNLABELLED or status == "validated":
        return None
    return f"EcoTaxa's prediction: {cat} ({status or 'no status'}, not ground truth)"
# --- end of dataset images ----------------------------------------------------------------------


# --- Classify & explain's cached explanations (filled by the page, and by the warm-up) -------------
DISPLAY_PX = 256  # side of the explained image as shown
DEFAULT_METHOD = "integrated_gradients"
GALLERY_SIZE = 12
# One torch computation at a time: two threads (the start-up warm-up and a page run, or two
# visitors) each running torch's 2 intra-op threads on 2 cores made every call 3-5x slower
# (measured: Integrated Gradients 0.22 s alone, 0.9-1.2 s side by side).
COMPUTE_LOCK = threading.RLock()


def gallery_sample(sub: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The gallery's random pick of up to ``GALLERY_SIZE`` images (``seed``: the Shuffle count)."""
    return sub.sample(n=min(GALLERY_SIZE, len(sub)), random_state=seed)


def _stored(model_key: str, kind: str, params: dict, module, compute) -> dict:
    """A result from the on-disk explanation store (:mod:`explain.explanation_store`), computed
    under ``COMPUTE_LOCK`` when it is not there yet; ``module``'s source versions the entry."""
    from explain import explanation_store as store

    def locked() -> dict:
        with COMPUTE_LOCK:
            return compute()

    return store.cached(model_key, kind, {**params, "code": store.code_version(module)}, locked)


@st.cache_data(show_spinner=False, max_entries=512)
def explanation_attribution(model_key: str, image_key: str, level: str, target: str, method: str, signed: bool,
                            _model, _x) -> tuple[np.ndarray, float | None]:
    """A saliency map (and the IG convergence gap) of ``_x`` for one level and target."""
    from explain import saliency

    def compute() -> dict:
        amap, delta = saliency.attribute(_model, _x, level, target, method, signed=signed, return_delta=True)
        return {"map": np.asarray(amap), "delta": None if delta is None else float(delta)}

    v = _stored(model_key, "attribution", dict(image=image_key, level=level, target=target, method=method, signed=signed),
                saliency, compute)
    return v["map"], v["delta"]


@st.cache_data(show_spinner=False, max_entries=256)
def explanation_contrast(model_key: str, image_key: str, level: str, a: str, b: str, method: str, _model, _x) -> np.ndarray:
    """"Why ``a`` rather than ``b``": the difference of the two maps."""
    from explain import saliency

    v = _stored(model_key, "contrast", dict(image=image_key, level=level, a=a, b=b, method=method), saliency,
                lambda: {"map": np.asarray(saliency.contrast(_model, _x, level, a, b, method))})
    return v["map"]


@st.cache_data(show_spinner=False, max_entries=512)
def explanation_references(model_key: str, image_key: str, targets: tuple[tuple[str, str], ...], _model, _x) -> dict[str, float]:
    """Random-order AUC per (level, target), all levels in one pass."""
    from explain import faithfulness

    v = _stored(model_key, "references", dict(image=image_key, targets=targets), faithfulness,
                lambda: {"refs": {k: float(r) for k, r in faithfulness.random_references(_model, _x, dict(targets)).items()}})
    return v["refs"]


@st.cache_data(show_spinner=False, max_entries=512)
def explanation_faithfulness(model_key: str, image_key: str, level: str, target: str, map_key: str, ref: float,
                             _model, _x, _attr_map) -> dict:
    """Deletion / insertion AUC of a map (``map_key``: its :func:`image_key`) with their curves."""
    from explain import faithfulness

    def compute() -> dict:
        f = faithfulness.faithfulness(_model, _x, level, target, _attr_map, reference=ref)
        return {**f.to_dict(), "fractions": f.curves.fractions, "deletion": f.curves.deletion, "insertion": f.curves.insertion}

    return _stored(model_key, "faithfulness", dict(image=image_key, level=level, target=target, map=map_key, ref=ref),
                   faithfulness, compute)


def warm_first_explanation(name: str) -> bool:
    """Explain the image that Classify & explain opens with (the first test image of the default
    gallery, default method, every level) so that the first visitor finds it in the caches, in
    the page's order. False when there is no such image (no dataset)."""
    from explain.predict import predict
    from explain.saliency import is_signed
    from models.base import images_to_tensor
    from pages.image_picker import open_image

    lm = open_model(name)
    model, manifest = lm.classifier, lm.manifest
    dataset = manifest.get("dataset")
    if dataset not in get_sources():
        return False
    man = get_manifest(dataset)
    shown = gallery_sample(man[man["split"] == "test"], 0)
    for rel in shown["relpath"]:
        thumbnail(dataset, rel)
    if shown.empty or (img := open_image(dataset, shown.iloc[0]["relpath"], model.preprocessing["size"], DISPLAY_PX,
                                         model.preprocessing)) is None:
        return False
    model.eval()
    mkey = lm.key
    x = images_to_tensor(img.fg)
    with COMPUTE_LOCK:
        pred = predict(model, x, k=5)
    method, signed = DEFAULT_METHOD, is_signed(DEFAULT_METHOD)
    targets = {lvl: pred.path[lvl] for lvl in model.levels}
    leaf = model.levels[-1]
    # the page's order: the leaf's map, the references, then the grid (a first visitor's page run
    # waits on each entry the warm-up is computing and then reads it)
    explanation_attribution(mkey, img.key, leaf, targets[leaf], method, signed, model, x)
    refs = explanation_references(mkey, img.key, tuple(targets.items()), model, x)
    for lvl in reversed(model.levels):
        amap, _ = explanation_attribution(mkey, img.key, lvl, targets[lvl], method, signed, model, x)
        explanation_faithfulness(mkey, img.key, lvl, targets[lvl], image_key(amap.astype(np.float32)), refs[lvl], model, x, amap)
    return True


def dataset_missing_message() -> None:
    from data.paths import WHERE_TO_GET

    st.warning("No plankton dataset was found.")
    st.code(WHERE_TO_GET, language=None)


def safe_source(name: str) -> Source | None:
    try:
        return get_source(name)
    except DatasetNotFound as e:
        st.warning(md_text(e))
        return None


# --- warm-up at server start (serve.py) ------------------------------------------------------
def warm_caches() -> None:
    """Fill the shared caches the first page view needs: torch and Captum imported, the default
    model and the datasets' indexes loaded, and the explanation that Classify & explain opens
    with computed (:func:`warm_first_explanation`). Called from a background thread when the
    server starts; safe to call again."""
    import torch

    from explain.export import colorize
    from explain.saliency import attribute

    name = default_model_name()
    if name is not None and not warm_first_explanation(name):
        model = open_model(name).classifier
        x = torch.zeros(1, 1, model.preprocessing["size"], model.preprocessing["size"])
        with COMPUTE_LOCK:
            attribute(model, x, model.levels[-1], None, "integrated_gradients", n_steps=2)
    colorize(np.zeros((2, 2), np.float32), signed=True)
    for ds in get_sources():
        get_manifest(ds)
    score_default_at_start(name)


def score_default_at_start(name: str | None) -> None:
    """Start scoring the default model's own dataset in the background (once: the table is then
    on disk), so Anomalies, Neighbourhoods and Review open on it without waiting. Off with
    ``PLANKTON_LENS_SCORE_AT_START=0``."""
    import os

    if os.environ.get("PLANKTON_LENS_SCORE_AT_START", "1") == "0" or name is None:
        return
    lm = open_model(name)
    if lm.kind != "clip" and lm.dataset and lm.dataset in get_sources():
        from explain.score import start

        start(name, lm.dataset)


# --- shared by Neighbourhoods, Review and Anomalies -------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def gallery(model_name: str, sha: str, limit: int | None):
    """The model's gallery of known images (``explain.neighbours.Gallery``), once per server."""
    from explain.neighbours import load_gallery

    return load_gallery(model_name, limit)


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(dataset: str, relpath: str, px: int = 96):
    """A dataset image as a ``px``-pixel square RGB array, or None when it cannot be read."""
    src = get_source(dataset)
    try:
        dec = decode_image(src.read_bytes(relpath), mode=src.mode, background=src.background)
    except (ImageDecodeError, FileNotFoundError, KeyError):
        return None
    return np.asarray(fit_square(dec.image, px, src.background).convert("RGB"))


def model_dataset_problem(lm: LensModel, purpose: str) -> str | None:
    """Why a page that works on the images a model was trained on cannot run for ``lm`` (its
    dataset is unknown or not here), as Markdown, or None."""
    dataset = lm.manifest.get("dataset", "ndsb")
    if dataset is None:
        return (f"{md_text(lm.name)} does not name the dataset it was trained on, so there is nothing to {purpose} yet: "
                "register it with --dataset ndsb or zoolake when its classes are theirs. Classify & explain works "
                "on any collection.")
    if dataset not in get_sources():
        return f"The {md_text(dataset)} dataset this model was trained on was not found, so there is nothing to {purpose}."
    return None


# --- the page shell -------------------------------------------------------------------------------
def _show_failure(page: str, e: Exception, reassurance: str) -> None:
    """The one way a page shows an unexpected error: logged with its traceback, shown as one message."""
    import logging

    logging.getLogger(f"plankton_lens.{page}").exception("%s page failed", page)
    st.error(f"Something went wrong on this page ({type(e).__name__}: {md_text(e)}). {reassurance}")


def run_page(main, page: str, reassurance: str = "The rest of the app still works.") -> None:
    """Run a page's ``main()`` inside the one error boundary every page has: an unexpected error is
    logged with its traceback and shown as one message (never a traceback), with ``reassurance``
    (what the user has not lost). Streamlit's own control flow (st.stop, st.rerun) passes through."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 - Streamlit's control flow is BaseException, not Exception
        _show_failure(page, e, reassurance)


def page_fragment(page: str, reassurance: str = "The rest of the app still works.", run_every: float | None = None):
    """``st.fragment`` with the page's error boundary. A fragment's own reruns (a widget inside it,
    ``run_every``) run the function alone, outside :func:`run_page`, so it carries the boundary itself."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - as run_page
                _show_failure(page, e, reassurance)
        return st.fragment(guarded, run_every=run_every)
    return wrap


# --- the scored table of the sidebar's collection (Anomalies, Neighbourhoods, Review) --------------
@dataclass
class ScoredView:
    """The sidebar's model and collection, and the collection's scored table."""

    lm: LensModel
    collection: str
    scored: "object"  # explain.score.ScoredTable

    @property
    def table(self) -> pd.DataFrame:
        return self.scored.table

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.scored.levels)


def score_label(column: str, levels: tuple[str, ...] | list[str]) -> str:
    """A scored table's score column as a user reads it ("Entropy (class)", "kNN distance …")."""
    from explain.neighbours import KNN_K
    from explain.ood import get_score

    if column == "knn_score":
        return f"kNN distance (embedding, k={KNN_K})"
    rest = column[len("ood_"):]
    lvl = next(lv for lv in sorted(levels, key=len, reverse=True) if rest.endswith("_" + lv))
    return f"{get_score(rest[: -len(lvl) - 1]).label} ({lvl})"


@st.cache_resource(show_spinner=False, max_entries=4)
def _scored(folder: str, stamp: int):
    from explain.score import read

    return read(folder)


def scored_status(model: str, collection: str) -> dict:
    """:func:`explain.score.status`, or ``{"state": "error", "message"}`` when it cannot be known."""
    from explain.score import ScoreError, status

    try:
        return status(model, collection)
    except (DatasetNotFound, ScoreError, CheckpointError, OSError, ValueError) as e:
        return {"state": "error", "message": str(e)}


@page_fragment("scoring", run_every=2.0)
def _scoring_progress(model: str, collection: str) -> None:
    """A progress bar that follows a background scoring run; the page reloads when it is done."""
    s = scored_status(model, collection)
    if s["state"] == "done":
        st.rerun()
    if s["state"] != "running":
        st.warning(f"Scoring {md_text(collection)} stopped before it finished ({s['state']}). Open the page again to resume.")
        return
    total = max(int(s.get("total") or 0), 1)
    done = int(s.get("done") or 0)
    if s.get("stage") in ("starting", "reference"):
        text = (f"Preparing: the model's reference (its training images as the gallery of known images, and its "
                f"validation images for the thresholds) is computed once per model… then {total:,} images to score.")
    else:
        rate = s.get("images_per_s") or 0
        left = (total - done) / rate if rate else None
        text = (f"Scoring {md_text(collection)}: {done:,} / {total:,} images" + (f" · {rate:,.0f} images/s" if rate else "")
                + (f" · about {left / 60:.0f} min left" if left and left > 90 else ""))
    st.progress(min(done / total, 1.0), text=text)


def scored_collection(title: str, intro: str) -> ScoredView | None:
    """A page's title and introduction, then the sidebar's model and collection with the
    collection's scored table. When the table is not built yet, a background run is started
    (:func:`explain.score.start`: it survives a page reload) and its progress shown; None then."""
    from explain.score import start

    st.title(title)
    st.caption(intro)
    lm = current_model()
    if lm is None:
        return None
    collection = current_collection()
    if collection is None:
        dataset_missing_message()
        return None
    s = scored_status(lm.name, collection)
    if s["state"] == "error":
        st.error(f"{md_text(collection)} cannot be scored with {md_text(lm.name)}: {md_text(s['message'])}")
        return None
    if s["state"] == "failed":
        st.error(f"The last scoring run of {md_text(collection)} with {md_text(lm.name)} stopped before it finished.")
        if s.get("log"):
            st.code(s["log"][-1500:], language=None)
        if not st.button("Resume scoring", icon=":material/play_arrow:", key="score_resume"):
            return None
    if s["state"] != "done":
        start(lm.name, collection)
        st.info(f"{md_text(collection)} has not been scored with {md_text(lm.name)} yet: scoring runs in the background (once; every "
                "page then reads the table). This page fills in when it is done.", icon=":material/hourglass_top:")
        _scoring_progress(lm.name, collection)
        return None
    from pathlib import Path

    folder = Path(s["folder"])
    scored = _scored(str(folder), (folder / "meta.json").stat().st_mtime_ns)
    m = scored.meta
    st.caption(f"**{md_text(collection)}**: {m['rows']:,} images scored by **{md_text(lm.name)}** "
               f"({m['engine']} engine, {m['images_per_s']:,.0f} images/s). Thresholds keep {m['keep']:.0%} of the "
               "model's own validation images.")
    return ScoredView(lm, collection, scored)


def sidebar_scoring_status() -> None:
    """A line in the sidebar while the current collection is being scored."""
    model = st.session_state.get(MODEL_KEY) or default_model_name()
    collection = st.session_state.get(COLLECTION_KEY)
    if not model or not collection:
        return
    s = scored_status(model, collection)
    if s["state"] == "running":
        pct = int(100 * (s.get("done") or 0) / max(int(s.get("total") or 1), 1))
        st.sidebar.caption(f":material/hourglass_top: Scoring {md_text(collection)} with {md_text(model)}: {pct} %")
