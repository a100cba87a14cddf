"""The Community view's numbers (explain/quantify.py, explain/community*.py): each estimator on
hand-made confusion matrices, counts and posteriors whose answer is known, grouping, diversity
checked by hand, the OOD threshold's effect, review decisions, and the CLI's JSON on a labelled
collection and on the real EcoTaxa VPR bundle (positions, no labels)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from explain import quantify as Q
from explain.community import CommunityError, Taxa, estimate, prepare, to_json
from explain.community_groups import GroupingError, group_keys
from tests.conftest import REPO

ESTIMATORS = {"classify_and_count", "probabilistic_classify_and_count", "adjusted_classify_and_count", "em"}


# --- the estimators -------------------------------------------------------------------------------
#: A biased classifier over 3 classes: M[j, k] = P(predicted j | true k) (it over-predicts class 0).
BIASED = np.array([[0.8, 0.3, 0.2],
                   [0.1, 0.6, 0.1],
                   [0.1, 0.1, 0.7]])


def test_classify_and_count_and_pcc_by_hand():
    assert np.allclose(Q.classify_and_count(np.array([0, 0, 1, 2, 2, 2]), 4), [2 / 6, 1 / 6, 3 / 6, 0])
    p = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    assert np.allclose(Q.probabilistic_classify_and_count(p), [0.3, 0.3, 0.4])
    assert np.allclose(Q.shares(np.array([[0, 0], [1, 3]])), [[0, 0], [0.25, 0.75]])


def test_confusion_rates_by_hand_and_an_unseen_class_gets_the_identity():
    true = np.array([0, 0, 0, 0, 1, 1, 9])  # 9: not one of the classes (left out)
    pred = np.array([0, 0, 0, 1, 1, 0, 0])
    m, n = Q.confusion_rates(true, pred, 3)
    assert np.allclose(m, [[0.75, 0.5, 0], [0.25, 0.5, 0], [0, 0, 1]]) and list(n) == [4, 2, 0]


def test_adjusted_count_recovers_the_true_prevalence_of_a_biased_classifier():
    truth = np.array([0.2, 0.5, 0.3])
    q = BIASED @ truth  # what classify-and-count sees: class 0 over-counted
    assert q[0] > truth[0] + 0.1
    assert np.allclose(Q.adjusted_classify_and_count(q, BIASED), truth, atol=1e-6)
    # batched: many groups at once, and one matrix per replicate
    qs = np.stack([BIASED @ t for t in ([0.2, 0.5, 0.3], [1, 0, 0], [0.1, 0.1, 0.8])])
    assert np.allclose(Q.adjusted_classify_and_count(qs, BIASED), [[0.2, 0.5, 0.3], [1, 0, 0], [0.1, 0.1, 0.8]], atol=1e-6)
    per = np.stack([BIASED, np.eye(3)])
    out = Q.adjusted_classify_and_count(np.stack([qs[:1], qs[:1]]), per)
    assert np.allclose(out[0, 0], truth, atol=1e-6) and np.allclose(out[1, 0], qs[0], atol=1e-6)


def test_adjusted_count_on_simulated_images_beats_classify_and_count():
    """Images drawn with a true prevalence, predictions drawn from the biased confusion, the
    confusion estimated on separate labelled (validation) images."""
    rng = np.random.default_rng(1)
    k = 3

    def classify(y):
        u = rng.random(len(y))
        return (u[:, None] > np.cumsum(BIASED[:, y].T, axis=1)).sum(1)

    val_y = np.repeat(np.arange(k), 4000)
    m, _ = Q.confusion_rates(val_y, classify(val_y), k)
    truth = np.array([0.1, 0.3, 0.6])
    y = rng.choice(k, 20000, p=truth)
    cc = Q.classify_and_count(classify(y), k)
    acc = Q.adjusted_classify_and_count(cc, m)
    assert np.abs(acc - truth).max() < 0.02 < np.abs(cc - truth).max()


def test_adjusted_count_is_clipped_and_renormalised_like_quapy():
    quapy = pytest.importorskip("quapy")
    from quapy.method.aggregative import ACC

    q = np.array([0.9, 0.05, 0.05])  # more of class 0 than the classifier can make: p[1] < 0 unclipped
    raw = ACC.solve_adjustment(BIASED, q, method="inversion", solver="exact-raise")
    assert raw.min() < 0
    want = quapy.functional.normalize_prevalence(raw, method="clip")
    assert np.allclose(Q.adjusted_classify_and_count(q, BIASED), want, atol=1e-6)
    assert np.isclose(Q.adjusted_classify_and_count(q, BIASED).sum(), 1) and Q.adjusted_classify_and_count(q, BIASED).min() >= 0


def test_adjusted_count_on_a_singular_confusion_keeps_cc_where_validation_cannot_tell():
    m = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # classes 0 and 1 predicted alike
    p = Q.adjusted_classify_and_count(np.array([0.3, 0.5, 0.2]), m)
    assert np.isclose(p.sum(), 1) and np.allclose(p, [0.3, 0.5, 0.2], atol=1e-4)
    # class 1 is never predicted: its images go to 0 and 2 half and half. CC saw no class 1, and
    # nothing in the validation images says how much of 0 and 2 is class 1: ACC keeps CC's answer
    # (the smallest-norm solution would make up a third of class 1)
    m = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    assert np.allclose(Q.adjusted_classify_and_count(np.array([0.6, 0.0, 0.4]), m), [0.6, 0.0, 0.4], atol=1e-4)
    # whatever the true mix, ACC's answer reproduces exactly what CC saw
    q = m @ np.array([0.5, 0.2, 0.3])
    est = Q.adjusted_classify_and_count(q, m)
    assert np.allclose(m @ est, q, atol=1e-4)


def _calibrated(prior_train, prior_test, n, seed=0):
    """Posteriors a model trained under ``prior_train`` gives to ``n`` images drawn under
    ``prior_test`` (three 1-d Gaussian classes; exact Bayes posteriors), with their labels."""
    rng = np.random.default_rng(seed)
    mu = np.array([-1.5, 0.0, 1.5])
    y = rng.choice(3, n, p=prior_test)
    x = rng.normal(mu[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - mu[None, :]) ** 2)
    post = lik * np.asarray(prior_train)
    return post / post.sum(1, keepdims=True), y


def test_em_recovers_a_shifted_prior_where_pcc_and_cc_do_not():
    tau, pi = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.3, 0.6])
    post, y = _calibrated(tau, pi, 30000)
    est = Q.em(post, tau)
    assert np.abs(est - pi).max() < 0.02
    assert np.abs(Q.probabilistic_classify_and_count(post) - pi).max() > 0.05
    assert np.abs(Q.classify_and_count(post.argmax(1), 3) - pi).max() > 0.05
    # no shift: EM stays at the training prior
    post0, _ = _calibrated(tau, tau, 30000, seed=2)
    assert np.abs(Q.em(post0, tau) - tau).max() < 0.02


def test_em_equals_quapy_emq_and_weights_are_repeated_images():
    pytest.importorskip("quapy")
    from quapy.method.aggregative import EMQ

    tau = np.array([0.5, 0.3, 0.2])
    post, _ = _calibrated(tau, [0.2, 0.2, 0.6], 3000, seed=3)
    want, _ = EMQ.EM(tau, post)
    assert np.allclose(Q.em(post, tau), want, atol=1e-5)
    w = np.random.default_rng(0).integers(0, 3, size=(2, len(post))).astype(np.float32)
    batched = Q.em(post, tau, weights=w)
    for b in range(2):
        rep = np.repeat(post, w[b].astype(int), axis=0)
        assert np.allclose(batched[b], Q.em(rep, tau), atol=1e-5)


def test_training_prior_follows_the_sampler():
    assert np.allclose(Q.training_prior([10, 30, 60]), [0.1, 0.3, 0.6])
    assert np.allclose(Q.training_prior([1, 4, 16], "sqrt"), [1 / 7, 2 / 7, 4 / 7])
    assert np.allclose(Q.training_prior([1, 4, 16], "balanced"), [1 / 3] * 3)


# --- grouping ---------------------------------------------------------------------------------------
def _meta_table() -> pd.DataFrame:
    ts = pd.to_datetime(["2024-03-04 10:00", "2024-03-10 23:59", "2024-03-11 00:01", None, "2024-03-05 08:00"], utc=True)
    return pd.DataFrame({
        "timestamp": ts, "depth_min": [0.0, 12.0, 25.0, 9.0, np.nan], "depth_max": [4.0, 14.0, 25.0, 9.0, np.nan],
        "lat": [43.6912, 43.6949, 43.70, np.nan, 43.6912], "lon": [7.31, 7.3101, 7.40, 7.0, 7.31],
        "sample_id": ["st10", "st2", " st2 ", "", "st10"], "split": ["a", "b", "a", "b", "a"],
        "n_sub": [1, 2, 2, 1, 1]})


def test_group_keys_time_depth_station_sample_and_columns():
    t = _meta_table()
    codes, info = group_keys(t, "week")  # weeks start on Monday (2024-03-04 and 2024-03-11 are Mondays)
    assert list(info["group"]) == ["2024-03-04", "2024-03-11"] and list(codes) == [0, 0, 1, -1, 0]
    codes, info = group_keys(t, "day")
    assert list(info["group"]) == ["2024-03-04", "2024-03-05", "2024-03-10", "2024-03-11"]
    assert info["time"].iloc[0] == pd.Timestamp("2024-03-04", tz="UTC")
    codes, info = group_keys(t, "depth", depth_bin=10)  # mean of min and max: 2, 13, 25, 9, —
    assert list(info["group"]) == ["0–10 m", "10–20 m", "20–30 m"] and list(codes) == [0, 1, 2, 0, -1]
    assert np.isclose(info["depth"].iloc[0], 5.5)
    codes, info = group_keys(t, "station")
    assert list(info["group"]) == ["43.69, 7.31", "43.70, 7.40"] and list(codes) == [0, 0, 1, -1, 0]
    codes, info = group_keys(t, "sample")  # stripped; an empty id is no value; natural order (st2 < st10)
    assert list(info["group"]) == ["st2", "st10"] and list(codes) == [1, 0, 0, -1, 1]
    codes, info = group_keys(t, "n_sub")
    assert list(info["group"]) == ["1", "2"]
    codes, info = group_keys(t, "all")
    assert list(info["group"]) == ["all"] and (codes == 0).all()


def test_group_keys_say_what_is_wrong():
    t = _meta_table()
    with pytest.raises(GroupingError, match="no column 'nope'.*week"):
        group_keys(t, "nope")
    with pytest.raises(GroupingError, match="positions"):
        group_keys(t.drop(columns=["lat", "lon"]), "station")
    with pytest.raises(GroupingError, match="at most"):
        group_keys(pd.DataFrame({"x": np.arange(600)}), "x")


# --- a hand-made scored table -------------------------------------------------------------------
def _taxa(level: str = "class") -> Taxa:
    paths = pd.DataFrame({"group": ["A", "A", "B"], "class": ["a1", "a2", "b1"]}, index=["a1", "a2", "b1"])
    names = {"group": ["A", "B"], "class": ["a1", "a2", "b1"]}[level]
    return Taxa(level, names, paths, ["group", "class"])


def _scored(pred: list[str], truth: list[str], site: list[str], score: list[float], proba=None) -> tuple[pd.DataFrame, np.ndarray]:
    n = len(pred)
    names = ["a1", "a2", "b1"]
    t = pd.DataFrame({"relpath": [f"img{i}.png" for i in range(n)], "dataset": "hand", "readable": True,
                      "class": truth, "pred_class": pred, "site": site, "ood_msp_class": np.asarray(score, np.float32)})
    t["pred_group"] = t["pred_class"].map({"a1": "A", "a2": "A", "b1": "B"})
    if proba is None:
        proba = np.eye(3)[[names.index(p) for p in pred]]
    return t, np.asarray(proba, np.float16)


def _validation() -> pd.DataFrame:
    """The model's validation images: perfect on every class (the confusion is the identity)."""
    v = pd.DataFrame({"class": ["a1", "a2", "b1"] * 4})
    v["pred_class"] = v["class"]
    v["pred_group"] = v["class"].map({"a1": "A", "a2": "A", "b1": "B"})
    v["ood_msp_class"] = np.float32(0.0)
    return v


