#!/usr/bin/env bash
# The wheels `tools/device_run.sh` needs on a lent NVIDIA machine, fetched here into .whl/.
#
# That machine's image (Python 3.12) holds torch, triton, accelerate, httpx, prometheus-client,
# typer and click, but transformers 5.17 (this project pins 5.24) and no FastAPI stack; nothing can
# be fetched there, so the missing ones travel as wheels (`carry: [".whl", ...]` in the device
# call). Keep one version of each: two stop the install there.
#
#   bash tools/device_wheels.sh        # then run tools/device_run.sh through the device tool
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
rm -rf .whl && mkdir -p .whl
# versions: the ones this project's tests run with (pip show in .venv)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    opentelemetry-api==1.45.2 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
du -sh .whl
