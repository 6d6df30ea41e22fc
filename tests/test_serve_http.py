"""The HTTP layer of ``fluid serve`` over the wire, driven by the official ``openai`` client and
httpx, against a scripted scheduler (the Scheduler contract with known outputs and a gate that
holds its steps), so every behaviour is exact: streaming format, usage, stop strings, 400 / 401 /
404. ``test_serve_lifecycle.py`` uses the same scheduler for 429, disconnects, the drain and engine
failures; the same server code runs the real scheduler in ``test_serve_live.py``."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn

import fluid_npu
from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.sampling.api import PromptError
from fluid_npu.sampling.requests import Request
from fluid_npu.sampling.reuse import SlotPrefixes
from fluid_npu.serve.app import ServeConfig, create_app
from fluid_npu.serve.metrics import VLLM_NAMES
from fluid_npu.serve.protocol import SamplingDefaults
from fluid_npu.serve.server import DrainingServer, bind
from fluid_npu.serve.worker import Stream, Worker

TOK = build_tiny_tokenizer(mask_token=True)
EOS = TOK.eos_token_id
SCRIPT = TOK("the quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)[
    "input_ids"
]
WAIT_STEPS = 2000  # bounded polling loops: 2000 x 5 ms at most


@dataclass
class Ev:
    request_id: str
    tokens: list[int]
    finished: bool
    finish_reason: str | None
    new_tokens: int
    forwards: int
    accepted: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]], int]] | None = None
    cached: int = 0
    drafted: int = 0
    drafts_accepted: int = 0
    at: float = field(default_factory=time.monotonic)  # (the engine's times: Event's)
    queued_at: float | None = None
    admitted_at: float | None = None


def script(prompt: list[int], max_new: int, eos: bool) -> list[int]:
    """The scripted answer: text from SCRIPT, EOS after a length that depends on the prompt."""
    out = SCRIPT[len(prompt) % 10 :][:max_new]
    stop_at = 10 + len(prompt) % 7
    if eos and len(out) > stop_at:
        out = [*out[:stop_at], EOS]
    return out


class ScriptedScheduler:
    """The Scheduler contract: FIFO admission, ``max_batch`` slots, aborts, 1-3 tokens a step."""

    def __init__(self, max_batch: int = 4, max_len: int = 600, step_s: float = 0.0) -> None:
        self.max_batch, self.max_len, self.step_s = max_batch, max_len, step_s
        self.slots_n = max_batch
        self.eos_ids = [EOS]  # where a request ends unless it asks to ignore EOS
        self.waiting: list[tuple[Request, list[int]]] = []
        self.running: dict[str, list] = {}  # id -> [request, remaining tokens, new, forwards]
        self.aborts: list[tuple[str, int, int]] = []  # (id, tokens, forwards): events to come
        self.aborted: list[str] = []  # every abort applied, for the tests
        self.requests: list[Request] = []  # every request submitted, for the tests
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.steps = 0  # steps run so far ...
        self.submitted_step: dict[str, int] = {}  # ... when each request was submitted
        self.prefixes = SlotPrefixes(max_batch, enabled=False)  # prompt tokens admitted
        self.times: dict[str, tuple[float, float | None]] = {}  # id -> (queued, admitted)

    def submit(self, req: Request) -> None:
        if not req.prompt:
            raise PromptError("the prompt is empty")
        if len(req.prompt) + req.max_new_tokens > self.max_len:
            raise PromptError(f"prompt + max_new_tokens exceeds max_len {self.max_len}")
        self.requests.append(req)
        self.submitted_step[req.request_id] = self.steps
        self.waiting.append((req, script(req.prompt, req.max_new_tokens, req.eos_ids != [])))
        self.times[req.request_id] = (time.monotonic(), None)

    def abort(self, request_id: str) -> bool:
        """As the Scheduler's: the request is taken out (its id free) now, its event comes with
        the next step."""
        entry = self.running.pop(request_id, None)
        self.waiting = [w for w in self.waiting if w[0].request_id != request_id]
        self.aborts.append((request_id, *((entry[2], entry[3]) if entry else (0, 0))))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborts)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def step(self) -> list[Ev]:
        assert self.gate.wait(60), "a test left the gate closed"
        if self.fail:
            raise RuntimeError("device lost")
        self.steps += 1
        time.sleep(self.step_s)
        events = []
        for rid, n, fw in self.aborts:
            self.aborted.append(rid)
            events.append(Ev(rid, [], True, "abort", n, fw, 0))
        self.aborts.clear()
        while self.waiting and len(self.running) < self.max_batch:
            req, toks = self.waiting.pop(0)
            self.running[req.request_id] = [req, toks, 0, 0]
            self.times[req.request_id] = (self.times[req.request_id][0], time.monotonic())
            self.prefixes.queried += len(req.prompt)
        for rid, entry in list(self.running.items()):
            req, toks, n, fw = entry
            take = 1 + fw % 3  # 1, 2, 3 tokens per step in turn
            chunk, entry[1] = toks[:take], toks[take:]
            entry[2], entry[3] = n + len(chunk), fw + 1
            done = not entry[1]
            reason = None
            if done:
                reason = "stop" if chunk and chunk[-1] == EOS else "length"
                del self.running[rid]
            # (scripted: two drafts verified each step, the step's tokens but one accepted)
            queued, admitted = self.times[rid]
            ev = Ev(rid, chunk, done, reason, entry[2], entry[3], len(chunk) - 1, drafted=2,
                    drafts_accepted=len(chunk) - 1, queued_at=queued,
                    admitted_at=admitted)  # fmt: skip
            if req.sampling is not None and req.sampling.logprobs:  # scripted: -0.25 per token
                ev.logprobs = [-0.25 * (n + i + 1) for i in range(len(chunk))]
                ev.top_logprobs = [[(t, lp), (EOS, lp - 1.0)][: req.sampling.top_logprobs]
                                   for t, lp in zip(chunk, ev.logprobs)]  # fmt: skip
            asked = req.sampling.prompt_logprobs if req.sampling is not None else None
            if fw == 0 and asked is not None:  # scripted: prompt token j + 1 has -0.5 (j + 1)
                ev.prompt_logprobs = [(-0.5 * (j + 1), [(t, -0.5 * (j + 1)), (EOS, -9.0)][:asked],
                                       1) for j, t in enumerate(req.prompt[1:])]  # fmt: skip
            events.append(ev)
        return events


@contextlib.contextmanager
def serving(sched: ScriptedScheduler, drain_timeout: float = 30.0, tokenizer: Any = TOK,
            root_path: str = "", **config: Any):  # fmt: skip
    """An in-process server on 127.0.0.1 at a free port; yields (base url, server, worker)."""
    worker = Worker(sched)
    cfg = ServeConfig(model_name="tiny", max_len=sched.max_len, max_batch=sched.max_batch)
    for k, v in config.items():
        setattr(cfg, k, v)
    app = create_app(worker, tokenizer, cfg)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30,
                        root_path=root_path)  # fmt: skip
    server = DrainingServer(uv, worker, drain_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _until(lambda: server.started)
        yield url, server, worker
    finally:
        sched.gate.set()
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def _until(cond, what: str = "condition") -> None:
    for _ in range(WAIT_STEPS):
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def expected_text(prompt_ids: list[int], max_new: int, eos: bool = True) -> str:
    return TOK.decode(script(prompt_ids, max_new, eos), skip_special_tokens=True)


def _metric(url: str, name: str) -> float:
    """One sample of /metrics by its exact key, else the sum of ``name``'s labelled samples."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    if name in samples:
        return samples[name]
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def test_completions_and_chat_with_the_openai_client():
    with serving(ScriptedScheduler()) as (url, _, _):
        c = client(url)
        prompt = "Question: 2+2?"
        ids = TOK(prompt)["input_ids"]
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=30)
        assert out.choices[0].text == expected_text(ids, 30)
        assert out.choices[0].finish_reason == "stop"  # the script's EOS
        assert out.usage.prompt_tokens == len(ids)
        assert out.usage.completion_tokens == len(script(ids, 30, True))
        assert out.usage.model_extra["tpf"] > 1.0  # several tokens per step
        long = c.completions.create(model="tiny", prompt=prompt, max_tokens=40, extra_body={
            "ignore_eos": True})  # fmt: skip
        assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40

        messages = [{"role": "user", "content": "hello"}]
        chat_prompt = TOK.apply_chat_template(messages, add_generation_prompt=True)
        chat_prompt = chat_prompt["input_ids"] if hasattr(chat_prompt, "keys") else chat_prompt
        reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=25)
        assert reply.choices[0].message.content == expected_text(chat_prompt, 25)
        assert reply.choices[0].message.role == "assistant"

        stream = c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=25, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == reply.choices[0].message.content
        final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(final) == 1 and final[0].usage is None  # include_usage: its own chunk only
        assert (
            chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
        )
        assert [ch.usage is not None for ch in chunks].count(True) == 1  # summed: counted once

        pieces = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=30, stream=True))
        assert len(pieces) > 3  # streamed, not one block
        assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text
        assert pieces[-1].choices[0].finish_reason == "stop" and pieces[-1].usage is not None

        models = c.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert c.models.retrieve("tiny").id == "tiny"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("other")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert _metric(url, "fluid_requests_total") == 5
        generated = out.usage.completion_tokens * 2 + long.usage.completion_tokens
        generated += reply.usage.completion_tokens * 2
        assert _metric(url, "fluid_generation_tokens_total") == generated
        assert _metric(url, "fluid_time_to_first_token_seconds_count") == 5
        assert _metric(url, "fluid_request_tpf_count") == 5
        assert _metric(url, "fluid_accepted_draft_tokens_count") > 10


