#!/usr/bin/env bash
# One call on a lent GPU machine (this workplace's `device` tool, which copies the repository there and collects
# $OUT): the GPU benchmarks of docs/PERFORMANCE.md, then the small model trained on the GPU with the time left.
# Arguments choose the sections, in order: bench (eager bench, channels-last), compile (torch.compile benches),
# options (per-option pipeline memory), train; no arguments: bench options train.
# Expects, in git-ignored folders carried along: .whl/ (diffusers 0.36.0 + importlib_metadata wheels, which the
# GPU image lacks), .carry/data_small/{train,test} (render_dataset output) and .carry/vae (a trained stage-vae).
# DRY=1 OUT=/tmp/x PY=.venv/bin/python: the same on a CPU at tiny sizes (a check of the script itself).
set -u
export PYTHONUNBUFFERED=1
START=$(date +%s)
el() { echo $(( $(date +%s) - START )); }
left() { local v=$(( LIMIT - $(el) - $1 )); [ $v -lt 10 ] && v=10; echo $v; }  # seconds left, keeping $1 back
PY=${PY:-python3}
LIMIT=${LIMIT:-560}
if [ -z "${DRY:-}" ]; then
  nvidia-smi > $OUT/nvidia-smi.txt 2>&1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  DEV=cuda; SIZE=sd15; DT=fp16
else
  DEV=cpu; SIZE=tiny; DT=fp32
fi
$PY -c "import torch, diffusers, accelerate, numpy; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
SECTIONS=${*:-bench options train}
B=/tmp/bench; mkdir -p $B
bench() {
echo "== bench at $(el) s"
timeout 150 $PY -m dp3d_core.bench --size $SIZE --dtype $DT --device $DEV --steps 5 --json $B/bench_${SIZE}_${DT}.json
timeout 100 $PY -m dp3d_core.bench --size $SIZE --dtype $DT --device $DEV --steps 5 --channels-last --json $B/bench_${SIZE}_${DT}_channels_last.json
}
compile() {
echo "== compile at $(el) s"
timeout 300 $PY -m dp3d_core.bench --size $SIZE --dtype $DT --device $DEV --steps 10 --compile --json $B/bench_${SIZE}_${DT}_compile.json
echo "== compiled pipeline at $(el) s"
timeout 150 $PY -m dp3d_core.bench_options --size $SIZE --dtype $DT --device $DEV --steps 50 --options default compile --json $B/options_50steps_compile.json
echo "== compile both at $(el) s"
timeout $(left 20) $PY -m dp3d_core.bench --size $SIZE --dtype $DT --device $DEV --steps 10 --compile both --json $B/bench_${SIZE}_${DT}_compile_both.json
}
options() {
echo "== options at $(el) s"
timeout 150 $PY -m dp3d_core.bench_options --size $SIZE --dtype $DT --device $DEV --steps 3 --json $B/options_3steps.json
timeout 100 $PY -m dp3d_core.bench_options --size $SIZE --dtype $DT --device $DEV --steps 50 --options default official --json $B/options_50steps.json
}
train() {
echo "== training at $(el) s"
R=/tmp/run
common=(--config configs/small_gpu.json --set data_root=.carry/data_small/train --set val_root=.carry/data_small/test
        --set output_dir=$R --set vae=.carry/vae)
[ -n "${DRY:-}" ] && common+=(--set batch_size=4 --set num_threads=1)
LEFT=$(( LIMIT - $(el) - 4 * 25 ))
mins() { $PY -c "print(round(max(0.05, $LEFT * $1 / 60), 3))"; }
for spec in 0:0.40 1:0.30 2:0.18 3:0.12; do
  stage=${spec%%:*}; frac=${spec##*:}
  extra=(); [ -n "${DRY:-}" ] && [ "$stage" = 3 ] && extra=(--set batch_size=1)
  echo "== stage $stage at $(el) s, $(mins $frac) min"
  $PY -m training.train --stage $stage "${common[@]}" "${extra[@]}" --set max_minutes=$(mins $frac) 2>&1 | grep -v "^$" | tail -n 25 || break
done
echo "== packing at $(el) s"
tar cf - -C $R/stage3 model | split -b 15m - $OUT/model.tar.part-
tar czf $OUT/stage0_ref.tar.gz -C $R/stage0 model/model_index.json model/reference_unet
tar czf $OUT/train_logs.tar.gz -C $R --exclude=checkpoints --exclude=model --exclude=vae .
}
for section in $SECTIONS; do $section; done
cp $OUT/nvidia-smi.txt $B/ 2>/dev/null
tar czf $OUT/bench.tar.gz -C /tmp bench
ls -la $OUT
echo "== done at $(el) s"
