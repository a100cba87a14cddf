"""The one image picker of the pages that explain one image (Classify & explain, CLIP
explanations, Neighbourhoods): an image of the sidebar's collection (a gallery of thumbnails),
an upload, or a deep link ``?image=<collection>:<relative path>``.

Plain functions (no Streamlit call): :func:`parse_link`, :func:`link_problem` and
:func:`decode_upload`. The rest lays out widgets; their keys come from :mod:`pages.state`. Text
from users and links (link values, file names, class names) goes through :func:`md_text`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from data.decode import MAX_ASPECT, ImageDecodeError, fit_square, keeps_colour, load_for_model
from data.folders import UNLABELLED
from pages.common import (DISPLAY_PX, collection_annotation, get_manifest, get_sources, image_key, md_text,
                          read_image_bytes, thumbnail)
from pages.state import PickerKeys

log = logging.getLogger("plankton_lens.image_picker")

UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"]
GALLERY, UPLOADS = "Dataset gallery", "Upload images"  # the image source switch
MAX_LINK_CHARS = 2000  # a longer ?image= value is refused (a relative path is far shorter)
SHOWN_LINK_CHARS = 200  # a refused value is shown cut to this length


# --- plain functions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLink:
    """A parsed deep-link value ``<collection>:<relative path>``."""

    collection: str
    relpath: str

    @property
    def value(self) -> str:
        """The ``?image=`` value of this image."""
        return f"{self.collection}:{self.relpath}"


def parse_link(value: object) -> ImageLink | None:
    """``"<collection>:<relative path>"`` (surrounding blanks ignored) → :class:`ImageLink`; None
    when it is not of that form (no ``:``, an empty side, not text, or over :data:`MAX_LINK_CHARS`)."""
    if not isinstance(value, str) or len(value) > MAX_LINK_CHARS:
        return None
    coll, sep, rel = value.strip().partition(":")
    return ImageLink(coll, rel) if sep and coll and rel else None


def malformed_link_message(value: str) -> str:
    """Markdown: ``value`` (shown as text, cut when very long) is not a deep link."""
    text = value if len(value) <= SHOWN_LINK_CHARS else value[:SHOWN_LINK_CHARS] + "…"
    return f"The link {md_text('?image=' + text, code=True)} is not of the form `?image=<dataset>:<relative path>`."


def link_problem(value: str, collections: Collection[str], has_image: Callable[[str, str], bool]) -> str | None:
    """Why the deep link ``value`` cannot be opened (Markdown, user text escaped), or None when it
    can: it must parse (:func:`parse_link`), name one of ``collections`` and an image of it
    (``has_image(collection, relpath)``, asked only for a known collection)."""
    link = parse_link(value)
    if link is None:
        return malformed_link_message(str(value))
    if link.collection not in collections:
        return md_text(f"The link names the dataset {link.collection!r}, which is not available here "
                       f"(known: {', '.join(collections) or 'none'}).")
    if not has_image(link.collection, link.relpath):
        return md_text(f"The link points to {link.relpath!r}, but there is no image at that path in the "
                       f"{link.collection} dataset.")
    return None


@dataclass
class PickedImage:
    """One image ready for a model: from a collection (``collection`` and ``relpath``) or an upload
    (``upload_name``)."""

    key: str  # stable id: sha1 of the model input (pages.common.image_key)
    fg: np.ndarray  # uint8 model input (S, S) or (S, S, 3), foreground polarity
    display: Image.Image  # square RGB image in its original polarity, display_px wide
    notes: tuple[str, ...] = ()  # decoding notes
    collection: str | None = None
    relpath: str | None = None
    upload_name: str | None = None
    truth: str | None = None  # true leaf class (a validated label) when known
    annotation: str | None = None  # a collection's label that is not ground truth, e.g. "EcoTaxa's prediction: X"

    @property
    def link(self) -> str | None:
        """The ``?image=`` value of a collection image (None for an upload)."""
        return None if self.collection is None else f"{self.collection}:{self.relpath}"

    @property
    def label(self) -> str:
        """The deep-link value of a collection image, else the upload's file name."""
        return self.link or self.upload_name or ""

    @property
    def name(self) -> str:
        """The file name alone (an upload's name as given)."""
        return self.relpath.rsplit("/", 1)[-1] if self.relpath else (self.upload_name or "")


