"""The lifecycle of ``fluid serve``'s HTTP layer against the scripted scheduler of
``test_serve_http``: 429 with ``Retry-After`` past the queue, client disconnects (streamed or not)
abort their requests, the SIGTERM drain finishes what is in flight (or aborts it at the deadline),
and an engine failure answers 500 and turns ``/health`` unhealthy."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from test_serve_http import TOK, ScriptedScheduler, _metric, _until, client, expected_text, serving


def _streamed(url: str, prompt: str, max_tokens: int) -> Any:
    """The httpx stream of a completion that ignores EOS (a context manager)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}  # fmt: skip
    return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60)


def _sse_text(lines: Any) -> tuple[str, str | None]:
    """The text and finish reason of a completion stream's lines."""
    text, reason = "", None
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    return text, reason


def stream_text(url: str, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    with _streamed(url, prompt, max_tokens) as resp:
        return _sse_text(resp.iter_lines())


def test_queue_full_is_429_with_retry_after():
    sched = ScriptedScheduler(max_batch=1)
    with serving(sched, max_queue=1) as (url, _, worker):
        sched.gate.clear()  # steps wait: the requests stay in flight
        results: list[tuple[str, str | None]] = []

        def run(prompt: str) -> None:
            results.append(stream_text(url, prompt, 12))

        threads = [threading.Thread(target=run, args=(p,)) for p in ("first", "second")]
        for t in threads:
            t.start()
        _until(lambda: worker.outstanding == 2, "two requests in flight")
        with pytest.raises(openai.RateLimitError) as info:
            client(url).completions.create(model="tiny", prompt="third", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "queue_full"
        sched.gate.set()
        for t in threads:
            t.join(60)
        assert sorted(results) == sorted(
            (expected_text(TOK(p)["input_ids"], 12, eos=False), "length")
            for p in ("first", "second")
        )
        assert client(url).completions.create(model="tiny", prompt="a", max_tokens=2).choices


def test_client_disconnect_aborts_the_request():
    sched = ScriptedScheduler(max_batch=1, step_s=0.002)
    with serving(sched) as (url, _, worker):
        with _streamed(url, "long one", 500) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # the client went away mid-stream
        _until(lambda: len(sched.aborted) == 1, "the abort of the streamed request")
        _until(lambda: worker.outstanding == 0, "the slot to be free")

        sched.gate.clear()  # a non-streamed request whose client gives up while it waits
        # (long enough that its abort, however late the server sees the client go, comes first)
        body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        sched.gate.set()
        _until(lambda: len(sched.aborted) == 2, "the abort of the non-streamed request")
        assert (
            _metric(url, 'fluid_requests_total{endpoint="/v1/completions",finish_reason="abort"}')
            == 2
        )
        out = client(url).completions.create(model="tiny", prompt="next", max_tokens=4)
        assert out.usage.completion_tokens == 4


def test_a_retry_under_the_id_of_a_request_just_abandoned_gets_its_own_answer():
    """A gateway that gives up on a request and retries it at once under the same
    ``X-Request-Id``: the id is free as soon as the first is aborted, before the engine's next
    step retires it; that retirement must not end the retry, which answers in full."""
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched) as (url, _, worker):
        sched.gate.clear()  # the engine is held inside a step until both have come
        head = {"X-Request-Id": "retried"}
        body = {"prompt": "x", "max_tokens": 12, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers=head, timeout=0.5)
        answers: list[httpx.Response] = []

        def retry() -> None:
            while not answers or answers[-1].status_code == 400:  # (400: not yet let go)
                answers.append(httpx.post(f"{url}/v1/completions", json=body, headers=head,
                                          timeout=60))  # fmt: skip

        thread = threading.Thread(target=retry)
        thread.start()
        _until(lambda: worker.inbox.qsize() >= 2, "the abort and the retry")
        sched.gate.set()
        thread.join(60)
        got = answers[-1].json()
        assert answers[-1].status_code == 200, got
        assert got["id"] == "cmpl-retried" and got["choices"][0]["finish_reason"] == "length"
        assert got["choices"][0]["text"] == expected_text(TOK("x")["input_ids"], 12, eos=False)
        _until(lambda: worker.outstanding == 0 and not sched.has_work(), "nothing left running")


def test_a_disconnect_aborts_every_prompt_of_a_request():
    sched = ScriptedScheduler(max_batch=2, step_s=0.002)
    with serving(sched) as (url, _, worker):
        body = {"model": "tiny", "prompt": ["p one", "p two", "p three"], "max_tokens": 500,
                "stream": True, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            assert next(line for line in resp.iter_lines() if line.startswith("data: "))
        _until(lambda: len(sched.aborted) == 3, "the abort of all three prompts")
        _until(lambda: worker.outstanding == 0, "the slots to be free")
        sched.gate.clear()  # not streamed: the client gives up while they wait
        body = {"prompt": ["x", "y"], "max_tokens": 500, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        sched.gate.set()
        _until(lambda: len(sched.aborted) == 5, "the abort of both prompts")
        _until(lambda: worker.outstanding == 0, "the slots to be free")


def test_sigterm_drain_finishes_requests_in_flight():
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched) as (url, server, worker):
        sched.gate.clear()
        results: list[tuple[str, str | None]] = []
        prompts = ("alpha", "beta")

        def run(prompt: str) -> None:
            results.append(stream_text(url, prompt, 30))

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        _until(lambda: worker.outstanding == 2, "two requests in flight")
        server.handle_exit(signal.SIGTERM, None)  # what the SIGTERM handler runs
        assert worker.draining
        _until(lambda: server.should_exit, "the server to stop accepting")
        time.sleep(0.3)  # uvicorn closes its listening socket on its next tick
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
        sched.gate.set()
        for t in threads:
            t.join(60)
        want = sorted(
            (expected_text(TOK(p)["input_ids"], 30, eos=False), "length") for p in prompts
        )
        assert sorted(results) == want


def test_drain_timeout_aborts_what_is_still_running():
    sched = ScriptedScheduler(max_batch=1, step_s=0.01)
    with serving(sched, drain_timeout=0.2) as (url, server, _):
        with _streamed(url, "slow", 550) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.handle_exit(signal.SIGTERM, None)
            text, reason = _sse_text([first, *lines])
        assert reason == "abort" and 0 < len(text) < 550


def test_engine_failure_is_500_and_unhealthy():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        sched.gate.clear()
        box: list[Any] = []
        t = threading.Thread(
            target=lambda: box.append(
                httpx.post(
                    f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=60
                )
            )
        )
        t.start()
        _until(lambda: sched.waiting, "the request to be queued")
        sched.fail = True
        sched.gate.set()
        t.join(60)
        assert box[0].status_code == 500 and "device lost" in box[0].json()["error"]["message"]
        # counted once: as a request that ended in an error, not also as a refusal
        assert _metric(url, "fluid_requests_total") == 1
        errors = 'fluid_requests_total{endpoint="/v1/completions",finish_reason="error"}'
        assert _metric(url, errors) == 1
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        with pytest.raises(openai.InternalServerError):
            client(url).completions.create(model="tiny", prompt="a", max_tokens=2)


def test_a_stream_whose_engine_fails_ends_with_the_error_then_done():
    """The engine fails mid-stream: an OpenAI-style error event, then ``[DONE]`` (as vLLM ends
    such a stream), so a client reading to ``[DONE]`` is not left waiting."""
    sched = ScriptedScheduler(max_batch=2, step_s=0.01)
    with serving(sched) as (url, _, _):
        lines: list[str] = []
        body = {"prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}

        def read() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=read)
        t.start()
        _until(lambda: len(lines) > 2, "the stream under way")
        sched.fail = True
        t.join(60)
        assert lines[-1] == "data: [DONE]"
        assert "device lost" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]


def test_gauges_fall_to_zero_when_the_engine_fails():
    sched = ScriptedScheduler(max_batch=2, step_s=0.01)
    with serving(sched) as (url, _, _):
        codes: list[int] = []
        body = {"prompt": "x", "max_tokens": 300, "ignore_eos": True}

        def ask() -> None:
            codes.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        _until(lambda: _metric(url, "fluid_num_requests_running") == 2, "two running")
        sched.fail = True
        for t in threads:
            t.join(60)
        assert codes == [500, 500]
        assert _metric(url, "fluid_num_requests_running") == 0
        assert _metric(url, "fluid_num_requests_waiting") == 0
