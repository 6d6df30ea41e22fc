"""``fluid serve`` / ``fluid bench serve`` on the command line: one ``fluid: error`` line and exit 2
for every bad flag (before any model is loaded), and the load generator end to end — FLUID against
``ar`` on servers it starts itself, and against a running server given by ``--url``."""

from __future__ import annotations

import json
import socket

import openai
import pytest
from test_serve_http import TOK, ScriptedScheduler, client, script, serving
from test_serve_live import model_dir  # noqa: F401  (the constructed chain model, a fixture)

from fluid_npu.cli import main


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: "), err
    return err[0]


def _prompts(tmp_path, rows) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_serve_flag_errors(capsys, tmp_path, monkeypatch):
    assert "--model" in _error(capsys, ["serve"])
    assert "float8" in _error(capsys, ["serve", "--model", "m", "--dtype", "float8"])
    assert "--max-batch" in _error(capsys, ["serve", "--model", "m", "--max-batch", "0"])
    assert "--max-queue" in _error(capsys, ["serve", "--model", "m", "--max-queue", "-1"])
    pool = ["serve", "--model", "m", "--prefix-cache-slots"]
    assert "--prefix-cache-slots must be at least 0" in _error(capsys, [*pool, "-1"])
    msg = _error(capsys, [*pool, "4", "--no-enable-prefix-caching"])
    assert "--prefix-cache-slots" in msg and "--no-enable-prefix-caching" in msg
    assert "--api-key" in _error(capsys, ["serve", "--model", "m", "--api-key", " "])
    # `--api-key "$KEY"` with KEY unset: refused, not a server open to anyone
    assert "--api-key (or $FLUID_API_KEY) is empty" in _error(
        capsys, ["serve", "--model", "m", "--api-key", ""]
    )
    monkeypatch.setenv("FLUID_API_KEY", "")  # (FLUID_API_KEY="$KEY", KEY unset)
    assert "$FLUID_API_KEY) is empty" in _error(capsys, ["serve", "--model", "m"])
    monkeypatch.delenv("FLUID_API_KEY")
    both = _error(capsys, ["serve", "--model", "m", "--enforce-eager", "--compile"])
    assert "--enforce-eager and --compile" in both
    assert "--threads" in _error(capsys, ["serve", "--model", "m", "--threads", "0"])
    one_card = _error(capsys, ["serve", "--model", "m", "--device", "npu:1", "-dp", "2"])
    assert "--device npu:1 names one card" in one_card and "ASCEND_RT_VISIBLE_DEVICES" in one_card
    cpu = _error(capsys, ["serve", "--model", "m", "--device", "cpu:0", "-dp", "2"])
    assert "the CPU takes no index" in cpu and "VISIBLE_DEVICES" not in cpu
    assert "--drain-timeout" in _error(capsys, ["serve", "--model", "m", "--drain-timeout", "nan"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert "choose another --port" in _error(capsys, ["serve", "--model", "m", "--port", port])
    assert "does not exist" in _error(capsys, ["serve", "--model", str(tmp_path / "missing")])
    missing = str(tmp_path / "none.jinja")
    msg = _error(capsys, ["serve", "--model", "m", "--chat-template", missing])
    assert "--chat-template" in msg and "no such file" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--chat-template", "{% if %}"])
    assert "--chat-template: not a valid Jinja chat template" in msg
    kwargs = ["serve", "--model", "m", "--default-chat-template-kwargs"]
    assert "--default-chat-template-kwargs sets tokenize" in _error(
        capsys, [*kwargs, '{"tokenize": 0}']
    )
    assert "--default-chat-template-kwargs is not JSON" in _error(capsys, [*kwargs, "x"])
    msg = _error(capsys, ["serve", "--model", "m", "--generation-config", str(tmp_path)])
    assert "--generation-config" in msg and "generation_config.json" in msg
    (tmp_path / "gc").mkdir()
    (tmp_path / "gc" / "generation_config.json").write_text("{", encoding="utf-8")
    msg = _error(capsys, ["serve", "--model", "m", "--generation-config", str(tmp_path / "gc")])
    assert msg.startswith("fluid: error: --generation-config: ") and "is not valid" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--reasoning-parser", "r1"])
    assert "--reasoning-parser 'r1' is not one of deepseek_r1, openpangu, qwen3" in msg
    assert "--data-parallel-size must be at least 1" in _error(capsys, ["serve", "--model", "m",
                                                                       "-dp", "0"])  # fmt: skip
    for alone in (["--enable-auto-tool-choice"], ["--tool-call-parser", "hermes"]):
        msg = _error(capsys, ["serve", "--model", "m", *alone])
        assert "--enable-auto-tool-choice and --tool-call-parser go together" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--enable-auto-tool-choice",
                          "--tool-call-parser", "json"])  # fmt: skip
    assert "--tool-call-parser 'json' is not one of hermes" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--prefill-chunk", "0"])
    assert "--prefill-chunk must be at least 1" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--scheduling-policy", "lifo"])
    assert "--scheduling-policy 'lifo' is not one of fcfs, priority" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--max-logprobs", "-2"])
    assert "--max-logprobs must be -1 (every token) or more, got -2" in msg
    msg = _error(capsys, ["serve", "--model", "m", "--logprobs-mode", "raw"])
    assert "--logprobs-mode 'raw' is not one of raw_logprobs, processed_logprobs" in msg


