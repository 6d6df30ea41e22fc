"""The decode step's Triton kernels compile for a GPU on a machine without one.

``TRITON_INTERPRET=1`` (the other ``test_ops_*`` modules) checks what the kernels compute, but
runs them as Python: it accepts code the compiler refuses (a loop-carried value that changes type,
an op without a lowering). Here each kernel that CUDA picks by default in the engine's step — its
inputs, its mask, its verify, the block the verify hit, the next blocks' lengths, the drafts'
statistics, the draft budget's gate — is compiled ahead of time, through Triton's own front end, its
LLVM lowering and the ``ptxas`` its wheel ships, for an H100 / H200 (sm_90) and an A100 (sm_80), in
a child process with its own kernel cache, in every dtype the engine launches it with. That the
compiled kernel also computes the right thing on a real device is the ``-m gpu`` tests' part.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fluid_ops import (
        anchors_triton, gate_triton, hits_triton, logit_stats_triton, step_inputs_triton,
        step_mask_triton, verify_triton,
    )
    from fluid_ops.meta import MAIN, PAD

    launches = [
        (anchors_triton._anchors_kernel,
         {"logp_ptr": "*fp32", "m_ptr": "*i64", "out_ptr": "*i64", "M": "i32", "count": "i32",
          "coverage": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 32}),
        (step_mask_triton._step_mask_kernel,
         {"length_ptr": "*i64", "pos_ptr": "*i64", "anchor_ptr": "*i64", "out_ptr": "*u8",
          "W": "i32", "extent": "i32", "MAIN_": "constexpr", "PAD_": "constexpr",
          "BLOCK_": "constexpr"},
         {"MAIN_": MAIN, "PAD_": PAD, "BLOCK_": step_mask_triton.BLOCK}),
        (step_inputs_triton._step_inputs_kernel,
         {"last_ptr": "*i64", "drafts_ptr": "*i64", "base_ptr": "*i64", "m_ptr": "*i64",
          "run_ptr": "*u8", "cand_ptr": "*i64", "ids_ptr": "*i64", "pos_ptr": "*i64",
          "anchor_ptr": "*i64", "m_out_ptr": "*i64", "cand_out_ptr": "*i64", "big_m": "i32",
          "n_blocks": "i32", "k": "i32", "w": "i32", "mask_id": "i32", "d_stride": "i32",
          "c_stride": "i32",
          "MAIN_": "constexpr", "PAD_": "constexpr", "BLOCK_W": "constexpr",
          "BLOCK_C": "constexpr"},
         {"MAIN_": MAIN, "PAD_": PAD, "BLOCK_W": 64, "BLOCK_C": 2}),
        (gate_triton._gate_kernel,
         {"cand_ptr": "*i64", "ema_ptr": "*fp32", "run_ptr": "*u8", "done_ptr": "*u8",
          "temp_ptr": "*fp32", "out_ptr": "*i64", "rows": "i32", "n": "i32", "c_stride": "i32",
          "price": "fp32", "probe": "i32", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"},
         {"BLOCK_B": 64, "BLOCK_C": 2}),
    ] + [  # both variants of each optional input (the placeholder passed in its place: *i64)
        (verify_triton._verify_kernel,
         {"drafts_ptr": "*i64", "ar_ptr": "*i64", "m_ptr": "*i64", "nothing_ptr": flags,
          "a_ptr": "*i64", "corr_ptr": "*i64", "toks_ptr": "*i64", "big_m": "i32",
          "d_stride": "i32", "r_stride": "i32", "n_stride": "i32", "HAS_NOTHING": "constexpr",
          "TOKENS": "constexpr", "BLOCK": "constexpr"},
         {"HAS_NOTHING": given, "TOKENS": given, "BLOCK": 32})
        for flags, given in (("*u8", True), ("*i64", False))
    ] + [
        (hits_triton._hits_kernel,
         {"cand_ptr": "*i64", "a_ptr": "*i64", "run_ptr": "*u8", "cut_ptr": flags,
          "blk_ptr": "*i64", "has_ptr": "*u8", "hit_ptr": "*i64", "n": "i32", "c_stride": "i32",
          "HAS_CUT": "constexpr", "BLOCK": "constexpr"}, {"HAS_CUT": given, "BLOCK": block})
        for flags, given, block in (("*u8", True, 2), ("*i64", False, 1))
    ] + [
        (logit_stats_triton._logit_stats_kernel,
         {"logits_ptr": f"*{dt}", "arg_ptr": "*i64", "lp_ptr": "*fp32", "ent_ptr": "*fp32",
          "V": "i32", "BLOCK": "constexpr"}, {"BLOCK": logit_stats_triton.MAX_BLOCK})
        for dt in ("fp32", "bf16", "fp16")
    ]
    for arch in (90, 80):
        for fn, signature, constexprs in launches:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert len(kernel.asm["cubin"]) > 1000, (fn, arch)
    print("ok", len(launches))
    """
)


def test_the_step_kernels_compile_for_cuda_without_a_gpu(tmp_path):
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:  # (triton-ascend: no CUDA back end to compile with)
        pytest.skip(f"triton {triton.__version__} has no CUDA back end to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("ok 11"), proc.stderr[-3000:]
