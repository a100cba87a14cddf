"""The collection registry: the known datasets plus a biologist's own collections, by name.

    python -m data add NAME PATH [--polarity dark-on-light|light-on-dark] [--background LEVEL]
    python -m data remove NAME
    python -m data info

A user collection is a folder or zip on this machine (an EcoTaxa import bundle or export, an
ImageFolder, a flat folder of unlabelled images), registered under a name in
``$PLANKTON_LENS_DATA/collections.json`` and then opened by :func:`data.sources.open_source`
like NDSB or ZooLake, so every page and command can use it. Registering checks that the path
exists, that its content is a collection and that it lists images; nothing is registered
otherwise. From the dashboard a path must also lie under the allowed roots
(:func:`data.paths.under_allowed_root`).
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import threading
from pathlib import Path

from .archive import CollectionError, check_path
from .paths import user_data_dir, writer_temp
from .sources import DatasetNotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = ("ndsb", "zoolake", "imagefolder", "ecotaxa")
POLARITIES = ("dark-on-light", "light-on-dark")
_LOCK = threading.Lock()


def registry_path() -> Path:
    return user_data_dir() / "collections.json"


def _read() -> dict[str, dict]:
    p = registry_path()
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and "path" in v} if isinstance(data, dict) else {}


def _write(entries: dict[str, dict]) -> None:
    p = registry_path()
    tmp = writer_temp(p)
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    tmp.replace(p)


def user_collections() -> dict[str, dict]:
    """Registered user collections: name → {path, kind, added, overrides}."""
    return _read()


def check_name(name: str) -> str:
    """``name`` when it can name a collection (and a file), else CollectionError."""
    if not NAME_RE.match(name or "") or name in RESERVED:
        raise CollectionError(f"{name!r} is not a usable collection name: letters, digits, '.', '_' and '-' "
                              f"(at most 64), and none of {', '.join(RESERVED)}.")
    return name


def add_collection(name: str, path: str | Path, *, polarity: str | None = None, background: int | None = None) -> dict:
    """Register ``path`` as collection ``name`` (see the module docstring); returns its entry."""
    from .sources import open_path

    check_name(name)
    if polarity is not None and polarity not in POLARITIES:
        raise CollectionError(f"polarity must be one of {', '.join(POLARITIES)}")
    if background is not None and not 0 <= int(background) <= 255:
        raise CollectionError("background must be a grey level from 0 to 255")
    try:
        p = check_path(path).resolve()
    except (DatasetNotFound, OSError) as e:  # CollectionError is a DatasetNotFound
        raise CollectionError(str(e)) from None
    overrides = {k: v for k, v in (("polarity", polarity), ("background", background)) if v is not None}
    from .taxonomy import TaxonomyError

    try:
        src = open_path(name, p, overrides)
        n = len(src.files())
        src.taxonomy()
    except (DatasetNotFound, TaxonomyError, OSError, UnicodeError) as e:
        raise CollectionError(f"{p} cannot be used as a collection: {e}") from None
    with _LOCK:
        entries = _read()
        if name in entries:
            raise CollectionError(f"A collection named {name!r} exists already ({entries[name]['path']}): "
                                  f"remove it first (python -m data remove {name}) or choose another name.")
        entry = {"path": str(p), "kind": src.kind, "images": n, "overrides": overrides,
                 "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        entries[name] = entry
        _write(entries)
    return entry


def remove_collection(name: str) -> dict:
    """Unregister a user collection (its files are not touched)."""
    with _LOCK:
        entries = _read()
        if name not in entries:
            raise CollectionError(f"No user collection named {name!r} ({', '.join(entries) or 'none registered'}).")
        entry = entries.pop(name)
        _write(entries)
    return entry
