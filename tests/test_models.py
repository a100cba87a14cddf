"""Hierarchical classifiers: shapes, taxonomy-consistent probabilities, training, checkpoints, metrics."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.taxonomy import load_taxonomy
from models.architectures import create_model, list_architectures
from models.base import LevelOutput, images_to_tensor
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.data import load_dataset, subset
from models.metrics import consistency, evaluate_predictions, log_loss, mistake_severity, prf_macro, topk_accuracy
from models.backbone import CompactResNet
from models.train import WeightEMA, augment, level_loss, loss_weights
from models.handle import open_model
from models.zoo import default_model_name, list_models

from .conftest import REPO, requires_data, requires_full_data, tiny_train_command

ARCHS = list_architectures()


@pytest.fixture(scope="module")
def tax():
    return load_taxonomy("ndsb")


@pytest.fixture(scope="module")
def tiny(ndsb):
    """A tiny real subset: up to 4 images per class and split."""
    _, df, images, tax, _ = load_dataset("ndsb", 64, limit_per_class=4)
    return subset(df, images, tax, "train"), tax


def test_registry_has_the_four_architectures():
    assert set(ARCHS) >= {"flat", "bcnn", "bacnn", "sbacnn"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_level_has_logits_of_the_right_shape(arch, tax):
    torch.manual_seed(0)
    m = create_model(arch, tax).eval()
    x = torch.rand(5, 1, 64, 64)
    out = m(x)
    assert list(out) == list(tax.levels)
    for lvl in tax.levels:
        assert out[lvl].shape == (5, len(tax.names(lvl)))
        p = out[lvl].softmax(-1).sum(-1)
        assert torch.allclose(p, torch.ones(5), atol=1e-5)
    emb = m.embed(x)
    assert emb.ndim == 2 and emb.shape[0] == 5
    assert isinstance(m.gradcam_layer, torch.nn.Module)
    assert LevelOutput(m, "group")(x).shape == (5, len(tax.names("group")))


def test_flat_probabilities_sum_along_the_tree(tax):
    torch.manual_seed(1)
    m = create_model("flat", tax).eval()
    with torch.no_grad():
        p = m.predict_proba(torch.rand(4, 1, 64, 64))
    leaf = p["class"].numpy()
    for lvl in tax.levels[:-1]:
        np.testing.assert_allclose(leaf @ tax.level_matrix(lvl), p[lvl].numpy(), atol=1e-5)


def test_sbacnn_branches_split_the_level1_probability(tax):
    """SBA-CNN: at every level, the mass under each level-1 node equals that node's probability."""
    torch.manual_seed(1)
    m = create_model("sbacnn", tax).eval()
    with torch.no_grad():
        p = m.predict_proba(torch.rand(4, 1, 64, 64))
    for lvl in tax.levels[1:]:
        to_root = np.zeros((len(tax.names(lvl)), 3), dtype=np.float32)
        for j, name in enumerate(tax.names(lvl)):
            node = name
            for up in reversed(tax.levels[: tax.levels.index(lvl)]):
                node = tax.parent(tax.levels[tax.levels.index(up) + 1], node)
            to_root[j, tax.names("living").index(node)] = 1
        np.testing.assert_allclose(p[lvl].numpy() @ to_root, p["living"].numpy(), atol=1e-5)