def test_counts_relative_abundance_threshold_and_bray_curtis_by_hand():
    pred = ["a1"] * 5 + ["a2"] * 3 + ["b1"] * 2 + ["a1", "b1", "b1", "b1"]
    site = ["x"] * 10 + ["y"] * 4
    score = [0.9, 0.8] + [0.1] * 12  # two of x's a1 images are anomalous
    t, proba = _scored(pred, pred, site, score)
    gr = prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1})
    assert list(gr.groups["group"]) == ["x", "y"] and list(gr.images) == [10, 4]
    est = estimate(gr, n_boot=50)
    assert np.allclose(est.shares["classify_and_count"], [[0.5, 0.3, 0.2, 0], [0.25, 0, 0.75, 0]])
    for e in ESTIMATORS:  # one-hot posteriors and a perfect classifier: every estimator agrees
        assert np.allclose(est.shares[e], est.shares["classify_and_count"], atol=1e-6), e
    assert est.error() == pytest.approx(dict.fromkeys(ESTIMATORS, 0.0), abs=1e-6)

    moved = estimate(gr, "ood_msp_class", 0.5, n_boot=50)
    assert list(moved.moved) == [2, 0]
    assert np.allclose(moved.shares["classify_and_count"][0], [0.3, 0.3, 0.2, 0.2])  # 2 of 10 now "unknown"
    with_, without = np.array([5, 3, 2]) / 10, np.array([3, 3, 2]) / 8
    bc = np.abs(with_ - without).sum() / (with_ + without).sum()
    assert moved.bray_curtis_threshold() == pytest.approx([bc, 0.0])
    g = moved.group_frame()
    assert list(g["moved_to_unknown"]) == [2, 0] and g["bray_curtis_threshold"].iloc[0] == pytest.approx(bc)
    long = moved.frame()
    assert len(long) == 2 * 4 and list(long["taxon"][:4]) == ["a1", "a2", "b1", "unknown"]
    assert long.loc[3, "count"] == 2 and long.loc[3, "classify_and_count"] == pytest.approx(0.2)


