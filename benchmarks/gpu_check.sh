#!/usr/bin/env bash
# The GPU checks behind README's "Checked on a GPU": run on a machine with one CUDA GPU and the
# platform installed (bash infra/setup.sh), from the repository root:
#
#     bash benchmarks/gpu_check.sh [WORK_DIR]        # default WORK_DIR: a new temporary folder
#
# 1. jobs/train.py in bf16 for tiny (ZeRO-2) and celebahq256/512/1024 at their per-GPU batch on one GPU,
#    synthetic shards drawn on the fly: images/s, seconds per step, data wait and peak memory; celebahq256
#    again with dist.compile=inductor.
# 2. Resume on the GPU: tiny with ZeRO-3 G / ZeRO-2 D stopped at step 32 and resumed to 64 must log the
#    same losses and save the same weights checksums as an uninterrupted 64-step run (exit status 1 if not).
# 3. Periodic FID/KID and sample grids during training, then jobs/sample.py and jobs/evaluate.py --json,
#    with the test suite's small feature extractor injected (no Inception download).
# 4. benchmarks/gpu_memory.py for celebahq256 (batch 32) and celebahq1024 (batch 4): plan.py vs measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
W=${1:-$(mktemp -d)}
export PYTHONPATH="$PWD/platform:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
common="tracking.enabled=false dist.precision=bf16"
quiet() { grep -v "UserWarning\|warnings.warn\|_warn_once\|return func\|^\s*$" | tail -"${1:-8}"; }
summary() {  # the last logged interval of a run's metrics.jsonl
    "$PY" - "$1" <<'EOF'
import json, sys
row = [json.loads(line) for line in open(sys.argv[1])][-1]
keys = ("step", "images_per_s", "s_per_step", "s_per_step_data_wait", "peak_memory_gb_max_rank")
print("   ", {k: round(row[k], 4) for k in keys if k in row})
EOF
}
train() {  # name, args...
    local name=$1
    shift
    echo "=== train $name: $*"
    timeout 600 "$PY" jobs/train.py run.dir="$W/runs/$name" $common "$@" 2>&1 | quiet 6
}

echo "work folder: $W"
train tiny recipe=tiny data.url="$W/data/tiny" data.synthetic_samples=512 train.max_steps=64 \
    train.log_every_images=256 dist.zero_stage_g=2 dist.zero_stage_d=2 eval.every_images=0 checkpoint.every_images=0
summary "$W/runs/tiny/metrics.jsonl"
for spec in "celebahq256 32 384" "celebahq512 4 96" "celebahq1024 4 48"; do
    read -r recipe batch samples <<<"$spec"
    train "$recipe" recipe="$recipe" gpus_per_node=1 train.batch_size="$batch" data.url="$W/data/$recipe" \
        data.synthetic_if_missing=true data.synthetic_samples="$samples" data.num_workers=6 train.max_steps=24 \
        train.log_every_images=$((batch * 12)) eval.every_images=0 checkpoint.every_images=0
    summary "$W/runs/$recipe/metrics.jsonl"
done
# The same celebahq256 run with dist.compile=inductor: its last interval (after the compile) vs the eager one.
train celebahq256-compiled recipe=celebahq256 gpus_per_node=1 train.batch_size=32 data.url="$W/data/celebahq256" \
    data.num_workers=6 train.max_steps=48 train.log_every_images=384 eval.every_images=0 checkpoint.every_images=0 \
    dist.compile=inductor
summary "$W/runs/celebahq256-compiled/metrics.jsonl"

resume="recipe=tiny data.url=$W/data/tiny train.log_every_images=256 dist.zero_stage_g=3 dist.zero_stage_d=2"
resume="$resume checkpoint.every_images=512 eval.every_images=0"
train straight $resume train.max_steps=64
train resumed $resume train.max_steps=32
train resumed $resume train.max_steps=64
"$PY" - "$W/runs" <<'EOF' || status=1
import json, sys, torch
root = sys.argv[1]
def losses(name):
    return [(r["step"], r["d_loss"], r["g_loss"]) for r in map(json.loads, open(f"{root}/{name}/metrics.jsonl"))]
def sums(name):
    return [torch.load(f"{root}/{name}/checkpoints/step-{s:09d}/state.pt", weights_only=False)["weights_checksum"]
            for s in (32, 64)]
same = losses("straight") == losses("resumed") and sums("straight") == sums("resumed")
print(f"=== resume on the GPU: losses and checksums {'identical' if same else 'DIFFER'}: {sums('resumed')}")
sys.exit(0 if same else 1)
EOF

FX="eval.feature_extractor=feature_extractors:random_conv32"
train ev recipe=tiny data.url="$W/data/tiny" train.max_steps=32 train.log_every_images=256 eval.every_images=256 \
    eval.num_samples=128 eval.grid_size=16 "$FX" checkpoint.every_images=512
ls "$W/runs/ev/samples"
echo "=== sample"
timeout 300 "$PY" jobs/sample.py run="$W/runs/ev" num=32 out="$W/samples" 2>&1 | quiet 3
echo "=== evaluate"
timeout 300 "$PY" jobs/evaluate.py recipe=tiny checkpoint="$W/runs/ev" data.url="$W/data/tiny" \
    eval.num_samples=128 "$FX" --json 2>&1 | quiet 1

for spec in "celebahq256 32" "celebahq1024 4"; do
    read -r recipe batch <<<"$spec"
    timeout 600 "$PY" benchmarks/gpu_memory.py recipe="$recipe" batch="$batch" 2>&1 | quiet 8
done
exit "${status:-0}"
