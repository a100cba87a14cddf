"""A biologist's own collections on real EcoTaxa files (../shared/ecotaxa): detection, readers,
metadata, labels, taxonomy, ZooLake names, and every kind of bad input (built in tmp_path)."""
from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.archive import ArchiveLimits, CollectionError
from data.collections_io import detect_collection, open_collection
from tests.conftest import requires_zoolake
from data.decode import decode_image
from data.ecotaxa import parse_coordinate, parse_timestamp
from data.folders import UNLABELLED, parse_spc_name, spc_acquisition_time
from data.manifest import build_manifest
from data.sources import DatasetNotFound, open_source

ECOTAXA = Path(__file__).resolve().parents[2] / "shared" / "ecotaxa"
ZOOLAKE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "zoolake" / "zoolake_v1.zip"
pytestmark = pytest.mark.skipif(not ECOTAXA.is_dir(), reason=f"real EcoTaxa files not found at {ECOTAXA}")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANKTON_LENS_CACHE", str(tmp_path / "cache"))


def kinds(src) -> list[str]:
    return [p.kind for p in src.problems]


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


# --- detection -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [
    ("zooscan_import", "ecotaxa-import"), ("zooscan_import_plus", "ecotaxa-import"),
    ("export_with_hierarchy", "ecotaxa-export"), ("vpr_import", "ecotaxa-import"), ("uvp6_import.zip", "ecotaxa-import"),
])
def test_detects_every_real_bundle(name, kind):
    assert detect_collection(ECOTAXA / name) == kind


def test_detects_from_content_not_names(tmp_path):
    # An import table renamed to notes.dat and zipped is still an EcoTaxa import.
    src = ECOTAXA / "vpr_import"
    z = tmp_path / "whatever.bin"
    with zipfile.ZipFile(z, "w") as zf:
        for f in src.iterdir():
            zf.write(f, "x/notes.dat" if f.suffix == ".tsv" else f"x/{f.name}")
    assert detect_collection(z) == "ecotaxa-import"
    assert len(open_collection(z).files()) == 6
    # Images in one folder per class → imagefolder; the same images loose → flat.
    for i, f in enumerate(sorted((ECOTAXA / "zooscan_import" / "m106_mn01_n1_sml").glob("*.jpg"))):
        (tmp_path / "byclass" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "byclass" / f"c{i % 2}" / f.name)
        (tmp_path / "loose" / "deep" / "er").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "loose" / ("deep/er" if i % 2 else "") / f.name)
    assert detect_collection(tmp_path / "byclass") == "imagefolder"
    assert detect_collection(tmp_path / "loose") == "flat"


def test_imagefolder_and_flat_readers(tmp_path):
    jpgs = sorted((ECOTAXA / "zooscan_import" / "m106_mn01_n1_sml").glob("*.jpg"))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:  # a zip holding one top folder of <class>/ folders
        for i, f in enumerate(jpgs):
            zf.write(f, f"myset/{'copepod' if i < 3 else 'detritus'}/{f.name}")
    src = open_collection(tmp_path / "set.zip")
    assert src.kind == "imagefolder" and src.prefix == "myset"
    assert [c for _, c in src.files()].count("copepod") == 3 and len(src.files()) == 5
    df = build_manifest(src, progress=False)
    assert set(df["class"]) == {"copepod", "detritus"} and (df["width"] > 0).all()
    assert (src.metadata()["status"] == "validated").all()
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        for i, f in enumerate(jpgs):
            zf.write(f, f"a/b{i}/{f.name}" if i % 2 else f.name)  # loose and in folders
        zf.writestr("readme.txt", "not an image")
    src = open_collection(flat)
    assert src.kind == "flat" and {c for _, c in src.files()} == {UNLABELLED} and len(src.files()) == 5
    assert len(build_manifest(src, progress=False)) == 5


