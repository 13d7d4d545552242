#!/usr/bin/env bash
# Every GPU measure of issue 11 in one prepared run, one JSON file per measure, within a time budget (TOTAL
# seconds, default 480: the stages run most important first, each under its own limit and the budget left; a stage
# that fails or runs over is recorded as {"error": ...}, one that no longer fits as {"skipped": ...}):
#   checks.json              first, seconds: the GPU-only code paths give the CPU's answers (bench/gpu_checks.py:
#                            the loss terms' early copy, page-locked batches, the epoch loop over them)
#   step_bf16_b128.json      PSA-MF train step (paper preset, MOSI shapes, precomputed CLS_p), bf16, batch 128:
#                            samples/s, step time, MFU, peak GPU memory, and the bare-BERT limit (plain BertModel
#                            fwd + bwd + Adam at the same padded length) beside it. Also b32, and fp16 with loss
#                            scaling (step_fp16_b128.json, step_fp16_b32.json, step_bf16_b32.json)
#   pipeline.json            the whole pipeline through Ray Train (bench/gpu_pipeline.sh: MOSI x4, batch 128, 3
#                            epochs): first and steady epoch time, samples/s, data-wait fraction per epoch; and
#                            pipeline_buckets.json, the same shards trained with shape buckets (token widths to 8,
#                            frame counts to 32); raw files in pipeline/
#   epoch_bf16_b128.json     one epoch of MOSI-shaped batches from the real pipeline (bench/epoch.py), uniformly
#                            shuffled vs length-grouped (the default): padded-token share, epoch time, the bare-BERT
#                            limit summed over the same batches, MFU
#   profile_bf16_b128.json   where the step's time goes (bench/profile_step.py: phases, op families, host syncs)
#   step_compile_bf16_b128.json   the step with optim.compile (first_step_s includes compiling)
#   search_own_process.json  a 2-trial tiny search whose trials train in their own process on their GPU
#                            (workers_per_trial: 0, run.use_gpu=true): elapsed, start-up per trial, each trial's device
#   summary.json             all of the above in one list
#
#   bench/gpu.sh OUTDIR                 # on a GPU machine (default OUTDIR: $OUT, else ./gpu-bench); on one without
#                                       # Ray: bench/gpu_wheels.sh here, then carry .whl/ and
#                                       # `source bench/gpu_setup.sh && bash bench/gpu.sh "$OUT"` there
#   DEVICE=cpu bench/gpu.sh /tmp/dry    # dry run on a CPU: tiny preset, tiny sizes, amp off, same files
set -uo pipefail
OUTDIR=${1:-${OUT:-./gpu-bench}}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
TOTAL=${TOTAL:-480}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BUCKETS="buckets:data.token_pad_multiple=8,data.frame_pad_multiple=32"
if [ "$DEVICE" = cpu ]; then
  PRESET=tiny; BIG=4; SMALL=2; AMP1=off; AMP2=""; STEPS=2; WARMUP=1; FRAMES=(--audio-frames 40 --visual-frames 50)
  T_STEP=240; PIPE=(PRESET=tiny SCALE=0.1 EPOCHS=2 BATCH=8 USE_GPU=false RESUME=0 EVAL=0 VARIANTS="$BUCKETS")
  T_PIPE=420; EPOCH_SCALE=0.1; T_EPOCH=240; TOTAL=${TOTAL_CPU:-1500}; T_SEARCH=240; SEARCH_SET=()
else
  PRESET=paper; BIG=128; SMALL=32; AMP1=bf16; AMP2=fp16; STEPS=20; WARMUP=3; FRAMES=()
  T_STEP=75; T_COMPILE=150; PIPE=(PRESET=paper SCALE=4 EPOCHS=3 BATCH=128 USE_GPU=true RESUME=0 EVAL=0
                                 VARIANTS="$BUCKETS" VARIANT_EPOCHS=2)
  T_PIPE=240; EPOCH_SCALE=1; T_EPOCH=120; T_SEARCH=90; SEARCH_SET=(--set run.use_gpu=true)
