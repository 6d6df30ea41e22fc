"""``fluid serve --data-parallel-size N`` (``serve/router.py``, ``serve/dp.py``): the routing rule,
the metrics merge and the ranks' devices alone; the front app relaying to in-process scripted
ranks (answers equal to a rank's own, streams, 429 passed on to the next rank, a rank down, a
client gone, auth); and the real command with two engine ranks, driven by the ``openai`` client,
its outputs equal to ``fluid generate``'s, a conversation's next turn sent to the rank that holds
it, and SIGTERM draining every process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from test_serve_http import ScriptedScheduler, _metric, _until, client, serving
from test_serve_live import PROMPTS, model_dir, offline  # noqa: F401 (a fixture)

import fluid_npu
from fluid_npu.device import kind, rank_environments
from fluid_npu.errors import ConfigError
from fluid_npu.serve.dp import Ranks, rank_args
from fluid_npu.serve.launch import ServerProcess
from fluid_npu.serve.router import HEALTH_S, Front, create_front, merge_metrics
from fluid_npu.serve.routing import (
    BLOCK,
    MIN_SHARED,
    RECENT,
    SHARED_PER_REQUEST,
    Router,
    block_hashes,
    routing_key,
    routing_salt,
)
from fluid_npu.serve.server import ServeSettings, bind

RANK_KEY = "rank-key"


def test_routing_keys_and_their_blocks():
    turn = [{"role": "user", "content": "x" * 300}]
    after = [*turn, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    first = routing_key("/v1/chat/completions", {"messages": turn})
    second = routing_key("/v1/chat/completions", {"messages": after})
    assert second.startswith(first[:-2])  # all but the closing brackets: the next turn extends it
    one, two = block_hashes(first), block_hashes(second)
    assert len(one) == len(first) // BLOCK and two[: len(one)] == one  # (closing in no block)
    assert block_hashes("a" * (BLOCK - 1)) == [] and block_hashes("ab" * BLOCK)[1:] != []
    assert routing_key("/v1/completions", {"prompt": ["abc", "d"]}) == "abc"
    assert routing_key("/v1/completions", {"prompt": [1, 2]}) == "[1, 2]"
    assert routing_key("/v1/completions", "not an object") == ""
    responses = routing_key("/v1/responses", {"instructions": "be brief", "input": turn})
    assert "be brief" in responses and json.dumps(turn[0]["content"]) in responses


def test_the_router_weighs_a_shared_start_against_the_wait():
    router = Router(3, slack=4)
    history = "h" * (4 * SHARED_PER_REQUEST)  # a long conversation: worth 4 requests of wait
    system = "s" * MIN_SHARED  # a short system prompt: worth none
    assert router.pick(history + "a") == (0, False)  # nothing known: the least busy, then first
    router.start(0)
    router.remember(0, history + "a")
    for busy in (1, 2, 3, 4):  # the next turn follows its history while 4 or fewer wait there
        assert router.busy[0] == busy and router.pick(history + "b") == (0, True)
        router.start(0)
    assert router.pick(history + "b") == (1, False)  # 5 busy against 0: the least busy
    router.start(1)
    router.remember(1, system + "x")
    assert router.pick(system + "y") == (2, False)  # rank 1 holds it, but is busier than rank 2
    router.remember(2, system + "z")
    assert router.pick(system + "w") == (2, True)  # both hold it: the less busy
    assert router.pick(system[:-1]) == (2, False)  # less than MIN_SHARED shared: none followed
    assert router.pick(history, skip={0, 2}) == (1, False)
    assert router.pick(history, skip={0, 1, 2}) is None
    for _ in range(5):
        router.end(0)
    assert router.busy == [0, 1, 0]
    for k in range(RECENT):  # the oldest requests are forgotten
        router.remember(0, f"{k:08d}" * BLOCK)
    assert router.shared(0, block_hashes(history)) == 0 and not router.pick(history + "c")[1]


def test_a_cache_salt_follows_only_its_own_salts_requests():
    """A salted request's start is compared only with requests of its salt (as a rank reuses
    only their cache rows): another tenant's history neither draws it nor shows in the affinity."""
    router = Router(2, slack=4)
    history = "h" * (4 * SHARED_PER_REQUEST)
    router.start(0)
    router.remember(0, history + "a", salt="tenant-b")
    router.start(1)  # (both ranks equally busy)
    assert router.pick(history + "b", salt="tenant-a") == (0, False)  # not followed: no affinity
    assert router.pick(history + "b") == (0, False)
    assert router.pick(history + "b", salt="tenant-b") == (0, True)
    assert block_hashes(history, "x") != block_hashes(history) != block_hashes(history, "y")
    assert routing_salt({"cache_salt": "t"}) == "t" and routing_salt({"cache_salt": 5}) is None


