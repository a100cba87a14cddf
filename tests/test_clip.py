"""The plankton CLIP model: captions, open_clip registration, contrastive training, checkpoints,
local pretrained weights, zero-shot, anomaly scores, prompt explanations and the benchmark.

Everything runs on tiny real NDSB subsets with a tiny model trained here; the tests marked
``trained`` check the zoo's ``ndsb-clip`` and are skipped until it has been trained.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import requires_data, requires_full_data

TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": "plankton_cnn_tiny", "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_config(folder: Path, name: str = "plankton-clip-test") -> Path:
    p = folder / f"{name}.json"
    p.write_text(json.dumps(TINY_CFG))
    return p


def train_tiny(tmp: Path, name: str, steps: int = 3, fresh: bool = True, extra: list[str] | None = None) -> dict:
    from models.clip_train import train

    cfg = tiny_config(tmp)
    argv = ["--config", str(cfg), "--limit-per-class", "3", "--max-steps", str(steps), "--batch-size", "48",
            "--export-dir", str(tmp / "zoo"), "--runs-dir", str(tmp / "runs"), "--name", name, "--threads", "1",
            "--no-progress"] + (["--fresh"] if fresh else []) + list(extra or [])
    return train(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP trained for a few steps with the real command, in its own zoo folder."""
    from tests.conftest import _have_datasets

    if not _have_datasets():
        pytest.skip("NDSB dataset not found")
    tmp = tmp_path_factory.mktemp("clipzoo")
    res = train_tiny(tmp, "tiny-clip")
    old = os.environ.get("PLANKTON_LENS_ZOO")
    os.environ["PLANKTON_LENS_ZOO"] = os.pathsep.join([str(tmp / "zoo"), *([old] if old else [])])
    from models.handle import open_model

    pc, man = (open_model("tiny-clip").require_clip(), open_model("tiny-clip").manifest)
    yield {"tmp": tmp, "result": res, "pc": pc, "manifest": man}
    if old is None:
        os.environ.pop("PLANKTON_LENS_ZOO", None)
    else:
        os.environ["PLANKTON_LENS_ZOO"] = old


@pytest.fixture(scope="module")
def images(ndsb, ndsb_manifest):
    """Two real test images per class (first by file name), decoded as the models see them."""
    from data.manifest import decoded_array
    from explain.clip import gallery_rows

    rows = gallery_rows(ndsb_manifest, per_class=2)
    return rows, np.asarray(decoded_array(ndsb, rows, 64, progress=False))


# --- captions ---------------------------------------------------------------------------------
def test_captions_cover_every_class_and_template():
    from data.taxonomy import load_taxonomy
    from models.captions import TEMPLATES, class_captions, class_words, descriptors_for

    tax = load_taxonomy("ndsb")
    assert class_words("copepod_calanoid_eucalanus") == "eucalanus calanoid copepod"
    for cls in tax.classes:
        caps = class_captions(tax, cls)
        assert {c.template for c in caps} == set(TEMPLATES), cls
        assert descriptors_for(tax, cls), f"{cls} has no descriptor at class, subgroup or group level"
        for c in caps:
            assert "{" not in c.text and "_" not in c.text, c.text
            assert c.text == c.text.strip() and "  " not in c.text
        words = class_words(cls)
        assert words and "_" not in words
        assert any(words in c.text for c in caps)
        assert any(tax.path(cls)["subgroup"] in c.text for c in caps)


def test_caption_table_marks_shared_captions_and_fits_the_context():
    import open_clip

    import models.clip_model  # noqa: F401 - registers the repository's open_clip configs
    from data.taxonomy import load_taxonomy
    from models.captions import caption_table

    tax = load_taxonomy("ndsb")
    caps, valid = caption_table(tax)
    assert valid.shape == (len(caps), len(tax.classes)) and len(set(caps)) == len(caps)
    assert valid.any(0).all() and valid.any(1).all()
    shared = caps.index("a shadowgraph image of crustaceans")
    crust = set(tax.table.loc[tax.table["group"] == "crustaceans", "class"])
    assert {tax.classes[j] for j in np.flatnonzero(valid[shared])} == crust
    tok = open_clip.get_tokenizer("plankton-clip-small")
    assert tok.context_length == 32
    too_long = [c for c in caps if len(tok.encode(c)) + 2 > tok.context_length]
    assert not too_long, too_long[:3]


