#!/usr/bin/env bash
# Every GPU measure of issue 11 in one prepared run (< 8 minutes on one H200), one JSON file per measure:
#   step_<amp>_b<B>.json     PSA-MF train step (paper preset, MOSI shapes, precomputed CLS_p) at batch 32 and 128,
#                            bf16 and fp16 with loss scaling: samples/s, step time, MFU, peak GPU memory, and the
#                            bare-BERT limit (plain BertModel fwd + bwd + Adam at the same padded length) beside it
#   step_compile_bf16_b128.json   the same with optim.compile (first_step_s includes compiling)
#   profile_bf16_b128.json   where the step's time goes (bench/profile_step.py: phases, op families, host syncs)
#   epoch_<amp>_b<B>.json    one epoch of MOSI-shaped batches from the real pipeline (bench/epoch.py), uniformly
#                            shuffled vs length-grouped (the default): padded-token share, epoch time, the bare-BERT
#                            limit summed over the same batches, MFU
#   pipeline.json            the whole pipeline through Ray Train (bench/gpu_pipeline.sh, batch 32): first and
#                            steady epoch time, samples/s, data-wait fraction per epoch; its raw files in pipeline/
#   summary.json             all of the above in one list
#
#   bench/gpu.sh OUTDIR                 # on a GPU machine (default OUTDIR: $OUT, else ./gpu-bench)
#   DEVICE=cpu bench/gpu.sh /tmp/dry    # dry run on a CPU: tiny preset, tiny sizes, amp off, same files
# Each stage has its own time limit (a stage that runs over is recorded as {"error": ...} and the rest go on).
set -uo pipefail
OUTDIR=${1:-${OUT:-./gpu-bench}}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then
  PRESET=tiny; BATCHES="4"; AMPS="off"; STEPS=2; WARMUP=1; FRAMES=(--audio-frames 40 --visual-frames 50)
  T_STEP=240; T_COMPILE=5; PIPE=(PRESET=tiny SCALE=0.1 EPOCHS=2 BATCH=8 USE_GPU=false RESUME=0); T_PIPE=420
  EPOCH_SCALE=0.1; T_EPOCH=240
else
  PRESET=paper; BATCHES="32 128"; AMPS="bf16 fp16"; STEPS=20; WARMUP=3; FRAMES=()
  T_STEP=90; T_COMPILE=150; PIPE=(PRESET=paper SCALE=1 EPOCHS=3 BATCH=32 USE_GPU=true RESUME=0); T_PIPE=240
  EPOCH_SCALE=1; T_EPOCH=120
fi
stamp() { echo "=== $(date +%T) $*"; }
fail_json() { printf '{"error": "%s failed or ran over its time limit (rc %s): see the log", "rc": %s}\n' "$2" "$3" "$3" > "$1"; }

# one step measure -> one JSON (bench/step.py prints one JSON line per run, appended to --out)
step() {  # step NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  stamp "$name"
  rm -f "$OUTDIR/$name.jsonl"
  timeout "$limit" $PY "$HERE/step.py" --preset "$PRESET" --device "$DEVICE" --only precomputed \
      --steps "$STEPS" --warmup "$WARMUP" "${FRAMES[@]}" --out "$OUTDIR/$name.jsonl" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then mv "$OUTDIR/$name.jsonl" "$OUTDIR/$name.json"; else fail_json "$OUTDIR/$name.json" "$name" $rc; fi
}

for B in $BATCHES; do
  for AMP in $AMPS; do step "step_${AMP}_b${B}" "$T_STEP" --batch-size "$B" --amp "$AMP"; done
done
if [ "$DEVICE" != cpu ]; then
  step step_compile_bf16_b128 "$T_COMPILE" --batch-size 128 --amp bf16 --compile --no-bare-bert
fi

B_LAST=${BATCHES##* }; AMP_FIRST=${AMPS%% *}
stamp "profile"
timeout "$T_STEP" $PY "$HERE/profile_step.py" --preset "$PRESET" --device "$DEVICE" --amp "$AMP_FIRST" \
    --batch-size "$B_LAST" --steps 2 "${FRAMES[@]}" --out "$OUTDIR/profile_${AMP_FIRST}_b${B_LAST}.json" \
  || fail_json "$OUTDIR/profile_${AMP_FIRST}_b${B_LAST}.json" profile $?

stamp "epoch: shuffled vs length-grouped batches"
timeout "$T_EPOCH" $PY "$HERE/epoch.py" --preset "$PRESET" --device "$DEVICE" --amp "$AMP_FIRST" \
    --batch-size "$B_LAST" --modes shuffle,grouped --scale "$EPOCH_SCALE" --work "$OUTDIR/epoch-data" \
    --out "$OUTDIR/epoch_${AMP_FIRST}_b${B_LAST}.json" \
  || fail_json "$OUTDIR/epoch_${AMP_FIRST}_b${B_LAST}.json" epoch $?
rm -rf "$OUTDIR/epoch-data"

stamp "pipeline through Ray Train"
mkdir -p "$OUTDIR/pipeline"
if env "${PIPE[@]}" PY="$PY" timeout "$T_PIPE" bash "$HERE/gpu_pipeline.sh" "$OUTDIR/pipeline"; then
  $PY - "$OUTDIR/pipeline/history.json" "$OUTDIR/pipeline.json" <<'EOF'
import json, os, sys
hist = json.load(open(sys.argv[1]))
recs = hist if isinstance(hist, list) else hist.get("history", hist.get("epochs", []))
epochs = [{k: r.get(k) for k in ("epoch", "time_train_s", "samples_per_s_per_worker", "data_wait_frac",
                                 "train_samples")} for r in recs]
steady = [e["time_train_s"] for e in epochs[1:] if e["time_train_s"]]
out = {"epochs": epochs, "first_epoch_s": epochs[0]["time_train_s"] if epochs else None,
       "steady_epoch_s": sum(steady) / len(steady) if steady else None}
if out["first_epoch_s"] and out["steady_epoch_s"]:
    out["first_over_steady"] = out["first_epoch_s"] / out["steady_epoch_s"]
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
else
  fail_json "$OUTDIR/pipeline.json" pipeline $?
fi

$PY - "$OUTDIR" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
rows = []
for p in sorted(glob.glob(os.path.join(d, "*.json"))):
    if os.path.basename(p) == "summary.json":
        continue
    with open(p) as f:
        rows.append({"file": os.path.basename(p), **json.load(f)})
with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
for r in rows:
    keys = ("samples_per_s", "step_s", "mfu", "bare_bert_samples_per_s", "step_over_bare_bert", "peak_gpu_mem_gib",
            "first_step_s", "first_epoch_s", "steady_epoch_s", "first_over_steady", "step_s", "error")
    print(r["file"], {k: r[k] for k in keys if k in r})
    for row in r.get("rows", []):  # epoch.json: one row per batching mode
        print("  ", row["mode"], {k: row[k] for k in ("padded_token_frac", "epoch_s", "bare_bert_s", "epoch_over_bare",
                                                      "samples_per_s", "mfu") if k in row})
EOF
stamp done
