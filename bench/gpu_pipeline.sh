#!/usr/bin/env bash
# The whole pipeline through Ray Train on one GPU (embedded local Ray, no cluster):
#   synth (MOSI-shaped) -> prepare (the personality [CLS] pass runs on the GPU) -> train (TorchTrainer, one GPU
#   worker, bf16 autocast where supported) -> re-run the same run name with one more epoch (resume) -> evaluate
#   the selected checkpoint with 1 Ray Train GPU worker and in-process, and compare.
# Writes metrics.json, history.json (per-epoch samples/s, data wait), eval_*.json and gpu.txt to OUTDIR.
#
# VARIANTS: more training runs on the same shards after the main one, each a fresh run name, VARIANT_EPOCHS epochs,
# its history in history_<name>.json: "name:override,override name2:override" (e.g. shape buckets).
#
#   bench/gpu_pipeline.sh OUTDIR                    # paper preset, full MOSI size, 3 + 1 epochs, batch 32
#   PRESET=tiny SCALE=0.2 EPOCHS=1 USE_GPU=false bench/gpu_pipeline.sh /tmp/out   # dry run on a CPU machine
#   BATCH=128 SCALE=4 RESUME=0 EVAL=0 VARIANTS="buckets:data.token_pad_multiple=8,data.frame_pad_multiple=32" \
#       bench/gpu_pipeline.sh OUTDIR              # what bench/gpu.sh runs
set -euo pipefail
OUTDIR=${1:?usage: bench/gpu_pipeline.sh OUTDIR}
PRESET=${PRESET:-paper}; SCALE=${SCALE:-1}; EPOCHS=${EPOCHS:-3}; BATCH=${BATCH:-32}; USE_GPU=${USE_GPU:-true}
RESUME=${RESUME:-1}  # 0: skip the resume step
EVAL=${EVAL:-1}  # 0: skip evaluating the selected checkpoint
VARIANTS=${VARIANTS:-}; VARIANT_EPOCHS=${VARIANT_EPOCHS:-2}
PY=${PY:-python3}
W=$(mktemp -d)
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
stamp() { echo "=== $(date +%T) $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, ray, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'ray', ray.__version__, 'transformers', transformers.__version__); import os; print('cpus', os.cpu_count())"
} | tee "$OUTDIR/gpu.txt"

stamp synth
$PY -m psamf.cli synth --kind mosi --format mmsa --out "$W/synth" --seed 0 --scale "$SCALE"
stamp prepare
$PY -m psamf.cli prepare --format mmsa --input "$W/synth/unaligned_50.pkl" --dataset mosi --out "$W/shards" \
    --tokenizer psamf:tiny --personality-cls --preset "$PRESET"
common=(--preset "$PRESET" "data.uri=$W/shards" data.tokenizer=psamf:tiny data.personality_tokenizer=psamf:tiny
        "run.storage_path=$W/runs" run.name=gpu run.num_workers=1 "run.use_gpu=$USE_GPU"
        "optim.batch_size=$BATCH" optim.amp=auto)
stamp "train $EPOCHS epochs"
$PY -m psamf.cli train "${common[@]}" "optim.epochs=$EPOCHS"
if [ "$RESUME" = 1 ]; then
  stamp "resume: same run name, $((EPOCHS + 1)) epochs"
  $PY -m psamf.cli train "${common[@]}" "optim.epochs=$((EPOCHS + 1))"
fi
cp "$W/runs/gpu/metrics.json" "$W/runs/gpu/history.json" "$OUTDIR/"
for v in $VARIANTS; do
  name=${v%%:*}; IFS=, read -r -a extra <<< "${v#*:}"
  stamp "variant $name: ${extra[*]}"
  $PY -m psamf.cli train "${common[@]/run.name=gpu/run.name=gpu-$name}" "optim.epochs=$VARIANT_EPOCHS" "${extra[@]}"
  cp "$W/runs/gpu-$name/history.json" "$OUTDIR/history_$name.json"
done
if [ "$EVAL" = 1 ]; then
  stamp "evaluate the selected checkpoint: in-process, then one Ray Train worker"
  $PY -m psamf.cli evaluate "$W/runs/gpu" --num-workers 0 --out "$OUTDIR/eval_inproc.json"
  $PY -m psamf.cli evaluate "$W/runs/gpu" --num-workers 1 --out "$OUTDIR/eval_ray.json" "run.use_gpu=$USE_GPU"
fi
stamp done
rm -rf "$W"
