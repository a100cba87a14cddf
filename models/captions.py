"""Captions for CLIP training and prompts for zero-shot use, built from the taxonomy and the
curated morphological descriptors in ``data/descriptors.csv`` (rows for classes, subgroups and
groups).

Every class gets captions from every template in :data:`TEMPLATES`: name templates (class
words with their taxonomic path), descriptor templates (one caption per descriptor of the
class, its subgroup and its group) and coarse templates (living / group level), so a prompt
carries meaning beyond the class name and an unseen class can be described by its path and
its morphology.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from data.taxonomy import Taxonomy

DESCRIPTORS_CSV = Path(__file__).resolve().parent.parent / "data" / "descriptors.csv"

#: Readable words for class names the generic rule renders badly.
WORD_OVERRIDES = {
    "artifacts": "imaging artefact",
    "artifacts_edge": "imaging artefact at the frame edge",
    "chaetognath_non_sagitta": "non-sagittid chaetognath",
    "chordate_type1": "chordate of type 1",
    "copepod_calanoid_large_side_antennatucked": "large calanoid copepod seen from the side with tucked antennae",
    "copepod_calanoid_small_longantennae": "small calanoid copepod with long antennae",
    "copepod_calanoid_frillyAntennae": "calanoid copepod with frilly antennae",
    "copepod_calanoid_octomoms": "octomom calanoid copepod",
    "copepod_cyclopoid_oithona_eggs": "oithona cyclopoid copepod with eggs",
    "copepod_calanoid_eggs": "calanoid copepod with eggs",
    "ctenophore_cydippid_no_tentacles": "cydippid ctenophore without tentacles",
    "ctenophore_cydippid_tentacles": "cydippid ctenophore with tentacles",
    "echinoderm_seacucumber_auricularia_larva": "auricularia sea cucumber larva",
    "hydromedusae_bell_and_tentacles": "hydromedusa bell and tentacles",
    "hydromedusae_typeD_bell_and_tentacles": "type d hydromedusa bell and tentacles",
    "hydromedusae_haliscera_small_sideview": "small haliscera hydromedusa seen from the side",
    "hydromedusae_shapeA_sideview_small": "small shape a hydromedusa seen from the side",
    "hydromedusae_sideview_big": "big hydromedusa seen from the side",
    "hydromedusae_partial_dark": "partial dark hydromedusa",
    "invertebrate_larvae_other_A": "other invertebrate larva of type a",
    "invertebrate_larvae_other_B": "other invertebrate larva of type b",
    "pteropod_theco_dev_seq": "developing thecosome pteropod",
    "shrimp-like_other": "other shrimp-like crustacean",
    "siphonophore_calycophoran_sphaeronectes_stem": "sphaeronectes calycophoran siphonophore with stem",
    "siphonophore_other_parts": "siphonophore parts",
    "tornaria_acorn_worm_larvae": "tornaria acorn worm larva",
    "unknown_blobs_and_smudges": "unknown blobs and smudges",
    "unknown_unclassified": "unclassified unknown object",
    "acantharia_protist": "acantharian protist",
    "acantharia_protist_big_center": "acantharian protist with a big centre",
    "acantharia_protist_halo": "acantharian protist with a halo",
    "appendicularian_s_shape": "s-shaped appendicularian",
    "appendicularian_slight_curve": "slightly curved appendicularian",
    "fish_larvae_deep_body": "deep-bodied fish larva",
    "fish_larvae_medium_body": "medium-bodied fish larva",
    "fish_larvae_thin_body": "thin-bodied fish larva",
    "fish_larvae_very_thin_body": "very thin-bodied fish larva",
    "fecal_pellet": "fecal pellet",
    "hydromedusae_shapeA": "shape a hydromedusa",
    "hydromedusae_shapeB": "shape b hydromedusa",
    "hydromedusae_typeD": "type d hydromedusa",
    "hydromedusae_typeE": "type e hydromedusa",
    "hydromedusae_typeF": "type f hydromedusa",
    "echinoderm_larva_pluteus_typeC": "type c pluteus echinoderm larva",
    "protist_dark_center": "protist with a dark centre",
    "protist_fuzzy_olive": "fuzzy olive protist",
    "jellies_tentacles": "jelly tentacles",
    "radiolarian_chain": "radiolarian chain",
    "radiolarian_colony": "radiolarian colony",
    "trochophore_larvae": "trochophore larva",
    "tunicate_salp_chains": "salp tunicate chains",
    "unknown_sticks": "unknown sticks",
    "diatom_chain_string": "string-like diatom chain",
    "diatom_chain_tube": "tube-shaped diatom chain",
}
#: Multi-token heads kept together when a class name is reordered.
_COMPOUND_HEADS = (("fish", "larvae"), ("echinoderm", "larva"), ("diatom", "chain"), ("invertebrate", "larvae"))

_SINGULAR = {"hydromedusae": "hydromedusa", "larvae": "larva"}

LIVING_PHRASE = {"living": "living plankton organism", "non-living": "non-living particle", "unknown": "unidentified object"}

#: Caption templates; fields: words, subgroup, group, living (a phrase), kingdom (the living level's
#: name: living / non-living / unknown), descriptor.
NAME_TEMPLATES = (
    "a shadowgraph image of {words}",
    "{words}, a kind of {subgroup}",
    "a plankton image of {words}, one of the {group}",
    "{kingdom} > {group} > {subgroup} > {words}",
)
DESCRIPTOR_TEMPLATES = (
    "{descriptor}",
    "{subgroup}: {descriptor}",
    "a plankton image showing {descriptor}",
)
COARSE_TEMPLATES = (
    "a shadowgraph image of a {living}",
    "a shadowgraph image of {group}",
)
TEMPLATES = NAME_TEMPLATES + DESCRIPTOR_TEMPLATES + COARSE_TEMPLATES


@dataclass(frozen=True)
class Caption:
    text: str
    template: str
    descriptor: str | None = None


def _split_camel(token: str) -> list[str]:
    return [t.lower() for t in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", token)] or [token.lower()]


def class_words(cls: str) -> str:
    """Readable words for a class name: "copepod_calanoid_eucalanus" → "eucalanus calanoid copepod"."""
    if cls in WORD_OVERRIDES:
        return WORD_OVERRIDES[cls]
    tokens = [w for t in re.split(r"[_\s]+", cls) if t for w in _split_camel(t)]
    if not tokens:
        return cls
    head_len = 1
    for comp in _COMPOUND_HEADS:
        if tuple(tokens[: len(comp)]) == comp:
            head_len = len(comp)
    head, rest = [_SINGULAR.get(t, t) for t in tokens[:head_len]], tokens[head_len:]
    return " ".join([*reversed(rest), *head])


@lru_cache(maxsize=4)
def _read_descriptors(path: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            taxon, desc = (row.get("taxon") or "").strip(), (row.get("descriptor") or "").strip()
            if taxon and desc and desc not in out.setdefault(taxon, []):
                out[taxon].append(desc)
    return {k: tuple(v) for k, v in out.items()}


def load_descriptors(path: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """{taxon (class, subgroup or group name): descriptors} from descriptors.csv."""
    p = Path(path) if path else DESCRIPTORS_CSV
    return _read_descriptors(str(p), p.stat().st_mtime_ns)


def descriptors_version(path: str | Path | None = None) -> str:
    p = Path(path) if path else DESCRIPTORS_CSV
    return hashlib.sha256(p.read_bytes()).hexdigest()[:12]


def path_fields(taxonomy: Taxonomy, cls: str) -> dict[str, str]:
    p = taxonomy.path(cls)
    return {"words": class_words(cls), "subgroup": p["subgroup"], "group": p["group"],
            "living": LIVING_PHRASE.get(p["living"], p["living"]), "kingdom": p["living"]}


def descriptors_for(taxonomy: Taxonomy, cls: str, table: dict[str, tuple[str, ...]] | None = None) -> list[tuple[str, str]]:
    """(level, descriptor) pairs of a class, its subgroup and its group, most specific first."""
    table = load_descriptors() if table is None else table
    p = taxonomy.path(cls)
    out, seen = [], set()
    for lvl in ("class", "subgroup", "group"):
        for d in table.get(p[lvl], ()):
            if d not in seen:
                seen.add(d)
                out.append((lvl, d))
    return out


def class_captions(taxonomy: Taxonomy, cls: str, table: dict[str, tuple[str, ...]] | None = None) -> list[Caption]:
    """All captions of one class: every template, descriptor templates once per descriptor."""
    f = path_fields(taxonomy, cls)
    descs = [d for _, d in descriptors_for(taxonomy, cls, table)]
    out = [Caption(t.format(**f), t) for t in NAME_TEMPLATES]
    out += [Caption(t.format(**f, descriptor=d), t, d) for t in DESCRIPTOR_TEMPLATES for d in descs]
    out += [Caption(t.format(**f), t) for t in COARSE_TEMPLATES]
    return out


def class_prompts(taxonomy: Taxonomy, cls: str, table: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The distinct caption texts of a class: its zero-shot prompt ensemble."""
    return list(dict.fromkeys(c.text for c in class_captions(taxonomy, cls, table)))


