"""The §1.1 layout: strict causality, per-example draws, determinism, and golden equivalence of the
expanded forward with inference-style forwards on stock transformers models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from fluid_npu.layout import (
    IGNORE,
    LayoutConfig,
    collate,
    expand,
    noise_vocabulary,
    slot_block,
)
from fluid_npu.model.attention import configure_attention, forward_hidden, lm_head
from fluid_npu.model.tiny import ARCHS, build_tiny_model, build_tiny_tokenizer
from fluid_ops.meta import MAIN, PAD, visibility


def _example(rng: np.random.Generator, n: int, prompt: int) -> tuple[list[int], list[int]]:
    ids = rng.integers(0, 250, n).tolist()
    return ids, [IGNORE] * prompt + ids[prompt:]


def _cfg(tok, **kw) -> LayoutConfig:
    base = dict(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, k_max=6, seed=3)
    base.update(kw)
    return LayoutConfig(noise_ids=noise_vocabulary(tok, len(tok)), **base)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def test_visibility_is_strictly_causal_and_matches_the_rule(tok):
    rng = np.random.default_rng(0)
    cfg = _cfg(tok, anchor_prob=0.6)
    exs = [expand(*_example(rng, n, 4), cfg, i) for i, n in enumerate([30, 22, 27])]
    batch = collate(exs, tok.pad_token_id)
    vis = visibility(batch.meta)
    pos, anc = batch.position_ids, batch.anchor
    for b in range(vis.shape[0]):
        q, k = torch.nonzero(vis[b], as_tuple=True)
        assert (pos[b, k] <= pos[b, q]).all()  # strictly causal in positions
        main_q = anc[b, q] == MAIN
        assert (anc[b, k][main_q] == MAIN).all()  # main tokens never see slots
        slot_q = anc[b, q] >= 0
        main_k = anc[b, k] == MAIN
        sel = slot_q & main_k
        assert (pos[b, k][sel] <= anc[b, q][sel]).all()  # slots see main keys up to their anchor
        sel = slot_q & ~main_k
        assert (anc[b, k][sel] == anc[b, q][sel]).all()  # and only their own group's slots
        assert (anc[b, k] != PAD).all() and (anc[b, q] != PAD).all()  # padding is invisible
        # Completeness: a slot sees every main key ≤ its anchor and every earlier slot of its group.
        for i in torch.nonzero(anc[b] >= 0).flatten().tolist()[:40]:
            c = anc[b, i]
            want = ((anc[b] == MAIN) & (pos[b] <= c)) | ((anc[b] == c) & (pos[b] <= pos[b, i]))
            assert torch.equal(vis[b, i], want)


def test_layout_draws_are_per_example_and_deterministic(tok):
    rng = np.random.default_rng(1)
    ids, labels = _example(rng, 40, 5)
    cfg = _cfg(tok)
    a, b = expand(ids, labels, cfg, index=0), expand(ids, labels, cfg, index=1)
    assert not np.array_equal(a.anchor, b.anchor) or not np.array_equal(a.input_ids, b.input_ids)
    again = expand(ids, labels, cfg, index=0)
    for field in ("input_ids", "labels", "position_ids", "anchor"):
        assert np.array_equal(getattr(a, field), getattr(again, field))
    assert not np.array_equal(expand(ids, labels, cfg, 0, epoch=1).anchor, a.anchor)


def test_slot_labels_and_positions(tok):
    rng = np.random.default_rng(2)
    ids, labels = _example(rng, 25, 6)
    e = expand(ids, labels, _cfg(tok, noise_ratio=0.0, reveal=False), index=0)
    n = e.n_main
    assert np.array_equal(e.labels[: n - 1], np.where(np.arange(1, n) >= 6, ids[1:], IGNORE))
    for i in range(n, len(e.input_ids)):
        c, j = e.anchor[i], e.slot_index[i]
        assert e.position_ids[i] == c + j and e.input_ids[i] == tok.mask_token_id
        assert e.labels[i] == ids[c + j + 1]  # slot j predicts the token after its own position
        assert c + 2 >= 6  # anchors: next token a response token, or the column just before


def test_slot_block_places_slot_j_of_anchor_c_at_c_plus_j():
    """The one placement rule the layout and the sampler share: position c + j, input MASK."""
    anchors = torch.tensor([[3, 10], [0, -1]])
    block = slot_block(anchors, 4, mask_id=7, live=anchors >= 0)
    assert block.position_ids.shape == (2, 2, 4) and (block.input_ids == 7).all()
    assert block.position_ids[0, 1].tolist() == [11, 12, 13, 14]
    assert block.slot_index[1, 0].tolist() == [1, 2, 3, 4]
    assert block.anchor[0, 0].tolist() == [3] * 4 and block.anchor[1, 1].tolist() == [PAD] * 4
    per_slot = slot_block(torch.tensor([5]), 3, 7, live=torch.tensor([[True, True, False]]))
    assert per_slot.anchor.tolist() == [[5, 5, PAD]]
    assert slot_block(torch.tensor([2]), 0, 7).position_ids.shape == (1, 0)


def test_the_column_before_the_response_is_an_anchor(tok):
    """The sampler's prefill drafts from the prompt's second-to-last token: Stage I trains it."""
    rng = np.random.default_rng(5)
    ids, labels = _example(rng, 20, 8)
    e = expand(ids, labels, _cfg(tok, anchor_prob=1.0, reveal=False), index=0)
    anchors = sorted(set(e.anchor[e.n_main :].tolist()))
    assert anchors == list(range(6, 18))  # 6 = the lead column; 18 leaves no supervised slot
    lead = e.anchor == 6
    assert np.array_equal(e.labels[lead], ids[8 : 8 + int(lead.sum())])  # the response's first


@pytest.mark.parametrize("anchor_prob", [0.0, 0.3])
def test_the_column_before_every_response_run_is_always_an_anchor(tok, anchor_prob):
    """DESIGN §1.1: whatever ``anchor_prob`` draws, and however tight the slot budget, the column
    before each response run (every turn's, in a conversation) anchors slots; the others are
    drawn."""
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 250, 40).tolist()
    labels = [IGNORE] * 6 + ids[6:18] + [IGNORE] * 8 + ids[26:]  # two turns: answers at 6, 26
    for budget in (None, 0.3):  # (0.3: 12 slots, the two lead anchors' most)
        cfg = _cfg(tok, anchor_prob=anchor_prob, max_slots_ratio=budget)
        for index in range(40):
            e = expand(ids, labels, cfg, index)
            anchors = set(e.anchor[e.n_main :].tolist())
            assert {4, 24} <= anchors
            if anchor_prob == 0.0:
                assert anchors == {4, 24}


def test_max_slots_ratio_caps_the_expansion(tok):
    rng = np.random.default_rng(3)
    ids, labels = _example(rng, 200, 0)
    free = expand(ids, labels, _cfg(tok, anchor_prob=1.0, max_slots_ratio=None), 0)
    capped = expand(ids, labels, _cfg(tok, anchor_prob=1.0, max_slots_ratio=1.0), 0)
    assert free.n_slots > 200 >= capped.n_slots > 150


def test_reveal_noise_changes_inputs_not_labels(tok):
    rng = np.random.default_rng(4)
    ids, labels = _example(rng, 60, 0)
    plain = expand(ids, labels, _cfg(tok, anchor_prob=1.0, reveal=False), 0)
    noisy = expand(ids, labels, _cfg(tok, anchor_prob=1.0, noise_ratio=0.5), 0)
    assert np.array_equal(plain.labels, noisy.labels) and np.array_equal(plain.anchor, noisy.anchor)
    slots = noisy.input_ids[noisy.n_main :]
    assert (slots != tok.mask_token_id).any() and (slots == tok.mask_token_id).any()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa", "reference", "blocked"])
def test_golden_slots_equal_inference_forward(tok, arch, impl):
    """Every slot's logits in the expanded forward equal prefix-into-cache + that anchor's slots."""
    rng = np.random.default_rng(5)
    cfg = _cfg(tok, k_max=5, anchor_prob=0.5)
    exs = [expand(*_example(rng, n, 3), cfg, i) for i, n in enumerate([18, 13])]
    batch = collate(exs, tok.pad_token_id)
    model = build_tiny_model(arch, tok, attn_implementation="sdpa")
    configure_attention(model, impl)
    with torch.no_grad():
        hidden, _ = forward_hidden(model, batch.input_ids, batch.position_ids, batch.meta)
        logits = lm_head(model)(hidden)
        configure_attention(model, "sdpa")
        for row, e in enumerate(exs):
            n = e.n_main
            plain = model(torch.tensor([e.input_ids[:n]])).logits[0]
            torch.testing.assert_close(logits[row, :n], plain, atol=1e-5, rtol=0)
            for c in np.unique(e.anchor[n:]):
                sel = np.nonzero(e.anchor == c)[0]
                cache = DynamicCache(config=model.config)
                model(torch.tensor([e.input_ids[: c + 1]]), cache=cache, use_cache=True)
                out = model(
                    torch.tensor(e.input_ids[sel])[None],
                    position_ids=torch.tensor(e.position_ids[sel])[None],
                    cache=cache,
                    use_cache=True,
                ).logits[0]
                torch.testing.assert_close(
                    logits[row, batch.n_main + sel - n], out, atol=1e-5, rtol=0
                )
