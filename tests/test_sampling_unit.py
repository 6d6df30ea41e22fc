"""Unit tests of the sampler's parts: policies, anchor choice, commits, the per-row KV cache."""

from __future__ import annotations

import math

import pytest
import torch

import fluid_ops
from fluid_npu.model.khead import KHead
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import head as head_mod
from fluid_npu.sampling.cache import RowCache
from fluid_npu.sampling.engine import Engine
from fluid_npu.sampling.fused import choose_anchors
from fluid_npu.sampling.policies import HorizonError, parse_policy
from fluid_npu.sampling.stats import GenerateStats
from fluid_ops.meta import MAIN, PAD


@pytest.mark.parametrize(
    ("spec", "kind", "block", "extra"),
    [
        ("ar", "ar", 0, {}),
        ("fixed:4", "fixed", 4, {"k": 4}),
        ("FIXED:16", "fixed", 16, {"k": 16}),
        ("entropy", "entropy", 16, {"threshold": 2.0}),
        ("entropy:0.25", "entropy", 16, {"threshold": 0.25}),
    ],
)
def test_parse_policy(spec, kind, block, extra):
    p = parse_policy(spec)
    assert p.kind == kind and p.block_len == block
    for key, value in extra.items():
        assert getattr(p, key) == value


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("fixed:0", {}, r"K must lie in \[1, k_max=16\]"),
        ("fixed:17", {}, r"K must lie in \[1, k_max=16\]"),
        ("fixed:9", {"k_max": 8}, r"k_max=8"),
        ("fixed:x", {}, "integer K"),
        ("entropy:-1", {}, "must be > 0"),
        ("entropy:abc", {}, "entropy:T"),
        ("khead", {}, "needs a K-head"),
        ("greedy", {}, "unknown horizon policy"),
        ("ar:3", {}, "takes no argument"),
    ],
)
def test_parse_policy_errors(spec, kwargs, match):
    with pytest.raises(HorizonError, match=match):
        parse_policy(spec, **kwargs)


def test_policy_keep():
    ent = torch.tensor([[0.1, 0.2, 2.0, 0.1], [3.0, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    assert parse_policy("entropy:1").keep(ent).tolist() == [2, 0, 4]
    assert parse_policy("fixed:4").keep(ent).tolist() == [4, 4, 4]
    head = KHead(8, 6)
    with torch.no_grad():
        head.net[2].weight.zero_()
        head.net[2].bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 5.0]))  # always predicts K = 6
    pol = parse_policy("khead", k_max=6, has_khead=True)
    assert pol.keep(ent, torch.randn(3, 8), head).tolist() == [4, 4, 4]  # clamped to the block
    pol = parse_policy("khead", k_max=6, k_min=2, has_khead=True)
    with torch.no_grad():
        head.net[2].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0]))  # predicts K = 1
    assert pol.keep(ent, torch.randn(3, 8), head).tolist() == [2, 2, 2]  # clamped to k_min


def test_choose_anchors():
    logp = torch.log(torch.tensor([[0.9, 0.9, 0.5], [0.1, 0.9, 0.9], [0.99, 0.99, 0.99]]))
    m = torch.tensor([3, 3, 1])
    # P(a=j): row 0: .1, .09, .405, .405; row 1: .9, .01, .009, .081; row 2: .01, .99
    every = choose_anchors(logp, m, 4, coverage=1.0)  # every length, most likely first
    assert sorted(every[0].tolist()) == [0, 1, 2, 3] and every[2].tolist() == [1, 0, -1, -1]
    top2 = choose_anchors(logp, m, 2, coverage=1.0)
    assert sorted(top2[0].tolist()) == [2, 3] and top2[1].tolist() == [0, 3]
    assert top2[2].tolist() == [1, 0]
    cut = choose_anchors(logp, m, 3, coverage=0.9)  # rows 1 and 2 are covered by one length
    assert sorted(cut[0].tolist()) == [0, 2, 3] and cut[1].tolist() == [0, -1, -1]
    assert cut[2].tolist() == [1, -1, -1]
    none = choose_anchors(logp[:, :0], torch.zeros(3, dtype=torch.long), 3)  # no drafts: v_0
    assert none.tolist() == [[0, -1, -1]] * 3


def _engine(max_new: int = 5, eos=(7,), batch: int = 3) -> Engine:
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok)
    prompts = [torch.tensor([1, 2, 3][: i + 1]) for i in range(batch)]
    return Engine(
        model,
        prompts,
        mask_id=tok.mask_token_id,
        max_new_tokens=max_new,
        eos_ids=list(eos),
        pad_id=0,
        stats=GenerateStats(),
    )


def test_commit_stops_at_eos_and_budget():
    eng = _engine()
    cand = torch.tensor([[4, 7, 5, 6], [4, 5, 6, 8], [9, 9, 9, 9]])
    finished, n = eng.commit(cand, torch.tensor([4, 3, 1]))
    assert n == [2, 3, 1] and finished == [True, False, False]
    kept = eng.retire(finished)
    assert kept.tolist() == [1, 2] and eng.row_ids == [1, 2]
    assert eng.retire([False, False]) is None
    finished, n = eng.commit(torch.tensor([[2, 2, 2], [3, 3, 3]]), torch.tensor([3, 3]))
    assert n == [2, 3] and finished == [True, False]  # row 1 hits the budget
    assert eng.new_tokens() == [[4, 7], [4, 5, 6, 2, 2], [9, 3, 3, 3]]
    assert eng.next_pos.tolist() == [2 + 5, 3 + 4]


