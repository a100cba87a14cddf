"""Register a model trained elsewhere: ``python -m models add PATH --name NAME [options]``.

Formats, detected from the content: a timm or torchvision architecture name (``--arch``) plus a
``state_dict`` (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``); a timm / Hugging Face style
folder (``config.json`` with ``architecture``, ``num_classes``, ``label_names`` or ``id2label``,
plus ``model.safetensors`` or ``pytorch_model.bin``); a TorchScript file; a whole model saved
with ``torch.save`` (only with ``--trust-pickle``); an open_clip / BioCLIP checkpoint (``--arch``
names its open_clip config) or model folder. The manifest written to the user's model folder
(:func:`models.zoo.user_zoo_dir`) records the weights' path and sha256, the classes and
taxonomy, the preprocessing and the GradCAM layer; the weights are not copied (except a CLIP
model's, which is saved as a project checkpoint). Nothing is registered unless the model loads
and runs.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import pandas as pd
import torch

from data.archive import check_path
from data.paths import writer_temp
from data.sources import DatasetNotFound
from data.taxonomy import (Taxonomy, TaxonomyError, load_taxonomy, taxonomy_from_hierarchies,
                           taxonomy_from_table)

from .checkpoint import CheckpointError, code_version, sha256_file
from .foreign import (IMAGENET_MEAN, IMAGENET_STD, IMPORT_FORMAT, POLARITIES, ForeignClassifier, ModelImportError,
                      build_network, head_module, infer_in_chans, read_state_dict, sniff)
from .zoo import list_models, user_zoo_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
KNOWN_TAXONOMIES = ("ndsb", "zoolake")


# --- paths ----------------------------------------------------------------------------------------
def checked_path(path: str | Path, what: str = "model") -> Path:
    """``path`` resolved (:func:`data.archive.check_path`), or a ModelImportError that says why not."""
    try:
        return check_path(path).resolve()
    except (DatasetNotFound, OSError) as e:
        raise ModelImportError(f"The {what} path cannot be used: {e}") from None


# --- classes and taxonomy -------------------------------------------------------------------------
def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file (one per line), a JSON list or ``{index: name}`` / ``id2label``
    object, or an EcoTaxa export / import TSV (its ``object_annotation_category`` values, sorted)."""
    p = checked_path(path, "class list")
    text = p.read_bytes().decode("utf-8", errors="replace")
    if text.lstrip().startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelImportError(f"{p.name} is not valid JSON ({e}).") from None
        return _labels_from(obj, p.name)
    first = text.splitlines()[0] if text.strip() else ""
    if "\t" in first and "object_annotation_category" in first:
        df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, encoding_errors="replace")
        cats = df["object_annotation_category"]
        cats = cats[~cats.str.startswith("[")]  # an import bundle's [t]/[f] type row
        return sorted({c.strip() for c in cats if c.strip()})
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise ModelImportError(f"{p.name} lists no classes.")
    return names


def _labels_from(obj, where: str) -> list[str]:
    if isinstance(obj, dict):
        obj = obj.get("label_names") or obj.get("id2label") or obj.get("classes") or obj
        if isinstance(obj, dict):
            try:
                return [str(obj[k]) for k in sorted(obj, key=lambda k: int(k))]
            except (TypeError, ValueError):
                raise ModelImportError(f"{where}: the class mapping's keys must be class indices.") from None
    if isinstance(obj, list) and obj and all(isinstance(x, (str, int)) for x in obj):
        return [str(x) for x in obj]
    raise ModelImportError(f"{where} holds no class list (a list of names, or id2label / label_names).")


