"""Golden tests of the elastic sampler: every policy × loop reproduces transformers' greedy output.

Two kinds of models:

* random tiny Llama / Qwen2 / Qwen3 / Mistral — real attention everywhere, drafts rarely right;
* a constructed "chain" Llama whose drafts are often right: orthonormal embeddings and an LM head
  make the next token a fixed successor (``a→b→…→z→*``, ``*→*``, ``m→EOS``, ``MASK→*``), and the
  attention's output projection is scaled up to give the cache a real say (``attn_scale``). With a
  mild scale, rows that reach the ``*`` run accept whole drafts (TPF > 1) while others walk the
  alphabet into an EOS; with a strong scale, attention dominates and accept lengths are ragged.

Every call is compared with ``model.generate(do_sample=False)`` (fp32, CPU) through
``lossless.compare``: a difference is tolerated only as a numerical tie (logits within 1e-4), and
each tolerated tie is printed and recorded. A probe also checks, whenever a row finishes, that the
sampler's KV cache holds exactly the keys a fresh forward of that row's committed tokens produces
(cropping, holes and compaction are exact, not merely argmax-preserving).
"""

from __future__ import annotations

import string

import pytest
import torch

from fluid_npu.model.khead import KHead
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import generate
from fluid_npu.sampling.cache import RowCache
from fluid_npu.sampling.engine import Engine
from fluid_npu.sampling.lossless import compare, hf_greedy
from fluid_npu.sampling.prompts import left_pad
from fluid_npu.sampling.scheduler import Scheduler
from fluid_ops.meta import MAIN

POLICIES = ("ar", "fixed:3", "entropy:6", "khead")  # entropy:6 nats keeps every random draft
PROMPTS = ("hello world", "a", "the quick brown fox", "xyz")
TIES: list[dict] = []  # every tolerated numerical tie of this module, printed as it is found


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _khead(model: torch.nn.Module, k_max: int = 4) -> KHead:
    torch.manual_seed(1)
    return KHead(model.config.hidden_size, k_max).eval()


def _assert_lossless(model, prompts, ours, theirs, what: str, record_property=None) -> None:
    diffs = compare(model, prompts, ours, theirs)
    real = [d for d in diffs if not d.tie]
    assert not real, f"{what}: tokens differ from transformers' greedy generate: {real}"
    for d in diffs:
        TIES.append({"case": what, **d.to_dict()})
        print(f"tolerated numerical tie in {what}: {d}")
        if record_property is not None:
            record_property(f"tie:{what}:row{d.row}", d.to_dict())


@pytest.fixture
def cache_probe(monkeypatch):
    """Check each finishing row's cache against a fresh forward of its committed tokens.

    Fused loop: the engine's static slot cache (indices ``[0, n)`` of the slot hold the committed
    tokens' keys, index = position); reference loop: the ``RowCache`` entries marked ``MAIN``.
    """
    checked: list[int] = []

    def fresh_cache(model, seq: list[int]):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([seq]), use_cache=True).cache

    original = Engine.retire

    def retire(self: Engine, finished: list[bool]):
        for i in range(len(finished)):
            if not finished[i]:
                continue
            row = self.row_ids[i]
            fresh = fresh_cache(self.model, [*self._prompts[row].tolist(), *self.tokens[row][:-1]])
            idx = torch.nonzero(self.cache.anchor[i] == MAIN).flatten()  # committed, in order
            assert idx.numel() == fresh.get_seq_length(), "cache holds other than the committed"
            for layer, ref in zip(self.cache.kv.layers, fresh.layers):
                torch.testing.assert_close(layer.keys[i][:, idx], ref.keys[0], atol=2e-5, rtol=0)
                torch.testing.assert_close(
                    layer.values[i][:, idx], ref.values[0], atol=2e-5, rtol=0
                )
            checked.append(row)
        return original(self, finished)

    free = Scheduler._free

    def free_slot(self: Scheduler, i: int, reason: str | None):
        s = self.slots[i]
        if s is not None and s.running and len(s.new) > 0:
            fresh = fresh_cache(self.model, [*s.prompt, *s.new[:-1]])
            n = fresh.get_seq_length()
            assert int(self.length[i]) == n, "the slot's committed length is not its tokens'"
            for keys, values, ref in zip(self.kv.keys, self.kv.values, fresh.layers):
                torch.testing.assert_close(keys[i, :, :n], ref.keys[0], atol=2e-5, rtol=0)
                torch.testing.assert_close(values[i, :, :n], ref.values[0], atol=2e-5, rtol=0)
            free(self, i, reason)
            # what a later prompt may reuse (reuse.py) is exactly what was just checked
            assert self.prefixes.held[i] == [*s.prompt, *s.new[:-1]]
            checked.append(i)
            return None
        return free(self, i, reason)

    monkeypatch.setattr(Engine, "retire", retire)
    monkeypatch.setattr(Scheduler, "_free", free_slot)
    return checked


