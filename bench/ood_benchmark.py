"""The leave-class-out / cross-instrument OOD benchmark of the zoo's classifiers, its tables and
its section of docs/results.md (issue 5).

    python bench/ood_benchmark.py [--json] [--models NAME ...] [--no-write] [--results PATH]

evaluates the zoo's checkpoints (no training; the evaluation sets and their caches are
:func:`explain.ood_evaluation.evaluation`, shared with the Anomalies page) and writes the table
into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import publish  # noqa: E402
from explain.ood import CONFIG, ood_metrics, score_names  # noqa: E402
from explain.ood_evaluation import Evaluation, evaluation, known_group_unknown  # noqa: E402
from models.report import write_results_section  # noqa: E402

RESULTS = REPO / "docs" / "results.md"
SECTION = "ood-benchmark"  # docs/results.md section, see models/report.py
START, END = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"


# --- the benchmark ---------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(float(x), 4)


def leave_class_out(ev: Evaluation) -> tuple[dict, dict]:
    """Per score (leaf level for logit scores): mean AUROC / FPR95 / AUPR over held-out classes,
    each class's AUROC; and the mean AUROC of every logit score at every level."""
    idn = ev.set_of("id")[0]
    held = ev.sets["held-out classes"]
    classes = sorted(held.rows["class"].unique())
    masks = {c: (held.rows["class"] == c).to_numpy() for c in classes}
    table, per_level = {}, {}
    for score in score_names():
        s = ev.scores(score)
        ms = {c: ood_metrics(s[idn], s["held-out classes"][m]) for c, m in masks.items()}
        table[score] = {"auroc_mean": _r(np.mean([m["auroc"] for m in ms.values()])),
                        "fpr95_mean": _r(np.mean([m["fpr95"] for m in ms.values()])),
                        "aupr_mean": _r(np.mean([m["aupr"] for m in ms.values()])),
                        "per_class": {c: _r(m["auroc"]) for c, m in ms.items()}}
    for lvl in ev.levels:
        per_level[lvl] = {}
        for score in score_names("logits"):
            s = ev.scores(score, lvl)
            per_level[lvl][score] = _r(np.mean([ood_metrics(s[idn], s["held-out classes"][m])["auroc"] for m in masks.values()]))
    return table, per_level


def cross_dataset(ev: Evaluation) -> dict:
    """Per score: the other instrument's images against the in-distribution test split."""
    idn, other = ev.set_of("id")[0], ev.set_of("other")
    if not other:
        return {}
    out = {}
    for score in score_names():
        s = ev.scores(score)
        m = ood_metrics(s[idn], s[other[0]])
        out[score] = {"auroc": _r(m["auroc"]), "fpr95": _r(m["fpr95"]), "aupr": _r(m["aupr"])}
    return out


def model_info(man: dict) -> dict:
    test = man.get("metrics", {}).get("test", {})
    ta = man.get("train_args", {})
    return {"arch": man.get("arch"), "dataset": man.get("dataset"), "heldout": len(man.get("heldout") or []),
            "outlier_exposure": ta.get("outlier_exposure", "none"), "oe_weight": ta.get("oe_weight") if ta.get("outlier_exposure", "none") != "none" else None,
            "init_from": ta.get("init_from"), "epochs": ta.get("epochs"),
            "leaf_accuracy": _r(test.get("leaf", {}).get("accuracy", float("nan"))), "command": man.get("command")}


def targets(result: dict) -> dict:
    """The issue's targets, checked on the held-out models found.

    The flat-logit model is the best held-out model trained with outlier exposure; its bar is the
    best post-hoc score of *any* held-out model trained without it (the strictest baseline). Its
    accuracy is compared with the model trained the same way without the term (same ``init_from``
    and epochs: the plain fine-tune), or else the first baseline.
    """
    info, lco = result["models"], result["leave_class_out"]
    oe = [m for m in lco if info[m]["outlier_exposure"] != "none"]
    base = [m for m in lco if info[m]["outlier_exposure"] == "none"]
    out: dict = {}

    def best(models: list[str], scores) -> tuple[str, str, float]:
        """(model, score, mean AUROC) of the best score of the best model among ``models``."""
        return max(((n, s, lco[n][s]["auroc_mean"]) for n in models for s in scores), key=lambda t: t[2])

    if oe:
        m, s, auc = best(oe, score_names("logits"))
        out.update({"flat_logit_model": m, "flat_logit_best_score": s, "flat_logit_auroc_mean": auc,
                    "flat_logit_auroc_ge_0.95": auc >= 0.95})
    if base:
        b, s, auc = best(base, score_names())
        out.update({"baseline_model": b, "baseline_best_score": s, "baseline_best_auroc_mean": auc})
        if oe:
            m = out["flat_logit_model"]
            same = [n for n in base if (info[n].get("init_from"), info[n].get("epochs")) == (info[m].get("init_from"), info[m].get("epochs"))]
            ref = same[0] if same else base[0]
            out["flat_logit_above_baseline"] = out["flat_logit_auroc_mean"] > out["baseline_best_auroc_mean"]
            out["accuracy_reference_model"] = ref
            out["accuracy_drop"] = _r(info[ref]["leaf_accuracy"] - info[m]["leaf_accuracy"])
            out["accuracy_within_1_point"] = out["accuracy_drop"] <= 0.01
    cross = result["cross_dataset"]
    if cross:
        best_c = {m: max(v.values(), key=lambda r: r["auroc"])["auroc"] for m, v in cross.items() if v}
        out["cross_dataset_best_auroc"] = best_c
        out["cross_dataset_ge_0.98"] = {m: a >= 0.98 for m, a in best_c.items()}
    return out


