"""``fluid serve``'s engine in a child process of the server (the default), end to end.

Real servers on 127.0.0.1 over the "chain" model of ``test_serve_live`` (wide margins, accepted
drafts): outputs equal ``fluid generate``'s (16 concurrent streams included), a grammar crosses to
the engine, the metrics come from the child's steps, a disconnect frees the slot, the first Ctrl-C
to the whole process group drains and leaves no process behind, an engine process that dies fails
its requests (stream, ``/health``, new requests, the exit status), one whose server is killed
outright ends by itself, and a model that does not load is the same one error as with the engine
in a thread (``--no-engine-process``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest
from test_serve_live import MAX_LEN, PROMPTS, _metric, _poll, model_dir, offline  # noqa: F401

from fluid_npu.cli import main
from fluid_npu.serve.launch import ServerProcess


def _engine_pid(server: ServerProcess) -> int:
    """The server's child that runs its engine (multiprocessing's resource tracker aside)."""
    assert server.proc is not None
    tasks = Path(f"/proc/{server.proc.pid}/task")
    kids = [int(p) for t in tasks.iterdir() for p in (t / "children").read_text().split()]
    cmd = {k: Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ") for k in kids}
    engines = [k for k in kids if b"spawn_main" in cmd[k]]
    assert len(engines) == 1, cmd
    return engines[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    args = ["--model", model_dir, "--max-batch", "8", "--max-len", str(MAX_LEN),
            "--no-adaptive-drafting"]  # fmt: skip
    with ServerProcess(args) as proc:
        yield proc
    assert proc.returncode == 0, proc.log_tail()


def test_outputs_equal_fluid_generate_with_16_concurrent_streams(server, model_dir, tmp_path):  # noqa: F811
    info = server.health["info"]
    assert info["engine_process"] is True and info["engine_gc_frozen_objects"] > 1000
    # the HTTP stack uvicorn's "auto" chose: uvloop and httptools where installed (setup.py's)
    fast = {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools")}
    assert info["event_loop"] == ("uvloop" if fast["uvloop"] else "asyncio")
    assert info["http_parser"] == ("HttpTools" if fast["httptools"] else "H11")
    assert not _gone(_engine_pid(server))
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    model = c.models.list().data[0].id
    want = {row["prompt"]: row for row in offline(model_dir, tmp_path, PROMPTS, 48)}
    got: dict[str, str] = {}

    def stream(prompt: str) -> None:
        chunks = c.completions.create(model=model, prompt=prompt, max_tokens=48, temperature=0,
                                      stream=True)  # fmt: skip
        got[prompt] = "".join(ch.choices[0].text for ch in chunks)

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {p: want[p]["text"] for p in PROMPTS}
    tpf = []
    for prompt in PROMPTS[:4]:
        out = c.completions.create(model=model, prompt=prompt, max_tokens=48, temperature=0)
        assert out.choices[0].text == want[prompt]["text"]
        tpf.append(out.usage.model_extra["tpf"])
    assert max(tpf) > 1.5  # drafts accepted in the child's steps
    chat_want = offline(model_dir, tmp_path, ["abc"], 30, chat=True)[0]
    reply = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "abc"}], max_tokens=30, temperature=0
    )
    assert reply.choices[0].message.content == chat_want["text"]
    # the metrics are the child's steps, relayed: every generated token counted once
    tokens = sum(len(want[p]["token_ids"]) for p in (*PROMPTS, *PROMPTS[:4]))
    tokens += reply.usage.completion_tokens
    assert _metric(server.url, "fluid_generation_tokens_total") == tokens
    assert _metric(server.url, "fluid_step_requests_count") > 0
    assert _metric(server.url, "fluid_engine_cpu_seconds_total") > 0
    assert _metric(server.url, "fluid_num_requests_running") == 0


def test_a_grammar_crosses_into_the_engine(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    model = c.models.list().data[0].id
    free = c.completions.create(model=model, prompt="abc", max_tokens=8, temperature=0)
    choices = ["zebra", "yak"]
    assert free.choices[0].text not in choices
    ask = {"model": model, "prompt": "abc", "temperature": 0}
    chosen = c.completions.create(
        **ask, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}}
    )
    assert chosen.choices[0].text in choices
    pattern = "[0-9]{3}-[a-c]{2}"
    matched = c.completions.create(
        **ask, max_tokens=12, extra_body={"structured_outputs": {"regex": pattern}}
    )
    assert re.fullmatch(pattern, matched.choices[0].text), matched.choices[0].text


def test_disconnect_frees_the_slot_and_ctrl_c_to_the_group_drains(model_dir, tmp_path):  # noqa: F811
    args = ["--model", model_dir, "--max-batch", "1", "--policy", "ar", "--max-len", "600"]
    long_body = {"model": "model", "prompt": "xx", "max_tokens": 500, "stream": True,
                 "ignore_eos": True}  # fmt: skip
    want = offline(model_dir, tmp_path, ["nop"], 300)[0]
    with ServerProcess(args, new_session=True) as proc:
        url, engine = proc.url, _engine_pid(proc)
        with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=60) as resp:
            first = next(line for line in resp.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
        _poll(lambda: _metric(url, "fluid_num_requests_running") == 0, "the slot to be freed")
        assert _metric(url, "fluid_step_seconds_count") < 100  # aborted, not run to 500 tokens

        result: list[str] = []

        def run() -> None:
            body = {"model": "model", "prompt": "nop", "max_tokens": 300, "temperature": 0}
            result.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).json())

        t = threading.Thread(target=run)
        t.start()
        _poll(lambda: _metric(url, "fluid_num_requests_running") == 1, "a request running")
        os.killpg(proc.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: every process of the group
        assert proc.wait() == 0, proc.log_tail()
        t.join(120)
        assert "draining" in proc.log_tail(100_000)
        _poll(lambda: _gone(engine), "the engine's process to end")
    assert result[0]["choices"][0]["text"] == want["text"]
    assert result[0]["choices"][0]["finish_reason"] == "length"


def test_an_engine_process_that_dies_fails_its_requests(model_dir):  # noqa: F811
    args = ["--model", model_dir, "--max-batch", "2", "--policy", "ar", "--max-len", "600"]
    body = {"model": "model", "prompt": "xx", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with ServerProcess(args) as proc:
        url, lines = proc.url, []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            it = resp.iter_lines()
            lines.append(next(line for line in it if line.startswith("data: ")))
            os.kill(_engine_pid(proc), signal.SIGKILL)
            lines.extend(line for line in it if line)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
        assert "engine's process exited" in error
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "engine failed"
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "q", "max_tokens": 2})
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "engine_failed"
        assert proc.stop() == 1
        assert "the engine failed" in proc.log_tail(100_000)


def test_a_server_killed_outright_leaves_no_engine_behind(model_dir):  # noqa: F811
    """SIGKILL to the server (no drain, no stop): its engine's process ends by itself, so the
    device it holds is freed, not orphaned."""
    with ServerProcess(["--model", model_dir, "--policy", "ar"]) as proc:
        engine = _engine_pid(proc)
        proc.kill()
        _poll(lambda: _gone(engine), "the engine's process to end")


def test_a_model_that_does_not_load_is_the_same_one_error(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    said = []
    for extra in (["--no-engine-process"], []):
        code = main(["serve", "--model", str(broken), "--port", "0", *extra])
        said.append((code, capsys.readouterr().err.strip().splitlines()[-1]))
    assert said[0] == said[1] and said[0][0] != 0, said
    assert "holds no weights" in said[0][1]  # (the loader's, from the engine's process)