def test_stop_strings_cut_the_text_and_abort_the_request():
    # the scripted scheduler knows no stop strings: the server finds them and aborts the request
    # (the real engine ends it itself); slow steps, so the abort lands long before the 500th token
    sched = ScriptedScheduler(step_s=0.002)
    with serving(sched) as (url, _, _):
        c = client(url)
        ids = TOK("abc")["input_ids"]
        full = expected_text(ids, 500, eos=False)
        cut = full.index(" over")
        out = c.completions.create(
            model="tiny", prompt="abc", max_tokens=500, stop=[" over", "zzz"],
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text == full[:cut]
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == len(TOK(full[:cut] + " over")["input_ids"])
        streamed = c.completions.create(
            model="tiny", prompt="abc", max_tokens=500, stop=" over", stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert "".join(p.choices[0].text for p in streamed) == full[:cut]
        _until(lambda: len(sched.aborted) == 2, "the two aborts")


def test_sampling_settings_reach_the_engine_and_logprobs_come_back():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        out = c.completions.create(
            model="tiny", prompt="abc", max_tokens=6, temperature=0.7, top_p=0.9, seed=11,
            logprobs=2, stop=["zz"], extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True},
        )  # fmt: skip
        req = sched.requests[-1]
        assert type(req) is Request  # the engine's own request type, as the scheduler takes it
        p = req.sampling
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.7, 0.9, 5, 0.05, 11)
        assert (p.logprobs, p.top_logprobs, tuple(req.stop), req.eos_ids) == (True, 2, ("zz",), [])
        lp = out.choices[0].logprobs
        toks = script(TOK("abc")["input_ids"], 6, False)
        assert lp.token_logprobs == [-0.25 * (i + 1) for i in range(6)]
        assert lp.tokens == [TOK.decode([t]) for t in toks]
        assert "".join(lp.tokens) == out.choices[0].text
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(6)]
        assert [len(top) for top in lp.top_logprobs] == [2] * 6

        messages = [{"role": "user", "content": "hi"}]
        reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                          logprobs=True, top_logprobs=1)  # fmt: skip
        content = reply.choices[0].logprobs.content
        assert [e.logprob for e in content] == [-0.25 * (i + 1) for i in range(5)]
        assert all(len(e.top_logprobs) == 1 and e.top_logprobs[0].token == e.token for e in content)
        raw = bytes(b for e in content for b in e.bytes)
        assert raw.decode() == reply.choices[0].message.content
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                                logprobs=True, stream=True))  # fmt: skip
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content]  # fmt: skip
        assert [e.logprob for e in streamed] == [e.logprob for e in content]
        plain = c.completions.create(model="tiny", prompt="abc", max_tokens=3)
        assert plain.choices[0].logprobs is None
        p = sched.requests[-1].sampling  # left out: OpenAI's defaults (this model sets none)
        assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    sched = (
        ScriptedScheduler()
    )  # logit_bias ids: the model's vocabulary (padded past the tokenizer)
    with serving(sched, vocab_size=len(TOK) + 8) as (url, _, _):
        client(url).completions.create(model="tiny", prompt="abc", max_tokens=2,
                                       logit_bias={str(len(TOK) + 7): 1})  # fmt: skip
        assert sched.requests[-1].sampling.logit_bias == ((len(TOK) + 7, 1.0),)
        with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
            client(url).completions.create(model="tiny", prompt="abc", max_tokens=2,
                                           logit_bias={str(len(TOK) + 8): 1})  # fmt: skip
    model_defaults = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05)
    sched = ScriptedScheduler()
    with serving(sched, defaults=model_defaults) as (url, _, _):
        client(url).completions.create(model="tiny", prompt="abc", max_tokens=3)
        p = sched.requests[-1].sampling  # the model's generation config, as vLLM reads it
        assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 20)
        assert p.repetition_penalty == 1.05 and p.presence_penalty == 0.0
        client(url).completions.create(model="tiny", prompt="abc", max_tokens=3,
                                       presence_penalty=0.5, frequency_penalty=-0.25,
                                       extra_body={"repetition_penalty": 1.2})  # fmt: skip
        p = sched.requests[-1].sampling
        assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, -0.25)
        hi = [{"role": "user", "content": "x"}]
        client(url).chat.completions.create(model="tiny", messages=hi, max_tokens=2,
                                            logit_bias={"9": -100, "5": 3})  # fmt: skip
        assert sched.requests[-1].sampling.logit_bias == ((5, 3.0), (9, -100.0))
        client(url).completions.create(model="tiny", prompt="abc", max_tokens=4,
                                       extra_body={"min_tokens": 4})  # fmt: skip
        assert sched.requests[-1].sampling.min_tokens == 4


def test_priority_reaches_the_engine_only_with_the_priority_policy():
    """vLLM's ``priority``: on every route, a 400 naming it unless the engine orders its queue by
    priority (``--scheduling-policy priority``), then each of the request's prompts carries it."""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="--scheduling-policy priority") as e:
            c.completions.create(model="tiny", prompt="a", max_tokens=2, extra_body={"priority": 1})
        assert e.value.body["param"] == "priority"
        c.completions.create(model="tiny", prompt="a", max_tokens=2, extra_body={"priority": 0})
        assert sched.requests[-1].priority == 0
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="a", extra_body={"priority": "high"})
        assert e.value.body["param"] == "priority"
        sched.scheduling_policy = "priority"
        c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2,
                             extra_body={"priority": -4})  # fmt: skip
        assert [r.priority for r in sched.requests[-2:]] == [-4, -4]
        chat = [{"role": "user", "content": "hi"}]
        c.chat.completions.create(model="tiny", messages=chat, max_tokens=2,
                                  extra_body={"priority": 7})  # fmt: skip
        assert sched.requests[-1].priority == 7
        c.responses.create(model="tiny", input="hi", max_output_tokens=2,
                           extra_body={"priority": 2})  # fmt: skip
        assert sched.requests[-1].priority == 2


