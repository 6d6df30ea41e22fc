"""Structured output in the decode engine (``sampling/grammar.py``): a constrained request's tokens
are exactly AR decoding under its grammar (the argmax of the masked logits, step by step), its text
follows the grammar, and the requests batched with it keep their own tokens and their drafts."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from test_sampling_dtype import _overflowing
from test_sampling_lossless import chain_model

from fluid_npu.errors import ConfigError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.grammar import (
    GrammarCompiler,
    GrammarError,
    allowed_tokens,
    bitmasks,
    unpack,
    valid_prefix,
)
from fluid_npu.sampling.lossless import hf_greedy
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Request, Scheduler

COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
PROMPTS = ("hello world", "the quick brown fox", "a", "over the lazy dog")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model("llama", tok, seed=7)


@pytest.fixture(scope="module")
def compiler(tok, model):
    return GrammarCompiler(tok, model.config.vocab_size, [tok.eos_token_id])


def constrained_greedy(model, grammar, prompt: list[int], max_new: int, eos: int,
                       bias: dict[int, float] | None = None,
                       after: int | None = None) -> list[int]:  # fmt: skip
    """The reference: transformers' forward over the whole sequence each step, ``bias`` added
    and the grammar's mask (None: no grammar; with ``after``, once that token is out) on the
    last logits, their argmax (what ``generate`` with a bias and a grammar logits processor
    does)."""
    matcher = None if grammar is None else grammar.matcher([eos])
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            dev = next(model.parameters()).device
            logits = model(torch.tensor([ids], device=dev)).logits[0, -1].float().cpu()
            for t, b in (bias or {}).items():
                logits[t] += b
            held = matcher is not None and (after is None or after in out)
            if held:
                allowed = allowed_tokens([matcher], logits.shape[-1])[0]
                logits = logits.masked_fill(~allowed, -torch.inf)
            t = int(logits.argmax())
            assert not held or matcher.accept_token(t)
            out.append(t)
            ids.append(t)
            if t == eos:
                break
    return out


def _engine(model, tok, policy: str = "fixed:3", **kw) -> Scheduler:
    return Scheduler(model, tok.mask_token_id, policy=policy, k_max=4, max_batch=4,
                     eos_ids=[tok.eos_token_id], tokenizer=tok, **kw)  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "spec", "check"),
    [
        ("json", COLOR, lambda text: json.loads(text)["color"] in ("red", "green", "blue")),
        ("regex", r"[a-f]{2}-\d{3}", lambda text: re.fullmatch(r"[a-f]{2}-\d{3}", text)),
        ("choice", ["yes", "no", "maybe so"], lambda text: text in ("yes", "no", "maybe so")),
        ("grammar", 'root ::= "x" ("y" | "z")*', lambda text: re.fullmatch("x[yz]*", text)),
    ],
)  # fmt: skip
def test_a_constrained_request_is_ar_decoding_under_its_grammar(tok, model, compiler, kind,
                                                                  spec, check):  # fmt: skip
    grammar = compiler.compile(kind, spec, any_whitespace=False)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    eos = tok.eos_token_id
    sched = _engine(model, tok)
    # the constrained request between free ones that draft (fixed:3), all in one batch
    reqs = [Request(str(i), p, 24, grammar=grammar if i == 1 else None)
            for i, p in enumerate(prompts)]  # fmt: skip
    out = run_requests(sched, reqs)
    ours = out["1"][0]
    assert ours == constrained_greedy(model, grammar, prompts[1], 24, eos)
    if ours[-1] == eos:  # the grammar's text is whole: it ended with EOS
        assert check(tok.decode(ours[:-1])), tok.decode(ours)
    free = [hf_greedy(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 24,
                      [eos], 0)[0] for p in prompts]  # fmt: skip
    for i in (0, 2, 3):
        assert out[str(i)][0] == free[i], i
    assert sched.num_running == 0


def test_grammars_and_a_logit_bias_share_a_batch(tok, model, compiler):
    """Rows biased, constrained, both and neither in one batch: each is its own reference (the
    step adjusts the biased and the constrained rows' logits together)."""
    grammar = compiler.compile("regex", r"[a-z]{3,12}")
    bias = {tok.convert_tokens_to_ids("e"): 8.0, tok.convert_tokens_to_ids("q"): 5.0}
    pairs = list(bias.items())
    eos = tok.eos_token_id
    rows = [(None, None), (grammar, None), (None, bias), (grammar, bias)]
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    reqs = [Request(str(i), prompts[i], 16, grammar=g,
                    sampling=SamplingParams(logit_bias=pairs) if b else None)
            for i, (g, b) in enumerate(rows)]  # fmt: skip
    out = run_requests(_engine(model, tok), reqs)
    for i, (g, b) in enumerate(rows):
        assert out[str(i)][0] == constrained_greedy(model, g, prompts[i], 16, eos, b), i


def test_json_object_and_a_schema_end_with_whole_json(tok, model, compiler):
    """A random model, its argmax held to the grammar: with room enough it writes the text out."""
    sched = _engine(model, tok)
    prompt = tok("hello world")["input_ids"]
    grammar = compiler.compile("json", COLOR, any_whitespace=False)
    out = run_requests(sched, [Request("s", prompt, 40, grammar=grammar)])["s"][0]
    assert out[-1] == tok.eos_token_id
    value = json.loads(tok.decode(out[:-1]))
    assert set(value) == {"color", "ok"} and isinstance(value["ok"], bool)
    grammar = compiler.compile("json_object", None)
    text_ids = run_requests(sched, [Request("o", prompt, 24, grammar=grammar)])["o"][0]
    assert tok.decode(text_ids).lstrip().startswith("{")


def test_a_grammar_pickled_for_an_engine_process_decodes_the_same(
    tok, model, compiler, monkeypatch
):
    """A grammar crosses to an engine in another process as xgrammar's serialised form, rebuilt
    there against that process's tokenizer tables (``receive_into``): the same tokens."""
    from fluid_npu.sampling import grammar as grammars

    monkeypatch.setattr(grammars, "_RECEIVER", {})
    grammar = compiler.compile("json", COLOR, any_whitespace=False)
    blob = pickle.dumps(Request("s", [1, 2], 40, grammar=grammar))
    with pytest.raises(GrammarError, match="engine's process"):
        pickle.loads(blob)  # (no tables here: nothing to rebuild it against)
    grammars.receive_into(tok, model.config.vocab_size, [tok.eos_token_id])
    sent = pickle.loads(blob)
    assert sent.grammar is not grammar and sent.grammar.kind == "json"
    prompt = tok("hello world")["input_ids"]
    want = run_requests(_engine(model, tok), [Request("s", prompt, 40, grammar=grammar)])
    got = run_requests(_engine(model, tok), [Request("s", prompt, 40, grammar=sent.grammar)])
    assert got["s"][0] == want["s"][0]
    assert json.loads(tok.decode(got["s"][0][:-1]))["color"] in ("red", "green", "blue")


def test_a_sampled_constrained_request_follows_its_grammar(tok, model, compiler):
    grammar = compiler.compile("regex", r"(ab|cd){2,5}")
    sched = _engine(model, tok, policy="entropy:4")
    reqs = [
        Request(f"r{n}", tok("xyz")["input_ids"], 16, grammar=grammar,
                sampling=SamplingParams(temperature=1.0, seed=n))
        for n in range(3)
    ]  # fmt: skip
    for n, (toks, *_) in run_requests(sched, reqs).items():
        text = tok.decode(toks[:-1] if toks[-1] == tok.eos_token_id else toks)
        assert re.fullmatch(r"(ab|cd){0,5}(a|c)?", text), (n, text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holding_back_the_only_eos_ends_the_text_as_stop(tok, model, compiler,
                                                                     temperature):  # fmt: skip
    """A complete text whose only next token, EOS, ``min_tokens`` holds back: greedy (the argmax
    is refused) or sampling (nothing to draw), the request ends there as "stop", its
    log-probabilities as many as its tokens."""
    grammar = compiler.compile("choice", ["yes"])
    sched = _engine(model, tok)
    params = SamplingParams(min_tokens=6, temperature=temperature, seed=3, logprobs=True,
                            top_logprobs=2)  # fmt: skip
    events = []
    sched.submit(Request("m", tok("a")["input_ids"], 12, grammar=grammar, sampling=params))
    while sched.has_work():
        events += sched.step()
    assert tok.decode([t for e in events for t in e.tokens]) == "yes"
    assert events[-1].finished and events[-1].finish_reason == "stop"
    for e in events:
        assert len(e.logprobs) == len(e.top_logprobs) == len(e.tokens), e


def test_bad_specs_and_requests_are_clear_errors(tok, model, compiler):
    with pytest.raises(GrammarError, match="JSON schema does not compile: Unsupported type"):
        compiler.compile("json", {"type": "nonsense"})
    with pytest.raises(GrammarError, match=r"regular expression does not compile: .*parenthesis"):
        compiler.compile("regex", "(ab")
    # keywords xgrammar would drop silently: refused, as vLLM refuses them
    for schema, says in (
        ({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}},
         "multipleOf"),
        ({"items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "integer", "not": {"const": 3}}, "not"),
        ({"type": "string", "format": "color"}, "format 'color'"),
        ({"anyOf": [{"type": "string", "pattern": "a+", "maxLength": 3}]}, "pattern / format"),
    ):  # fmt: skip
        with pytest.raises(GrammarError, match=f"uses {says}.*drop silently"):
            compiler.compile("json", schema)
    for fine in (  # what xgrammar honours, and names or data that only look like keywords
        {"type": "string", "format": "email"},
        {"type": "integer", "multipleOf": 2},
        {"type": "object", "properties": {"not": {"type": "integer"}, "format": {"type": "string"}},
         "default": {"type": "string", "format": "whatever"}},
    ):  # fmt: skip
        assert compiler.compile("json", fine).kind == "json"
    with pytest.raises(GrammarError, match="NUL character"):
        compiler.compile("regex", "a\x00")
    with pytest.raises(GrammarError, match=r"regular expression accepts no text"):
        compiler.compile("regex", r"[^\s\S]")
    assert compiler.compile("regex", "").kind == "regex"  # the empty text: EOS at once
    with pytest.raises(GrammarError, match="non-empty texts"):
        compiler.compile("choice", ["a", ""])
    with pytest.raises(GrammarError, match="unknown grammar kind 'xml'"):
        compiler.compile("xml", "<a/>")
    sched = _engine(model, tok)
    other = GrammarCompiler(tok, model.config.vocab_size + 5).compile("regex", "a+")
    with pytest.raises(ConfigError, match=r"compiled for .* logits"):
        sched.submit(Request("v", [1, 2], 4, grammar=other))
    with pytest.raises(ConfigError, match="no EOS id"):
        sched.submit(Request("e", [1, 2], 4, grammar=compiler.compile("regex", "a+"), eos_ids=[]))


def test_a_constrained_request_in_bfloat16_is_the_bfloat16_reference(tok):
    """A Qwen3 in bfloat16 (its logits masked in the model's dtype's argmax): the engine, batched
    with drafting rows, commits what the one-sequence reference commits."""
    model = build_tiny_model("qwen3", tok, seed=7).to(torch.bfloat16)
    grammar = GrammarCompiler(tok, model.config.vocab_size).compile(
        "json", COLOR, any_whitespace=False
    )
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    reqs = [Request(str(i), p, 40, grammar=grammar if i % 2 else None)
            for i, p in enumerate(prompts)]  # fmt: skip
    out = run_requests(_engine(model, tok), reqs)
    for i in (1, 3):
        ours = out[str(i)][0]
        assert ours == constrained_greedy(model, grammar, prompts[i], 40, tok.eos_token_id)
        assert json.loads(tok.decode(ours[:-1]))["color"] in ("red", "green", "blue")


def test_text_the_grammar_forces_is_drafted_and_commits_in_few_steps(tok, model, compiler):
    """The keys and punctuation a schema forces are the row's drafts (jump-forward tokens),
    verified like any: the same tokens as plain AR decoding under the grammar, in far fewer
    forwards (``ar`` takes one per token; the entropy policy's 16-slot blocks take a forced run
    at once)."""
    grammar = compiler.compile("json", COLOR, any_whitespace=False)
    prompt = tok("hello world")["input_ids"]
    want = constrained_greedy(model, grammar, prompt, 60, tok.eos_token_id)
    forwards = {}
    for policy in ("ar", "entropy"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=2,
                          eos_ids=[tok.eos_token_id], tokenizer=tok)  # fmt: skip
        assert run_requests(sched, [Request("a", prompt, 60, grammar=grammar)])["a"][0] == want
        forwards[policy] = sched.decode_forwards
    assert forwards["ar"] == len(want) and forwards["entropy"] * 5 <= len(want), forwards


@pytest.mark.parametrize("pattern", [r"[a-z*]{1,25}", r"yz\*{5}a[*]+"])
def test_a_constrained_row_takes_the_models_drafts_up_to_what_its_grammar_refuses(tok, pattern):
    """The chain Llama of test_sampling_lossless drafts its ``*`` runs right: under a grammar
    that allows them its drafts are taken (few forwards), and where the grammar forces another
    letter mid-run (``a`` after five stars) the drafts past it are not, and the masked argmax
    commits the letter. Both equal the one-sequence reference."""
    model = chain_model(tok, attn_scale=4.0)
    grammar = GrammarCompiler(tok, model.config.vocab_size).compile("regex", pattern)
    prompt = tok("xx")["input_ids"]
    want = constrained_greedy(model, grammar, prompt, 30, tok.eos_token_id)
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=2,
                      eos_ids=[tok.eos_token_id], tokenizer=tok)  # fmt: skip
    assert run_requests(sched, [Request("a", prompt, 30, grammar=grammar)])["a"][0] == want
    assert sched.decode_forwards * 4 <= len(want), (sched.decode_forwards, len(want))
    assert sum(sched.budget.verifies_by_len) > 0  # what the model's drafts earn is learned


def test_drafts_past_a_stop_token_end_at_it(tok, compiler):
    """A model's drafts may run past EOS (the demo's do): the grammar takes them up to the EOS
    and nothing after it (a terminated matcher takes no token), and the matcher is left as it
    was."""
    grammar = compiler.compile("choice", ["ab"])
    matcher = grammar.matcher([tok.eos_token_id])
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    drafts = [a, b, tok.eos_token_id, a, b]
    assert valid_prefix(matcher, drafts) == 3
    masks, taken = bitmasks([matcher], [drafts], 6, len(tok))
    assert taken == [3]  # up to and with the stop token
    allowed = unpack(masks, len(tok))[0]
    assert allowed[0].nonzero().flatten().tolist() == [a]
    assert allowed[2].nonzero().flatten().tolist() == [tok.eos_token_id]
    assert allowed[3].all()  # past the stop token: never committed, left open
    assert not matcher.is_terminated() and valid_prefix(matcher, drafts) == 3


def test_a_grammar_after_a_marker_holds_only_what_follows_it(tok):
    """``Request.grammar_after`` (a reasoning parser's closing marker): the tokens up to the
    marker are free (and drafted as any row's), the grammar holds the rest — in one batch with a
    row constrained from its start and a free one, greedy rows equal to the reference, a sampling
    row's answer within its grammar. The chain Llama runs ``d e f ...`` from ``abc``; ``g`` plays
    the marker."""
    model = chain_model(tok, attn_scale=4.0)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    marker = tok.convert_tokens_to_ids("g")
    eos = tok.eos_token_id
    ok = compiler.compile("choice", ["ok"])
    letters = compiler.compile("regex", "[a-z]{2,6}")
    prompt = tok("abc")["input_ids"]
    rows = [(ok, marker), (letters, None), (None, None), (letters, marker)]
    reqs = [Request(str(n), prompt, 20, grammar=g, grammar_after=m)
            for n, (g, m) in enumerate(rows)]  # fmt: skip
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=4, eos_ids=[eos],
                      tokenizer=tok)  # fmt: skip
    out = run_requests(sched, reqs)
    for n, (g, m) in enumerate(rows):
        assert out[str(n)][0] == constrained_greedy(model, g, prompt, 20, eos, after=m), n
    assert tok.decode(out["0"][0]) == "defgok</s>"
    # the marker accepted inside a run of drafts (the chain's stars): the step stops at it
    star = tok.convert_tokens_to_ids("*")
    xx = tok("xx")["input_ids"]
    run = run_requests(sched, [Request("r", xx, 20, grammar=ok, grammar_after=star)])["r"][0]
    assert tok.decode(run) == "yz*ok</s>" == tok.decode(
        constrained_greedy(model, ok, xx, 20, eos, after=star))  # fmt: skip
    # ... and with an EOS right after it in the same step (a short answer after reasoning): the
    # step ends at the marker, the EOS is not committed, the grammar holds what follows
    to_eos = chain_model(tok, attn_scale=4.0, after={star: eos})
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=3)
        sched_eos = Scheduler(to_eos, tok.mask_token_id, policy="fixed:3", max_batch=2,
                              eos_ids=[eos], tokenizer=tok)  # fmt: skip
        got = run_requests(sched_eos, [Request("e", xx, 20, grammar=ok, grammar_after=star,
                                               sampling=params)])["e"]  # fmt: skip
        assert tok.decode(got.tokens) == "yz*ok</s>" and got.final.finish_reason == "stop"
    sampled = Request("s", prompt, 20, grammar=ok, grammar_after=marker,
                      sampling=SamplingParams(temperature=1.0, seed=5))  # fmt: skip
    text = tok.decode(run_requests(sched, [sampled])["s"][0])
    assert text.endswith("gok</s>") or "g" not in text, text
    with pytest.raises(ConfigError, match="grammar_after names the token"):
        sched.submit(Request("x", prompt, 4, grammar_after=marker))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_overflow_under_a_grammar_is_an_error_even_when_the_text_is_complete(tok, temperature):
    """float16 numbers that broke end a constrained request as "error" — whose cache is not kept
    for reuse — though its grammar (``[a-z]*``) would take the text so far as complete."""
    model = _overflowing(tok, "Z")
    grammar = GrammarCompiler(tok, model.config.vocab_size).compile("regex", "[a-z]*")
    prompt = tok("a long request Z that overflows")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1,
                      eos_ids=[tok.eos_token_id], k_max=4)  # fmt: skip
    sched.submit(Request("z", prompt, 12, grammar=grammar,
                         sampling=SamplingParams(temperature=temperature, seed=1)))  # fmt: skip
    events = []
    while sched.has_work():
        events += sched.step()
    assert [e.finish_reason for e in events if e.finished] == ["error"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constrained_decoding_on_a_cuda_device(tok, dtype):
    """The masks unpacked and applied on the device, drafts read back and cut: the chain Llama on
    CUDA under grammars its drafts meet and one that overrides them, batched with a free row,
    equals the one-sequence reference on the same device."""
    model = chain_model(tok, attn_scale=4.0).to("cuda", dtype)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    eos = tok.eos_token_id
    xx = tok("xx")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=3, eos_ids=[eos],
                      tokenizer=tok)  # fmt: skip
    grammars = [compiler.compile("regex", p) for p in (r"[a-z*]{1,25}", r"yz\*{5}a[*]+")]
    reqs = [Request(str(n), xx, 30, grammar=g) for n, g in enumerate(grammars)]
    out = run_requests(sched, [*reqs, Request("free", xx, 30)])
    for n, g in enumerate(grammars):
        assert out[str(n)][0] == constrained_greedy(model, g, xx, 30, eos), n


def test_a_draw_the_grammar_leaves_nothing_ends_after_the_accepted_drafts(tok, model):
    """A sampling row whose accepted draft completes its text, where ``min_tokens`` holds back the
    EOS that alone could follow: the step commits the accepted draft and draws nothing — the
    request ends as "stop" with its whole text (as AR sampling ends it), not as an overflow."""
    eos = tok.eos_token_id
    grammar = GrammarCompiler(tok, model.config.vocab_size, [eos]).compile(
        "regex", "[a-z*]{2}[e-s]"
    )
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", k_max=4, max_batch=1,
                      eos_ids=[eos], tokenizer=tok, max_len=96)  # fmt: skip
    params = SamplingParams(temperature=5.0, seed=995895571, top_k=2, min_tokens=6)
    sched.submit(Request("r", tok("xx")["input_ids"], 12, grammar=grammar, sampling=params))
    events = []
    while sched.has_work():
        events += sched.step()
    text = tok.decode([t for e in events for t in e.tokens])
    assert events[-1].finish_reason == "stop" and events[-1].accepted == 1, events[-1]
    assert re.fullmatch("[a-z*]{2}[e-s]", text), text