def read_taxonomy(path: str | Path, name: str) -> Taxonomy:
    """A taxonomy from a CSV (``class`` and one column per level, root first), or from EcoTaxa
    hierarchy strings: a TSV with ``object_annotation_category`` and
    ``object_annotation_hierarchy``, or a text file of ``A>B>…>class`` lines."""
    p = checked_path(path, "taxonomy")
    text = p.read_bytes().decode("utf-8", errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    try:
        if "object_annotation_hierarchy" in first:
            df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, encoding_errors="replace")
            df = df[~df["object_annotation_category"].str.startswith("[")]
            pairs = {r.object_annotation_category.strip(): r.object_annotation_hierarchy
                     for r in df.itertuples() if r.object_annotation_category.strip()}
            return taxonomy_from_hierarchies(name, pairs)
        if ">" in first and "," not in first:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            return taxonomy_from_hierarchies(name, {ln.split(">")[-1].strip(): ln for ln in lines})
        table = pd.read_csv(p, dtype=str, keep_default_na=False, sep=None, engine="python")
        return taxonomy_from_table(name, table)
    except TaxonomyError as e:
        raise ModelImportError(f"The taxonomy in {p.name} cannot be used: {e}.") from None
    except (pd.errors.ParserError, KeyError, UnicodeError) as e:
        raise ModelImportError(f"{p.name} is not a taxonomy table ({type(e).__name__}: {e}).") from None


def taxonomy_for(classes: list[str], name: str, taxonomy: Taxonomy | None, dataset: str | None) -> Taxonomy:
    """The model's taxonomy over exactly ``classes``: the given one, else a known dataset's (when it
    holds every class), else one level (``class``)."""
    if taxonomy is None:
        for ds in ([dataset] if dataset else KNOWN_TAXONOMIES):
            try:
                known = load_taxonomy(ds)
            except TaxonomyError:
                continue
            if set(classes) <= set(known.classes):
                taxonomy = known
                break
    if taxonomy is None:
        table = pd.DataFrame({"class": classes})
        try:
            return taxonomy_from_table(f"{name}-flat", table)
        except TaxonomyError as e:
            raise ModelImportError(f"The class list cannot be used: {e}.") from None
    missing = [c for c in classes if c not in set(taxonomy.classes)]
    if missing:
        raise ModelImportError(f"The taxonomy misses {len(missing)} of the model's classes: {missing[:5]}.")
    table = taxonomy.table[taxonomy.table["class"].isin(classes)]
    if len(table) == len(taxonomy.table):
        return taxonomy
    return taxonomy_from_table(f"{taxonomy.name}-{name}", table[list(taxonomy.levels)])


def _order_check(classes: list[str]) -> None:
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ModelImportError(f"The class list names some classes twice: {dup[:5]}.")


# --- detection ------------------------------------------------------------------------------------
def detect(path: Path, arch: str | None, trust_pickle: bool) -> tuple[str, Path, dict]:
    """(format, weights file, folder config) of a model path, from its content."""
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip", path, {}
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelImportError(f"The folder {path} holds no config.json (timm / Hugging Face style) and no "
                                   "open_clip_config.json: give the weights file itself with --arch.")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeError) as e:
            raise ModelImportError(f"{cfg_path} is not valid JSON ({e}).") from None
        for w in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth"):
            if (path / w).is_file():
                return "state_dict", path / w, cfg
        raise ModelImportError(f"The folder {path} has a config.json but no model.safetensors or pytorch_model.bin.")
    kind = sniff(path)
    if kind == "torchscript":
        return "torchscript", path, {}
    if kind in ("safetensors", "torch-zip", "pickle"):
        if arch is None:
            obj = read_state_dict(path, trust_pickle=trust_pickle)
            if isinstance(obj, torch.nn.Module):
                return "pickle", path, {}
            if any(k.startswith("visual.") for k in obj) and "token_embedding.weight" in obj:
                raise ModelImportError("This is an open_clip checkpoint: give its open_clip model name with --arch "
                                       "(e.g. --arch ViT-B-16).")
            raise ModelImportError(f"{path.name} is a state_dict: say which architecture it is with --arch "
                                   "(a timm or torchvision name such as resnet18 or efficientnet_b0).")
        obj = read_state_dict(path, trust_pickle=trust_pickle)
        if isinstance(obj, torch.nn.Module):
            return "pickle", path, {}
        if any(k.startswith("visual.") for k in obj) and "token_embedding.weight" in obj:
            return "open_clip", path, {}
        return "state_dict", path, {}
    if kind == "json":
        raise ModelImportError(f"{path.name} is a JSON file, not weights: give the model's folder or weights file.")
    raise ModelImportError(f"{path.name} is not a model file (expected a state_dict, safetensors, TorchScript, "
                           "a timm / Hugging Face folder or an open_clip checkpoint).")


