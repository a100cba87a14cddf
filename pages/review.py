"""Review: go through flagged images and record a decision for each (stored in SQLite, exportable).

Images are flagged by an OOD score above a threshold, by predictions that disagree across
taxonomic levels, or by nearest known images that disagree with the model. The queue, the
store and the exports are plain functions in ``explain/``; this page lays them out.
"""
from __future__ import annotations

import logging
import uuid

import numpy as np
import pandas as pd
import streamlit as st

from explain.embeddings import is_cached
from explain.neighbours import KNN_K, Gallery, image_frame, neighbour_table
from explain.review_store import (DECISION_TEXT, DECISIONS, FLAG_KINDS, Decision, ReviewError, ReviewStore,
                                  flag_by_score, flag_inconsistent, flag_neighbour_disagreement)
from pages.common import (dataset_embeddings, gallery, get_source, logit_scores, md_text, model_with_dataset,
                          run_with_progress, size_choice, thumbnail)

log = logging.getLogger("plankton_lens.review")

POS_KEY = "rv_pos"
KNN_LABEL = f"kNN distance (embedding, k={KNN_K})"


# --- cached data -----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def _frame(model_name: str, sha: str, limit: int | None) -> pd.DataFrame:
    """Per-image predictions, kNN score and neighbour vote (read-only)."""
    return image_frame(model_name, limit)


def _taxonomy_options(dataset: str, levels: tuple[str, ...]) -> list[tuple[str, str]]:
    """(level, name) for every node of the dataset's taxonomy, leaf level first."""
    tax = get_source(dataset).taxonomy()
    return [(lvl, n) for lvl in reversed(levels) for n in tax.names(lvl)]


# --- parts -----------------------------------------------------------------------------------------
def _size_choice(model_name: str, dataset: str) -> int | None:
    return size_choice("rv", is_cached(model_name, dataset), "Images", "Full dataset",
                       "The full dataset needs every image embedded once (minutes on a CPU, then cached).",
                       "This model has not embedded the whole dataset yet (several minutes on a CPU, once).",
                       "Embed the full dataset now")


def _queue(df: pd.DataFrame, levels: tuple[str, ...], scores: dict[str, np.ndarray]) -> tuple[pd.DataFrame, str]:
    """The flagged images under the chosen rule, and a one-line description of the rule."""
    kind = st.radio("Flag images by", list(FLAG_KINDS), format_func=FLAG_KINDS.get, horizontal=True, key="rv_kind")
    pool = st.checkbox("Only images the model never trained on (test split and held-out classes)", value=True,
                       key="rv_pool")
    base = df[(df["split"] == "test") | df["heldout"]] if pool else df
    if kind == "score":
        c = st.columns([2, 1])
        names = [KNN_LABEL, *scores]
        name = c[0].selectbox("OOD score", names, key="rv_score",
                              help="Higher = more anomalous. Logit scores need explain/ood.py.")
        keep = c[1].number_input("Threshold keeps % of validation", 50.0, 99.9, 95.0, step=0.5, key="rv_tpr",
                                 help="Threshold at this percentile of validation images of known classes.")
        values = df["knn_score"].to_numpy() if name == KNN_LABEL else scores[name]
        val = ((df["split"] == "val") & ~df["heldout"]).to_numpy()
        thr = float(np.quantile(values[val], keep / 100)) if val.any() else float(np.quantile(values, keep / 100))
        sub = base.assign(_score=values[base.index.to_numpy()])
        return flag_by_score(sub, "_score", thr, name), f"{name} ≥ {thr:.3f} ({keep:g}th percentile of validation)"
    if kind == "inconsistent":
        return flag_inconsistent(base, levels), "predictions at adjacent levels not on one taxonomy path"
    c = st.columns([1, 2])
    level = c[0].selectbox("Level", list(reversed(levels)), key="rv_level")
    share = c[1].slider("Minimum share of neighbours agreeing", 0.5, 1.0, 0.6, step=0.1, key="rv_share")
    return flag_neighbour_disagreement(base, level, share), f"{KNN_K} nearest known images outvote the model at {level}"


