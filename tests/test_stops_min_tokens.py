"""Stop strings under ``min_tokens`` and with ``include_stop``: the engine's cut (``stops.py``) and
the server's text (``detok.Detokenizer``) against one definition, vLLM's (its detokenizer, vLLM
#22014): no stop string ends the output before ``min_tokens`` tokens, and a match counts only
where it ends after the text of the first ``min_tokens`` tokens."""

from __future__ import annotations

import pytest

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.detok import Detokenizer
from fluid_npu.sampling.requests import Request, Slot
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Scheduler

CASES = [  # (output text, stop strings)
    ("one two. one two. three", [". o", "two"]),
    ("ab日本cd日本ef", ["日本"]),  # a character of several byte-level tokens
    ("xxaxxbxx", ["xa", "xxb", "q"]),
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture(scope="module")
def sched(tok):
    model = build_tiny_model("llama", tok, seed=3)
    return Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, tokenizer=tok)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, prompt, stream, stops, least, include=False):
    """vLLM's rule written out: the first token count past ``least`` whose text holds a stop
    string ending after the first ``least`` tokens' text, and the text the output keeps."""
    decode = lambda ids: tok.decode([*prompt, *ids])[len(tok.decode(prompt)) :]  # noqa: E731
    floor = len(decode(stream[:least]).rstrip("\ufffd")) if least else 0
    for n in range(least + 1, len(stream) + 1):
        text = decode(stream[:n])
        found = [(at, at + len(s)) for s in stops for at in range(len(text))
                 if text.startswith(s, at) and at + len(s) > floor]  # fmt: skip
        if found:
            start, end = min(found, key=lambda m: (m[1], m[0])) if include else min(found)
            return n, text[:end] if include else text[:start]
    return None, decode(stream)


def engine_cut(sched, prompt, stream, stops, least, step):
    slot = Slot(Request("0", prompt, 100, stop=stops), prompt, SamplingParams(min_tokens=least))
    for i in range(0, len(stream), step):  # the tokens each step commits
        toks = stream[i : i + step]
        n = sched._stop_cut(slot, toks)
        if n is not None:
            return len(slot.new) + n
        slot.new.extend(toks)
    return None


@pytest.mark.parametrize(("text", "stops"), CASES)
def test_min_tokens_holds_stop_strings_back_as_vllm_in_engine_and_text(tok, sched, text, stops):
    """For every ``min_tokens``: the engine keeps the tokens through the one that completes the
    first stop string that counts, however the steps fall, and the server's text ends before it
    (after it with ``include_stop``), streamed in pieces or not."""
    prompt, stream = _ids(tok, "Q:"), _ids(tok, text)
    for least in range(len(stream) + 1):
        for include in (False, True):
            cut, want = expected(tok, prompt, stream, stops, least, include)
            for step in (1, 3):
                assert engine_cut(sched, prompt, stream, stops, least, step) == cut, (least, step)
                d = Detokenizer(tok, stops, prompt, min_tokens=least, include_stop=include)
                got = "".join(d.add(stream[i : i + step]) for i in range(0, len(stream), step))
                got += d.flush()
                assert (got, d.stopped) == (want, cut is not None), (least, include, step)
                assert d.tokens_used == (cut or len(stream))


def test_what_min_tokens_lets_through(tok, sched):
    """The three cases a user meets: a stop string wholly within the first ``min_tokens`` tokens
    does not end the request, one that began there and ends later does, one later does."""
    prompt, stream = _ids(tok, "Q:"), _ids(tok, "one two. one two. three")
    cases = [  # (stops, min_tokens, text kept)
        (["two"], 0, "one "),
        (["two"], 7, "one two. one "),  # "two" is the 5th-7th tokens: within, skipped
        (["two"], 6, "one "),  # ... began within the first 6, ends with the 7th: it counts
        (["one"], 23, "one two. one two. three"),  # never past min_tokens: no stop
    ]
    for stops, least, want in cases:
        d = Detokenizer(tok, stops, prompt, min_tokens=least)
        assert d.add(stream) + d.flush() == want, (stops, least)
        cut = engine_cut(sched, prompt, stream, stops, least, 1)
        assert cut == (None if want == tok.decode(stream) else len(_ids(tok, want)) + 3)


def test_include_stop_keeps_the_stop_string_and_holds_nothing_back(tok):
    stream = _ids(tok, "one two. three")
    d = Detokenizer(tok, [". t", "zz"], include_stop=True)
    pieces = [d.add([t]) for t in stream]
    assert "".join(pieces) + d.flush() == "one two. t" and d.stopped
    assert pieces[:4] == ["o", "n", "e", " "]  # streamed as decoded: no tail held back
    d = Detokenizer(tok, ["two. three", "o."], include_stop=True)
    assert d.add(stream) == "one two."  # (one step) the first stop string to be complete
    d = Detokenizer(tok, ["two. three", "o."])
    assert d.add(stream) == "one tw" and d.tokens_used == len(_ids(tok, "one two."))


def test_min_tokens_holds_eos_back_under_ignore_eos_as_vllm(tok):
    """vLLM holds the model's EOS back before ``min_tokens`` even where EOS ends nothing
    (``ignore_eos``): ``Request.min_tokens_hold``, which the server and ``LLM`` pass then. On the
    chain model ("abc" -> "defghijklm", then EOS), EOS comes as the 11th token without it."""
    from test_sampling_lossless import chain_model

    from fluid_npu.sampling.offline import run_requests

    model = chain_model(tok, attn_scale=4.0)
    eos = tok.eos_token_id
    abc = tok("abc")["input_ids"]
    params = SamplingParams(min_tokens=15)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[eos],
                      k_max=4, adaptive=False)  # fmt: skip
    out = run_requests(sched, [
        Request("free", abc, 20, eos_ids=[], sampling=params),  # (ignore_eos alone)
        Request("held", abc, 20, eos_ids=[], sampling=params, min_tokens_hold=[eos]),
    ])  # fmt: skip
    assert out["free"].tokens.index(eos) == 10
    held = out["held"].tokens
    assert eos not in held[:15] and len(held) == 20 and held[:10] == out["free"].tokens[:10]
