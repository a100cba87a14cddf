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

from explain.neighbours import KNN_K, Gallery, neighbour_table
from explain.review_store import (DECISION_TEXT, DECISIONS, FLAG_KINDS, Decision, ReviewError, ReviewStore,
                                  flag_by_score, flag_inconsistent, flag_neighbour_disagreement)
from pages.common import (ScoredView, collection_annotation, gallery, get_source, md_text, page_fragment, run_page,
                          score_label, scored_collection, thumbnail)

log = logging.getLogger("plankton_lens.review")

POS_KEY = "rv_pos"


def _taxonomy_options(view: ScoredView) -> list[tuple[str, str]]:
    """(level, name) for every node of the model's taxonomy and the collection's own, leaf level first."""
    model = view.lm.classifier
    try:
        tax = get_source(view.collection).taxonomy()
    except Exception:  # noqa: BLE001 - a collection without a readable taxonomy: the model's names only
        tax = None
    out: list[tuple[str, str]] = []
    for lvl in reversed(view.levels):
        names = list(model.class_names[lvl])
        if tax is not None and lvl in getattr(tax, "levels", ()):
            names += [n for n in tax.names(lvl) if n not in set(names) and n != "unlabelled"]
        out += [(lvl, n) for n in names]
    return out


def review_frame(view: ScoredView) -> pd.DataFrame:
    """The scored table's readable images, with ``heldout`` (a class the model was trained
    without) and ``unknown_class`` (a labelled class the model does not know)."""
    df = view.table[view.table["readable"]].copy()
    known = set(view.lm.classifier.class_names[view.levels[-1]])
    df["heldout"] = df["class"].isin(view.lm.manifest.get("heldout") or [])
    df["unknown_class"] = ~df["class"].isin(known) & (df["class"] != "unlabelled")
    return df


def _with_classes(view: ScoredView, row: pd.Series) -> pd.Series:
    """One table row with :func:`review_frame`'s ``heldout`` and ``unknown_class``."""
    row = row.copy()
    row["heldout"] = row["class"] in set(view.lm.manifest.get("heldout") or [])
    row["unknown_class"] = row["class"] not in set(view.lm.classifier.class_names[view.levels[-1]]) and row["class"] != "unlabelled"
    return row


@st.cache_resource(show_spinner=False, max_entries=8)
def _flagged(folder: str, stamp: int, model_key: str, rule: tuple, _view: ScoredView) -> pd.DataFrame:
    """The queue under ``rule`` (kind, only unseen images, the rule's parameters): dataset, relpath,
    score and reason, indexed by table row, highest first. Once per table and rule (read-only,
    shared by sessions): on a million images flagging and its reasons take seconds, not a rerun's share."""
    df = review_frame(_view)
    kind, unseen, *args = rule
    base = df[(df["split"] == "test") | df["heldout"]] if unseen else df
    if kind == "score":
        hit = flag_by_score(base, *args)
    elif kind == "inconsistent":
        hit = flag_inconsistent(base, _view.levels)
    else:
        hit = flag_neighbour_disagreement(base, *args)
    return hit[["dataset", "relpath", "score", "reason"]]


