"""Where datasets and caches live.

Datasets are looked for in ``$PLANKTON_DATASETS`` (a folder holding ``ndsb/ndsb_train.zip`` and
``zoolake/zoolake_v1.zip``, or their extracted folders); when it is unset, in ``../shared/datasets``
next to the repository if that folder exists. Derived artefacts (manifests, decoded arrays,
embeddings, UMAP maps, FAISS indexes) go to ``$PLANKTON_LENS_CACHE`` (default
``~/.cache/plankton-lens``). User data (review decisions) go to ``$PLANKTON_LENS_DATA``
(default ``~/.local/share/plankton-lens``).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

WHERE_TO_GET = """No plankton dataset was found.
Plankton Lens looks in $PLANKTON_DATASETS, else in ../shared/datasets beside the repository.
That folder should hold:
  ndsb/ndsb_train.zip      NDSB 2015 / PlanktonSet 1.0 training set (train/<class>/<id>.jpg).
                           Get it from NOAA NCEI, accession 0127422 ("PlanktonSet 1.0",
                           Cowen et al. 2015), or the 2015 National Data Science Bowl train.zip.
  zoolake/zoolake_v1.zip   ZooLake v1 (images/<class>/<file>.jpeg), Eawag open data,
                           Kyathanahally et al. 2021, Front. Microbiol. 12:746297.
Extracted folders (ndsb/train/, zoolake/images/) work too. Then:
  export PLANKTON_DATASETS=/path/to/that/folder"""


def datasets_root() -> Path | None:
    """The folder holding the datasets, or None when none is configured or present."""
    env = os.environ.get("PLANKTON_DATASETS")
    if env:
        p = Path(env).expanduser()
        if not p.is_absolute():
            p = (Path.cwd() / p).resolve()
        return p if p.is_dir() else None
    default = REPO_ROOT.parent / "shared" / "datasets"
    return default if default.is_dir() else None


def writer_temp(path: Path) -> Path:
    """A temporary name beside ``path``, hidden, with its suffix, unique to this process and
    thread: write it, then ``replace`` it onto ``path``. Two writers of the same cache file (the
    server's warm-up thread and a page run, two browser sessions) then never clash, and readers
    never see half a file."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")


def cache_dir() -> Path:
    """Folder for derived, rebuildable artefacts."""
    p = Path(os.environ.get("PLANKTON_LENS_CACHE", Path.home() / ".cache" / "plankton-lens"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def user_data_dir() -> Path:
    """Folder for a user's own work (review decisions); never deleted by the app."""
    p = Path(os.environ.get("PLANKTON_LENS_DATA", Path.home() / ".local" / "share" / "plankton-lens"))
    p.mkdir(parents=True, exist_ok=True)
    return p


class PathNotAllowed(ValueError):
    """A server path outside the roots the operator allowed (``PLANKTON_LENS_ROOTS``)."""


def allowed_roots() -> list[Path]:
    """Folders under which the dashboard may read a path typed by a visitor: ``$PLANKTON_LENS_ROOTS``
    (``:``-separated), default the datasets folder and the user data folder."""
    env = [p for p in os.environ.get("PLANKTON_LENS_ROOTS", "").split(os.pathsep) if p]
    roots = [Path(p).expanduser() for p in env] if env else [r for r in (datasets_root(), user_data_dir()) if r]
    out = []
    for r in roots:
        try:
            out.append(r.resolve())
        except OSError:
            continue
    return out


def under_allowed_root(path: str | Path) -> Path:
    """``path`` resolved (symlinks followed) when it lies under an allowed root, else PathNotAllowed
    with a message; ``..``, a symlink out of a root and absolute paths elsewhere are all refused."""
    text = str(path).strip()
    if not text:
        raise PathNotAllowed("No path given.")
    try:
        p = Path(text).expanduser()
        resolved = p.resolve() if p.is_absolute() else p.resolve()
    except (OSError, RuntimeError) as e:
        raise PathNotAllowed(f"The path cannot be used: {getattr(e, 'strerror', None) or e}.") from None
    roots = allowed_roots()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise PathNotAllowed("That path is outside the folders this server may read ("
                             + ", ".join(str(r) for r in roots) + "). An operator can allow more with PLANKTON_LENS_ROOTS.")
    return resolved