def caption_table(taxonomy: Taxonomy, classes: list[str] | None = None,
                  table: dict[str, tuple[str, ...]] | None = None) -> tuple[list[str], np.ndarray]:
    """Distinct captions of ``classes`` and a boolean matrix (captions × classes): True where
    the caption describes the class (shared captions, e.g. a group's descriptor, are True for
    every class of the group). The positives of the multi-positive contrastive loss."""
    classes = list(taxonomy.classes if classes is None else classes)
    index: dict[str, int] = {}
    pairs = []
    for j, cls in enumerate(classes):
        for text in class_prompts(taxonomy, cls, table):
            i = index.setdefault(text, len(index))
            pairs.append((i, j))
    valid = np.zeros((len(index), len(classes)), dtype=bool)
    rows, cols = zip(*pairs) if pairs else ((), ())
    valid[list(rows), list(cols)] = True
    return list(index), valid


def taxonomy_prompt(taxonomy: Taxonomy, node: str, level: str = "class") -> str:
    """The taxonomy-path prompt of a node, e.g. "living > crustaceans > calanoid copepods"."""
    if level == "class":
        return NAME_TEMPLATES[3].format(**path_fields(taxonomy, node))
    i = taxonomy.levels.index(level)
    row = taxonomy.table.loc[taxonomy.table[level] == node].iloc[0]
    parts = [str(row[lv]) for lv in taxonomy.levels[: i + 1]]
    return " > ".join(parts)


def prompt_bank(taxonomy: Taxonomy, table: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Prompts for explanations: taxonomy paths of every node, morphological descriptors of
    living taxa and descriptors of non-living ones. Columns: prompt, kind, taxon, level."""
    table = load_descriptors() if table is None else table
    rows = []
    for level in taxonomy.levels[1:]:
        for node in taxonomy.names(level):
            rows.append((taxonomy_prompt(taxonomy, node, level), "taxonomy", node, level))
    living_of = {}
    for level in taxonomy.levels[1:]:
        for node, liv in taxonomy.table[[level, "living"]].drop_duplicates().itertuples(index=False):
            living_of[(level, node)] = liv
    for (level, node), liv in living_of.items():
        for d in table.get(node, ()):
            rows.append((d, "morphology" if liv == "living" else "non-living", node, level))
    df = pd.DataFrame(rows, columns=["prompt", "kind", "taxon", "level"])
    return df.drop_duplicates("prompt").reset_index(drop=True)