def test_a_clients_request_id_names_its_answer_and_comes_back_as_a_header(monkeypatch, caplog):
    """vLLM's ``X-Request-Id``: the answer's id on every route and the engine's (one running
    request per id: a second is a 400), a malformed one a 400; with ``--enable-request-id-headers``
    every response (errors included) carries it, a random one when the client sent none."""
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched) as (url, _, _):
        c = client(url)
        chat = [{"role": "user", "content": "hi"}]
        out = c.completions.create(model="tiny", prompt="a", max_tokens=2, n=2,
                                   extra_headers={"X-Request-Id": "job-1"})  # fmt: skip
        assert out.id == "cmpl-job-1"
        assert {r.request_id for r in sched.requests[-2:]} == {"0_cmpl-job-1", "1_cmpl-job-1"}
        reply = c.chat.completions.create(model="tiny", messages=chat, max_tokens=2,
                                          extra_headers={"X-Request-Id": "job-2"})  # fmt: skip
        assert reply.id == "chatcmpl-job-2" and sched.requests[-1].request_id == reply.id
        r = c.responses.create(model="tiny", input="hi", max_output_tokens=2,
                               extra_headers={"X-Request-Id": "job-3"})  # fmt: skip
        assert r.id == "resp_job-3"
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert "x-request-id" not in plain.headers  # (without --enable-request-id-headers)
        assert httpx.get(f"{url}/version").json() == {"version": fluid_npu.__version__}
        for bad in ("has space", "x" * 300):
            resp = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                              headers={"X-Request-Id": bad})  # fmt: skip
            assert resp.status_code == 400 and "X-Request-Id" in resp.json()["error"]["message"]
        sched.step_s = 0.02  # the first "dup" runs for seconds (then leaves) while the second comes
        body = {"prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                          headers={"X-Request-Id": "dup"}) as first:  # fmt: skip
            assert first.status_code == 200
            lines = first.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)  # (it runs)
            second = httpx.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 1},
                                headers={"X-Request-Id": "dup"}, timeout=60)  # fmt: skip
            assert second.status_code == 400 and second.json()["error"]["param"] == "X-Request-Id"
            assert "belongs to a request still running" in second.json()["error"]["message"]
            chat = httpx.post(f"{url}/v1/chat/completions", headers={"X-Request-Id": "dup"},
                              json={"messages": [{"role": "user", "content": "b"}]})  # fmt: skip
            assert chat.status_code == 400  # (one running request per id, whatever its route)
            # refused before its grammar compiles (here one that would not compile)
            held = httpx.post(f"{url}/v1/completions", headers={"X-Request-Id": "dup"}, json={
                "prompt": "b", "max_tokens": 1, "structured_outputs": {"regex": "(a"}})  # fmt: skip
            assert held.json()["error"]["param"] == "X-Request-Id", held.json()
        sched.step_s = 0.0
    with serving(ScriptedScheduler(), request_id_headers=True) as (url, _, _):
        given = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                           headers={"X-Request-Id": "job-9"})  # fmt: skip
        assert given.headers["x-request-id"] == "job-9" and given.json()["id"] == "cmpl-job-9"
        fresh = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert fresh.json()["id"] == "cmpl-" + fresh.headers["x-request-id"]
        missing = httpx.get(f"{url}/v1/nothing", headers={"X-Request-Id": "job-10"})
        assert missing.status_code == 404 and missing.headers["x-request-id"] == "job-10"
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          headers={"X-Request-Id": "job-11"}) as streamed:  # fmt: skip
            assert streamed.headers["x-request-id"] == "job-11"
            streamed.read()

        def bug(body: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr("fluid_npu.serve.app.protocol.parse_completion", bug)
        broken = httpx.post(f"{url}/v1/completions", json={"prompt": "a"},
                            headers={"X-Request-Id": "job-12"})  # fmt: skip
        assert broken.status_code == 500 and "a bug" in broken.json()["error"]["message"]
        assert broken.headers["x-request-id"] == "job-12"  # (a bug's 500 passes the middleware)
        assert any("a request failed: POST /v1/completions" in r.getMessage() and r.exc_info
                   for r in caplog.records)  # (and its traceback is logged)  # fmt: skip


def test_a_list_of_prompts_is_one_choice_each_streamed_or_not():
    """As vLLM answers a batch: choice ``index`` in the order given, each the text its prompt alone
    gets, usage summed; streamed, the choices' chunks interleave and the usage comes once."""
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched) as (url, _, worker):
        c = client(url)
        prompts = ["one", "a longer second prompt", "3"]
        ids = [TOK(p)["input_ids"] for p in prompts]
        out = c.completions.create(model="tiny", prompt=prompts, max_tokens=25)
        assert [ch.index for ch in out.choices] == [0, 1, 2]
        assert [ch.text for ch in out.choices] == [expected_text(i, 25) for i in ids]
        assert out.usage.prompt_tokens == sum(map(len, ids))
        assert out.usage.completion_tokens == sum(len(script(i, 25, True)) for i in ids)
        alone = [c.completions.create(model="tiny", prompt=p, max_tokens=25) for p in prompts]
        assert [a.choices[0].text for a in alone] == [ch.text for ch in out.choices]
        before = len(sched.requests)
        with pytest.raises(openai.BadRequestError) as info:  # which prompt, and nothing ran
            c.completions.create(model="tiny", prompt=[ids[0], [10**9]], max_tokens=2)
        assert info.value.body["message"].startswith("prompt[1]: ")
        assert len(sched.requests) == before
        as_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=25)
        assert [ch.text for ch in as_ids.choices] == [ch.text for ch in out.choices]
        assert len({r.request_id for r in sched.requests}) == len(sched.requests)  # ids unique
        # a request's prompts reach the engine together, between two steps: prefilled as a batch
        batch = [r.request_id for r in sched.requests[-3:]]
        assert len({sched.submitted_step[rid] for rid in batch}) == 1

        # steps that take time, as a model's do: a scripted step of no time can run several
        # steps before the event loop delivers one choice's first chunk
        sched.step_s = 0.01
        chunks = list(c.completions.create(model="tiny", prompt=prompts, max_tokens=25,
                                           stream=True))  # fmt: skip
        sched.step_s = 0.0
        texts, ends = ["", "", ""], {}
        for ch in chunks:
            for choice in ch.choices:
                texts[choice.index] += choice.text
                if choice.finish_reason:
                    ends[choice.index] = choice.finish_reason
        assert texts == [ch.text for ch in out.choices] and ends == {
            0: "stop",
            1: "stop",
            2: "stop",
        }
        assert len({ch.choices[0].index for ch in chunks[:4]}) > 1  # interleaved, not in turn
        with_usage = [ch for ch in chunks if ch.usage is not None]
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
        assert with_usage[0].usage.completion_tokens == out.usage.completion_tokens
        # (the client stops at [DONE]; the server frees the slots as the response closes)
        _until(lambda: worker.outstanding == 0, "the streams' slots freed")


