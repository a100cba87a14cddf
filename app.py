"""Plankton Lens — interactive explainability dashboard for plankton image classifiers.

    streamlit run app.py

The entry point: page config, the shared sidebar (model picker), and navigation between the
pages in ``pages/``. Each page is one task a user has.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads: idle OpenMP threads sleep instead of spinning. On a 2-core machine shared
# with anything else, spinning threads slowed Integrated Gradients 5-10x (bench/bench_explain.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from pages.common import collection_picker, model_picker, sidebar_scoring_status  # noqa: E402

ROOT = Path(__file__).resolve().parent

# (file, title, icon); pages whose file is absent are skipped.
PAGES = [
    ("pages/home.py", "Home", ":material/home:"),
    ("pages/classify.py", "Classify & explain", ":material/biotech:"),
    ("pages/anomalies.py", "Anomalies", ":material/troubleshoot:"),
    ("pages/neighbourhoods.py", "Neighbourhoods", ":material/scatter_plot:"),
    ("pages/review.py", "Review", ":material/fact_check:"),
    ("pages/community.py", "Community", ":material/groups:"),
    ("pages/clip.py", "CLIP explanations", ":material/translate:"),
]

st.set_page_config(page_title="Plankton Lens", page_icon="🔬", layout="wide")
pages = [st.Page(f, title=t, icon=i, default=(f == "pages/home.py")) for f, t, i in PAGES if (ROOT / f).exists()]
nav = st.navigation(pages)
with st.sidebar:
    st.markdown("### Plankton Lens")
    model_picker()
    collection_picker()
nav.run()
with st.sidebar:  # after the page: on a fresh install knowing the status builds the dataset's index
    sidebar_scoring_status()