def test_training_captions_never_name_heldout_classes():
    from data.splits import heldout_classes
    from data.taxonomy import load_taxonomy
    from models.captions import NAME_TEMPLATES, class_words, path_fields
    from models.clip_model import create_clip
    from models.clip_train import CaptionSampler

    tax = load_taxonomy("ndsb")
    held = heldout_classes("ndsb")
    known = [c for c in tax.classes if c not in held]
    sampler = CaptionSampler(create_clip(), tax, known)
    captions = set(sampler.captions)
    for cls in held:
        assert not captions & {t.format(**path_fields(tax, cls)) for t in NAME_TEMPLATES}
    assert not any("eucalanus" in c or "solmaris" in c or "abylidae" in c for c in captions)
    assert sampler.valid.shape == (len(sampler.captions), len(known))
    assert all(len(p) for p in sampler.per_class)


def test_prompt_bank_has_every_kind_and_every_class():
    from data.taxonomy import load_taxonomy
    from models.captions import prompt_bank, taxonomy_prompt

    tax = load_taxonomy("ndsb")
    bank = prompt_bank(tax)
    assert set(bank["kind"]) == {"taxonomy", "morphology", "non-living"}
    assert bank["prompt"].is_unique
    assert set(tax.classes) <= set(bank.loc[bank["level"] == "class", "taxon"])
    assert taxonomy_prompt(tax, "copepod_calanoid_eucalanus") == "living > crustaceans > calanoid copepods > eucalanus calanoid copepod"
    assert "amorphous shape with no structure" in set(bank.loc[bank["kind"] == "non-living", "prompt"])


# --- model ------------------------------------------------------------------------------------
def test_default_config_is_registered_from_the_repository():
    import open_clip
    from open_clip.timm_model import TimmModel

    from models.clip_model import CONFIG_DIR, PlanktonCNN, create_clip

    assert "plankton-clip-small" in open_clip.list_models()
    assert json.loads((CONFIG_DIR / "plankton-clip-small.json").read_text()) == open_clip.get_model_config("plankton-clip-small")
    pc = create_clip()
    assert isinstance(pc.clip, open_clip.CLIP) and isinstance(pc.clip.visual, TimmModel)
    trunk = pc.clip.visual.trunk
    assert isinstance(trunk, PlanktonCNN) and trunk.body.stem[0].in_channels == 1
    assert type(pc.tokenizer).__name__ == "SimpleTokenizer" and pc.context_length == 32
    img = pc.encode_image(torch.rand(3, 1, 64, 64))
    txt = pc.encode_text(["a copepod", "amorphous shape with no structure"])
    assert img.shape == (3, 128) and txt.shape == (2, 128)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    n = sum(p.numel() for p in pc.clip.visual.parameters())
    assert 1e6 < n < 3e6


def test_multi_positive_loss_reduces_to_clip_loss_and_ignores_shared_positives():
    import torch.nn.functional as F

    from models.clip_train import multi_positive_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g)
    eye = torch.eye(5, dtype=torch.bool)
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(multi_positive_loss(logits, eye), clip, atol=1e-6)
    # Image 0 matches texts 0 and 1 equally: raising text 1's logit for image 0 must not raise the loss.
    pos = eye.clone()
    pos[0, 1] = True
    hi = logits.clone()
    hi[0, 1] += 3.0
    assert multi_positive_loss(hi, pos) < multi_positive_loss(logits, pos)
    assert multi_positive_loss(hi, eye) > multi_positive_loss(logits, eye)


EIGHT_CLASSES = ["chaetognath_other", "copepod_calanoid", "detritus_blob", "diatom_chain_string", "fecal_pellet",
                 "hydromedusae_narco_young", "protist_noctiluca", "trichodesmium_puff"]


