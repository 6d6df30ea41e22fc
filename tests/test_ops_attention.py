"""fluid_attention: every back end against a float64 softmax straight from ``visibility``.

Metadata comes from small builders of the two shapes the project produces: the batched Stage I
layout (main stream right-padded to ``n_main``, then each row's slot groups by ascending anchor,
right-padded) and cached inference (left-padded main cache, new main tokens, MASK blocks anchored on
some of them). The ``npu`` back end runs on CPU against an emulation of the documented semantics of
``torch_npu.npu_fusion_attention`` / ``npu_fused_infer_attention_score`` (op-plugin docs), injected
through ``dispatch.load_torch_npu``; the exact arguments it passes are checked too.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from fluid_ops import attention, attention_npu, dispatch
from fluid_ops.attention import fluid_attention, plan_blocks, visible_pairs
from fluid_ops.attention_plan import safe_mask
from fluid_ops.dispatch import BackendUnavailable, force_backend
from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility

# ---------------------------------------------------------------------------------------------
# metadata builders


def _pad_rows(rows: list[tuple[list[int], list[int]]], gen: torch.Generator):
    """Right-pad ``(pos, anchor)`` rows with PAD tokens at random positions (never visible)."""
    length = max(len(p) for p, _ in rows)
    pos = torch.randint(0, 50, (len(rows), length), generator=gen)
    anchor = torch.full((len(rows), length), PAD)
    for r, (p, a) in enumerate(rows):
        pos[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        anchor[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return pos, anchor


def _slots(first: int, last: int, k_max: int, prob: float, gen: torch.Generator):
    """Slot groups for anchors ``first..last`` (ascending), each kept with probability ``prob``."""
    pos: list[int] = []
    anchor: list[int] = []
    for c in range(first, last + 1):
        if torch.rand((), generator=gen) < prob:
            k = int(torch.randint(1, k_max + 1, (), generator=gen))
            pos += [c + j for j in range(1, k + 1)]
            anchor += [c] * k
    return pos, anchor


def stage1_meta(main_lens: list[int], k_max: int = 6, prob: float = 0.5, seed: int = 0) -> AttnMeta:
    """The batched Stage I layout: queries = keys, ``n_main = max(main_lens)``."""
    gen = torch.Generator().manual_seed(seed)
    n_main = max(main_lens)
    rows = []
    for n in main_lens:
        spos, sanc = _slots(0, n - 2, k_max, prob, gen)  # a column needs a next token
        main_pos = list(range(n)) + [
            int(x) for x in torch.randint(0, 50, (n_main - n,), generator=gen)
        ]
        rows.append((main_pos + spos, [MAIN] * n + [PAD] * (n_main - n) + sanc))
    pos, anchor = _pad_rows(rows, gen)
    return AttnMeta.self_attention(pos, anchor, n_main=n_main)


def cached_meta(
    cache_lens: list[int], new_main: list[int], k_max: int = 5, prob: float = 0.6, seed: int = 0
) -> AttnMeta:
    """Cached inference: keys = left-padded cache + new tokens, queries = the new tokens.

    Row ``r`` has ``cache_lens[r]`` committed tokens, then ``new_main[r]`` new main tokens (padded
    to the batch's ``n_main``), then MASK blocks anchored on the last cached token or a new main
    token.
    """
    gen = torch.Generator().manual_seed(seed)
    cache = max(cache_lens)
    n_main = max(new_main)
    new_rows = []
    for c, m in zip(cache_lens, new_main):
        spos, sanc = _slots(c - 1, c + m - 1, k_max, prob, gen)
        new_rows.append(
            (
                list(range(c, c + m)) + [0] * (n_main - m) + spos,
                [MAIN] * m + [PAD] * (n_main - m) + sanc,
            )
        )
    q_pos, q_anchor = _pad_rows(new_rows, gen)
    k_pos = torch.zeros(len(cache_lens), cache, dtype=torch.long)
    k_anchor = torch.full((len(cache_lens), cache), PAD)
    for r, c in enumerate(cache_lens):
        k_pos[r, cache - c :] = torch.arange(c)
        k_anchor[r, cache - c :] = MAIN
    return AttnMeta(
        q_pos, q_anchor, torch.cat([k_pos, q_pos], 1), torch.cat([k_anchor, q_anchor], 1), n_main
    )


# ---------------------------------------------------------------------------------------------
# the float64 ground truth and the check


def naive_attention(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the visible keys only, in float64; no visible key -> 0."""
    vis = visibility(meta)[:, None]
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    return (e / e.sum(-1, keepdim=True).clamp_min(1e-300)) @ v


def _qkv(meta: AttnMeta, hq: int, hkv: int, d: int = 16, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    b, lq = meta.q_pos.shape
    lk = meta.k_pos.shape[1]
    shapes = ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))
    return tuple(torch.randn(s, generator=gen, dtype=dtype).to(meta.q_pos.device) for s in shapes)