def _filled_cache(values: torch.Tensor, anchor: torch.Tensor) -> RowCache:
    cache = RowCache(values.shape[0], torch.device("cpu"))
    kv = values[:, None, :, None].expand(-1, 2, -1, 3).float().contiguous()
    cache.kv.update(kv, kv + 0.5, 0)
    cache.appended(torch.arange(values.shape[1]).expand(values.shape[0], -1).clone(), anchor)
    return cache


def test_keep_new_marks_rejected_entries_and_compacts():
    width = 40
    values = torch.arange(2 * width).reshape(2, width)
    cache = _filled_cache(values, torch.full((2, width), MAIN))
    cache.keep_new(6, [2, 5])  # of the last 6: row 0 keeps 2, row 1 keeps 5
    assert cache.width == width - 1
    assert cache.anchor[0, -3:].tolist() == [PAD, PAD, PAD] and (cache.anchor[1] == MAIN).all()
    cache.anchor[0, :34] = PAD  # pretend both rows had many holes: compaction pays off
    cache.anchor[1, :25] = PAD
    assert cache.maybe_compact() is False  # the running bound (1 per step here) is too small
    assert cache.maybe_compact(force_check=True)
    assert cache.width == 14  # row 1 keeps entries 25..38
    assert cache.anchor[0].tolist() == [PAD] * 12 + [MAIN, MAIN]
    keys = cache.kv.layers[0].keys
    assert keys[0, 0, -2:, 0].tolist() == [34.0, 35.0]  # row 0: the two it kept, order kept
    assert keys[1, 1, :, 0].tolist() == [float(v) for v in range(65, 79)]
    assert cache.kv.layers[0].values[1, 0, :, 0].tolist() == [v + 0.5 for v in range(65, 79)]
    assert cache.pos[1].tolist() == list(range(25, 39))
    cache.select(torch.tensor([0]))
    assert cache.maybe_compact(force_check=True) is False  # 12 holes: below COMPACT_MIN
    assert cache.anchor[0].tolist() == [PAD] * 12 + [MAIN, MAIN]  # the kept row is unchanged


@pytest.mark.parametrize("direct", [True, False])
def test_lm_head_statistics_paths_agree(direct, monkeypatch):
    eng = _engine()
    head = eng.head
    hidden = torch.randn(2, 5, head.weight.shape[1])
    monkeypatch.setattr(head_mod, "DIRECT_LOGITS", 1 << 30 if direct else 0)
    with torch.no_grad():
        got = eng.slot_stats(hidden)
        ref = fluid_ops.token_stats(hidden, head.weight)
        direct_argmax = eng.argmax(hidden)
        naive = (hidden @ head.weight.T).argmax(-1)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.max_logprob, ref.max_logprob, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax, ref.argmax)
    assert torch.equal(direct_argmax, naive)
    assert math.isfinite(float(got.entropy.sum()))


@pytest.mark.parametrize("backend", ["blocked", "reference", "eager"])
def test_attention_backends_agree_and_are_restored(backend):
    from fluid_npu.model.attention import attention_kind
    from fluid_npu.sampling import generate
    from fluid_npu.sampling.lossless import compare
    from fluid_npu.sampling.prompts import left_pad

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("qwen3", tok, seed=2)
    ids, mask = left_pad([tok("abc def")["input_ids"], tok("z")["input_ids"]], tok.pad_token_id)
    kw = dict(policy="fixed:3", max_new_tokens=8, eos_token_id=[])
    ref = generate(model, tok, ids, mask, **kw)  # the decode engine
    seen = []
    hook = model.base_model.register_forward_pre_hook(
        lambda *_: seen.append(
            (attention_kind(model), model.config.__dict__.get("fluid_attn_backend"))
        )
    )
    got = generate(model, tok, ids, mask, attn_backend=backend, loop="reference", **kw)
    hook.remove()
    want = (backend if backend == "eager" else "fluid", backend)
    assert seen and set(seen) == {want}  # every forward ran on the back end asked for
    prompts = [tok("abc def")["input_ids"], tok("z")["input_ids"]]
    assert all(d.tie for d in compare(model, prompts, got.new_tokens, ref.new_tokens))
    assert attention_kind(model) == "sdpa" and "fluid_attn_backend" not in model.config.__dict__


def test_attention_backend_is_checked_and_refused_where_it_would_do_nothing():
    from fluid_npu.errors import ConfigError
    from fluid_npu.sampling import generate

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("qwen3", tok, seed=2)
    ids = [tok("abc")["input_ids"]]
    with pytest.raises(
        ConfigError, match="attn_backend 'flash' is not one of auto, reference, blocked"
    ):
        generate(model, tok, ids, attn_backend="flash", loop="reference")
    # the decode engine attends over its slot cache itself: a back end there would be ignored
    with pytest.raises(ConfigError, match="leave attn_backend out, or use loop='reference'"):
        generate(model, tok, ids, attn_backend="eager")


@pytest.mark.parametrize("loop", ["fused", "reference"])
def test_decoding_uses_no_deprecated_transformers_argument(loop, monkeypatch):
    """transformers 5.24 renamed the decoder's ``past_key_values`` to ``cache`` and warns on the
    old name (an output's ``.past_key_values`` included) — once per process, in every run a user
    makes; neither loop may read or pass it."""
    from transformers.utils import generic

    from fluid_npu.sampling.api import generate

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=1)
    ids = torch.tensor([tok("abcab")["input_ids"]])
    out = generate(model, tok, ids, policy="fixed:2", loop=loop, max_new_tokens=6, eos_token_id=[])
    assert out.sequences.shape[1] == ids.shape[1] + 6
    assert not [m for m in said if "deprecated" in m], said
