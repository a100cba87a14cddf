"""Data layer on real NDSB / ZooLake images: readers, taxonomy, splits, decoding, bad input."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.decode import ImageDecodeError, decode_image, fit_square, load_for_model
from data.manifest import build_manifest
from data.sources import DatasetNotFound, open_source
from data.splits import heldout_classes, stratified_split
from data.taxonomy import LEVELS, TaxonomyError, load_taxonomy, validate

from .conftest import REPO, requires_data, requires_full_data, requires_zoolake

pytestmark = requires_data


# --- readers -----------------------------------------------------------------------------
@requires_full_data
@requires_zoolake
def test_info_cli_reports_both_datasets():
    out = subprocess.run([sys.executable, "-m", "data", "info", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ndsb"]["images"] == 30336 and info["ndsb"]["classes"] == 121
    assert info["zoolake"]["images"] == 17943 and info["zoolake"]["classes"] == 35
    for d in (info["ndsb"], info["zoolake"]):  # (the session's user collections are listed too)
        assert d["taxonomy_depth"] == 4
        assert set(d["levels"]) == set(LEVELS) and d["levels"]["living"] == 3
        assert sum(d["splits"].values()) == d["images"]


def test_ndsb_zip_reader(ndsb, ndsb_manifest):
    assert ndsb.is_zip and ndsb.mode == "L"
    row = ndsb_manifest.iloc[0]
    assert row["relpath"].startswith(f"train/{row['class']}/")
    im = decode_image(ndsb.read_bytes(row["relpath"]), mode="L").image
    assert im.mode == "L" and im.size == (row["width"], row["height"])
    assert list(ndsb_manifest.columns[:3]) == ["relpath", "dataset", "class"]
    assert ndsb_manifest["class"].nunique() == 121


def _write_subset(ndsb, manifest, root, per_class=2, classes=4, layout="train/{cls}/{name}"):
    rows = manifest[manifest["class"].isin(sorted(manifest["class"].unique())[:classes])].groupby("class").head(per_class)
    for rel, cls in zip(rows["relpath"], rows["class"]):
        p = root / layout.format(cls=cls, name=rel.rsplit("/", 1)[1])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(ndsb.read_bytes(rel))
    return rows


def test_ndsb_extracted_folder_reader(ndsb, ndsb_manifest, tmp_path):
    rows = _write_subset(ndsb, ndsb_manifest, tmp_path / "ndsb")
    src = open_source("ndsb", tmp_path)
    assert not src.is_zip
    assert sorted(r for r, _ in src.files()) == sorted(rows["relpath"])
    assert src.read_bytes(rows["relpath"].iloc[0]) == ndsb.read_bytes(rows["relpath"].iloc[0])


@requires_zoolake
def test_zoolake_zip_reader():
    src = open_source("zoolake")
    files = src.files()
    assert len(files) == 17943 and all(r.startswith("images/") for r, _ in files[:50])
    dec = decode_image(src.read_bytes(files[0][0]), mode=src.mode, background=src.background)
    assert dec.image.mode == "RGB"


def test_imagefolder_reader(ndsb, ndsb_manifest, tmp_path):
    rows = _write_subset(ndsb, ndsb_manifest, tmp_path / "myfolder", layout="{cls}/{name}")
    src = open_source("imagefolder", tmp_path / "myfolder")
    df = build_manifest(src, progress=False)
    assert len(df) == len(rows)
    assert set(df["class"]) == set(rows["class"])
    # Known NDSB class names get their NDSB taxonomy path.
    first = df.iloc[0]
    assert first["group"] == ndsb.taxonomy().path(first["class"])["group"]


def test_ecotaxa_export_reader(ndsb, ndsb_manifest, tmp_path):
    rows = ndsb_manifest.groupby("class").head(2).head(6)
    lines = ["img_file_name\tobject_annotation_category\tobject_annotation_hierarchy", "[t]\t[t]\t[t]"]
    for i, (rel, cls) in enumerate(zip(rows["relpath"], rows["class"])):
        name = f"img_{i}.jpg"
        (tmp_path / name).write_bytes(ndsb.read_bytes(rel))
        hier = ">".join(["living", "Eukaryota", "Opisthokonta", ndsb.taxonomy().path(cls)["subgroup"], cls])
        lines.append(f"{name}\t{cls}\t{hier}")
    tsv = tmp_path / "ecotaxa_export.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    src = open_source("ecotaxa", tsv)
    df = build_manifest(src, progress=False)
    assert len(df) == 6 and set(df["living"]) == {"living"}
    assert (df["width"] > 0).all()
    assert decode_image(src.read_bytes(df["relpath"].iloc[0])).image.size[0] > 0


def test_wrong_paths_give_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFound, match="not found"):
        open_source("ndsb", tmp_path)
    with pytest.raises(DatasetNotFound):
        open_source("imagefolder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="no images"):
        open_source("imagefolder", tmp_path / "empty").files()


# --- taxonomy ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ndsb", pytest.param("zoolake", marks=requires_zoolake)])
def test_taxonomy_covers_every_class(name):
    src = open_source(name)
    tax = src.taxonomy()
    classes = {c for _, c in src.files()}
    assert classes == set(tax.classes)
    validate(tax.table)
    for lvl in LEVELS[1:]:
        parents = tax.child_to_parent(lvl)
        assert len(parents) == len(tax.names(lvl))  # exactly one parent per node
    assert set(tax.names("living")) == {"living", "non-living", "unknown"}


def test_taxonomies_share_the_coarse_vocabulary():
    a, b = load_taxonomy("ndsb"), load_taxonomy("zoolake")
    shared = set(a.names("group")) & set(b.names("group"))
    assert {"crustaceans", "diatoms", "detritus", "cyanobacteria", "fish larvae"} <= shared
    for g in shared:  # a shared group has the same level-1 parent in both
        assert a.parent("group", g) == b.parent("group", g)


def test_taxonomy_validation_rejects_two_parents():
    bad = pd.DataFrame([["living", "crustaceans", "copepods", "a"], ["living", "protists", "copepods", "b"]], columns=list(LEVELS))
    with pytest.raises(TaxonomyError, match="several"):
        validate(bad)


def test_taxonomy_distance():
    t = load_taxonomy("ndsb")
    assert t.distance("copepod_calanoid", "copepod_calanoid") == 0
    assert t.distance("copepod_calanoid", "copepod_calanoid_large") == 1
    assert t.distance("copepod_calanoid", "detritus_blob") == 4


# --- splits -----------------------------------------------------------------------------
def test_split_is_deterministic_and_order_free(ndsb_manifest):
    df = ndsb_manifest[["relpath", "class"]]
    a = stratified_split(df, seed=1)
    b = stratified_split(df.sample(frac=1.0, random_state=3), seed=1).loc[df.index]
    assert (a == b).all()
    assert (stratified_split(df, seed=2) != a).any()


@requires_full_data  # the sample keeps each image's split of the full archive, not a 70/10/20 split of its own
def test_split_is_stratified(ndsb_manifest):
    counts = ndsb_manifest.groupby(["class", "split"]).size().unstack(fill_value=0)
    assert (counts[["train", "val", "test"]] >= 1).all().all()  # every class (min 9 images) in every split
    frac = ndsb_manifest["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.02 and abs(frac["test"] - 0.2) < 0.02


def test_heldout_classes_are_spread_over_groups():
    held = heldout_classes("ndsb")
    t = load_taxonomy("ndsb")
    assert len(held) >= 10 and set(held) <= set(t.classes)
    assert len({t.path(c)["group"] for c in held}) >= 5


# --- decoding and bad input ------------------------------------------------------------
def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_model_input_is_foreground_square(ndsb_bytes):
    arr, dec, square = load_for_model(ndsb_bytes[0], 64, mode="L", background=255)
    assert arr.shape == (64, 64) and arr.dtype == np.uint8
    assert square.size == (64, 64)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    assert np.median(border) < 20 and arr.max() > 100  # background → 0, organism bright
    assert dec.original_size == Image.open(io.BytesIO(ndsb_bytes[0])).size


def test_auto_background_matches_dataset_background(ndsb_bytes):
    a, _, _ = load_for_model(ndsb_bytes[1], 64, mode="L", background=255)
    b, _, _ = load_for_model(ndsb_bytes[1], 64, mode="L", background=None)
    assert np.array_equal(a, b)


def test_aspect_kept_with_padding():
    im = Image.new("L", (100, 20), 0)
    sq = fit_square(im, 64, background=255)
    a = np.asarray(sq)
    assert a.shape == (64, 64) and a[0, 0] == 255 and a[32, 32] == 0


@pytest.mark.parametrize("data,kind", [
    (b"", "empty"),
    (b"this is a csv file, not an image\n1,2,3\n", "not_image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not_image"),
])
def test_bad_bytes(data, kind):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data)
    assert e.value.kind == kind and e.value.message


def test_truncated_jpeg(ndsb_bytes):
    data = max(ndsb_bytes, key=len)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.kind in ("truncated", "corrupt")


def test_corrupt_jpeg(ndsb_bytes):
    data = bytearray(max(ndsb_bytes, key=len))
    data[200:] = b"\x00" * (len(data) - 200)
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_decompression_bomb_refused():
    big = _png(Image.new("L", (8000, 6000), 255))  # 48 Mpx, a few hundred kB
    with pytest.raises(ImageDecodeError) as e:
        decode_image(big)
    assert e.value.kind == "too_many_pixels" and "Mpx" in e.value.message


def test_16bit_scaled_to_8bit():
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # up to 65520 → 16-bit
    dec = decode_image(_png(Image.fromarray(a)))
    out = np.asarray(dec.image)
    assert dec.image.mode == "L" and out.max() == 254 and out.min() == 0
    assert any("16-bit" in n for n in dec.notes)


def test_cmyk_converted(ndsb_bytes):
    im = Image.open(io.BytesIO(ndsb_bytes[0])).convert("CMYK")
    dec = decode_image(_png(im, format="JPEG"), mode="RGB")
    assert dec.image.mode == "RGB" and dec.source_mode == "CMYK"


def test_alpha_flattened_on_background():
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    dec = decode_image(_png(im), mode="L", background=255)
    assert np.asarray(dec.image).min() == 255


def test_multiframe_refused():
    frames = [Image.new("L", (16, 16), v) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError) as e:
        decode_image(buf.getvalue())
    assert e.value.kind == "multi_frame"


def test_exif_orientation_applied():
    im = Image.new("L", (40, 20), 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    dec = decode_image(_png(im, format="JPEG", exif=exif))
    assert dec.image.size == (20, 40)


def test_zip_member_missing(ndsb):
    with pytest.raises(FileNotFoundError):
        ndsb.read_bytes("train/nope/0.jpg")
    assert zipfile.is_zipfile(ndsb.root)


@requires_zoolake
def test_manifest_builds_concurrently_without_clashing(tmp_path, monkeypatch):
    """The server's warm-up thread and a first page run may build the same manifest at once."""
    from concurrent.futures import ThreadPoolExecutor

    from data.manifest import build_manifest
    from data.sources import open_source

    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path))
    src = open_source("zoolake")
    with ThreadPoolExecutor(3) as ex:
        frames = list(ex.map(lambda _: build_manifest(src, progress=False), range(3)))
    assert all(f.equals(frames[0]) for f in frames) and len(frames[0]) > 0
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@requires_zoolake
def test_decoded_array_concurrent_builds_and_damaged_cache(tmp_path, monkeypatch):
    """Two threads decoding the same images at once both get them (each writes its own
    temporary file); a damaged or mis-sized cached array is decoded again, not returned."""
    from concurrent.futures import ThreadPoolExecutor

    from data.manifest import build_manifest, decoded_array
    from data.sources import open_source

    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path))
    src = open_source("zoolake")
    sub = build_manifest(src, progress=False).groupby("class").head(2).reset_index(drop=True)
    with ThreadPoolExecutor(2) as ex:
        arrays = list(ex.map(lambda _: np.array(decoded_array(src, sub, 32, progress=False)), range(2)))
    assert arrays[0].shape == (len(sub), 32, 32) and np.array_equal(arrays[0], arrays[1]) and arrays[0].any()
    (cached,) = list((tmp_path / "arrays").glob("*.npy"))
    assert not [p for p in (tmp_path / "arrays").iterdir() if ".tmp" in p.name]
    np.save(cached, np.zeros((3, 32, 32), np.uint8))  # wrong length
    assert np.array_equal(decoded_array(src, sub, 32, progress=False), arrays[0])
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    assert np.array_equal(decoded_array(src, sub, 32, progress=False), arrays[0])