# --- the real bundles ------------------------------------------------------------------------
def test_zooscan_import():
    src = open_collection(ECOTAXA / "zooscan_import")
    m = src.metadata().set_index("object_id")
    assert len(m) == 11 and m.index.nunique() == 11  # 11 objects, 11 rows with images
    assert src.problems == []
    # Objects 852–854 name the image of 850: each keeps its own row, the file is read once per object.
    shared = m.loc[["m106_mn01_n1_sml_852", "m106_mn01_n1_sml_853", "m106_mn01_n1_sml_854"], "relpath"]
    assert list(shared) == [f"m106_mn01_n1_sml/m106_mn01_n1_sml_850.jpg#m106_mn01_n1_sml_85{i}" for i in (2, 3, 4)]
    assert src.read_bytes(shared.iloc[0]) == (ECOTAXA / "zooscan_import/m106_mn01_n1_sml/m106_mn01_n1_sml_850.jpg").read_bytes()
    r = m.loc["m106_mn01_n1_sml_409"]
    assert r["lat"] == pytest.approx(-44.72543333333333) and r["lon"] == pytest.approx(145.5351)
    assert r["timestamp"] == utc("2014-04-20 04:20:00") and r["annotator"] == "Admin4test"
    assert (r["depth_min"], r["depth_max"], r["sample_id"], r["acq_id"], r["instrument"]) == (
        600.0, 1000.0, "m106_mn01_n1_sml", "generic_m106_mn01_n1_sml", "epson")
    assert m.loc["m106_mn01_n2_sml_1", "depth_min"] == 300.0
    assert m.loc["m106_mn01_n1_sml_821", "category"] == "Oncaeidae"
    assert set(m["status"]) == {"predicted"}
    assert isinstance(m["timestamp"].dtype, pd.DatetimeTZDtype) and str(m["timestamp"].dt.tz) == "UTC"
    assert m["object_area"].dtype == float and m.loc["m106_mn01_n1_sml_821", "object_area"] == 1401.0
    assert "object_new_field" in m.columns  # the extra [f] column of sample n1
    # Predicted categories are not ground truth: every class is the sentinel.
    assert {c for _, c in src.files()} == {UNLABELLED}
    df = build_manifest(src, progress=False)
    assert len(df) == 11 and (df["width"] > 0).all() and set(df["living"]) == {"unknown"}
    assert src.background == 255


def test_zooscan_import_plus_updates_and_img_rank():
    src = open_collection(ECOTAXA / "zooscan_import_plus")
    m = src.metadata()
    assert len(m) == 4 and m["object_id"].nunique() == 3  # 4 images of 3 objects
    two = m[m["object_id"] == "m106_mn01_n3_sml_1111"].sort_values("img_rank")
    assert list(two["img_rank"]) == [0, 2]
    assert list(two["relpath"]) == ["m106_mn01_n3_sml/m106_mn01_n3_sml_1111.jpg", "m106_mn01_n3_sml/m106_mn01_n3_sml_1111_2.jpg"]
    assert two["timestamp"].iloc[0] == utc("2014-04-21 04:20:00")
    assert m["relpath"].str.endswith(".png").sum() == 1
    # Samples n1 and n2 are TSV only (updates of objects imported before): 11 objects, no images, listed.
    assert kinds(src).count("missing_image") == 11
    full = src.metadata(include_missing=True)
    assert len(full) == 15 and (full["relpath"] == "").sum() == 11
    assert full.loc[full["object_id"] == "m106_mn01_n1_sml_409", "lat"].item() == 18.0
    assert len(build_manifest(src, progress=False)) == 4


