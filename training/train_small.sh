#!/usr/bin/env bash
# Train the small default model through every stage on a rendered dataset, then copy it to models/small.
#   training/train_small.sh DATA_DIR RUN_DIR   (DATA_DIR from: python -m training.render_dataset --out DATA_DIR)
set -euo pipefail
DATA=${1:?dataset folder (with train/ and test/)}
RUN=${2:?run folder}
PY=${PYTHON:-.venv/bin/python}
common=(--config configs/small.json --set "data_root=\"$DATA/train\"" --set "val_root=\"$DATA/test\""
        --set "output_dir=\"$RUN\"" --set cache_latents=true)
$PY -m training.train --stage vae "${common[@]}" --set "val_root=\"$DATA/train\"" --set cache_latents=false
for stage in 0 1 2 3; do
  extra=()
  if [ "$stage" = 3 ]; then extra=(--set save_fp16=true); fi
  $PY -m training.train --stage "$stage" "${common[@]}" "${extra[@]}"
done
rm -rf models/small
mkdir -p models
cp -r "$RUN/stage3/model" models/small
du -sh models/small
