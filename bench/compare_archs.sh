#!/usr/bin/env bash
# Issue 17: the seed's comparison done fairly. Flat, B-CNN, BA-CNN and SBA-CNN trained with the
# same recipe (the default model's: weight EMA, blur stem, cosine schedule, natural sampling,
# seed 0) for the same number of epochs, then evaluated on the NDSB test split.
# Resumable: re-run the script; a finished model is skipped, an interrupted one resumes.
# The checkpoints go to runs/compare (outside the zoo); the JSON reports to runs/compare/*.eval.json.
#   EPOCHS=4 bash bench/compare_archs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-4}
OUT=${OUT:-runs/compare}
mkdir -p "$OUT"
for arch in flat bcnn bacnn sbacnn; do
    name="cmp${EPOCHS}-$arch"
    [ -f "$OUT/$name.json" ] || $PY -m models.train --dataset ndsb --arch "$arch" --epochs "$EPOCHS" \
        --name "$name" --export-dir "$OUT" --runs-dir "$OUT/runs" --no-progress
    [ -f "$OUT/$name.eval.json" ] || { $PY -m models.evaluate --model "$OUT/$name.json" --split test --json \
        > "$OUT/$name.eval.json.tmp" && mv "$OUT/$name.eval.json.tmp" "$OUT/$name.eval.json"; }
done
$PY - "$OUT" "$EPOCHS" <<'EOF'
"""The comparison table, in the layout of docs/results.md's classifier table (models.evaluate's own)."""
import json, sys
from pathlib import Path
from models.evaluate import learning_curves, results_table
out, epochs = Path(sys.argv[1]), sys.argv[2]
reports = [json.loads((out / f"cmp{epochs}-{a}.eval.json").read_text()) for a in ["flat", "bcnn", "bacnn", "sbacnn"]]
for r in reports:
    r["model"] = Path(r["model"]).stem
print(results_table(reports))
print()
print(learning_curves([str(out / f"cmp{epochs}-{a}.json") for a in ["flat", "bcnn", "bacnn", "sbacnn"]]))
EOF
