#!/usr/bin/env bash
# The wheels `tools/device_run.sh` needs on a lent NVIDIA machine, fetched here into .whl/.
#
# That machine's image (Python 3.12) holds torch, triton, accelerate, httpx, prometheus-client,
# typer and click, but transformers 5.17 (this project pins 5.24) and no FastAPI stack; nothing can
# be fetched there, so the missing ones travel as wheels (`carry: [".whl", ...]` in the device
# call), with typing-extensions and regex at this project's versions (pydantic and transformers
# need newer ones than such an image may hold), and uvloop and httptools (uvicorn's fast event loop
# and HTTP parser, which setup.py installs here: without them uvicorn falls back to asyncio's loop
# and h11, and a served request pays more Python on its way in and out; whether sessions 40 and
# 43 served with them was not recorded — /health's `event_loop` and `http_parser` now say, and
# `fluid bench serve` keeps them). Keep one version of each: two stop the install.
#
#   bash tools/device_wheels.sh        # then run tools/device_run.sh through the device tool
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
# versions: the ones this project's tests run with (read from the environment, so they never drift)
NAMES=(transformers fastapi starlette uvicorn pydantic pydantic-core annotated-types
       typing-inspection opentelemetry-api xgrammar apache-tvm-ffi typing-extensions regex
       uvloop httptools)
PINS_TEXT=$("$PY" - "${NAMES[@]}" <<'PYEOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed in this environment: run `bash run_npu.sh test` first")
PYEOF
)  # a missing package stops the script here (set -e)
mapfile -t PINS <<< "$PINS_TEXT"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${PINS[@]}"
du -sh .whl