# --- registering ----------------------------------------------------------------------------------
def add_model(path: str | Path, name: str, *, arch: str | None = None, classes: str | Path | None = None,
              taxonomy: str | Path | None = None, size: int | None = None, mean: list[float] | None = None,
              std: list[float] | None = None, polarity: str | None = None, layer: str | None = None,
              dataset: str | None = None, trust_pickle: bool = False, command: str | None = None) -> dict:
    """Register the model at ``path`` as ``name`` in the user's model folder; returns its manifest.
    Raises :class:`ModelImportError` (nothing registered) when it cannot be used."""
    if not NAME_RE.match(name or ""):
        raise ModelImportError(f"{name!r} is not a usable model name: letters, digits, '.', '_' and '-', at most 80.")
    if any(m["name"] == name and "error" not in m for m in list_models()):
        raise ModelImportError(f"A model named {name!r} is already in the zoo: choose another --name.")
    if polarity is not None and polarity not in POLARITIES:
        raise ModelImportError(f"--polarity must be one of {', '.join(POLARITIES)}.")
    src = checked_path(path)
    fmt, weights, cfg = detect(src, arch, trust_pickle)
    tax_given = read_taxonomy(taxonomy, name) if taxonomy else None
    class_list = read_class_list(classes) if classes else None
    if class_list is None and cfg:
        try:
            class_list = _labels_from(cfg, "config.json")
        except ModelImportError:
            class_list = None
    if class_list is None and tax_given is not None:
        class_list = list(tax_given.classes)
    if class_list is None and dataset:
        try:
            class_list = list(load_taxonomy(dataset).classes)
        except TaxonomyError as e:
            raise ModelImportError(str(e)) from None
    if fmt == "open_clip":
        return _add_clip(src, name, arch, class_list, tax_given, dataset, command)
    if class_list is None:
        raise ModelImportError("The model's classes are missing: give --classes FILE (one name per line, JSON or an "
                               "EcoTaxa export), --taxonomy FILE, or a folder whose config.json has label_names / id2label.")
    _order_check(class_list)
    tax = taxonomy_for(class_list, name, tax_given, dataset)
    arch = arch or cfg.get("architecture") or cfg.get("arch")
    if fmt == "state_dict" and not arch:
        raise ModelImportError("Say which architecture the weights are with --arch (or config.json's 'architecture').")
    pcfg = cfg.get("pretrained_cfg", {}) if cfg else {}
    source: dict = {"format": fmt, "weights": str(weights)}
    in_chans = 3
    if fmt == "state_dict":
        state = read_state_dict(weights)
        if size is None and pcfg.get("input_size"):
            size = int(pcfg["input_size"][-1])
        kwargs = {"img_size": int(size)} if any(k.endswith("pos_embed") for k in state) and size else {}
        in_chans = infer_in_chans(arch, state, len(class_list), kwargs)
        source.update(arch=arch, in_chans=in_chans, kwargs=kwargs)
    if fmt == "pickle":
        source["trusted_pickle"] = True
    size = int(size or 224)
    if size < 16 or size > 1024:
        raise ModelImportError(f"--size {size} is outside 16–1024 px.")
    try:
        net = build_network(source, len(class_list), trust_pickle=trust_pickle)
    except ModelImportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelImportError(f"The model cannot be built: {type(e).__name__}: {e}") from None
    if fmt in ("torchscript", "pickle"):
        in_chans = next((int(v.shape[1]) for v in net.state_dict().values() if v.ndim == 4), 3)
    mean = list(mean) if mean else list(pcfg.get("mean") or IMAGENET_MEAN)
    std = list(std) if std else list(pcfg.get("std") or IMAGENET_STD)
    if in_chans == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ModelImportError(f"--mean and --std need {in_chans} values (one per input channel).")
    pp = {"size": size, "channels": in_chans, "colour": in_chans == 3, "polarity": polarity or "dark-on-light",
          "mean": mean, "std": std,
          "resize": "fit (longer side to size, aspect kept, padded with the background)"}
    config = {"preprocessing": pp, "gradcam_layer_name": layer, "head_classes": class_list}
    model = _check_runs(net, tax, config, len(class_list))
    manifest = {
        "name": name, "format": IMPORT_FORMAT, "kind": "classifier", "arch": f"{source.get('arch') or fmt}",
        "source": source, "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size,
        "levels": list(tax.levels), "class_names": {lvl: tax.names(lvl) for lvl in tax.levels},
        "taxonomy": tax.to_dict(), "preprocessing": pp,
        "config": {**config, "gradcam_layer_name": layer or None}, "gradcam_layer": model.gradcam_layer_name,
        "dataset": dataset or _guess_dataset(class_list), "heldout": [],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "command": command or f"python -m models add {src} --name {name}", "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return _write(manifest)


def _guess_dataset(classes: list[str]) -> str | None:
    for ds in KNOWN_TAXONOMIES:
        try:
            if set(classes) <= set(load_taxonomy(ds).classes):
                return ds
        except TaxonomyError:
            continue
    return None


def _check_runs(net, tax: Taxonomy, config: dict, n_classes: int) -> ForeignClassifier:
    try:
        model = ForeignClassifier(net, tax, config).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 1, config["preprocessing"]["size"], config["preprocessing"]["size"]))
    except ModelImportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelImportError(f"The model does not run on a {config['preprocessing']['size']} px image: "
                               f"{type(e).__name__}: {e}") from None
    got = out[tax.levels[-1]].shape[-1]
    if got != n_classes:
        raise ModelImportError(f"The model's head has {got} outputs but the class list has {n_classes} classes.")
    if head_module(net) is None and not isinstance(net, torch.jit.ScriptModule):
        raise ModelImportError("The model has no linear classifier head to read its classes from.")
    return model


