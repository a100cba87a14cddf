"""Export back to EcoTaxa: a scored table as an import bundle, read back by the project's own EcoTaxa
reader and by EcoTaxa's rules; formulas neutralised; a real bundle's own columns carried through."""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.collections_io import detect_collection, open_collection
from data.ecotaxa import read_table
from data.safe_text import safe_frame, safe_text
from explain.ecotaxa_bundle import PREFIX, export_bundle, image_file, read_original
from explain.ecotaxa_rules import check_ecotaxa_tsv

ECOTAXA = Path(__file__).resolve().parents[2] / "shared" / "ecotaxa"
LEVELS = ["level1", "level2", "level3", "class"]
META = {"model": "ndsb-resnet18", "model_sha256": "0" * 64, "collection": "cruise42", "levels": LEVELS,
        "thresholds": {"ood_energy_class": 4.0}, "keep": 0.95}
FORMULA = '=HYPERLINK("http://x","y")'
TAB_LABEL = "Calanus\tfinmarchicus\nadult"


def _png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24), level, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _scored_table() -> pd.DataFrame:
    """A scored table as explain.score writes it: 8 images, negative latitudes, one image file
    shared by two objects, one object on two images, one unreadable image, one human validation."""
    rel = ["s1/a.png", "s1/b.png", "s2/c.png", "s2/c.png#obj4", "s2/d.png", "s3/e.png", "s3/e_2.png", "s3/g.png"]
    oid = ["obj1", "obj2", "obj3", "obj4", "obj5", "obj6", "obj6", "obj7"]
    n = len(rel)
    t = pd.DataFrame({
        "row": np.arange(n), "relpath": rel, "dataset": "cruise42",
        "class": ["unlabelled"] * 7 + ["Oithona"], "split": "all",
        "object_id": oid, "img_rank": [0, 0, 0, 0, 0, 0, 1, 0], "sample_id": ["st1"] * 4 + ["st2"] * 4,
        "acq_id": "", "instrument": "ZooScan",
        "lat": [-43.5, -43.5, -12.25, -12.25, 0.0, 5.0, 5.0, -0.5], "lon": [147.25, 147.25, -70.1, -70.1, 0, 1, 1, 2],
        "timestamp": pd.to_datetime(["2024-03-01T04:20:00Z"] * n, utc=True),
        "depth_min": 0.0, "depth_max": 200.0, "category": [""] * 7 + ["Oithona"], "hierarchy": "",
        "status": ["predicted"] * 7 + ["validated"], "annotator": [""] * 7 + ["Ada Lovelace"],
        "readable": [True, True, True, True, False, True, True, True],
    })
    preds = {"level1": "living", "level2": "Arthropoda", "level3": "Copepoda", "class": "Calanoida"}
    for i, lvl in enumerate(LEVELS):
        t[f"pred_{lvl}"] = [preds[lvl]] * 4 + [""] + [preds[lvl]] * 3
        t[f"pred_conf_{lvl}"] = np.array([0.9, 0.5, 0.25, 0.75, np.nan, 0.6, 0.7, 0.8], np.float32)
        for k in (1, 2, 3):
            t[f"top{k}_{lvl}"] = preds[lvl]
            t[f"top{k}_p_{lvl}"] = np.float32(0.1)
        t[f"ood_energy_{lvl}"] = np.array([-3.5, 7.25, 1, 2, np.nan, 3, 4, 5], np.float32)
        t[f"ood_max_logit_{lvl}"] = np.float32(-1.5)
    t.loc[1, "pred_class"] = "-detritus"  # a label a spreadsheet would run as a formula
    t["knn_score"] = np.array([0.5, np.nan, 0.1, 0.2, np.nan, 0.3, 0.4, 0.5], np.float32)
    t["inconsistent"] = [False, True] + [False] * 6
    t["inconsistency"] = ["", "level3 Copepoda ⊄ class -detritus"] + [""] * 6
    return t


