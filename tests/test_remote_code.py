"""A model whose tokenizer is the directory's own code (openPangu's PanguTokenizer): refused
with the fix by every command until ``--trust-remote-code`` (``trust_remote_code=True``) is
given, then loaded — ``fluid generate`` / ``eval`` / ``bench sampler`` / ``serve`` /
``run-batch`` / ``bench serve`` / ``merge`` all take the flag."""

from __future__ import annotations

import json
from pathlib import Path

from fluid_npu.cli import build_parser
from fluid_npu.cli import main as cli_main
from fluid_npu.model.tiny import save_tiny


def remote_tokenizer(directory: Path, imports: str = "") -> Path:
    """Make the tokenizer saved in ``directory`` a class of the directory's own code (as
    openPangu's is), its module importing ``imports`` first."""
    (directory / "tokenization_mine.py").write_text(
        f"{imports}from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MineTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((directory / "tokenizer_config.json").read_text())
    auto_map = {"AutoTokenizer": [None, "tokenization_mine.MineTokenizer"]}
    config.update(tokenizer_class="MineTokenizer", auto_map=auto_map)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_every_command_takes_trust_remote_code(tmp_path, capsys):
    model = str(remote_tokenizer(save_tiny(tmp_path / "model", mask_token=True)))
    argv = ["generate", "--model", model, "--prompt", "ab", "--max-new-tokens", "3"]
    assert cli_main(argv) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert cli_main([*argv, "--trust-remote-code"]) == 0
    parser = build_parser()
    for command in (
        ["eval", "--model", model, "--task", "demo", "--data", "x.jsonl", "--json", "r.json"],
        ["bench", "sampler", "--model", model, "--prompts", "p.jsonl", "--json", "r.json"],
        ["serve", "--model", model],
        ["run-batch", "--model", model, "-i", "in.jsonl", "-o", "out.jsonl"],
        ["bench", "serve", "--model", model, "--prompts", "p.jsonl", "--json", "r.json"],
        ["merge", "--base", model, "--adapter", "a", "--output", "o"],
    ):
        assert parser.parse_args([*command, "--trust-remote-code"]).trust_remote_code, command
    from fluid_npu.serve.bench_cli import _server_args
    from fluid_npu.serve.cli import _settings

    served = parser.parse_args(["serve", "--model", model, "--trust-remote-code"])
    assert _settings(served).trust_remote_code
    spawned = parser.parse_args(["bench", "serve", "--model", model, "--prompts", "p.jsonl",
                                 "--json", "r.json", "--trust-remote-code",
                                 "--served-model-name", "a", "b"])  # fmt: skip
    args = _server_args(spawned)
    assert "--trust-remote-code" in args
    assert args[args.index("--served-model-name") :][:3] == ["--served-model-name", "a", "b"]


def test_a_remote_code_tokenizer_crosses_from_the_engine_s_process(tmp_path):
    """``fluid serve --trust-remote-code``: the engine's process loads the tokenizer of the model's
    own code and sends it to the server's, which imports that code from transformers' module
    cache; the answers are those of the engine in a thread (``--no-engine-process``)."""
    import httpx

    from fluid_npu.serve.launch import ServerProcess

    model = str(remote_tokenizer(save_tiny(tmp_path / "m", mask_token=True)))
    body = {"prompt": "hello world", "max_tokens": 6, "temperature": 0}
    texts = []
    for extra in ([], ["--no-engine-process"]):
        with ServerProcess(
            ["--model", model, "--trust-remote-code", "--policy", "ar", *extra]
        ) as p:
            assert p.health["info"]["engine_process"] is not bool(extra)
            answer = httpx.post(f"{p.url}/v1/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            texts.append(answer.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]
