"""``fluid serve`` end to end: real server processes on 127.0.0.1 at free ports, started and stopped
here, the real scheduler and model, driven by the official ``openai`` client.

The model is the constructed "chain" Llama of ``test_sampling_lossless`` (each letter predicts the
next, ``m`` predicts EOS, ``*`` repeats): its drafts are accepted, so responses carry several
tokens per step, and its margins are wide, so greedy outputs have no near-ties. Every served output
must equal the offline one (``fluid generate`` / ``FluidForCausalLM.generate``).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from test_sampling_lossless import chain_model

from fluid_npu.cli import main
from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.serve.launch import ServerProcess

KEY = "test-key"
MAX_LEN = 160
PROMPTS = [
    "abc", "hello p", "xx", "ijk", "q", "defgh", "the quick brown fox", "zz top", "lazy dog",
    "stuv", "a b c", "nop", "wxy", "jumps over", "k", "fgh ij",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tiny_tokenizer(mask_token=True)
    model = chain_model(tok, attn_scale=4.0)
    path = tmp_path_factory.mktemp("serve-chain") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    # fixed blocks (--no-adaptive-drafting): the TPF asserted below must not follow step timings;
    # two prefix-cache rows: every served output below goes through the pool's copies too
    args = ["--model", model_dir, "--max-batch", "8", "--max-len", str(MAX_LEN), "--api-key", KEY,
            "--no-adaptive-drafting", "--prefix-cache-slots", "2",
            "--enable-log-requests"]  # fmt: skip
    with ServerProcess(args) as proc:
        yield proc
    assert proc.returncode == 0, proc.log_tail()


def offline(
    model_dir, tmp_path, prompts, max_new: int, chat: bool = False, extra: tuple[str, ...] = ()
) -> list[dict]:
    """``fluid generate --prompts`` rows (text, token_ids, ...) for ``prompts``."""
    tag = f"{max_new}{chat}{abs(hash(extra))}"
    src, out = tmp_path / f"in{tag}.jsonl", tmp_path / f"out{tag}.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    argv = ["generate", "--model", model_dir, "--prompts", str(src), "--output", str(out),
            "--max-new-tokens", str(max_new), "--batch-size", "4", *extra]  # fmt: skip
    assert main([*argv, "--chat"] if chat else argv) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_completion_chat_and_streams_equal_fluid_generate(server, model_dir, tmp_path):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    model = c.models.list().data[0].id
    want = offline(model_dir, tmp_path, PROMPTS[:4], 40)
    tpf = []
    for prompt, row in zip(PROMPTS[:4], want):
        out = c.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0)
        tpf.append(out.usage.model_extra["tpf"])
        assert out.choices[0].text == row["text"], prompt
        assert out.usage.completion_tokens == len(row["token_ids"])
        streamed = c.completions.create(
            model=model, prompt=prompt, max_tokens=40, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].text for ch in streamed) == row["text"]
    assert max(tpf) > 1.5  # drafts were accepted: several tokens per forward
    logged = server.log_tail(100_000)  # (--enable-log-requests: a line per request)
    assert f"fluid: {out.id} /v1/completions " in logged and "generated=" in logged

    chat_want = offline(model_dir, tmp_path, ["abc"], 30, chat=True)[0]
    messages = [{"role": "user", "content": "abc"}]
    reply = c.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0)
    assert reply.choices[0].message.content == chat_want["text"]
    chunks = list(
        c.chat.completions.create(
            model=model, messages=messages, max_tokens=30, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat_want["text"]
    assert chunks[-1].usage.completion_tokens == len(chat_want["token_ids"])
    # the Responses API decodes the same conversation to the same tokens, streamed or not
    answer = c.responses.create(model=model, input="abc", max_output_tokens=30, temperature=0)
    assert answer.output_text == chat_want["text"]
    cut = reply.choices[0].finish_reason == "length"
    assert answer.status == ("incomplete" if cut else "completed")
    assert answer.usage.output_tokens == len(chat_want["token_ids"])
    with c.responses.stream(model=model, input=messages, max_output_tokens=30, temperature=0) as s:
        streamed = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert streamed == chat_want["text"]


def test_32_concurrent_streaming_clients_each_equal_offline(server, model_dir, tmp_path):
    lengths = (12, 50)
    want = {n: offline(model_dir, tmp_path, PROMPTS, n) for n in lengths}
    jobs = [(PROMPTS[i % len(PROMPTS)], lengths[(i // len(PROMPTS)) % 2]) for i in range(32)]

    async def one(client: openai.AsyncOpenAI, prompt: str, n: int) -> tuple[str, str, int]:
        text, reason, tokens = "", None, -1
        stream = await client.completions.create(
            model="model", prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, reason, tokens

    async def run() -> list[tuple[str, str, int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in jobs))

    results = asyncio.run(run())
    assert len(results) == 32
    for (prompt, n), (text, reason, tokens) in zip(jobs, results):
        row = want[n][PROMPTS.index(prompt)]
        assert text == row["text"], (prompt, n)
        assert tokens == len(row["token_ids"])
        assert reason == ("length" if len(row["token_ids"]) == n else "stop")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "fluid_num_requests_running 0.0" in metrics
    assert 'vllm:kv_cache_usage_perc{model_name="model"} 0.0' in metrics
    # vLLM's request phases from the engine's clock: 32 clients on 8 slots queued, and a
    # request's time in its slot is its prefill plus its decode
    phase = {}
    for line in metrics.splitlines():
        found = re.match(r"vllm:request_(\w+)_time_seconds_(sum|count)\{[^}]*\} (\S+)", line)
        if found:
            phase[found[1], found[2]] = float(found[3])
    counts = {phase[p, "count"] for p in ("queue", "prefill", "decode", "inference")}
    assert len(counts) == 1 and counts.pop() >= 32
    assert phase["queue", "sum"] > 0
    assert phase["inference", "sum"] == pytest.approx(
        phase["prefill", "sum"] + phase["decode", "sum"], rel=1e-6
    )
    # the drafts as vLLM's speculative decoding counts them (its dashboards' acceptance rate and
    # mean acceptance length): the chain model's drafts are verified and mostly accepted
    seen = {}
    for line in metrics.splitlines():
        if line.startswith(("vllm:spec_decode", "fluid_spec_decode", "fluid_accepted_draft")):
            key, value = line.rsplit(" ", 1)
            seen[key] = float(value)
    drafts = seen['vllm:spec_decode_num_drafts_total{model_name="model"}']
    drafted = seen['vllm:spec_decode_num_draft_tokens_total{model_name="model"}']
    accepted = seen['vllm:spec_decode_num_accepted_tokens_total{model_name="model"}']
    assert seen["fluid_spec_decode_num_accepted_tokens_total"] == accepted
    assert 0 < accepted <= drafted and 1 + accepted / drafts > 2  # (TPF > 2 on this model)
    # (the per-step histogram counts those kept, after a stop or limit's cut: no more)
    assert accepted >= seen["fluid_accepted_draft_tokens_sum"] > 0
    by_pos = {int(re.search(r'position="(\d+)"', k)[1]): v for k, v in seen.items()
              if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total{")}  # fmt: skip
    at = [by_pos.get(p, 0.0) for p in range(max(by_pos) + 1)]
    assert sum(at) == accepted and at[0] <= drafts
    assert at == sorted(at, reverse=True)  # (position p accepted: so was p - 1)


def test_sampling_logprobs_and_stop_equal_fluid_generate(server, model_dir, tmp_path):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    # sampling: a request seeded s equals the offline prompt seeded s (row 0 of --seed s), and
    # the same seed gives the same tokens whatever else is in the batch
    want = offline(model_dir, tmp_path, ["hello p"], 30, extra=("--temperature", "0.9",
                   "--top-p", "0.95", "--seed", "7"))[0]  # fmt: skip

    async def sampled() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0
        ) as client:
            jobs = [
                client.completions.create(model="model", prompt=p, max_tokens=30,
                                          temperature=0.9, top_p=0.95, seed=7 if i % 2 == 0 else i)
                for i, p in enumerate(["hello p", "xx", "hello p", "abc", "hello p"])
            ]  # fmt: skip
            return [r.choices[0].text for r in await asyncio.gather(*jobs)]

    texts = asyncio.run(sampled())
    assert texts[0] == texts[2] == texts[4] == want["text"]
    # n copies: copy j of a request seeded s is the offline output seeded s + j
    copies = c.completions.create(model="model", prompt="hello p", max_tokens=30, n=3,
                                  temperature=0.9, top_p=0.95, seed=7)  # fmt: skip
    assert [ch.index for ch in copies.choices] == [0, 1, 2]
    for j, choice in enumerate(copies.choices):
        seeded = want if j == 0 else offline(model_dir, tmp_path, ["hello p"], 30, extra=(
            "--temperature", "0.9", "--top-p", "0.95", "--seed", str(7 + j)))[0]  # fmt: skip
        assert choice.text == seeded["text"], j
    # a repetition penalty (on the chain model's "*" run, drafts accepted) as fluid generate's
    row = offline(model_dir, tmp_path, ["xx"], 16, extra=("--repetition-penalty", "5"))[0]
    out = c.completions.create(model="model", prompt="xx", max_tokens=16, temperature=0,
                               extra_body={"repetition_penalty": 5})  # fmt: skip
    assert out.choices[0].text == row["text"]
    assert row["text"] != offline(model_dir, tmp_path, ["xx"], 16)[0]["text"]
    # a logit bias that forbids the chain's next letter: the output changes from there on
    plain = c.completions.create(model="model", prompt="abc", max_tokens=6, temperature=0)
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": plain.choices[0].text,
                     "add_special_tokens": False}, headers={"Authorization": f"Bearer {KEY}"}
                     ).json()["tokens"]  # fmt: skip
    banned = c.completions.create(model="model", prompt="abc", max_tokens=6, temperature=0,
                                  logit_bias={str(ids[0]): -100})  # fmt: skip
    assert banned.choices[0].text[:1] != plain.choices[0].text[:1]
    # log-probabilities: the same numbers as offline, in the OpenAI completions format
    row = offline(model_dir, tmp_path, ["nop"], 12, extra=("--logprobs", "2"))[0]
    out = c.completions.create(
        model="model", prompt="nop", max_tokens=12, logprobs=2, temperature=0
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(row["logprobs"], abs=1e-5)
    assert lp.tokens == list(map(_decode(model_dir), row["token_ids"]))
    assert [len(t) for t in lp.top_logprobs] == [2] * len(row["token_ids"])
    # stop strings end the request in the engine; the text stops before the stop string
    row = offline(model_dir, tmp_path, ["abc"], 40, extra=("--stop", "hij"))[0]
    assert row["text"].endswith("hij")
    out = c.completions.create(model="model", prompt="abc", max_tokens=40, stop=["hij"],
                               temperature=0)  # fmt: skip
    assert out.choices[0].text == row["text"].removesuffix("hij")
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(row["token_ids"])


def _decode(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return lambda t: tok.decode([t])


def test_lm_eval_scores_and_generates_through_the_server(server, model_dir, tmp_path, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model against ``fluid serve``, as a user runs
    it: batches of prompts in one request; log-likelihoods from ``echo`` + ``logprobs`` equal a
    direct float32 forward of the model, their greedy flags its argmax; ``generate_until`` equals
    ``fluid generate`` cut at the stop string. Token-id and text requests alike, with a local
    tokenizer or none (the harness then tokenizes through the server's ``/tokenize``)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what the harness sends as its bearer token
    pairs = [("abc", " def"), ("hello p", "q"), ("xx", " yy zz"), ("the quick", " brown")]
    tok = build_tiny_tokenizer(mask_token=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    want = []
    with torch.no_grad():
        for ctx, cont in pairs:
            c_ids = tok(ctx)["input_ids"]
            x_ids = tok(ctx + cont)["input_ids"][len(c_ids) :]
            logp = model(torch.tensor([c_ids + x_ids])).logits[0].float().log_softmax(-1)
            rows = [logp[len(c_ids) - 1 + j] for j in range(len(x_ids))]
            want.append((sum(float(r[t]) for r, t in zip(rows, x_ids)),
                         all(int(r.argmax()) == t for r, t in zip(rows, x_ids))))  # fmt: skip
    assert {greedy for _, greedy in want} == {True, False}  # both kinds of answer are checked
    offline_rows = offline(model_dir, tmp_path, [c for c, _ in pairs], 20)
    until = "m"
    local = {"tokenizer": model_dir, "tokenizer_backend": "huggingface"}
    remote = {"auth_token": KEY}  # its default backend finds /tokenize and /tokenizer_info
    for tokenized, where in ((True, local), (False, local), (True, remote)):
        lm = LocalCompletionsAPI(
            model="model", base_url=f"{server.url}/v1/completions", tokenized_requests=tokenized,
            batch_size=3, max_length=MAX_LEN, max_gen_toks=20, **where,
        )  # fmt: skip
        assert (type(lm.tokenizer).__name__ == "RemoteTokenizer") == (where is remote)
        got = lm.loglikelihood(
            [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        )
        for (lp, greedy), (want_lp, want_greedy) in zip(got, want):
            assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4) and greedy == want_greedy
        texts = lm.generate_until(
            [Instance("generate_until", {}, (c, {"until": [until], "max_gen_toks": 20}), i)
             for i, (c, _) in enumerate(pairs)]
        )  # fmt: skip
        assert texts == [row["text"].split(until)[0] for row in offline_rows]


def test_the_next_turn_of_a_chat_reuses_the_cache_and_answers_as_offline(
    server, model_dir, tmp_path
):
    # the second turn's prompt starts with the first turn's prompt and answer, still in the slot
    # the first turn left: only the rest is encoded, and the answer is the offline one
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    turn = [{"role": "user", "content": "defgh"}]
    hits = _metric(server.url, "fluid_prefix_cache_hits_total")
    first = c.chat.completions.create(model="model", messages=turn, max_tokens=12, temperature=0)
    turn += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "ijk"},
    ]
    second = c.chat.completions.create(model="model", messages=turn, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    info = httpx.get(f"{server.url}/health").json()["info"]
    assert info["prefix_caching"] and info["prefix_cache_slots"] == 2
    # the server's start-up heap is out of the garbage collector's scans (host.freeze_heap)
    assert info["gc_frozen_objects"] > 10_000
    assert _metric(server.url, "fluid_prefix_cache_hits_total") - hits >= cached
    src, out = tmp_path / "turns.jsonl", tmp_path / "turns-out.jsonl"
    src.write_text(json.dumps({"messages": turn}) + "\n", encoding="utf-8")
    argv = ["generate", "--model", model_dir, "--prompts", str(src), "--output", str(out),
            "--max-new-tokens", "12", "--no-enable-prefix-caching"]  # fmt: skip
    assert main(argv) == 0
    assert second.choices[0].message.content == json.loads(out.read_text(encoding="utf-8"))["text"]


def test_bad_requests_and_api_key(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="model", prompt="abc", temperature=0.7, best_of=2)
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="model", prompt="abc", logit_bias={"99999": 1})
    assert info.value.body["param"] == "logit_bias"
    assert "outside the model's vocabulary" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="model", prompt="abc", max_tokens=MAX_LEN)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert c.completions.create(model="model", prompt="abc", max_tokens=3).usage.total_tokens


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def _poll(cond, what: str, steps: int = 3000) -> None:
    for _ in range(steps):  # bounded: 3000 x 10 ms
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_disconnect_429_and_sigterm_drain(model_dir, tmp_path):
    """One slot, one queue place: a client that disconnects has its request aborted; a third
    request is refused with 429; SIGTERM lets the two in flight finish, closes the port, exits 0."""
    args = ["--model", model_dir, "--max-batch", "1", "--max-queue", "1", "--policy", "ar",
            "--max-len", "600"]  # fmt: skip
    long_body = {"model": "model", "prompt": "xx", "max_tokens": 500, "stream": True,
                 "ignore_eos": True}  # fmt: skip
    with ServerProcess(args) as proc:
        url = proc.url
        with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=60) as resp:
            first = next(line for line in resp.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
        _poll(lambda: _metric(url, "fluid_num_requests_running") == 0, "the slot to be freed")
        # AR decodes one token per step: far fewer than 500 steps ran, so the request was aborted
        assert _metric(url, "fluid_step_seconds_count") < 100

        prompts = ("xx", "nop")  # neither reaches the chain's EOS: both run to max_tokens
        want = offline(model_dir, tmp_path, prompts, 300)
        results: dict[str, tuple[str, str]] = {}

        def stream(prompt: str) -> None:
            body = {"model": "model", "prompt": prompt, "max_tokens": 300, "stream": True,
                    "temperature": 0}  # fmt: skip
            text, reason = "", None
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        reason = choice["finish_reason"] or reason
            results[prompt] = (text, reason)

        threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        _poll(lambda: _metric(url, "fluid_num_requests_running") == 1, "a request running")
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "q", "max_tokens": 2})
        if refused.status_code == 200:  # the first two finished before the third arrived
            pytest.fail("the load was too short to fill the queue; raise max_tokens")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        proc.terminate()
        assert proc.wait() == 0, proc.log_tail()
        for t in threads:
            t.join(120)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    for prompt, row in zip(prompts, want):
        assert results[prompt] == (row["text"], "length")
        assert len(row["token_ids"]) == 300


def test_the_first_ctrl_c_drains_and_exits_0(model_dir):
    """Ctrl-C (SIGINT) drains like SIGTERM: status 0, not an interrupt's 130."""
    with ServerProcess(["--model", model_dir, "--policy", "ar"]) as proc:
        proc.proc.send_signal(signal.SIGINT)
        assert proc.wait() == 0, proc.log_tail()
        assert "draining" in proc.log_tail()


