#!/usr/bin/env bash
# Train the default model zoo on NDSB with the project's own command (resumable: re-run it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m models.train --arch bacnn --dataset ndsb --epochs 10 --no-progress
$PY -m models.train --arch flat --dataset ndsb --epochs 6 --no-progress
$PY -m models.train --arch bcnn --dataset ndsb --epochs 6 --no-progress
$PY -m models.train --arch sbacnn --dataset ndsb --epochs 6 --no-progress