def test_thresholded_pcc_and_em_equal_brute_force_on_the_kept_images():
    """The layout's prefix sums (checkpoints every BLOCK images) and EM's subsets give exactly
    what the kept images' posteriors give, at any threshold."""
    rng = np.random.default_rng(11)
    n = 5200
    p = rng.dirichlet([1, 2, 1], size=n).astype(np.float16)
    names = np.array(["a1", "a2", "b1"])
    site = np.where(np.arange(n) < 3000, "big", np.where(np.arange(n) < 5000, "mid", "small"))
    t, proba = _scored(list(names[p.astype(np.float32).argmax(1)]), list(names[p.astype(np.float32).argmax(1)]),
                       list(site), rng.random(n), p)
    gr = prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}, score="ood_msp_class")
    pf = p.astype(np.float32)
    for thr in (0.0, 0.25, 0.5, 0.999, 2.0):
        est = estimate(gr, "ood_msp_class", thr, n_boot=0, em_images=10_000)
        for i, name in enumerate(gr.groups["group"]):
            m = (site == name) & (t["ood_msp_class"].to_numpy() <= thr)
            frac = m.sum() / (site == name).sum()
            if m.any():
                want = pf[m].mean(0) * frac
                assert np.allclose(est.shares["probabilistic_classify_and_count"][i, :3], want, atol=2e-5), (thr, name)
                em = Q.em(pf[m], gr.base.prior) * frac
                assert np.allclose(est.shares["em"][i, :3], em, atol=1e-4), (thr, name)
            assert est.moved[i] == (site == name).sum() - m.sum()