# --- parts -----------------------------------------------------------------------------------------
def _queue(view: ScoredView, df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The flagged images under the chosen rule (:func:`_flagged`: dataset, relpath, score, reason),
    and a one-line description of the rule. ``df``: the scored table (read only)."""
    levels = view.levels
    kind = st.radio("Flag images by", list(FLAG_KINDS), format_func=FLAG_KINDS.get, horizontal=True, key="rv_kind")
    own = view.collection == view.lm.dataset
    unseen = own and st.checkbox("Only images the model never trained on (test split and held-out classes)", value=True,
                                 key="rv_pool")
    folder = view.scored.folder
    key = (str(folder), (folder / "meta.json").stat().st_mtime_ns, view.lm.key)

    def flagged(*rule) -> pd.DataFrame:
        return _flagged(*key, (rule[0], bool(unseen), *rule[1:]), view)

    if kind == "score":
        c = st.columns([2, 1])
        cols = [c_ for c_ in ["knn_score", *view.scored.meta["score_columns"]] if c_ in df and df[c_].notna().any()]
        name = c[0].selectbox("OOD score", cols, key="rv_score", format_func=lambda c_: score_label(c_, levels),
                              help="Higher = more anomalous.")
        keep = c[1].number_input("Threshold keeps % of validation", 50.0, 99.9, 95.0, step=0.5, key="rv_tpr",
                                 help="Threshold at this percentile of the model's own validation images.")
        val = view.scored.validation
        ref = val[name].to_numpy(np.float64) if val is not None and name in val else df[name].to_numpy(np.float64)
        thr = float(np.nanquantile(ref, keep / 100, method="higher"))
        where = "the model's validation images" if val is not None else "this collection (the model has no validation images)"
        return (flagged("score", name, thr, score_label(name, levels)),
                f"{score_label(name, levels)} ≥ {thr:.3f} ({keep:g}th percentile of {where})")
    if kind == "inconsistent":
        return flagged("inconsistent"), "predictions at adjacent levels not on one taxonomy path"
    if f"vote_{levels[-1]}" not in df:
        st.info("This model has no gallery of known images (no training dataset), so there is no neighbour vote.")
        return df.iloc[:0], "no neighbour vote"
    c = st.columns([1, 2])
    level = c[0].selectbox("Level", list(reversed(levels)), key="rv_level")
    share = c[1].slider("Minimum share of neighbours agreeing", 0.5, 1.0, 0.6, step=0.1, key="rv_share")
    return flagged("neighbours", level, float(share)), f"{KNN_K} nearest known images outvote the model at {level}"


def _label_line(row: pd.Series) -> str:
    if row["class"] == "unlabelled":
        note = collection_annotation(row["dataset"], row["relpath"])
        return "no validated label" + (f" · {md_text(note)}" if note else "")
    return f"label **{md_text(row['class'])}**" + (" (held-out class, unknown to the model)" if row["heldout"] else
                                          " (a class the model does not know)" if row["unknown_class"] else "")


def _item(row: pd.Series, g: Gallery | None, levels: tuple[str, ...], emb: np.ndarray) -> None:
    """One flagged image: the image, why it is flagged, predictions, vote and neighbours
    (``emb``: the scored table's embeddings, row ``row.name``)."""
    left, right = st.columns([1, 2])
    with left:
        im = thumbnail(row["dataset"], row["relpath"], 192)
        if im is not None:
            st.image(im, width=192)
        st.caption(f"{md_text(row['dataset'] + ':' + row['relpath'], code=True)} ({row['split']} split)  \n{_label_line(row)}")
        link = {"image": f"{row['dataset']}:{row['relpath']}"}
        st.page_link("pages/classify.py", label="Explain this image", icon=":material/biotech:", query_params=link)
        st.page_link("pages/neighbourhoods.py", label="Show on the map", icon=":material/scatter_plot:", query_params=link)
    with right:
        st.warning(f"**Flagged:** {md_text(row['reason'])}", icon=":material/flag:")
        voted = f"vote_{levels[-1]}" in row
        tab = pd.DataFrame({"level": list(levels),
                            "model predicts": [row[f"pred_{lvl}"] for lvl in levels],
                            "probability": [f"{row[f'pred_conf_{lvl}']:.0%}" for lvl in levels]})
        if voted:
            tab["neighbour vote"] = [f"{row[f'vote_{lvl}']} ({row[f'vote_share_{lvl}']:.0%})" for lvl in levels]
        st.dataframe(tab, hide_index=True, width="stretch")
        if g is None or not np.isfinite(row["knn_score"]):
            return
        st.caption(f"kNN distance {row['knn_score']:.3f} · nearest known image at {row['nn_distance']:.3f}")
        t = neighbour_table(g, np.asarray(emb[int(row.name)], np.float32)[None], 5)
        cols = st.columns(5)
        for col, r in zip(cols, t.to_dict("records")):
            th = thumbnail(r["dataset"], r["relpath"])
            if th is not None:
                col.image(th, width=80)
            col.caption(f"{md_text(r[levels[-1]])}  \nd = {r['distance']:.3f}")


def _decision_form(row: pd.Series, store: ReviewStore, model_name: str, opts: list[tuple[str, str]],
                   levels: tuple[str, ...], session: str, after: dict) -> None:
    """The decision widgets. Submitting records the decision in a callback (:func:`_record`), before
    the page's next run, which then shows the next image: one run per decision, not two."""
    with st.form("rv_form", clear_on_submit=True, border=True):
        st.radio("Decision", DECISIONS, format_func=DECISION_TEXT.get, horizontal=True, key="rv_decision")
        st.selectbox("Label (for “Assign a label”)", opts, index=None, key="rv_label",
                     format_func=lambda o: f"{o[1]}  ·  {o[0]}", placeholder="Type to search the taxonomy…",
                     help="Any level: a class when sure, a subgroup or group when not.")
        st.text_area("Comment", key="rv_comment", height=68, placeholder="Optional: what you see")
        st.form_submit_button("Record decision", type="primary", icon=":material/check:", on_click=_record,
                              args=(row, store, model_name, levels, session, after))
    err = st.session_state.pop("rv_error", None)
    if err:
        st.error(md_text(err))


def _record(row: pd.Series, store: ReviewStore, model_name: str, levels: tuple[str, ...], session: str,
            after: dict) -> None:
    """Record the submitted decision for ``row`` (the image that was on screen); ``after``: the
    queue position to move to when reviewed images stay in the queue."""
    ss = st.session_state
    decision, pick, comment = ss.get("rv_decision") or DECISIONS[0], ss.get("rv_label"), ss.get("rv_comment")
    reviewer = (ss.get("rv_reviewer") or "").strip()
    d = Decision(dataset=row["dataset"], relpath=row["relpath"], decision=decision, reviewer=reviewer,
                 label=pick[1] if (pick and decision == "assign_label") else "",
                 label_level=pick[0] if (pick and decision == "assign_label") else "",
                 predicted=str(row[f"pred_{levels[-1]}"]), model=model_name, reason=str(row["reason"]),
                 score=float(row["score"]) if pd.notna(row.get("score")) else None, comment=comment or "", session=session)
    try:
        rid = store.record(d)
    except ReviewError as e:
        ss["rv_error"] = str(e)
        return
    ss["rv_last"] = f"Recorded decision #{rid}: {DECISION_TEXT[decision]}" + (f" → {md_text(d.label)}" if d.label else "") + f" for {md_text(d.relpath)}."
    ss.pop("rv_current", None)
    if after.get("pos") is not None:
        ss[POS_KEY] = after["pos"]


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


def _reference_limit() -> int | None:
    from explain.score import reference_limit

    return reference_limit()


def _bundle_panel(view: ScoredView) -> None:
    """Export the scored and reviewed collection as an EcoTaxa import bundle (zip)."""
    st.subheader("Back to EcoTaxa")
    st.caption("An EcoTaxa import bundle of the whole collection: the model's label per image (status predicted, "
               "or validated / dubious from the decisions above), its probability at every level and its OOD scores "
               "as object_pl_* columns, and an EcoTaxa collection's own columns unchanged.")
    images = st.checkbox("Include the images", value=False, key="rv_bundle_images")
    if st.button("Build the bundle", icon=":material/archive:", key="rv_bundle"):
        import tempfile
        from pathlib import Path

        from explain.score import export

        with st.spinner("Writing the bundle…"), tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"ecotaxa_{view.collection}.zip"
            info = export(view.lm.name, view.collection, out, images=images)
            st.session_state["rv_bundle_bytes"] = (view.collection, out.read_bytes(), info["rows"], len(info.get("skipped") or []))
    got = st.session_state.get("rv_bundle_bytes")
    if got and got[0] == view.collection:
        st.download_button(f"Download the bundle ({got[2]:,} objects" + (f", {got[3]} left out" if got[3] else "") + ")",
                           data=got[1], file_name=f"ecotaxa_{view.collection}.zip", mime="application/zip",
                           icon=":material/download:", key="rv_bundle_dl")


# --- page ------------------------------------------------------------------------------------------
def main() -> None:
    view = scored_collection("Review", "Flagged images one by one: confirm an anomaly, assign a label, or clear it. "
                             "Decisions are saved at once, survive restarts, can be undone and exported to CSV, "
                             "EcoTaxa TSV or an EcoTaxa import bundle with the model's scores.")
    if view is None:
        return
    model_name = view.lm.name
    session = st.session_state.setdefault("rv_session", uuid.uuid4().hex[:12])
    store = ReviewStore()
    st.text_input("Reviewer", key="rv_reviewer", placeholder="Your name (stored with each decision)")
    df = view.table  # read-only; the queue (its readable images flagged) is cached by _flagged
    g = gallery(model_name, view.lm.sha256, _reference_limit()) if view.lm.dataset else None
    queue, rule = _queue(view, df)
    hide = st.checkbox("Hide images already reviewed", value=True, key="rv_hide")
    _review_panel(view, queue, rule, g, store, session, hide)
    _bundle_panel(view)


@page_fragment("review", "Your recorded decisions are safe.")
def _review_panel(view: ScoredView, queue: pd.DataFrame, rule: str, g: Gallery | None, store: ReviewStore,
                  session: str, hide: bool) -> None:
    """The image on screen, its decision form, navigation, undo and the decisions so far. A
    fragment: recording a decision or moving through the queue reruns this panel only, not the
    page (its scored table, rule widgets, export panel and sidebar)."""
    model_name, levels = view.lm.name, view.levels
    done = store.decided_images()
    shown = st.session_state.get("rv_current")  # the image this reviewer has in front of them
    if hide and done:
        # The image on screen stays in the queue for this run even when another reviewer decided it
        # meanwhile: a decision submitted for it is recorded, never dropped.
        mask = np.ones(len(queue), bool)
        near = np.flatnonzero(queue["relpath"].isin({r for _, r in done}).to_numpy())  # few: the pairs checked there
        mask[near] = [(d, r) not in done or (d, r) == shown
                      for d, r in zip(queue["dataset"].to_numpy()[near], queue["relpath"].to_numpy()[near])]
        queue = queue[mask]
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
        nav[0].button("Previous", icon=":material/arrow_back:", disabled=pos == 0, key="rv_prev", on_click=_move_to,
                      args=(pos - 1,))
        nav[1].button("Next", icon=":material/arrow_forward:", disabled=pos >= len(queue) - 1, key="rv_next",
                      on_click=_move_to, args=(pos + 1,))
        nav[2].caption(f"Image {pos + 1} of {len(queue):,}")
        q = queue.iloc[pos]
        row = _with_classes(view, pd.concat([view.table.loc[queue.index[pos]], q[["score", "reason"]]]))
        row.name = queue.index[pos]
        st.session_state["rv_current"] = (row["dataset"], row["relpath"])
        if (row["dataset"], row["relpath"]) in done:
            st.info("Another decision was recorded for this image while it was on your screen; yours is added "
                    "beside it (every decision is kept).", icon=":material/group:")
        with st.container(border=True):
            _item(row, g, levels, view.scored.embeddings)
        _decision_form(row, store, model_name, _taxonomy_options(view), levels, session,
                       {"pos": None if hide else min(pos + 1, len(queue) - 1)})
    st.button("Undo my last decision", icon=":material/undo:", key="rv_undo", on_click=_undo, args=(store, session))
    st.divider()
    _decisions_panel(store)


# Callbacks run before the next run of the panel, so it draws the new state at once (no st.rerun).
def _move_to(pos: int) -> None:
    st.session_state[POS_KEY] = pos


def _undo(store: ReviewStore, session: str) -> None:
    try:
        undone = store.undo(session=session)
    except Exception as e:  # noqa: BLE001 - a locked or unreadable store: say so; nothing was changed
        logging.getLogger("plankton_lens.review").exception("undo failed")
        st.session_state["rv_undo_msg"] = f"Could not undo ({type(e).__name__}: {md_text(e)}); your decisions are unchanged."
        return
    st.session_state["rv_undo_msg"] = ("Nothing to undo in this session." if undone is None else
                                       f"Undid decision #{undone['id']} ({DECISION_TEXT[undone['decision']]} for {md_text(undone['relpath'])}).")


run_page(main, "review", "Your recorded decisions are safe.")
