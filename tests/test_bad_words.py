"""Bad words: token sequences a request never generates — vLLM's ``bad_words`` (matched in the
output only) and transformers' ``bad_words_ids`` (a sequence may begin in the prompt). Every
committed token is the argmax of the AR logits with each sequence's last token at ``-inf`` where
the text so far ends with the rest of it; position ``j`` of a verify reads the drafts before it,
so the chain model (whose drafts are accepted) is the test bed, beside unbanned requests."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from test_sampling_lossless import chain_model

from fluid_npu.errors import ConfigError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.penalties import Penalties
from fluid_npu.sampling.pretrained import FluidForCausalLM
from fluid_npu.sampling.rules import MAX_BAD_WORD_LEN, SamplingParams
from fluid_npu.sampling.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@torch.no_grad()
def banned_ar(model, prompt: list[int], n: int, words, in_prompt: bool = False) -> list[int]:
    """Plain AR decoding, one token a forward, each sequence's last token banned where the text
    before it (the output, or with ``in_prompt`` the prompt and the output) ends with the rest."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        text = seq if in_prompt else out
        for w in words:
            head = list(w[:-1])
            if len(head) <= len(text) and text[len(text) - len(head) :] == head:
                logits[w[-1]] = -math.inf
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def _engine(model, tok, batch: int) -> Scheduler:
    return Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=batch, eos_ids=[],
                     k_max=4, adaptive=False)  # fmt: skip


def test_banned_sequences_are_the_banned_ar_models_with_drafts_accepted(tok):
    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("hello p")["input_ids"]
    plain = banned_ar(model, prompt, 16, [])
    # one, two and three tokens, each from the plain output (so each would come), and a pair
    # that begins in the prompt (vLLM's reading: it needs a token of output before it)
    words = [(plain[3],), (plain[6], plain[7]), (plain[9], plain[10], plain[11]),
             (prompt[-1], plain[0])]  # fmt: skip
    cases = [words[:1], words[1:2], words[2:3], words[3:], words]
    for banned in cases:
        sched = _engine(model, tok, 3)
        reqs = [Request("banned", prompt, 16, sampling=SamplingParams(bad_words=banned)),
                Request("plain", prompt, 16),
                Request("penalised", prompt, 16,
                        sampling=SamplingParams(repetition_penalty=1.0001))]  # fmt: skip
        out = run_requests(sched, reqs)
        want = banned_ar(model, prompt, 16, banned)
        assert out["banned"].tokens == want, banned
        assert out["plain"].tokens == plain and out["penalised"].tokens == plain
        assert out["banned"].final.forwards < 16  # drafts were accepted around the bans
    # a sampled row draws from the banned distribution: a banned token never comes
    drawn = SamplingParams(temperature=2.0, seed=3, bad_words=[(t,) for t in plain[:6]])
    out = run_requests(_engine(model, tok, 1), [Request("drawn", prompt, 24, sampling=drawn)])
    assert not set(out["drawn"].tokens) & set(plain[:6]) and len(out["drawn"].tokens) == 24
    assert banned_ar(model, prompt, 16, words[3:]) == plain  # (output only: the pair never met)
    assert banned_ar(model, prompt, 16, words[1:2]) != plain  # (the others bite)


def test_a_moved_request_keeps_its_last_tokens_and_later_longer_words_fit(tok):
    """A banned request moving down a slot (the one below it ended) keeps its recent tokens, and
    a request with longer sequences than the engine has held grows the buffers without
    disturbing the running one."""
    model = chain_model(tok, attn_scale=4.0)
    xx, hello = tok("xx")["input_ids"], tok("hello p")["input_ids"]
    plain_hello = banned_ar(model, hello, 16, [])
    short_word = ((plain_hello[4], plain_hello[5]),)
    long_word = ((plain_hello[8], plain_hello[9], plain_hello[10], plain_hello[11]),)
    sched = _engine(model, tok, 2)
    out = run_requests(sched, [
        Request("short", xx, 2),
        Request("a", hello, 16, sampling=SamplingParams(bad_words=short_word)),
        Request("b", hello, 16, sampling=SamplingParams(bad_words=long_word)),
    ])  # fmt: skip
    assert out["a"].tokens == banned_ar(model, hello, 16, short_word)
    assert out["b"].tokens == banned_ar(model, hello, 16, long_word) != plain_hello


