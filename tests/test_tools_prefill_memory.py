"""``tools/bench_prefill_memory.py``, the README's prefill-memory figure: it still drives the engine
it measures (the engine's prefill calls changed under it once and it failed with a TypeError), and
the engine's anchor hidden state equals the dense path's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_prefill_memory_benchmark_runs_and_both_paths_agree(tmp_path):
    out = tmp_path / "prefill_memory.json"
    small = ["--tokens", "96", "--chunk", "32", "--hidden", "32", "--layers", "1", "--heads", "2"]
    tool = ROOT / "tools" / "bench_prefill_memory.py"
    done = subprocess.run([sys.executable, str(tool), *small, "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["max_abs_diff_anchor_hidden"] == 0.0
    assert report["engine_peak_mem_ratio"] > 0
    assert report["engine"]["peak_mem_bytes"] >= 0 and report["dense"]["peak_mem_bytes"] > 0