def test_export_with_hierarchy():
    src = open_collection(ECOTAXA / "export_with_hierarchy")
    m = src.metadata()
    assert src.kind == "ecotaxa-export" and len(m) == 12 and m["object_id"].nunique() == 11
    r = m.set_index("relpath").loc["images/Oncaeidae/2_0.jpg"]
    assert r["hierarchy"] == ("Biota>Animalia>Arthropoda>Crustacea>Multicrustacea>Copepoda>Neocopepoda>Podoplea>"
                              "Cyclopoida>Ergasilida>Oncaeidae")
    assert r["object_id"] == "m106_mn01_n1_sml_821" and r["lat"] == 18.0 and r["lon"] == pytest.approx(-24.4166666666667)
    assert r["timestamp"] == utc("2014-04-20 04:20:00") and r["object_area"] == 1401.0
    eggs = m[m["object_id"] == "m106_mn01_n3_sml_1111"]
    assert sorted(eggs["img_rank"]) == [0, 1] and set(eggs["category"]) == {"egg<other"}
    assert m.set_index("relpath").loc["images/t001/1_0.jpg", "hierarchy"] == "temporary>t001"
    assert set(m["status"]) == {"predicted"}
    tax = src.taxonomy().table.set_index("class")
    assert tax.loc["Oncaeidae", "living"] == "living" and tax.loc["Oncaeidae", "group"] == "Arthropoda"
    assert tax.loc["Oncaeidae", "subgroup"] == tax.loc["Cyclopoida", "subgroup"] == "Copepoda"
    assert tax.loc["detritus", "living"] == "non-living" and tax.loc["t001", "living"] == "unknown"
    deep = src.hierarchy_taxonomy()
    assert deep.levels[-1] == "class" and set(deep.names("level1")) == {"Biota", "not-living", "temporary"}
    assert deep.path("Oncaeidae")["level2"] == "Animalia"
    assert len(build_manifest(src, progress=False)) == 12


def test_validated_rows_are_the_only_labels(tmp_path):
    shutil.copytree(ECOTAXA / "export_with_hierarchy", tmp_path / "exp")
    tsv = next((tmp_path / "exp").glob("*.tsv"))
    text = tsv.read_text().splitlines()
    for i in (1, 2):  # the first two rows (t001, Oncaeidae) validated by a person
        text[i] = text[i].replace('"predicted"\t""', '"validated"\t"Jean Dupont"', 1)
    tsv.write_text("\n".join(text) + "\n")
    src = open_collection(tmp_path / "exp")
    files = dict(src.files())
    assert files["images/Oncaeidae/2_0.jpg"] == "Oncaeidae" and files["images/t001/1_0.jpg"] == "t001"
    assert files["images/Oncaeidae/5_0.jpg"] == UNLABELLED  # predicted: EcoTaxa's guess kept in metadata only
    m = src.metadata().set_index("relpath")
    assert m.loc["images/Oncaeidae/5_0.jpg", "category"] == "Oncaeidae"
    assert m.loc["images/Oncaeidae/2_0.jpg", "annotator"] == "Jean Dupont"
    df = build_manifest(src, progress=False).set_index("relpath")
    assert df.loc["images/Oncaeidae/2_0.jpg", "group"] == "Arthropoda"


def test_vpr_import_positions_and_time():
    src = open_collection(ECOTAXA / "vpr_import")
    m = src.metadata()
    assert len(m) == 6 and set(m["status"]) == {"empty"} and set(m["instrument"]) == {"VPR"}
    first = m.iloc[0]
    assert first["object_id"] == "roi.0729931500" and first["lat"] == 77.0709 and first["lon"] == 161.8121
    assert first["timestamp"] == utc("2016-07-19 02:01:39.315")
    assert list(m["depth_min"]) == [120.4473] * 4 + [120.4822] * 2
    assert m["timestamp"].is_monotonic_increasing
    assert src.background == 0  # dark-field images


def test_uvp6_zip_of_zips_degree_minutes_latin1():
    src = open_collection(ECOTAXA / "uvp6_import.zip")
    m = src.metadata()
    assert len(m) == 15 and m["object_id"].nunique() == 15
    assert kinds(src) == ["encoding"]  # the latin-1 table, read anyway
    assert (m["lat"] == 43.0).all() and (m["lon"] == 17.0).all()
    assert m["relpath"].iloc[0] == "b_da_19_Images.zip/sub1/20200205-111823_3.png"
    assert m["timestamp"].iloc[0] == utc("2020-02-05 11:18:23") and m["timestamp"].iloc[-1] == utc("2020-02-05 11:20:59")
    assert m["depth_min"].iloc[0] == 194.63 and m["object_area"].iloc[0] == 207.0
    assert set(m["instrument"]) == {"uvp6"} and set(m["sample_id"]) == {"b_da_19"}
    assert (m["img_rank"] == 1).all()
    dec = decode_image(src.read_bytes(m["relpath"].iloc[0]))
    assert dec.image.size[0] > 0
    assert len(build_manifest(src, progress=False)) == 15


