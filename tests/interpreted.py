"""Run a test's Triton code under ``TRITON_INTERPRET=1`` in a child process.

Triton reads the variable when it is imported, so the interpreter needs a process of its own (and
the flag never leaks into other test modules). The step kernels' tests (``test_ops_step_mask``,
``_anchors``, ``_logit_stats``, ``_step_inputs``) hand their checks here as source text.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(code: str) -> str:
    """Run ``code`` with Triton's interpreter; its standard output (it must exit 0, or the test
    fails with the child's traceback)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