def test_metrics_of_every_rank_in_one_text():
    from prometheus_client.parser import text_string_to_metric_families

    one = '# HELP x_total X\n# TYPE x_total counter\nx_total{a="1"} 2.0\n'
    two = '# HELP x_total X\n# TYPE x_total counter\nx_total{a="1"} 5.0\n'
    merged = merge_metrics([one, two, ""]).decode()
    assert merged.count("# TYPE x_total counter") == 1
    [family] = text_string_to_metric_families(merged)
    assert {(s.labels["rank"], s.value) for s in family.samples} == {("0", 2.0), ("1", 5.0)}


def test_each_rank_gets_its_device_and_the_commands_flags():
    assert kind("cpu") == "cpu" and rank_environments("cpu", 2, 0) == [{}, {}]
    assert rank_environments("npu", 2, 8, {}) == [
        {"ASCEND_RT_VISIBLE_DEVICES": "0"}, {"ASCEND_RT_VISIBLE_DEVICES": "1"}]  # fmt: skip
    given = {"CUDA_VISIBLE_DEVICES": "4, 6,7"}  # the ones visible, in order
    assert [e["CUDA_VISIBLE_DEVICES"] for e in rank_environments("cuda", 3, 8, given)] == [
        "4", "6", "7"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"--data-parallel-size 4 .* 3 are visible"):
        rank_environments("cuda", 4, 8, given)
    from fluid_npu.cli import build_parser

    settings = ServeSettings(model="m", khead="k", api_key="secret", port=9, data_parallel_size=2,
                             adaptive=False, prefix_caching=False, compile=True,
                             tool_call_parser="hermes", enable_auto_tool_choice=True,
                             scheduling_policy="priority", logprobs_mode="raw_logits",
                             return_tokens_as_token_ids=True, max_logprobs=-1,
                             served_model_name=("a", "b"), trust_remote_code=True,
                             root_path="/llm", uvicorn_log_level="info",
                             engine_process=False)  # fmt: skip
    args = build_parser().parse_args(["serve", *rank_args(settings, threads=3)])
    assert args.served_model_name == ["a", "b"] and args.trust_remote_code
    assert args.no_engine_process  # (each rank's engine in a thread too, as the front was told)
    default = ServeSettings(model="m", data_parallel_size=2)  # (the default: a process each)
    assert not build_parser().parse_args(["serve", *rank_args(default, None)]).no_engine_process
    assert args.root_path == "" and args.uvicorn_log_level == "info"  # (the front's own path)
    assert args.scheduling_policy == "priority" and args.logprobs_mode == "raw_logits"
    assert args.return_tokens_as_token_ids and args.max_logprobs == -1
    seeded = Ranks(ServeSettings(model="m", seed=5, data_parallel_size=2))
    assert [build_parser().parse_args(["serve", *seeded._args(i)]).seed for i in (0, 1)] == [5, 6]
    assert (args.model, args.khead, args.threads) == ("m", "k", 3)
    assert args.no_adaptive_drafting and args.no_enable_prefix_caching and args.compile
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    assert args.api_key is None and args.port == 8000 and args.data_parallel_size is None