def test_each_verify_position_reads_the_drafts_before_it(tok):
    """``Penalties.apply`` on crafted drafts: position ``j`` bans what the committed tokens and
    drafts ``d_0 … d_{j−1}`` complete, as the reference does on that text."""
    pen = Penalties(slots=2, vocab=50, device=torch.device("cpu"))
    words = ((7,), (3, 4), (1, 2, 3, 9), (5, 3, 4, 8))
    pen.admit(1, [5, 1], SamplingParams(bad_words=words, bad_words_in_prompt=True))
    pen.commit(torch.tensor([1]), torch.tensor([[0, 0], [2, 0]]), torch.tensor([0, 1]))
    drafts = torch.tensor([[3, 4, 1, 2]])
    logits = pen.apply(torch.zeros(1, 5, 50), drafts, torch.tensor([4]), torch.tensor([1]),
                       torch.tensor([1]), torch.tensor([[-1]]))  # fmt: skip
    text = [5, 1, 2]  # the prompt (read: bad_words_in_prompt) and the one committed token
    for j in range(5):
        seen = text + drafts[0, :j].tolist()
        want = {w[-1] for w in words
                if seen[len(seen) - len(w) + 1 :] == list(w[:-1])}  # fmt: skip
        got = set(torch.nonzero(logits[0, j] == -math.inf).flatten().tolist())
        assert got == want, (j, seen)
    assert {4, 9} <= set().union(*(set(torch.nonzero(logits[0, j] == -math.inf).flatten()
                                       .tolist()) for j in range(5)))  # fmt: skip