def test_bench_serve_flag_errors(capsys, tmp_path):
    good = _prompts(tmp_path, [{"prompt": "abc"}])
    base = ["bench", "serve", "--prompts", good, "--json", str(tmp_path / "r.json")]
    assert "exactly one of --model" in _error(capsys, base)
    assert "exactly one of --model" in _error(capsys, [*base, "--model", "m", "--url", "u"])
    assert "--policies" in _error(capsys, [*base, "--url", "http://x", "--policies", "ar"])
    assert "--rate" in _error(capsys, [*base, "--url", "http://x", "--rate", "0"])
    msg = _error(capsys, [*base, "--url", "http://x", "--check-lossless"])
    assert "--check-lossless judges the policies' outputs against ar's" in msg
    grammar = ["--structured-outputs", '{"regex": "[0-9]+"}', "--check-lossless"]
    assert "--check-lossless judges" in _error(capsys, [*base, "--model", "m", *grammar])
    assert "--threads" in _error(capsys, [*base, "--model", "m", "--threads", "-1"])
    # flags for servers started here are not silently dropped against a running server
    url = [*base, "--url", "http://x"]
    assert "--threads configure the servers" in _error(capsys, [*url, "--threads", "2"])
    msg = _error(capsys, [*url, "--chat-template", "{{ x }}"])
    assert "--chat-template configure the servers" in msg
    msg = _error(capsys, [*url, "--dtype", "bfloat16", "--compile", "--max-batch", "4"])
    assert "--dtype, --max-batch (--max-num-seqs), --compile configure" in msg
    msg = _error(capsys, [*url, "--max-model-len", "64"])  # (vLLM's spelling: both named)
    assert "--max-len (--max-model-len) configure" in msg
    for bad_json in ("[1]", "{regex"):
        msg = _error(capsys, [*url, "--structured-outputs", bad_json])
        assert "--structured-outputs takes a JSON object" in msg
    bad = _prompts(tmp_path, [{"text": "abc"}])
    msg = _error(capsys, ["bench", "serve", "--prompts", bad, "--json", "r", "--url", "http://x"])
    assert 'prompts.jsonl:1: each line needs "prompt" (text), "input_ids"' in msg
    ids = _prompts(tmp_path, [{"input_ids": [1, 2]}])
    msg = _error(capsys, ["bench", "serve", "--prompts", ids, "--json", "r", "--url", "http://x"])
    assert 'fluid bench serve sends text: each line needs "prompt"' in msg
    with socket.socket() as closed:  # (a port nothing listens on)
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    good = _prompts(tmp_path, [{"prompt": "abc"}])
    msg = _error(capsys, ["bench", "serve", "--prompts", good, "--json", "r", "--url", gone])
    assert f"--url {gone}: cannot reach it" in msg
    assert not (tmp_path / "r.json").exists()