def test_open_source_routes_to_collections():
    src = open_source("ecotaxa", ECOTAXA / "export_with_hierarchy" / "ecotaxa_export_1_20210530_1122.tsv")
    assert src.kind == "ecotaxa-export" and len(src.files()) == 12
    assert len(open_source("ecotaxa", ECOTAXA / "uvp6_import.zip").files()) == 15


# --- value parsers ---------------------------------------------------------------------------
def test_coordinates_and_times():
    assert parse_coordinate("43°0 0") == 43.0
    assert parse_coordinate("43°30 0") == 43.5 and parse_coordinate("-43°30 36") == pytest.approx(-43.51)
    assert parse_coordinate("12°30'S") == -12.5 and parse_coordinate("7º15.5'") == pytest.approx(7 + 15.5 / 60)
    assert parse_coordinate(b"43\xb00 0".decode("latin-1")) == 43.0
    assert np.isnan(parse_coordinate("north")) and np.isnan(parse_coordinate(""))
    assert parse_timestamp("20140420", "420") == utc("2014-04-20 04:20:00")
    assert parse_timestamp("20200205", "111823") == utc("2020-02-05 11:18:23")
    assert parse_timestamp("20200205", "10203") == utc("2020-02-05 01:02:03")
    assert parse_timestamp("20160719", "020139.315") == utc("2016-07-19 02:01:39.315")
    assert parse_timestamp("20160719", "") == utc("2016-07-19")
    assert parse_timestamp("2016-07-19", "0201") is pd.NaT and parse_timestamp("20161399", "0201") is pd.NaT


@pytest.mark.skipif(not ZOOLAKE.is_file(), reason="ZooLake archive not found")
def test_zoolake_names_carry_acquisition_time():
    with zipfile.ZipFile(ZOOLAKE) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
    first = "images/aphanizomenon/SPC-EAWAG-0P5X-1570543372901157-3725350526242-001629-055-1224-2176-84-64.jpeg"
    assert first in names
    p = parse_spc_name(first)
    assert p["timestamp"] == utc("2019-10-08 14:02:52.901157")
    assert (p["site"], p["camera"], p["frame"], p["roi"], p["x"], p["y"], p["width"], p["height"]) == (
        "EAWAG", "0P5X", 1629, 55, 1224, 2176, 84, 64)
    times = [spc_acquisition_time(n) for n in names]
    assert all(t is not None for t in times)  # every ZooLake image name carries its time
    assert min(times) >= utc("2018-01-01") and max(times) <= utc("2021-01-01")
    assert parse_spc_name("m106_mn01_n1_sml_409.jpg") is None


# --- bad input -------------------------------------------------------------------------------
def _vpr(tmp_path) -> Path:
    d = tmp_path / "vpr"
    shutil.copytree(ECOTAXA / "vpr_import", d)
    return d


def test_not_utf8_table_read_as_latin1(tmp_path):
    d = _vpr(tmp_path)
    tsv = next(d.glob("*.tsv"))
    tsv.write_bytes(tsv.read_bytes().replace(b"VPR", "VPR\u00b0".encode("latin-1")))
    src = open_collection(d)
    assert kinds(src) == ["encoding"] and set(src.metadata()["instrument"]) == {"VPR\u00b0"}


def test_empty_and_header_only_tables(tmp_path):
    d = _vpr(tmp_path)
    tsv = next(d.glob("*.tsv"))
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines[:2]) + "\n")  # header and type row, no objects
    with pytest.raises(CollectionError, match="header but no rows"):
        open_collection(d)
    tsv.write_text("")
    with pytest.raises(CollectionError, match="is empty"):
        open_collection(tsv)
    # An empty table beside a good one: the good one loads, the empty one is listed.
    (d / "ecotaxa_other.tsv").write_text("\n".join(lines) + "\n")
    src = open_collection(d)
    assert len(src.files()) == 6 and "empty_table" in kinds(src)


def test_missing_images_listed(tmp_path):
    d = _vpr(tmp_path)
    (d / "roi.0729937400.png").unlink()
    (d / "roi.0729961200.png").unlink()
    src = open_collection(d)
    assert len(src.files()) == 4
    assert sorted(p.path for p in src.problems if p.kind == "missing_image") == ["roi.0729937400.png", "roi.0729961200.png"]
    for f in d.glob("*.png"):
        f.unlink()
    with pytest.raises(CollectionError, match="images were found"):
        open_collection(d)


