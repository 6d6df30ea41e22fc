"""The blocked back ends' plan and the one cache-validity rule for plans (``cached_plan``).

A cached plan must be reused while the metadata is unchanged and renewed by every change a caller
can make: a replaced tensor, an in-place write, a new ``n_main``. Each of the five conditions of
the causal-square proof is broken once and must turn the unmasked fast path off, with results
still equal to the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from test_ops_attention import _qkv, naive_attention, stage1_meta

from fluid_ops.attention import fluid_attention, plan_blocks
from fluid_ops.attention_plan import _is_causal_square
from fluid_ops.meta import MAIN, PAD, AttnMeta, cached_plan


def _counting_build():
    calls = []

    def build():
        calls.append(1)
        return object()

    return build, calls


def test_cached_plan_is_reused_until_the_metadata_changes():
    meta = stage1_meta([10, 7], seed=1)
    meta = AttnMeta(meta.q_pos, meta.q_anchor, meta.k_pos.clone(), meta.k_anchor.clone(), 10)
    build, calls = _counting_build()
    first = cached_plan(meta, "k", build)
    assert cached_plan(meta, "k", build) is first and len(calls) == 1
    assert cached_plan(AttnMeta(*_tensors(meta), meta.n_main), "k", build) is first  # same tensors
    cached_plan(meta, "other key", build)
    assert len(calls) == 2

    changes = [
        lambda m: m.k_anchor.__setitem__((0, 3), PAD),  # an in-place write
        lambda m: setattr(m, "k_pos", m.k_pos.clone()),  # a replaced tensor, equal values
        lambda m: setattr(m, "n_main", None),  # a new structure hint
        lambda m: m.q_pos.add_(0),  # any in-place op counts, even one that keeps the values
    ]
    for change in changes:
        before = cached_plan(meta, "k", build)
        change(meta)
        assert cached_plan(meta, "k", build) is not before
        assert cached_plan(meta, "k", build) is cached_plan(meta, "k", build)


def _tensors(meta: AttnMeta) -> tuple[torch.Tensor, ...]:
    return meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor


def _blocked(meta: AttnMeta, q, k, v) -> torch.Tensor:
    return fluid_attention(q, k, v, meta, 0.25, backend="blocked")


def test_blocked_attention_follows_in_place_metadata_changes():
    """Fails on a cache that ignores in-place writes: the stale plan's causal square is wrong."""
    meta = stage1_meta([16, 11], seed=7)
    q, k, v = _qkv(meta, 4, 2)
    length = meta.q_pos.shape[1]
    with torch.no_grad():
        _blocked(meta, q, k, v)
        assert plan_blocks(meta, length, length, 256)[0].causal  # cached: main is a square
        # in place (queries and keys share these tensors): the main stream's order reversed, and
        # the first slot group re-anchored on column 0 (its keys move into other chunks' sight)
        n = meta.n_main
        meta.q_pos[:, :n] = meta.q_pos[:, :n].flip(1).clone()
        meta.q_anchor[0, n : n + 2] = torch.where(meta.q_anchor[0, n : n + 2] >= 0, 0, PAD)
        out = _blocked(meta, q, k, v)
    assert not plan_blocks(meta, length, length, 256)[0].causal
    torch.testing.assert_close(out, naive_attention(q, k, v, meta, 0.25).float(), atol=2e-5, rtol=0)


def _break(condition: int, meta: AttnMeta) -> AttnMeta:
    """``meta`` (Stage I, self-attention) with condition ``condition`` of the proof violated."""
    pos, anchor = meta.q_pos.clone(), meta.q_anchor.clone()
    n = meta.n_main
    if condition == 1:  # queries are not the keys: one query position differs
        q_pos = pos.clone()
        q_pos[0, 4] += 1
        return AttnMeta(q_pos, anchor, pos, anchor, n)
    if condition == 2:  # a slot in the main region, where row 1's padding starts (it has 9 tokens)
        anchor[1, 9], pos[1, 9] = 8, 9
    elif condition == 3:  # padding before the main tokens of row 0
        anchor[0, 0] = PAD
    elif condition == 4:  # two main positions swapped
        pos[0, [2, 3]] = pos[0, [3, 2]]
    elif condition == 5:  # a main key after the main region
        anchor[0, n] = MAIN
    return AttnMeta.self_attention(pos, anchor, n_main=n)


@pytest.mark.parametrize("condition", [1, 2, 3, 4, 5])
def test_each_condition_of_the_causal_square_is_checked(condition):
    clean = stage1_meta([12, 9], seed=3)
    assert bool(_is_causal_square(clean, clean.n_main))
    meta = _break(condition, clean)
    assert not bool(_is_causal_square(meta, meta.n_main))
    length = meta.q_pos.shape[1]
    assert not any(blk.causal for blk in plan_blocks(meta, length, length, 8))
    q, k, v = _qkv(meta, 4, 2)
    with torch.no_grad():
        out = fluid_attention(q, k, v, meta, 0.25, backend="blocked")
    torch.testing.assert_close(out, naive_attention(q, k, v, meta, 0.25).float(), atol=2e-5, rtol=0)