def test_error_against_the_truth_by_hand():
    pred = ["a1", "a1", "a1", "b1"]
    truth = ["a1", "a2", "a1", "b1"]
    t, proba = _scored(pred, truth, ["x"] * 4, [0.0] * 4)
    gr = prepare(t, _taxa(), "site", proba, None, None)
    est = estimate(gr, n_boot=0)
    # CC: [0.75, 0, 0.25] vs truth [0.5, 0.25, 0.25] → mean |error| over 3 classes = 0.5 / 3
    assert est.error()["classify_and_count"] == pytest.approx(0.5 / 3)
    assert math.isnan(est.error()["adjusted_classify_and_count"]) and math.isnan(est.error()["em"])  # no validation, no prior
    assert any("ACC is not available" in n for n in est.notes)


def test_acc_and_em_on_a_hand_made_collection_with_a_biased_classifier():
    """Validation images say a2 is predicted a1 half the time; the collection's a1 count is
    corrected accordingly."""
    v = pd.DataFrame({"class": ["a1"] * 4 + ["a2"] * 4 + ["b1"] * 4,
                      "pred_class": ["a1"] * 4 + ["a1", "a1", "a2", "a2"] + ["b1"] * 4, "ood_msp_class": 0.0})
    # 20 true a1, 20 true a2 (10 of them predicted a1), 10 b1
    pred = ["a1"] * 30 + ["a2"] * 10 + ["b1"] * 10
    truth = ["a1"] * 20 + ["a2"] * 20 + ["b1"] * 10
    t, proba = _scored(pred, truth, ["x"] * 50, [0.0] * 50)
    est = estimate(prepare(t, _taxa(), "site", proba, v, {"a1": 1, "a2": 1, "b1": 1}), n_boot=0)
    assert np.allclose(est.shares["classify_and_count"][0, :3], [0.6, 0.2, 0.2])
    assert np.allclose(est.shares["adjusted_classify_and_count"][0, :3], [0.4, 0.4, 0.2], atol=1e-6)
    assert est.error()["adjusted_classify_and_count"] < 1e-6 < est.error()["classify_and_count"]