def test_bench_serve_against_a_running_server(tmp_path, capsys):
    prompts = _prompts(tmp_path, [{"prompt": p} for p in ("abc", "hello", "xyz")])
    out = tmp_path / "report.json"
    with serving(ScriptedScheduler(max_batch=2), api_key="k3y") as (url, _, _):
        argv = ["bench", "serve", "--url", url, "--prompts", prompts, "--json", str(out),
                "--num-requests", "9", "--concurrency", "3", "--max-tokens", "20",
                "--rate", "200", "--warmup", "1"]  # fmt: skip
        # a server with a key: without it one clear error before any load, with it the run
        assert "--api-key or $FLUID_API_KEY" in _error(capsys, argv)
        assert main([*argv, "--api-key", "k3y"]) == 0
    assert "k3y" not in out.read_text()  # the key is not recorded
    report = json.loads(out.read_text())
    assert report["settings"]["rate"] == 200
    r = report["results"]["server"]
    assert r["completed"] == 9 and r["failed"] == 0
    want = [script(TOK(p)["input_ids"], 20, True) for p in ("abc", "hello", "xyz") * 3]
    assert r["generated_tokens"] == sum(len(w) for w in want)
    assert r["sample_texts"] == [TOK.decode(w, skip_special_tokens=True) for w in want[:2]]
    assert r["tpf"] > 1.0  # the scripted scheduler commits 1-3 tokens a step
    assert all(r[k]["p50"] is not None for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"))
    # the engine's side, from /metrics over the timed load only (the warm-up's steps left out):
    # the requests of its steps add up to the timed requests' forwards
    e = r["engine"]
    forwards = r["generated_tokens"] / r["tpf"]
    assert e["requests_per_step"] * e["steps"] == pytest.approx(forwards, abs=0.5)
    assert 1 <= e["requests_per_step"] <= 2  # (max_batch 2)
    assert 0 < e["busy_share"] <= 1 and 0 < e["engine_cpu_share"] <= 1.01
    assert report["command"].startswith("fluid bench serve --url")
    printed = capsys.readouterr().out
    assert "| server |" in printed and f"{e['steps']} steps of" in printed


def test_bench_serve_sends_conversations_to_the_chat_route(tmp_path):
    """A ``messages`` line (as ``fluid generate`` reads it) is sent as that conversation, with
    the line's ``tools`` (``tool_choice: "none"``: the answer is text on any server)."""
    from fluid_npu.model.tiny import build_tiny_tokenizer
    from fluid_npu.serve.text import chat_ids

    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = ("{% for t in tools or [] %}{{ t.function.name }};{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")  # fmt: skip
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    tools = [{"type": "function", "function": {"name": "look_up"}}]
    lines = [{"messages": chat}, {"prompt": "abc"}, {"messages": chat, "tools": tools}]
    prompts = _prompts(tmp_path, lines)
    out = tmp_path / "report.json"
    sched = ScriptedScheduler(max_batch=2)
    with serving(sched, tokenizer=tok) as (url, _, _):
        argv = ["bench", "serve", "--url", url, "--prompts", prompts, "--json", str(out),
                "--num-requests", "3", "--max-tokens", "8", "--warmup", "0",
                "--rounds", "1"]  # fmt: skip
        assert main(argv) == 0
        assert all(r.grammar is None for r in sched.requests)
        # every request held to --structured-outputs (vLLM's field); the command keeps its quotes
        assert main([*argv, "--structured-outputs", '{"choice": ["yes sir", "no"]}']) == 0
        assert all(r.grammar is not None for r in sched.requests[3:])
        assert "--structured-outputs '{\"choice\": [\"yes sir\", \"no\"]}'" in json.loads(
            out.read_text())["command"]  # fmt: skip
        del sched.requests[3:]
    assert json.loads(out.read_text())["results"]["server"]["completed"] == 3
    sent = sorted(r.prompt for r in sched.requests)
    expected = [chat_ids(tok, chat), tok("abc")["input_ids"], chat_ids(tok, chat, tools=tools)]
    assert sent == sorted(expected) and tok.decode(max(sent, key=len)).startswith("look_up;")


def test_bench_serve_reads_a_reasoning_parsers_chunks(tmp_path):
    """Against a server with ``--reasoning-parser``, the load generator times and keeps the
    reasoning's chunks as output too (reasoning, then answer), even where a chunk holds both."""
    from test_serve_http import ReasoningScheduler

    from fluid_npu.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    sched = ReasoningScheduler()
    words = tok("a b c d e", add_special_tokens=False)["input_ids"]
    sched.output = [start, *words, end, *words]
    out = tmp_path / "report.json"
    prompts = _prompts(tmp_path, [{"prompt": "hi"}])
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3") as (url, _, _):
        argv = ["bench", "serve", "--url", url, "--prompts", prompts, "--json", str(out),
                "--num-requests", "2", "--max-tokens", "20", "--warmup", "0", "--chat",
                "--rounds", "1"]  # fmt: skip
        assert main(argv) == 0
    r = json.loads(out.read_text())["results"]["server"]
    assert r["completed"] == 2 and r["sample_texts"][0] == "a b c d ea b c d e"


@pytest.mark.slow
def test_bench_serve_fluid_against_ar(model_dir, tmp_path):  # noqa: F811
    prompts = _prompts(tmp_path, [{"prompt": p} for p in ("xx", "nop", "abc", "qrs")])
    out = tmp_path / "report.json"
    # drafting every step (--no-adaptive-drafting): the same TPF on any machine
    argv = ["bench", "serve", "--model", model_dir, "--prompts", prompts, "--json", str(out),
            "--num-requests", "12", "--concurrency", "4", "--max-tokens", "48",
            "--max-batch", "4", "--max-len", "128", "--warmup", "2",
            "--no-adaptive-drafting", "--threads", "1", "--no-enable-prefix-caching",
            "--check-lossless"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    fluid, ar = report["results"]["entropy"], report["results"]["ar"]
    assert fluid["failed"] == ar["failed"] == 0
    assert report["identical_to_ar"] == {"entropy": 1.0}  # lossless through the whole server
    # every request's token ids came back and were compared (none differs: nothing to score)
    assert fluid["lossless"] == {"checked": 12, "differ": 0, "near_ties": 0, "mismatches": 0,
                                 "divergences": []}  # fmt: skip
    assert "lossless" not in ar and "--check-lossless" in report["command"]
    assert fluid["generated_tokens"] == ar["generated_tokens"]
    assert ar["tpf"] == 1.0 and fluid["tpf"] > 1.5
    assert report["throughput_vs_ar"]["entropy"] == pytest.approx(
        fluid["output_tokens_per_s"] / ar["output_tokens_per_s"], rel=1e-2
    )
    # where that ratio comes from, read from the servers' /metrics: the factors account for it
    terms = report["ratio_terms"]["entropy"]
    assert terms["tpf"] == pytest.approx(fluid["tpf"], rel=1e-2)
    assert terms["product"] == pytest.approx(report["throughput_vs_ar"]["entropy"], rel=0.02)
    for r in (fluid, ar):  # the server's time to first token, split into its phases (counted
        first = r["engine"]["first_token"]  # over the same requests: else None)
        assert first is not None and min(first.values()) >= 0 and first["first_step_ms"] > 0
        assert r["ttft_mean_ms"] > first["server_ttft_ms"]  # (the client's includes the way)
    assert report["server_args"][:2] == ["--model", model_dir]
    assert "--no-adaptive-drafting" in report["server_args"]
    assert "--no-enable-prefix-caching" in report["server_args"]  # (repeated prompts: no reuse)
    assert fluid["cached_prompt_tokens"] == ar["cached_prompt_tokens"] == 0
    assert fluid["prompt_tokens"] == ar["prompt_tokens"] > 0
    at = report["server_args"].index("--threads")
    assert report["server_args"][at : at + 2] == ["--threads", "1"]


def test_threads_set_the_engine_s_torch_threads(model_dir):  # noqa: F811
    """``--threads N``: the engine computes on N torch threads (reported by /health)."""
    import torch

    from fluid_npu.serve.server import ServeSettings, build_scheduler

    before = torch.get_num_threads()
    try:
        for n in (2, 1):
            *_, info = build_scheduler(ServeSettings(model=model_dir, threads=n))
            assert info["torch_threads"] == n == torch.get_num_threads()
        # (and --scheduling-policy, --logprobs-mode reach the engine)
        settings = ServeSettings(model=model_dir, scheduling_policy="priority", prefill_chunk=64,
                                 seed=7, logprobs_mode="processed_logits")  # fmt: skip
        sched, *_, info = build_scheduler(settings)
        assert sched.scheduling_policy == info["scheduling_policy"] == "priority"
        assert sched.logprobs_mode == info["logprobs_mode"] == "processed_logits"
        assert sched.prefill_chunk == info["prefill_chunk"] == 64
        assert torch.initial_seed() == info["seed"] == 7  # (unseeded requests draw from it)
        *_, info = build_scheduler(ServeSettings(model=model_dir))
        assert info["prefill_chunk"] == 512 and info["seed"] is None
        assert (info["max_len"], info["max_len_reason"]) == (2048, "the model's context")
        *_, info = build_scheduler(ServeSettings(model=model_dir, max_len=64))
        assert (info["max_len"], info["max_len_reason"]) == (64, "as asked")
        # no chunk is longer than a prompt: one past the context costs the cache no more
        *_, huge = build_scheduler(ServeSettings(model=model_dir, prefill_chunk=10**6))
        whole = ServeSettings(model=model_dir, prefill_chunk=huge["max_len"])
        assert huge["kv_cache_gib"] == build_scheduler(whole)[-1]["kv_cache_gib"]
    finally:
        torch.set_num_threads(before)


def test_the_served_chat_template_and_its_default_variables(model_dir):  # noqa: F811
    """``--chat-template`` replaces the tokenizer's for the chat route, ``/tokenize`` and
    ``/tokenizer_info``; ``--default-chat-template-kwargs`` is read as the variables the app
    gets."""
    from fluid_npu.serve.server import ServeSettings, build_scheduler

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix }}"
    settings = ServeSettings(model=model_dir, chat_template=template,
                             default_chat_template_kwargs='{"suffix": "?"}')  # fmt: skip
    settings.check()
    _, tokenizer, *_ = build_scheduler(settings)
    assert tokenizer.chat_template == template
    assert settings.template_kwargs() == {"suffix": "?"}
    from fluid_npu.errors import ConfigError
    from fluid_npu.serve.app import ServeConfig, create_app
    from fluid_npu.serve.worker import Worker

    scheduler, tokenizer, max_len, _ = build_scheduler(ServeSettings(model=model_dir))
    config = ServeConfig("m", max_len, 1, reasoning_parser="qwen3")  # (built before serving)
    with pytest.raises(ConfigError, match="'<think>' is not one token of this model's tokenizer"):
        create_app(Worker(scheduler), tokenizer, config)


