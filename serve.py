"""Plankton Lens server: ``streamlit run serve.py`` serves ``app.py`` and warms it up at start.

Streamlit runs ``app.py`` only when a browser connects, so the first visitor would wait for
torch to import and the default model, dataset index and Captum to load. Here a background
thread does that work as soon as the server starts (while the browser is still loading the
page), filling the same ``st.cache_resource`` / ``st.cache_data`` caches that the pages use.
``streamlit run app.py`` still works; it just skips the warm-up.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see app.py

import streamlit as st  # noqa: E402
from streamlit.logger import get_logger  # noqa: E402

log = get_logger("plankton_lens.serve")
NO_CONTEXT_LOGGER = "streamlit.runtime.scriptrunner_utils.script_run_context"  # "missing ScriptRunContext"


def warm_up() -> None:
    """Import the heavy modules and load the default model and dataset index into the caches."""
    t0 = time.perf_counter()
    quiet = logging.getLogger(NO_CONTEXT_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # cached functions called outside a page run warn once per call
    try:
        from pages.common import warm_caches

        warm_caches()
        log.info("warm-up done in %.1f s", time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - a failed warm-up only costs the first visitor some time
        log.warning("warm-up failed; pages will load what they need themselves", exc_info=True)
    finally:
        quiet.setLevel(level)


@contextlib.asynccontextmanager
async def _lifespan(_app):
    from streamlit.runtime.pages_manager import PagesManager

    # app.py navigates with st.navigation: never fall back to running a pages/ script alone
    # when a page URL is the server's first request (see pages/common.py).
    PagesManager.uses_pages_directory = False
    threading.Thread(target=warm_up, name="plankton-lens-warm-up", daemon=True).start()
    yield {}


app = st.App("app.py", lifespan=_lifespan)