def test_a_level_above_the_leaf_and_the_group_level_truth():
    pred = ["a1", "a2", "b1", "b1"]
    t, _ = _scored(pred, pred, ["x"] * 4, [0.0] * 4)
    p = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float16)
    est = estimate(prepare(t, _taxa("group"), "site", p, _validation(), {"a1": 1, "a2": 1, "b1": 2}), n_boot=0)
    assert est.taxa == ["A", "B"] and np.allclose(est.shares["classify_and_count"][0], [0.5, 0.5, 0])
    assert np.allclose(est.grouped.base.prior, [0.5, 0.5])  # the training counts summed to the level
    assert est.error()["em"] == pytest.approx(0.0, abs=1e-6)


def test_review_decisions_replace_predictions_and_keep_anomalies_unknown():
    pred = ["a1"] * 6
    t, proba = _scored(pred, pred, ["x"] * 6, [0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    proba = np.array([[0.6, 0.1, 0.3]] * 6, np.float16)
    decisions = pd.DataFrame({
        "dataset": "hand", "relpath": ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"],
        "decision": ["assign_label", "confirm_anomaly", "not_anomaly", "assign_label", "assign_label"],
        "label": ["b1", "", "", "B", "nonsense"], "label_level": ["class", "", "", "group", "class"]})
    gr = prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}, decisions=decisions)
    assert gr.reviewed.tolist() == [[0, 0, 2]]  # b1, and B's only descendant b1
    assert gr.anomalies.tolist() == [2]  # the confirmed anomaly, and a label this model does not know
    est = estimate(gr, "ood_msp_class", 0.5, n_boot=20)
    # img2 (score 0.9, "not an anomaly") is never moved; img5 is kept by the threshold
    assert est.moved.tolist() == [0]
    assert np.allclose(est.shares["classify_and_count"][0], [2 / 6, 0, 2 / 6, 2 / 6])
    assert any("not classes of this model" in n for n in gr.notes)
    # a coarse label counts for its most probable descendant under the image's posteriors
    d2 = pd.DataFrame({"dataset": "hand", "relpath": ["img0.png"], "decision": ["assign_label"], "label": ["A"],
                       "label_level": ["group"]})
    gr2 = prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}, decisions=d2)
    assert gr2.reviewed.tolist() == [[1, 0, 0]]
    # a leaf label counts for its ancestor at the group level
    gr3 = prepare(t, _taxa("group"), "site", np.array([[0.7, 0.3]] * 6, np.float16), _validation(),
                  {"a1": 1, "a2": 1, "b1": 1}, decisions=decisions.iloc[:1])
    assert gr3.reviewed.tolist() == [[0, 1]]