def _decisions() -> pd.DataFrame:
    """ReviewStore.current(): one decision of each kind."""
    return pd.DataFrame([
        dict(id=1, dataset="cruise42", relpath="s1/a.png", decision="not_anomaly", label="", reviewer="Bo",
             created="2024-05-02T10:11:12+00:00", comment=""),
        dict(id=2, dataset="cruise42", relpath="s1/b.png", decision="confirm_anomaly", label="", reviewer="Cy",
             created="2024-05-02T11:00:00+02:00", comment=FORMULA),
        dict(id=3, dataset="cruise42", relpath="s2/c.png", decision="assign_label", label=TAB_LABEL,
             reviewer="@Dee", created="2024-05-03T00:00:09+00:00", comment="line1\nline2"),
        dict(id=4, dataset="other", relpath="s3/g.png", decision="assign_label", label="not ours", reviewer="Ed",
             created="2024-05-03T00:00:09+00:00", comment=""),
    ])


IMAGES = {f: _png(40 + 20 * i) for i, f in enumerate(["s1/a.png", "s1/b.png", "s2/c.png", "s2/d.png", "s3/e.png",
                                                       "s3/e_2.png", "s3/g.png"])}


def _read_image(relpath: str) -> bytes:
    return IMAGES[image_file(relpath)] if "#" in relpath else IMAGES[relpath]


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "cruise42_ndsb.zip"
    res = export_bundle(_scored_table(), META, out, decisions=_decisions(), read_image=_read_image)
    with zipfile.ZipFile(out) as z:
        raw = z.read(res["tsv"])
    return res, out, raw


def test_safe_text_rules():
    assert safe_text(FORMULA) == "'" + FORMULA
    for s in ("+1+2", "-x", "@SUM(A1)", "\t=1", "\r=1"):
        assert safe_text(s).startswith("'")
    assert safe_text(TAB_LABEL) == "Calanus finmarchicus adult"
    assert safe_text("a\r\nb") == "a b" and safe_text("plain") == "plain"
    assert safe_text(-43.5) == -43.5 and safe_text("-43.5") == "-43.5" and safe_text("+2") == "+2"
    df = safe_frame(pd.DataFrame({"t": ["=1", "ok"], "lat": [-43.5, 1.0], "n": [-1, 2], "b": [True, False]}))
    assert df["t"].tolist() == ["'=1", "ok"] and df["lat"].tolist() == [-43.5, 1.0] and df["n"].dtype.kind == "i"


def test_bundle_round_trip_through_the_project_reader(bundle):
    res, out, raw = bundle
    assert raw.startswith("\ufeff".encode())  # EcoTaxa reads latin-1 without a UTF-8 byte-order mark
    text = raw.decode("utf-8-sig")
    assert check_ecotaxa_tsv(text) == []
    assert res["rows"] == 7 and res["skipped"] == ["s2/d.png"] and res["images"] == 6 and res["problems"] == []
    assert all(re.fullmatch(r"(object|img|sample|acq|process)_[a-z0-9_]+", c) for c in res["columns"])
    assert detect_collection(out) == "ecotaxa-import"
    src = open_collection(out)
    m = src.metadata().set_index("object_id")
    assert not [p for p in src.problems if p.kind != "unlisted_image"]
    assert len(m) == 7 and m.index.is_unique
    assert {"obj1", "obj2", "obj3", "obj4", "obj7"} <= set(m.index)
    assert {"cruise42_s3_e", "cruise42_s3_e_2"} <= set(m.index)  # obj6 is on two images: ids derived
    assert m.loc["obj1", "status"] == "validated" and m.loc["obj1", "category"] == "Calanoida"
    assert m.loc["obj1", "annotator"] == "Bo"
    assert m.loc["obj2", "status"] == "dubious" and m.loc["obj2", "category"] == "'-detritus"
    assert m.loc["obj3", "status"] == "validated" and m.loc["obj3", "category"] == "Calanus finmarchicus adult"
    assert m.loc["obj3", "annotator"] == "'@Dee"
    assert m.loc["obj4", "status"] == "predicted" and m.loc["obj4", "category"] == "Calanoida"
    assert m.loc["obj7", "status"] == "validated" and m.loc["obj7", "category"] == "Oithona"  # a person's, kept
    assert m.loc["obj7", "annotator"] == "Ada Lovelace"
    assert m.loc["obj1", "lat"] == -43.5 and m.loc["obj3", "lon"] == pytest.approx(-70.1)
    assert m.loc["obj1", "timestamp"] == pd.Timestamp("2024-03-01T04:20:00Z")
    # numeric [f] columns: probabilities and OOD scores at every level, as float32 wrote them
    assert m.loc["obj1", PREFIX + "p_class"] == pytest.approx(0.9) and m.loc["obj3", PREFIX + "p_level1"] == 0.25
    assert m.loc["obj2", PREFIX + "ood_energy_class"] == 7.25 and m.loc["obj1", PREFIX + "ood_max_logit_level3"] == -1.5
    assert np.isnan(m.loc["obj2", PREFIX + "knn"]) and m.loc["obj2", PREFIX + "inconsistent"] == 1
    # obj3 and obj4 share one image file, stored once
    files = dict(zip(src.metadata()["object_id"], src.metadata()["image"]))
    assert files["obj3"] == files["obj4"] and src.read_bytes(m.loc["obj3", "relpath"]) == IMAGES["s2/c.png"]
    assert dict(src.files())[m.loc["obj3", "relpath"]] == "Calanus finmarchicus adult"


