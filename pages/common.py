"""Shared UI helpers for every page: cached loaders, the model picker, error display.

Everything shown comes from plain functions in data/, models/ and explain/; this module only
caches them (``st.cache_resource`` / ``st.cache_data``) and lays things out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from data.manifest import build_manifest
from data.sources import DatasetNotFound, Source, available_sources, open_source
from models.base import HierarchicalClassifier
from models.checkpoint import CheckpointError
from models.zoo import default_model_name, list_models, load_model, model_names

MODEL_KEY = "model_name"


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


@st.cache_data(ttl=60, show_spinner=False)
def zoo_table() -> list[dict]:
    return list_models()


@st.cache_resource(show_spinner="Loading model…")
def get_model(name: str) -> tuple[HierarchicalClassifier, dict]:
    """A zoo model, loaded once per server (sha256-verified)."""
    return load_model(name)


@st.cache_resource(show_spinner=False)
def get_sources() -> dict[str, Source]:
    return available_sources()


@st.cache_resource(show_spinner=False)
def get_source(name: str) -> Source:
    return open_source(name)


@st.cache_data(show_spinner="Indexing dataset (once)…")
def get_manifest(name: str) -> pd.DataFrame:
    return build_manifest(get_source(name), progress=False)


def model_picker() -> str | None:
    """Sidebar model selector shared by every page (kept in ``st.session_state``)."""
    names = model_names()
    if not names:
        st.sidebar.warning("No trained model found in the zoo.")
        return None
    current = st.session_state.get(MODEL_KEY)
    if current not in names:
        current = default_model_name()
    st.session_state[MODEL_KEY] = st.sidebar.selectbox(
        "Model", names, index=names.index(current), key="_model_select",
        help="Models of the zoo (models/zoo); every page uses the one chosen here.")
    return st.session_state[MODEL_KEY]


def current_model() -> tuple[HierarchicalClassifier, dict] | None:
    """The model chosen in the sidebar, or None (with a message) when it cannot be loaded."""
    name = st.session_state.get(MODEL_KEY) or default_model_name()
    if not name:
        st.info("No model in the zoo yet. Train one: `python -m models.train --arch bacnn --dataset ndsb`.")
        return None
    try:
        return get_model(name)
    except CheckpointError as e:
        st.error(f"Model {name!r} could not be loaded: {e}")
        return None


def dataset_missing_message() -> None:
    from data.paths import WHERE_TO_GET

    st.warning("No plankton dataset was found.")
    st.code(WHERE_TO_GET, language=None)


def safe_source(name: str) -> Source | None:
    try:
        return get_source(name)
    except DatasetNotFound as e:
        st.warning(str(e))
        return None


# --- warm-up at server start (serve.py) ------------------------------------------------------
def warm_caches() -> None:
    """Fill the shared caches the first page view needs: torch and Captum imported, the default
    model and the datasets' indexes loaded, one explanation run so that lazy initialisation is
    done. Called from a background thread when the server starts; safe to call again."""
    import torch

    from explain.export import colorize
    from explain.saliency import attribute

    name = default_model_name()
    if name is not None:
        model, _ = get_model(name)
        x = torch.zeros(1, 1, model.preprocessing["size"], model.preprocessing["size"])
        attribute(model, x, model.levels[-1], None, "integrated_gradients", n_steps=2)
        colorize(np.zeros((2, 2), np.float32), signed=True)
    for ds in get_sources():
        get_manifest(ds)
