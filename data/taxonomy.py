"""Taxonomy tables: every dataset class mapped to a path of named levels.

Level 1 ``living``: living / non-living / unknown. Level 2 ``group``: major group. Level 3
``subgroup``: finer group. Level 4 ``class``: the dataset's own class. One CSV per dataset in
``data/`` (``taxonomy_<dataset>.csv``), versioned by the sha256 of its bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

LEVELS: tuple[str, ...] = ("living", "group", "subgroup", "class")
DATA_DIR = Path(__file__).resolve().parent


class TaxonomyError(ValueError):
    """A taxonomy table that is incomplete or inconsistent."""


@dataclass(frozen=True)
class Taxonomy:
    """Class → path table with index helpers. Names at each level are sorted alphabetically."""

    name: str
    table: pd.DataFrame  # columns LEVELS, one row per leaf class, sorted by class
    version: str  # sha256 prefix of the source CSV
    levels: tuple[str, ...] = LEVELS
    _names: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for lvl in self.levels:
            self._names[lvl] = sorted(self.table[lvl].unique().tolist())

    @property
    def classes(self) -> list[str]:
        return self._names["class"]

    def names(self, level: str) -> list[str]:
        """Sorted node names at ``level``."""
        return self._names[level]

    def path(self, cls: str) -> dict[str, str]:
        """The path of a leaf class, e.g. {"living": "living", "group": "crustaceans", ...}."""
        row = self.table.loc[self.table["class"] == cls]
        if row.empty:
            raise KeyError(f"class {cls!r} is not in taxonomy {self.name!r}")
        return {lvl: str(row.iloc[0][lvl]) for lvl in self.levels}

    def parent(self, level: str, name: str) -> str | None:
        """The parent node of ``name`` at ``level`` (None at the root level)."""
        i = self.levels.index(level)
        if i == 0:
            return None
        rows = self.table.loc[self.table[level] == name, self.levels[i - 1]]
        return str(rows.iloc[0])

    def leaf_to_level(self, level: str) -> np.ndarray:
        """Index array mapping each leaf class index to its node index at ``level``."""
        names = {n: i for i, n in enumerate(self.names(level))}
        col = self.table.set_index("class").loc[self.classes] if level != "class" else None
        if col is None:
            return np.arange(len(self.classes))
        return np.array([names[v] for v in col[level]], dtype=np.int64)

    def level_matrix(self, level: str) -> np.ndarray:
        """0/1 matrix (n_leaf × n_nodes) summing leaf probabilities into ``level`` nodes."""
        idx = self.leaf_to_level(level)
        m = np.zeros((len(self.classes), len(self.names(level))), dtype=np.float32)
        m[np.arange(len(idx)), idx] = 1.0
        return m

    def child_to_parent(self, level: str) -> np.ndarray:
        """Index array mapping each node at ``level`` to its parent's index (level above)."""
        i = self.levels.index(level)
        up = self.levels[i - 1]
        pos = {n: j for j, n in enumerate(self.names(up))}
        return np.array([pos[self.parent(level, n)] for n in self.names(level)], dtype=np.int64)

    def distance(self, a: str, b: str) -> int:
        """Tree distance between two leaf classes: levels to climb until their paths meet (0..depth)."""
        pa, pb = self.path(a), self.path(b)
        for k, lvl in enumerate(self.levels):
            if pa[lvl] != pb[lvl]:
                return len(self.levels) - k
        return 0

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "levels": list(self.levels),
                "table": self.table[list(self.levels)].values.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Taxonomy":
        table = pd.DataFrame(d["table"], columns=d["levels"])
        return cls(d["name"], table, d["version"], tuple(d["levels"]))


def validate(table: pd.DataFrame, levels: tuple[str, ...] = LEVELS) -> None:
    """Raise TaxonomyError unless every class has one full path and every node one parent."""
    missing = [c for c in levels if c not in table.columns]
    if missing:
        raise TaxonomyError(f"taxonomy lacks columns {missing}")
    if table[list(levels)].isna().any().any():
        raise TaxonomyError("taxonomy has empty cells")
    for c in levels:
        if (table[c].astype(str).str.strip() == "").any():
            raise TaxonomyError(f"taxonomy has empty cells in {c!r}")
    dup = table["class"][table["class"].duplicated()].tolist() if "class" in table else []
    if dup:
        raise TaxonomyError(f"classes listed twice: {dup}")
    for child, parent in zip(levels[1:], levels[:-1]):
        n_par = table.groupby(child)[parent].nunique()
        bad = n_par[n_par > 1].index.tolist()
        if bad:
            raise TaxonomyError(f"{child} nodes with several {parent} parents: {bad}")
    all_names: dict[str, str] = {}
    for lvl in levels[:-1]:
        for n in table[lvl].unique():
            if n in all_names and all_names[n] != lvl:
                raise TaxonomyError(f"node {n!r} appears at levels {all_names[n]!r} and {lvl!r}")
            all_names[n] = lvl