def test_bundle_text_cells_and_types(bundle):
    res, _, raw = bundle
    table = read_table(raw, res["tsv"])
    assert table.kind == "import"
    assert table.types["object_lat"] == "f" and table.types[PREFIX + "p_class"] == "f"
    assert table.types[PREFIX + "pred_class"] == "t" and table.types["object_annotation_category"] == "t"
    rows = {r["object_id"]: r for r in table.rows}
    assert rows["obj2"][PREFIX + "review_comment"] == "'" + FORMULA
    assert rows["obj2"][PREFIX + "review_decision"] == "confirm_anomaly"
    assert rows["obj2"][PREFIX + "pred_class"] == "'-detritus"
    assert rows["obj3"][PREFIX + "review_comment"] == "line1 line2"
    assert rows["obj2"]["object_annotation_date"] == "20240502" and rows["obj2"]["object_annotation_time"] == "090000"
    assert rows["obj4"]["object_annotation_person_name"] == "" and rows["obj4"]["object_annotation_date"] == ""
    assert rows["obj1"]["object_lat"] == "-43.5" and rows["obj1"][PREFIX + "ood_energy_class"] == "-3.5"
    assert rows["obj1"][PREFIX + "model"] == "ndsb-resnet18" and rows["obj7"]["sample_id"] == "st2"
    assert all(safe_text(v) == v for r in table.rows for v in r.values())  # nothing left to neutralise


def test_without_images_names_the_collection_files_and_writes_predictions(tmp_path):
    t = _scored_table()
    res = export_bundle(t, META, tmp_path / "x.zip", keep_validated=False)
    with zipfile.ZipFile(tmp_path / "x.zip") as z:
        assert z.namelist() == [res["tsv"]]
        table = read_table(z.read(res["tsv"]), res["tsv"])
    rows = {r["object_id"]: r for r in table.rows}
    assert rows["obj4"]["img_file_name"] == "s2/c.png" and rows["obj3"]["img_file_name"] == "s2/c.png"
    assert rows["obj7"]["object_annotation_status"] == "predicted" and rows["obj7"]["object_annotation_category"] == "Calanoida"
    assert PREFIX + "review_decision" not in table.columns and res["images"] == 0
    assert check_ecotaxa_tsv(z_text(tmp_path / "x.zip", res["tsv"])) == []


def z_text(path: Path, name: str) -> str:
    with zipfile.ZipFile(path) as z:
        return z.read(name).decode("utf-8-sig")


def test_unreadable_image_file_leaves_its_row_out_and_the_write_is_atomic(tmp_path):
    def broken(relpath: str) -> bytes:
        if relpath == "s1/b.png":
            raise KeyError(relpath)
        return _read_image(relpath)

    out = tmp_path / "b.zip"
    res = export_bundle(_scored_table(), META, out, read_image=broken)
    assert "s1/b.png" in res["skipped"] and res["rows"] == 6
    assert [p.name for p in tmp_path.iterdir()] == ["b.zip"]  # no temporary file left beside it


