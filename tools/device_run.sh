#!/usr/bin/env bash
# The one prepared run for a session lent an NVIDIA GPU: the GPU figures [engine] and [serve] ask
# for, and the kernels' GPU tests, in one command sized for a ~10-minute limit.
#
# Before: `bash run_npu.sh` (the demo's models in runs/demo) and `bash tools/device_wheels.sh`
# (transformers 5.24 and the FastAPI stack as wheels in .whl/). Then, through the device tool:
#
#   run(command="bash tools/device_run.sh", timeout_s=590,
#       carry=[".whl", "runs/demo/stage1", "runs/demo/stage2"])
#
# Every step has its own time limit and log; a failing step does not stop the others. What comes
# back under $OUT (at most 8 files): engine_gpu_bf16.json (`fluid bench sampler`, batch 1 / 8 /
# 32, bf16, against transformers' generate and its static cache), engine_gpu_compile.json (the
# same with the decode step under torch.compile, "reduce-overhead": CUDA graphs), ops_gpu.json
# (`tools/bench_ops.py --device accelerator`: token_stats vs the naive path, and the Triton
# kernel's tile-work ratio), lean_gpu.json (`tools/bench_lean.py`: the eager forward without transformers' modules
# against with them, batch 1 / 8), serve_gpu_c16.json (`fluid bench serve`, 16 concurrent clients),
# cudagraphs_gpu.json (`tools/check_cudagraphs.py`: the compiled step recorded as CUDA graphs, no
# skip) and run.log.
#
# `DRY=1 bash tools/device_run.sh` runs the same steps on this machine's CPU with small sizes and
# no GPU-only step: it checks the commands, not the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fluid_device_out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PY:-python3}"
[[ -x .venv/bin/python && "${DRY:-0}" == 1 ]] && PY=.venv/bin/python

if compgen -G ".whl/*.whl" > /dev/null && [[ "${DRY:-0}" != 1 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed" >> "$LOG"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the checkout as the package: fluid_npu from the tree, fluid_ops from ops/ (what setup.py maps)
mkdir -p /tmp/fluid_shim && ln -sfn "$PWD/ops" /tmp/fluid_shim/fluid_ops
export PYTHONPATH="$PWD:/tmp/fluid_shim${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$LOG"
}
FLUID=("$PY" -m fluid_npu.cli)  # `fluid`, from the checkout

MODEL=runs/demo/stage1
KHEAD=runs/demo/stage2
PROMPTS=benchmarks/demo_prompts64.jsonl
if [[ "${DRY:-0}" == 1 ]]; then
  DEV=cpu DT=float32 SIZES=1 POLICIES=ar,entropy NEW=16 REQ=8 COMPILE_SIZES=1
else
  DEV=cuda DT=bfloat16 SIZES=1,8,32 POLICIES=ar,fixed:16,entropy,khead NEW=96 REQ=512 \
    COMPILE_SIZES=1,8
fi

step env 60 "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if [[ "${DRY:-0}" != 1 ]]; then
  nvidia-smi >> "$LOG" 2>&1
  step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_ops_attention_triton.py \
    tests/test_ops_vocab_triton.py tests/test_grammar.py
  step ops 90 "$PY" tools/bench_ops.py --device accelerator --skip-stage1 --json "$OUT/ops_gpu.json"
fi
step engine 150 "${FLUID[@]}" bench sampler --model "$MODEL" --khead "$KHEAD" --prompts "$PROMPTS" \
  --json "$OUT/engine_gpu_bf16.json" --max-new-tokens "$NEW" --batch-sizes "$SIZES" \
  --policies "$POLICIES" --loops fused --repeats 2 --device "$DEV" --dtype "$DT"
step lean 60 "$PY" tools/bench_lean.py --model "$MODEL" --khead "$KHEAD" --prompts "$PROMPTS" \
  --json "$OUT/lean_gpu.json" --max-new-tokens "$NEW" --batch-sizes "$COMPILE_SIZES" \
  --policies ar,entropy --repeats 2 --device "$DEV" --dtype "$DT"
if [[ "${DRY:-0}" != 1 ]]; then  # device graphs really recorded (0 skips), tokens as eager
  step cudagraphs 60 "$PY" tools/check_cudagraphs.py --model "$MODEL" --prompts "$PROMPTS" \
    --json "$OUT/cudagraphs_gpu.json" --dtype "$DT" --device "$DEV"
fi
step engine_compile 120 "${FLUID[@]}" bench sampler --model "$MODEL" --khead "$KHEAD" --prompts "$PROMPTS" \
  --json "$OUT/engine_gpu_compile.json" --max-new-tokens "$NEW" --batch-sizes "$COMPILE_SIZES" \
  --policies ar,entropy --loops fused --repeats 2 --device "$DEV" --dtype "$DT" --compile
step serve 120 "${FLUID[@]}" bench serve --model "$MODEL" --khead "$KHEAD" --policies entropy:2,fixed:4,ar \
  --prompts "$PROMPTS" --json "$OUT/serve_gpu_c16.json" --num-requests "$REQ" --concurrency 16 \
  --max-batch 16 --max-tokens 128 --warmup 16 --rounds 4 --device "$DEV" --dtype "$DT"
grep -h "speedup_by_batch\|best_lossless_tpf\|bench serve:" "$LOG" | tail -20
