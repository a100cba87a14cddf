"""Bring your own model: networks built here (random weights) in every format a lab has, registered
with ``python -m models add``, listed by the zoo, explained at every level and shown by every page;
each bad input refused with a message and nothing registered."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, requires_data, shown

pytestmark = requires_data
SIZE = 64  # px: small inputs keep the suite fast; the 224 px figure is in bench/bench_foreign_model.py


def _add(*argv: str) -> int:
    from models.__main__ import main

    return main(["add", *argv])


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """A user's model folder holding five imported models, and their source files."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    from data.taxonomy import load_taxonomy
    from models.handle import clear_cache

    tmp = tmp_path_factory.mktemp("byo")
    zoo = tmp / "zoo"
    old = os.environ.get("PLANKTON_LENS_ZOO")
    os.environ["PLANKTON_LENS_ZOO"] = str(zoo)
    classes = load_taxonomy("ndsb").classes
    (tmp / "classes.txt").write_text("\n".join(classes))
    torch.manual_seed(0)
    r18 = timm.create_model("resnet18", num_classes=len(classes)).eval()
    torch.save(r18.state_dict(), tmp / "lab_resnet18.pth")
    eff = torchvision.models.efficientnet_b0(num_classes=len(classes))
    save_file({k: v.contiguous() for k, v in eff.state_dict().items()}, str(tmp / "effnet.safetensors"))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=len(classes), img_size=SIZE)
    torch.save(vit.state_dict(), tmp / "vit.pth")
    torch.jit.trace(r18, torch.zeros(1, 3, SIZE, SIZE)).save(str(tmp / "traced.pt"))
    folder = tmp / "hub" / "lab-mobilenet"
    folder.mkdir(parents=True)
    mb = timm.create_model("mobilenetv3_small_050", num_classes=len(classes))
    save_file({k: v.contiguous() for k, v in mb.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "mobilenetv3_small_050", "num_classes": len(classes),
        "label_names": classes,
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    assert _add(str(tmp / "lab_resnet18.pth"), "--name", "byo-resnet18", "--arch", "resnet18",
                "--classes", str(tmp / "classes.txt"), "--size", str(SIZE)) == 0
    assert _add(str(tmp / "effnet.safetensors"), "--name", "byo-effnet", "--arch", "efficientnet_b0",
                "--dataset", "ndsb", "--size", str(SIZE)) == 0
    assert _add(str(tmp / "vit.pth"), "--name", "byo-vit", "--arch", "timm/vit_tiny_patch16_224",
                "--dataset", "ndsb", "--size", str(SIZE)) == 0
    assert _add(str(folder), "--name", "byo-mobilenet") == 0
    # the real command line, in its own process
    env = {**os.environ, "PLANKTON_LENS_ZOO": str(zoo)}
    r = subprocess.run([sys.executable, "-m", "models", "add", str(tmp / "traced.pt"), "--name", "byo-traced",
                        "--classes", str(tmp / "classes.txt"), "--size", str(SIZE)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "added byo-traced" in r.stdout
    clear_cache()
    yield {"tmp": tmp, "zoo": zoo, "classes": classes, "names": ["byo-resnet18", "byo-effnet", "byo-vit", "byo-mobilenet", "byo-traced"]}
    if old is None:
        os.environ.pop("PLANKTON_LENS_ZOO", None)
    else:
        os.environ["PLANKTON_LENS_ZOO"] = old
    clear_cache()


def test_registered_models_are_in_the_zoo(byo):
    r = subprocess.run([sys.executable, "-m", "models.zoo", "--json"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PLANKTON_LENS_ZOO": str(byo["zoo"])}, timeout=300)
    assert r.returncode == 0, r.stderr
    listed = {m["name"]: m for m in json.loads(r.stdout)}
    for name in byo["names"]:
        assert name in listed and "error" not in listed[name], name
        assert listed[name]["kind"] == "classifier" and listed[name]["source"] == "imported"
    assert "ndsb-bacnn" in listed  # the project's own models stay listed beside them
    man = json.loads((byo["zoo"] / "byo-resnet18.json").read_text())
    assert len(man["sha256"]) == 64 and man["preprocessing"]["channels"] == 3 and man["dataset"] == "ndsb"
    assert man["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and man["gradcam_layer"] == "layer4"


@pytest.mark.parametrize("name", ["byo-resnet18", "byo-effnet", "byo-vit", "byo-mobilenet", "byo-traced"])
def test_imported_model_predicts_embeds_and_explains(byo, name):
    import timm

    from explain.predict import predict
    from explain.saliency import attribute
    from models.handle import open_model

    lm = open_model(name)
    m = lm.classifier
    assert lm.levels == ("living", "group", "subgroup", "class") and lm.key == f"{name}:{lm.sha256}"
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        out = m(x)
    assert out["class"].shape == (2, 121)
    # higher levels are leaf probabilities summed along the NDSB taxonomy
    p_leaf = out["class"].softmax(-1)
    p_group = torch.from_numpy(m.taxonomy.level_matrix("group"))
    assert torch.allclose(out["group"].exp(), p_leaf @ p_group, atol=1e-5)
    pred = predict(m, x[:1], k=3)
    assert set(pred.path) == set(m.levels)
    emb = m.embed(x)
    assert emb.ndim == 2 and emb.shape[0] == 2
    if name == "byo-resnet18":  # the adapter feeds the network what it expects: inverted, 3 channels, ImageNet-normalised
        ref = timm.create_model("resnet18", num_classes=121).eval()
        ref.load_state_dict(torch.load(byo["tmp"] / "lab_resnet18.pth", weights_only=True))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            want = ref(((1 - x).expand(-1, 3, -1, -1) - mean) / std)
        assert torch.allclose(out["class"], want, atol=1e-4) and emb.shape[1] == 512
    methods = ["integrated_gradients", "saliency"] + ([] if name == "byo-traced" else ["gradcam"])
    for lvl in m.levels:
        for method in methods:
            a = attribute(m, x[:1], lvl, None, method, n_steps=8, signed=True)  # a ReLU-ed CAM of random weights may be all 0
            assert a.shape == (SIZE, SIZE) and float(abs(a).sum()) > 0, (name, lvl, method)
    if name == "byo-traced":
        with pytest.raises(NotImplementedError, match="GradCAM needs a layer"):
            m.gradcam_layer


def test_class_order_of_the_head_is_kept(byo):
    """A head trained over classes in its own order (id2label) is read in that order."""
    import timm
    from safetensors.torch import save_file

    from models.handle import open_model

    classes = byo["classes"]
    order = list(reversed(classes))
    folder = byo["tmp"] / "hub" / "reversed"
    folder.mkdir(parents=True)
    net = timm.create_model("resnet18", num_classes=121).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 121,
                                                    "id2label": {str(i): c for i, c in enumerate(order)}}))
    assert _add(str(folder), "--name", "byo-reversed", "--size", str(SIZE)) == 0
    m = open_model("byo-reversed").classifier
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        raw = net(m.normalise(x).expand(-1, 3, -1, -1) if m.normalise(x).shape[1] == 1 else m.normalise(x))[0]
        got = m(x)["class"][0]
    for i, c in enumerate(m.class_names["class"]):
        assert torch.isclose(got[i], raw[order.index(c)], atol=1e-4), c
    from models.importer import remove_model

    remove_model("byo-reversed")


@pytest.mark.parametrize("name", ["byo-resnet18", "byo-vit", "byo-traced", "byo-effnet", "byo-mobilenet"])
def test_every_page_renders_with_the_imported_model(byo, name, cruise, tmp_path, monkeypatch):
    """Classify & explain (IG and GradCAM at every level), and Anomalies, Neighbourhoods and Review
    on an unlabelled collection scored with the imported model (against a small reference: 2
    images per class and split of NDSB)."""
    from streamlit.testing.v1 import AppTest

    from explain.score import run
    from tests.conftest import scored_map

    monkeypatch.setenv("PLANKTON_LENS_REFERENCE_LIMIT", "2")
    assert run(name, cruise)["rows"] == 48
    scored_map(name, cruise)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["model_name"] = name
    at.session_state["collection"] = cruise
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("pages/classify.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["model_name"] == name
    captions = [c for im in at.get("image") for c in im.captions]
    assert all(any(c.startswith(f"{lvl}: ") for c in captions) for lvl in ("living", "group", "subgroup", "class")), captions
    methods = at.selectbox(key="method").options
    if name == "byo-traced":
        assert "gradcam" not in methods
    else:
        at.selectbox(key="method").set_value("gradcam").run()
        assert not at.exception, [e.value for e in at.exception]
        captions = [c for im in at.get("image") for c in im.captions]
        assert any(c.startswith("GradCAM · class: ") for c in captions)
        assert all(any(c.startswith(f"{lvl}: ") for c in captions) for lvl in ("living", "group", "subgroup", "class"))
    for page, title in (("pages/anomalies.py", "Anomalies"), ("pages/neighbourhoods.py", "Neighbourhoods"),
                        ("pages/review.py", "Review")):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        assert at.title[0].value == title and at.session_state["model_name"] == name
        if page != "pages/review.py":
            assert at.get("plotly_chart"), page


# --- bad input ------------------------------------------------------------------------------------
def _refused(capsys, byo, *argv: str) -> str:
    before = sorted(p.name for p in byo["zoo"].iterdir())
    assert _add(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert sorted(p.name for p in byo["zoo"].iterdir()) == before, "a refused model left files behind"
    return err


def test_bad_inputs_are_refused_with_a_message(byo, capsys):
    import timm

    tmp = byo["tmp"]
    classes = str(tmp / "classes.txt")
    (tmp / "notes.txt").write_text("not a model")
    assert "not a model file" in _refused(capsys, byo, str(tmp / "notes.txt"), "--name", "x1", "--arch", "resnet18", "--classes", classes)
    whole = timm.create_model("resnet18", num_classes=121)
    torch.save(whole, tmp / "whole.pt")
    err = _refused(capsys, byo, str(tmp / "whole.pt"), "--name", "x2", "--classes", classes)
    assert "never unpickled by default" in err and "--trust-pickle" in err
    assert "Unknown architecture 'resnet-eighteen'" in _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "x3",
                                                                 "--arch", "resnet-eighteen", "--classes", classes)
    (tmp / "few.txt").write_text("\n".join(byo["classes"][:10]))
    err = _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "x4", "--arch", "resnet18", "--classes", str(tmp / "few.txt"))
    assert "head has 121 outputs but the class list has 10" in err
    assert "classes are missing" in _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "x5", "--arch", "resnet18")
    (tmp / "tax_missing.csv").write_text("group,class\n" + "\n".join(f"g,{c}" for c in byo["classes"][1:]))
    assert "taxonomy misses 1 of the model's classes" in _refused(
        capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "x6", "--arch", "resnet18", "--classes", classes,
        "--taxonomy", str(tmp / "tax_missing.csv"))
    rows = [f"{'a' if i % 2 else 'b'},{'s' + str(i % 3)},{c}" for i, c in enumerate(byo["classes"])]
    (tmp / "tax_two_parents.csv").write_text("group,subgroup,class\n" + "\n".join(rows))
    err = _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "x7", "--arch", "resnet18", "--classes", classes,
                   "--taxonomy", str(tmp / "tax_two_parents.csv"))
    assert "several group parents" in err
    assert "does not exist" in _refused(capsys, byo, str(tmp / "nope.pth"), "--name", "x8", "--arch", "resnet18")
    assert "cannot be used" in _refused(capsys, byo, "/tmp/" + "a" * 300 + ".pth", "--name", "x9", "--arch", "resnet18")
    assert "already in the zoo" in _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "byo-resnet18",
                                            "--arch", "resnet18", "--classes", classes)
    assert "not a usable model name" in _refused(capsys, byo, str(tmp / "lab_resnet18.pth"), "--name", "../evil",
                                                 "--arch", "resnet18", "--classes", classes)


def test_trusted_pickle_and_a_changed_checkpoint(byo, capsys):
    import timm

    from models.checkpoint import CheckpointError
    from models.handle import open_model
    from models.importer import remove_model

    tmp = byo["tmp"]
    torch.save(timm.create_model("resnet18", num_classes=121), tmp / "whole2.pt")
    assert _add(str(tmp / "whole2.pt"), "--name", "byo-whole", "--classes", str(tmp / "classes.txt"),
                "--size", str(SIZE), "--trust-pickle") == 0
    assert "warning: --trust-pickle" in capsys.readouterr().err
    assert open_model("byo-whole").classifier(torch.rand(1, 1, SIZE, SIZE))["class"].shape == (1, 121)
    # the weights change after registration: refused with a message, never loaded
    with open(tmp / "whole2.pt", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CheckpointError, match="integrity check"):
        open_model("byo-whole")
    remove_model("byo-whole")


def test_a_broken_entry_is_listed_and_hides_no_model(byo, capsys):
    from models.handle import open_model
    from models.zoo import list_models, main

    bad = byo["zoo"] / "ndsb-bacnn.json"
    bad.write_text("{ not json")
    try:
        entries = [m for m in list_models() if m["name"] == "ndsb-bacnn"]
        assert any("error" in m and "not valid JSON" in m["error"] for m in entries)
        assert any("error" not in m for m in entries)  # the project's model of that name is still there
        assert open_model("ndsb-bacnn").manifest["format"].startswith("plankton-lens-checkpoint")
        main([])
        assert "ndsb-bacnn" in capsys.readouterr().out.split("ERROR")[1]
        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
        assert not at.exception
        assert any("ndsb-bacnn" in shown(w.value) and "not valid JSON" in shown(w.value) for w in at.warning), \
            [w.value for w in at.warning]
    finally:
        bad.unlink()


def test_clip_checkpoint_added_and_on_the_clip_page(byo, tmp_path):
    """An open_clip model folder (open_clip_config.json + weights), as BioCLIP ships."""
    import open_clip
    from safetensors.torch import save_file
    from streamlit.testing.v1 import AppTest

    from models.clip_model import register_configs
    from models.handle import open_model

    vit = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "byo-tiny-clip.json").write_text(json.dumps(vit))
    name = register_configs(tmp_path / "byo-tiny-clip.json")[0]
    folder = tmp_path / "bioclip-like"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": vit, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    save_file({k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    assert _add(str(folder), "--name", "byo-clip", "--dataset", "ndsb") == 0
    lm = open_model("byo-clip")
    assert lm.kind == "clip" and lm.require_clip().size == 32
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["clip_model_name"] = "byo-clip"
    at.run()
    at.switch_page("pages/clip.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.selectbox(key="clip_model_name").value == "byo-clip"
    assert any("Zero-shot names" in m.value for m in at.markdown)


def test_imported_vit_on_the_classify_page_in_a_browser(byo, page):
    """Pick the imported ViT in the sidebar of a live server; Classify & explain shows its
    predictions and a map per level, with no exception or console error."""
    from tests.conftest import ARTIFACTS, explain_with_model, run_streamlit_server
    from tests.test_page_clip import _no_errors, _watch

    with run_streamlit_server("streamlit-byo.log", env={"PLANKTON_LENS_ZOO": str(byo["zoo"])}, script="app.py") as url:
        probes = _watch(page, url)
        explain_with_model(page, url, "byo-vit")
        _no_errors(page, probes)
        page.screenshot(path=str(ARTIFACTS / "classify_byo_vit.png"), full_page=True)


ECOTAXA_EXPORT = REPO.parent / "shared" / "ecotaxa" / "export_with_hierarchy" / "ecotaxa_export_1_20210530_1122.tsv"


@pytest.mark.skipif(not ECOTAXA_EXPORT.is_file(), reason="../shared/ecotaxa not found")
def test_classes_and_taxonomy_from_an_ecotaxa_export(byo):
    """EcoTaxa's own export gives the class list and, from its hierarchy strings, the levels."""
    import timm
    from safetensors.torch import save_file

    from models.handle import open_model

    net = timm.create_model("resnet18", num_classes=6)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(byo["tmp"] / "eco.safetensors"))
    assert _add(str(byo["tmp"] / "eco.safetensors"), "--name", "byo-ecotaxa", "--arch", "resnet18", "--size", str(SIZE),
                "--classes", str(ECOTAXA_EXPORT), "--taxonomy", str(ECOTAXA_EXPORT)) == 0
    lm = open_model("byo-ecotaxa")
    tax = lm.classifier.taxonomy
    assert tax.classes == ["Cyclopoida", "Oncaeidae", "detritus", "egg<other", "other<Biota", "t001"]
    assert lm.levels == ("level1", "level2", "level3", "class")
    assert tax.path("Oncaeidae") == {"level1": "Biota", "level2": "Animalia", "level3": "Arthropoda", "class": "Oncaeidae"}
    assert tax.path("egg<other")["level2"] == "other" and tax.path("detritus")["level1"] == "not-living"
    assert lm.dataset is None
    with torch.no_grad():
        out = lm.classifier(torch.rand(1, 1, SIZE, SIZE))
    assert out["level1"].shape == (1, 3) and out["class"].shape == (1, 6)