@contextlib.contextmanager
def fronting(front: Front, root_path: str = ""):
    """The front app in-process on 127.0.0.1 at a free port; yields its URL."""
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(create_front(front), log_level="warning", lifespan="on",
                            root_path=root_path)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _until(lambda: server.started, "the front to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_the_front_relays_to_the_ranks(caplog):
    """Answers (whole and streamed) are the rank's own; a full rank (429) passes the request on
    and only all full is a 429; a rank down is skipped and makes /health 503; a client gone
    aborts the request on its rank; the front's key, not the ranks', lets clients in."""
    scheds = [ScriptedScheduler(max_batch=1, step_s=0.002) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serving(s, api_key=RANK_KEY, max_queue=0))[0] for s in scheds]
        down: set[int] = set()
        front = Front(urls=urls, rank_key=RANK_KEY, api_key="front-key", slack=8,
                      alive=lambda r: r not in down)  # fmt: skip
        url = stack.enter_context(fronting(front))
        c = client(url, "front-key")
        direct = client(urls[0], RANK_KEY).completions.create(model="tiny", prompt="hello",
                                                              max_tokens=12)  # fmt: skip
        caplog.set_level("INFO", logger="fluid_npu.serve.routing")  # (--enable-log-requests)

        def routing() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "fluid_npu.serve.routing"]

        out = c.completions.create(model="tiny", prompt="hello", max_tokens=12)
        [routed] = routing()
        path, rid, arrow = routed.split(" ")[:3]  # the front's id for it, passed to the rank:
        assert (path, arrow) == ("/v1/completions", "->") and routed.endswith(": 200")
        assert out.id == f"cmpl-{rid}"  # (the answer names it)
        assert out.choices[0].text == direct.choices[0].text and out.usage == direct.usage
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt="hello", max_tokens=12, stream=True) if ch.choices)  # fmt: skip
        assert streamed == direct.choices[0].text
        assert c.models.list().data[0].id == "tiny"
        assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, RANK_KEY).completions.create(model="tiny", prompt="a", max_tokens=2)
        # rank 0 busy (its queue holds none): a request that follows it there gets its 429 and
        # goes on to rank 1; with both busy the client gets the 429
        for sched in scheds:
            sched.gate.clear()
        shared = "a long few-shot block " * 25  # (550 characters: worth one request of wait)
        held: list[Any] = []

        def hold(prompt: str) -> None:
            held.append(c.completions.create(model="tiny", prompt=prompt, max_tokens=3))

        workers = [threading.Thread(target=hold, args=(shared + "one",))]
        workers[0].start()
        _until(lambda: scheds[0].waiting or scheds[0].running, "rank 0 busy")
        workers.append(threading.Thread(target=hold, args=(shared + "two",)))
        workers[1].start()
        _until(lambda: scheds[1].waiting or scheds[1].running, "rank 1 busy")
        with pytest.raises(openai.RateLimitError) as full:
            c.completions.create(model="tiny", prompt="three", max_tokens=3)
        assert full.value.body["code"] == "queue_full"  # (the rank's own 429)
        assert routing()[-1].endswith(" refused: 429 (every rank full)")
        for sched in scheds:
            sched.gate.set()
        for t in workers:
            t.join(60)
        assert len(held) == 2 and [len(s.requests) for s in scheds] == [2 + 1, 2]
        # a client that leaves mid-stream: its rank aborts the request
        aborted = sum(len(s.aborted) for s in scheds)
        body = {"prompt": "long", "max_tokens": 500, "stream": True, "ignore_eos": True}
        headers = {"authorization": "Bearer front-key"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
        _until(lambda: sum(len(s.aborted) for s in scheds) == aborted + 1, "the rank's abort")
        for sched in scheds:  # ... and one that gives up waiting for a whole answer
            sched.gate.clear()
        # (long enough that its abort, however late the servers see the client go, comes first)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "prompt": "x", "stream": False},
                       headers=headers, timeout=0.5)  # fmt: skip
        for sched in scheds:
            sched.gate.set()
        _until(lambda: sum(len(s.aborted) for s in scheds) == aborted + 2, "the second abort")
        assert httpx.get(f"{url}/health").json()["info"]["data_parallel_size"] == 2
        merged = httpx.get(f"{url}/metrics").text
        assert 'fluid_prompt_tokens_total{rank="1"}' in merged and "fluid_dp_requests" in merged
        assert 'vllm:prompt_tokens_total{model_name="tiny",rank="1"}' in merged
        down.add(0)  # rank 0 is gone: everything goes to rank 1
        before = _metric(urls[1], "fluid_requests_total")
        for _ in range(3):
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        assert _metric(urls[1], "fluid_requests_total") == before + 3
        answer = c.responses.create(model="tiny", input="hello", max_output_tokens=12)
        assert answer.output_text == client(urls[1], RANK_KEY).responses.create(
            model="tiny", input="hello", max_output_tokens=12).output_text  # fmt: skip
        assert c.responses.input_tokens.count(model="tiny", input="hello").input_tokens == (
            answer.usage.input_tokens
        )
        with pytest.raises(openai.NotFoundError) as info:  # (the front answers as a rank)
            c.responses.retrieve(answer.id)
        assert info.value.body["code"] == "response_not_found"
        with pytest.raises(openai.AuthenticationError):
            client(url, RANK_KEY).responses.delete(answer.id)
        traced = c.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                      extra_headers={"X-Request-Id": "trace-7"})  # fmt: skip
        assert traced.id == "cmpl-trace-7"  # (the client's id reaches the rank)
        assert "/v1/completions trace-7 -> rank " in routing()[-1]
        odd = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                         headers={"Authorization": "Bearer front-key",
                                  "X-Request-Id": "caf\u00e9".encode()})  # fmt: skip
        assert odd.status_code == 400 and "X-Request-Id" in odd.json()["error"]["message"]
        named = c.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                     extra_body={"request_id": "job-3"})  # fmt: skip
        assert named.id == "cmpl-job-3"  # vLLM's body field, where no header gives one
        assert "/v1/completions job-3 -> rank " in routing()[-1]
        # one running request per id across the ranks: the front refuses the second
        for sched in scheds:  # (the first runs for seconds while the second comes)
            sched.step_s = 0.02
        long = {"prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
        auth = {"Authorization": "Bearer front-key", "X-Request-Id": "same"}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=auth) as first:
            lines = first.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)
            again = httpx.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 1},
                               headers=auth)  # fmt: skip
            assert again.status_code == 400
            assert "belongs to a request still running" in again.json()["error"]["message"]

        def reused() -> bool:
            again = httpx.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 1},
                               headers=auth)  # fmt: skip
            return again.status_code == 200 and again.json()["id"] == "cmpl-same"

        for sched in scheds:
            sched.step_s = 0.002
        _until(reused, "the id free again once its stream closed")
        assert httpx.get(f"{url}/version").json()["version"] == fluid_npu.__version__