def test_writer_temp_names_are_hidden_per_writer_and_keep_the_suffix(tmp_path):
    """Every cache write goes through data.paths.writer_temp: a hidden name (not matched by the
    caches' eviction globs), with the file's suffix (numpy adds none), unique per thread."""
    import threading

    from data.paths import writer_temp

    path = tmp_path / "ndsb__abc__full__v1.npz"
    names = [writer_temp(path)]
    t = threading.Thread(target=lambda: names.append(writer_temp(path)))
    t.start()
    t.join()
    assert names[0] != names[1] and all(n.parent == tmp_path for n in names)
    assert all(n.name.startswith(".") and n.suffix == ".npz" and ".tmp" in n.name for n in names)
    np.savez(names[0], a=np.arange(3))
    assert names[0].exists()  # numpy wrote exactly that name
    assert not list(tmp_path.glob("ndsb__*"))  # an eviction glob does not see a writer's file
    names[0].replace(path)
    assert np.load(path)["a"].tolist() == [0, 1, 2]


@requires_full_data
def test_shipped_sample_is_deterministic_and_keeps_the_full_archive_splits(ndsb, ndsb_manifest, tmp_path):
    """data/sample is rebuilt byte for byte from the archive, and each sample image has the split
    it has in the full manifest (a sample "test" image was never trained on)."""
    import hashlib

    from data.manifest import build_manifest
    from data.sample import SAMPLE_ZIP, build_sample
    from data.sources import SAMPLES, Source

    out = tmp_path / "sample.zip"
    r = build_sample(ndsb.root, out)
    assert r["images"] == 1209 and r["classes"] == 121 and r["bytes"] <= 3 * 2**20
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(SAMPLE_ZIP.read_bytes()).digest()
    sample = Source("ndsb", SAMPLES["ndsb"], "train", "L", 255, taxonomy_name="ndsb", sample=True)
    sm = build_manifest(sample, progress=False)
    full = dict(zip(ndsb_manifest["relpath"], ndsb_manifest["split"]))
    assert len(sm) == 1209 and all(full[r] == s for r, s in zip(sm["relpath"], sm["split"]))
    assert set(sm["split"]) == {"train", "val", "test"}
