"""Plankton Lens data layer: datasets as published, a biologist's own collections, taxonomy, splits,
image decoding."""
from .archive import CollectionError
from .collections_io import detect_collection, open_collection
from .decode import DecodedImage, ImageDecodeError, decode_image, fit_square, load_for_model
from .manifest import build_manifest, decoded_array
from .paths import WHERE_TO_GET, cache_dir, datasets_root, user_data_dir
from .sources import DatasetNotFound, Source, available_sources, open_source
from .splits import heldout_classes, stratified_split
from .taxonomy import LEVELS, Taxonomy, TaxonomyError, load_taxonomy

__all__ = [
    "DecodedImage", "ImageDecodeError", "decode_image", "fit_square", "load_for_model",
    "build_manifest", "decoded_array", "WHERE_TO_GET", "cache_dir", "datasets_root", "user_data_dir",
    "DatasetNotFound", "Source", "available_sources", "open_source", "heldout_classes",
    "stratified_split", "LEVELS", "Taxonomy", "TaxonomyError", "load_taxonomy",
    "CollectionError", "detect_collection", "open_collection",
]