def test_a_rank_that_fails():
    """A rank whose engine failed refuses before anything runs: the request goes to the next
    rank, and the failed one leaves the rotation (/health 503 names it). A rank that dies while
    answering ends the request with an error — an error event in a stream, a 502 for a whole
    answer — and it is not sent again. Routing errors are OpenAI-shaped too."""
    scheds = [ScriptedScheduler(max_batch=2, step_s=0.005) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        ranks = [stack.enter_context(serving(s, api_key=RANK_KEY)) for s in scheds]
        url = stack.enter_context(fronting(Front(urls=[r[0] for r in ranks], rank_key=RANK_KEY)))
        assert httpx.get(f"{url}/v1/completions").json()["error"]["type"] == (
            "invalid_request_error")  # fmt: skip
        assert httpx.post(f"{url}/v1/embeddings").status_code == 404
        ranks[0][2].draining = True  # rank 0 shutting down (503): requests go to rank 1
        c = client(url)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        assert (len(scheds[0].requests), len(scheds[1].requests)) == (0, 1)
        ranks[0][2].draining = False
        _until(lambda: httpx.get(f"{url}/health").status_code == 200, "rank 0 back")
        time.sleep(HEALTH_S + 0.5)  # (the front's own poll has seen it: rank 0 takes requests)
        scheds[0].fail = True  # rank 0's next step fails: its engine is gone
        direct = client(ranks[0][0], RANK_KEY)
        with pytest.raises(openai.InternalServerError):
            direct.completions.create(model="tiny", prompt="a", max_tokens=2)
        for _ in range(3):
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        assert len(scheds[1].requests) == 4 and len(scheds[0].requests) == 1
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["ranks"][0]["status"] == "engine failed"
        # rank 1 goes away in the middle of two answers
        results: dict[str, Any] = {}

        def whole() -> None:
            results["whole"] = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "prompt": "w", "max_tokens": 400, "ignore_eos": True})  # fmt: skip

        def streamed() -> None:
            body = {"prompt": "s", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        workers = [threading.Thread(target=f) for f in (whole, streamed)]
        for t in workers:
            t.start()
        _until(lambda: len(scheds[1].running) == 2, "both answers under way")
        server = ranks[1][1]
        server.force_exit = server.should_exit = True
        for t in workers:
            t.join(60)
        # (the whole answer: the rank's own 500 as its engine stops, or the front's 502 when the
        # connection goes first)
        assert results["whole"].status_code in (500, 502)
        assert results["whole"].json()["error"]["type"] == "server_error"
        assert results["stream"][-1] == "data: [DONE]"  # (after the error, as vLLM ends it)
        last = json.loads(results["stream"][-2].removeprefix("data: "))
        assert "engine rank 1 failed while answering" in last["error"]["message"]
        assert len(scheds[0].requests) == 1  # neither was sent again


def test_serve_with_two_engine_ranks(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """The real command: 8 concurrent streams over two engine ranks, each output equal to
    ``fluid generate``'s; a conversation's second turn goes to the rank whose slot holds the
    first (its prompt found there); the front serves HTTPS, answers the allowed browser origin
    and passes a client's X-Request-Id on (``test_serve_network.py`` checks one engine);
    SIGTERM drains the ranks and every process exits 0."""
    from test_serve_network import CERT, KEY, PAGE, STOP_S

    monkeypatch.setenv("SSL_CERT_FILE", CERT)  # (every client here trusts the test certificate)
    key = "dp-key"
    args = ["--model", model_dir, "--max-batch", "4", "--max-len", "160", "--api-key", key,
            "--data-parallel-size", "2", "--no-adaptive-drafting", "--enable-log-requests",
            "--ssl-keyfile", KEY, "--ssl-certfile", CERT, "--allowed-origins", f'["{PAGE}"]',
            "--enable-request-id-headers"]  # fmt: skip
    want = offline(model_dir, tmp_path, PROMPTS[:8], 24)
    with ServerProcess(args, stop_timeout=STOP_S) as front:  # (its clients stay open)
        assert front.url.startswith("https://")
        traced = httpx.post(f"{front.url}/v1/completions", json={"prompt": "abc", "max_tokens": 2},
                            headers={"Authorization": f"Bearer {key}", "Origin": PAGE,
                                     "X-Request-Id": "dp-1"})  # fmt: skip
        assert traced.json()["id"] == "cmpl-dp-1" and traced.headers["x-request-id"] == "dp-1"
        assert traced.headers["access-control-allow-origin"] == PAGE
        c = client(front.url, key)
        got: dict[str, str] = {}

        def stream(prompt: str) -> None:
            chunks = c.completions.create(model="model", prompt=prompt, max_tokens=24,
                                          temperature=0, stream=True)  # fmt: skip
            got[prompt] = "".join(ch.choices[0].text for ch in chunks if ch.choices)

        threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS[:8]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(p) for p in PROMPTS[:8]] == [row["text"] for row in want]
        per_rank = [_metric(front.url, f'fluid_dp_requests_total{{affinity="false",rank="{r}"}}')
                    for r in (0, 1)]  # fmt: skip
        assert min(per_rank) >= 1 and sum(per_rank) == 9
        turn = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 2}]
        first = c.chat.completions.create(model="model", messages=turn, max_tokens=8,
                                          temperature=0)  # fmt: skip
        turn += [first.choices[0].message, {"role": "user", "content": "and then?"}]
        second = c.chat.completions.create(model="model", messages=turn, max_tokens=8,
                                           temperature=0)  # fmt: skip
        assert second.usage.prompt_tokens_details.cached_tokens >= 16
        assert _metric(front.url, "fluid_dp_requests_total") == 11
        routed = [line for line in front.log_tail(100_000).splitlines() if " -> rank " in line]
        assert len(routed) == 11 and routed[-1].endswith(" (its start): 200")  # (the 2nd turn)
        health = httpx.get(f"{front.url}/health").json()
        assert health["info"]["data_parallel_size"] == 2 and health["info"]["torch_threads"] == 1
    # leaving the block sent SIGTERM to the front: it drained its ranks, and exits 0 only when
    # every rank did
    assert front.returncode == 0