class UploadError(ValueError):
    """An uploaded file that is not a usable image; ``markdown`` says so with its name escaped."""

    def __init__(self, name: str, message: str, reason: str | None = None):
        super().__init__(f"{name}: {message}")
        self.name, self.message, self.reason = name, message, reason

    @property
    def markdown(self) -> str:
        if self.reason:  # an unexpected decoder failure: its exception type
            return f"**{md_text(self.name)}** could not be read as an image ({md_text(self.reason)})."
        return f"**{md_text(self.name)}**: {md_text(self.message)}"


def decode_upload(name: str, data: bytes, size: int, colour: bool = False, display_px: int = DISPLAY_PX) -> PickedImage:
    """An uploaded file as a model's ``size``-pixel input (in colour when ``colour``), its background
    estimated from the border and elongated images cropped (:data:`data.decode.MAX_ASPECT`).
    Raises :class:`UploadError` for an empty, broken, foreign or unsupported file."""
    try:
        fg, dec, square = load_for_model(data, int(size), mode="L", max_aspect=MAX_ASPECT, colour=colour)
    except ImageDecodeError as e:
        raise UploadError(name, e.message) from e
    except Exception as e:  # noqa: BLE001 - any decoder surprise is still a bad upload
        log.exception("upload %s", name)
        raise UploadError(name, "could not be read as an image", type(e).__name__) from e
    disp = fit_square(square.convert("RGB"), display_px, 255)
    return PickedImage(image_key(fg), fg, disp, tuple(dec.notes), upload_name=name)


# --- collection images -------------------------------------------------------------------------------
def has_image(collection: str, relpath: str) -> bool:
    """Whether ``relpath`` is an image of the known ``collection``."""
    return bool((get_manifest(collection)["relpath"] == relpath).any())


def open_image(collection: str, relpath: str, size: int, display_px: int = DISPLAY_PX,
               preprocessing: dict | None = None) -> PickedImage | None:
    """Decode an image of a collection at the model's input ``size`` (in colour when the model's
    ``preprocessing`` keeps it, :func:`data.decode.keeps_colour`), or show why it cannot be (None)."""
    sources = get_sources()
    if collection not in sources:
        st.error(md_text(f"The dataset {collection!r} is not available here (known: {', '.join(sources) or 'none'})."))
        return None
    man = get_manifest(collection)
    row = man.loc[man["relpath"] == relpath]
    if row.empty:
        st.error(md_text(f"There is no image {relpath!r} in the {collection} dataset."))
        return None
    src = sources[collection]
    try:
        fg, dec, _ = load_for_model(read_image_bytes(collection, relpath), int(size), mode=src.mode,
                                    background=src.background, colour=keeps_colour(preprocessing or {}, src.mode))
    except (ImageDecodeError, FileNotFoundError) as e:
        st.error(md_text(f"{relpath}: {getattr(e, 'message', e)}"))
        return None
    disp = fit_square(dec.image, display_px, src.background).convert("RGB")
    cls = str(row.iloc[0]["class"])
    return PickedImage(image_key(fg), fg, disp, tuple(dec.notes), collection=collection, relpath=relpath,
                       truth=None if cls == UNLABELLED else cls, annotation=collection_annotation(collection, relpath))


# --- widgets -------------------------------------------------------------------------------------------
def take_link(keys: PickerKeys) -> None:
    """A new ``?image=`` value becomes the page's gallery selection (and switches the source to the
    gallery), or shows why it cannot (the value is then dropped from the address)."""
    value = st.query_params.get("image")
    if not value or value == st.session_state.get(keys.link):
        return
    problem = link_problem(value, list(get_sources()), has_image)
    if problem:
        st.error(problem, icon=":material/link_off:")
        del st.query_params["image"]
        return
    link = parse_link(value)
    st.session_state[keys.selected] = (link.collection, link.relpath)
    st.session_state[keys.link] = value
    st.session_state[keys.source] = GALLERY


def select(keys: PickerKeys, collection: str, relpath: str) -> None:
    """Choose a collection image (a gallery button's callback): it is kept and linked in the address."""
    st.session_state[keys.selected] = (collection, relpath)
    link = f"{collection}:{relpath}"
    st.session_state[keys.link] = link
    st.query_params["image"] = link


