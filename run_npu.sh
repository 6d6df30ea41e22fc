#!/usr/bin/env bash
# fluid-npu launcher.
#
#   bash run_npu.sh [--fresh ...]           set up what is missing, then run the embedded CPU demo
#   bash run_npu.sh test [pytest args]      set up what is missing, then run the whole test suite
#   bash run_npu.sh train CONFIG [k=v ...]  torchrun `fluid train` over the visible devices
#   bash run_npu.sh <fluid subcommand> ...  any other `fluid` command (generate, bench, merge, ...)
#
# Environment set-up: an existing .venv is used as it is. Otherwise, when the system Python already
# has torch (an Ascend host with its matched torch/torch_npu pair, or a CUDA host), a .venv is made
# with --system-site-packages so that pair is kept and never reinstalled; on a bare machine a plain
# .venv gets torch==2.13.0 (the build pip's configured index serves for this platform: a CPU wheel
# here). Then `pip install -e .[dev]` (and triton, except on Ascend
# where triton-ascend provides it). On Ascend the CANN set_env.sh is sourced when present.
#
# FLUID_PYTHON=/path/to/python uses that interpreter as it is (a managed cluster image, CI): no
# .venv is made and nothing is installed.
#
# Distributed launch (train): torchrun with NPROC processes per node (default: the devices listed
# in ASCEND_RT_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, else every visible NPU/GPU, else 1 CPU
# process; NPROC=2 on a CPU host runs two gloo processes), NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1; required when NNODES > 1), MASTER_PORT (NNODES > 1: 29500; one node: a free port
# when unset, so several single-node jobs share a host). Each process binds the
# device of its LOCAL_RANK and joins hccl (NPU) / nccl (CUDA) / gloo (CPU) through the Trainer.
# HCCL defaults, exported when unset: HCCL_CONNECT_TIMEOUT=1200 s (how long a rank waits for the
# others while HCCL sets up a communicator's links, at its first collective; CANN's default is
# 120 s, allowed 120-7200). The first collective is the output_dir claim (train/output_dir.py),
# before any model loads: ranks reach it after their imports and, on a resume, after each one has
# validated the checkpoints, which on a busy node or shared storage can leave them minutes apart;
# the margin costs nothing when they arrive together. HCCL_EXEC_TIMEOUT=1800 s (how long ranks
# wait for each other inside a collective once linked: rank 0 tokenizing and ranks loading the
# model at different speeds before the data broadcast, rank 0 writing a checkpoint; CANN's default
# was 1800 s up to 6.3 and is 1836 s from 7.0, so the bound is the same on every release; CANN
# clamps it to 1091 s in its AIV expansion mode).
# FLUID_DRY_RUN=1 prints the torchrun command and the HCCL settings instead of running them.
set -eo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

log() { printf '[run_npu] %s\n' "$*" >&2; }

# --- Ascend CANN environment ------------------------------------------------------------------
for cann in "${ASCEND_HOME_PATH:-}/set_env.sh" /usr/local/Ascend/cann/set_env.sh \
  /usr/local/Ascend/ascend-toolkit/set_env.sh; do
  if [ -f "$cann" ]; then
    # shellcheck disable=SC1090
    source "$cann" && log "sourced $cann"
    break
  fi
done

