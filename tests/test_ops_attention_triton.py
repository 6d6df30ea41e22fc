"""Tests of the ``triton`` attention back end (``fluid_ops.attention_triton`` and its tiles).

On CPU the kernels run under the Triton interpreter, so shapes stay tiny. Every case is compared
with a float64 softmax over ``visibility(meta)`` (values and the gradients of q, k and v): fp32
(tight) and bf16 (loose), GQA and MHA, ragged Stage I batches, cached inference (keys = a
left-padded cache + the new tokens) and rows that see nothing. Triton reads ``TRITON_INTERPRET``
once, when it is first imported; the shared conftest imports torch (and so triton) before this
module, so ``TestInterpretedKernels`` then runs in a child pytest started with
``TRITON_INTERPRET=1`` (``test_interpreted_kernels``), and in this process when the variable was
set from the start. The tile selection is checked never to skip a tile holding a visible pair and
to reach the compute-ratio goal on the default Stage I layout. Tests marked ``gpu`` run the
compiled kernels on CUDA: ``pytest -m gpu tests/test_ops_attention_triton.py`` on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

from fluid_ops.attention import fluid_attention
from fluid_ops.attention_tiles import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    _tile_pairs,
    active_tiles,
    plan_visits,
    tile_stats,
)
from fluid_ops.attention_triton import triton_attention
from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility

REPO = Path(__file__).resolve().parents[1]
# The interpreter works only if triton itself was imported under TRITON_INTERPRET=1: setting it
# here would be too late (the conftest imports torch, which imports triton) and would leak into
# the other test modules, so the interpreted tests otherwise run in a child process.
INTERPRETER_IN_PROCESS = type(tl.zeros).__name__ == "InterpretedFunction"
N_INTERPRETED = 14  # test cases in TestInterpretedKernels

# --------------------------------------------------------------------------------------------
# Metadata builders and the reference.
# --------------------------------------------------------------------------------------------


def stage1_meta(
    main_lens: list[int],
    k_max: int = 4,
    anchor_prob: float = 0.5,
    prompt_len: int = 0,
    seed: int = 0,
) -> AttnMeta:
    """Batched Stage I layout: main streams right-padded to the longest, then each row's slot
    groups in anchor order (slot j of anchor c at position c+j), right-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    n_main = max(main_lens)
    rows = []
    for n in main_lens:
        pos = list(range(n)) + [0] * (n_main - n)
        anc = [MAIN] * n + [PAD] * (n_main - n)
        for c in range(min(prompt_len, n), n - 1):
            if float(torch.rand((), generator=g)) < anchor_prob:
                k = int(torch.randint(1, k_max + 1, (), generator=g))
                pos += [c + j for j in range(1, k + 1)]
                anc += [c] * k
        rows.append((pos, anc))
    width = max(len(p) for p, _ in rows)
    pos = torch.tensor([p + [0] * (width - len(p)) for p, _ in rows])
    anc = torch.tensor([a + [PAD] * (width - len(a)) for _, a in rows])
    return AttnMeta.self_attention(pos, anc, n_main=n_main)


def cached_meta(cache_lens: list[int], pending: int, block: int, accept: list[int]) -> AttnMeta:
    """Cached inference: keys = left-padded cache of main tokens + the new tokens; queries = the
    new tokens: ``pending`` main tokens after the cache, then ``block`` slots anchored on the
    ``accept``-th pending token of each row."""
    lc = max(cache_lens)
    kp, ka, qp, qa = [], [], [], []
    for c, a in zip(cache_lens, accept):
        new_p = [c + i for i in range(pending)] + [c + a + j for j in range(1, block + 1)]
        new_a = [MAIN] * pending + [c + a] * block
        kp.append([0] * (lc - c) + list(range(c)) + new_p)
        ka.append([PAD] * (lc - c) + [MAIN] * c + new_a)
        qp.append(new_p)
        qa.append(new_a)
    t = torch.tensor
    return AttnMeta(t(qp), t(qa), t(kp), t(ka))


def reference(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:
    """float64 masked softmax attention; rows without a visible key give 0."""
    vis = visibility(meta)[:, None].to(q.device)
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, 1)
    v = v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0)) * vis
    denom = e.sum(-1, keepdim=True)
    return (e / torch.where(denom > 0, denom, 1.0)) @ v