def _item(row: pd.Series, g: Gallery, levels: tuple[str, ...], emb: np.ndarray) -> None:
    """One flagged image: the image, why it is flagged, predictions, vote and neighbours
    (``emb``: embeddings aligned with the review table)."""
    left, right = st.columns([1, 2])
    with left:
        im = thumbnail(row["dataset"], row["relpath"], 192)
        if im is not None:
            st.image(im, width=192)
        st.caption(f"{md_text(row['dataset'] + ':' + row['relpath'], code=True)} ({row['split']} split)  \n"
                   f"dataset label **{md_text(row['class'])}**"
                   + (" (held-out class, unknown to the model)" if row["heldout"] else ""))
        link = {"image": f"{row['dataset']}:{row['relpath']}"}
        st.page_link("pages/classify.py", label="Explain this image", icon=":material/biotech:", query_params=link)
        st.page_link("pages/neighbourhoods.py", label="Show on the map", icon=":material/scatter_plot:", query_params=link)
    with right:
        st.warning(f"**Flagged:** {md_text(row['reason'])}", icon=":material/flag:")
        tab = pd.DataFrame({"level": list(levels),
                            "model predicts": [row[f"pred_{lvl}"] for lvl in levels],
                            "probability": [f"{row[f'pred_conf_{lvl}']:.0%}" for lvl in levels],
                            "neighbour vote": [f"{row[f'vote_{lvl}']} ({row[f'vote_share_{lvl}']:.0%})" for lvl in levels]})
        st.dataframe(tab, hide_index=True, width="stretch")
        st.caption(f"kNN distance {row['knn_score']:.3f} · nearest known image at {row['nn_distance']:.3f}")
        t = neighbour_table(g, emb[int(row.name)], 5)
        cols = st.columns(5)
        for col, r in zip(cols, t.to_dict("records")):
            th = thumbnail(r["dataset"], r["relpath"])
            if th is not None:
                col.image(th, width=80)
            col.caption(f"{md_text(r[levels[-1]])}  \nd = {r['distance']:.3f}")


def _decision_form(row: pd.Series, store: ReviewStore, model_name: str, dataset: str, levels: tuple[str, ...],
                   session: str) -> bool:
    """The decision widgets; returns True when a decision was recorded."""
    opts = _taxonomy_options(dataset, levels)
    with st.form("rv_form", clear_on_submit=True, border=True):
        decision = st.radio("Decision", DECISIONS, format_func=DECISION_TEXT.get, horizontal=True, key="rv_decision")
        pick = st.selectbox("Label (for “Assign a label”)", opts, index=None, key="rv_label",
                            format_func=lambda o: f"{o[1]}  ·  {o[0]}", placeholder="Type to search the taxonomy…",
                            help="Any level: a class when sure, a subgroup or group when not.")
        comment = st.text_area("Comment", key="rv_comment", height=68, placeholder="Optional: what you see")
        submitted = st.form_submit_button("Record decision", type="primary", icon=":material/check:")
    if not submitted:
        return False
    reviewer = (st.session_state.get("rv_reviewer") or "").strip()
    d = Decision(dataset=row["dataset"], relpath=row["relpath"], decision=decision, reviewer=reviewer,
                 label=pick[1] if (pick and decision == "assign_label") else "",
                 label_level=pick[0] if (pick and decision == "assign_label") else "",
                 predicted=str(row[f"pred_{levels[-1]}"]), model=model_name, reason=str(row["reason"]),
                 score=float(row["score"]) if pd.notna(row.get("score")) else None, comment=comment or "", session=session)
    try:
        rid = store.record(d)
    except ReviewError as e:
        st.error(md_text(e))
        return False
    st.session_state["rv_last"] = f"Recorded decision #{rid}: {DECISION_TEXT[decision]}" + (f" → {md_text(d.label)}" if d.label else "") + f" for {md_text(d.relpath)}."
    return True