def test_bootstrap_bands_are_seeded_contain_the_estimate_and_shrink_with_more_images():
    rng = np.random.default_rng(5)
    names = ["a1", "a2", "b1"]
    p = rng.dirichlet([2, 1, 1], size=2000)
    pred = [names[i] for i in p.argmax(1)]
    site = ["small"] * 100 + ["large"] * 1900
    t, proba = _scored(pred, pred, site, rng.random(2000), p)
    v = _validation()
    gr = prepare(t, _taxa(), "site", proba, v, {"a1": 2, "a2": 1, "b1": 1})
    a = estimate(gr, n_boot=60, seed=7, band_images=150)
    b = estimate(gr, n_boot=60, seed=7, band_images=150)
    for e in ESTIMATORS:
        assert np.array_equal(a.low[e], b.low[e]) and np.array_equal(a.high[e], b.high[e])
        assert (a.low[e] <= a.shares[e] + 1e-12).all() and (a.shares[e] <= a.high[e] + 1e-12).all()
        width = a.high[e][:, :3] - a.low[e][:, :3]
        large, small = list(gr.groups["group"]).index("large"), list(gr.groups["group"]).index("small")
        assert width[large].mean() < width[small].mean(), e
    c = estimate(gr, n_boot=60, seed=8)
    assert not np.array_equal(a.low["classify_and_count"], c.low["classify_and_count"])
    none = estimate(gr, n_boot=0)
    assert np.isnan(none.low["em"]).all()


def test_diversity_and_bray_curtis_between_groups_by_hand():
    pytest.importorskip("skbio")
    from explain.community_stats import bray_curtis_between, diversity

    pred = ["a1", "a1", "a2", "b1"] + ["a1", "a1"]
    t, proba = _scored(pred, pred, ["x"] * 4 + ["y"] * 2, [0.0] * 6)
    est = estimate(prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}), n_boot=0)
    d = diversity(est).set_index("group")
    assert d.loc["x", "richness"] == 3 and d.loc["y", "richness"] == 1
    assert d.loc["x", "shannon"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert d.loc["y", "shannon"] == pytest.approx(0.0)
    bc = bray_curtis_between(est)
    x, y = np.array([0.5, 0.25, 0.25]), np.array([1.0, 0, 0])
    assert bc.loc["x", "y"] == pytest.approx(np.abs(x - y).sum() / (x + y).sum()) and bc.loc["x", "x"] == 0


def test_to_json_shape_on_the_hand_made_table():
    pred = ["a1", "a2", "b1", "b1"]
    t, proba = _scored(pred, pred, ["x", "x", "y", "y"], [0.0] * 4)
    est = estimate(prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}), n_boot=10)
    out = json.loads(json.dumps(to_json(est, collection="hand")))
    assert set(out["error"]) == ESTIMATORS and [g["group"] for g in out["groups"]] == ["x", "y"]
    taxon = out["groups"][0]["taxa"][0]
    assert taxon["taxon"] == "a1" and {"count", "true", "em", "em_low", "em_high"} <= set(taxon)