def test_n_completions_per_prompt_in_vllms_order_with_seeds_that_reproduce():
    sched = ScriptedScheduler(max_batch=8)
    with serving(sched) as (url, _, _):
        c = client(url)
        prompts = ["one", "a second prompt"]
        ids = [TOK(p)["input_ids"] for p in prompts]
        out = c.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, seed=5,
                                   temperature=0.8)  # fmt: skip
        assert [ch.index for ch in out.choices] == [0, 1, 2, 3]  # prompt x n + copy
        assert [ch.text for ch in out.choices] == [expected_text(ids[k // 2], 12) for k in range(4)]
        assert [r.sampling.seed for r in sched.requests[-4:]] == [5, 6, 5, 6]  # seed + copy
        assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1])  # a prompt counts once
        assert out.usage.completion_tokens == 2 * sum(len(script(i, 12, True)) for i in ids)
        top = (1 << 63) - 1
        c.completions.create(model="tiny", prompt="x", n=2, max_tokens=2, seed=top)
        assert [r.sampling.seed for r in sched.requests[-2:]] == [top, -(1 << 63)]  # wraps
        c.completions.create(model="tiny", prompt="x", max_tokens=2, seed=-1, temperature=1)
        assert sched.requests[-1].sampling.seed is None  # vLLM's -1: no seed (the engine draws)
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         n=3, max_tokens=5)  # fmt: skip
        assert [ch.index for ch in chat.choices] == [0, 1, 2]
        assert len({ch.message.content for ch in chat.choices}) == 1  # (the script ignores seeds)
        texts, ends = ["", "", ""], [None, None, None]
        for chunk in c.completions.create(model="tiny", prompt="one", n=3, max_tokens=12,
                                          stream=True):  # fmt: skip
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                ends[ch.index] = ch.finish_reason or ends[ch.index]
        assert texts == [expected_text(ids[0], 12)] * 3
        assert ends == [out.choices[0].finish_reason] * 3


