#!/usr/bin/env bash
# Train the small DiffPortrait360 model from models/small on a full-turn dataset, then assemble models/small360
# (the view model folder with the back-head model inside as back_head/).
#   training/train_small360.sh DATA_DIR RUN_DIR
#   (DATA_DIR from: python -m training.render_dataset --out DATA_DIR --full-turn --identities 90 --views 12 --seed 360)
# The two stages are independent (both start from models/small), so they run side by side, one torch thread each.
set -euo pipefail
DATA=${1:?full-turn dataset folder (with train/ and test/)}
RUN=${2:?run folder}
PY=${PYTHON:-.venv/bin/python}
common=(--config configs/small360.json --set "data_root=\"$DATA/train\"" --set "val_root=\"$DATA/test\""
        --set "output_dir=\"$RUN\"")
OMP_NUM_THREADS=1 $PY -m training.train --stage back "${common[@]}" > "$RUN.back.log" 2>&1 &
back=$!
OMP_NUM_THREADS=1 $PY -m training.train --stage 360 "${common[@]}" > "$RUN.360.log" 2>&1 &
views=$!
wait "$back" || { echo "stage back failed: see $RUN.back.log" >&2; exit 1; }
wait "$views" || { echo "stage 360 failed: see $RUN.360.log" >&2; exit 1; }
rm -rf models/small360
mkdir -p models
cp -r "$RUN/stage360/model" models/small360
cp -r "$RUN/stageback/model" models/small360/back_head
du -sh models/small360