def _add_clip(src: Path, name: str, arch: str | None, classes: list[str] | None, tax: Taxonomy | None,
              dataset: str | None, command: str | None) -> dict:
    from .clip_model import load_pretrained_local, save_clip_checkpoint

    if src.is_file() and not arch:
        raise ModelImportError("An open_clip weights file needs its open_clip model name: --arch ViT-B-16 (for example).")
    if tax is None:
        tax = load_taxonomy(dataset or "ndsb") if classes is None else taxonomy_for(classes, name, None, dataset)
    try:
        pc, man = load_pretrained_local(arch or "", src, name=name, taxonomy=tax)
    except CheckpointError as e:
        raise ModelImportError(str(e)) from None
    target = user_zoo_dir() / name
    mpath = save_clip_checkpoint(pc, target, dataset=dataset or "ndsb", source=man.get("source"),
                                 pretrained=str(src), command=command or f"python -m models add {src} --name {name}")
    return json.loads(mpath.read_text())


def _write(manifest: dict) -> dict:
    folder = user_zoo_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{manifest['name']}.json"
        tmp = writer_temp(path)
        tmp.write_text(json.dumps(manifest, indent=1, default=float))
        tmp.replace(path)
    except OSError as e:
        raise ModelImportError(f"The model folder {folder} cannot be written: {e.strerror or e}.") from None
    return manifest


def remove_model(name: str) -> Path:
    """Unregister a model added with :func:`add_model` (its manifest goes; the weights stay)."""
    path = user_zoo_dir() / f"{name}.json"
    if not path.is_file():
        raise ModelImportError(f"No model named {name!r} in the user's model folder {user_zoo_dir()}.")
    path.unlink()
    for w in (path.with_suffix(".safetensors"),):
        w.unlink(missing_ok=True)
    return path


__all__ = ["add_model", "remove_model", "read_class_list", "read_taxonomy", "ModelImportError"]