def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    from pathlib import Path

    try:  # (a zombie has ended: only its exit status is left)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ranks_end_when_their_front_is_killed(model_dir):  # noqa: F811
    """A front killed outright (SIGKILL: no drain) leaves no rank running on its devices: each
    sees its parent gone, drains and exits."""
    args = ["--model", model_dir, "--max-len", "64", "-dp", "2", "--policy", "ar"]
    with ServerProcess(args) as front:
        ranks = _children(front.proc.pid)
        assert len(ranks) == 2 and all(_running(r) for r in ranks)
        logs = [os.readlink(f"/proc/{r}/fd/1") for r in ranks]  # (a killed front leaves them)
        front.kill()
        _until(lambda: not any(_running(r) for r in ranks), "the ranks to exit")
    for log in logs:
        with contextlib.suppress(OSError):
            os.unlink(log)


def test_a_parent_pid_that_is_not_the_front(monkeypatch):
    """``$FLUID_PARENT_PID`` is read once and not handed on; a live process that is not this
    one's parent is ignored (nothing watched), a front already gone is one clear error."""
    from fluid_npu.serve.server import PARENT_ENV, watch_parent

    monkeypatch.setenv(PARENT_ENV, str(os.getpid()))  # alive, but not our parent
    before = threading.active_count()
    watch_parent()
    assert PARENT_ENV not in os.environ and threading.active_count() == before
    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setenv(PARENT_ENV, str(gone.pid))
    with pytest.raises(ConfigError, match=f"front \\(process {gone.pid}\\) has exited"):
        watch_parent()


def test_a_taken_port_is_refused_before_any_rank_is_made(tmp_path, monkeypatch):
    """The front's port is bound before the ranks are made: a taken one is one error, and no
    rank process or log file is left behind."""
    import socket
    import tempfile

    from fluid_npu.serve.dp import serve_data_parallel

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (where rank logs would go)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        settings = ServeSettings(model="m", port=taken.getsockname()[1], data_parallel_size=2)
        with pytest.raises(ConfigError, match="choose another --port"):
            serve_data_parallel(settings)
    assert list(tmp_path.iterdir()) == []
