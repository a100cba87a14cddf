"""Plankton Lens server: ``streamlit run serve.py`` serves ``app.py`` and warms it up at start.

Streamlit runs ``app.py`` only when a browser connects, so the first visitor would wait for
torch to import and the default model, dataset index and Captum to load. Here a background
thread does that work as soon as the server starts (while the browser is still loading the
page), filling the same ``st.cache_resource`` / ``st.cache_data`` caches that the pages use.
``streamlit run app.py`` still works; it just skips the warm-up (and the base-URL script below).

A page opened by its URL (``/classify``) made the browser log two 404s: Streamlit's frontend
does not know the app's base URL, so it first tries ``/classify/_stcore/health`` and
``/classify/_stcore/host-config`` before the root (streamlit/streamlit#7074). :class:`BaseUrlScript`
tells it the base URL (``window.__streamlit.BACKEND_BASE_URL``) in the page's HTML.
"""
from __future__ import annotations

import contextlib
import json
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


def no_message_cache() -> None:
    """Turn off Streamlit's cache of large messages (``global.minCachedMessageSize``). With
    fragments (the Anomalies threshold panel, the Review panel, the progress bars) the browser's
    copy of that cache falls out of step with the server's, which then refers to a message the
    browser has dropped: "Connection error: Cached ForwardMsg MISS" and a dead page
    (streamlit/streamlit#10012, #11357), seen on Anomalies after a few slider moves. Without the
    cache, large elements are sent again on each run: a few hundred kB on a local server."""
    from streamlit import config

    config.set_option("global.minCachedMessageSize", 1e18, where_defined="serve.py")  # no message is that large


@contextlib.asynccontextmanager
async def _lifespan(_app):
    from streamlit.runtime.pages_manager import PagesManager

    # app.py navigates with st.navigation: never fall back to running a pages/ script alone
    # when a page URL is the server's first request (see pages/common.py).
    PagesManager.uses_pages_directory = False
    no_message_cache()
    threading.Thread(target=warm_up, name="plankton-lens-warm-up", daemon=True).start()
    yield {}


#: Paths (below the base URL) that are not pages: Streamlit's endpoints, media and static files.
NOT_PAGES = ("_stcore/", "media/", "component/", "app/static/", "static/")


#: Sets ``window.__streamlit.BACKEND_BASE_URL`` to the browser's path less ``/<page>`` (so a
#: proxy's path prefix is kept); sets nothing when the path does not end so, or a host set it.
BASE_URL_JS = ("(function(){var s=%s,w=window.__streamlit||{},p=location.pathname.replace(/\\/+$/,'');"
               "if(w.BACKEND_BASE_URL||(s&&p.slice(-s.length-1)!=='/'+s))return;"
               "window.__streamlit=Object.assign({},w,{BACKEND_BASE_URL:location.origin+(s?p.slice(0,-s.length-1):p)+'/'});})();")


def base_url_script(page: str) -> bytes:
    """The ``<script>`` of :data:`BASE_URL_JS` for a page served at ``.../<page>`` (``page`` as
    the URL has it, percent-encoded; "" for the main page). The page comes from the URL, so it is
    written as a JSON string with ``<``, ``>`` and ``&`` escaped: it can never close the script."""
    name = json.dumps(page).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"<script>{BASE_URL_JS % name}</script>".encode()


class BaseUrlScript:
    """ASGI middleware: puts :func:`base_url_script` at the top of the ``<head>`` of the app's
    HTML page (the document served at ``/`` and at every page's URL), so the frontend connects
    to the right base URL at once instead of trying ``/<page>/_stcore/...`` (two 404s) first."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        from streamlit import config

        headers = dict(scope.get("headers") or [])
        base = "/" + (config.get_option("server.baseUrlPath") or "").strip("/")
        path = (scope.get("raw_path") or scope.get("path", "").encode()).decode("latin-1").split("?", 1)[0]
        page = path[len(base):].strip("/") if path.startswith(base) else None
        if (scope["type"] != "http" or scope.get("method") != "GET" or b"text/html" not in headers.get(b"accept", b"")
                or page is None or "/" in page or page.startswith(NOT_PAGES)):
            await self.app(scope, receive, send)
            return
        # the HTML uncompressed (it is a few kB), so that it can be edited
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
        start: dict | None = None
        body = b""

        async def edit(message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers") or []).get(b"content-type", b"")
                start = message if kind.startswith(b"text/html") and message.get("status") == 200 else None
                if start is None:
                    await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            if b"<head>" in body and b"content-encoding" not in dict(start.get("headers") or []):
                body = body.replace(b"<head>", b"<head>" + base_url_script(page), 1)
            # the file's own length and validators no longer describe this body
            hdrs = [(k, v) for k, v in start.get("headers") or [] if k not in (b"content-length", b"etag", b"last-modified")]
            await send({**start, "headers": [*hdrs, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, edit)


def _middleware() -> list:
    from starlette.middleware import Middleware

    return [Middleware(BaseUrlScript)]


app = st.App("app.py", lifespan=_lifespan, middleware=_middleware())