@requires_data
@pytest.mark.parametrize("arch", ARCHS)
def test_one_epoch_lowers_the_loss(arch, tiny):
    train, tax = tiny
    torch.manual_seed(0)
    m = create_model(arch, tax)
    x_all = images_to_tensor(train.images)
    y = {k: torch.from_numpy(v) for k, v in train.labels.items()}

    def total_loss():
        # Recalibrate BatchNorm statistics on the subset (a few steps leave running stats stale),
        # then measure the loss in eval mode.
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        m.train()
        with torch.no_grad():
            for chunk in x_all.split(256):
                m(chunk)
        m.eval()
        with torch.no_grad():
            out = m(x_all)
            return sum(level_loss(out[lvl], y[lvl]).item() for lvl in m.levels)

    before = total_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(2):  # two passes of one epoch's batches over the subset
        for idx in torch.randperm(len(x_all), generator=g).split(64):
            out = m(augment(x_all[idx], g))
            w = loss_weights(arch, m.levels, 0.0)
            loss = sum(wi * level_loss(out[lvl], y[lvl][idx]) for wi, lvl in zip(w, m.levels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = total_loss()
    assert after < before, (before, after)


def _nyquist_share(stem_mode: str) -> float:
    """Share of an input gradient's energy at the 2-pixel period (the stride-2 stem's dot grid),
    averaged over randomly initialised backbones and real-looking smooth inputs."""
    shares = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = CompactResNet(1, stem_mode=stem_mode).eval()
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        x = torch.exp(-((yy - 32) ** 2 + (xx - 30) ** 2) / 200.0)[None, None].requires_grad_(True)
        net.forward_stages(x)[-1].sum().backward()
        g = x.grad[0, 0]
        spec = torch.fft.fft2(g - g.mean()).abs() ** 2
        nyq = spec[32, :].sum() + spec[:, 32].sum()
        shares.append(float(nyq / spec.sum()))
    return float(np.mean(shares))


def test_blur_stem_leaves_no_stride_grid_in_input_gradients():
    """Issue 17: the first zoo's stride-2 stem printed a dot grid on every saliency map; the blur
    stem (full-resolution convolution + anti-aliased pooling) must not."""
    stride2, blur = _nyquist_share("stride2"), _nyquist_share("blur")
    assert stride2 > 0.05, stride2  # the footprint is there with the old stem ...
    assert blur < stride2 / 20, (blur, stride2)  # ... and gone with the new one
    with pytest.raises(ValueError, match="stem_mode"):
        CompactResNet(1, stem_mode="strided")


def test_old_checkpoints_keep_their_stride2_stem(tax):
    assert isinstance(create_model("bacnn", tax).backbone.stem[0], torch.nn.Conv2d)
    assert create_model("bacnn", tax).backbone.stem[0].stride == (2, 2)  # no stem_mode in the config
    blur = create_model("bacnn", tax, {"stem_mode": "blur"})
    assert blur.backbone.stem[0].stride == (1, 1) and len(blur.backbone.stem) == 4


def test_weight_ema_averages_and_resumes(tax):
    torch.manual_seed(0)
    m = create_model("flat", tax)
    ema = WeightEMA(m, decay=0.9)
    w0 = m.head.weight.detach().clone()
    with torch.no_grad():
        m.head.weight.add_(1.0)
    for _ in range(200):
        ema.update(m)
    # after many updates the average reaches the new weights; early on it sits between them
    assert torch.allclose(ema.module.head.weight, m.head.weight, atol=1e-4)
    fresh = WeightEMA(m, decay=0.9)
    with torch.no_grad():
        m.head.weight.copy_(w0)
    fresh.update(m)
    d = min(0.9, 2 / 11)  # warm-up decay of the first update
    assert torch.allclose(fresh.module.head.weight, d * (w0 + 1) + (1 - d) * w0, atol=1e-5)
    again = WeightEMA(create_model("flat", tax), decay=0.9)
    again.load_state_dict(fresh.state_dict())
    assert again.updates == 1 and torch.equal(again.module.head.weight, fresh.module.head.weight)


def test_augment_keeps_range_and_background():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 1, 64, 64)
    x[:, :, 24:40, 28:36] = 1.0
    y = augment(x, g)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert float(y[:, :, :4, :4].abs().max()) == 0.0  # background stays background
    assert not torch.allclose(y[0], x[0])


def test_loss_weight_schedule_moves_to_fine_levels():
    lv = ("living", "group", "subgroup", "class")
    start, end = loss_weights("bcnn", lv, 0.0), loss_weights("bcnn", lv, 1.0)
    assert start[0] > start[-1] and end[-1] > end[0]
    assert loss_weights("flat", lv, 0.5) == [1.0] * 4


def test_focal_loss_downweights_easy_examples():
    logits = torch.tensor([[8.0, 0.0], [0.2, 0.0]])
    t = torch.tensor([0, 0])
    ce = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    focal = torch.stack([level_loss(logits[i : i + 1], t[i : i + 1], "focal") for i in range(2)])
    assert (focal < ce).all() and focal[0] / ce[0] < focal[1] / ce[1]


# --- checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, tax):
    torch.manual_seed(0)
    m = create_model("bacnn", tax).eval()
    path = save_checkpoint(m, tmp_path / "ck", dataset="ndsb", command="test")
    return m, path


def test_checkpoint_round_trip(saved):
    m, path = saved
    m2, manifest = load_checkpoint(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        for lvl in m.levels:
            torch.testing.assert_close(m(x)[lvl], m2(x)[lvl])
    for key in ("arch", "config", "levels", "class_names", "taxonomy", "preprocessing", "sha256", "command", "code_version", "dataset"):
        assert key in manifest


def test_timm_backbone_round_trips_and_explains(tax, tmp_path):
    """Issue 17's GPU zoo: the hierarchical heads on a timm trunk (random init), saved, reloaded,
    and explained by GradCAM on the trunk's last stage."""
    from explain.saliency import attribute

    torch.manual_seed(0)
    cfg = {"backbone": "timm/efficientnet_b0", "preprocessing": {"size": 96}}
    m = create_model("bacnn", tax, cfg).eval()
    x = torch.rand(2, 1, 96, 96)
    out = m(x)
    assert {k: v.shape[1] for k, v in out.items()} == {lvl: m.num_classes(lvl) for lvl in m.levels}
    m2, manifest = load_checkpoint(save_checkpoint(m, tmp_path / "timm", dataset="ndsb", command="test"))
    assert manifest["config"]["backbone"] == "timm/efficientnet_b0"
    with torch.no_grad():
        torch.testing.assert_close(m2(x)["class"], out["class"])
    amap = attribute(m2, x[:1], "class", method="gradcam")
    assert amap.shape[-2:] == (96, 96) and float(np.abs(amap).sum()) > 0
    with pytest.raises(ValueError, match="timm"):
        create_model("sbacnn", tax, cfg)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_model("flat", tax, {"backbone": "timm/no_such_net"})


def test_tampered_checkpoint_is_refused(saved):
    _, path = saved
    w = path.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(path)


def test_missing_or_broken_checkpoint_is_refused(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.json")
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(bad)


def test_checkpoint_is_loaded_without_pickle(saved):
    _, path = saved
    assert path.with_suffix(".safetensors").read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle


# --- metrics ----------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    r = prf_macro(y, p, 3)
    # class 0: P 1/2 R 1/2; class 1: P 2/3 R 1; class 2: P 0 R 0
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert r["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    f1_1 = 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert r["f1"] == pytest.approx((1 / 2 + f1_1 + 0) / 3)
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert log_loss(np.array([0, 1]), probs) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)
    assert topk_accuracy(np.array([2]), np.array([[0.5, 0.3, 0.2]]), 2) == 0.0
    assert topk_accuracy(np.array([1]), np.array([[0.5, 0.3, 0.2]]), 2) == 1.0


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import f1_score, log_loss as sk_log_loss, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    probs = rng.dirichlet(np.ones(6), 300)
    pred = probs.argmax(1)
    r = prf_macro(y, pred, 6)
    assert r["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert r["precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert r["recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert log_loss(y, probs) == pytest.approx(sk_log_loss(y, probs))


def test_consistency_and_mistake_severity(tax):
    c = tax.classes
    i = {n: k for k, n in enumerate(c)}
    a, b = i["copepod_calanoid"], i["detritus_blob"]
    preds = {lvl: np.array([tax.leaf_to_level(lvl)[a], tax.leaf_to_level(lvl)[a]]) for lvl in tax.levels}
    assert consistency(preds, tax) == 1.0
    preds["living"] = np.array([preds["living"][0], tax.leaf_to_level("living")[b]])
    assert consistency(preds, tax) == 0.5
    assert mistake_severity(np.array([a, a]), np.array([a, b]), tax) == 4.0
    assert mistake_severity(np.array([a]), np.array([a]), tax) == 0.0


def test_best_path_respects_the_taxonomy_where_the_argmax_does_not(tax):
    """Level 1 says "non-living" (0.55) over a leaf that is a copepod (0.6): the shown path is the
    leaf of highest product of probabilities with its ancestors, so one path, consistent."""
    from models.path import best_path, path_probabilities

    c = {n: k for k, n in enumerate(tax.classes)}
    cop, det = c["copepod_calanoid"], c["detritus_blob"]
    probs = {}
    for lvl in tax.levels:
        n = len(tax.names(lvl))
        p = np.full((2, n), 0.01 / n)
        a, b = tax.leaf_to_level(lvl)[cop], tax.leaf_to_level(lvl)[det]
        p[0, a], p[0, b] = 0.6, 0.39  # image 0: every level prefers the copepod's path
        p[1, a], p[1, b] = 0.6, 0.39
        probs[lvl] = p
    probs["living"][1] = 0.0
    probs["living"][1, tax.leaf_to_level("living")[det]] = 0.55
    probs["living"][1, tax.leaf_to_level("living")[cop]] = 0.45
    argmax = {lvl: p.argmax(1) for lvl, p in probs.items()}
    assert consistency(argmax, tax) == 0.5  # image 1's argmax contradicts itself
    path = best_path(probs, tax)
    assert consistency(path, tax) == 1.0 and (path["class"] == cop).all()  # 0.45·0.6³ > 0.55·0.39³
    assert path["living"][1] == tax.leaf_to_level("living")[cop]
    np.testing.assert_allclose(path_probabilities(probs, path)["living"], [0.6, 0.45])
    leaf_only = best_path({"class": probs["class"]}, tax)  # a one-level model: the argmax lifted
    assert (leaf_only["class"] == cop).all() and set(leaf_only) == set(tax.levels)
    r = evaluate_predictions(probs, {lvl: np.array([tax.leaf_to_level(lvl)[cop]] * 2) for lvl in tax.levels}, tax)
    assert r["path_consistency"] == 1.0 and r["consistency"] == 0.5
    assert r["levels"]["living"]["accuracy"] == 1.0 and r["argmax_levels"]["living"]["accuracy"] == 0.5
    assert r["level1_recall"]["living"] == 1.0 and r["level1_recall"]["non-living"] is None


# --- training CLI and the zoo ------------------------------------------------------------
@requires_data
def test_train_cli_checkpoints_and_resumes(tmp_path):
    base = tiny_train_command(tmp_path, "--arch", "flat")
    r1 = subprocess.run(base + ["--epochs", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run(base + ["--epochs", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "resuming ndsb-flat from epoch 1" in r2.stderr
    model, manifest = load_checkpoint(tmp_path / "zoo" / "ndsb-flat.json")
    assert [h["epoch"] for h in manifest["history"]] == [1, 2]
    assert set(manifest["metrics"]["test"]["levels"]) == set(model.levels)
    assert manifest["command"].startswith("python -m models.train")
    assert manifest["config"]["stem_mode"] == "blur"
    h = manifest["history"][-1]
    assert set(h["val_accuracy_raw"]) == set(model.levels)  # the EMA ablation's raw figures
    for h in manifest["history"]:  # each epoch's candidate is the better of the EMA and the raw weights
        leaf = model.levels[-1]
        assert h["kept"] == ("raw" if h["val_accuracy_raw"][leaf] > h["val_accuracy"][leaf] else "ema")
    state = torch.load(tmp_path / "runs" / "ndsb-flat" / "last.pt", weights_only=True)
    assert state["ema"]["updates"] > 0  # the EMA resumes with the run


ZOO = [m for m in list_models() if m.get("kind") == "classifier" and str(m["path"]).startswith(str(REPO))]


@pytest.mark.skipif(not ZOO, reason="no committed zoo model")
@pytest.mark.parametrize("entry", ZOO, ids=[m["name"] for m in ZOO])
def test_committed_zoo_models_load_and_are_small(entry):
    model, manifest = open_model(entry["name"]).classifier, open_model(entry["name"]).manifest
    assert manifest["size_bytes"] <= 20 * 2**20
    assert manifest["command"].startswith("python -m models.train")
    assert manifest["metrics"]["test"]["leaf"]["accuracy"] > 0.3  # a trained model, far above chance (1/121)


@requires_full_data
@pytest.mark.skipif(not ZOO, reason="no committed zoo model")
def test_evaluate_cli_json_shape():
    # the default model, whose manifest holds the test report of its training run (or of its refit)
    name = default_model_name() if default_model_name() in {m["name"] for m in ZOO} else ZOO[0]["name"]
    report = open_model(name).manifest["metrics"]["test"]
    out = subprocess.run([sys.executable, "-m", "models.evaluate", "--model", name, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["model"] == name and list(r["levels"]) == ["living", "group", "subgroup", "class"]
    for v in [*r["levels"].values(), r["leaf"]]:
        for x in v.values():
            assert 0 <= x <= 1 or x == r["leaf"]["log_loss"]
    assert 0 <= r["consistency"] <= 1 and r["mistake_severity"] >= 0 and r["path_consistency"] == 1.0
    # the manifest's report is reproduced: a report written since the shown path holds both the
    # shown path's levels and the per-level argmax; an older one holds the argmax only, as `levels`
    argmax = report.get("argmax_levels", report["levels"])
    for lvl in r["levels"]:
        assert r["argmax_levels"][lvl]["accuracy"] == pytest.approx(argmax[lvl]["accuracy"], abs=1e-3), lvl
        if "argmax_levels" in report:
            assert r["levels"][lvl]["accuracy"] == pytest.approx(report["levels"][lvl]["accuracy"], abs=1e-3), lvl
    assert set(r["level1_recall"]) == {"living", "non-living", "unknown", "balanced_accuracy"}


def test_learning_curves_read_a_manifest_outside_the_zoo(tmp_path):
    """bench/compare_archs.sh tabulates manifests in runs/compare, which the zoo does not list."""
    from models.evaluate import learning_curves

    hist = [{"epoch": e, "train_loss": 5.0 - e, "val_accuracy": {"living": 0.9, "group": 0.7, "subgroup": 0.6, "class": 0.1 * e},
             "val_log_loss": 2.0 / e, "elapsed_s": 100.0 * e} for e in (1, 2)]
    (tmp_path / "cmp2-flat.json").write_text(json.dumps({"name": "cmp2-flat", "history": hist}))
    rows = learning_curves([str(tmp_path / "cmp2-flat.json")]).splitlines()
    assert rows[2:] == ["| cmp2-flat | 1 | 4.000 | 90.0 | 70.0 | 60.0 | 10.0 | 2.000 | 100 |",
                        "| cmp2-flat | 2 | 3.000 | 90.0 | 70.0 | 60.0 | 20.0 | 1.000 | 200 |"]


def test_zoo_cli_json():
    out = subprocess.run([sys.executable, "-m", "models.zoo", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert isinstance(json.loads(out.stdout), list)