@lru_cache(maxsize=None)
def load_taxonomy(name: str, path: str | None = None) -> Taxonomy:
    """Load and validate ``data/taxonomy_<name>.csv`` (or an explicit CSV path)."""
    p = Path(path) if path else DATA_DIR / f"taxonomy_{name}.csv"
    if not p.exists():
        raise TaxonomyError(f"no taxonomy table for {name!r} at {p}")
    raw = p.read_bytes()
    table = pd.read_csv(p, dtype=str, keep_default_na=False)
    validate(table)
    table = table[list(LEVELS)].sort_values("class").reset_index(drop=True)
    return Taxonomy(name, table, hashlib.sha256(raw).hexdigest()[:12])


def taxonomy_from_paths(name: str, paths: dict[str, tuple[str, str, str]]) -> Taxonomy:
    """Build a taxonomy from {class: (living, group, subgroup)} (used for EcoTaxa and ImageFolder)."""
    rows = [(v[0], v[1], v[2], k) for k, v in sorted(paths.items())]
    table = pd.DataFrame(rows, columns=list(LEVELS))
    validate(table)
    digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:12]
    return Taxonomy(name, table, digest)


def taxonomy_from_table(name: str, table: pd.DataFrame) -> Taxonomy:
    """A taxonomy from a table with a ``class`` column and one column per higher level, root first
    (the project's own ``living, group, subgroup, class`` CSVs, or any other level names)."""
    cols = [str(c).strip() for c in table.columns]
    table = table.copy()
    table.columns = cols
    if "class" not in cols:
        raise TaxonomyError(f"the taxonomy table has no 'class' column (columns: {cols})")
    levels = tuple([c for c in cols if c != "class"] + ["class"])
    table = table.astype(str).apply(lambda c: c.str.strip())
    validate(table, levels)
    table = table[list(levels)].sort_values("class").reset_index(drop=True)
    digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:12]
    return Taxonomy(name, table, digest, levels)


def taxonomy_from_hierarchies(name: str, hierarchies: dict[str, str], max_levels: int = 3) -> Taxonomy:
    """A taxonomy from EcoTaxa hierarchy strings, {class: "Biota>Animalia>…>Copepoda>Oncaeidae"}.

    The levels above the class are the first ``max_levels`` ranks below the ranks that every class
    shares (e.g. a common "Biota"), cut at the depth of the shallowest class; they are called
    ``level1`` … ``levelK``. A class whose path is shorter than that repeats its last rank, marked
    with the level (``"Copepoda (level 3)"``), so that no node sits at two levels.
    """
    if not hierarchies:
        raise TaxonomyError("no hierarchy strings given")
    paths = {c: [p.strip() for p in str(h).split(">") if p.strip()] for c, h in hierarchies.items()}
    for c, p in paths.items():
        if not p:
            raise TaxonomyError(f"class {c!r} has an empty hierarchy")
        if p[-1] in (c, c.split("<")[0]):  # EcoTaxa names a class "egg<other" when "egg" is ambiguous
            paths[c] = p[:-1]
    common = 0
    ancestors = list(paths.values())
    while all(len(p) > common for p in ancestors) and len({p[common] for p in ancestors}) == 1:
        common += 1
    depth = min(max_levels, max(len(p) - common for p in ancestors))
    if depth <= 0:
        return taxonomy_from_table(name, pd.DataFrame({"class": sorted(paths)}))
    rows = []
    for c, p in sorted(paths.items()):
        rest = p[common:] or [c]
        rows.append([rest[k] if k < len(rest) else f"{rest[-1]} (level {k + 1})" for k in range(depth)] + [c])
    levels = [f"level{k + 1}" for k in range(depth)]
    return taxonomy_from_table(name, pd.DataFrame(rows, columns=[*levels, "class"]))