def test_echo_returns_the_prompt_and_its_logprobs_first():
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 0 or 1): the
    prompt's tokens come first with their log-probabilities (the first one null), then the
    completion's; max_tokens 0 returns the prompt alone and frees the engine's slot."""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, worker):
        c = client(url)
        prompt = "the quick brown fox"
        ids = TOK(prompt)["input_ids"]
        toks = script(ids, 3, True)
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True,
                                   logprobs=1, temperature=0)  # fmt: skip
        choice = out.choices[0]
        assert choice.text == prompt + expected_text(ids, 3)
        assert sched.requests[-1].sampling.prompt_logprobs == 1
        lp = choice.logprobs
        assert lp.tokens == [TOK.decode([t]) for t in ids + toks]
        assert lp.token_logprobs == [None, *(-0.5 * (j + 1) for j in range(len(ids) - 1)),
                                     *(-0.25 * (i + 1) for i in range(3))]  # fmt: skip
        assert lp.top_logprobs[0] is None
        assert [list(t.values()) for t in lp.top_logprobs[1:len(ids)]] == [
            [-0.5 * (j + 1)] for j in range(len(ids) - 1)]  # fmt: skip
        n = len(ids)
        assert lp.text_offset[:n] == [len(TOK.decode(ids[:j])) for j in range(n)]
        completion = TOK.decode(toks)
        assert lp.text_offset[n:] == [len(prompt) + len(TOK.decode(toks[:i])) for i in range(3)]
        assert choice.text[lp.text_offset[n] :] == completion
        assert out.usage.prompt_tokens == n and out.usage.completion_tokens == 3

        one = c.completions.create(model="tiny", prompt=[ids[:1]], max_tokens=0, echo=True,
                                   logprobs=1)  # fmt: skip
        assert one.choices[0].logprobs.token_logprobs == [None]
        assert one.choices[0].logprobs.top_logprobs == [None]  # asked for: a list, even of nulls
        scored = c.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True,
                                      logprobs=0, temperature=0)  # fmt: skip
        s = scored.choices[0]
        assert s.text == TOK.decode(ids, skip_special_tokens=True)  # token ids: their text
        assert s.finish_reason == "length" and scored.usage.completion_tokens == 0
        assert s.logprobs.token_logprobs == lp.token_logprobs[:n]
        # logprobs 0: each position's token alone (OpenAI's "up to logprobs + 1", as vLLM)
        assert s.logprobs.top_logprobs == [None] + [
            {TOK.decode([t]): -0.5 * (j + 1)} for j, t in enumerate(ids[1:])]  # fmt: skip
        plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, echo=True)
        assert plain.choices[0].text == prompt + expected_text(ids, 2)
        assert plain.choices[0].logprobs is None
        assert sched.requests[-1].sampling.prompt_logprobs is None  # nothing scored for it

        events = []
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
        assert events[0]["choices"][0]["text"] == prompt
        assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == lp.token_logprobs[:n]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events) == prompt
        _until(lambda: worker.outstanding == 0 and not sched.running, "the scored slots freed")


class PickyScheduler(ScriptedScheduler):
    """A scripted scheduler that refuses the prompt "no" (as the engine refuses a request)."""

    def submit(self, req: Request) -> None:
        if req.prompt == TOK("no")["input_ids"]:
            raise PromptError("this prompt is refused")
        super().submit(req)


def test_a_request_with_one_refused_prompt_runs_none_of_them():
    sched = PickyScheduler()
    with serving(sched) as (url, _, worker):
        for stream in (False, True):
            body = {"model": "tiny", "prompt": ["a", "b", "no", "d"], "max_tokens": 5,
                    "stream": stream}  # fmt: skip
            bad = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert bad.status_code == 400 and "refused" in bad.json()["error"]["message"]
        _until(lambda: worker.outstanding == 0 and not sched.has_work(), "the engine idle")
        assert len(sched.requests) == 4 and len(sched.aborted) == 4  # "a", "b" twice: never run
        # one step per request, applying its aborts before any admission: nothing was decoded
        assert sched.steps == 2 and not sched.running
        assert _metric(url, "fluid_prompt_tokens_total") == 0


def test_more_prompts_than_the_server_holds_is_400_then_429():
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched, max_queue=1) as (url, _, worker):
        c = client(url)
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model="tiny", prompt=["a", "b", "c", "d"], max_tokens=2)
        assert info.value.body["param"] == "prompt" and "at most 3" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(model="tiny", prompt="a", n=4, max_tokens=2)
        assert info.value.body["param"] == "n" and "smaller n" in info.value.body["message"]
        sched.gate.clear()  # one request in flight: two places left, three asked for
        first = threading.Thread(target=lambda: c.completions.create(
            model="tiny", prompt="x", max_tokens=2))  # fmt: skip
        first.start()
        _until(lambda: worker.outstanding == 1, "one request in flight")
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=2)
        sched.gate.set()
        first.join(60)
        out = c.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=2)
        assert len(out.choices) == 3 and worker.outstanding == 0
        # a request's prompts count at once: the next request sees all of them, never a part
        sched.gate.clear()
        three = threading.Thread(target=lambda: c.completions.create(
            model="tiny", prompt=["a", "b", "c"], max_tokens=2))  # fmt: skip
        three.start()
        _until(lambda: worker.outstanding == 3, "three prompts counted")
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="d", max_tokens=2)
        # a full server refuses before a grammar compiles (here one that would not compile)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="d", max_tokens=2,
                                 extra_body={"structured_outputs": {"regex": "(a"}})  # fmt: skip
        sched.gate.set()
        three.join(60)


def test_bad_requests_get_openai_errors_and_leave_others_alone():
    with serving(ScriptedScheduler(max_len=64)) as (url, _, _):
        c = client(url)
        cases = [
            (dict(prompt="a", temperature=2.5), "temperature"),
            (dict(prompt="a", top_p=0), "top_p"),
            (dict(prompt="a", n=65), "n"),
            (dict(prompt="a", logprobs=21), "logprobs"),
            (dict(prompt="a", presence_penalty=2.5), "presence_penalty"),
            (dict(prompt="a", logit_bias={"999999": 1}), "logit_bias"),  # (outside the vocab)
            (dict(prompt="a", max_tokens=3, extra_body={"min_tokens": 4}), "min_tokens"),
            (dict(prompt="a", max_tokens=500), "max_tokens"),
            (dict(prompt="x" * 80), "prompt"),
            (dict(prompt="a", extra_body={"mystery": 1}), "mystery"),
        ]
        for kwargs, param in cases:
            with pytest.raises(openai.BadRequestError) as info:
                c.completions.create(model="tiny", **kwargs)
            assert info.value.body["param"] == param, kwargs
            assert param in info.value.body["message"] or param == "prompt"
        with pytest.raises(openai.NotFoundError) as info:
            c.completions.create(model="other", prompt="a")
        assert info.value.body["code"] == "model_not_found"
        as_json = {"content-type": "application/json"}
        raw = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=as_json)
        assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
        raw = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (5 << 20), headers=as_json)
        assert raw.status_code == 400 and "bytes" in raw.json()["error"]["message"]
        deep = b"[" * 100_000  # deeper than Python
        raw = httpx.post(f"{url}/v1/completions", content=deep, headers=as_json)
        assert raw.status_code == 400 and "nests" in raw.json()["error"]["message"]
        # the limit is named as the request gave it
        messages = [{"role": "user", "content": "a"}]
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=500)
        assert info.value.body["param"] == "max_completion_tokens"
        # a prompt the tokenizer cannot encode (a lone surrogate: half an emoji) is the client's
        raw = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi \\ud83d"}',
                         headers=as_json)  # fmt: skip
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"
        # half an emoji in a stop string is refused before the engine, on every route (matching
        # it as UTF-8 there failed the engine: this request, the others, every later one)
        for path, body, param in (
            ("/v1/completions", b'{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop[1]"),
            ("/v1/chat/completions",
             b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', "stop"),
            ("/v1/responses", b'{"input": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
        ):  # fmt: skip
            raw = httpx.post(f"{url}{path}", content=body, headers=as_json)
            error = raw.json()["error"]
            assert raw.status_code == 400 and error["param"] == param, (path, error)
            assert "unpaired UTF-16 surrogate" in error["message"], error
        # nor without an escape: a surrogate's own bytes, or a UTF-16 body (json.loads reads
        # both; a Responses metadata value then failed its answer with a 500)
        for body in (
            b'{"input": "hi", "metadata": {"k": "\xed\xa0\x80"}}',
            '{"input": "hi", "stop": ["\ud800"]}'.encode("utf-16", "surrogatepass"),
        ):
            raw = httpx.post(f"{url}/v1/responses", content=body, headers=as_json)
            error = raw.json()["error"]
            assert raw.status_code == 400 and "not UTF-8 text" in error["message"], error
        # a whole emoji as a pair of escapes is text
        pair = b'{"prompt": "hi", "stop": ["\\ud83d\\ude00"], "max_tokens": 2}'
        assert httpx.post(f"{url}/v1/completions", content=pair, headers=as_json).status_code == 200
        # an integer past Python's 4300 digits is the body's fault (it was a 500)
        huge = b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"
        raw = httpx.post(f"{url}/v1/completions", content=huge, headers=as_json)
        assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
        # a seed past int64 is refused before the engine, which keeps serving everyone
        raw = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "seed": 1 << 64})
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "seed"
        assert httpx.get(f"{url}/health").status_code == 200
        # routing errors are OpenAI-style bodies too
        for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/x", 404)):
            raw = httpx.request(method, f"{url}{path}")
            assert raw.status_code == status and path in raw.json()["error"]["message"]
        ok = c.completions.create(model="tiny", prompt="a", max_tokens=8)
        assert ok.choices[0].text == expected_text(TOK("a")["input_ids"], 8)
        assert _metric(url, 'fluid_requests_total{endpoint="/v1/completions",finish_reason="400"}')


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(caplog):
    """A client that disconnects half-way through its body (a timeout, a killed script) leaves
    an info line, not an ERROR with a traceback and a 500 written to nobody; others go on."""
    with caplog.at_level(logging.INFO, logger="fluid_npu.serve"), \
            serving(ScriptedScheduler()) as (url, _, _):  # fmt: skip
        host, port = url.removeprefix("http://").split(":")
        for path in ("/v1/completions", "/v1/chat/completions"):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                    'json\r\nContent-Length: 1000\r\n\r\n{"prompt": '.encode()
                )
                time.sleep(0.1)  # (the app is reading the body when the client goes)
        _until(lambda: sum("left before its request was read" in r.getMessage()
                           for r in caplog.records) == 2, "the two lines")  # fmt: skip
        ok = client(url).completions.create(model="tiny", prompt="a", max_tokens=8)
        assert ok.choices[0].text == expected_text(TOK("a")["input_ids"], 8)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("chat", [False, True])
def test_a_prompt_that_takes_long_to_tokenize_stalls_no_other_stream(chat, monkeypatch):
    """Tokenizing runs beside the event loop: a 4 MiB text takes seconds to encode, and while
    one does the streams already running go on (a helper's soak: every stream stood still for
    2.1 s). Here the tokenization of one request is held until the test releases it."""
    from fluid_npu.serve import app as app_mod
    from fluid_npu.serve import generation

    name, where = ("chat_ids", app_mod) if chat else ("completion_ids", generation)
    real, entered, release = getattr(where, name), threading.Event(), threading.Event()

    def held(tokenizer: Any, prompt: Any, *rest: Any) -> list[int]:
        if "HOLD" in json.dumps(prompt):
            entered.set()
            release.wait(60)
        return real(tokenizer, prompt, *rest)

    monkeypatch.setattr(where, name, held)
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        try:
            sched.gate.clear()  # the stream is in flight before the held request comes
            texts: list[str] = []
            run = threading.Thread(
                target=lambda: texts.extend(
                    ch.choices[0].text
                    for ch in c.completions.create(
                        model="tiny", prompt="a", max_tokens=8, stream=True
                    )
                )
            )
            run.start()
            _until(lambda: len(sched.requests) == 1, "the stream's request")
            if chat:
                msgs = [{"role": "user", "content": "HOLD"}]
                slow = threading.Thread(
                    target=lambda: c.chat.completions.create(model="tiny", messages=msgs)
                )
            else:
                slow = threading.Thread(
                    target=lambda: c.completions.create(model="tiny", prompt="HOLD")
                )
            slow.start()
            assert entered.wait(30)
            held_from = time.monotonic()  # the held request arrived before this
            sched.gate.set()
            _until(lambda: not run.is_alive(), "the stream to end while a prompt is encoded")
            assert "".join(texts) == expected_text(TOK("a")["input_ids"], 8)
            assert httpx.get(f"{url}/health").status_code == 200
            before = _metric(url, "fluid_time_to_first_token_seconds_sum")
            time.sleep(0.1)  # held a while longer than a step takes
        finally:
            release.set()
        held = time.monotonic() - held_from
        slow.join(60)
        assert len(sched.requests) == 2  # the held request went on once encoded
        # its latencies start when it arrived, not when its tokens were ready (as vLLM's)
        slow_ttft = _metric(url, "fluid_time_to_first_token_seconds_sum") - before
        assert slow_ttft >= held


def test_tokenizer_routes_answer_as_vllms():
    """vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``: the ids a completion or a
    chat request would run, their text back, the special tokens and chat template; bad bodies are
    400s naming the field."""
    with serving(ScriptedScheduler()) as (url, _, _):
        text = "Question: 2+2?"

        def post(path: str, body: dict) -> httpx.Response:
            return httpx.post(f"{url}{path}", json=body)

        got = post("/tokenize", {"model": "tiny", "prompt": text}).json()
        assert got["tokens"] == TOK(text)["input_ids"] and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == 600 and got["token_strs"] is None
        plain = post("/tokenize", {"prompt": text, "add_special_tokens": False,
                                   "return_token_strs": True}).json()  # fmt: skip
        assert post("/tokenize", {"prompt": text}).headers["content-type"] == "application/json"
        assert plain["tokens"] == TOK(text, add_special_tokens=False)["input_ids"]
        assert plain["token_strs"] == TOK.convert_ids_to_tokens(plain["tokens"])
        messages = [{"role": "user", "content": "hello"}]
        chat = post("/tokenize", {"messages": messages}).json()["tokens"]
        assert chat == TOK.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"]  # fmt: skip
        closed = post("/tokenize", {"messages": messages, "add_generation_prompt": False})
        assert len(closed.json()["tokens"]) < len(chat)
        back = post("/detokenize", {"tokens": got["tokens"]}).json()["prompt"]
        assert back == TOK.decode(got["tokens"])
        info = httpx.get(f"{url}/tokenizer_info").json()
        assert info["eos_token"] == TOK.eos_token and info["bos_token"] == TOK.bos_token
        assert info["chat_template"] == TOK.chat_template and info["model_max_length"] == 600
        for path, body, param in (
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
            ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
            ("/tokenize", {"messages": messages, "add_special_tokens": True},
             "add_special_tokens"),
            ("/tokenize", {"prompt": "a", "echo": True}, "echo"),
            ("/tokenize", {"messages": messages * 2049}, "messages"),  # (the chat route's bound)
            ("/detokenize", {"tokens": [1, -2]}, "tokens"),
            ("/detokenize", {"tokens": [10**9]}, "tokens"),
            ("/detokenize", {"tokens": "abc"}, "tokens"),
        ):  # fmt: skip
            bad = post(path, body)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (path, body)
        wrong = post("/tokenize", {"model": "other", "prompt": "a"})
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"


THINKING = (  # a Qwen3-style template: enable_thinking false closes an empty reasoning block
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def test_chat_rendering_fields_as_vllms():
    """vLLM's chat fields: ``chat_template_kwargs`` over the server's defaults
    (``--default-chat-template-kwargs``), ``add_generation_prompt``, ``continue_final_message``
    (the last assistant message continued), a request's ``chat_template`` only with
    ``--trust-request-chat-template``; ``/tokenize`` renders messages as the chat route does.
    What the engine is given is checked token for token; bad combinations are 400s naming the
    field."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = THINKING
    sched = ScriptedScheduler()
    with serving(sched, tokenizer=tok, template_kwargs={"enable_thinking": False}) as (url, _, _):
        c = client(url)
        user = [{"role": "user", "content": "hello"}]

        def sent(**body: Any) -> str:  # the prompt the engine got, as text
            c.chat.completions.create(model="tiny", max_tokens=3, **body)
            return tok.decode(sched.requests[-1].prompt)

        def post(path: str, body: dict) -> httpx.Response:
            return httpx.post(f"{url}{path}", json=body)

        assert sent(messages=user).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        thinking = sent(
            messages=user, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
        )
        assert thinking.endswith("hello<|im_end|>\n<|im_start|>assistant\n")
        assert (
            sched.requests[-1].prompt
            == post(
                "/tokenize", {"messages": user, "chat_template_kwargs": {"enable_thinking": True}}
            ).json()["tokens"]
        )
        closed = sent(messages=user, extra_body={"add_generation_prompt": False})
        assert closed.endswith("hello<|im_end|>\n")
        started = [*user, {"role": "assistant", "content": "Sure, the answer"}]
        body = {"add_generation_prompt": False, "continue_final_message": True}
        cont = sent(messages=started, extra_body=body)
        assert cont.endswith("<|im_start|>assistant\nSure, the answer")
        assert post("/tokenize", {"messages": started, **body}).json()["tokens"] == (
            sched.requests[-1].prompt)  # fmt: skip
        own = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ greeting }}"
        refused = post("/v1/chat/completions", {"messages": user, "chat_template": own})
        assert refused.status_code == 400
        assert "--trust-request-chat-template" in refused.json()["error"]["message"]
        for path, extra, param in (
            ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
            ("/v1/chat/completions", {"continue_final_message": True,
                                      "add_generation_prompt": False}, "continue_final_message"),
            ("/v1/chat/completions", {"chat_template_kwargs": {"tokenize": False}},
             "chat_template_kwargs"),
            ("/v1/chat/completions", {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
            ("/v1/chat/completions", {"chat_template_kwargs": {"conversations": []}},
             "chat_template_kwargs"),
            ("/tokenize", {"chat_template_kwargs": {"add_generation_prompt": True}},
             "chat_template_kwargs"),
            ("/tokenize", {"chat_template": own}, "chat_template"),
        ):  # fmt: skip
            bad = post(path, {"messages": user, **extra})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (path, extra)
        for name, value in (("chat_template_kwargs", {}), ("continue_final_message", False),
                            ("chat_template", own)):  # fmt: skip
            bad = post("/tokenize", {"prompt": "a", name: value}).json()["error"]
            assert bad["param"] == name and "applies to messages" in bad["message"]
    with serving(sched, tokenizer=tok, trust_request_chat_template=True) as (url, _, _):
        c = client(url)
        own_body = {"chat_template": own, "chat_template_kwargs": {"greeting": "!"}}
        c.chat.completions.create(model="tiny", messages=user, max_tokens=3, extra_body=own_body)
        assert tok.decode(sched.requests[-1].prompt) == "[hello]!"
        broken = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": user, "chat_template": "{% for m in messages %}"})  # fmt: skip
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "chat_template"
        assert "not a valid Jinja chat template" in broken.json()["error"]["message"]
        for path in ("/v1/chat/completions", "/tokenize"):  # renders nothing / fails: its fault
            for template, says in (("{% for m in messages %}{% endfor %}", "as no text"),
                                   ("{{ 1/0 }}", "division by zero")):  # fmt: skip
                bad = httpx.post(f"{url}{path}", json={"messages": user, "chat_template": template})
                error = bad.json()["error"]
                assert bad.status_code == 400 and error["param"] == "chat_template", (path, error)
                assert says in error["message"]


class ReasoningScheduler(ScriptedScheduler):
    """Answers every request with ``self.output`` (then EOS), 1-3 tokens a step."""

    def __init__(self) -> None:
        super().__init__()
        self.output: list[int] = []

    def submit(self, req: Request) -> None:
        super().submit(req)
        out = [*self.output, EOS][: req.max_new_tokens]
        self.waiting[-1] = (req, out)


def test_a_reasoning_parser_returns_the_reasoning_apart_from_the_answer():
    """``--reasoning-parser``: a thinking model's reasoning comes in the message's ``reasoning``
    (and ``reasoning_content``), the answer alone in ``content``, streamed or not, split on the
    marker tokens wherever a step's tokens fall; the markers count in usage and log-probabilities;
    a prompt that leaves the block open makes the output reasoning from its first token, a closed
    one makes it all answer; an output cut before its closing marker is all reasoning; a stop
    string ends it inside the reasoning; completions keep the text whole."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    thought, reply = "Two and two: 2+2=4, no carry.", " The answer is 4."
    sched = ReasoningScheduler()
    sched.output = [start, *ids(thought), end, *ids(reply)]
    user = [{"role": "user", "content": "2+2?"}]
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3",
                 trust_request_chat_template=True) as (url, _, _):  # fmt: skip
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=user, max_tokens=60, logprobs=True)
        message = out.choices[0].message
        assert message.content == reply and message.model_extra["reasoning"] == thought
        assert message.model_extra["reasoning_content"] == thought
        assert out.usage.completion_tokens == len(sched.output) + 1  # markers and EOS counted
        assert len(out.choices[0].logprobs.content) == len(sched.output) + 1  # as usage
        chunks = list(c.chat.completions.create(model="tiny", messages=user, max_tokens=60,
                                                stream=True))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        said = [(d.model_extra.get("reasoning") or "", d.content or "") for d in deltas]
        assert "".join(r for r, _ in said) == thought and "".join(a for _, a in said) == reply
        first_answer = min(i for i, (_, a) in enumerate(said) if a)
        assert not any(r for r, _ in said[first_answer:])  # reasoning first, then the answer
        assert all(d.content is None for d in deltas if d.model_extra.get("reasoning"))
        # a template that opens the block in the prompt: reasoning from the first token
        opened = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}<think>{% endif %}")  # fmt: skip
        sched.output = [*ids(thought), end, *ids(reply)]
        body = {"chat_template": opened}
        out = c.chat.completions.create(model="tiny", messages=user, extra_body=body)
        assert out.choices[0].message.content == reply
        assert out.choices[0].message.model_extra["reasoning"] == thought
        # closed in the prompt (enable_thinking false): all answer, the markers left out
        body = {"chat_template": opened.replace("<think>", "<think></think>")}
        out = c.chat.completions.create(model="tiny", messages=user, extra_body=body)
        assert out.choices[0].message.content == thought + reply
        assert out.choices[0].message.model_extra["reasoning"] is None
        # cut before the closing marker: all reasoning, no content
        sched.output = [start, *ids(thought), end, *ids(reply)]
        cut = c.chat.completions.create(model="tiny", messages=user, max_tokens=6)
        assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content is None
        assert cut.choices[0].message.model_extra["reasoning"] == tok.decode(sched.output[1:6])
        stopped = c.chat.completions.create(model="tiny", messages=user, stop=["=4"])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.model_extra["reasoning"] == thought.split("=4")[0]
        assert stopped.choices[0].message.content is None
        text = c.completions.create(model="tiny", prompt="2+2?", max_tokens=60).choices[0].text
        assert text == thought + reply  # completions: the text as it is (special tokens out)
        # the next turn sends the message back as the client got it (reasoning and all, or a null
        # content): the template sees the reasoning under both names
        turns = [
            *user,
            out.choices[0].message,
            cut.choices[0].message,
            {"role": "user", "content": "and 3+3?"},
        ]
        shows = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
                 "({{ m.reasoning_content }}|{{ m.reasoning }}){% endfor %}")  # fmt: skip
        c.chat.completions.create(model="tiny", messages=turns, extra_body={"chat_template": shows})
        rendered = tok.decode(sched.requests[-1].prompt)
        assert f"assistant:{thought + reply}(|)" in rendered  # (it had no reasoning: None)
        gist = tok.decode(sched.output[1:6])
        assert f"assistant:({gist}|{gist})" in rendered
        for bad in (
            {"role": "user", "content": "x", "reasoning": "r"},
            {"role": "user"},
            {"role": "assistant", "reasoning": "a", "reasoning_content": "b"},
        ):
            refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [bad]})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


def chain_scheduler(tok: Any, succ: dict[int, int], other: int, max_len: int = 128) -> Any:
    """A real ``Scheduler`` (entropy drafting) over a constructed chain Llama: after token ``x``
    it answers ``succ[x]`` (``other`` after the MASK token), whatever came before."""
    import torch

    from fluid_npu.model.tiny import build_tiny_model
    from fluid_npu.sampling.scheduler import Scheduler

    model = build_tiny_model("llama", tok, seed=0)
    size = model.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, x in enumerate([*succ, tok.mask_token_id]):
            emb[x] = basis[:, i]
            head[succ.get(x, other)] += 2.0 * basis[:, i]
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(4.0)
    model.eval()
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", eos_ids=[tok.eos_token_id],
                      max_batch=2, max_len=max_len, tokenizer=tok)  # fmt: skip
    sched.max_batch, sched.gate = 2, threading.Event()  # (what serving() reads and opens)
    return sched


def thinking_chain() -> tuple[Any, Any, int]:
    """A tokenizer with ``<think>`` / ``</think>``, a real engine over a chain Llama that answers
    ``x y </think> z m`` after ``<think>``, and the closing marker's id."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tid = tok.convert_tokens_to_ids
    start, end = tid("<think>"), tid("</think>")
    succ = {start: tid("x"), tid("x"): tid("y"), tid("y"): end, end: tid("z"),
            tid("z"): tid("m"), tid("m"): tok.eos_token_id}  # fmt: skip
    return tok, chain_scheduler(tok, succ, tid("m")), end


def test_the_engine_ends_where_the_split_text_finds_a_stop():
    """With a reasoning parser the real engine searches stop strings as the split text does:
    none spans the closing marker (``Request.stop_reset``), so a stop string made of the
    reasoning's end and the answer's start ends nothing, and one inside the answer ends it there.
    A constructed chain Llama answers ``x y </think> z m`` after a prompt that opens the block."""
    tok, sched, _ = thinking_chain()
    opened = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>"
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3",
                 trust_request_chat_template=True) as (url, _, _):  # fmt: skip
        said = {}
        for stop in (None, "yz", "zm"):
            body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 10,
                    "temperature": 0, "chat_template": opened, "stop": stop}  # fmt: skip
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
            message = r["choices"][0]["message"]
            said[stop] = (message["reasoning"], message["content"], r["usage"]["completion_tokens"])
    assert said[None] == said["yz"] == ("xy", "zm", 6)  # (x y </think> z m EOS)
    assert said["zm"] == ("xy", None, 5)  # ended at m, the stop string cut from the answer