def test_missing_serve_extra_is_one_clear_error(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    assert "pip install -e '.[serve]'" in _error(capsys, ["serve", "--model", "m"])


class _SpecServer:
    """A scripted OpenAI-style server (stdlib, 127.0.0.1): streamed completions carry ``usage``
    only when ``stream_options.include_usage`` asks for it, as the OpenAI API (and vLLM) do;
    ``dead`` makes every request but ``/v1/models`` end with the connection dropped, as when a
    server dies under load."""

    def __init__(self, dead: bool = False) -> None:
        import http.server
        import threading

        spec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, body: bytes, kind: str = "application/json") -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    return self._send(json.dumps({"data": [{"id": "spec"}]}).encode())
                if spec.dead:
                    self.close_connection = True
                    return
                self._send(json.dumps({"status": "ok", "info": {"policy": "spec"}}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                spec.bodies.append(body)
                if spec.dead:
                    self.close_connection = True
                    return
                chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]}
                          for t in ("one", " two", " three")]  # fmt: skip
                chunks[-1]["choices"][0]["finish_reason"] = "length"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
                    chunks.append({"choices": [], "usage": usage})
                sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self._send(sse.encode(), "text/event-stream")

        self.dead, self.bodies = dead, []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _SpecServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _bench_argv(url: str, prompts: str, out) -> list[str]:
    return ["bench", "serve", "--url", url, "--prompts", prompts, "--json", str(out),
            "--num-requests", "4", "--concurrency", "2", "--max-tokens", "3", "--warmup", "0",
            "--rounds", "2"]  # fmt: skip