# --- Python environment -----------------------------------------------------------------------
setup_env() {
SYS_PY="$(command -v python3 || command -v python || true)"
[ -n "$SYS_PY" ] || { log "error: no python3 on PATH; install Python >= 3.10"; exit 1; }
if [ ! -x .venv/bin/python ]; then
  if "$SYS_PY" -c "import torch" >/dev/null 2>&1; then
    log "system Python has torch: creating .venv with --system-site-packages (torch is kept)"
    "$SYS_PY" -m venv --system-site-packages .venv
  else
    log "creating .venv"
    "$SYS_PY" -m venv .venv
  fi
fi
PY="$ROOT/.venv/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "installing torch==2.13.0 (the build pip's configured index serves for this platform)"
  pip_install "torch==2.13.0"
fi
ASCEND=0
if "$PY" -c "import torch_npu" >/dev/null 2>&1; then ASCEND=1; fi

stamp=".venv/.fluid-installed"
want="$(cat setup.py pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import fluid_npu, fluid_ops" >/dev/null 2>&1; then
  log "installing fluid-npu (pip install -e .[dev])"
  pip_install -e ".[dev]"
  if [ "$ASCEND" = 0 ] && ! "$PY" -c "import triton" >/dev/null 2>&1; then
    pip_install "triton>=3.0" || log "triton could not be installed: Triton kernels stay unavailable"
  fi
  echo "$want" >"$stamp"
fi
}

if [ -n "${FLUID_PYTHON:-}" ]; then
  PY="$FLUID_PYTHON"
  [ -x "$PY" ] || { log "error: FLUID_PYTHON=$PY is not an executable"; exit 2; }
else
  setup_env
fi

# --- Commands -----------------------------------------------------------------------------------
visible_devices() {
  if [ -n "${NPROC:-}" ]; then echo "$NPROC"; return; fi
  for var in ASCEND_RT_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES; do
    if [ -n "${!var:-}" ]; then echo "${!var}" | tr ',' '\n' | grep -c . || true; return; fi
  done
  "$PY" -c "from fluid_npu.device import visible_device_count as n; print(max(1, n()))"
}

need_int() {  # need_int NAME VALUE MIN [MAX]: a clear error for a malformed launcher variable
  local name="$1" value="$2" min="$3" max="${4:-}"
  if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$value" -lt "$min" ] || { [ -n "$max" ] && [ "$value" -gt "$max" ]; }; then
    log "error: $name=$value must be an integer in [$min, ${max:-inf}]"
    exit 2
  fi
}

cmd="${1:-demo}"
if [[ "$cmd" == -* ]]; then  # bash run_npu.sh --fresh ...: flags of the demo
  cmd=demo
else
  [ $# -gt 0 ] && shift
fi
case "$cmd" in
  demo)
    exec "$PY" -m fluid_npu.cli demo "$@"
    ;;
  test)
    # pytest-xdist (in the dev extra): one worker per core up to 4, each test file kept on one
    # worker in its own order (--dist loadfile), files handed out in collection order (conftest
    # puts the longest first; xdist would otherwise start with the files of most tests). Arguments
    # that choose for themselves (-n / --numprocesses, --pdb, --trace, -p no:xdist) get no workers
    workers=()
    own=0
    for arg in "$@"; do
      case "$arg" in
        -n | -n[0-9]* | -nauto | -nlogical | --numprocesses | --numprocesses=* | --pdb | --trace | \
          no:xdist | -pno:xdist) own=1 ;;
      esac
    done
    if [ "$own" = 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
      cores="$(nproc 2>/dev/null || echo 1)"
      [ "$cores" -gt 4 ] && cores=4
      [ "$cores" -ge 2 ] && workers=(-n "$cores" --dist loadfile --no-loadscope-reorder)
    fi
    set +e
    "$PY" -m pytest tests "${workers[@]}" "$@"
    rc=$?
    [ "$rc" = 5 ] && { log "error: pytest collected no tests"; exit 1; }
    exit "$rc"
    ;;
  train)
    [ $# -ge 1 ] || { log "usage: bash run_npu.sh train CONFIG [key=value ...]"; exit 2; }
    export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
    export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
    need_int HCCL_CONNECT_TIMEOUT "$HCCL_CONNECT_TIMEOUT" 120 7200
    need_int HCCL_EXEC_TIMEOUT "$HCCL_EXEC_TIMEOUT" 0
    nproc="$(visible_devices)"
    nnodes="${NNODES:-1}"
    node_rank="${NODE_RANK:-0}"
    need_int "processes per node (NPROC or the visible devices)" "$nproc" 1
    need_int NNODES "$nnodes" 1
    need_int NODE_RANK "$node_rank" 0 "$((nnodes - 1))"
    need_int MASTER_PORT "${MASTER_PORT:-29500}" 1 65535
    if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
      log "error: NNODES=$nnodes needs MASTER_ADDR (the address of node 0) on every node"
      exit 2
    fi
    port="${MASTER_PORT:-29500}"
    if [ "$nnodes" = 1 ] && [ -z "${MASTER_PORT:-}" ]; then
      # a free port, so two jobs on one node's devices do not collide (torchrun --standalone would
      # pick one too, but hands the workers the host's FQDN as MASTER_ADDR, which not every host
      # resolves; this keeps 127.0.0.1)
      port="$("$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
    fi
    launch=("$PY" -m torch.distributed.run
      --nproc_per_node="$nproc" --nnodes="$nnodes" --node_rank="$node_rank"
      --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$port"
      -m fluid_npu.cli train "$@")
    log "torchrun: $nproc process(es) per node, $nnodes node(s), node rank $node_rank;" \
      "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT=$HCCL_EXEC_TIMEOUT"
    if [ "${FLUID_DRY_RUN:-0}" = 1 ]; then
      printf '%q ' "${launch[@]}"
      printf '\n'
      exit 0
    fi
    exec "${launch[@]}"
    ;;
  *)
    exec "$PY" -m fluid_npu.cli "$cmd" "$@"
    ;;
esac