def test_api_key():
    with serving(ScriptedScheduler(), api_key="s3cret") as (url, _, _):
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as info:
                client(url, key).completions.create(model="tiny", prompt="a", max_tokens=2)
            assert info.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        out = client(url, "s3cret").completions.create(model="tiny", prompt="a", max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # health and metrics stay open
        for method, path, body in (("POST", "/tokenize", {"prompt": "a"}),
                                   ("POST", "/detokenize", {"tokens": [5]}),
                                   ("GET", "/tokenizer_info", None)):  # fmt: skip
            assert httpx.request(method, f"{url}{path}", json=body).status_code == 401, path
            ok = httpx.request(method, f"{url}{path}", json=body,
                               headers={"Authorization": "Bearer s3cret"})  # fmt: skip
            assert ok.status_code == 200, path
    with serving(ScriptedScheduler(), api_key="clé-secrète") as (url, _, _):  # non-ASCII key
        body = {"prompt": "a", "max_tokens": 2}
        for given, status in (("clé-secrète", 200), ("wrong", 401), ("clé", 401)):
            auth = f"Bearer {given}".encode()  # a header's raw UTF-8 bytes
            raw = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": auth})
            assert raw.status_code == status, (given, raw.text)


class PacedScheduler(ScriptedScheduler):
    """A scripted scheduler whose steps run only as the test releases them."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.allowed = threading.Semaphore(0)

    def step(self) -> list[Ev]:
        assert self.allowed.acquire(timeout=60), "a test left its steps unreleased"
        return super().step()


def test_metrics_count_steps_as_they_run_like_vllm():
    # generated tokens move while a request runs (rate() follows a long generation); one
    # inter-token gap per step that gave the request tokens, however many (vLLM's ITL); TPOT once
    # per request; accepted drafts never more than the step's tokens
    sched = PacedScheduler(max_batch=2)
    with serving(sched) as (url, _, worker):
        c = client(url)
        done: list[Any] = []
        thread = threading.Thread(
            target=lambda: done.append(
                c.completions.create(
                    model="tiny", prompt="one two", max_tokens=30, extra_body={"ignore_eos": True}
                )
            )
        )
        thread.start()
        _until(lambda: worker.outstanding == 1, "the request in flight")
        sched.allowed.release(3)  # three steps: 1 + 2 + 3 tokens of 30
        _until(lambda: _metric(url, "fluid_generation_tokens_total") == 6, "tokens counted")
        assert not done and worker.outstanding == 1  # still running: its tokens already count
        sched.allowed.release(1000)
        thread.join(60)
        (out,) = done
        assert out.usage.completion_tokens == 30
        assert _metric(url, "fluid_generation_tokens_total") == 30
        # the script commits 1, 2, 3, 1, 2, 3, ... tokens a step: 30 tokens in 15 steps
        assert out.usage.forwards == 15
        assert _metric(url, "fluid_inter_token_latency_seconds_count") == 14
        assert _metric(url, "fluid_request_time_per_output_token_seconds_count") == 1
        assert _metric(url, "fluid_accepted_draft_tokens_count") == 15
        assert _metric(url, "fluid_accepted_draft_tokens_sum") == 30 - 15
        # vLLM's speculative-decoding counters: 15 verifies of 2 drafts, 0 / 1 / 2 accepted in turn
        assert _metric(url, "fluid_spec_decode_num_drafts_total") == 15
        assert _metric(url, "fluid_spec_decode_num_draft_tokens_total") == 30
        assert _metric(url, "fluid_spec_decode_num_accepted_tokens_total") == 15
        per_pos = "fluid_spec_decode_num_accepted_tokens_per_pos_total"
        assert _metric(url, per_pos + '{position="0"}') == 10
        assert _metric(url, per_pos + '{position="1"}') == 5
        # the same series under vLLM's names (its dashboards and autoscalers read these)
        for ours, theirs in VLLM_NAMES.items():
            for end in ("", "_total", "_count", "_sum"):
                assert _metric(url, theirs + end) == _metric(url, ours + end), (theirs, end)
        assert _metric(url, "vllm:generation_tokens_total") == 30
        assert _metric(url, "vllm:request_generation_tokens_sum") == 30
        assert _metric(url, "vllm:request_generation_tokens_count") == 1
        assert _metric(url, "fluid_request_prompt_tokens_sum") == out.usage.prompt_tokens
        # one request in each of the 15 steps (the last one, which ended it, included)
        assert _metric(url, "fluid_step_requests_count") == _metric(url, "fluid_step_seconds_count")
        assert _metric(url, "fluid_step_requests_sum") == 15
        text = httpx.get(f"{url}/metrics").text
        assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
        assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in text
        assert 'vllm:request_success_total{finished_reason="error",model_name="tiny"} 0.0' in text


def test_metrics_count_the_requests_of_each_step_and_the_engine_threads_cpu():
    # requests of different lengths at once: fluid_step_requests sums, over the steps, the
    # requests holding a slot — each request's forwards — whatever steps they shared; the
    # engine thread's CPU time is counted, never more than its steps' wall time
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched) as (url, _, worker):
        c = client(url)
        sched.gate.clear()  # (no step runs until all three are in: two share the second step)
        with ThreadPoolExecutor(3) as pool:
            runs = [pool.submit(
                c.completions.create,
                model="tiny", prompt="one two", max_tokens=n, extra_body={"ignore_eos": True},
            ) for n in (3, 12, 7)]  # fmt: skip
            _until(lambda: worker.outstanding == 3, "the three requests in flight")
            sched.gate.set()
            outs = [run.result(60) for run in runs]
        forwards = sum(out.usage.forwards for out in outs)
        assert forwards == 2 + 6 + 4  # 1, 2, 3, 1, 2, 3, ... tokens a step
        steps = _metric(url, "fluid_step_seconds_count")
        assert _metric(url, "fluid_step_requests_count") == steps
        assert _metric(url, "fluid_step_requests_sum") == forwards
        assert steps < forwards  # (two slots: some steps ran two requests)
        assert 'fluid_step_requests_bucket{le="2.0"}' in httpx.get(f"{url}/metrics").text
        cpu = _metric(url, "fluid_engine_cpu_seconds_total")
        assert 0 < cpu <= _metric(url, "fluid_step_seconds_sum") + 1e-3


class BreakingScheduler(ScriptedScheduler):
    """A scripted scheduler whose request for the prompt "boom" ends as the engine ends a sampling
    request whose distribution came out NaN / inf (``finish_reason`` "error", no tokens)."""

    def step(self) -> list[Ev]:
        boom = {r.request_id for r in self.requests if r.prompt == TOK("boom")["input_ids"]}
        out = []
        for ev in super().step():
            if ev.request_id in boom and ev.finish_reason != "abort":
                self.running.pop(ev.request_id, None)
                ev = Ev(ev.request_id, [], True, "error", ev.new_tokens, ev.forwards, 0)
            out.append(ev)
        return out


def test_a_request_whose_numbers_broke_is_a_500_and_others_go_on():
    sched = BreakingScheduler(max_batch=4)
    with serving(sched) as (url, _, _):
        c = client(url)
        with pytest.raises(openai.InternalServerError, match=r"NaN or inf.*bfloat16"):
            c.completions.create(model="tiny", prompt="boom", max_tokens=20, temperature=0.5)
        with _streamed_body(url, {"prompt": "boom", "max_tokens": 20, "stream": True}) as lines:
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert "NaN or inf" in events[-1]["error"]["message"]
        for stream in (False, True):  # echo scores nothing from a request whose numbers broke
            body = {"prompt": "boom", "max_tokens": 0, "echo": True, "logprobs": 1,
                    "stream": stream}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                text = resp.read().decode()
            assert ("NaN or inf" in text) and "token_logprobs" not in text, text
            assert resp.status_code == (200 if stream else 500)
        out = c.completions.create(model="tiny", prompt="fine", max_tokens=6)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.choices[0].text == expected_text(TOK("fine")["input_ids"], 6)
        assert (
            _metric(url, 'fluid_requests_total{endpoint="/v1/completions",finish_reason="error"}')
            == 4
        )


@contextlib.contextmanager
def _streamed_body(url: str, body: dict):
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        yield list(resp.iter_lines())


def test_a_release_callback_set_after_the_last_event_still_runs_once():
    """A request can finish before its handler resumes from ``submit_many`` (the delivery was
    queued on the loop ahead of the handler's wake-up, as under load): the server's callback that
    frees the request's id, attached then, runs at once — the id was held forever before — and a
    later close runs nothing twice."""
    worker = Worker(ScriptedScheduler(max_batch=1))
    early, late = Stream("a", 3), Stream("b", 3)
    worker.outstanding = 2
    calls: list[str] = []
    late.when_released(lambda: calls.append("b"))  # attached while held: runs at the release
    worker.release(early)  # (the engine's last event reached the loop first)
    early.when_released(lambda: calls.append("a"))
    assert calls == ["a"] and worker.outstanding == 1
    worker.release(late)
    worker.release(early)  # (the reader's close, later)
    assert calls == ["a", "b"] and worker.outstanding == 0


def test_a_request_the_engine_finished_holds_no_place_while_its_reader_lags():
    """A streaming client that stops reading kept its --max-queue place (and its id) until it
    closed the connection, though the engine had finished its request: an idle server answered
    429 to everyone. The place and the id go when the engine's last event reaches the loop; the
    reader's close later counts nothing twice."""
    import asyncio

    sched = ScriptedScheduler(max_batch=2)
    worker = Worker(sched)
    released: list[str] = []

    async def run() -> None:
        worker.start(asyncio.get_running_loop())
        (stream,) = await worker.submit_many([("r1", [5, 6, 7], {})], max_new_tokens=5)
        stream.when_released(lambda: released.append("r1"))  # (now, if already finished)
        for _ in range(WAIT_STEPS):
            if worker.outstanding == 0:
                break
            await asyncio.sleep(0.005)
        # nobody read the stream's queue: its events wait there, its place and id are free
        assert worker.outstanding == 0 and released == ["r1"] and not stream.held
        events = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
        assert events[-1].finished and sum(len(e.tokens) for e in events) == 5
        worker.release(stream)  # (the reader's close, later)
        assert worker.outstanding == 0 and released == ["r1"]

    try:
        asyncio.run(run())
    finally:
        worker.stop()