def _eos_mid_way(model, tok, prompts: list[list[int]], max_new: int) -> int:
    """A token row 0 generates mid-way that row 1 never generates (so both endings occur)."""
    ids, mask = left_pad(prompts, tok.pad_token_id)
    free = hf_greedy(model, ids, mask, max_new, [], tok.pad_token_id)
    for t in free[0][3:]:
        if t not in free[1]:
            return t
    raise AssertionError("no EOS candidate: change the prompts")


@pytest.mark.parametrize("loop", ["fused", "reference"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_random_models_match_hf_greedy(arch, loop, tok, cache_probe, record_property):
    max_new = 8
    model = build_tiny_model(arch, tok, seed=3)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    eos = _eos_mid_way(model, tok, prompts, max_new)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    hf_batch = hf_greedy(model, ids, mask, max_new, [eos], tok.pad_token_id)
    assert hf_batch[0][-1] == eos and len(hf_batch[0]) < max_new  # EOS mid-way
    assert any(len(t) == max_new and eos not in t for t in hf_batch)  # a row runs to the budget
    head = _khead(model)
    for policy in POLICIES:
        what = f"{arch}/{loop}/{policy}"
        kw = dict(policy=policy, loop=loop, max_new_tokens=max_new, eos_token_id=eos, khead=head)
        out = generate(model, tok, ids, mask, **kw)
        _assert_lossless(model, prompts, out.new_tokens, hf_batch, what + "/b4", record_property)
        assert out.stats.total_new_tokens == sum(len(t) for t in out.new_tokens)
        for r, p in enumerate(prompts):  # batch 1: each row alone
            hf_one = hf_greedy(
                model, torch.tensor([p]), torch.ones(1, len(p)), max_new, [eos], tok.pad_token_id
            )
            alone = generate(model, tok, torch.tensor([p]), **kw)
            _assert_lossless(model, [p], alone.new_tokens, hf_one, what + f"/b1/row{r}")
            # a row's tokens do not depend on the batch it runs in
            _assert_lossless(model, [p], alone.new_tokens, [out.new_tokens[r]], what + "/alone")
    assert len(cache_probe) == len(POLICIES) * len(prompts) * 2


def test_rows_are_independent_of_batch_order(tok, cache_probe):
    model = build_tiny_model("llama", tok, seed=5)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    kw = dict(policy="entropy:6", max_new_tokens=10, eos_token_id=[])
    fwd = generate(model, tok, *left_pad(prompts, tok.pad_token_id), **kw)
    rev = generate(model, tok, *left_pad(prompts[::-1], tok.pad_token_id), **kw)
    _assert_lossless(model, prompts, fwd.new_tokens, rev.new_tokens[::-1], "llama/batch-order")
    assert all(len(t) == 10 for t in fwd.new_tokens)  # max_new_tokens is exact


def chain_model(tok, attn_scale: float, after: dict[int, int] | None = None) -> torch.nn.Module:
    """The constructed Llama of the module docstring (deterministic); ``after`` replaces some
    tokens' successors."""
    model = build_tiny_model("llama", tok, seed=0)
    tid = tok.convert_tokens_to_ids
    letters = [tid(c) for c in string.ascii_lowercase]
    star, mask = tid("*"), tok.mask_token_id
    succ = dict(zip(letters, [*letters[1:], star]))
    succ.update({star: star, mask: star, tid("m"): tok.eos_token_id})
    succ.update(after or {})
    size = model.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, x in enumerate([*letters, star, mask]):
            emb[x] = basis[:, i]
            head[succ[x]] += 2.0 * basis[:, i]
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
    return model


def _fixed(loop: str) -> dict:
    """TPF assertions need the engine's block choices not to follow measured time."""
    return {"engine_kwargs": {"adaptive": False}} if loop == "fused" else {}


CHAIN_PROMPTS = ("abc", "hello p", "xx", "ijk")  # ends: EOS after m / the * run / * run / EOS


@pytest.mark.parametrize("loop", ["fused", "reference"])
def test_predictable_model_accepts_many_tokens(loop, tok, cache_probe, monkeypatch):
    compactions = []
    original = RowCache.maybe_compact

    def counting(self, force_check=False):
        done = original(self, force_check)
        compactions.append(done)
        return done

    monkeypatch.setattr(RowCache, "maybe_compact", counting)  # the reference loop's cache
    max_new = 40
    model = chain_model(tok, attn_scale=4.0)
    prompts = [tok(p)["input_ids"] for p in CHAIN_PROMPTS]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    eos = tok.eos_token_id
    hf = hf_greedy(model, ids, mask, max_new, [eos], tok.pad_token_id)
    assert [t[-1] == eos for t in hf] == [True, False, False, True]
    assert [len(t) for t in hf][1:3] == [max_new, max_new]
    head = _khead(model, k_max=8)
    for policy in ("fixed:4", "entropy", "khead"):
        out = generate(
            model,
            tok,
            ids,
            mask,
            policy=policy,
            loop=loop,
            max_new_tokens=max_new,
            khead=head,
            k_max=8,
            **_fixed(loop),
        )
        _assert_lossless(model, prompts, out.new_tokens, hf, f"chain/{loop}/{policy}")
        st = out.stats
        assert st.tpf > 1.0, (policy, st.to_dict())
        assert max(st.accept_hist) >= 3, st.accept_hist  # multi-token acceptance
        assert st.row_tpf(2) > st.row_tpf(0)  # ragged: the * row outpaces the alphabet row
        alone = generate(
            model,
            tok,
            torch.tensor([prompts[2]]),
            policy=policy,
            loop=loop,
            max_new_tokens=max_new,
            khead=head,
            k_max=8,
            **_fixed(loop),
        )
        assert alone.new_tokens[0] == out.new_tokens[2]
        if loop == "fused" and policy == "fixed:4":
            assert st.tpf > 1.5 and alone.stats.tpf >= 3.0, st.to_dict()
    if loop == "reference":
        assert any(compactions), "ragged accepts never triggered a cache compaction"


@pytest.mark.parametrize("loop", ["fused", "reference"])
def test_attention_dominated_model_ragged_accepts(loop, tok, cache_probe, record_property):
    max_new = 30
    model = chain_model(tok, attn_scale=20.0)
    prompts = [tok(p)["input_ids"] for p in CHAIN_PROMPTS]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    hf = hf_greedy(model, ids, mask, max_new, [tok.eos_token_id], tok.pad_token_id)
    accepted = set()
    for policy in ("fixed:4", "entropy", "ar"):
        out = generate(model, tok, ids, mask, policy=policy, loop=loop, max_new_tokens=max_new)
        _assert_lossless(
            model, prompts, out.new_tokens, hf, f"chain20/{loop}/{policy}", record_property
        )
        accepted |= set(out.stats.accept_hist)
    assert len(accepted) >= 3, accepted  # partial and full acceptance both occur


def test_the_reference_is_plain_greedy_whatever_the_checkpoint_asks(tok):
    """A checkpoint's generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05) must not
    reach the reference: the sampler commits the model's own argmax, and so does ``hf_greedy``
    — and the model's config is as it was afterwards."""
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in ("hello there", "abc", "the quick brown fox")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    eos = [tok.eos_token_id]
    plain = hf_greedy(model, ids, mask, 24, eos, tok.pad_token_id)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 2
    assert hf_greedy(model, ids, mask, 24, eos, tok.pad_token_id) == plain
    assert model.generation_config.repetition_penalty == 1.3  # restored
    ours = generate(model, tok, ids, mask, policy="ar", max_new_tokens=24).new_tokens
    assert not [d for d in compare(model, prompts, ours, plain) if not d.tie]
    penalized = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
    new = penalized[:, ids.shape[1] :].tolist()
    assert any(row[: len(p)] != p for row, p in zip(new, plain))  # the config does bite


def test_a_row_that_ended_first_is_reported_as_json_takes_it():
    import json

    from fluid_npu.sampling.lossless import Difference

    ended = Difference(row=0, index=3, ours=None, theirs=5, gap=float("inf"), tie=False)
    assert json.loads(json.dumps(ended.to_dict(), allow_nan=False))["gap"] is None


def test_padded_batches_read_as_transformers_reads_them(tok):
    """A left-padded batch without its mask (transformers infers it from the pad id), or as the
    lists a tokenizer returns without ``return_tensors`` (the mask given as a list): the same
    prompts, the same tokens as with the tensor mask."""
    from fluid_npu.sampling.inputs import PromptError

    model = build_tiny_model("llama", tok, seed=3)
    assert tok.pad_token_id not in (tok.eos_token_id,)
    prompts = [tok(t)["input_ids"] for t in ("hello there", "abc")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    want = generate(model, tok, ids, mask, policy="ar", max_new_tokens=8).new_tokens
    hf = hf_greedy(model, ids, mask, 8, [tok.eos_token_id], tok.pad_token_id)
    assert not [d for d in compare(model, prompts, want, hf) if not d.tie]
    assert generate(model, tok, ids, policy="ar", max_new_tokens=8).new_tokens == want
    lists = generate(model, tok, ids.tolist(), mask.tolist(), policy="ar", max_new_tokens=8)
    assert lists.new_tokens == want
    with pytest.raises(PromptError, match="shape"):
        generate(model, tok, ids, mask[:, 1:], policy="ar", max_new_tokens=8)
    with pytest.raises(PromptError, match="different lengths"):
        generate(model, tok, prompts, [[1] * len(p) for p in prompts], max_new_tokens=8)


def test_report_ties():
    """Prints the numerical ties the module tolerated (runs last in file order)."""
    print(f"sampler lossless tests: {len(TIES)} tolerated numerical tie(s)")
    for t in TIES:
        print("  ", t)
    assert all(t["gap"] <= 1e-4 for t in TIES)