def test_home_page_form_adds_a_model_under_the_allowed_roots(byo, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PLANKTON_LENS_ROOTS", str(byo["tmp"] / "hub"))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    at.text_input(key="add_path").set_value(str(byo["tmp"] / "lab_resnet18.pth"))
    at.text_input(key="add_name").set_value("byo-form")
    _submit(at)
    assert any("outside the folders this server may read" in e.value for e in at.error), [e.value for e in at.error]
    assert not (byo["zoo"] / "byo-form.json").exists()
    at.text_input(key="add_path").set_value(str(byo["tmp"] / "hub" / "lab-mobilenet" / ".." / ".." / "lab_resnet18.pth"))
    _submit(at)
    assert any("outside the folders" in e.value for e in at.error)  # '..' out of a root is refused too
    at.text_input(key="add_path").set_value(str(byo["tmp"] / "hub" / "lab-mobilenet"))
    at.number_input(key="add_size").set_value(SIZE)
    _submit(at)
    assert not at.exception and any("Added byo-form" in shown(s.value) for s in at.success), [e.value for e in at.error]
    assert (byo["zoo"] / "byo-form.json").exists()
    from models.importer import remove_model

    remove_model("byo-form")


def _submit(at) -> None:
    next(b for b in at.button if b.label == "Add model").click()
    at.run()


def test_rgb_model_gets_colour_images_in_colour(byo):
    """A 3-channel model imported for ZooLake (a colour, dark-field camera) reads ZooLake images in
    colour and NDSB's grey ones replicated; the Classify page explains a ZooLake image with it."""
    import numpy as np
    import timm
    from streamlit.testing.v1 import AppTest

    from data.decode import keeps_colour, load_for_model
    from data.sources import available_sources
    from data.taxonomy import load_taxonomy
    from models.base import images_to_tensor
    from models.handle import open_model

    if "zoolake" not in available_sources():
        pytest.skip("needs the ZooLake archive")
    classes = load_taxonomy("zoolake").classes
    net = timm.create_model("resnet18", num_classes=len(classes)).eval()
    torch.save(net.state_dict(), byo["tmp"] / "zoolake_r18.pth")
    assert _add(str(byo["tmp"] / "zoolake_r18.pth"), "--name", "byo-zoolake", "--arch", "resnet18", "--dataset", "zoolake",
                "--polarity", "light-on-dark", "--size", str(SIZE)) == 0
    lm = open_model("byo-zoolake")
    pp = lm.preprocessing
    assert pp["colour"] and lm.dataset == "zoolake"
    src = available_sources()["zoolake"]
    rel = src.files()[0][0]
    fg, dec, _ = load_for_model(src.read_bytes(rel), SIZE, mode=src.mode, background=src.background,
                                colour=keeps_colour(pp, src.mode))
    assert fg.shape == (SIZE, SIZE, 3) and np.abs(fg[..., 0].astype(int) - fg[..., 2]).max() > 10
    assert "colour converted to grey" not in dec.notes
    x = images_to_tensor(fg)
    assert x.shape == (1, 3, SIZE, SIZE)
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(lm.classifier(x)["class"], net((x - mean) / std), atol=1e-4)  # light-on-dark: as is
    ndsb = available_sources()["ndsb"]
    assert not keeps_colour(pp, ndsb.mode)  # a grey instrument: grey, replicated by the normalisation
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["model_name"] = "byo-zoolake"
    at.session_state["collection"] = "zoolake"
    at.run()
    at.switch_page("pages/classify.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    captions = [c for im in at.get("image") for c in im.captions]
    assert any(c.startswith("class: ") for c in captions)


def test_a_model_without_taxonomy_has_one_level_and_every_page_copes(byo, cruise, tmp_path):
    """Classes that no known taxonomy holds and no --taxonomy: one level; Classify explains with
    it; a collection scored with it has logit scores but no gallery and no validation images, and
    Anomalies, Neighbourhoods and Review say so instead of failing."""
    import timm
    from streamlit.testing.v1 import AppTest

    from models.handle import open_model

    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), tmp_path / "lab.pth")
    (tmp_path / "lab.txt").write_text("alpha\nbeta\ngamma\ndelta\n")
    assert _add(str(tmp_path / "lab.pth"), "--name", "byo-one-level", "--arch", "resnet18", "--classes",
                str(tmp_path / "lab.txt"), "--size", str(SIZE)) == 0
    lm = open_model("byo-one-level")
    assert lm.levels == ("class",) and lm.dataset is None
    assert lm.classifier.class_names["class"] == ["alpha", "beta", "delta", "gamma"]
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    at.session_state["model_name"] = "byo-one-level"
    at.run()
    at.switch_page("pages/classify.py").run()
    assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
    assert any(c.startswith("class: ") for im in at.get("image") for c in im.captions)
    from explain.score import run, scored_table

    run("byo-one-level", cruise)
    t = scored_table("byo-one-level", cruise)
    assert t.validation is None and t.thresholds == {} and t.table["knn_score"].isna().all()
    at.session_state["collection"] = cruise
    for page in ("pages/anomalies.py", "pages/neighbourhoods.py", "pages/review.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        texts = " ".join(str(x.value) for x in [*at.info, *at.warning, *at.caption, *at.markdown])
        assert "byo" in texts or "cruise" in texts, page
    at.switch_page("pages/anomalies.py").run()
    assert any("has no validation images here" in i.value for i in at.info)