def test_wrong_level_is_a_message():
    from explain.community import taxa_of

    with pytest.raises(CommunityError, match="level 'species'"):
        taxa_of({"class": ["a"]}, None, "species")


# --- the command line on real collections -------------------------------------------------------
def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explain.community", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ), timeout=timeout)


def test_cli_json_on_a_labelled_collection(scored_sample):
    r = _cli("estimate", "--collection", scored_sample, "--by", "split", "--boot", "30", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["error"]) == ESTIMATORS and all(0 <= v < 0.1 for v in out["error"].values())
    assert sorted(g["group"] for g in out["groups"]) == sorted(["train", "val", "test"])
    g = out["groups"][0]
    assert g["images"] > 0 and len(g["taxa"]) == 121 + 1 and g["taxa"][-1]["taxon"] == "unknown"
    for e in ESTIMATORS:
        assert sum(t[e] for t in g["taxa"]) == pytest.approx(1.0, abs=1e-4)
        assert all(t[f"{e}_low"] <= t[e] + 1e-9 <= t[f"{e}_high"] + 2e-9 for t in g["taxa"])
    assert out["level"] == "class" and out["model"]
    # a level, and a threshold that moves images to unknown
    r = _cli("estimate", "--collection", scored_sample, "--by", "split", "--level", "group", "--score", "msp",
             "--boot", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["score"] == "ood_msp_group" and out["threshold"] > 0
    assert sum(g["moved_to_unknown"] for g in out["groups"]) > 0 and len(out["groups"][0]["taxa"]) == 15 + 1


def test_cli_bad_input_is_a_message_not_a_traceback(scored_sample):
    for args, expect in [(("--collection", scored_sample, "--by", "nope"), "no column 'nope'"),
                         (("--collection", scored_sample, "--by", "split", "--level", "species"), "species"),
                         (("--collection", "no-such-collection", "--by", "split"), "no-such-collection"),
                         (("--collection", scored_sample, "--by", "split", "--model", "no-such-model"), "no-such-model"),
                         (("--collection", scored_sample, "--by", "station"), "positions"),
                         (("--collection", scored_sample, "--by", "split", "--score", "nope"), "nope")]:
        r = _cli("estimate", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and expect in r.stderr, (args, r.stderr)


def test_cli_json_on_the_vpr_bundle_positions_and_no_labels(vpr):
    r = _cli("estimate", "--collection", vpr, "--by", "station", "--boot", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "error" not in out  # no validated label: no error against a truth
    [g] = out["groups"]
    assert g["images"] == 6 and g["lat"] == pytest.approx(77.0709, abs=1e-3) and g["lon"] == pytest.approx(161.8121, abs=1e-3)
    assert "true" not in g["taxa"][0]
    r = _cli("estimate", "--collection", vpr, "--by", "depth", "--depth-bin", "1", "--json", "--boot", "0")
    assert r.returncode == 0, r.stderr
    assert [g["group"] for g in json.loads(r.stdout)["groups"]] == ["120–121 m"]


def test_counts_csv_is_one_row_per_group_and_class_with_spreadsheet_safe_text():
    from explain.community import counts_csv

    pred = ["a1", "a2", "b1", "b1"]
    t, proba = _scored(pred, pred, ["=HYPERLINK(\"http://x\")", "=HYPERLINK(\"http://x\")", "st 2", "st 2"], [0.0] * 4)
    est = estimate(prepare(t, _taxa(), "site", proba, _validation(), {"a1": 1, "a2": 1, "b1": 1}), n_boot=10)
    import io

    back = pd.read_csv(io.StringIO(counts_csv(est)))
    assert len(back) == 2 * 4 and {"group", "taxon", "count", "true", "em_low", "moved_to_unknown", "lat"} <= set(back.columns)
    assert set(back["group"]) == {"'=HYPERLINK(\"http://x\")", "st 2"}