def test_validator_finds_what_ecotaxa_refuses():
    good = "object_id\timg_file_name\tobject_lat\tobject_x\n[t]\t[t]\t[f]\t[f]\na\ta.png\t-43.5\t1\n"
    assert check_ecotaxa_tsv(good) == []
    probs = check_ecotaxa_tsv("object_id\tobject_x\na\t1\n")
    assert any("type row" in p for p in probs)
    probs = check_ecotaxa_tsv("object_id\tfoo\tsample_x\n[t]\t[t]\t[t]\na\t1\t2\na\t1\t2\n")
    assert any("'foo'" in p for p in probs) and any("sample_id" in p for p in probs)
    assert any("repeats" in p for p in probs)
    probs = check_ecotaxa_tsv("object_id\tobject_x\tobject_lat\tobject_y\n[t]\t[f]\t[f]\t[t]\na\tbig\t95\t=1+1\n")
    assert any("object_x" in p and "not a number" in p for p in probs)
    assert any("object_lat" in p for p in probs) and any("formula" in p for p in probs)
    probs = check_ecotaxa_tsv("object_id\tobject_annotation_status\n[t]\t[t]\na\tsure\n")
    assert any("status" in p for p in probs)


requires_ecotaxa = pytest.mark.skipif(not ECOTAXA.is_dir(), reason=f"real EcoTaxa files not found at {ECOTAXA}")


def _table_for(src) -> pd.DataFrame:
    """A scored table over a real collection (its metadata plus made-up predictions)."""
    t = src.metadata()
    t["dataset"], t["class"], t["split"], t["readable"] = src.name, "unlabelled", "all", True
    for lvl in ("level1", "class"):
        t[f"pred_{lvl}"] = "Copepoda"
        t[f"pred_conf_{lvl}"] = np.float32(0.5)
        t[f"ood_energy_{lvl}"] = np.float32(-2.0)
    return t


@requires_ecotaxa
@pytest.mark.parametrize("name", ["zooscan_import", "zooscan_import_plus", "vpr_import", "export_with_hierarchy",
                                  "uvp6_import.zip"])
def test_real_bundle_carries_its_original_columns(tmp_path, name):
    src = open_collection(ECOTAXA / name)
    original = read_original(src)
    meta = {**META, "levels": ["level1", "class"], "collection": src.name}
    out = tmp_path / "real.zip"
    res = export_bundle(_table_for(src), meta, out, read_image=src.read_bytes, original=original)
    assert res["problems"] == [] and res["rows"] == len(src.metadata()) and res["skipped"] == []
    with zipfile.ZipFile(out) as z:
        table = read_table(z.read(res["tsv"]), res["tsv"])
    back = open_collection(out)
    assert len(back.metadata()) == res["rows"]
    carried = [c for c in original.columns if c in table.columns and not c.startswith("object_annotation_")
               and c not in ("object_id", "img_file_name")]
    assert len(carried) == len(original.columns) - sum(
        c.startswith("object_annotation_") or c in ("object_id", "img_file_name") or c in res["dropped"]
        for c in original.columns)
    types = original.attrs["types"]
    assert all(table.types[c] == types[c] for c in carried if c in types)  # type row unchanged too
    once = original["object_id"].value_counts()
    by_id = {r["object_id"]: r for r in original.to_dict("records") if once[r["object_id"]] == 1}
    same = [r for r in table.rows if r["object_id"] in by_id]
    assert len(same) >= res["rows"] - 2  # all but an object on two images keep the original's id
    for r in same:
        o = by_id[r["object_id"]]
        assert {c: r[c] for c in carried} == {c: o[c] for c in carried}, r["object_id"]


@requires_ecotaxa
def test_real_export_drops_what_ecotaxa_refuses(tmp_path):
    src = open_collection(ECOTAXA / "export_with_hierarchy")
    res = export_bundle(_table_for(src), {**META, "levels": ["level1", "class"]}, tmp_path / "e.zip",
                        original=read_original(src))
    assert res["dropped"] == ["objid"] and res["problems"] == []
    assert "object_annotation_hierarchy" not in res["columns"]
