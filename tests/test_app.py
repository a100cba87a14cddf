"""The app shell in a real browser: a page URL opened first on a fresh ``streamlit run serve.py``
still gets app.py's navigation and the shared model picker (not Streamlit's pages/-folder
fallback), and the server's start-up warm-up completes."""
from __future__ import annotations

import time

from tests.conftest import ARTIFACTS, assert_no_streamlit_errors, requires_data, run_streamlit_server, wait_for_app


@requires_data
def test_direct_page_url_on_a_cold_server_uses_the_app_navigation(browser):
    with run_streamlit_server("streamlit-cold-server.log") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.goto(url + "/review", timeout=300_000)
        nav = page.locator("[data-testid='stSidebarNavLink']")
        nav.filter(has_text="Classify & explain").wait_for(timeout=300_000)
        wait_for_app(page, 300_000)
        titles = [t.strip() for t in nav.all_inner_texts()]
        assert "Review" in " ".join(titles) and not any("common" in t.lower() for t in titles), titles
        # The sidebar's shared model picker is there (app.py ran), and the review page itself.
        assert page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="Model").count() == 1
        assert page.url.rstrip("/").endswith("/review")
        page.console_errors = [e for e in console if "Failed to load resource" not in e]
        assert_no_streamlit_errors(page)
        page.close()
        # serve.py's start-up warm-up (default model, Captum, dataset indexes) finished cleanly.
        log = ARTIFACTS / "streamlit-cold-server.log"
        deadline = time.time() + 300
        while "warm-up done" not in log.read_text() and time.time() < deadline:
            time.sleep(1)
        text = log.read_text()
        assert "warm-up done" in text and "warm-up failed" not in text and "Traceback" not in text, text[-3000:]


def _page_with_a_failing_fragment():
    import streamlit as st

    from pages.common import page_fragment, run_page

    @page_fragment("test", "Your recorded decisions are safe.")
    def panel() -> None:
        if st.button("Break"):
            raise ValueError("[re-login](https://example.org)")
        st.markdown("panel drawn")

    def main() -> None:
        st.markdown("page drawn")
        panel()

    run_page(main, "test")


def test_a_failing_fragment_shows_one_message_not_a_traceback():
    """A fragment's own reruns run outside run_page's error boundary, so page_fragment carries it:
    the error is one message with the page's reassurance, and its text is not live Markdown."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_page_with_a_failing_fragment, default_timeout=60).run()
    assert not at.exception and not at.error
    assert [m.value for m in at.markdown] == ["page drawn", "panel drawn"]
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert len(at.error) == 1
    msg = at.error[0].value
    assert msg.startswith("Something went wrong on this page (ValueError:") and "Your recorded decisions are safe." in msg
    assert "](https://example.org)" not in msg  # escaped: shown as text, not a link
    assert "page drawn" in [m.value for m in at.markdown]
