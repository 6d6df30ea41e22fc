"""``fluid run-batch`` (``serve/batch.py``): a file of OpenAI batch requests answered offline by the
server's routes — every line answered, in the input's order, as the server answers it (refusals
included), with at most the set number in flight; a bad file refused before the model loads, by
line; an interrupted run leaves no file; an engine failure still writes every line. The scripted
scheduler of ``test_serve_http.py`` runs the routes; the real engine runs the command end to end."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from test_serve_http import TOK, ScriptedScheduler, expected_text, serving
from test_serve_live import model_dir, offline  # noqa: F401  (model_dir: a fixture)

from fluid_npu.cli import main
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.serve import batch
from fluid_npu.serve.app import ServeConfig, create_app
from fluid_npu.serve.batch import BatchLine, answer_batch, read_batch, run_batch
from fluid_npu.serve.server import ServeSettings
from fluid_npu.serve.worker import Worker

CHAT = [{"role": "user", "content": "Say something."}]


def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + "\n"


def scripted_app(sched: ScriptedScheduler) -> Any:
    return create_app(Worker(sched), TOK, ServeConfig("tiny", sched.max_len, sched.max_batch))


def answered(app: Any, requests: list[BatchLine], in_flight: int) -> list[dict[str, Any]]:
    out = io.StringIO()
    asyncio.run(answer_batch(app, requests, out, in_flight))
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_a_batch_is_answered_in_order_as_the_server_answers_it(monkeypatch):
    """Completions of different lengths (they finish out of order), a chat, a response, n = 2,
    and refusals (a bad field, another model, a stream): one line each in the input's order, the
    same bodies the server returns over HTTP (ids and times aside), ``in_flight`` at once."""
    prompts = ["one", "two words here", "a much longer prompt than the others", "x", "four"]
    bodies = [("/v1/completions", {"prompt": p, "max_tokens": 12 + 5 * k, "temperature": 0})
              for k, p in enumerate(prompts)]  # fmt: skip
    bodies += [
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 9}),
        ("/v1/responses", {"input": "Say something.", "max_output_tokens": 16}),
        ("/v1/completions", {"prompt": "twice", "max_tokens": 6, "n": 2, "seed": 3}),
        ("/v1/completions", {"prompt": "bad", "max_tokens": -1}),
        ("/v1/completions", {"model": "other", "prompt": "bad", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
    ]
    requests = [BatchLine(k + 1, f"r{k}", url, body) for k, (url, body) in enumerate(bodies)]
    sched = ScriptedScheduler(max_batch=2)
    now, most, real = [0], [0], batch._answer

    async def counted(client: Any, request: BatchLine) -> dict[str, Any]:
        now[0] += 1
        most[0] = max(most[0], now[0])
        try:
            return await real(client, request)
        finally:
            now[0] -= 1

    monkeypatch.setattr(batch, "_answer", counted)
    got = answered(scripted_app(sched), requests, in_flight=2)
    assert most[0] == 2  # two in flight together, never more
    assert [g["custom_id"] for g in got] == [r.custom_id for r in requests]
    statuses = [g["response"]["status_code"] for g in got]
    assert statuses == [200] * 8 + [400, 404, 400]
    assert all(g["error"] is None and g["id"].startswith("batch_req_") for g in got)
    for g in got[:8]:  # the answer's own id is the request id
        assert g["response"]["request_id"] == g["response"]["body"]["id"]
    for g, p, (_, body) in zip(got, prompts, bodies):
        text = g["response"]["body"]["choices"][0]["text"]
        assert text == expected_text(TOK(p)["input_ids"], body["max_tokens"])
    assert g_err(got[8])["param"] == "max_tokens" and g_err(got[9])["code"] == "model_not_found"
    assert g_err(got[10])["param"] == "stream"
    # over HTTP the same bodies get the same answers
    with serving(ScriptedScheduler(max_batch=2)) as (url, _, _):
        for g, (path, body) in zip(got[:10], bodies[:10]):
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == g["response"]["status_code"]
            assert same_answer(r.json(), g["response"]["body"]), (r.json(), g)


def g_err(record: dict[str, Any]) -> dict[str, Any]:
    return record["response"]["body"]["error"]


def same_answer(a: Any, b: Any) -> bool:
    """Equal but for ids and times (which every answer makes anew)."""
    if isinstance(a, dict) and isinstance(b, dict):
        fresh = {"id", "created", "created_at", "completed_at"}
        keys = (set(a) | set(b)) - fresh
        return all(same_answer(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_answer(x, y) for x, y in zip(a, b))
    return a == b


BAD_LINES = [
    ("{not json", DataError, "is not JSON"),
    ("[1, 2]", DataError, "a request is an object with exactly custom_id"),
    (json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {}}), DataError,
     "got ['body', 'custom_id', 'url']"),
    (line("", "/v1/completions", {}), DataError, "custom_id must be a non-empty string"),
    (line("q0", "/v1/completions", {}), DataError, "custom_id 'q0' is line 1's too"),
    (line("a", "/v1/embeddings", {}), DataError, "url '/v1/embeddings' is not one of"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}),
     DataError, "method must be 'POST', got 'GET'"),
    (line("a", "/v1/completions", []), DataError, "body must be the request's JSON object"),
    (line("a", "/v1/completions", {"model": "gpt-4o"}), ConfigError,
     "model 'gpt-4o' is not one served ('tiny'); run with --served-model-name 'gpt-4o'"),
]  # fmt: skip


@pytest.mark.parametrize("bad, kind, message", BAD_LINES)
def test_a_bad_line_is_one_error_naming_it(tmp_path, bad, kind, message):
    path = tmp_path / "in.jsonl"
    good = line("q0", "/v1/completions", {"model": "tiny", "prompt": "hi"})
    path.write_text(good + "\n" + bad + "\n", encoding="utf-8")  # (a blank line between)
    with pytest.raises(kind) as caught:
        read_batch(path, ("tiny",))
    assert f"{path} line 3" in str(caught.value) and message in str(caught.value)


def test_a_file_of_requests_reads_back_and_empty_or_missing_files_are_refused(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(line("a", "/v1/responses", {"input": "hi"}) + "\n\n", encoding="utf-8")
    assert read_batch(path, ("tiny",)) == [BatchLine(1, "a", "/v1/responses", {"input": "hi"})]
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no requests"):
        read_batch(path, ("tiny",))
    with pytest.raises(ConfigError, match="cannot read it"):
        read_batch(tmp_path / "missing.jsonl", ("tiny",))
    path.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(DataError, match="is not UTF-8"):
        read_batch(path, ("tiny",))
    path.write_bytes(b"\xef\xbb\xbf" + line("a", "/v1/completions", {"prompt": "x"}).encode())
    assert read_batch(path, ("tiny",))[0].custom_id == "a"  # (a byte-order mark is skipped)
    path.write_text(line("a", "/v1/completions", {"prompt": "\ud83d"}), encoding="utf-8")
    with pytest.raises(DataError, match="line 1 holds an unpaired UTF-16 surrogate"):
        read_batch(path, ("tiny",))


def saved_model_dir(path: Path) -> Path:
    """A folder that passes the model-directory check (the scripted engine never loads it)."""
    path.mkdir()
    (path / "config.json").write_text("{}", encoding="utf-8")
    save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))  # (a whole file)
    return path


def scripted_engine(monkeypatch: pytest.MonkeyPatch, sched: ScriptedScheduler) -> None:
    cfg = ServeConfig("tiny", sched.max_len, sched.max_batch, info={"policy": "scripted"})
    monkeypatch.setattr(
        "fluid_npu.serve.server.load_engine", lambda settings: (Worker(sched), TOK, cfg)
    )


def test_an_interrupted_run_leaves_no_file_and_a_failed_engine_every_line(
    tmp_path, monkeypatch, capsys
):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(line(f"q{k}", "/v1/completions", {"prompt": "p" * (k + 1)})
                           for k in range(40)), encoding="utf-8")  # fmt: skip
    scripted_engine(monkeypatch, ScriptedScheduler(max_batch=2))
    calls = []
    real = batch._answer

    async def breaking(client: Any, request: BatchLine) -> dict[str, Any]:
        calls.append(request.custom_id)
        if len(calls) == 4:
            raise RuntimeError("the run was cut")
        return await real(client, request)

    monkeypatch.setattr(batch, "_answer", breaking)
    model = str(saved_model_dir(tmp_path / "m"))  # (checked before anything runs; not loaded)
    with pytest.raises(RuntimeError, match="the run was cut"):
        run_batch(ServeSettings(model=model, max_batch=2), str(src), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "m"]  # no output, no temp
    assert len(calls) < 10  # the run stopped at the failure: the other 30 were never sent
    assert not any(t.name == "fluid-engine" for t in threading.enumerate())  # the engine stopped
    monkeypatch.setattr(batch, "_answer", real)
    sched = ScriptedScheduler(max_batch=2)
    sched.fail = True  # the engine's first step raises: every request is a 500
    scripted_engine(monkeypatch, sched)
    assert run_batch(ServeSettings(model=model, max_batch=2), str(src), str(out)) == 1
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in rows] == [f"q{k}" for k in range(40)]
    assert {r["response"]["status_code"] for r in rows} == {500}
    err = capsys.readouterr().err
    assert "40 requests answered (40 with 500)" in err and "the engine failed: device lost" in err


def test_fluid_run_batch_equals_fluid_generate(model_dir, tmp_path, capsys):  # noqa: F811
    """The command on the real engine: completions and a chat decode what ``fluid generate`` does
    for the same prompts; a refused line keeps its place; bad files and flags fail before the model
    loads and write nothing."""
    prompts = ["abc", "hello p", "xx", "ijk", "defgh", "the quick brown fox"]
    want = offline(model_dir, tmp_path, prompts, 30)
    chat_want = offline(model_dir, tmp_path, ["abc"], 30, chat=True)[0]
    src, out = tmp_path / "batch.jsonl", tmp_path / "answers" / "out.jsonl"
    rows = [line(f"c{k}", "/v1/completions", {"model": "model", "prompt": p, "max_tokens": 30,
                                              "temperature": 0})
            for k, p in enumerate(prompts)]  # fmt: skip
    chat = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 30, "temperature": 0}
    rows.insert(2, line("chat", "/v1/chat/completions", chat))
    rows.insert(4, line("long", "/v1/completions", {"prompt": "abc", "max_tokens": 10**6}))
    src.write_text("".join(rows), encoding="utf-8")
    base = ["run-batch", "-i", str(src), "--model", model_dir, "--max-batch", "4",
            "--max-len", "160"]  # fmt: skip
    assert main([*base, "-o", str(out)]) == 0
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert list(got) == ["c0", "c1", "chat", "c2", "long", "c3", "c4", "c5"]
    for k, row in enumerate(want):
        body = got[f"c{k}"]["response"]["body"]
        assert body["choices"][0]["text"] == row["text"]
        assert body["usage"]["completion_tokens"] == len(row["token_ids"])
    assert got["chat"]["response"]["body"]["choices"][0]["message"]["content"] == chat_want["text"]
    assert got["long"]["response"]["status_code"] == 400
    assert g_err(got["long"])["param"] == "max_tokens"
    assert "8 requests answered (7 with 200, 1 with 400)" in capsys.readouterr().err
    # refused before loading: nothing written
    fresh = tmp_path / "fresh.jsonl"
    for argv, message in [
        ([*base, "-o", str(fresh), "--served-model-name", "other"], "model 'model' is not"),
        ([*base, "-o", str(src)], "--output-file is the --input-file"),
        ([*base, "-o", str(tmp_path)], "is a directory"),
        ([*base[:4], str(tmp_path / "stagel"), "-o", str(fresh)], "does not exist"),
        ([*base, "-o", str(fresh), "--tool-call-parser", "hermes"], "go together"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not fresh.exists()
    assert Path(src).read_text(encoding="utf-8") == "".join(rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n", encoding="utf-8")
    argv = ["run-batch", "-i", str(bad), "-o", str(tmp_path / "new" / "o.jsonl"), "--model",
            model_dir]  # fmt: skip
    assert main(argv) == 2 and not (tmp_path / "new").exists()  # (no folder for a bad file)


def test_run_batch_over_two_engine_ranks(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """``--data-parallel-size 2``: the lines go through the data-parallel front to both engine
    processes, come back in order with ``fluid generate``'s text, and the ranks end with their
    logs removed."""
    prompts = ["abc", "hello p", "xx", "ijk", "defgh", "the quick brown fox", "zz top", "k"]
    want = offline(model_dir, tmp_path, prompts, 24)
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(line(f"c{k}", "/v1/completions", {"prompt": p, "max_tokens": 24,
                                                              "temperature": 0})
                           for k, p in enumerate(prompts)), encoding="utf-8")  # fmt: skip
    argv = ["run-batch", "-i", str(src), "-o", str(out), "--model", model_dir, "--max-batch", "2",
            "--max-len", "160", "-dp", "2", "--enable-log-requests"]  # fmt: skip
    temp = tmp_path / "tmp"  # (where the ranks' logs go)
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(argv) == 0
    assert list(temp.iterdir()) == []
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in rows] == [f"c{k}" for k in range(len(prompts))]
    assert [r["response"]["body"]["choices"][0]["text"] for r in rows] == [w["text"] for w in want]
    err = capsys.readouterr().err
    assert "2 engine ranks" in err and "8 requests answered (8 with 200)" in err
    assert "-> rank 0" in err and "-> rank 1" in err  # (the front's routing log: both served)


def test_a_signal_stops_the_run_and_leaves_nothing(model_dir, tmp_path):  # noqa: F811
    """Ctrl-C mid-run (SIGTERM takes the same path; the next test sends it while ranks load): the
    engine stops, the temporary file goes, and the process exits at once with 128 + the
    signal's number, as a killed one reports."""
    sig = signal.SIGINT
    src, out = tmp_path / "big.jsonl", tmp_path / "out" / "big.jsonl"
    body = {"prompt": "abc", "max_tokens": 60, "ignore_eos": True}
    src.write_text("".join(line(f"c{k}", "/v1/completions", body) for k in range(3000)),
                   encoding="utf-8")  # fmt: skip
    argv = [sys.executable, "-m", "fluid_npu.cli", "run-batch", "-i", str(src), "-o", str(out),
            "--model", model_dir, "--max-batch", "2", "--max-len", "160"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for text in proc.stderr:  # the banner: the engine has started decoding
            seen.append(text)
            if "requests from" in text:
                break
        time.sleep(0.5)
        assert proc.poll() is None, "".join(seen)
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait(60) == 128 + sig, rest
    finally:
        proc.kill()
        proc.wait()
    assert f"stopped by {signal.Signals(sig).name}; nothing written" in rest
    assert list(out.parent.iterdir()) == []  # no answers and no temporary file


def test_sigterm_while_the_ranks_load_stops_them_and_leaves_nothing(model_dir, tmp_path):  # noqa: F811
    """``-dp 2``: SIGTERM while the engine ranks are still loading stops them, removes their logs
    and exits 143 with a word, instead of dying with the ranks left to notice on their own."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out" / "o.jsonl"
    src.write_text(line("c0", "/v1/completions", {"prompt": "abc"}), encoding="utf-8")
    temp = tmp_path / "tmp"  # (where the ranks' logs go: watched below)
    temp.mkdir()
    argv = [sys.executable, "-m", "fluid_npu.cli", "run-batch", "-i", str(src), "-o", str(out),
            "--model", model_dir, "--max-len", "64", "-dp", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(temp)})  # fmt: skip
    try:
        for _ in range(600):  # the ranks' logs appear as they are launched
            if len(list(temp.glob("fluid-serve-*.log"))) == 2 or proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(60) == 128 + signal.SIGTERM, err
    finally:
        proc.kill()
        proc.wait()
    assert "stopped by SIGTERM" in err and "ended with status" not in err, err
    assert list(temp.glob("fluid-serve-*.log")) == [] and not out.exists()