def selection(keys: PickerKeys, size: int, preprocessing: dict | None = None,
              display_px: int = DISPLAY_PX) -> PickedImage | None:
    """The page's chosen collection image, decoded (None when there is none or it cannot be read)."""
    sel = st.session_state.get(keys.selected)
    return open_image(*sel, size, display_px, preprocessing) if sel else None


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def gallery_seed(keys: PickerKeys) -> int:
    """How often this page's gallery was shuffled (the seed of its random pick)."""
    return int(st.session_state.get(keys.seed, 0))


def _shuffle(keys: PickerKeys) -> None:
    st.session_state[keys.seed] = gallery_seed(keys) + 1


def thumbnails(keys: PickerKeys, collection: str, shown: pd.DataFrame, captions: dict[str, str] | None = None,
               button: str = "Explain") -> None:
    """A row of thumbnails of ``shown`` (columns ``relpath`` and ``class``) with a ``button`` each that
    selects the image, and a Shuffle button. The first is selected until the user (or a link) chooses.
    ``captions``: Markdown lines under some thumbnails, by relative path."""
    if shown.empty:
        return
    captions = captions or {}
    sel = st.session_state.get(keys.selected)
    if sel is None or not st.session_state.get(keys.link):
        sel = (collection, shown.iloc[0]["relpath"])
        st.session_state[keys.selected] = sel
    cols = st.columns(12)
    for i, (rel, name) in enumerate(zip(shown["relpath"], shown["class"])):
        with cols[i % 12]:
            th = thumbnail(collection, rel)
            if th is None:
                st.caption("unreadable")
            else:
                st.image(th, width="stretch")
            st.button(button, key=f"{keys.pick}_{i}", on_click=select, args=(keys, collection, rel), width="stretch",
                      type="primary" if sel == (collection, rel) else "secondary", help=md_text(f"{name} · {rel}"))
            st.caption(md_text(_short(name)) + (f"  \n{captions[rel]}" if rel in captions else ""))
    st.button("Shuffle", icon=":material/shuffle:", key=keys.shuffle, on_click=_shuffle, args=(keys,))


def upload_widget(label: str, key: str, multiple: bool = False, help: str | None = None):
    """The file uploader of an image upload (the types :func:`decode_upload` reads)."""
    return st.file_uploader(label, type=UPLOAD_TYPES, accept_multiple_files=multiple, key=key, help=help)


def uploads(keys: PickerKeys, size: int, colour: bool = False, prompt: str = "Upload one or more plankton images.",
            display_px: int = DISPLAY_PX) -> list[PickedImage]:
    """Upload one or several images; a bad file gets a message each, the others are returned."""
    files = upload_widget("Images (PNG, JPEG, TIFF, BMP)", keys.uploads, multiple=True,
                          help="Background (dark-field or shadowgraph) is detected from the border.")
    if not files:
        st.info(prompt)
        return []
    good = []
    for f in files:
        try:
            good.append(decode_upload(f.name, f.getvalue(), size, colour, display_px))
        except UploadError as e:
            st.error(e.markdown, icon=":material/broken_image:")
    return good


def choose_upload(keys: PickerKeys, good: list[PickedImage]) -> PickedImage | None:
    """The upload to explain: the only one, or the one chosen among several."""
    if len(good) <= 1:
        return good[0] if good else None
    i = st.selectbox("Explain", range(len(good)), format_func=lambda k: good[k].label, key=keys.upload_pick)
    return good[i]


def pick(keys: PickerKeys, gallery: Callable[[], PickedImage | None],
         upload: Callable[[], PickedImage | None]) -> PickedImage | None:
    """The page's image: a deep link is taken first (:func:`take_link`), then the source switch
    shows the page's ``gallery`` (in a bordered box) or its ``upload`` (the deep link is dropped)."""
    take_link(keys)
    source = st.radio("Image source", [GALLERY, UPLOADS], horizontal=True, key=keys.source,
                      label_visibility="collapsed")
    if source == GALLERY:
        with st.container(border=True):
            return gallery()
    if "image" in st.query_params:
        del st.query_params["image"]
    st.session_state[keys.link] = None
    return upload()