def test_bad_words_ids_decode_as_transformers_generate(tok):
    """``FluidForCausalLM.generate(bad_words_ids=...)`` (and a generation config's) is
    transformers' ``NoBadWordsLogitsProcessor`` decoding: sequences may begin in the prompt, a
    one-token EOS sequence is dropped."""
    from transformers import GenerationConfig

    model = build_tiny_model("llama", tok, seed=3)
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    plain = model.generate(ids, **kw)[0, ids.shape[1] :].tolist()
    plain = plain + [tok.eos_token_id] * (20 - len(plain))
    last = int(ids[0, -1])
    words = [[plain[2]], [plain[5], plain[6]], [last, plain[0]], [tok.eos_token_id]]
    want = model.generate(ids, bad_words_ids=words, **kw)
    assert want[0, ids.shape[1] :].tolist()[:1] != plain[:1]  # the prompt-spanning pair bites
    got = fluid.generate(ids, policy="fixed:3", bad_words_ids=words, max_new_tokens=20,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    assert got.tolist() == want.tolist()
    config = GenerationConfig(bad_words_ids=words, max_new_tokens=20)
    assert fluid.generate(ids, generation_config=config, policy="fixed:3",
                          eos_token_id=tok.eos_token_id).tolist() == want.tolist()  # fmt: skip


def test_bad_words_are_checked(tok):
    for bad in ([()], [(1, -2)], [("a",)], (1, 2), [(True,)]):
        with pytest.raises(ConfigError, match="bad_words takes non-empty sequences"):
            SamplingParams(bad_words=bad)
    with pytest.raises(ConfigError, match=f"up to {MAX_BAD_WORD_LEN} tokens each"):
        SamplingParams(bad_words=[tuple(range(MAX_BAD_WORD_LEN + 1))])
    assert SamplingParams(bad_words=[[1, 2], (1, 2)]).bad_words == ((1, 2),)
    assert SamplingParams(bad_words=[(1,)]).adjusted
    model = build_tiny_model("llama", tok, seed=3)
    sched = _engine(model, tok, 1)
    with pytest.raises(ConfigError, match="bad_words token 99999 is outside the vocabulary"):
        sched.submit(Request("x", [5, 6], 3, sampling=SamplingParams(bad_words=[(1, 99999)])))


class _WordTokenizer:
    """Words as one token each, a word after a space as another (GPT-2's "Ġword"), except
    "rare", which after a space is two tokens (the space alone, then the word)."""

    vocab: ClassVar[dict[str, int]] = {
        "hello": 5,
        " hello": 6,
        "world": 7,
        " world": 8,
        "rare": 9,
        " ": 10,
    }

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert not add_special_tokens
        ids, rest = [], text
        while rest:
            word = min((w for w in self.vocab if rest.startswith(w)), key=lambda w: -len(w))
            ids.append(self.vocab[word])
            rest = rest[len(word) :]
        return {"input_ids": ids}


def test_the_server_tokenizes_bad_words_as_vllm_and_refuses_bad_ones():
    import httpx
    from test_serve_http import TOK, ScriptedScheduler, serving

    from fluid_npu.serve.errors import APIError
    from fluid_npu.serve.token_fields import bad_word_ids

    words = _WordTokenizer()
    # each word at the text's start and after a space (the word-start spelling, same count);
    # "rare" after a space spells with the space token first, so only its bare form is banned
    assert bad_word_ids(words, ["hello", "  hello world", "rare"]) == (
        (5,), (6,), (5, 8), (6, 8), (9,))  # fmt: skip
    with pytest.raises(APIError, match=r"bad_words\[1\] is empty"):
        bad_word_ids(words, ["hello", "  "])
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json={**body, "bad_words": ["ab", " c"]})
        assert r.status_code == 200, r.text
        sent = sched.requests[-1].sampling.bad_words
        assert sent == (tuple(TOK("ab", add_special_tokens=False)["input_ids"]),
                        tuple(TOK("c", add_special_tokens=False)["input_ids"]))  # fmt: skip
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "bad_words": ["xy"]}  # fmt: skip
        r = httpx.post(f"{url}/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        want = tuple(TOK("xy", add_special_tokens=False)["input_ids"])
        assert sched.requests[-1].sampling.bad_words == (want,)
        for bad in ([""], "ab", [1], ["x" * 200], ["a"] * 300):
            r = httpx.post(f"{url}/v1/completions", json={**body, "bad_words": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", (bad, r.text)


def test_a_short_prompt_still_seeds_the_window_and_unused_buffers_go(tok):
    """transformers' reading with a prompt shorter than the longest sequence held: the window
    holds the whole prompt (right-aligned); once no running request has bad words the engine
    drops the buffers (its steps skip the comparison); allowed tokens all banned is refused."""
    pen = Penalties(slots=2, vocab=50, device=torch.device("cpu"))
    pen.admit(0, [1, 2, 3, 4, 5, 6], SamplingParams(bad_words=((1, 2, 3, 4, 5),)))  # L = 4
    pen.admit(1, [6, 7, 5], SamplingParams(bad_words=((7, 5, 9),), bad_words_in_prompt=True))
    assert pen.tail[1].tolist() == [-2, 6, 7, 5]
    logits = pen.apply(torch.zeros(1, 1, 50), torch.zeros(1, 0, dtype=torch.long),
                       torch.tensor([0]), torch.tensor([1]), torch.tensor([0]),
                       torch.tensor([[-1]]))  # fmt: skip
    assert torch.nonzero(logits[0, 0] == -math.inf).flatten().tolist() == [9]
    pen.move(0, 1)  # (compaction: the request in slot 1 moves down)
    pen.release(1)
    assert pen.bad_last is not None  # (slot 0 still runs one)
    pen.admit(0, [5], SamplingParams(repetition_penalty=1.2))
    assert pen.banning == set() and pen.bad_last is None and pen.tail is None
    model = chain_model(tok, attn_scale=4.0)
    hi = tok("hello")["input_ids"]  # (shorter than the other request's longest: 10 tokens)
    words = [hi + banned_ar(model, hi, 1, [])]  # the whole prompt, then its first token
    sched = _engine(model, tok, 2)
    out = run_requests(sched, [
        Request("long", tok("hello p")["input_ids"], 4, sampling=SamplingParams(
            bad_words=[tuple(range(60, 70))])),
        Request("short", hi, 4, sampling=SamplingParams(bad_words=words,
                                                        bad_words_in_prompt=True)),
    ])  # fmt: skip
    assert out["short"].tokens == banned_ar(model, hi, 4, words, in_prompt=True)
    assert out["short"].tokens[0] != banned_ar(model, hi, 1, [])[0]
    assert sched.penalties.bad_last is None  # (both ended)
    with pytest.raises(ConfigError, match="leave no token to generate"):
        SamplingParams(allowed_token_ids=(3, 4), bad_words=[(3,), (4,), (5, 6)])


def test_a_row_left_no_token_ends_as_stop_with_what_came_before(tok):
    """Adjustments that leave no token at a position (every allowed pair banned after the first
    token; EOS the only allowed token but held back by ``min_tokens``): nothing there is the
    model's, so the row ends there as "stop" — greedy (no argmax of nothing: token 0) or drawn."""
    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("hello p")["input_ids"]
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    pairs = [(x, y) for x in (a, b) for y in (a, b)]
    eos = tok.eos_token_id
    cases = {
        "pairs": dict(allowed_token_ids=(a, b), bad_words=pairs),
        "eos": dict(allowed_token_ids=(eos,), min_tokens=3),
    }
    for name, kw in cases.items():
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, seed=1, **kw)
            sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2,
                              eos_ids=[eos], k_max=4, adaptive=False)  # fmt: skip
            out = run_requests(sched, [Request("x", prompt, 8, sampling=params),
                                       Request("free", prompt, 8)])  # fmt: skip
            got = out["x"]
            assert got.final.finish_reason == "stop", (name, temperature)
            if name == "pairs":
                assert len(got.tokens) == 1 and got.tokens[0] in (a, b), got.tokens
            else:
                assert got.tokens == [], got.tokens
            assert out["free"].tokens == banned_ar(model, prompt, 8, [])[: len(out["free"].tokens)]
