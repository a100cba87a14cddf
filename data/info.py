"""Dataset summaries (plain functions shared by the CLI and the dashboard)."""
from __future__ import annotations

import pandas as pd

from .manifest import build_manifest
from .sources import Source, available_sources
from .folders import UNLABELLED
from .taxonomy import LEVELS


def dataset_info(src: Source, progress: bool = False) -> dict:
    """Image and class counts, per-level counts, split sizes and taxonomy depth of one dataset."""
    df = build_manifest(src, progress=progress)
    tax = src.taxonomy()
    return {
        "path": str(src.root),
        "format": ("sample shipped with the project, " if src.sample else "") + ("zip" if src.is_zip else "folder"),
        "sample": bool(src.sample),
        "kind": src.kind,
        "labelled": int((df["class"] != UNLABELLED).sum()),
        "problems": len(getattr(src, "problems", []) or []),
        "images": int(len(df)),
        "classes": int(df["class"].nunique()),
        "levels": {lvl: int(df[lvl].nunique()) for lvl in LEVELS},
        "splits": {k: int(v) for k, v in df["split"].value_counts().sort_index().items()},
        "taxonomy_depth": len(tax.levels),
        "taxonomy_version": tax.version,
        "images_per_class": {"min": int(df["class"].value_counts().min()), "max": int(df["class"].value_counts().max())},
    }


def all_info(progress: bool = False) -> dict:
    """:func:`dataset_info` of every available dataset and collection; one that cannot be read
    gives ``{"error": message, "path": …}`` instead (never a traceback)."""
    out = {}
    for name, src in available_sources().items():
        try:
            out[name] = dataset_info(src, progress)
        except (ValueError, OSError) as e:  # TaxonomyError, DatasetNotFound, a damaged archive
            out[name] = {"error": str(e), "path": str(src.root)}
    return out


def sunburst_frame(src: Source) -> pd.DataFrame:
    """Image counts per taxonomy path, for a sunburst chart."""
    df = build_manifest(src, progress=False)
    return df.groupby(list(LEVELS), as_index=False).size().rename(columns={"size": "images"})
