"""Shared fixtures: dataset location, isolated caches, a live Streamlit server and a browser."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

os.environ.setdefault("PLANKTON_DATASETS", str(REPO.parent / "shared" / "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: Scoring reads a model against 10 images per class and split of its dataset (not all 30,000).
os.environ.setdefault("PLANKTON_LENS_REFERENCE_LIMIT", "10")
#: The test servers do not score the default model's dataset at start (tests score small collections).
os.environ.setdefault("PLANKTON_LENS_SCORE_AT_START", "0")
os.environ.setdefault("PLANKTON_LENS_DATA", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"plankton-lens-test-data-{os.getpid()}"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.streamlit_server import streamlit_server as start_server  # noqa: E402


def _have_datasets() -> bool:
    from data.sources import available_sources

    return "ndsb" in available_sources()


def _have_full_ndsb() -> bool:
    from data.sources import available_sources

    src = available_sources().get("ndsb")
    return src is not None and not src.sample


def _have_zoolake() -> bool:
    from data.sources import available_sources

    return "zoolake" in available_sources()


#: NDSB, the full archive or the sample shipped in data/sample (a fresh clone has the sample).
requires_data = pytest.mark.skipif(not _have_datasets(), reason="NDSB dataset not found (set PLANKTON_DATASETS)")
#: Tests whose figures or images need the full NDSB archive, not the shipped 10-per-class sample.
requires_full_data = pytest.mark.skipif(not _have_full_ndsb(), reason="needs the full NDSB archive: only the sample "
                                        "shipped in data/sample was found (set PLANKTON_DATASETS)")
requires_zoolake = pytest.mark.skipif(not _have_zoolake(), reason="needs the ZooLake archive (set PLANKTON_DATASETS)")


@pytest.fixture(scope="session")
def ndsb():
    """The NDSB source, read from the published archive."""
    from data.sources import open_source

    if not _have_datasets():
        pytest.skip("NDSB dataset not found")
    return open_source("ndsb")


@pytest.fixture(scope="session")
def ndsb_manifest(ndsb):
    from data.manifest import build_manifest

    return build_manifest(ndsb, progress=False)


@pytest.fixture(scope="session")
def ndsb_bytes(ndsb, ndsb_manifest):
    """Raw bytes of a few real NDSB images of different classes."""
    rows = ndsb_manifest.groupby("class").head(1).head(8)
    return [ndsb.read_bytes(r) for r in rows["relpath"]]


@contextlib.contextmanager
def run_streamlit_server(log_name: str = "streamlit-server.log", start_timeout_s: float = 90.0, env: dict | None = None,
                         script: str = "serve.py"):
    """``streamlit run serve.py`` (the demo's command: app.py plus a warm-up at start) on a free
    loopback port; yields its base URL, stops it on exit."""
    with start_server(REPO / script, ARTIFACTS / log_name, env=env, start_timeout_s=start_timeout_s) as (url, _):
        yield url


@pytest.fixture(scope="session")
def streamlit_server():
    """One live dashboard shared by the browser tests; yields its base URL."""
    with run_streamlit_server() as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (no browser download)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors in ``page.console_errors``."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    yield pg
    ctx.close()


def app_on_page(page: str, collection: str, model: str | None = None):
    """An AppTest of app.py with ``collection`` (and ``model``) in session state, switched to
    ``page`` and run; skips when the zoo has no model."""
    from streamlit.testing.v1 import AppTest

    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=900)
    at.session_state["collection"] = collection
    if model:
        at.session_state["model_name"] = model
    at.run()
    assert not at.exception, at.exception
    return at.switch_page(page).run()


def assert_page_ok(at) -> None:
    """No exception and no error box on an AppTest page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def wait_for_app(pg, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished running the script (no 'running' status widget)."""
    pg.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    pg.wait_for_timeout(500)


def explain_with_model(pg, url: str, option: str, expect: str | None = None) -> None:
    """Open the app, pick ``option`` in the sidebar's model picker, open Classify & explain and
    wait until every level's map is drawn (``expect``: a text to wait for first); then check the
    predictions and maps are on screen (image, map and one map per level)."""
    pg.goto(url, timeout=120_000)
    wait_for_app(pg, 180_000)
    pg.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").first.click()
    pg.get_by_role("option", name=option).click()
    wait_for_app(pg, 120_000)
    pg.locator("[data-testid='stSidebar']").get_by_role("link", name="Classify & explain").click()
    wait_for_app(pg, 300_000)
    if expect:
        pg.get_by_text(expect).wait_for(timeout=180_000)
    pg.get_by_text("Integrated Gradients at every level").wait_for(timeout=300_000)
    wait_for_app(pg, 300_000)
    assert pg.get_by_text("Predicted class").is_visible()
    assert pg.locator("[data-testid='stImage']").count() >= 6


def assert_no_streamlit_errors(pg) -> None:
    exc = pg.locator("[data-testid='stException']")
    assert exc.count() == 0, f"Streamlit exception on page: {exc.first.inner_text()[:2000]}"
    errors = [e for e in pg.console_errors if "favicon" not in e.lower()]
    assert not errors, f"browser console errors: {errors}"


def tiny_train_command(tmp_path: Path, *args: str) -> list[str]:
    """``python -m models.train`` on 3 images per class, writing under ``tmp_path`` (runs/, zoo/),
    quiet and on one thread; ``args`` add the arch, epochs and other options."""
    return [sys.executable, "-m", "models.train", "--limit-per-class", "3", "--batch-size", "64",
            "--runs-dir", str(tmp_path / "runs"), "--export-dir", str(tmp_path / "zoo"), "--no-progress",
            "--threads", "1", *args]


SAMPLE_ZIP = REPO / "data" / "sample" / "ndsb_sample.zip"


def unlabelled_zip(path: Path, n: int = 48) -> Path:
    """A flat zip of ``n`` real NDSB images from the shipped sample: no labels, no folders (a
    cruise's regions of interest as a biologist has them)."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(SAMPLE_ZIP) as z:
        names = sorted(m for m in z.namelist() if m.lower().endswith(".jpg"))[::25][:n]
        with zipfile.ZipFile(path, "w") as out:
            for m in names:
                out.writestr(Path(m).name, z.read(m))
    return path


@pytest.fixture(scope="session")
def cruise() -> str:
    """An unlabelled user collection ("cruise", 48 images) in the session's user data folder,
    where the session's server sees it too."""
    from data.collections import add_collection, user_collections

    if "cruise" not in user_collections():
        add_collection("cruise", unlabelled_zip(Path(os.environ["PLANKTON_LENS_DATA"]) / "uploads" / "cruise.zip"))
    return "cruise"


@pytest.fixture(scope="session")
def scored_cruise(cruise) -> str:
    """The "cruise" collection scored by the default model (explain.score)."""
    from explain.score import run
    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    run(default_model_name(), cruise)
    scored_map(default_model_name(), cruise)
    return cruise


def scored_map(model: str, collection: str) -> None:
    """Build the Neighbourhoods map of a scored table now (UMAP's first use in a process compiles
    code for a minute on a busy machine: the page would show its progress bar instead)."""
    from explain.projection import table_map
    from explain.score import scored_table

    table_map(scored_table(model, collection))


@pytest.fixture(scope="session")
def scored_sample() -> str:
    """The shipped NDSB sample as a labelled user collection ("sample", 1,209 images, classes the
    default model knows), scored by the default model."""
    import shutil

    from data.collections import add_collection, user_collections
    from explain.score import run
    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    if "sample" not in user_collections():
        dst = Path(os.environ["PLANKTON_LENS_DATA"]) / "uploads" / "sample.zip"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_ZIP, dst)
        add_collection("sample", dst)
    run(default_model_name(), "sample")
    scored_map(default_model_name(), "sample")
    return "sample"


_CODE_SPAN = re.compile(r"(?<![\\`])(`+)(.+?)(?<!`)\1(?!`)")


def shown(md: str) -> str:
    """The text a Markdown body built with ``pages.common.md_text`` shows: backslash escapes and
    word joiners removed, hard line breaks as newlines, code spans as they are."""
    def plain(t: str) -> str:
        return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", t.replace("  \n", "\n"))

    out, pos = [], 0
    for m in _CODE_SPAN.finditer(md):
        code = m.group(2)
        if code.startswith(" ") and code.endswith(" ") and code.strip():
            code = code[1:-1]
        out += [plain(md[pos:m.start()]), code]
        pos = m.end()
    return "".join([*out, plain(md[pos:])]).replace("\u2060", "")


VPR_BUNDLE = REPO.parent / "shared" / "ecotaxa" / "vpr_import"


@pytest.fixture(scope="session")
def vpr() -> str:
    """The real EcoTaxa VPR bundle (``../shared/ecotaxa/vpr_import``: 6 images with positions,
    times and depths, no category) as the user collection "vpr", scored by the default model;
    skipped when the shared files are absent."""
    from data.collections import add_collection, user_collections
    from explain.score import run
    from models.zoo import default_model_name

    if not VPR_BUNDLE.is_dir():
        pytest.skip(f"{VPR_BUNDLE} not found (the shared EcoTaxa files)")
    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    old = os.environ.get("PLANKTON_LENS_ROOTS")
    os.environ["PLANKTON_LENS_ROOTS"] = os.pathsep.join([p for p in (old, str(VPR_BUNDLE.parent)) if p])
    try:
        if "vpr" not in user_collections():
            add_collection("vpr", VPR_BUNDLE)
    finally:
        if old is None:
            os.environ.pop("PLANKTON_LENS_ROOTS", None)
        else:
            os.environ["PLANKTON_LENS_ROOTS"] = old
    run(default_model_name(), "vpr")
    return "vpr"
