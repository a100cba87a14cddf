"""Every page opened by its URL in Chromium on ``streamlit run serve.py`` logs no console error
and gets no 4xx/5xx response. (Streamlit's frontend used to probe ``/<page>/_stcore/health`` and
``/<page>/_stcore/host-config`` first, two 404s per page, until serve.py told it the base URL.)"""
from __future__ import annotations

from urllib.parse import urlparse

import pytest

from tests.conftest import requires_data, wait_for_app

PAGES = {"": "Plankton Lens", "classify": "Classify & explain", "anomalies": "Anomalies",
         "neighbourhoods": "Neighbourhoods", "review": "Review", "clip": "CLIP explanations"}


def open_and_record(browser, url: str) -> tuple[object, list[str]]:
    """A new page at ``url``, once Streamlit has run it, and what went wrong on the way: console
    errors, page errors, responses with status >= 400 and the server's own failed requests."""
    host = urlparse(url).netloc
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console: {m.text} ({m.location.get('url')})") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    pg.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})")
          if urlparse(r.url).netloc == host and "ERR_ABORTED" not in (r.failure or "") else None)
    pg.goto(url, timeout=300_000)
    wait_for_app(pg, 600_000)
    return pg, problems


@requires_data
@pytest.mark.parametrize("path", list(PAGES))
def test_every_page_loads_without_console_errors_or_error_responses(streamlit_server, browser, path):
    pg, problems = open_and_record(browser, f"{streamlit_server}/{path}")
    try:
        pg.get_by_role("heading", name=PAGES[path], exact=True).first.wait_for(timeout=60_000)
        assert pg.locator("[data-testid='stException']").count() == 0
        pg.wait_for_timeout(1000)  # late console messages
    finally:
        pg.context.close()
    assert not problems, problems


def _get(url: str, path: str) -> tuple[int, dict, bytes]:
    """GET ``path`` as a browser asks for a page (HTML, gzip accepted), the path sent as is."""
    import http.client

    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.putrequest("GET", path, skip_accept_encoding=True)
    c.putheader("Accept", "text/html,*/*")
    c.putheader("Accept-Encoding", "gzip")
    c.endheaders()
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


@requires_data
def test_page_html_names_the_base_url_and_a_hostile_path_cannot_break_out(streamlit_server):
    for path, name in (("/classify?image=ndsb:x", b'"classify"'), ("/", b'""'),
                       ('/x"<!--<script>', b'"x\\"\\u003c!--\\u003cscript\\u003e"')):
        status, headers, body = _get(streamlit_server, path)
        assert status == 200 and int(headers["content-length"]) == len(body) and "etag" not in headers, (path, headers)
        head = body[body.index(b"<head>"):body.index(b"</script>")]
        assert head.startswith(b"<head><script>(function(){var s=" + name + b","), head
        assert b"BACKEND_BASE_URL" in head and b"<script>" not in head[len(b"<head><script>"):]
    status, headers, body = _get(streamlit_server, "/_stcore/health")
    assert (status, body) == (200, b"ok")