def run_both(meta, hq, hkv, d, dtype, device="cpu", seed=0, **tiles):
    """Output and q/k/v gradients of the kernel and of the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    b, lq, lk = meta.batch, meta.q_pos.shape[1], meta.k_pos.shape[1]
    q = torch.randn(b, hq, lq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(b, hq, lq, d, generator=g).to(device, dtype)
    scale = d**-0.5
    out = triton_attention(q, k, v, meta, scale, **tiles)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, meta, scale)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    return (out, *grads), (ref, *ref_grads)


def assert_close(got, want, dtype):
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), **tol, msg=name)


# --------------------------------------------------------------------------------------------
# Interpreted kernels on CPU.
# --------------------------------------------------------------------------------------------

TILES = {"block_m": 32, "block_n": 16}  # several tiles per row at these lengths


class TestInterpretedKernels:
    """The kernels under the Triton interpreter (in this process when triton was imported with
    TRITON_INTERPRET=1, else in a child process: see ``test_interpreted_kernels``)."""

    @pytest.mark.parametrize(
        ("hq", "hkv", "dtype"),
        [
            (2, 1, torch.float32),
            (2, 2, torch.float32),
            (4, 1, torch.bfloat16),
            (2, 2, torch.bfloat16),
        ],
    )
    def test_stage1_ragged_batch_matches_reference(self, hq, hkv, dtype):
        meta = stage1_meta([24, 17], k_max=4, seed=1)  # padding after the short main stream
        assert 40 <= meta.q_pos.shape[1] <= 96
        got, want = run_both(meta, hq, hkv, 16, dtype, **TILES)
        assert_close(got, want, dtype)

    def test_smallest_tiles_with_prompt(self):
        meta = stage1_meta([30, 21], k_max=5, prompt_len=6, seed=2)
        got, want = run_both(meta, 2, 1, 16, torch.float32, block_m=16, block_n=16)
        assert_close(got, want, torch.float32)

    def test_default_tiles_and_odd_head_dim(self):
        meta = stage1_meta([40, 33], k_max=3, seed=3)  # longer than one default tile
        got, want = run_both(meta, 2, 1, 24, torch.float32)  # head dim 24: masked to 32 lanes
        assert_close(got, want, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_cached_inference_matches_reference(self, dtype):
        meta = cached_meta(cache_lens=[20, 9], pending=3, block=5, accept=[1, 2])
        assert meta.k_pos.shape[1] > meta.q_pos.shape[1]
        got, want = run_both(meta, 4, 2, 16, dtype, **TILES)
        assert_close(got, want, dtype)

    def test_rows_without_visible_keys_give_zero_and_finite_grads(self):
        meta = stage1_meta([20, 20], k_max=3, seed=4)
        meta.q_anchor[1] = PAD  # second row: every query is padding
        meta.k_anchor[0, :] = PAD  # first row: every key is padding
        got, want = run_both(meta, 2, 2, 16, torch.float32, **TILES)
        assert_close(got, want, torch.float32)
        out, dq, dk, dv = got
        assert out.abs().max() == 0 and dq.abs().max() == 0
        assert dk.abs().max() == 0 and dv.abs().max() == 0

    def test_plan_cache_follows_in_place_metadata_changes(self):
        meta = stage1_meta([20, 14], k_max=3, seed=11)
        run_both(meta, 2, 1, 16, torch.float32, **TILES)  # caches the plan on ``meta``
        meta.q_anchor[0, 5:9] = PAD  # in place: the cached plan must not be reused
        meta.k_anchor[1, :3] = PAD
        got, want = run_both(meta, 2, 1, 16, torch.float32, **TILES)
        assert_close(got, want, torch.float32)
        assert got[0][0, :, 5:9].abs().max() == 0

    def test_non_contiguous_inputs(self):
        meta = stage1_meta([18, 12], k_max=3, seed=5)
        b, length, d = 2, meta.q_pos.shape[1], 16
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, length, 4, d, generator=g).transpose(1, 2)  # BSND storage, BNSD view
        kv = torch.randn(b, length, 2, 2 * d, generator=g).transpose(1, 2)
        k, v = kv[..., :d], kv[..., d:]
        out = triton_attention(q, k, v, meta, 0.25, **TILES)
        want = reference(q, k, v, meta, 0.25)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)

    def test_custom_op_registration_opcheck(self):
        meta = stage1_meta([10], k_max=2, seed=6)
        length = meta.q_pos.shape[1]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, length, 16, generator=g, requires_grad=True)
        k = torch.randn(1, 1, length, 16, generator=g, requires_grad=True)
        v = torch.randn(1, 1, length, 16, generator=g, requires_grad=True)
        plan = plan_visits(meta, 16, 16, q.device)  # int32 metadata and both visit lists
        torch.library.opcheck(
            torch.ops.fluid_ops.triton_attn_fwd.default,
            (q, k, v, *plan, 0.25, 16, 16),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )

    def test_through_fluid_attention_op_and_inference_mode(self):
        """The custom op's backward (the kernels' own, after a recomputed forward) equals the
        kernels under autograd; inference-mode metadata (no version counter) plans and runs."""
        meta = stage1_meta([14, 9], k_max=3, seed=8)
        length = meta.q_pos.shape[1]
        g = torch.Generator().manual_seed(0)
        leaves = [torch.randn(2, h, length, 16, generator=g).requires_grad_() for h in (2, 1, 1)]
        grad = torch.randn(2, 2, length, 16, generator=g)
        args = (*leaves, meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor, meta.n_main, 0.25)
        out = torch.ops.fluid_ops.fluid_attention(*args, "triton")
        want = triton_attention(*leaves, meta, 0.25)
        for a, e in zip(
            torch.autograd.grad(out, leaves, grad), torch.autograd.grad(want, leaves, grad)
        ):
            torch.testing.assert_close(a, e, atol=0, rtol=0)
        with torch.inference_mode():
            pos, anchor = meta.q_pos.clone(), meta.q_anchor.clone()  # inference tensors
            fresh = AttnMeta.self_attention(pos, anchor, n_main=meta.n_main)
            got = fluid_attention(*(t.detach() for t in leaves), fresh, 0.25, backend="triton")
        torch.testing.assert_close(got, want.detach(), atol=0, rtol=0)

    def test_torch_compile_fullgraph_matches_eager(self):
        meta = stage1_meta([12, 9], k_max=3, seed=7)
        length = meta.q_pos.shape[1]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 2, length, 16, generator=g, requires_grad=True)
        k = torch.randn(2, 1, length, 16, generator=g, requires_grad=True)
        v = torch.randn(2, 1, length, 16, generator=g, requires_grad=True)

        def loss(q, k, v, qp, qa, kp, ka):
            out = triton_attention(q, k, v, AttnMeta(qp, qa, kp, ka), 0.25, **TILES)
            return out.square().sum()

        args = (q, k, v, meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor)
        eager = torch.autograd.grad(loss(*args), (q, k, v))
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(*args), (q, k, v))
        for a, e in zip(got, eager):
            torch.testing.assert_close(a, e)


if not INTERPRETER_IN_PROCESS:
    # triton was imported before this module could set TRITON_INTERPRET (the shared conftest
    # imports torch, which imports triton), and triton reads it once: run the class in a child.
    del TestInterpretedKernels

    @pytest.mark.slow  # ~35 s on 2 cores: the interpreter runs every tile in Python
    def test_interpreted_kernels():
        """``TestInterpretedKernels`` in a child pytest with TRITON_INTERPRET=1 from the start."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
        cmd += ["--noconftest", "-k", "TestInterpretedKernels", "-W", "ignore::UserWarning"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        summary = proc.stdout.strip().splitlines()[-1]
        assert f"{N_INTERPRETED} passed" in summary and "skipped" not in summary, summary

    def test_cpu_tensors_without_interpreter_raise_clearly():
        meta = stage1_meta([8], k_max=2)
        q = torch.randn(1, 2, meta.q_pos.shape[1], 16)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_attention(q, q, q, meta, 1.0)


def test_plan_is_cached_per_meta_and_tile_shape():
    meta = stage1_meta([30, 20], k_max=3, seed=12)
    cpu = torch.device("cpu")
    first = plan_visits(meta, 32, 16, cpu)
    assert plan_visits(meta, 32, 16, cpu) is first  # every layer of a step reuses it
    assert plan_visits(meta, 16, 16, cpu) is not first
    meta.k_pos = meta.k_pos.clone()  # a replaced tensor invalidates the entry
    assert plan_visits(meta, 32, 16, cpu) is not first


def test_invalid_inputs_raise():
    meta = stage1_meta([8], k_max=2)
    length = meta.q_pos.shape[1]
    q = torch.randn(1, 3, length, 16)
    kv = torch.randn(1, 2, length, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_attention(q, kv, kv, meta, 1.0)
    with pytest.raises(ValueError, match="AttnMeta"):
        triton_attention(q[:, :2, :-1], kv, kv, meta, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        triton_attention(q[:, :2], kv, kv, meta, 1.0, block_m=24)


# --------------------------------------------------------------------------------------------
# Tile selection.
# --------------------------------------------------------------------------------------------


def tile_visibility(meta: AttnMeta, bm: int, bn: int) -> torch.Tensor:
    """The dense mask cut into tiles: bool ``[B, n_q_tiles, bm, n_k_tiles, bn]`` (False outside)."""
    vis = visibility(meta)
    b, lq, lk = vis.shape
    nq, nk = -(-lq // bm), -(-lk // bn)
    padded = torch.zeros(b, nq * bm, nk * bn, dtype=torch.bool)
    padded[:, :lq, :lk] = vis
    return padded.view(b, nq, bm, nk, bn)


def needed_tiles(meta: AttnMeta, bm: int, bn: int) -> torch.Tensor:
    """Tiles that hold at least one visible pair."""
    return tile_visibility(meta, bm, bn).any(4).any(2)


@pytest.mark.parametrize(("bm", "bn"), [(16, 16), (32, 16), (16, 32), (64, 32), (64, 64)])
def test_tile_selection_never_skips_a_visible_pair(bm, bn):
    metas = [
        stage1_meta([70, 45, 61], k_max=8, seed=8),
        stage1_meta([50, 50], k_max=16, anchor_prob=0.9, prompt_len=10, seed=9),
        cached_meta(cache_lens=[40, 7, 0], pending=4, block=9, accept=[0, 3, 2]),
    ]
    for meta in metas:
        active, full = _tile_pairs(meta, bm, bn)
        assert torch.equal(active, active_tiles(meta, bm, bn))
        assert not (needed_tiles(meta, bm, bn) & ~active).any()
        # tiles run without the mask really are all visible
        assert not (full & ~tile_visibility(meta, bm, bn).all(4).all(2)).any()
        stats = tile_stats(meta, bm, bn)
        assert stats["visible_pairs"] == int(visibility(meta).sum())
        assert stats["computed_pairs"] == int(active.sum()) * bm * bn >= stats["visible_pairs"]
        assert stats["attn_tile"] == [bm, bn]


def test_tile_selection_skips_on_the_stage1_layout():
    """The default tiling on the default Stage I layout (N = 1024, k_max = 16, anchor_prob 0.5)."""
    meta = stage1_meta([1024], k_max=16, anchor_prob=0.5, seed=0)
    stats = tile_stats(meta)
    assert stats["attn_tile"] == [DEFAULT_BLOCK_M, DEFAULT_BLOCK_N]
    assert stats["tiles_unmasked"] > stats["tiles_visited"] // 2  # most tiles skip the mask
    dense_ratio = stats["dense_pairs"] / stats["visible_pairs"]
    assert dense_ratio > 9.0  # what a dense mask would compute
    assert stats["attn_compute_ratio"] <= 1.3
    # the visited tiles are exactly what the summaries allow: no skipped tile is needed
    active = active_tiles(meta, DEFAULT_BLOCK_M, DEFAULT_BLOCK_N)
    assert not (needed_tiles(meta, DEFAULT_BLOCK_M, DEFAULT_BLOCK_N) & ~active).any()


# --------------------------------------------------------------------------------------------
# Compiled kernels on CUDA (run on a GPU machine with TRITON_INTERPRET=0).
# --------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 128), (4, 4, 64)])
def test_gpu_stage1_matches_reference(dtype, hq, hkv, d):
    meta = stage1_meta([300, 233], k_max=16, seed=10)
    got, want = run_both(meta, hq, hkv, d, dtype, device="cuda")
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 4e-2}
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, **tol, msg=name)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cached_inference_and_empty_rows():
    meta = cached_meta(cache_lens=[257, 3], pending=5, block=16, accept=[4, 0])
    meta.q_anchor[1, -3:] = PAD
    got, want = run_both(meta, 8, 2, 128, torch.bfloat16, device="cuda")
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, atol=4e-2, rtol=4e-2, msg=name)
    assert got[0][1, :, -3:].abs().max() == 0
