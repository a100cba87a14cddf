"""The one namespace of ``st.session_state``: the keys every page shares, and each page's prefix.

Shared keys (the sidebar's model and collection) are constants here; a page's own keys are
``key(page, name)``, i.e. ``"<prefix>_<name>"`` with the page's prefix from :data:`PREFIXES`
(``key("classify", "selected")`` → ``"classify_selected"``). A few widget keys that predate this
module and that tests address keep their bare names (:data:`CLASSIFY_PICKER`). This module has no
Streamlit import: it only names keys.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- shared by every page (the sidebar) -------------------------------------------------------------
MODEL = "model_name"  #: the model chosen in the sidebar (pages.common.model_picker)
MODEL_WIDGET = "_model_select"  #: its selectbox
MODEL_LINKED = "_model_linked"  #: the ``?model=`` value already applied
COLLECTION = "collection"  #: the collection chosen in the sidebar (pages.common.collection_picker)
COLLECTION_WIDGET = "_collection_select"  #: its selectbox
COLLECTION_LINKED = "_collection_linked"  #: the ``?collection=`` value already applied
CLIP_MODEL = "clip_model_name"  #: the CLIP explanations page's own model picker

#: Each page's prefix for its own keys.
PREFIXES = {
    "classify": "classify",  # Classify & explain (its gallery's widgets keep the older "g_" / bare keys)
    "clip": "clip",  # CLIP explanations
    "neighbourhoods": "nb",  # Neighbourhoods
    "review": "rv",  # Review
    "anomalies": "ood",  # Anomalies
    "community": "cm",  # Community
}


def key(page: str, name: str) -> str:
    """The session-state key of ``name`` on ``page`` (a key of :data:`PREFIXES`, or a prefix itself)."""
    if not name:
        raise ValueError("a session-state key needs a name")
    return f"{PREFIXES.get(page, page)}_{name}"


@dataclass(frozen=True)
class PickerKeys:
    """The session-state and widget keys of one page's image picker (:mod:`pages.image_picker`)."""

    page: str
    source: str  # radio: gallery or uploads
    uploads: str  # file uploader
    upload_pick: str  # which upload to explain (several uploaded)
    pick: str  # prefix of the gallery's buttons: pick + index
    seed: str  # the gallery's shuffle count
    shuffle: str  # the shuffle button
    selected: str  # (collection, relpath) of the chosen gallery image
    link: str  # the ``?image=`` value already applied (None once the user uploads)


def picker_keys(page: str, **older: str) -> PickerKeys:
    """A page's picker keys, ``key(page, …)`` unless ``older`` names them."""
    names = {f: key(page, f) for f in ("source", "uploads", "upload_pick", "pick", "seed", "shuffle", "selected")}
    names["link"] = key(page, "last_link")
    return PickerKeys(page=page, **{**names, **older})


#: Classify & explain: its widget keys predate the prefixes (tests and bookmarks use them).
CLASSIFY_PICKER = picker_keys("classify", source="source", uploads="uploads", upload_pick="upload_pick", pick="pick",
                              seed="g_seed", shuffle="g_shuffle")
#: CLIP explanations.
CLIP_PICKER = picker_keys("clip", uploads="clip_upload")