def test_stop_extras_min_tokens_usage_stats_and_openai_fields(server):
    """vLLM's extras and OpenAI's own chat fields as a client sends them: ``min_tokens`` holds
    stop strings back in the engine and the text alike (vLLM's rule), ``include_stop_str_in_output``
    keeps the stop string, ``stop_token_ids`` end a request as EOS does, ``continuous_usage_stats``
    puts the usage on every chunk; completions' ``top_logprobs`` hold the token itself; a
    whitespace prompt is a prompt; OpenAI's tags change nothing, its features are a 400 but at
    their neutral value."""
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    def done(prompt: str = "abc", **kw) -> tuple[str, str, int]:
        out = c.completions.create(model="model", prompt=prompt, max_tokens=20, temperature=0,
                                   **kw)  # fmt: skip
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    assert done() == ("defghijklm", "stop", 11)  # the chain, then EOS (counted, not spelled)
    assert done(stop=["f", "k"]) == ("de", "stop", 3)
    least = lambda n, **more: {"extra_body": {"min_tokens": n, **more}}  # noqa: E731
    assert done(stop=["f", "k"], **least(5)) == ("defghij", "stop", 8)  # "f" within: skipped
    assert done(stop=["fg"], **least(3)) == ("de", "stop", 4)  # began within, ends after
    assert done(stop=["ef"], **least(3)) == ("defghijklm", "stop", 11)  # wholly within
    body = {"model": "model", "prompt": "abc", "max_tokens": 20, "temperature": 0, "stream": True,
            "stop": ["f", "k"], "min_tokens": 5,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == "defghij"
    used = [ch["usage"]["completion_tokens"] for ch in chunks]  # on every chunk, as it grows
    assert used == sorted(used) and used[-1] == 8 and not chunks[-1]["choices"]

    keep = least(0, include_stop_str_in_output=True)
    assert done(stop=["fg"], **keep) == ("defg", "stop", 4)
    streamed = c.completions.create(model="model", prompt="abc", max_tokens=20, temperature=0,
                                    stop=["fg"], stream=True, **keep)  # fmt: skip
    assert "".join(ch.choices[0].text for ch in streamed) == "defg"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "abc"}]
    more = {"add_generation_prompt": False, "continue_final_message": True}  # (the chain again)
    chat = lambda **kw: c.chat.completions.create(  # noqa: E731
        model="model", messages=messages, max_tokens=12, temperature=0, **kw)  # fmt: skip
    plain = chat(extra_body=more).choices[0].message.content
    assert plain.startswith("defg")
    kept = chat(stop=["fg"], extra_body={**more, "include_stop_str_in_output": True})
    assert kept.choices[0].message.content == "defg"
    h = httpx.post(f"{server.url}/tokenize", json={"prompt": "h", "add_special_tokens": False},
                   headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]  # fmt: skip
    assert done(extra_body={"stop_token_ids": h}) == ("defg", "stop", 5)  # the token not spelled
    assert done(extra_body={"stop_token_ids": h, "include_stop_str_in_output": True}) == (
        "defgh", "stop", 5)  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        done(extra_body={"stop_token_ids": [99999]})
    assert info.value.body["param"] == "stop_token_ids"

    # vLLM's stop_reason: the stop string or stop token id that ended it (None: EOS, a limit)
    def reason(stream: bool = False, **kw) -> list:
        out = c.completions.create(model="model", prompt="abc", temperature=0, stream=stream,
                                   **{"max_tokens": 20, **kw})  # fmt: skip
        ends = [ch.choices[0] for ch in out if ch.choices[0].finish_reason] if stream else None
        return [(ch.finish_reason, ch.model_extra["stop_reason"]) for ch in ends or out.choices]

    assert reason() == reason(stream=True) == [("stop", None)]  # the tokenizer's EOS
    assert reason(stop=["k", "f"]) == reason(stop=["k", "f"], stream=True) == [("stop", "f")]
    assert reason(extra_body={"stop_token_ids": h}) == [("stop", h[0])]
    assert reason(extra_body={"stop_token_ids": h}, stream=True) == [("stop", h[0])]
    assert reason(max_tokens=2) == [("length", None)]
    eos = build_tiny_tokenizer(mask_token=True).eos_token_id  # (the served model's tokenizer)
    assert reason(extra_body={"stop_token_ids": [eos]}) == [("stop", None)]  # vLLM: EOS first
    said = chat(stop=["fg"], extra_body=more).choices[0]
    assert (said.finish_reason, said.model_extra["stop_reason"]) == ("stop", "fg")

    assert done(" ")[1] in ("stop", "length")  # whitespace: a prompt, as vLLM reads it
    for n in (0, 1):
        out = c.completions.create(model="model", prompt="hello p", max_tokens=12, logprobs=n,
                                   temperature=1.5, seed=3)  # fmt: skip
        lp = out.choices[0].logprobs
        assert all(t in top and top[t] == p and len(top) <= n + 1
                   for t, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))  # fmt: skip

    tags = dict(metadata={"app": "test"}, store=False, service_tier="auto", prompt_cache_key="k",
                safety_identifier="u1", modalities=["text"], verbosity="medium",
                reasoning_effort=None, audio=None)  # fmt: skip
    assert chat(extra_body=more, **tags).choices[0].message.content == plain
    options = {"include_usage": True, "include_obfuscation": False}  # (OpenAI's, no padding)
    streamed = chat(extra_body=more, stream=True, stream_options=options, **tags)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == plain
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="model", messages=messages, reasoning_effort="low")
    assert info.value.body["param"] == "reasoning_effort"