def test_bench_serve_asks_for_usage_as_the_openai_api_wants(tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": "abc"}])
    out = tmp_path / "spec.json"
    with _SpecServer() as spec:
        assert main(_bench_argv(spec.url, prompts, out)) == 0
    r = json.loads(out.read_text())["results"]["server"]
    assert r["completed"] == 4 and r["failed"] == 0 and r["generated_tokens"] == 12
    assert all(b["stream_options"] == {"include_usage": True} for b in spec.bodies)
    assert all("ignore_eos" not in b for b in spec.bodies)  # not an OpenAI field: only if asked


def test_bench_serve_reports_a_server_that_died_under_load(tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": "abc"}])
    out = tmp_path / "dead.json"
    with _SpecServer(dead=True) as spec:
        assert main(_bench_argv(spec.url, prompts, out)) == 1  # failed requests: exit 1
    report = json.loads(out.read_text())  # written all the same
    r = report["results"]["server"]
    assert r["completed"] == 0 and r["failed"] == 4 and report["failed_requests"] == 4
    assert r["machine"]["server"] is None and r["machine"]["server_error"]


def test_rounds_are_even_and_never_empty():
    from fluid_npu.serve.bench import split_rounds

    for n, rounds in ((10, 8), (6, 4), (9, 3), (5, 5), (64, 3)):
        parts = split_rounds(list(range(n)), rounds)
        assert [x for p in parts for x in p] == list(range(n))
        assert len(parts) == rounds and min(map(len, parts)) >= 1
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_vllms_flag_names_and_generation_config(tmp_path):
    """vLLM's ``--max-model-len`` / ``--max-num-seqs`` are ``--max-len`` / ``--max-batch``, and its
    ``--generation-config`` chooses where a request's left-out decoding settings come from."""
    from transformers import GenerationConfig

    from fluid_npu.cli import build_parser
    from fluid_npu.serve.protocol import SamplingDefaults
    from fluid_npu.serve.server import generation_defaults

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-model-len", "64", "--max-num-seqs", "4"]
    )
    assert (args.max_len, args.max_batch, args.generation_config) == (64, 4, "auto")

    class Model:
        generation_config = GenerationConfig(temperature=0.7, top_p=0.8)

    assert generation_defaults("auto", Model()) == SamplingDefaults(temperature=0.7, top_p=0.8)
    assert generation_defaults("vllm", Model()) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_k": 20}')
    assert generation_defaults(str(tmp_path), Model()) == SamplingDefaults(
        temperature=0.3, top_k=20
    )


def test_override_generation_config_sets_the_served_defaults(model_dir, capsys):  # noqa: F811
    """vLLM's ``--override-generation-config``: the defaults a request that leaves a setting
    out gets, set over ``--generation-config``'s (``/health``'s ``info.default_sampling``); a
    setting the server does not read as a default, or a value that is no number, is refused."""
    from fluid_npu.serve.dp import rank_args
    from fluid_npu.serve.protocol import SamplingDefaults
    from fluid_npu.serve.server import ServeSettings, load_engine

    over = '{"temperature": 0.4, "top_k": 3}'
    settings = ServeSettings(model=model_dir, max_batch=1, override_generation_config=over)
    settings.check()
    for own_process in (False, True):  # (read in the engine's process, or in the server's)
        settings.engine_process = own_process
        worker, _, config = load_engine(settings)
        worker.stop()
        assert config.defaults == SamplingDefaults(temperature=0.4, top_k=3)
        assert config.info["default_sampling"]["temperature"] == 0.4
    flags = rank_args(settings, None)  # (the ranks of a data-parallel server get it too)
    assert flags[flags.index("--override-generation-config") + 1] == over
    flag = ["serve", "--model", "m", "--override-generation-config"]
    assert "'max_new_tokens' is not a setting it overrides" in _error(
        capsys, [*flag, '{"max_new_tokens": 5}']
    )
    assert "--override-generation-config: top_p takes a number" in _error(
        capsys, [*flag, '{"top_p": "x"}']
    )
    assert "temperature must lie in [0.0, inf], got -3" in _error(
        capsys, [*flag, '{"temperature": -3}']
    )
    from fluid_npu.sampling.generation_defaults import check_override

    assert check_override('{"top_k": -1}', "x") == {"top_k": 0}  # (vLLM's off, as a request's)


def test_the_request_log_has_a_line_per_request(caplog):
    """``--enable-log-requests``: a line per request that ends (id, route, finish reason, token
    counts, TPF, times; never the text) and per refused request (status, field)."""
    logging = caplog.at_level("INFO", logger="fluid_npu.serve.requests")
    with logging, serving(ScriptedScheduler()) as (url, _, _):
        c = client(url)
        out = c.completions.create(model="tiny", prompt="secret words", max_tokens=5)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="a", temperature=9)
        with pytest.raises(openai.BadRequestError):  # (an unknown field: the client's own text)
            c.completions.create(model="tiny", prompt="a", extra_body={"x\nfluid: forged": 1})
        with pytest.raises(openai.BadRequestError):  # (a header the server names)
            c.completions.create(model="tiny", prompt="a", extra_headers={"X-Request-Id": "a b"})
    lines = [r.getMessage() for r in caplog.records if r.name == "fluid_npu.serve.requests"]
    done = next(line for line in lines if line.startswith(out.id))
    assert " /v1/completions length " in done and "generated=5 " in done and "tpf=" in done
    assert f"prompt={out.usage.prompt_tokens} " in done and "ttft=" in done
    assert not any("secret" in line for line in lines)
    assert any(line.startswith("refused /v1/completions 400 temperature") for line in lines)
    assert any(line.startswith("refused /v1/completions 400 - ") for line in lines)
    assert any(line.startswith("refused /v1/completions 400 X-Request-Id ") for line in lines)
    assert not any("forged" in x for x in lines)
