"""Home: what Plankton Lens is, the models and datasets found, the NDSB taxonomy, the pages."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from data.info import dataset_info, sunburst_frame
from pages.common import dataset_missing_message, get_sources, md_text, run_page, zoo_table

MAX_UPLOAD_MB = 200  # Streamlit's own upload limit (server.maxUploadSize)


def _add_model_form() -> None:
    """Register a model from a path on the server (under the allowed roots): models.importer."""
    from data.paths import PathNotAllowed, under_allowed_root
    from models.foreign import ModelImportError
    from models.importer import add_model

    with st.expander("Bring your own model", icon=":material/add:"):
        st.caption("A timm or torchvision state_dict (give its architecture), a timm / Hugging Face folder "
                   "(config.json + weights), a TorchScript file or an open_clip folder, on this server. "
                   "The same as `python -m models add PATH --name NAME`.")
        with st.form("add_model"):
            c = st.columns(2)
            path = c[0].text_input("Path on the server", key="add_path")
            name = c[1].text_input("Name", key="add_name")
            arch = c[0].text_input("Architecture (for a state_dict)", key="add_arch", placeholder="resnet18")
            classes = c[1].text_input("Class list file (optional)", key="add_classes")
            dataset = c[0].selectbox("Dataset its classes come from", ["", "ndsb", "zoolake"], key="add_dataset")
            size = c[1].number_input("Input size (px)", 16, 1024, 224, key="add_size")
            submitted = st.form_submit_button("Add model")
    if submitted:  # the outcome is shown outside the expander, which closes on the next run
        try:
            src = under_allowed_root(path)
            cls = str(under_allowed_root(classes)) if classes.strip() else None
            man = add_model(src, name.strip(), arch=arch.strip() or None, classes=cls, dataset=dataset or None,
                            size=int(size), command=f"python -m models add {src} --name {name.strip()}")
        except (PathNotAllowed, ModelImportError) as e:
            st.error(md_text(e))
        else:
            st.success(f"Added {md_text(man['name'])}: it is in the model picker of every page.")



def _collections_section() -> None:
    """The user's own collections: listed, added from a server path (under the allowed roots)
    or an uploaded zip, removed (data.collections)."""
    from data.collections import CollectionError, add_collection, check_name, remove_collection, user_collections
    from data.paths import PathNotAllowed, under_allowed_root, user_data_dir, writer_temp

    with st.expander("Add a collection of your own images", icon=":material/add_photo_alternate:"):
        st.caption("An EcoTaxa export or import bundle (folder or zip; UVP6 zips of zips too), a folder with one "
                   "sub-folder of images per class, or a folder / zip of unlabelled images. The same as "
                   "`python -m data add NAME PATH`.")
        with st.form("add_collection"):
            c = st.columns(2)
            name = c[0].text_input("Name", key="col_name")
            path = c[1].text_input("Path on the server", key="col_path")
            upload = st.file_uploader(f"…or upload a zip (at most {MAX_UPLOAD_MB} MB)", type=["zip"], key="col_zip")
            submitted = st.form_submit_button("Add collection")
    if submitted:  # the outcome is shown outside the expander, which closes on the next run
        try:
            if upload is not None:
                if upload.size > MAX_UPLOAD_MB * 2**20:
                    raise CollectionError(f"The zip is {upload.size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_MB} MB.")
                folder = user_data_dir() / "collections"
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{check_name(name.strip())}.zip"
                if target.exists():
                    raise CollectionError(f"An uploaded collection named {name.strip()!r} exists already.")
                tmp = writer_temp(target)
                tmp.write_bytes(upload.getvalue())
                tmp.replace(target)
                try:
                    e = add_collection(name.strip(), target)
                except CollectionError:
                    target.unlink(missing_ok=True)
                    raise
            else:
                e = add_collection(name.strip(), under_allowed_root(path))
        except (CollectionError, PathNotAllowed) as err:
            st.error(md_text(err))
        else:
            st.success(f"Added the collection {md_text(name.strip())}: {md_text(e['kind'])}, {e['images']:,} images. Pick it in "
                       "the Classify & explain gallery.")
    entries = user_collections()
    if entries:
        st.dataframe(pd.DataFrame([{"collection": n, "kind": e.get("kind"), "images": e.get("images"), "path": e["path"]}
                                   for n, e in entries.items()]), hide_index=True, width="stretch")
        c = st.columns([3, 1])
        gone = c[0].selectbox("Remove a collection (its files stay)", [""] + list(entries), key="col_remove")
        if c[1].button("Remove", key="col_remove_btn", disabled=not gone):
            remove_collection(gone)
            st.rerun()



def main() -> None:
    """The Home page: the zoo, the datasets, your collections and the pages."""
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
    table = zoo_table()
    models = [m for m in table if "error" not in m]
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
    for m in table:
        if "error" in m:
            st.warning(md_text(f"Model entry {m['name']!r} cannot be used: {m['error']}"), icon=":material/error:")
    _add_model_form()

    st.subheader("Datasets")
    sources = get_sources()
    if not sources:
        dataset_missing_message()
    else:
        if any(src.sample for src in sources.values()):
            st.info("No dataset was found, so the pages show the **NDSB sample shipped with the project** (10 real images "
                    "per class, data/sample). For the full NDSB and ZooLake sets, see the README's *Where the data is "
                    "looked for*.", icon=":material/info:")
        cols = st.columns(len(sources))
        for col, (name, src) in zip(cols, sources.items()):
            info = dataset_info(src)
            col.metric(md_text(name), f"{info['images']:,} images", f"{info['classes']} classes", delta_color="off")
            col.caption(f"{info['format']}: {md_text(info['path'], code=True)} · splits "
                        + ", ".join(f"{md_text(k)} {v:,}" for k, v in info["splits"].items()))
        if "ndsb" in sources:
            st.subheader("NDSB taxonomy")
            frame = sunburst_frame(sources["ndsb"])
            fig = px.sunburst(frame, path=["living", "group", "subgroup", "class"], values="images",
                              color="living", color_discrete_map={"living": "#0072B2", "non-living": "#E69F00", "unknown": "#999999"})
            fig.update_layout(height=620, margin=dict(t=10, l=10, r=10, b=10))
            st.plotly_chart(fig, width="stretch")

    st.subheader("Your collections")
    _collections_section()

    st.subheader("Pages")
    for f, title in [("pages/classify.py", "Classify & explain — per-level predictions and saliency maps"),
                     ("pages/anomalies.py", "Anomalies — out-of-distribution images by logit flatness"),
                     ("pages/neighbourhoods.py", "Neighbourhoods — UMAP map and nearest known images"),
                     ("pages/review.py", "Review — record decisions on flagged images"),
                     ("pages/community.py", "Community — counts per sample, place and time, corrected for the model's errors"),
                     ("pages/clip.py", "CLIP explanations — text prompts that match an image")]:
        try:
            st.page_link(f, label=title)
        except Exception:  # noqa: BLE001 - page not built yet
            pass


run_page(main, "home")
