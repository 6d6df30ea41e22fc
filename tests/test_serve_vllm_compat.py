"""``fluid serve`` as clients and command lines written for ``vllm serve`` meet it: the model
ids it answers to (several ``--served-model-name``, the ``--model`` string, an empty name),
vLLM's model-card fields, ``/ping`` and ``/load``, bodies sent as something other than JSON
(415, nothing run), and vLLM's launch flags (accepted, honoured or refused by name)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from test_serve_http import TOK, ScriptedScheduler, _until, client, expected_text, serving

from fluid_npu.cli import build_parser
from fluid_npu.errors import ConfigError


def test_model_ids_cards_and_probes_as_vllms():
    sched = ScriptedScheduler()
    names = dict(other_names=("alias",), aliases=("runs/x/tiny",), root="runs/x/tiny")
    with serving(sched, **names) as (url, _, _):
        c = client(url)
        cards = c.models.list().data
        assert [m.id for m in cards] == ["tiny", "alias"]  # (the --model string: not listed)
        card = cards[0].model_dump()
        assert card["root"] == "runs/x/tiny" and card["parent"] is None and card["created"] > 0
        assert card["max_model_len"] == sched.max_len and card["permission"][0]["allow_sampling"]
        want = expected_text(TOK("a")["input_ids"], 6)
        for name in ("tiny", "alias", "runs/x/tiny", ""):  # ("": the default, as vLLM)
            out = c.completions.create(model=name, prompt="a", max_tokens=6)
            assert out.choices[0].text == want and out.model == "tiny", name
        with pytest.raises(openai.NotFoundError, match="serves 'tiny' or 'alias'"):
            c.completions.create(model="other", prompt="a", max_tokens=6)
        # /ping answers as /health (GET and POST); /load counts the requests in flight
        for method in ("GET", "POST"):
            assert httpx.request(method, f"{url}/ping").json()["status"] == "ok"
        assert httpx.get(f"{url}/load").json() == {"server_load": 0}
        sched.gate.clear()  # (the engine holds: a request stays in flight)
        held = threading.Thread(  # (one request of two choices: one, as vLLM counts requests)
            target=lambda: c.completions.create(model="tiny", prompt="a", n=2)
        )
        held.start()
        _until(lambda: httpx.get(f"{url}/load").json()["server_load"] == 1, "a request in flight")
        sched.gate.set()
        held.join(30)


def test_a_body_not_sent_as_json_runs_nothing():
    # a form or text/plain post is what a web page may send to a local server without asking
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = b'{"model": "tiny", "prompt": "a", "max_tokens": 4}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {} if ctype is None else {"content-type": ctype}
            raw = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
            assert raw.status_code == 415, ctype
            assert "application/json" in raw.json()["error"]["message"]
        assert sched.requests == []
        ok = {"content-type": "application/json; charset=utf-8"}
        assert httpx.post(f"{url}/v1/completions", content=body, headers=ok).status_code == 200


def test_vllm_launch_flags(capsys):
    from fluid_npu.serve.cli import _settings

    argv = ["serve", "--model", "runs/m", "--served-model-name", "a", "b", "--dtype", "half",
            "--enable-prefix-caching", "--disable-log-requests", "--disable-log-stats",
            "--disable-uvicorn-access-log", "--disable-fastapi-docs", "--trust-remote-code",
            "--enable-tokenizer-info-endpoint", "--enable-server-load-tracking",
            "--root-path", "/llm", "--uvicorn-log-level", "info"]  # fmt: skip
    args = build_parser().parse_args(argv)
    settings = _settings(args, root_path=args.root_path, uvicorn_log_level=args.uvicorn_log_level)
    settings.check()
    assert settings.served_model_name == ("a", "b") and settings.dtype == "float16"
    assert settings.trust_remote_code and settings.prefix_caching
    assert (settings.root_path, settings.uvicorn_log_level) == ("/llm", "info")
    for extra, words in (
        (["--served-model-name", "a", " "], "non-empty names"),
        (["--enable-prefix-caching", "--no-enable-prefix-caching"], "contradict"),
        (["--disable-log-requests", "--enable-log-requests"], "contradict"),
    ):
        with pytest.raises(ConfigError, match=words):
            _settings(build_parser().parse_args(["serve", "--model", "m", *extra])).check()


def test_a_copied_vllm_serve_command_line_gets_an_answer_for_every_flag(capsys, tmp_path):
    """`vllm serve MODEL ...` as users write it: the model as the first argument; vLLM's flags
    at values that change nothing accepted, its scheduler / cache settings accepted with one
    note naming them, any other value one error naming the flag and what to do instead."""
    from fluid_npu.serve.cli import _settings

    model = str(tmp_path)

    def settings(*argv: str):
        return _settings(build_parser().parse_args(["serve", *argv]))

    assert settings(model).model == model  # (vllm serve MODEL)
    assert settings(model, "--model", model + "/").model == model  # (the same directory)
    with pytest.raises(ConfigError, match="name two models"):
        settings(model, "--model", "other")
    with pytest.raises(ConfigError, match=r"needs a model: fluid serve MODEL_DIR \(or --model"):
        settings()
    with pytest.raises(ConfigError, match=r"--served-model-name took .* put the model first"):
        settings("--served-model-name", "a", model)  # (its list takes MODEL, as vLLM's does)
    quiet = settings(model, "--kv-cache-dtype", "auto", "-pp", "1", "--tokenizer", model + "/",
                     "--load-format", "safetensors", "--guided-decoding-backend", "xgrammar",
                     "--distributed-executor-backend", "mp", "--speculative-config", "{}",
                     "--chat-template-content-format", "string", "--response-role", "assistant",
                     "--enable-prompt-tokens-details")  # fmt: skip
    assert quiet.model == model and capsys.readouterr().err == ""
    settings(model, "--block-size", "16", "--swap-space", "4", "--enable-chunked-prefill", "-O3")
    note = capsys.readouterr().err
    assert "--block-size, --swap-space, --compilation-config, --enable-chunked-prefill" in note
    assert "ignored" in note
    with pytest.raises(ConfigError) as info:
        settings(model, "--hf-token", "hf_SECRET")
    assert "nothing is downloaded" in str(info.value) and "hf_SECRET" not in str(info.value)
    for extra, words in (
        (["--enable-lora"], "--enable-lora: a Stage I LoRA adapter merges at load: --adapter"),
        (["--lora-modules", "a=dir"], "--lora-modules: this server serves one model"),
        (["-q", "awq"], "--quantization awq: .*no quantized kernels"),
        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: the KV cache holds the model's"),
        (["--pipeline-parallel-size", "2"], "--data-parallel-size"),
        (["--revision", "main"], "nothing is downloaded"),
        (["--speculative-config", '{"method": "eagle"}'], "FLUID drafts with the model itself"),
        (["--tokenizer", str(tmp_path.parent)], "the tokenizer is the model directory's own"),
        (["--chat-template-content-format", "openai"], "vLLM's 'string' format"),
        (["--disable-sliding-window"], "decodes within its window"),
        (["--api-server-count", "4"], "one HTTP process"),
    ):
        with pytest.raises(ConfigError, match=words):
            settings(model, *extra)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "--max-model-len" in shown and "--block-size" not in shown  # (left out of --help)


def test_a_root_path_changes_no_route_label_or_relay():
    # behind a proxy that strips --root-path: the server's metrics and refusals keep the route's
    # own name, and the data-parallel front relays to its ranks (which have no root path)
    from test_serve_dp import RANK_KEY, fronting
    from test_serve_http import _metric

    from fluid_npu.serve.router import Front

    sched = ScriptedScheduler()
    with serving(sched, root_path="/x") as (url, _, _):
        c = client(url)
        c.completions.create(model="tiny", prompt="a", max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="zzz", prompt="a", max_tokens=4)
        assert _metric(url, 'fluid_requests_total{endpoint="/v1/completions",finish_reason="404"}')
        served = _metric(
            url, 'fluid_requests_total{endpoint="/v1/completions",finish_reason="length"}'
        )
        assert served == 1.0
        missing = httpx.get(f"{url}/v1/nope").json()["error"]["message"]
        assert missing.endswith("GET /x/v1/nope")  # (the scope's path: not "/x/x/...")
    rank = ScriptedScheduler()
    with serving(rank, api_key=RANK_KEY) as (rank_url, _, _):
        front = Front(urls=[rank_url], rank_key=RANK_KEY, api_key=None, slack=8)
        with fronting(front, root_path="/x") as url:
            out = client(url).completions.create(model="tiny", prompt="a", max_tokens=4)
            assert out.choices[0].text == expected_text(TOK("a")["input_ids"], 4)
            chat = [{"role": "user", "content": "a"}]
            assert client(url).chat.completions.create(model="tiny", messages=chat, max_tokens=4)
