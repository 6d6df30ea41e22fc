"""vLLM's ``skip_special_tokens: false``: special tokens written in the text, in the stop-string
search (the server's and the engine's), an echoed token-id prompt and ``text_offset``; the EOS that
ends an output stays out unless ``include_stop_str_in_output``. Over the wire against the scripted
scheduler of ``test_serve_http.py`` (its script given a special token mid-output)."""

from __future__ import annotations

import httpx
import pytest
import test_serve_http as scripted
from test_serve_http import EOS, TOK, ScriptedScheduler, client, serving

from fluid_npu.model.tiny import build_tiny_model
from fluid_npu.sampling.detok import Detokenizer
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.requests import Request
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Scheduler
from fluid_npu.sampling.stops import stop_cut
from fluid_npu.serve.protocol import parse_chat, parse_completion

MASK = TOK.mask_token_id
WORDS = TOK("the quick brown fox jumps over", add_special_tokens=False)["input_ids"]
OUT = [*WORDS[:5], MASK, *WORDS[5:], EOS]  # "the q<mask>uick ..." then EOS


def _stream(detok: Detokenizer, tokens: list[int]) -> str:
    return "".join(detok.add([t]) for t in tokens) + detok.flush()


def test_the_field_reaches_the_request():
    assert parse_completion({"prompt": "a"}).sampling.skip_special
    assert parse_completion({"prompt": "a", "skip_special_tokens": True}).sampling.skip_special
    chat = {"messages": [{"role": "user", "content": "hi"}], "skip_special_tokens": False}
    assert not parse_chat(chat).sampling.skip_special


def test_the_detokenizer_writes_special_tokens_but_not_the_eos():
    written = TOK.decode(OUT[:-1], skip_special_tokens=False)
    assert "<mask>" in written
    assert _stream(Detokenizer(TOK, eos_ids=[EOS], skip_special=False), OUT) == written
    plain = _stream(Detokenizer(TOK, eos_ids=[EOS]), OUT)
    assert plain == TOK.decode(OUT, skip_special_tokens=True) and "<mask>" not in plain
    # a stop string in a special token's text: cut before it (after it with include_stop)
    cut = Detokenizer(TOK, ["<mask>"], eos_ids=[EOS], skip_special=False)
    assert _stream(cut, OUT) == written[: written.index("<mask>")] and cut.stopped
    assert cut.tokens_used == OUT.index(MASK) + 1
    kept = Detokenizer(TOK, ["<mask>"], eos_ids=[EOS], include_stop=True, skip_special=False)
    assert _stream(kept, OUT) == written[: written.index("<mask>") + len("<mask>")]
    assert not _stream(Detokenizer(TOK, ["<mask>"], eos_ids=[EOS]), OUT).count("<mask>")


def test_the_engine_finds_a_stop_string_in_special_tokens_where_asked():
    special = frozenset(TOK.all_special_ids)
    at = OUT.index(MASK)
    args = (TOK, special, WORDS[:2], OUT[2:], ["<mask>"])
    assert stop_cut(*args, skip_special=False) == at - 2 + 1  # kept through the mask
    assert stop_cut(*args) is None  # skipped: no such text
    # through the engine: a logit bias makes every token the mask (a special token)
    model = build_tiny_model("llama", TOK, seed=3)
    sched = Scheduler(model, MASK, policy="ar", max_batch=2, tokenizer=TOK)
    forced = SamplingParams(logit_bias=((MASK, 100.0),))
    reqs = [Request(str(skip), WORDS[:4], 6, sampling=forced, stop=["k><"], skip_special=skip)
            for skip in (True, False)]  # fmt: skip
    done = run_requests(sched, reqs)
    assert done["True"].tokens == [MASK] * 6 and done["True"].final.finish_reason == "length"
    # "<mask><mask>" holds "k><" once the second mask comes
    assert done["False"].tokens == [MASK] * 2 and done["False"].final.finish_reason == "stop"


@pytest.fixture
def special_script(monkeypatch):
    """The scripted answer with a special token mid-way (``script`` reads ``SCRIPT``)."""
    words = scripted.SCRIPT
    monkeypatch.setattr(scripted, "SCRIPT", [*words[:12], MASK, *words[12:]])
    return scripted.SCRIPT


def test_over_the_wire(special_script):
    prompt = TOK("a b", add_special_tokens=False)["input_ids"]
    want = scripted.script(prompt, 20, eos=True)
    assert MASK in want and want[-1] == EOS
    with serving(ScriptedScheduler()) as (url, _, _):
        c = client(url)
        off = c.completions.create(model="tiny", prompt=prompt, max_tokens=20)
        assert off.choices[0].text == TOK.decode(want, skip_special_tokens=True)
        body = {"model": "tiny", "prompt": [MASK, *prompt], "max_tokens": 20, "logprobs": 0,
                "echo": True, "skip_special_tokens": False}  # fmt: skip
        on = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        head = TOK.decode([MASK, *prompt], skip_special_tokens=False)
        echoed = scripted.script([MASK, *prompt], 20, eos=True)
        assert MASK in echoed and echoed[-1] == EOS
        assert on["text"] == head + TOK.decode(echoed[:-1], skip_special_tokens=False)
        lp = on["logprobs"]  # every token's text at its offset, the special ones included
        for tok, at in zip(lp["tokens"][:-1], lp["text_offset"][:-1]):
            assert on["text"][at : at + len(tok)] == tok
        # the stop string found in the special token's text, streamed and not
        for stream in (False, True):
            out = c.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=20,
                stop=["<mask>"],
                stream=stream,
                extra_body={"skip_special_tokens": False},
            )
            chunks = list(out) if stream else [out]
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            assert text == TOK.decode(want[: want.index(MASK)]) and reason == "stop"
        # with include_stop_str_in_output the EOS that ends it is written too, as vLLM does
        kept = c.completions.create(model="tiny", prompt=prompt, max_tokens=20, extra_body={
            "skip_special_tokens": False, "include_stop_str_in_output": True})  # fmt: skip
        assert kept.choices[0].text == TOK.decode(want, skip_special_tokens=False)
        assert kept.choices[0].text.endswith(TOK.eos_token)
        # the Responses route takes the fields as chat does (vLLM's ResponsesRequest has them)
        extra = {"skip_special_tokens": False, "include_stop_str_in_output": True}
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                         max_tokens=20, extra_body=extra)  # fmt: skip
        text = chat.choices[0].message.content
        assert TOK.decode([MASK]) in text and text.endswith(TOK.eos_token)
        r = c.responses.create(model="tiny", input="a", max_output_tokens=20, extra_body=extra)
        assert r.output_text == text
        plain = c.responses.create(model="tiny", input="a", max_output_tokens=20)
        assert (
            plain.output_text
            == c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=20
            )
            .choices[0]
            .message.content
        )
        assert TOK.decode([MASK]) not in plain.output_text
