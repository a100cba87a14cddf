"""Home: what Plankton Lens is, the models and datasets found, the NDSB taxonomy, the pages."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from data.info import dataset_info, sunburst_frame
from pages.common import dataset_missing_message, get_sources, zoo_table

st.title("Plankton Lens")
st.markdown(
    "Plankton Lens shows marine biologists **why** a deep model classified a plankton image: the "
    "prediction of a hierarchical classifier at every taxonomic level (living / non-living → group → "
    "subgroup → class) with saliency maps, the images it flags as **out of distribution** from the "
    "flatness of its logits and where they sit among known images, and **CLIP-style** text "
    "explanations. It runs on real images (NDSB 2015 / PlanktonSet 1.0, ZooLake) with models trained "
    "by the project's own code."
)

st.subheader("Models")
models = [m for m in zoo_table() if "error" not in m]
if models:
    rows = []
    for m in models:
        met = m["metrics"]
        rows.append({"model": m["name"], "architecture": m["arch"], "dataset": m["dataset"],
                     "held-out classes": len(m.get("heldout") or []),
                     **{k.replace("_accuracy", " acc."): v for k, v in met.items() if k.endswith("_accuracy")},
                     "leaf log loss": met.get("leaf_log_loss"), "parameters (M)": round((m["parameters"] or 0) / 1e6, 2)})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
else:
    st.info("No trained model found in models/zoo.")

st.subheader("Datasets")
sources = get_sources()
if not sources:
    dataset_missing_message()
else:
    cols = st.columns(len(sources))
    for col, (name, src) in zip(cols, sources.items()):
        info = dataset_info(src)
        col.metric(name, f"{info['images']:,} images", f"{info['classes']} classes", delta_color="off")
        col.caption(f"{info['format']}: `{info['path']}` · splits " + ", ".join(f"{k} {v:,}" for k, v in info["splits"].items()))
    if "ndsb" in sources:
        st.subheader("NDSB taxonomy")
        frame = sunburst_frame(sources["ndsb"])
        fig = px.sunburst(frame, path=["living", "group", "subgroup", "class"], values="images",
                          color="living", color_discrete_map={"living": "#0072B2", "non-living": "#E69F00", "unknown": "#999999"})
        fig.update_layout(height=620, margin=dict(t=10, l=10, r=10, b=10))
        st.plotly_chart(fig, width="stretch")

st.subheader("Pages")
for f, title in [("pages/classify.py", "Classify & explain — per-level predictions and saliency maps"),
                 ("pages/anomalies.py", "Anomalies — out-of-distribution images by logit flatness"),
                 ("pages/neighbourhoods.py", "Neighbourhoods — UMAP map and nearest known images"),
                 ("pages/review.py", "Review — record decisions on flagged images"),
                 ("pages/clip.py", "CLIP explanations — text prompts that match an image")]:
    try:
        st.page_link(f, label=title)
    except Exception:  # noqa: BLE001 - page not built yet
        pass
