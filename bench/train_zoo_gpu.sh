#!/usr/bin/env bash
# Issue 17: train the GPU zoo on one CUDA machine (about 10 minutes on one H100/H200-class GPU,
# estimated, not yet measured: no GPU has been lent to this project's sessions so far).
# The same `python -m models.train` command as the CPU zoo (bench/train_zoo.sh), with larger
# timm backbones (random init) at 128 px and --device cuda; every run resumable (re-run the script).
# Checkpoints land in $OUT (default runs/gpu-zoo) with manifests; copy them into models/zoo to
# join the CPU models, then `python -m models.evaluate --json` reproduces their figures.
#
#   OUT=/path/to/out bash bench/train_zoo_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-zoo}
EPOCHS=${EPOCHS:-20}
BACKBONE=${BACKBONE:-timm/efficientnet_b0}   # 3.6 M trunk parameters: checkpoints stay under 25 MB
SIZE=${SIZE:-128}
nvidia-smi -L || { echo "no CUDA device: this script is for a GPU machine (bench/train_zoo.sh trains the CPU zoo)"; exit 1; }
T="$PY -m models.train --device cuda --threads 8 --no-progress --backbone $BACKBONE --size $SIZE --batch-size 256 --lr 2e-3 \
   --export-dir $OUT --runs-dir $OUT/runs --epochs $EPOCHS"
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$OUT/ndsb-bacnn-gpu.json" ]    || $T --arch bacnn --dataset ndsb --name ndsb-bacnn-gpu
[ -f "$OUT/ndsb-flat-gpu.json" ]     || $T --arch flat  --dataset ndsb --name ndsb-flat-gpu
[ -f "$OUT/zoolake-bacnn-gpu.json" ] || $T --arch bacnn --dataset zoolake --name zoolake-bacnn-gpu
[ -f "$OUT/ndsb-bacnn-heldout-gpu.json" ] || $T --arch bacnn --dataset ndsb --holdout default --name ndsb-bacnn-heldout-gpu
echo "trained in $(( $(date +%s) - start )) s"
for m in "$OUT"/*.json; do
  $PY -m models.evaluate --model "$m" --json > "${m%.json}.eval.json" || echo "evaluation of $m failed"
done
ls -la "$OUT"
