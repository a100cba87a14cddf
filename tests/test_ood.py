"""OOD scores and metrics (hand-made logits, scikit-learn), known-outlier generators, the
flat-logit training term on real NDSB images, the training flag, and the benchmark."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from explain.ood import (auroc, aupr, energy, entropy, fit_mahalanobis, fpr_at_tpr, gen,
                         is_log_probability, known_group_unknown_class, knn_scores, logit_score, msp, ood_metrics,
                         rates_at, score_names, threshold_at_tpr)
from models.outlier_exposure import OE_KINDS, flat_logit_loss, frozen_norm, make_oe_term
from models.outliers import CORRUPTIONS, adversarial, chimeras, corrupt, corruptions, hierarchical_ce, partners

from .conftest import REPO, requires_data, requires_full_data, requires_zoolake


# --- scores on hand-made logits ----------------------------------------------------------------
def _peaked_and_flat(k: int = 10) -> np.ndarray:
    peaked = np.full(k, -2.0)
    peaked[3] = 6.0
    flat = np.full(k, 0.5) + np.linspace(-0.05, 0.05, k)
    return np.stack([peaked, flat])


@pytest.mark.parametrize("score", score_names("logits"))
def test_peaked_less_anomalous_than_flat(score):
    s = logit_score(_peaked_and_flat(), score)
    assert s.shape == (2,) and np.isfinite(s).all()
    assert s[0] < s[1], f"{score}: peaked {s[0]} should be below flat {s[1]}"


def test_score_values_by_hand():
    z = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p0 = np.exp(2) / (np.exp(2) + 2)
    assert msp(z) == pytest.approx([1 - p0, 2 / 3])
    assert entropy(z)[1] == pytest.approx(1.0) and 0 < entropy(z)[0] < 1
    assert energy(z) == pytest.approx([-np.log(np.exp(2) + 2), -np.log(3)])
    assert logit_score(z, "max_logit") == pytest.approx([-2.0, 0.0])
    p = np.array([p0, (1 - p0) / 2, (1 - p0) / 2])
    assert gen(z, gamma=0.1, top_m=3)[0] == pytest.approx(np.sum(p**0.1 * (1 - p) ** 0.1))
    # a flatter vector has a larger GEN even when only the top M probabilities count
    assert gen(_peaked_and_flat(), top_m=2)[0] < gen(_peaked_and_flat(), top_m=2)[1]
    with pytest.raises(KeyError):
        logit_score(z, "nope")


def test_log_probability_levels_detected():
    z = np.log(np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]))
    assert is_log_probability(z) and not is_log_probability(z + 1.0)


def test_mahalanobis_matches_direct_formula():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 1.0]])
    y = np.repeat([0, 1], 200)
    x = means[y] + rng.normal(size=(400, 3)) * [1.0, 0.3, 2.0]
    m = fit_mahalanobis(x, y, shrinkage=0.0)
    q = np.array([[0.1, 0.1, 0.1], [2.5, 3.0, 0.0], [5.0, 0.0, 1.0]])
    centred = x - np.stack([x[y == c].mean(0) for c in (0, 1)])[y]
    prec = np.linalg.inv(centred.T @ centred / len(x))
    mu = np.stack([x[y == c].mean(0) for c in (0, 1)])
    direct = np.min([[(qi - mj) @ prec @ (qi - mj) for mj in mu] for qi in q], axis=1)
    assert m.score(q) == pytest.approx(direct, rel=1e-6)
    assert m.score(q)[1] > 10 * max(m.score(q)[0], m.score(q)[2])  # off the clusters → far


def test_knn_score_uses_kth_neighbour():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.9, 0.0]])
    q = np.array([[1.0, 0.0], [-1.0, 0.0]])
    s = knn_scores(train, q, k=2)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    d = np.sort(np.linalg.norm(tn[None] - q[:, None] / np.linalg.norm(q, axis=1)[:, None, None], axis=2), axis=1)[:, 1]
    assert s == pytest.approx(d, abs=1e-5) and s[1] > s[0]


# --- the score registry ------------------------------------------------------------------------
def test_every_registered_score_declares_what_it_reads_and_scores_each_row():
    """Each entry reads logits or features and maps (N, K) logits or (N, D) embeddings to (N,)
    finite float64 scores; feature scores rise off the training embeddings."""
    from explain import ood

    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 9))
    train, labels = rng.normal(size=(60, 5)), np.arange(60) % 3
    query = np.stack([train.mean(0), train.mean(0) + 10 * rng.normal(size=5)])
    assert set(score_names()) == set(score_names("logits")) | set(score_names("features"))
    assert set(score_names("logits")) >= {"msp", "max_logit", "entropy", "energy", "gen"}
    assert set(score_names("features")) >= {"knn", "mahalanobis"}
    for e in ood.list_scores():
        assert isinstance(e, ood.OODScore) and e.reads in ood.READS and e.label and ood.get_score(e.name) is e
        if e.reads == "logits":
            s = logit_score(z, e.name)
            assert s.shape == (6,) and s.dtype == np.float64 and np.isfinite(s).all(), e.name
            assert logit_score(z[0], e.name).shape == (1,), e.name
            with pytest.raises(KeyError):
                ood.feature_scorer(e.name, train, labels)
        else:
            s = ood.feature_scorer(e.name, train, labels)(query)
            assert s.shape == (2,) and s.dtype == np.float64 and np.isfinite(s).all() and s[1] > s[0], e.name
            with pytest.raises(KeyError):
                logit_score(z, e.name)
    # the legacy names follow the registry
    assert ood.SCORES == score_names() and ood.LOGIT_SCORES == score_names("logits")
    assert ood.FEATURE_SCORES == score_names("features") and ood.SCORE_LABELS == {e.name: e.label for e in ood.list_scores()}
    with pytest.raises(ValueError):
        ood.register_score("bad", "bad", "pixels")
    with pytest.raises(ValueError, match="already registered"):
        ood.register_score("msp", "again", "logits")(msp)


@pytest.fixture
def margin_score():
    """A test-local logit score (the negative top-2 margin), removed afterwards."""
    from explain import ood

    @ood.register_score("test_margin", "− top-2 logit margin (test)", "logits")
    def _margin(logits: np.ndarray) -> np.ndarray:
        top = np.sort(np.asarray(logits, dtype=np.float64), -1)
        return top[:, -2] - top[:, -1]

    yield "test_margin"
    ood.unregister_score("test_margin")
    assert "test_margin" not in score_names()


def test_a_registered_score_reaches_the_benchmark(margin_score):
    from explain import ood
    from bench.ood_benchmark import cross_dataset, leave_class_out, results_markdown

    assert margin_score in score_names("logits") and margin_score in ood.LOGIT_SCORES
    assert logit_score(np.array([[3.0, 1.0, 0.0]]), margin_score) == pytest.approx([-2.0])
    ev = _fake_evaluation()
    s = ev.scores(margin_score, "class")
    assert set(s) == set(ev.sets) and all(v.shape == (len(ev.sets[n]),) for n, v in s.items())
    table, per_level = leave_class_out(ev)
    assert margin_score in table and all(margin_score in v for v in per_level.values())
    assert table[margin_score]["auroc_mean"] > 0.8  # peaked in-distribution, flatter held-out logits
    cd = cross_dataset(ev)
    md = results_markdown({"leave_class_out": {"fake": table}, "cross_dataset": {"fake": cd}, "per_level": {"fake": per_level},
                           "models": {}, "sizes": {}})
    assert f"| {margin_score} |" in md


# --- metrics agree with scikit-learn -----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0, 1, 500), 1)  # ties on purpose
    b = np.round(rng.normal(1.2, 1.3, 120), 1)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    s = np.r_[a, b]
    assert auroc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(a, b) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # FPR95 with in-distribution as the positive class (kept = score ≤ threshold)
    fpr, tpr, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert fpr_at_tpr(a, b, 0.95) == pytest.approx(expected, abs=1e-12)
    t = threshold_at_tpr(a, 0.95)
    assert (a <= t).mean() >= 0.95 and (a < t).mean() < 0.95
    r = rates_at(a, b, t)
    assert r["fpr"] == pytest.approx(expected) and r["id_flagged"] == pytest.approx(1 - r["tpr"])
    m = ood_metrics(a, b)
    assert set(m) == {"auroc", "aupr", "fpr95", "threshold"}


def test_metrics_extremes_and_errors():
    assert auroc([0, 1, 2], [5, 6]) == 1.0 and auroc([5, 6], [0, 1]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert fpr_at_tpr(np.arange(100), np.arange(200, 300)) == 0.0
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_known_group_unknown_class():
    g = np.array([0.1, 0.1, 0.9, 0.9])
    leaf = np.array([0.1, 0.9, 0.1, 0.9])
    assert known_group_unknown_class(g, leaf, 0.5, 0.5).tolist() == [False, True, False, False]


# --- known outliers --------------------------------------------------------------------------------
def _blobs(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.4 + size * 0.3).tolist()
        r = float(torch.rand(1, generator=g)) * size * 0.15 + size * 0.1
        out.append((((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float() * 0.8)
    return torch.stack(out)[:, None]


def test_chimeras_pair_different_classes_and_stay_in_range():
    x = _blobs()
    leaf = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    g = torch.Generator().manual_seed(1)
    j = partners(leaf, g)
    assert (leaf[j] != leaf).all()
    for mode in ("paste", "blend", "mixed"):
        out, j = chimeras(x, leaf, g, mode)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert (leaf[j] != leaf).all()
        assert not torch.allclose(out, x)
    pasted, j = chimeras(x, leaf, torch.Generator().manual_seed(2), "paste")
    # both organisms are present: the chimera holds signal from each shrunk image
    assert (pasted.flatten(1) > 0.1).sum(1).min() > 0
    with pytest.raises(ValueError):
        chimeras(x, leaf, g, "nope")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_the_image(kind):
    x = _blobs(4)
    out = corrupt(x, kind, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.02


def test_corruptions_mix_and_reproducible():
    x = _blobs(12)
    a = corruptions(x, torch.Generator().manual_seed(3))
    b = corruptions(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


class _Tiny(torch.nn.Module):
    """A two-level stand-in exposing the classifier interface used by the generators."""

    levels = ("group", "class")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5))
        self.g, self.c = torch.nn.Linear(16, 2), torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        return {"group": self.g(h), "class": self.c(h)}


def test_fgsm_stays_in_the_ball_and_raises_the_loss():
    m = _Tiny().eval()
    x = _blobs()
    lab = {"group": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), "class": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}
    adv = adversarial(m, x, lab, eps=0.05)
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert hierarchical_ce(m(adv), lab) > hierarchical_ce(m(x), lab)
    pgd = adversarial(m, x, lab, eps=torch.full((8,), 0.05), steps=3, g=torch.Generator().manual_seed(0))
    assert (pgd - x).abs().max() <= 0.05 + 1e-6
    assert all(p.grad is None for p in m.parameters())


def test_flat_logit_loss_zero_on_uniform_and_masked():
    z = {"group": torch.zeros(3, 2), "class": torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 9.0]])}
    assert float(flat_logit_loss({"group": z["group"]})) == pytest.approx(0.0, abs=1e-6)
    full = float(flat_logit_loss(z))
    mask = {"group": torch.tensor([True, True, True]), "class": torch.tensor([False, True, False])}
    assert full > 0 and float(flat_logit_loss(z, mask)) == pytest.approx(0.0, abs=1e-6)


def test_frozen_norm_restores_modes_and_keeps_running_stats():
    m = _Tiny().train()
    bn = m.body[2]
    before = bn.running_mean.clone()
    with frozen_norm(m):
        assert not bn.training and not m.body[4].training and m.training
        m(_blobs())
    assert torch.equal(bn.running_mean, before) and bn.training and m.body[4].training


def test_oe_term_every_kind_gives_a_finite_differentiable_loss():
    m = _Tiny().train()
    x = _blobs(16)
    lab = {"group": torch.arange(16) % 2, "class": torch.arange(16) % 4}
    for kind in OE_KINDS[1:]:
        term = make_oe_term(kind)
        loss = term(m, x, lab, torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert m.c.weight.grad is not None
        m.zero_grad()
    assert make_oe_term("none") is None
    with pytest.raises(ValueError):
        make_oe_term("bogus")


# --- on real images ---------------------------------------------------------------------------
def _tiny_real_subset(n_per_class: int = 2, classes: int = 24):
    from data.manifest import build_manifest, decoded_array
    from data.sources import open_source

    src = open_source("ndsb")
    df = build_manifest(src, progress=False)
    keep = sorted(df["class"].unique())[::max(1, 121 // classes)][:classes]
    sub = df[(df["split"] == "train") & df["class"].isin(keep)].groupby("class").head(n_per_class * 3).reset_index(drop=True)
    return sub, np.array(decoded_array(src, sub, 64, progress=False))


@requires_full_data
def test_outlier_term_raises_flatness_on_chimeras():
    """A few fine-tuning steps with the flat-logit term on real NDSB images make chimeras'
    leaf logits flatter than the same steps without it."""
    from models.base import images_to_tensor
    from models.handle import open_model
    from models.zoo import default_model_name

    if default_model_name() is None:
        pytest.skip("no model in the zoo")
    torch.manual_seed(0)
    base = open_model(default_model_name()).classifier
    sub, imgs = _tiny_real_subset()
    x = images_to_tensor(imgs)
    labels = {}
    for lvl in base.levels:
        pos = {n: i for i, n in enumerate(base.class_names[lvl])}
        labels[lvl] = torch.tensor(sub[lvl].map(pos).to_numpy(dtype=np.int64))
    half = len(x) // 2
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, ev = perm[:half], perm[half:]
    ev_chim, _ = chimeras(x[ev], labels["class"][ev], torch.Generator().manual_seed(9), "paste")

    def non_flatness(model, xs):
        """Mean KL(uniform ‖ softmax) of the leaf logits: 0 when flat (sensitive near uniform,
        unlike the entropy)."""
        model.eval()
        with torch.no_grad():
            return float(flat_logit_loss({"class": model(xs)[base.levels[-1]]}))

    def finetune(with_oe: bool):
        model = copy.deepcopy(base).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        term = make_oe_term("chimera", fraction=0.5)
        g = torch.Generator().manual_seed(0)
        for step in range(5):
            idx = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(step))[:24]]
            xb, yb = x[idx], {k: v[idx] for k, v in labels.items()}
            out = model(xb)
            loss = sum(torch.nn.functional.cross_entropy(out[k], yb[k]) for k in model.levels)
            if with_oe:
                loss = loss + 1.0 * term(model, xb, yb, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    before = non_flatness(base, ev_chim)
    plain, oe = finetune(False), finetune(True)
    k_plain, k_oe = non_flatness(plain, ev_chim), non_flatness(oe, ev_chim)
    assert k_oe < 0.7 * k_plain and k_oe < before, (before, k_plain, k_oe)
    # the chimeras' entropy rises too
    assert entropy(oe.eval()(ev_chim)[base.levels[-1]].detach().numpy()).mean() > \
        entropy(plain.eval()(ev_chim)[base.levels[-1]].detach().numpy()).mean()


@requires_data
def test_train_flag_records_options(tmp_path):
    from models.train import build_parser

    d = build_parser().parse_args(["--arch", "flat"])
    assert d.outlier_exposure == "none" and d.oe_weight == 0.5
    cmd = [sys.executable, "-m", "models.train", "--arch", "flat", "--holdout", "default", "--outlier-exposure", "mixed",
           "--oe-weight", "0.3", "--limit-per-class", "2", "--max-steps", "2", "--batch-size", "16", "--epochs", "1",
           "--runs-dir", str(tmp_path / "runs"), "--export-dir", str(tmp_path / "zoo"), "--name", "oe-flag", "--fresh",
           "--no-progress", "--threads", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    man = json.loads((tmp_path / "zoo" / "oe-flag.json").read_text())
    assert man["train_args"]["outlier_exposure"] == "mixed" and man["train_args"]["oe_weight"] == 0.3
    assert "--outlier-exposure mixed" in man["command"] and len(man["heldout"]) >= 10

    # A fine-tune (--init-from) keeps batch-norm statistics fixed (--freeze-bn auto): the outlier
    # term then flattens the network as it runs at test time (without this, a fine-tune with the
    # term collapsed NDSB leaf accuracy from 61 % to 4 % in two epochs).
    from safetensors.torch import load_file

    ft = [sys.executable, "-m", "models.train", "--arch", "flat", "--holdout", "default", "--outlier-exposure", "mixed",
          "--limit-per-class", "2", "--max-steps", "3", "--batch-size", "16", "--epochs", "1", "--init-from", "oe-flag",
          "--runs-dir", str(tmp_path / "runs"), "--export-dir", str(tmp_path / "zoo"), "--name", "oe-flag-ft", "--fresh",
          "--no-progress", "--threads", "1"]
    out = subprocess.run(ft, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PLANKTON_LENS_ZOO": str(tmp_path / "zoo")})
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = (load_file(str(tmp_path / "zoo" / f"{n}.safetensors")) for n in ("oe-flag", "oe-flag-ft"))
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".weight") and k not in stats)
    assert json.loads((tmp_path / "zoo" / "oe-flag-ft.json").read_text())["train_args"]["freeze_bn"] == "auto"


# --- benchmark ---------------------------------------------------------------------------------
def _fake_evaluation():
    from explain.ood_evaluation import EvalSet, Evaluation

    rng = np.random.default_rng(0)
    levels = ("group", "class")
    names = {"group": ["g0", "g1"], "class": ["c0", "c1", "c2", "c3"]}

    def emb(n, axis):  # embeddings around 5 · e_axis: in-distribution along e0, OOD sets elsewhere
        return rng.normal(0, 1, (n, 8)) + 5 * np.eye(8)[axis]

    def es(name, kind, n, peak, axis, classes):
        z = {"group": rng.normal(0, 1, (n, 2)), "class": rng.normal(0, 1, (n, 4))}
        z["class"][np.arange(n), rng.integers(0, 4, n)] += peak
        z["group"][:, 0] += 4
        rows = pd.DataFrame({"relpath": [f"x/{name}/{i}.jpg" for i in range(n)], "dataset": "ndsb", "class": rng.choice(classes, n)})
        return EvalSet(name, kind, z, emb(n, axis), rows)

    sets = {"in-distribution (NDSB test)": es("id", "id", 300, 6.0, 0, ["c0", "c1"]),
            "held-out classes": es("held", "heldout", 120, 1.0, 1, ["h0", "h1", "h2"]),
            "ZooLake": es("zl", "other", 80, 0.0, 2, ["z"])}
    fit = emb(200, 0)
    man = {"heldout": ["h0", "h1", "h2"], "dataset": "ndsb", "train_args": {"outlier_exposure": "mixed", "oe_weight": 0.5},
           "metrics": {"test": {"leaf": {"accuracy": 0.7}}}, "arch": "bacnn"}
    return Evaluation("fake", man, levels, names, sets, fit, rng.integers(0, 4, 200))


def test_benchmark_aggregation_on_a_hand_made_evaluation(tmp_path):
    from bench.ood_benchmark import cross_dataset, leave_class_out, model_info, results_markdown, targets, write_results
    from explain.ood_evaluation import known_group_unknown, most_anomalous, typical_index

    ev = _fake_evaluation()
    table, per_level = leave_class_out(ev)
    assert set(table) == set(score_names())
    for s, v in table.items():
        assert set(v["per_class"]) == {"h0", "h1", "h2"}
        assert 0 <= v["auroc_mean"] <= 1 and 0 <= v["fpr95_mean"] <= 1
        assert v["auroc_mean"] == pytest.approx(np.mean(list(v["per_class"].values())), abs=1e-3)
    assert table["msp"]["auroc_mean"] > 0.9 and table["knn"]["auroc_mean"] > 0.8  # peaked ID, flatter held-out
    assert set(per_level) == {"group", "class"}
    cd = cross_dataset(ev)
    assert set(cd) == set(score_names()) and cd["mahalanobis"]["auroc"] > 0.9
    result = {"leave_class_out": {"fake": table}, "cross_dataset": {"fake": cd}, "per_level": {"fake": per_level},
              "models": {"fake": model_info(ev.manifest)}, "sizes": {"fake": {n: len(s) for n, s in ev.sets.items()}}}
    result["targets"] = targets(result)
    assert result["targets"]["flat_logit_model"] == "fake"
    json.dumps(result)
    md = results_markdown(result)
    assert "| msp |" in md and "h1" in md
    p = tmp_path / "results.md"
    p.write_text("# Results\n\nother section\n")
    write_results(result, p)
    write_results(result, p)  # replaced in place, not appended twice
    text = p.read_text()
    assert text.count("BEGIN ood-benchmark") == 1 and "other section" in text
    top = most_anomalous(ev, "msp", "class", list(ev.sets), 5)
    assert len(top) == 5 and top["score"].is_monotonic_decreasing
    assert 0 <= typical_index(ev, "msp", "class") < 300
    kgu = known_group_unknown(ev, "msp")
    assert kgu["held-out classes"].mean() > kgu["in-distribution (NDSB test)"].mean()


def test_targets_pair_the_flat_logit_model_with_the_right_baselines():
    """The bar is the best post-hoc score of any held-out model without the outlier term; the
    accuracy is compared with the model fine-tuned the same way without it."""
    from bench.ood_benchmark import targets

    def table(**aurocs):
        return {s: {"auroc_mean": aurocs.get(s, 0.5), "fpr95_mean": 0.5, "per_class": {}} for s in score_names()}

    def info(oe, init, epochs, acc):
        return {"outlier_exposure": oe, "init_from": init, "epochs": epochs, "leaf_accuracy": acc}

    result = {"leave_class_out": {"base": table(msp=0.80, knn=0.86), "ft": table(msp=0.82, knn=0.84), "oe": table(energy=0.90)},
              "models": {"base": info("none", None, 10, 0.60), "ft": info("none", "base", 3, 0.62),
                         "oe": info("mixed", "base", 3, 0.615)},
              "cross_dataset": {}}
    t = targets(result)
    assert t["flat_logit_model"] == "oe" and t["flat_logit_best_score"] == "energy"
    assert t["baseline_model"] == "base" and t["baseline_best_score"] == "knn" and t["baseline_best_auroc_mean"] == 0.86
    assert t["flat_logit_above_baseline"] and not t["flat_logit_auroc_ge_0.95"]
    assert t["accuracy_reference_model"] == "ft" and t["accuracy_drop"] == pytest.approx(0.005, abs=1e-4)
    assert t["accuracy_within_1_point"]


@requires_full_data
@requires_zoolake
def test_benchmark_cli_json_shape(tmp_path):
    from models.zoo import default_model_name

    name = default_model_name()
    if name is None:
        pytest.skip("no model in the zoo")
    out = subprocess.run([sys.executable, "bench/ood_benchmark.py", "--json", "--models", name,
                          "--results", str(tmp_path / "results.md")], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert set(r) >= {"leave_class_out", "cross_dataset"}
    cd = r["cross_dataset"][name]
    assert set(cd) == set(score_names())
    assert all(0.0 <= v["auroc"] <= 1.0 for v in cd.values())
    for model, table in r["leave_class_out"].items():
        for v in table.values():
            assert 0 <= v["auroc_mean"] <= 1 and 0 <= v["fpr95_mean"] <= 1 and v["per_class"]
    assert r["sizes"][name]["ZooLake"] > 1000 and r["sizes"][name]["known outliers: chimera"] > 0
    assert "Out-of-distribution detection" in (tmp_path / "results.md").read_text()
    bad = subprocess.run([sys.executable, "bench/ood_benchmark.py", "--models", "no-such-model", "--no-write"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not in the zoo" in bad.stderr and "Traceback" not in bad.stderr


def test_nothing_below_bench_imports_it():
    """Data flows one way: bench/ (benchmarks, result tables, their Markdown writers) may import
    data/, models/, explain/ and pages/, never the other way round."""
    import ast

    files = [p for d in ("data", "models", "explain", "pages") for p in (REPO / d).rglob("*.py")]
    files += [REPO / "app.py", REPO / "serve.py"]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "bench" or n.startswith("bench.")]
    assert not bad, bad
    code = "import sys, explain.ood, explain.ood_evaluation, explain.clip; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout
