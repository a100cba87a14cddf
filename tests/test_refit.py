"""models.refit: level heads refitted on frozen training features (issue 17)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from models.architectures import create_model
from models.checkpoint import load_checkpoint
from models.data import load_dataset, subset
from models.refit import fit_softmax, head_inputs, refit_heads

from .conftest import REPO, requires_data, tiny_train_command


def _tiny(limit: int = 4):
    _, df, images, tax, _ = load_dataset("ndsb", 64, limit_per_class=limit)
    return subset(df, images, tax, "train"), subset(df, images, tax, "val"), tax


@requires_data
def test_fit_softmax_is_scikit_learns_logistic_regression():
    """The same objective as LogisticRegression(C=c): the same probabilities on real features."""
    from sklearn.linear_model import LogisticRegression

    train, _, tax = _tiny()
    torch.manual_seed(0)
    model = create_model("bacnn", tax)
    x = head_inputs(model, train.images)["group"]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = train.labels["group"]
    w, b = fit_softmax(x, y, len(tax.names("group")), c=0.1, iters=300)
    ref = LogisticRegression(C=0.1, max_iter=2000, tol=1e-8).fit(x, y)
    p = torch.from_numpy(x @ w.T + b).softmax(-1).numpy()[:, ref.classes_]
    np.testing.assert_allclose(p, ref.predict_proba(x), atol=2e-3)


@requires_data
def test_refit_heads_changes_only_the_heads_and_lowers_the_training_loss():
    train, val, tax = _tiny()
    torch.manual_seed(0)
    model = create_model("bacnn", tax).eval()
    x = torch.from_numpy(train.images[:8]).float().div(255).unsqueeze(1)
    trunk = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("heads.")}
    emb_before = model.embed(x).detach()

    def train_loss(lvl):
        with torch.no_grad():
            z = torch.cat([model(torch.from_numpy(train.images[i:i + 256]).float().div(255).unsqueeze(1))[lvl]
                           for i in range(0, len(train.images), 256)])
        return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(train.labels[lvl])))

    before = {lvl: train_loss(lvl) for lvl in tax.levels}
    report = refit_heads(model, train, val, c_grid=(0.1, 1.0))
    assert set(report) == set(tax.levels) and all(r["c"] in (0.1, 1.0) for r in report.values())
    for k, v in model.state_dict().items():
        if k in trunk:
            assert torch.equal(v, trunk[k]), k  # the trunk and the attention are untouched
    assert torch.allclose(model.embed(x), emb_before)
    for lvl in tax.levels:  # an untrained model's heads: the refit must fit the training features
        assert train_loss(lvl) < before[lvl] - 0.1, lvl


@requires_data
def test_refit_cli_writes_a_loadable_checkpoint_and_refuses_what_it_cannot_refit(tmp_path):
    train = tiny_train_command(tmp_path, "--epochs", "1")
    r = subprocess.run(train + ["--arch", "bacnn"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    src = tmp_path / "zoo" / "ndsb-bacnn.json"
    refit = [sys.executable, "-m", "models.refit", "--limit-per-class", "3", "--threads", "1",
             "--export-dir", str(tmp_path / "refit")]
    r = subprocess.run(refit + ["--model", str(src)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saved" in r.stdout and "test leaf accuracy" in r.stdout
    model, manifest = load_checkpoint(tmp_path / "refit" / "ndsb-bacnn.json")
    original = json.loads(src.read_text())
    assert manifest["command"] == original["command"]  # the training run's manifest is kept
    assert manifest["history"] == original["history"]
    assert manifest["refit"]["from_sha256"] == original["sha256"]
    assert manifest["refit"]["command"].startswith("python -m models.refit")
    assert manifest["refit"]["test_after"]["leaf_accuracy"] == round(manifest["metrics"]["test"]["leaf"]["accuracy"], 4)
    assert set(manifest["refit"]["heads"]) == set(model.levels)
    assert manifest["sha256"] != original["sha256"]

    r = subprocess.run(train + ["--arch", "sbacnn"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(refit + ["--model", str(tmp_path / "zoo" / "ndsb-sbacnn.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "only a trained Plankton Lens classifier with linear level heads" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(refit + ["--model", str(tmp_path / "nowhere.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