def _eight_class_batch(ndsb, manifest, per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``per_class`` training images (by file name) of eight varied classes, as model
    input, with their indices in EIGHT_CLASSES."""
    from data.manifest import decoded_array
    from models.base import images_to_tensor

    rows = manifest[(manifest["split"] == "train") & manifest["class"].isin(EIGHT_CLASSES)]
    rows = rows.sort_values("relpath").groupby("class").head(per_class)
    x = images_to_tensor(np.array(decoded_array(ndsb, rows, 64, progress=False)))
    return x, rows["class"].map({c: i for i, c in enumerate(EIGHT_CLASSES)}).to_numpy().astype(np.int64)


@requires_data
def test_a_few_contrastive_steps_on_real_images_lower_the_loss(tmp_path, ndsb, ndsb_manifest):
    from data.taxonomy import load_taxonomy
    from models.clip_model import create_clip
    from models.clip_train import CaptionSampler, param_groups, train_step

    torch.manual_seed(0)
    tax = load_taxonomy("ndsb")
    x, labels = _eight_class_batch(ndsb, ndsb_manifest, 6)
    classes = EIGHT_CLASSES
    pc = create_clip(tiny_config(tmp_path), {"mean": 0.05, "std": 0.15}, tax)
    pc.train()
    sampler = CaptionSampler(pc, tax, classes)
    tokens, pos = sampler.sample(labels, np.random.default_rng(0))
    assert pos.shape == (len(labels), len(tokens)) and pos.any(1).all() and pos.any(0).all()
    opt = torch.optim.AdamW(param_groups(pc.clip, 0.01), lr=3e-3)
    losses = [train_step(pc, opt, x, tokens, pos) for _ in range(12)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_flat_similarity_loss_is_zero_only_when_flat():
    from models.clip_train import flat_similarity_loss

    assert abs(float(flat_similarity_loss(torch.zeros(3, 7)))) < 1e-6
    peaked = torch.zeros(3, 7)
    peaked[:, 0] = 8.0
    assert float(flat_similarity_loss(peaked)) > 1.0


@requires_data
def test_outlier_term_flattens_chimeras_similarities(tmp_path, ndsb, ndsb_manifest):
    """A few contrastive steps with the flat-similarity term on real NDSB chimeras leave unseen
    chimeras (made from other images) less matched to the captions than the same steps without it."""
    import copy

    from data.taxonomy import load_taxonomy
    from models.clip_model import create_clip
    from models.clip_train import CaptionSampler, clip_outliers, flat_similarity_loss, param_groups, train_step
    from models.outliers import chimeras

    torch.manual_seed(0)
    tax = load_taxonomy("ndsb")
    classes = EIGHT_CLASSES
    x_all, y_np = _eight_class_batch(ndsb, ndsb_manifest, 12)
    y_all = torch.from_numpy(y_np)
    even = torch.arange(len(x_all)) % 2 == 0
    x, labels, x_ev, y_ev = x_all[even], y_all[even].numpy(), x_all[~even], y_all[~even]
    base = create_clip(tiny_config(tmp_path), {"mean": 0.05, "std": 0.15}, tax)
    base.train()
    sampler = CaptionSampler(base, tax, classes)
    tokens, pos = sampler.sample(labels, np.random.default_rng(0))
    opt = torch.optim.AdamW(param_groups(base.clip, 0.01), lr=3e-3)
    for _ in range(10):
        train_step(base, opt, x, tokens, pos)
    ev_chimeras, _ = chimeras(x_ev, y_ev, torch.Generator().manual_seed(9), "paste")

    def non_flatness(pc) -> float:
        pc.eval()
        with torch.no_grad():
            sims = pc.clip.logit_scale.exp() * pc.encode_image(ev_chimeras) @ pc.encode_text_tokens(tokens).T
        return float(flat_similarity_loss(sims))

    def finetune(with_oe: bool) -> float:
        pc = copy.deepcopy(base)
        pc.train()
        o = torch.optim.AdamW(param_groups(pc.clip, 0.01), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            xo = clip_outliers(x, torch.from_numpy(labels), "chimera", 0.5, g) if with_oe else None
            train_step(pc, o, x, tokens, pos, xo, 1.0)
        return non_flatness(pc)

    with_oe, without = finetune(True), finetune(False)
    assert with_oe < 0.7 * without, (with_oe, without)


# --- training command, checkpoints, zoo ---------------------------------------------------------
def test_train_command_exports_a_clip_checkpoint_to_the_zoo(tiny):
    from models.zoo import list_models

    man = tiny["manifest"]
    for key in ("name", "format", "command", "metrics", "heldout", "dataset", "parameters", "size_bytes", "sha256", "weights"):
        assert key in man, key
    assert man["kind"] == "clip" and man["format"] == "plankton-lens-checkpoint/1" and man["name"] == "tiny-clip"
    assert man["command"].startswith("python -m models.clip_train ")
    assert len(man["heldout"]) >= 10 and man["open_clip_model"] == "plankton-clip-test"
    assert man["preprocessing"]["channels"] == 1 and 0 < man["preprocessing"]["mean"] < 0.5
    entry = next(m for m in list_models() if m["name"] == "tiny-clip")
    assert entry["kind"] == "clip" and 0 <= entry["metrics"]["class_accuracy"] <= 1
    z = man["metrics"]["zero_shot"]
    for part in ("heldout_names", "all_names"):
        vals = [z[part][f"top{k}"] for k in (1, 2, 5, 10)]
        assert all(0 <= v <= 1 for v in vals) and vals == sorted(vals)
    assert 0 <= z["parent_accuracy"] <= 1


def test_training_resumes_from_its_last_state(tiny, capsys):
    res = train_tiny(tiny["tmp"], "tiny-clip-resume", steps=2)
    assert json.loads(Path(res["manifest"]).read_text())["train_steps"] == 2
    capsys.readouterr()
    res2 = train_tiny(tiny["tmp"], "tiny-clip-resume", steps=4, fresh=False)
    assert "resuming tiny-clip-resume" in capsys.readouterr().err
    assert json.loads(Path(res2["manifest"]).read_text())["train_steps"] == 4


def test_fine_tune_with_outlier_exposure_records_its_base_and_keeps_batch_norm(tiny):
    from models.clip_model import load_clip_checkpoint

    res = train_tiny(tiny["tmp"], "tiny-clip-oe", steps=2, extra=["--init-from", "tiny-clip", "--outlier-exposure", "mixed"])
    pc, man = load_clip_checkpoint(res["manifest"])
    assert man["init_from"] == "tiny-clip" and man["init_sha256"] == tiny["manifest"]["sha256"]
    assert man["outlier_exposure"] == {"kind": "mixed", "weight": 0.5, "fraction": 0.25, "freeze_bn": True}
    assert man["preprocessing"] == tiny["manifest"]["preprocessing"]
    base, tuned = tiny["pc"].clip.state_dict(), pc.clip.state_dict()
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(base[k], tuned[k]) for k in stats)  # batch norm frozen in a fine-tune
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.endswith("weight"))  # but it did train


def test_locked_image_tuning_keeps_the_supervised_trunk_and_trains_the_rest(tiny, images):
    """LiT: the image tower is a supervised classifier's trunk (written here, trained without the
    same held-out classes), copied exactly and kept fixed; the projection head and the text
    tower learn on cached trunk features; a CLIP or a model with other held-out classes is refused."""
    from models.clip_model import create_clip, load_clip_checkpoint
    from models.handle import open_model
    from models.train import train as train_classifier

    tmp = tiny["tmp"]
    train_classifier(["--arch", "bacnn", "--dataset", "ndsb", "--holdout", "default", "--limit-per-class", "3",
                      "--max-steps", "2", "--batch-size", "48", "--epochs", "1", "--name", "tiny-sup-heldout",
                      "--export-dir", str(tmp / "zoo"), "--runs-dir", str(tmp / "runs"), "--threads", "1",
                      "--no-progress", "--fresh"])
    sup = open_model("tiny-sup-heldout")
    assert sorted(sup.manifest["heldout"]) == sorted(tiny["manifest"]["heldout"])
    from models.clip_train import train

    argv = ["--lock-image-from", "tiny-sup-heldout", "--lit-views", "2", "--limit-per-class", "3", "--max-steps", "3",
            "--batch-size", "48", "--export-dir", str(tmp / "zoo"), "--runs-dir", str(tmp / "runs"),
            "--name", "tiny-clip-lit", "--threads", "1", "--no-progress", "--fresh"]
    res = train(argv)
    pc, man = load_clip_checkpoint(res["manifest"])
    assert man["open_clip_model"] == "plankton-clip-lit-blur"  # the tower of the trunk's stem (blur by default)
    assert man["locked_image_from"] == {"model": "tiny-sup-heldout", "sha256": sup.sha256, "views": 2}
    assert man["preprocessing"] == sup.preprocessing
    src = sup.classifier.backbone.state_dict()
    body = pc.clip.visual.trunk.body.state_dict()
    assert set(src) == set(body) and all(torch.equal(src[k], body[k]) for k in src)  # weights and BN statistics
    fresh = create_clip("plankton-clip-lit-blur", man["preprocessing"]).clip.state_dict()
    tuned = pc.clip.state_dict()
    assert not torch.equal(fresh["visual.head.proj.weight"], tuned["visual.head.proj.weight"])
    assert any(not torch.equal(fresh[k], tuned[k]) for k in tuned if k.startswith("transformer."))
    # an image embedding is the head applied to the trunk's features, as in training
    from models.base import images_to_tensor

    x = images_to_tensor(images[1][:8])
    with torch.no_grad():
        assert torch.allclose(pc.encode_image(x), pc.embed_trunk_features(pc.trunk_features(x)), atol=1e-6)
    cached = torch.load(tmp / "runs" / "tiny-clip-lit" / "lit_features.pt", weights_only=True)["features"]
    assert cached.shape[0] == 2 and cached.shape[2] == pc.clip.visual.trunk.num_features
    assert not torch.allclose(cached[0], cached[1])  # the second view is augmented
    with pytest.raises(SystemExit, match="supervised classifier"):
        train(argv[:1] + ["tiny-clip"] + argv[2:-2] + ["--name", "tiny-clip-lit-bad"])
    train_classifier(["--arch", "flat", "--dataset", "ndsb", "--limit-per-class", "3", "--max-steps", "1",
                      "--batch-size", "48", "--epochs", "1", "--name", "tiny-sup-all", "--export-dir", str(tmp / "zoo"),
                      "--runs-dir", str(tmp / "runs"), "--threads", "1", "--no-progress", "--fresh"])
    with pytest.raises(SystemExit, match="other held-out classes"):
        train(argv[:1] + ["tiny-sup-all"] + argv[2:-2] + ["--name", "tiny-clip-lit-bad"])


def test_checkpoint_round_trip_and_tamper_refusal(tiny, tmp_path):
    from models.checkpoint import CheckpointError
    from models.clip_model import load_clip_checkpoint, save_clip_checkpoint

    pc = tiny["pc"]
    path = save_clip_checkpoint(pc, tmp_path / "copy", kind_note="test")
    pc2, man = load_clip_checkpoint(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pc.encode_image(x), pc2.encode_image(x), atol=1e-6)
    assert torch.allclose(pc.encode_text(["a salp"]), pc2.encode_text(["a salp"]), atol=1e-6)
    assert man["kind"] == "clip" and man["heldout"] == pc.heldout
    w = tmp_path / "copy.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity"):
        load_clip_checkpoint(path)


def test_local_pretrained_weights_round_trip_offline(tmp_path, monkeypatch):
    """Weights saved by open_clip conventions load back through the pretrained-weights path:
    a weights file, an open_clip model folder and a Hugging Face cache (HF_HUB_OFFLINE=1)."""
    import open_clip
    from safetensors.torch import save_file

    from models.checkpoint import CheckpointError
    from models.clip_model import load_pretrained_local, register_configs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A standard open_clip architecture (3-channel ViT, as real CLIP / BioCLIP weights), tiny.
    vit = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg_file = tmp_path / "tiny-vit-clip-test.json"
    cfg_file.write_text(json.dumps(vit))
    name = register_configs(cfg_file)[0]
    torch.manual_seed(1)
    ref = open_clip.create_model(name).eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    tok = open_clip.get_tokenizer(name)(["a transparent salp", "detritus"])
    with torch.no_grad():
        want_i, want_t = ref.encode_image(x), ref.encode_text(tok)

    def check(pc, man, source):
        with torch.no_grad():
            assert torch.allclose(pc.clip.encode_image(x), want_i, atol=1e-6)
            assert torch.allclose(pc.clip.encode_text(tok), want_t, atol=1e-6)
        assert man["source"] == source and man["kind"] == "clip"
        pp = man["preprocessing"]
        assert pp["size"] == 32 and pp["channels"] == 3 and pp["polarity"] == "original" and len(pp["mean"]) == 3
        assert man["sha256"] and len(man["sha256"]) == 64
        # The project's 1-channel 64 px foreground images are adapted to the model's input.
        fg = torch.rand(1, 1, 64, 64)
        with torch.no_grad():
            direct = pc.clip.encode_image(pc.prepare(fg))
        assert pc.prepare(fg).shape == (1, 3, 32, 32) and torch.allclose(pc.encode_image(fg), direct / direct.norm(), atol=1e-6)

    weights = tmp_path / "weights.safetensors"
    save_file(state, str(weights))
    pc, man = load_pretrained_local(name, weights)
    check(pc, man, "file")
    assert man["open_clip_model"] == name

    cfg = {"model_cfg": vit, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    pc, man = load_pretrained_local("tiny", folder)
    check(pc, man, "local-dir")
    assert man["preprocessing"]["mean"] == [0.5, 0.5, 0.5]

    cache = tmp_path / "hf"
    snap = cache / "models--plankton--tiny-clip" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--plankton--tiny-clip" / "refs").mkdir()
    (cache / "models--plankton--tiny-clip" / "refs" / "main").write_text("0" * 40)
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(state, str(snap / "open_clip_model.safetensors"))
    pc, man = load_pretrained_local("hf-hub:plankton/tiny-clip", cache)
    check(pc, man, "hf-cache")
    assert man["open_clip_model"] == "hf-hub:plankton/tiny-clip"

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_local(name, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="offline"):
        load_pretrained_local("hf-hub:plankton/not-cached", cache)


# --- zero-shot, classifier adapter ---------------------------------------------------------------
@requires_full_data  # two test images of every held-out class: the sample keeps the full archive's splits
def test_zero_shot_eval_on_heldout_images(tiny, images):
    from models.clip_model import zero_shot_eval

    pc = tiny["pc"]
    rows, arr = images
    held = rows["class"].isin(pc.heldout).to_numpy()
    z = zero_shot_eval(pc, arr[held], rows.loc[held, "class"].tolist(), pc.heldout, ks=(1, 2, 5, 10, 12))
    assert z["n_images"] == held.sum() == 2 * len(pc.heldout)
    h = [z["heldout_names"][f"top{k}"] for k in (1, 2, 5, 10, 12)]
    assert h == sorted(h) and h[-1] == 1.0  # 12 held-out names: top-12 always contains the truth
    a = [z["all_names"][f"top{k}"] for k in (1, 2, 5, 10, 12)]
    assert a == sorted(a) and all(0 <= v <= 1 for v in a)
    assert all(ah <= hh for ah, hh in zip(a, h))  # more candidates can only make it harder
    assert 0 <= z["parent_accuracy"] <= z["group_accuracy"] <= 1
    assert 0 <= z["parent_accuracy_summed"] <= 1
    assert set(z["per_class_parent"]) == set(pc.heldout)
    assert np.isclose(np.mean(list(z["per_class_parent"].values())), z["parent_accuracy"])  # two images per class
    tax = pc.taxonomy
    assert z["parent_siblings"]["chaetognath_sagitta"] == 0  # the only class of "sagittid chaetognaths"
    parent = tax.path("copepod_calanoid_eucalanus")["subgroup"]
    assert z["parent_siblings"]["copepod_calanoid_eucalanus"] == (tax.table["subgroup"] == parent).sum() - 1 > 0


def test_clip_classifier_is_a_hierarchical_classifier(tiny, images):
    from explain.saliency import attribute
    from models.base import HierarchicalClassifier, images_to_tensor
    from models.clip_model import ClipClassifier

    pc = tiny["pc"]
    clf = ClipClassifier(pc).eval()
    assert isinstance(clf, HierarchicalClassifier) and clf.arch == "clip"
    x = images_to_tensor(images[1][:4])
    with torch.no_grad():
        out = clf(x)
    assert list(out) == list(clf.levels)
    leaf = out["class"].softmax(-1).numpy()
    for lvl in clf.levels[:-1]:
        assert out[lvl].shape == (4, len(clf.class_names[lvl]))
        assert np.allclose(out[lvl].softmax(-1).numpy(), leaf @ clf.taxonomy.level_matrix(lvl), atol=1e-5)
    assert set(pc.heldout) <= set(clf.class_names["class"])
    assert clf.embed(x).shape == (4, pc.embed_dim)
    m = attribute(clf, x[:1], "group", None, "gradcam")
    assert m.shape == (64, 64) and np.isfinite(m).all()


def test_zoo_loads_a_clip_entry_as_a_classifier(tiny, images, tmp_path, monkeypatch):
    """models.zoo serves a CLIP entry to the pages as a sha256-verified ClipClassifier whose
    per-level probabilities are distributions that agree with the taxonomy."""
    import shutil

    from explain.saliency import attribute, list_methods
    from models.checkpoint import CheckpointError
    from models.clip_model import ClipClassifier
    from models.train import predict_arrays
    from models.handle import open_model
    from models.zoo import CLASSIFIER_KINDS, default_model_name, model_kind, model_names

    assert "tiny-clip" in model_names(kinds=CLASSIFIER_KINDS) and "tiny-clip" in model_names(kinds=("clip",))
    assert "tiny-clip" not in model_names() and model_kind("tiny-clip") == "clip" and model_kind("no-such") is None
    assert default_model_name() != "tiny-clip"  # the default stays a classifier (ndsb-bacnn when trained)
    model, man = open_model("tiny-clip").classifier, open_model("tiny-clip").manifest
    assert isinstance(model, ClipClassifier) and not model.training
    assert man["kind"] == "clip" and man["sha256"] == tiny["manifest"]["sha256"]
    tax = model.taxonomy
    assert model.levels == tuple(tax.levels) and all(model.class_names[lvl] == list(tax.names(lvl)) for lvl in tax.levels)
    probs = predict_arrays(model, images[1][:24])
    leaf = probs[model.levels[-1]]
    for lvl in model.levels:
        p = probs[lvl]
        assert p.shape == (24, len(tax.names(lvl))) and (p >= 0).all() and np.allclose(p.sum(1), 1.0, atol=1e-5), lvl
        assert np.allclose(p, leaf @ tax.level_matrix(lvl), atol=1e-5), lvl  # each node = the sum of its leaves
    # The leaf prediction is the class whose prompt ensemble is most similar to the image.
    sims = model.clip.image_features(images[1][:24]) @ model.class_text.numpy().T
    assert (sims.argmax(1) == leaf.argmax(1)).mean() >= 0.95
    # Every saliency method of the explain page runs on it, GradCAM on the image tower's last stage.
    x = torch.from_numpy(images[1][:1]).float().div(255).unsqueeze(1)
    for method in [e.name for e in list_methods()]:
        m = attribute(model, x, "class", None, method)
        assert m.shape == (64, 64) and np.isfinite(m).all() and np.abs(m).sum() > 0, method
    # sha256-verified like any zoo model: a damaged copy earlier in the search path is refused.
    entry = tiny["tmp"] / "zoo" / "tiny-clip.json"
    damaged = tmp_path / "zoo"
    damaged.mkdir()
    shutil.copy(entry, damaged / entry.name)
    w = entry.with_name(man["weights"])
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    (damaged / w.name).write_bytes(bytes(data))
    monkeypatch.setenv("PLANKTON_LENS_ZOO", os.pathsep.join([str(damaged), os.environ["PLANKTON_LENS_ZOO"]]))
    with pytest.raises(CheckpointError, match="integrity"):
        open_model("tiny-clip")


# --- explanations ---------------------------------------------------------------------------------
def test_prompt_ranking_contrast_and_typed_prompts(tiny, images):
    from explain.clip import PromptError, class_scores, contrast_prompts, prompt_score, rank_prompts

    pc = tiny["pc"]
    img = images[1][0]
    ranked = rank_prompts(pc, img)
    assert set(ranked["kind"]) == {"taxonomy", "morphology", "non-living"}
    assert (np.diff(ranked["similarity"].to_numpy()) <= 0).all() and ranked["rank"].tolist()[:3] == [1, 2, 3]
    assert set(rank_prompts(pc, img, kinds=["non-living"])["kind"]) == {"non-living"}
    scores = class_scores(pc, img)
    assert len(scores) == len(pc.taxonomy.classes) and abs(scores["probability"].sum() - 1) < 1e-4
    a, b = scores["class"].iloc[0], scores["class"].iloc[-1]
    df, gap = contrast_prompts(pc, img, a, b)
    assert gap >= 0 and abs(df["contribution"].sum() - gap) < 1e-5
    assert df["contribution"].is_monotonic_decreasing
    same_group = contrast_prompts(pc, img, "copepod_calanoid", "copepod_calanoid_large")[0]
    assert "both (shared)" in set(same_group["favours"])
    res = prompt_score(pc, img, "  transparent   body with spines ")
    assert res["prompt"] == "transparent body with spines" and 1 <= res["rank"] <= res["of"] and not res["truncated"]
    top = ranked["prompt"].iloc[0]
    assert prompt_score(pc, img, top)["rank"] == 1
    assert prompt_score(pc, img, "copepod with long antennae " * 8)["truncated"]
    for bad in ("", "   ", "x" * 400):
        with pytest.raises(PromptError):
            prompt_score(pc, img, bad)
    with pytest.raises(KeyError):
        contrast_prompts(pc, img, "not_a_class", b)


def test_prompt_saliency_integrated_gradients_is_complete(tiny, images):
    from explain.clip import _PromptSimilarity, _tensor, prompt_saliency

    pc = tiny["pc"]
    img = images[1][3]
    text = "a shadowgraph image of crustaceans"
    m = prompt_saliency(pc, img, text, n_steps=64)
    assert m.shape == (64, 64) and np.isfinite(m).all() and np.abs(m).sum() > 0
    fwd = _PromptSimilarity(pc, pc.encode_text([text])[0])
    with torch.no_grad():
        x = _tensor(img)
        diff = float(fwd(x) - fwd(torch.zeros_like(x)))
    assert abs(m.sum() - diff) <= 0.1 * abs(diff) + 2e-3
    cam = prompt_saliency(pc, img, text, "gradcam")
    assert cam.shape == (64, 64) and (cam >= 0).all()
    # Every registered method works through the similarity module (the tiny tower is convolutional).
    from explain.saliency import available_methods, list_methods

    assert [e.name for e in available_methods(pc)] == [e.name for e in list_methods()]
    for e in list_methods():
        s = prompt_saliency(pc, img, text, e.name, n_steps=8)
        assert s.shape == (64, 64) and np.isfinite(s).all() and np.abs(s).sum() > 0, e.name
        assert e.signed or (s >= 0).all(), e.name
    with pytest.raises(KeyError):
        prompt_saliency(pc, img, text, "nope")


# --- anomaly --------------------------------------------------------------------------------------
def test_anomaly_sets_and_scorer(tiny, images):
    from explain.clip import AnomalyScorer, auroc, make_chimeras, natural_images

    pc = tiny["pc"]
    rows, arr = images
    nat = natural_images()
    assert nat.dtype == np.uint8 and nat.shape[1:] == (64, 64) and len(nat) >= 300
    leaf = rows["class"].map({c: i for i, c in enumerate(pc.taxonomy.classes)}).to_numpy()
    ch = make_chimeras(arr, leaf, 40)
    assert ch.shape == (40, 64, 64) and ch.dtype == np.uint8
    feats = pc.image_features(arr)
    known = [c for c in pc.taxonomy.classes if c not in pc.heldout]
    sc = AnomalyScorer.fit(pc, feats[::2], known, feats[1::2])
    calib = sc.score_features(feats[1::2])
    assert abs(calib["combined"].mean()) < 1e-6 and set(calib) == {"mcm", "knn", "combined"}
    assert 0 <= sc.percentile(float(np.median(calib["combined"]))) <= 100
    assert sc.percentile(1e9) == 100.0
    assert sc.weights == {}  # no known outliers: the parts count equally
    weighted = AnomalyScorer.fit(pc, feats[::2], known, feats[1::2], outlier_features=pc.image_features(ch))
    assert set(weighted.weights) == {"mcm", "knn"} and abs(sum(weighted.weights.values()) - 1) < 1e-9
    a = weighted.weight_aurocs
    raw = {n: max(0.0, v - 0.5) for n, v in a.items()}  # above-chance AUROC on the known outliers
    expect = {n: r / sum(raw.values()) for n, r in raw.items()} if sum(raw.values()) else {n: 0.5 for n in raw}
    assert all(abs(weighted.weights[n] - expect[n]) < 1e-9 for n in expect)
    z = {n: (weighted.components(feats[1::2])[n] - m) / s for n, (m, s) in weighted.stats.items()}
    combined = weighted.score_features(feats[1::2])["combined"]
    assert np.allclose(combined, sum(weighted.weights[n] * z[n] for n in z)) and abs(combined.mean()) < 1e-6
    assert auroc(np.zeros(5), np.ones(5)) == 1.0 and auroc(np.ones(5), np.zeros(5)) == 0.0


def test_benchmark_json_shape_and_results_section(tiny, tmp_path):
    from bench.clip_benchmark import END, START, benchmark, write_results

    res = benchmark("tiny-clip", n_chimeras=60, limit_per_class=3, n_zoolake=30)
    z = res["zero_shot"]
    for part in ("heldout_names", "all_names"):
        assert set(z[part]) == {"top1", "top2", "top5", "top10"}
        assert all(0 <= v <= 1 for v in z[part].values())
    assert 0 <= z["parent_accuracy"] <= 1
    assert {"chimeras", "natural"} <= set(res["anomaly"])
    for v in res["anomaly"].values():
        assert 0 <= v["auroc"] <= 1 and v["n"] > 0
    json.dumps(res)
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nother section\n")
    write_results(res, md)
    write_results(res, md)
    text = md.read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and "other section" in text
    assert re.search(r"\| top-1 \| [\d.]+ % \| [\d.]+ % \|", text)


def test_benchmark_command_compares_models(tiny, tmp_path, capsys):
    from bench.clip_benchmark import main

    md = tmp_path / "results.md"
    assert main(["--model", "tiny-clip", "--compare", "tiny-clip", "--chimeras", "40", "--limit-per-class", "2",
                 "--zoolake", "20", "--json", "--results", str(md)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["compared"]) == {"tiny-clip"} and {"zero_shot", "anomaly"} <= set(res["compared"]["tiny-clip"])
    text = md.read_text()
    assert "**Compared models**" in text and "--compare tiny-clip" in text
    assert re.search(r"\| `tiny-clip` \| `python -m models.clip_train [^`]*` \| [\d.]+ % \|", text)


# --- the trained zoo model (skipped until it exists) ------------------------------------------------
def _trained():
    from models.handle import open_model
    from models.zoo import model_names

    if "ndsb-clip" not in model_names(kind="clip"):
        pytest.skip("ndsb-clip is not in the zoo yet: train it with python -m models.clip_train --minutes 40")
    return (open_model("ndsb-clip").require_clip(), open_model("ndsb-clip").manifest)


@requires_data
def test_trained_zero_shot_beats_chance_by_a_wide_margin(ndsb, ndsb_manifest):
    from data.manifest import decoded_array
    from models.clip_model import zero_shot_eval

    pc, _ = _trained()
    rows = ndsb_manifest[(ndsb_manifest["split"] == "test") & ndsb_manifest["class"].isin(pc.heldout)]
    rows = rows.sort_values("relpath").groupby("class").head(25)
    z = zero_shot_eval(pc, np.asarray(decoded_array(ndsb, rows, 64, progress=False)), rows["class"].tolist(), pc.heldout)
    assert z["heldout_names"]["top1"] >= 3 * z["chance_top1_heldout"], z["heldout_names"]


@requires_data
def test_trained_prompt_ranking_puts_the_true_taxonomy_prompt_in_the_top5(ndsb, ndsb_manifest):
    from data.manifest import decoded_array
    from explain.clip import gallery_rows, rank_prompts

    pc, _ = _trained()
    known = [c for c in pc.taxonomy.classes if c not in pc.heldout]
    rows = gallery_rows(ndsb_manifest, per_class=1, classes=known)
    arr = np.asarray(decoded_array(ndsb, rows, 64, progress=False))
    hits = []
    for img, cls in zip(arr, rows["class"]):
        top = rank_prompts(pc, img, kinds=["taxonomy"])
        top = top[top["level"] == "class"].head(5)
        hits.append(cls in set(top["taxon"]))
    assert np.mean(hits) > 0.5, f"true class's taxonomy prompt in the top 5 for {np.mean(hits):.0%} of gallery images"