def run_benchmark(models: list[str] | None = None, progress: bool = False) -> dict:
    """Evaluate zoo models: leave-class-out for models with held-out classes, cross-instrument
    for every model. Returns the JSON shape documented in the issue (plus details)."""
    from models.zoo import list_models

    zoo = [m for m in list_models() if "error" not in m and m.get("kind", "classifier") == "classifier"]
    if models:
        missing = sorted(set(models) - {m["name"] for m in zoo})
        if missing:
            raise KeyError(f"not in the zoo: {missing}")
        zoo = [m for m in zoo if m["name"] in models]
    result: dict = {"leave_class_out": {}, "cross_dataset": {}, "per_level": {}, "known_group_unknown_class": {}, "models": {},
                    "sizes": {}}
    t0 = time.time()
    for m in zoo:
        name = m["name"]
        ev = evaluation(name, progress=progress)
        result["models"][name] = model_info(ev.manifest)
        result["sizes"][name] = {n: len(s) for n, s in ev.sets.items()}
        if ev.heldout and len(ev.sets["held-out classes"]):
            result["leave_class_out"][name], result["per_level"][name] = leave_class_out(ev)
            kgu = known_group_unknown(ev, "msp")
            if kgu:
                result["known_group_unknown_class"][name] = {n: _r(v.mean()) for n, v in kgu.items() if len(v)}
        cd = cross_dataset(ev)
        if cd:
            result["cross_dataset"][name] = cd
        if progress:
            print(f"{name}: evaluated ({time.time() - t0:.0f} s so far)", file=sys.stderr)
    result["targets"] = targets(result)
    result["seconds"] = round(time.time() - t0, 1)
    return result