fi
T0=$(date +%s)
stamp() { echo "=== $(date +%T) (+$(( $(date +%s) - T0 )) s) $*"; }
fail_json() { printf '{"error": "%s failed or ran over its time limit (rc %s): see the log", "rc": %s}\n' "$2" "$3" "$3" > "$1"; }
# limit NAME SECONDS: the stage's limit, cut to the budget left; prints 0 (and records the skip) when < 30 s are left
limit() {
  local left=$(( TOTAL - ($(date +%s) - T0) )) want=$2
  if [ "$left" -lt 30 ]; then
    printf '{"skipped": "bench/gpu.sh time budget (TOTAL=%s s) spent before this stage"}\n' "$TOTAL" > "$OUTDIR/$1.json"
    echo 0; return
  fi
  echo $(( want < left ? want : left ))
}

# one step measure -> one JSON (bench/step.py prints one JSON line per run, appended to --out)
step() {  # step NAME TIMEOUT ARGS...
  local name=$1 lim; lim=$(limit "$1" "$2"); shift 2
  [ "$lim" -gt 0 ] || return 0
  stamp "$name (limit $lim s)"
  rm -f "$OUTDIR/$name.jsonl"
  timeout "$lim" $PY "$HERE/step.py" --preset "$PRESET" --device "$DEVICE" --only precomputed \
      --steps "$STEPS" --warmup "$WARMUP" "${FRAMES[@]}" --out "$OUTDIR/$name.jsonl" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then mv "$OUTDIR/$name.jsonl" "$OUTDIR/$name.json"; else fail_json "$OUTDIR/$name.json" "$name" $rc; fi
}