def check_against_naive(run, meta: AttnMeta, hq: int, hkv: int, atol: float = 2e-5) -> None:
    """``run(q, k, v, meta, scale)`` matches the float64 truth in values and q/k/v gradients."""
    q, k, v = (t.requires_grad_() for t in _qkv(meta, hq, hkv))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = run(q, k, v, meta, scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * grad).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_attention(q64, k64, v64, meta, scale)
    (ref * grad.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=1e-4)
    for name, got, want in (
        ("q", q.grad, q64.grad),
        ("k", k.grad, k64.grad),
        ("v", v.grad, v64.grad),
    ):
        assert torch.isfinite(got).all(), f"non-finite d{name}"
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4, msg=f"d{name} differs")
    blind = ~visibility(meta).any(-1)  # rows with no visible key: exactly zero
    assert blind.any() or meta.batch == 1, "a ragged batch should contain padding rows"
    assert (out.detach().permute(0, 2, 1, 3)[blind] == 0).all()


# ---------------------------------------------------------------------------------------------
# the fake torch_npu: an emulation of the documented semantics, recording every call


class FakeTorchNpu(types.ModuleType):
    """CPU emulation of the two torch_npu ops, per the op-plugin docs, with a call log."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[str, tuple, dict]] = []

    @staticmethod
    def _attend(q, k, v, masked, scale):
        rep = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
        s = (q.float() @ k.transpose(-1, -2) * scale).masked_fill(masked, float("-inf"))
        full = masked.all(-1, keepdim=True)  # only reached with inner_precise=2: output 0
        p = torch.softmax(s.masked_fill(full, 0.0), -1).masked_fill(full, 0.0)
        return (p @ v).to(q.dtype), s.amax(-1, keepdim=True)

    @staticmethod
    def _check_rows(masked, inner_precise):
        if masked.all(-1).any() and inner_precise != 2:
            raise AssertionError("a fully masked row needs inner_precise=2 (precision loss)")

    def npu_fusion_attention(
        self,
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=2147483647,
        next_tockens=2147483647,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
    ):
        self.calls.append(
            (
                "npu_fusion_attention",
                (query, key, value, head_num, input_layout),
                {
                    "atten_mask": atten_mask,
                    "scale": scale,
                    "sparse_mode": sparse_mode,
                    "inner_precise": inner_precise,
                    "pre_tockens": pre_tockens,
                    "next_tockens": next_tockens,
                },
            )
        )
        if input_layout != "BNSD":
            raise NotImplementedError("the emulation covers the BNSD layout only")
        assert pse is None and padding_mask is None and keep_prob == 1.0 and prefix is None
        assert query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert query.dtype == key.dtype == value.dtype and key.shape == value.shape
        b, n, sq, d = query.shape
        skv = key.shape[2]
        assert head_num == n and n % key.shape[1] == 0 and d <= 768
        i = torch.arange(sq)[:, None]
        j = torch.arange(skv)[None]
        if atten_mask is None:
            masked = torch.zeros(1, 1, sq, skv, dtype=torch.bool)
        elif sparse_mode == 0:
            assert atten_mask.dtype in (torch.bool, torch.uint8)
            assert atten_mask.shape[-2:] == (sq, skv) and atten_mask.dim() in (2, 4)
            if atten_mask.dim() == 4:
                assert atten_mask.shape[0] in (1, b) and atten_mask.shape[1] in (1, n)
            band = (j - i > next_tockens) | (i - j > pre_tockens)
            masked = atten_mask.bool() | band
        elif sparse_mode in (2, 3):
            expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
            assert atten_mask.dtype == torch.bool and torch.equal(atten_mask, expected)
            shift = 0 if sparse_mode == 2 else skv - sq  # leftUpCausal / rightDownCausal
            masked = j > i + shift
        else:
            raise NotImplementedError(f"sparse_mode {sparse_mode} is not emulated")
        masked = masked.expand(b, n, sq, skv)
        self._check_rows(masked, inner_precise)
        out, smax = self._attend(query, key, value, masked, scale)
        return out, smax, smax, torch.empty(0), 0, 0, 0

    def npu_fused_infer_attention_score(
        self,
        query,
        key,
        value,
        *,
        pse_shift=None,
        atten_mask=None,
        actual_seq_lengths=None,
        actual_seq_lengths_kv=None,
        block_table=None,
        num_heads=1,
        scale=1.0,
        pre_tokens=2147483647,
        next_tokens=2147483647,
        input_layout="BSH",
        num_key_value_heads=0,
        sparse_mode=0,
        inner_precise=0,
        block_size=0,
        softmax_lse_flag=False,
    ):
        self.calls.append(
            (
                "npu_fused_infer_attention_score",
                (query, key, value),
                {
                    "atten_mask": atten_mask,
                    "num_heads": num_heads,
                    "scale": scale,
                    "input_layout": input_layout,
                    "sparse_mode": sparse_mode,
                    "num_key_value_heads": num_key_value_heads,
                    "inner_precise": inner_precise,
                },
            )
        )
        if input_layout != "BNSD":
            raise NotImplementedError("the emulation covers the BNSD layout only")
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError("npu_fused_infer_attention_score takes float16/bfloat16 queries")
        assert pse_shift is None and block_table is None and actual_seq_lengths is None
        assert all(t.is_contiguous() for t in (query, key, value))
        b, n, sq, d = query.shape
        skv = key.shape[2]
        assert num_heads == n and (num_key_value_heads or n) == key.shape[1]
        assert n % key.shape[1] == 0 and n // key.shape[1] <= 64
        assert sq == 1 or d % 16 == 0
        if atten_mask is None:
            masked = torch.zeros(1, 1, sq, skv, dtype=torch.bool)
        else:
            assert sparse_mode == 0, "only the explicit-mask mode is emulated"
            assert atten_mask.dtype in (torch.bool, torch.int8, torch.uint8)
            # the one shape every release takes (torch_npu 6.0.0's docs allow only B1SS; later
            # ones add (1, Sq, Skv), 11SS and per-Sq special cases, never (B, Sq, Skv))
            shape = tuple(atten_mask.shape)
            assert shape == (b, 1, sq, skv), f"mask shape {shape}: only (B, 1, Sq, Skv)"
            masked = atten_mask.bool().reshape(-1, 1, sq, skv)
        masked = masked.expand(b, n, sq, skv)
        self._check_rows(masked, inner_precise)
        out, _ = self._attend(query, key, value, masked, scale)
        return out, torch.zeros(1)


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setattr(dispatch, "load_torch_npu", lambda: fake)
    return fake


# ---------------------------------------------------------------------------------------------
# values and gradients of every back end

STAGE1 = [[30, 22, 9], [17]]  # ragged batch (one row too short for any slot), single row
CACHED = [([12, 7, 3], [4, 2, 4]), ([9], [3])]
HEADS = [(4, 2), (2, 2)]  # GQA, MHA


def _blocked(chunk):
    return lambda q, k, v, meta, scale: attention.blocked_attention(q, k, v, meta, scale, chunk)


def _npu(chunk):
    return lambda q, k, v, meta, scale: attention_npu.npu_attention(q, k, v, meta, scale, chunk)


RUNNERS = {
    "reference": attention.reference_attention,
    "blocked": _blocked(None),
    "blocked-chunk5": _blocked(5),
}


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("lens", STAGE1, ids=["ragged", "single"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_stage1_matches_naive(runner, lens, heads):
    check_against_naive(RUNNERS[runner], stage1_meta(lens, seed=len(lens)), *heads)


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("rows", CACHED, ids=["ragged", "single"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_cached_inference_matches_naive(runner, rows, heads):
    check_against_naive(RUNNERS[runner], cached_meta(*rows, seed=3), *heads)


@pytest.mark.parametrize("runner", ["blocked", "blocked-chunk5"])
def test_blocked_without_structure_hint(runner):
    """n_main=None: the reference math."""
    meta = stage1_meta([14, 8], seed=5)
    meta.n_main = None
    check_against_naive(RUNNERS[runner], meta, 4, 2)


def test_blocked_survives_a_layout_it_does_not_expect():
    """Shuffled slots and a main region out of order still give exact results (no causal call)."""
    meta = stage1_meta([20, 13], k_max=4, prob=0.7, seed=11)
    gen = torch.Generator().manual_seed(0)
    n = meta.n_main
    perm = torch.cat(
        [
            torch.randperm(n, generator=gen),
            n + torch.randperm(meta.q_pos.shape[1] - n, generator=gen),
        ]
    )
    shuffled = AttnMeta.self_attention(meta.q_pos[:, perm], meta.q_anchor[:, perm], n_main=n)
    assert not any(b.causal for b in plan_blocks(shuffled, len(perm), len(perm), 6))
    check_against_naive(_blocked(6), shuffled, 4, 2)
    # the first main token moved behind the slots: the main region alone is a clean causal run,
    # but main queries must still see that token
    moved = torch.cat([torch.arange(1, len(perm)), torch.tensor([0])])
    late = AttnMeta.self_attention(meta.q_pos[:, moved], meta.q_anchor[:, moved], n_main=n - 1)
    assert not any(b.causal for b in plan_blocks(late, len(perm), len(perm), 6))
    check_against_naive(_blocked(6), late, 4, 2)


def test_blocked_plan_is_sparse_and_covers_every_visible_key():
    meta = stage1_meta([60, 41], k_max=8, prob=0.5, seed=2)
    length = meta.q_pos.shape[1]
    vis = visibility(meta)
    blocks = plan_blocks(meta, length, length, 16)
    assert blocks[0].causal and (blocks[0].q0, blocks[0].q1) == (0, meta.n_main)
    attended = 0
    for blk in blocks:
        covered = torch.zeros(length, dtype=torch.bool)
        for a, b in blk.ranges:
            covered[a:b] = True
        assert not vis[:, blk.q0 : blk.q1, ~covered].any(), f"block {blk.q0} misses a visible key"
        attended += (blk.q1 - blk.q0) * int(covered.sum())
    assert attended < 0.45 * length * length, (attended, length)
    assert plan_blocks(meta, length, length, 16) is blocks  # cached on the metadata


def test_visible_pairs():
    # main 0..3 (4+3+2+1 = 10 pairs), anchor 1 with 2 slots: (0, 1, self) + (0, 1, slot1, self)
    pos = torch.tensor([[0, 1, 2, 3, 2, 3, 9]])
    anchor = torch.tensor([[MAIN, MAIN, MAIN, MAIN, 1, 1, PAD]])
    assert visible_pairs(AttnMeta.self_attention(pos, anchor, n_main=4)) == 17
    meta = stage1_meta([25, 16], seed=4)
    assert visible_pairs(meta, query_chunk=7) == int(visibility(meta).sum())


# ---------------------------------------------------------------------------------------------
# dispatch


@pytest.fixture
def spy(monkeypatch):
    seen: list[str] = []
    for name, fn in list(attention._BACKENDS.items()):
        monkeypatch.setitem(
            attention._BACKENDS, name, lambda *a, _n=name, _f=fn: seen.append(_n) or _f(*a)
        )
    return seen


def _small():
    meta = stage1_meta([8, 5], seed=1)
    return (*_qkv(meta, 4, 2), meta)


def test_default_on_cpu_is_blocked(spy, monkeypatch):
    monkeypatch.delenv("FLUID_ATTENTION_BACKEND", raising=False)
    assert dispatch.select("attention", torch.device("cpu")) == "blocked"
    fluid_attention(*_small())
    assert spy == ["blocked"]


def test_force_backend_env_and_argument(spy, monkeypatch):
    monkeypatch.delenv("FLUID_ATTENTION_BACKEND", raising=False)
    q, k, v, meta = _small()
    with force_backend("attention", "reference"):
        fluid_attention(q, k, v, meta)
    monkeypatch.setenv("FLUID_ATTENTION_BACKEND", "reference")
    fluid_attention(q, k, v, meta)
    fluid_attention(q, k, v, meta, backend="blocked")  # the caller's choice beats the env
    assert spy == ["reference", "reference", "blocked"]


def test_forcing_npu_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("FLUID_ATTENTION_BACKEND", raising=False)
    with pytest.raises(BackendUnavailable, match=r"'npu' is unavailable on cpu: .*NPU tensors"):
        fluid_attention(*_small(), backend="npu")
    monkeypatch.setenv("FLUID_ATTENTION_BACKEND", "npu")
    with pytest.raises(BackendUnavailable, match="NPU tensors"):
        fluid_attention(*_small())


def test_triton_backend_is_called_lazily(monkeypatch):
    module = types.ModuleType("fluid_ops.attention_triton")
    calls = []
    module.triton_attention = lambda q, k, v, meta, scale: calls.append(scale) or q.clone()
    monkeypatch.setitem(sys.modules, "fluid_ops.attention_triton", module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, meta = _small()
    fluid_attention(q, k, v, meta, backend="triton")
    assert calls == [pytest.approx(1 / 4)]  # D = 16


def test_shape_errors():
    q, k, v, meta = _small()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fluid_attention(q[:, :3], k, v, meta)
    with pytest.raises(ValueError, match="q_pos"):
        fluid_attention(q[:, :, :-1], k, v, meta)


# ---------------------------------------------------------------------------------------------
# npu: the argument contract, through the emulation


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
def test_npu_training_stage1(fake_npu, heads):
    meta = stage1_meta([30, 22, 9], seed=3)
    check_against_naive(_npu(16), meta, *heads)
    length = meta.q_pos.shape[1]
    calls = [c for c in fake_npu.calls if c[0] == "npu_fusion_attention"]
    blocks = [b for b in plan_blocks(meta, length, length, 16) if b.ranges]
    assert len(calls) == len(fake_npu.calls) == len(blocks) > 2
    for i, (_, (q, k, _v, head_num, layout), kw) in enumerate(calls):
        assert layout == "BNSD" and head_num == heads[0] and k.shape[1] == heads[1]
        assert kw["scale"] == pytest.approx(1 / math.sqrt(16)) and isinstance(kw["scale"], float)
        assert kw["atten_mask"].dtype == torch.bool and kw["inner_precise"] == 0
        if i == 0:  # the main stream: one causal square through the compressed mask
            assert kw["sparse_mode"] == 2 and kw["atten_mask"].shape == (2048, 2048)
            assert q.shape[2] == k.shape[2] == meta.n_main
        else:  # slot chunks: explicit inverted mask, B1SS, on the key ranges they can see
            assert kw["sparse_mode"] == 0
            assert kw["atten_mask"].shape == (q.shape[0], 1, q.shape[2], k.shape[2])
            assert k.shape[2] < meta.k_pos.shape[1]


def test_npu_training_cached_and_unstructured(fake_npu):
    check_against_naive(_npu(4), cached_meta([12, 7, 3], [4, 2, 4], seed=3), 4, 2)
    assert {c[2]["sparse_mode"] for c in fake_npu.calls} == {0}
    meta = stage1_meta([10, 6], seed=8)
    meta.n_main = None
    fake_npu.calls.clear()
    check_against_naive(_npu(4), meta, 2, 2)
    assert len(fake_npu.calls) == 1 and fake_npu.calls[0][2]["sparse_mode"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_npu_cached_inference_uses_the_infer_kernel(fake_npu, dtype):
    meta = cached_meta([12, 7, 3], [4, 2, 4], seed=3)
    q, k, v = _qkv(meta, 4, 2, d=32, dtype=dtype)
    with torch.no_grad():
        out = attention_npu.npu_attention(q, k, v, meta, 1 / math.sqrt(32))
    ref = naive_attention(q, k, v, meta, 1 / math.sqrt(32))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert [c[0] for c in fake_npu.calls] == ["npu_fused_infer_attention_score"]
    kw = fake_npu.calls[0][2]
    assert kw["num_heads"] == 4 and kw["num_key_value_heads"] == 2
    assert kw["input_layout"] == "BNSD" and kw["sparse_mode"] == 0
    assert kw["scale"] == pytest.approx(1 / math.sqrt(32))
    assert kw["atten_mask"].dtype == torch.bool
    assert kw["atten_mask"].shape == (3, 1, *meta.q_pos.shape[1:], meta.k_pos.shape[1])
    assert torch.equal(kw["atten_mask"][:, 0], ~safe_mask(visibility(meta))[0])


def test_npu_inference_builds_one_mask_per_step_for_every_layer(fake_npu, monkeypatch):
    """Every layer of a decode step passes the same metadata tensors (the custom op rebuilds the
    ``AttnMeta`` around them per call): the inference kernel's mask is built once per step, and
    again after the metadata is written in place (the next step)."""
    builds = []
    original = attention_npu.visibility
    monkeypatch.setattr(attention_npu, "visibility", lambda m: builds.append(1) or original(m))
    meta = cached_meta([12, 7, 3], [4, 2, 4], seed=3)
    q, k, v = _qkv(meta, 4, 2, d=32, dtype=torch.bfloat16)
    tensors = (meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor, meta.n_main)
    scale = 1 / math.sqrt(32)
    with torch.no_grad():
        for _layer in range(3):  # as the op calls it: a new AttnMeta over the same tensors
            attention_npu.npu_attention(q, k, v, AttnMeta(*tensors), scale)
        assert len(builds) == 1 and len(fake_npu.calls) == 3
        meta.q_anchor[0, -1] = PAD  # the next step's metadata, written in place
        attention_npu.npu_attention(q, k, v, AttnMeta(*tensors), scale)
    assert len(builds) == 2


def test_npu_fp32_or_grad_inference_goes_through_fusion_attention(fake_npu):
    meta = cached_meta([9], [3], seed=1)
    q, k, v = _qkv(meta, 2, 2)
    with torch.no_grad():  # the infer kernel takes no float32: the training kernel serves
        out = attention_npu.npu_attention(q, k, v, meta, 0.25)
    torch.testing.assert_close(
        out.double(), naive_attention(q, k, v, meta, 0.25), atol=2e-5, rtol=1e-4
    )
    assert {c[0] for c in fake_npu.calls} == {"npu_fusion_attention"}


def test_npu_through_the_dispatcher(fake_npu):
    """With the availability check satisfied, fluid_attention(backend="npu") runs the npu path."""
    dispatch.register_backend("attention", "npu", lambda device: None)
    try:
        check_against_naive(
            lambda *a: fluid_attention(*a, backend="npu"), stage1_meta([9, 7]), 4, 2
        )
    finally:
        dispatch.register_backend("attention", "npu", dispatch.npu_unavailable)
    assert fake_npu.calls


def test_torch_npu_hook_imports_or_says_why():
    try:
        module = dispatch.load_torch_npu()
    except BackendUnavailable as exc:
        assert "torch_npu cannot be imported" in str(exc)
    else:
        assert hasattr(module, "npu_fusion_attention")