def test_duplicated_object_ids_reported(tmp_path):
    d = _vpr(tmp_path)
    tsv = next(d.glob("*.tsv"))
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join([*lines, lines[2]]) + "\n")  # the first object listed twice
    src = open_collection(d)
    assert len(src.files()) == 6 and kinds(src) == ["duplicate_object"]
    assert "roi.0729931500" in src.problems[0].message


def test_corrupt_image_skipped_at_indexing(tmp_path):
    d = _vpr(tmp_path)
    p = d / "roi.0729943300.png"
    p.write_bytes(p.read_bytes()[:60])  # truncated
    src = open_collection(d)
    df = build_manifest(src, progress=False)
    assert len(df) == 5 and "roi.0729943300.png" not in set(df["relpath"])
    assert [q.path for q in src.problems if q.kind == "corrupt_image"] == ["roi.0729943300.png"]
    again = open_collection(d)  # from the cached manifest, still listed
    assert len(build_manifest(again, progress=False)) == 5 and "corrupt_image" in kinds(again)


def test_zip_bomb_and_deep_nesting_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in (ECOTAXA / "vpr_import").iterdir():
            zf.write(f, f.name)
        zf.writestr("roi.9999.png", b"\0" * (20 * 2**20))  # 20 MB of zeros, ~1000:1
    src = open_collection(z)
    assert len(src.files()) == 6 and kinds(src) == ["zip_bomb"] and "roi.9999.png" in src.problems[0].message
    small = open_collection(z, limits=ArchiveLimits(max_member_bytes=5 * 2**20, max_ratio=1e9))
    assert kinds(small) == ["zip_bomb"] and "20,971,520 bytes" in small.problems[0].message
    # A zip in a zip in a zip in a zip: the innermost is refused.
    inner = (ECOTAXA / "uvp6_import.zip").read_bytes()
    for level in range(2):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"level{level}.zip", inner)
        inner = buf.getvalue()
    deep = tmp_path / "deep.zip"
    deep.write_bytes(inner)
    with pytest.raises(CollectionError, match="nested"):
        open_collection(deep)


def test_unsafe_member_names_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in (ECOTAXA / "vpr_import").iterdir():
            zf.write(f, f"bundle/{f.name}")
        png = (ECOTAXA / "vpr_import" / "roi.0729931500.png").read_bytes()
        zf.writestr("../escape.png", png)
        zf.writestr("/etc/absolute.png", png)
        zf.writestr("bundle/" + "x" * 300 + ".png", png)
    src = open_collection(z)
    assert len(src.files()) == 6 and kinds(src).count("unsafe_name") == 3
    assert not any(".." in r or r.startswith("/") for r, _ in src.files())
    # A table naming an image outside its folder is refused too.
    d = _vpr(tmp_path)
    tsv = next(d.glob("*.tsv"))
    tsv.write_text(tsv.read_text().replace("roi.0729931500.png", "../../etc/passwd", 1))
    src = open_collection(d)
    assert len(src.files()) == 5 and "unsafe_name" in kinds(src)


def test_bad_paths(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        open_collection(tmp_path / "nope")
    with pytest.raises(CollectionError, match="255"):
        detect_collection(tmp_path / ("y" * 300) / "bundle")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectionError, match="no images"):
        detect_collection(tmp_path / "empty")
    (tmp_path / "notes.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(CollectionError, match="not an EcoTaxa table"):
        open_collection(tmp_path / "notes.tsv")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CollectionError):
        open_collection(tmp_path / "broken.zip")


@requires_zoolake
def test_zoolake_dataset_carries_acquisition_times_from_its_file_names():
    """The known ZooLake dataset's metadata: every image's UTC acquisition time, from its SPC name."""
    from data.sources import open_source

    m = open_source("zoolake").metadata()
    assert len(m) > 10_000 and m["timestamp"].notna().all()
    assert str(m["timestamp"].dt.tz) == "UTC" and m["timestamp"].min().year >= 2018
    assert (m["status"] == "validated").all() and (m["instrument"] == "SPC").all()