# --- docs/results.md ------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(result: dict) -> str:
    """The benchmark as a Markdown section (between markers, so it can be replaced in place)."""
    score_ids, logit_names = score_names(), score_names("logits")  # the registry's, in its order
    lines = ["## Out-of-distribution detection (issue 5)", "",
             "Reproduce: `python bench/ood_benchmark.py --json` (evaluation only, from the zoo's checkpoints). "
             "Scores: higher = more anomalous; logit scores on the leaf level. AUROC and FPR95 in %; FPR95 is the share "
             "of OOD images kept when 95 % of in-distribution test images are kept.", ""]
    info = result["models"]
    if info:
        lines += ["| model | arch | held-out classes | outlier exposure | leaf accuracy (test) |", "|---|---|---|---|---|"]
        for n, i in info.items():
            oe = i["outlier_exposure"] + (f" (weight {i['oe_weight']})" if i.get("oe_weight") is not None else "")
            lines.append(f"| {n} | {i['arch']} | {i['heldout']} | {oe} | {_pct(i['leaf_accuracy'])} |")
        lines.append("")
    lco = result["leave_class_out"]
    lines += ["### Leave-class-out", ""]
    if not lco:
        lines += ["No model with held-out classes in the zoo yet. Train them with "
                  "`python -m models.train --arch bacnn --holdout default --name ndsb-bacnn-heldout` and "
                  "`python -m models.train --arch bacnn --holdout default --outlier-exposure mixed --name ndsb-bacnn-heldout-oe`.", ""]
    else:
        names = list(lco)
        lines += ["Mean over the held-out classes (data/heldout_ndsb.json) of each class's AUROC against the in-distribution "
                  "test split; FPR95 likewise.", "",
                  "| score | " + " | ".join(f"{n} AUROC | {n} FPR95" for n in names) + " |",
                  "|---|" + "---|---|" * len(names)]
        for s in score_ids:
            lines.append(f"| {s} | " + " | ".join(f"{_pct(lco[n][s]['auroc_mean'])} | {_pct(lco[n][s]['fpr95_mean'])}" for n in names) + " |")
        lines += ["", "Per held-out class, AUROC of each model's best score:", ""]
        best = {n: max(score_ids, key=lambda s: lco[n][s]["auroc_mean"]) for n in names}
        lines += ["| class | " + " | ".join(f"{n} ({best[n]})" for n in names) + " |", "|---|" + "---|" * len(names)]
        for c in lco[names[0]][score_ids[0]]["per_class"]:
            lines.append(f"| {c} | " + " | ".join(_pct(lco[n][best[n]]["per_class"].get(c, float('nan'))) for n in names) + " |")
        pl = result.get("per_level", {})
        if pl:
            lines += ["", "Mean AUROC per taxonomic level (logit scores):", ""]
            for n in names:
                lines += [f"{n}:", "", "| level | " + " | ".join(logit_names) + " |", "|---|" + "---|" * len(logit_names)]
                for lvl, v in pl[n].items():
                    lines.append(f"| {lvl} | " + " | ".join(_pct(v[s]) for s in logit_names) + " |")
                lines.append("")
    kg = result.get("known_group_unknown_class", {})
    if kg:
        lines += ["Share of images with a peaked group head and a flat leaf head (\"known group, unknown class\"; MSP, "
                  "thresholds keeping 95 % of in-distribution images at each level):", "",
                  "| model | " + " | ".join(next(iter(kg.values()))) + " |", "|---|" + "---|" * len(next(iter(kg.values())))]
        for n, v in kg.items():
            lines.append(f"| {n} | " + " | ".join(_pct(x) for x in v.values()) + " |")
        lines.append("")
    cd = result["cross_dataset"]
    lines += ["### Cross-instrument", ""]
    if cd:
        names = list(cd)
        sizes = result.get("sizes", {})
        n0 = names[0]
        other = [k for k in sizes.get(n0, {}) if not k.startswith(("in-distribution", "held-out", "known"))]
        lines += [f"Other-instrument images ({', '.join(f'{k}: {sizes[n0][k]:,}' for k in other)}, a deterministic sample of at most "
                  f"{CONFIG['other_per_class']} per class) against each model's in-distribution test split: AUROC / FPR95 in %.", "",
                  "| score | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for s in score_ids:
            lines.append(f"| {s} | " + " | ".join(f"{_pct(cd[n][s]['auroc'])} / {_pct(cd[n][s]['fpr95'])}" for n in names) + " |")
        lines.append("")
    t = result.get("targets", {})
    if t:
        lines += ["### Targets", ""] + target_lines(result) + ["", "```json", json.dumps(t, indent=1), "```", ""]
    return "\n".join(lines)


def target_lines(result: dict) -> list[str]:
    """The issue's targets against what was measured, one Markdown bullet each."""
    t, out = result.get("targets", {}), []
    yes = {True: "met", False: "**not met**"}
    if "flat_logit_model" in t:
        out.append(f"- Mean leave-class-out AUROC ≥ 95 % for the flat-logit model: {yes[t['flat_logit_auroc_ge_0.95']]} "
                   f"({_pct(t['flat_logit_auroc_mean'])} %, {t['flat_logit_best_score']}, {t['flat_logit_model']}).")
    else:
        out.append("- Mean leave-class-out AUROC ≥ 95 % for the flat-logit model: no flat-logit held-out model in the zoo yet.")
    if "flat_logit_above_baseline" in t:
        out.append(f"- Above the baseline's best post-hoc score ({_pct(t['baseline_best_auroc_mean'])} %, {t['baseline_best_score']}, "
                   f"{t['baseline_model']}): {yes[t['flat_logit_above_baseline']]}.")
        out.append(f"- Classification within 1 point of the same model trained without the term "
                   f"({t.get('accuracy_reference_model', t['baseline_model'])}): {yes[t['accuracy_within_1_point']]} "
                   f"(test leaf accuracy {_pct(t['accuracy_drop'])} points lower; a negative number means higher).")
    if t.get("cross_dataset_best_auroc"):
        best = max(t["cross_dataset_best_auroc"].items(), key=lambda kv: kv[1])
        out.append(f"- ZooLake-vs-NDSB AUROC ≥ 98 %: {yes[best[1] >= 0.98]} (best {_pct(best[1])} %, {best[0]}).")
    return out


def write_results(result: dict, path: Path = RESULTS) -> Path:
    """Replace (or append) the OOD section of docs/results.md; the rest of the file is kept."""
    return write_results_section(SECTION, results_markdown(result), path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/ood_benchmark.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--models", nargs="*", help="zoo model names (default: all)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/results.md")
    ap.add_argument("--results", default=str(RESULTS), help="Markdown file to update (default docs/results.md)")
    args = ap.parse_args(argv)
    from data.sources import DatasetNotFound
    from models.checkpoint import CheckpointError

    try:
        result = run_benchmark(args.models, progress=True)
    except (KeyError, CheckpointError, DatasetNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result["models"]:
        print("error: the zoo holds no model; train one with python -m models.train", file=sys.stderr)
        return 2
    publish(result, SECTION, results_markdown(result), as_json=args.json, results_path=None if args.no_write else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