def _decisions_panel(store: ReviewStore) -> None:
    cur = store.current()
    st.subheader(f"Decisions ({len(cur)} image{'s' if len(cur) != 1 else ''})")
    if cur.empty:
        st.caption(f"No decisions yet. They are stored in `{store.path}`.")
        return
    show = cur[["id", "created", "reviewer", "dataset", "relpath", "decision", "label", "predicted", "comment"]]
    st.dataframe(show.iloc[::-1].head(200), hide_index=True, width="stretch")
    c = st.columns([1, 1, 3])
    c[0].download_button("CSV", data=store.to_csv(include_undone=True), file_name="plankton-lens-reviews.csv",
                         mime="text/csv", icon=":material/download:", key="rv_csv")
    c[1].download_button("EcoTaxa TSV", data=store.to_ecotaxa_tsv(), file_name="plankton-lens-ecotaxa.tsv",
                         mime="text/tab-separated-values", icon=":material/download:", key="rv_tsv",
                         help="Import in EcoTaxa (img_file_name, object_annotation_category, _status, _person_name, _date…).")
    c[2].caption(f"Stored in `{store.path}` (SQLite). The CSV lists every decision including undone ones; "
                 "the EcoTaxa file the current decision per image.")


# --- page ------------------------------------------------------------------------------------------
def main() -> None:
    picked = model_with_dataset("Review", "Flagged images one by one: confirm an anomaly, assign a label, or clear "
                                "it. Decisions are saved at once, survive restarts, can be undone and exported to "
                                "CSV or EcoTaxa.", "review")
    if picked is None:
        return
    model, manifest, model_name, sha, dataset = picked
    levels = tuple(model.levels)
    session = st.session_state.setdefault("rv_session", uuid.uuid4().hex[:12])
    store = ReviewStore()

    top = st.columns([2, 3])
    top[0].text_input("Reviewer", key="rv_reviewer", placeholder="Your name (stored with each decision)")
    with top[1]:
        limit = _size_choice(model_name, dataset)
    if not is_cached(model_name, dataset, limit):
        run_with_progress("Scoring the dataset once…", lambda on_progress: image_frame(model_name, limit, on_progress=on_progress))
    with st.spinner("Loading scores…"):
        df = _frame(model_name, sha, limit)
    g = gallery(model_name, sha, limit)
    scores = logit_scores(model_name, sha, limit, dataset)

    queue, rule = _queue(df, levels, scores)
    hide = st.checkbox("Hide images already reviewed", value=True, key="rv_hide")
    done = store.decided_images()
    if hide and done:
        mask = [(d, r) not in done for d, r in zip(queue["dataset"], queue["relpath"])]
        queue = queue[np.asarray(mask, bool)]
    if st.session_state.get("rv_last"):
        st.success(st.session_state.pop("rv_last"), icon=":material/task_alt:")
    if st.session_state.get("rv_undo_msg"):
        st.info(st.session_state.pop("rv_undo_msg"), icon=":material/undo:")

    st.markdown(f"**{len(queue):,} images to review** — {rule}. {len(done):,} reviewed so far.")
    if queue.empty:
        st.info("Nothing to review under this rule. Try another rule or threshold, or include reviewed images.")
    else:
        pos = min(int(st.session_state.get(POS_KEY, 0)), len(queue) - 1)
        nav = st.columns([1, 1, 4])
        if nav[0].button("Previous", icon=":material/arrow_back:", disabled=pos == 0, key="rv_prev"):
            st.session_state[POS_KEY] = pos - 1
            st.rerun()
        if nav[1].button("Next", icon=":material/arrow_forward:", disabled=pos >= len(queue) - 1, key="rv_next"):
            st.session_state[POS_KEY] = pos + 1
            st.rerun()
        nav[2].caption(f"Image {pos + 1} of {len(queue):,}")
        row = queue.iloc[pos]
        with st.container(border=True):
            _item(row, g, levels, dataset_embeddings(model_name, sha, limit, dataset))
        if _decision_form(row, store, model_name, dataset, levels, session):
            if not hide:
                st.session_state[POS_KEY] = min(pos + 1, len(queue) - 1)
            st.rerun()
    if st.button("Undo my last decision", icon=":material/undo:", key="rv_undo"):
        undone = store.undo(session=session)
        st.session_state["rv_undo_msg"] = ("Nothing to undo in this session." if undone is None else
                                           f"Undid decision #{undone['id']} ({DECISION_TEXT[undone['decision']]} for {md_text(undone['relpath'])}).")
        st.rerun()
    st.divider()
    _decisions_panel(store)


try:
    main()
except Exception as e:  # noqa: BLE001 - never a traceback in the UI; Streamlit's control flow is BaseException
    log.exception("review page failed")
    st.error(f"Something went wrong on this page ({type(e).__name__}: {md_text(e)}). Your recorded decisions are safe.")