pipeline() {
  local lim; lim=$(limit pipeline "$T_PIPE")
  [ "$lim" -gt 0 ] || return 0
  stamp "pipeline through Ray Train (limit $lim s)"
  mkdir -p "$OUTDIR/pipeline"
  if env "${PIPE[@]}" PY="$PY" timeout "$lim" bash "$HERE/gpu_pipeline.sh" "$OUTDIR/pipeline"; then :; else
    fail_json "$OUTDIR/pipeline.json" pipeline $?
  fi
  # per-epoch figures of every run that finished: history.json -> pipeline.json, history_<v>.json -> pipeline_<v>.json
  $PY - "$OUTDIR" <<'PYEOF'
import glob, json, os, sys
d = sys.argv[1]
for path in sorted(glob.glob(os.path.join(d, "pipeline", "history*.json"))):
    variant = os.path.basename(path)[len("history"):-len(".json")]
    recs = json.load(open(path))
    recs = recs if isinstance(recs, list) else recs.get("history", [])
    keys = ("epoch", "time_train_s", "time_eval_s", "time_setup_s", "samples_per_s_per_worker", "data_wait_frac",
            "train_samples", "train_padded_token_frac", "ended_at", "session")
    epochs = [{k: r.get(k) for k in keys} for r in recs]
    steady = [e["time_train_s"] for e in epochs[1:] if e["time_train_s"]]
    out = {"epochs": epochs, "first_epoch_s": epochs[0]["time_train_s"] if epochs else None,
           "steady_epoch_s": sum(steady) / len(steady) if steady else None}
    rates = [e["samples_per_s_per_worker"] for e in epochs[1:] if e["samples_per_s_per_worker"]]
    out["steady_samples_per_s"] = sum(rates) / len(rates) if rates else None
    if out["first_epoch_s"] and out["steady_epoch_s"]:
        out["first_over_steady"] = out["first_epoch_s"] / out["steady_epoch_s"]
    if epochs and epochs[0]["time_setup_s"] is not None:  # the worker's set-up overlaps its first pass's start-up
        out["setup_s"] = epochs[0]["time_setup_s"]
    ends = [e["ended_at"] for e in epochs if e["ended_at"] is not None and e["session"] == epochs[0]["session"]]
    # whole epochs of the first session (train, validation, checkpoint, report): end of epoch k-1 to end of epoch k
    out["periods_s"] = [b - a for a, b in zip(ends, ends[1:])]
    if len(ends) >= 3:  # after the first period, which holds the first report
        out["steady_period_s"] = (ends[-1] - ends[1]) / (len(ends) - 2)
    dst = os.path.join(d, f"pipeline{variant}.json")
    with open(dst + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(dst + ".tmp", dst)
PYEOF
}

epoch() {
  local lim; lim=$(limit "epoch_${AMP1}_b${BIG}" "$T_EPOCH")
  [ "$lim" -gt 0 ] || return 0
  stamp "epoch: shuffled vs length-grouped batches (limit $lim s)"
  timeout "$lim" $PY "$HERE/epoch.py" --preset "$PRESET" --device "$DEVICE" --amp "$AMP1" \
      --batch-size "$BIG" --modes shuffle,grouped --scale "$EPOCH_SCALE" --work "$OUTDIR/epoch-data" \
      --out "$OUTDIR/epoch_${AMP1}_b${BIG}.json" \
    || fail_json "$OUTDIR/epoch_${AMP1}_b${BIG}.json" epoch $?
  rm -rf "$OUTDIR/epoch-data"
}

search() {  # a search whose trials train in their own process (workers_per_trial: 0) on the trial's GPU
  local lim; lim=$(limit search_own_process "$T_SEARCH")
  [ "$lim" -gt 0 ] || return 0
  stamp "search, trials in their own process (limit $lim s)"
  OMP_NUM_THREADS=1 timeout "$lim" $PY "$HERE/tune.py" --trials 2 --epochs 2 --schedulers none \
      --workers-per-trial 0 "${SEARCH_SET[@]}" --out "$OUTDIR/search_own_process.json" \
    || fail_json "$OUTDIR/search_own_process.json" search $?
}

checks() {
  local lim; lim=$(limit checks 90)
  [ "$lim" -gt 0 ] || return 0
  stamp "checks of the GPU-only code paths (limit $lim s)"
  timeout "$lim" $PY "$HERE/gpu_checks.py" --device "$DEVICE" --out "$OUTDIR/checks.json" \
    || { [ -s "$OUTDIR/checks.json" ] || fail_json "$OUTDIR/checks.json" checks $?; }
}

profile() {
  local lim; lim=$(limit "profile_${AMP1}_b${BIG}" "$T_STEP")
  [ "$lim" -gt 0 ] || return 0
  stamp "profile (limit $lim s)"
  timeout "$lim" $PY "$HERE/profile_step.py" --preset "$PRESET" --device "$DEVICE" --amp "$AMP1" \
      --batch-size "$BIG" --steps 2 "${FRAMES[@]}" --out "$OUTDIR/profile_${AMP1}_b${BIG}.json" \
    || fail_json "$OUTDIR/profile_${AMP1}_b${BIG}.json" profile $?
}

# most important first: the GPU-only code paths, the 4,000 samples/s target, the Ray Train targets, the padding,
# then the rest
checks
step "step_${AMP1}_b${BIG}" "$T_STEP" --batch-size "$BIG" --amp "$AMP1"
pipeline
epoch
step "step_${AMP1}_b${SMALL}" "$T_STEP" --batch-size "$SMALL" --amp "$AMP1"
if [ -n "$AMP2" ]; then
  step "step_${AMP2}_b${BIG}" "$T_STEP" --batch-size "$BIG" --amp "$AMP2"
fi
profile
if [ "$DEVICE" != cpu ]; then
  step "step_compile_${AMP1}_b${BIG}" "$T_COMPILE" --batch-size "$BIG" --amp "$AMP1" --compile --no-bare-bert
  step "step_${AMP2}_b${SMALL}" "$T_STEP" --batch-size "$SMALL" --amp "$AMP2"
fi
search

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
    keys = ("samples_per_s", "loop_samples_per_s", "step_s", "mfu", "bare_bert_samples_per_s", "step_over_bare_bert", "peak_gpu_mem_gib",
            "first_step_s", "setup_s", "first_epoch_s", "steady_epoch_s", "first_over_steady", "steady_samples_per_s",
            "periods_s", "steady_period_s", "runs", "ok", "error",
            "skipped")
    print(r["file"], {k: r[k] for k in keys if k in r})
    for row in r.get("rows", []):  # epoch.json: one row per batching mode
        print("  ", row["mode"], {k: row[k] for k in ("padded_token_frac", "distinct_shapes", "first_pass_s", "epoch_s",
                                                      "bare_bert_s", "epoch_over_bare", "samples_per_s", "mfu")
                                   if k in row})
EOF
stamp done
