"""The sampler's user surface: ``fluid generate``, ``fluid bench sampler``, ``FluidForCausalLM``,
and one clear error per bad input, through the CLI (exit 2, one line on stderr) and the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from fluid_npu.cli import main
from fluid_npu.errors import CheckpointError, FluidError
from fluid_npu.model.adapters import FluidModelMeta, apply_lora, load_fluid
from fluid_npu.model.khead import KHead, KHeadConfig, load_khead, save_khead
from fluid_npu.model.loading import fingerprint
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny
from fluid_npu.sampling import FluidForCausalLM, HorizonError, PromptError, generate
from fluid_npu.sampling.lossless import hf_greedy
from fluid_npu.sampling.prompts import left_pad, read_prompt_lines

CONTEXT = 96  # max_position_embeddings of the test model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A FLUID-ready tiny model (MASK token, short context), its K-head, and mismatched parts."""
    root = tmp_path_factory.mktemp("sampler")
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, max_position_embeddings=CONTEXT)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    base_fp = load_fluid(root / "model").base_fingerprint
    torch.manual_seed(0)
    save_khead(KHead(64, 8), KHeadConfig(64, 8, base_fingerprint=base_fp), root / "khead")
    save_khead(KHead(64, 8), KHeadConfig(64, 8, base_fingerprint="0" * 16), root / "khead_other")
    other = build_tiny_model("llama", tok, seed=1, max_position_embeddings=CONTEXT)
    other_fp = fingerprint(other)
    assert other_fp != base_fp
    apply_lora(other, rank=4, alpha=8, dropout=0.0, target="all").save_pretrained(
        root / "adapter_other"
    )
    FluidModelMeta(other_fp, tok.mask_token, tok.mask_token_id, len(tok)).save(
        root / "adapter_other"
    )
    save_tiny(root / "nomask", "llama")  # a plain base: no MASK token, no reserved tokens
    return {k: str(root / k) for k in ("model", "khead", "khead_other", "adapter_other", "nomask")}


def _write_prompts(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_generate_prompts_file(dirs, tmp_path):
    rows = [{"prompt": "hello there"}, {"prompt": "a"}, {"input_ids": [5, 6, 7, 8]}]
    src = _write_prompts(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "gen.jsonl"
    argv = [
        "generate",
        "--model",
        dirs["model"],
        "--prompts",
        src,
        "--output",
        str(out),
        "--policy",
        "fixed:3",
        "--loop",
        "fused",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in got] == ["hello there", "a", None]
    assert [p.name for p in out.parent.iterdir()] == ["gen.jsonl"]  # no temporary file left
    fluid = FluidForCausalLM.from_pretrained(dirs["model"])
    tok = fluid.tokenizer
    batches = [[tok("hello there")["input_ids"], tok("a")["input_ids"]], [[5, 6, 7, 8]]]
    expected = []
    for b in batches:
        fluid.generate(*left_pad(b, tok.pad_token_id), max_new_tokens=6, policy="fixed:3")
        expected += fluid.last_output.new_tokens
    for r, toks in zip(got, expected):
        assert r["token_ids"] == toks and len(toks) <= 6
        assert r["text"] == tok.decode(toks, skip_special_tokens=True)
        assert r["forwards"] >= 1 and r["tpf"] == pytest.approx(len(toks) / r["forwards"])
        assert r["finish_reason"] in ("stop", "length")


def test_generate_samples_with_a_seed_and_stops(dirs, tmp_path):
    src = _write_prompts(tmp_path / "in.jsonl", [{"prompt": "hello there"}, {"prompt": "a"}])
    base = ["generate", "--model", dirs["model"], "--prompts", src, "--policy", "fixed:3"]
    flags = ["--temperature", "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens", "8"]
    runs = []
    for n, size in enumerate(("1", "2")):  # the same seed, alone or batched: the same tokens
        out = tmp_path / f"s{n}.jsonl"
        argv = [*base, *flags, "--batch-size", size, "--logprobs", "2", "--output", str(out)]
        assert main(argv) == 0
        runs.append([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()])
    assert [r["token_ids"] for r in runs[0]] == [r["token_ids"] for r in runs[1]]
    row = runs[0][0]
    assert len(row["logprobs"]) == len(row["token_ids"]) == len(row["top_logprobs"])
    assert all(len(t) == 2 for t in row["top_logprobs"])
    assert all(lp < 0 for lp in row["logprobs"])  # the model's own (raw_logprobs, the default)
    # processed_logprobs: the distribution drawn from, top-k 1 kept one token (log 1 = 0) and
    # left the alternative at -inf, written as vLLM writes it (JSON has no infinities)
    out = tmp_path / "processed.jsonl"
    processed = [*flags[:2], "--top-k", "1", *flags[4:], "--logprobs", "2"]
    assert main([*base, *processed, "--logprobs-mode", "processed_logprobs", "--output",
                 str(out)]) == 0  # fmt: skip
    row = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert row["logprobs"] == [0.0] * len(row["token_ids"])
    assert [[t[0][1], t[1][1]] for t in row["top_logprobs"]] == [[0.0, -9999.0]] * len(
        row["token_ids"]
    )
    text = runs[0][0]["text"]
    stop = text[2:4] if len(text) >= 4 else text[-1]  # a stop string this run produces
    out = tmp_path / "stop.jsonl"
    assert main([*base, *flags, "--stop", stop, "--output", str(out)]) == 0
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["finish_reason"] == "stop" and first["text"].endswith(stop)
    assert text.startswith(first["text"])


def test_reference_loop_seeds_each_prompt_whatever_batch_it_is_in(dirs, tmp_path):
    """Prompt i is seeded seed + i in the reference loop too, which decodes consecutive batches:
    the same prompt in two batches does not get the same sample, and --batch-size changes
    nothing."""
    src = _write_prompts(tmp_path / "in.jsonl", [{"prompt": "hello there"}] * 4)
    base = ["generate", "--model", dirs["model"], "--prompts", src, "--loop", "reference",
            "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "12"]  # fmt: skip
    runs = {}
    for size in ("2", "4"):
        out = tmp_path / f"b{size}.jsonl"
        assert main([*base, "--batch-size", size, "--output", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(r["finish_reason"] in ("stop", "length") for r in rows)  # as the fused loop's
        runs[size] = [r["token_ids"] for r in rows]
    assert runs["2"] == runs["4"]
    assert runs["2"][0] != runs["2"][2]  # seeds 5 and 7, not 5 twice


def test_sampling_flags_are_checked_before_loading(dirs, capsys):
    base = ["generate", "--model", dirs["model"], "--prompt", "hi"]
    assert main([*base, "--top-p", "0"]) == 2
    assert "--top-p must lie in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--repetition-penalty", "0"]) == 2
    assert "--repetition-penalty must be > 0 and at most 10000 (1 = off)" in capsys.readouterr().err
    assert main([*base, "--stop", "x", "--loop", "reference"]) == 2
    assert "need --loop fused" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--min-new-tokens", "-1"], "--min-new-tokens must be >= 0 (0 = off), got -1"),
        (["--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens 9 exceeds"),
        (
            ["--attn-backend", "flash"],
            "--attn-backend 'flash' is not one of auto, reference, blocked",
        ),
        (["--attn-backend", "eager"], "leave --attn-backend out, or use --loop reference"),
        (
            ["--device", "cpu", "--loop", "reference", "--attn-backend", "npu"],
            "--attn-backend 'npu'",
        ),
    ],
)
def test_generate_flags_are_checked_before_loading(tmp_path, capsys, extra, fragment):
    # the model directory does not exist: an error about it would mean the model was loaded first
    assert main(["generate", "--model", str(tmp_path / "no_model"), "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_generate_streams_one_prompt(dirs, capsys):
    argv = [
        "generate",
        "--model",
        dirs["model"],
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "5",
        "--policy",
        "entropy",
        "--loop",
        "reference",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    fluid = FluidForCausalLM.from_pretrained(dirs["model"])
    ids = fluid.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    seq = fluid.generate(torch.tensor([ids]), max_new_tokens=5, policy="entropy", loop="reference")
    text = fluid.tokenizer.decode(seq[0, len(ids) :], skip_special_tokens=True)
    assert captured.out == text + "\n"
    assert "TPF" in captured.err


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        (["--prompt", ""], "model", "empty"),
        (["--prompt", "x" * 90, "--max-new-tokens", "10"], "model", "context holds 96"),
        (["--prompt", "hi", "--policy", "fixed:0"], "model", "K must lie in [1, k_max=16]"),
        (["--prompt", "hi", "--policy", "fixed:99"], "model", "K must lie in [1, k_max=16]"),
        (["--prompt", "hi", "--policy", "fixed:9", "--khead", "khead"], "model", "k_max=8"),
        (["--prompt", "hi", "--adapter", "adapter_other"], "model", "another base model"),
        (["--prompt", "hi", "--khead", "khead_other"], "model", "another base model"),
        (["--prompt", "hi"], "nomask", "no MASK token"),
        (["--max-new-tokens", "4"], "model", "exactly one of --prompt"),
    ],
)
def test_cli_bad_input_is_one_line(dirs, capsys, extra, key, fragment):
    extra = [dirs.get(a, a) if a in ("khead", "khead_other", "adapter_other") else a for a in extra]
    assert main(["generate", "--model", dirs[key], *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: "), err
    assert fragment in err[0]


def test_output_paths_and_prompt_rows_are_checked_before_loading(dirs, tmp_path, capsys):
    """A path that cannot be written fails before the model loads (the model directory here does
    not exist: an error about it would mean it was loaded first), and prompt-file errors name
    the file's own line."""
    (tmp_path / "afile").write_text("x")
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    missing = str(tmp_path / "no_model")
    cases = [
        (["generate", "--model", missing, "--prompts", src, "--output",
          str(tmp_path / "afile" / "out.jsonl")], "the folder of --output"),
        (["generate", "--model", missing, "--prompts", src, "--output", str(tmp_path)],
         "is a directory"),
        (["generate", "--model", missing, "--prompt", "hi", "--logprobs", "2"], "--output"),
        (["generate", "--model", missing, "--prompt", "hi", "--logprobs-mode", "raw",
          "--logprobs", "1", "--output", str(tmp_path / "o.jsonl")],
         "--logprobs-mode 'raw' is not one of"),
        (["generate", "--model", missing, "--prompt", "hi", "--logprobs-mode", "raw_logits"],
         "add --logprobs N"),
        (_bench_argv(missing, src, tmp_path / "afile" / "b.json"), "the folder of --json"),
    ]  # fmt: skip
    blank = tmp_path / "blank.jsonl"
    blank.write_text('\n{"prompt": "ok"}\n{"input_ids": []}\n')  # (a text: after encoding)
    cases.append((["generate", "--model", missing, "--prompts", str(blank), "--output",
                   str(tmp_path / "o.jsonl")], "blank.jsonl:3: the prompt is empty"))  # fmt: skip
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (argv, err)


def test_generate_reads_chat_conversations(dirs, tmp_path, capsys):
    """A ``messages`` line (system prompt, earlier turns) decodes from the chat template's
    rendering, as the server's chat route and vLLM's ``LLM.chat``: the same tokens as the ids of
    that rendering given as ``input_ids``; the row keeps its messages."""
    tok = FluidForCausalLM.from_pretrained(dirs["model"]).tokenizer
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    src = _write_prompts(tmp_path / "c.jsonl", [{"messages": chat}, {"input_ids": list(ids)}])
    out = tmp_path / "c_out.jsonl"
    base = ["generate", "--model", dirs["model"], "--max-new-tokens", "5", "--policy", "fixed:3"]
    assert main([*base, "--prompts", src, "--output", str(out), "--batch-size", "2"]) == 0
    conv, plain = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert conv["messages"] == chat and conv["prompt"] is None
    assert conv["token_ids"] == plain["token_ids"] and conv["text"] == plain["text"]
    bad = {
        "not a list": ({"messages": "hi"}, "non-empty list"),
        "no role": ({"messages": [{"content": "hi"}]}, 'messages[0] needs a "role"'),
        "an image": (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "text parts",
        ),
        "extra key": ({"messages": [{"role": "user", "content": "x", "tool": 1}]}, "['tool']"),
        "a function turn": (
            {"messages": [{"role": "function", "content": "x"}]},
            "one of system, ",
        ),
        "a tool turn without its call": (
            {"messages": [{"role": "tool", "content": "x"}]},
            'needs "tool_call_id"',
        ),
        "arguments not JSON": (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{x"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments is not valid JSON",
        ),
        "tools without messages": ({"prompt": "a", "tools": []}, '"tools" go with "messages"'),
        "a bad tool": (
            {"messages": chat, "tools": [{"type": "function", "function": {}}]},
            'tools[0].function needs a "name"',
        ),
        "tools the template ignores": (
            {"messages": chat, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "does not use tools",
        ),
        "two prompts": ({"prompt": "a", "messages": chat}, "give one of prompt / messages"),
    }
    capsys.readouterr()
    for case, (row, fragment) in bad.items():  # each refused before the model loads
        bad_src = _write_prompts(tmp_path / "bad.jsonl", [{"prompt": "ok"}, row])
        assert main([*base, "--prompts", bad_src, "--output", str(out)]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bad.jsonl:2" in err[0] and fragment in err[0], (case, err)
    # tools beside the messages reach the template, with a past call and its result
    template = ("{% for t in tools or [] %}{{ t.function.name }};{% endfor %}{% for m in messages"
                " %}{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.arguments.n }}"
                "{% endfor %}{{ m.tool_call_id or '' }}{% endfor %}")  # fmt: skip
    call = {"id": "c7", "type": "function", "function": {"name": "f", "arguments": '{"n": 5}'}}
    turns = [*chat, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c7", "content": "five"}]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f"}}]
    tool_src = _write_prompts(tmp_path / "t.jsonl", [{"messages": turns, "tools": tools},
                                                {"prompt": "f;be briefcount5fivec7"}])  # fmt: skip
    argv = [*base, "--prompts", tool_src, "--output", str(out), "--chat-template", template]
    assert main(argv) == 0
    nothing = _write_prompts(tmp_path / "t0.jsonl", [{"messages": chat, "tools": None}])
    assert read_prompt_lines(nothing)[0][1]["tools"] is None  # null: no tools, as the server
    with_tools, spelled = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert with_tools["token_ids"] == spelled["token_ids"] and with_tools["messages"] == turns
    # "name": null is no name (as the server reads it); a template's own refusal is one line too
    named = _write_prompts(tmp_path / "n.jsonl", [{"messages": [{**chat[1], "name": None}]}])
    assert main([*base, "--prompts", named, "--output", str(out)]) == 0
    strict = tmp_path / "strict"
    shutil.copytree(dirs["model"], strict)
    config = json.loads((strict / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ raise_exception('roles must alternate user/assistant') }}"
    (strict / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for template in strict.glob("chat_template.jinja"):
        template.write_text(config["chat_template"], encoding="utf-8")
    capsys.readouterr()
    argv = ["generate", "--model", str(strict), "--prompts", src, "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "c.jsonl:1: the chat template rejected the messages: roles must alternate" in err


THINKING = (  # a Qwen3-style template: enable_thinking false closes an empty reasoning block
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def test_generate_takes_a_chat_template_and_its_variables(dirs, tmp_path, capsys):
    """``--chat-template`` (a file, or the template itself) replaces the tokenizer's and
    ``--chat-template-kwargs`` sets its variables: a ``--chat`` prompt decodes exactly as the ids
    of that rendering given as ``input_ids``. Flags that would change nothing, a missing file, a
    template Jinja cannot compile and bad keywords are one line each, before the model loads."""
    tok = FluidForCausalLM.from_pretrained(dirs["model"]).tokenizer
    user = [{"role": "user", "content": "count to three"}]
    rendered = {
        think: tok(tok.apply_chat_template(user, chat_template=THINKING, tokenize=False,
                                           add_generation_prompt=True, enable_thinking=think),
                   add_special_tokens=False)["input_ids"]
        for think in (True, False)
    }  # fmt: skip
    assert rendered[True] != rendered[False]
    rows = [{"prompt": "count to three"}, {"messages": user}]
    rows += [{"input_ids": rendered[False]}, {"input_ids": rendered[True]}]
    src = _write_prompts(tmp_path / "c.jsonl", rows)
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING, encoding="utf-8")
    base = ["generate", "--model", dirs["model"], "--max-new-tokens", "12", "--policy", "fixed:3",
            "--prompts", src, "--chat", "--batch-size", "2"]  # fmt: skip
    out = tmp_path / "c_out.jsonl"
    long = "{#" + "x" * 400 + "#}" + THINKING  # inline, and longer than a file name may be
    for given in (str(template), long):
        argv = [*base, "--output", str(out), "--chat-template", given]
        assert main([*argv, "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
        rows = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
        assert rows[0] == rows[1] == rows[2] != rows[3]  # (the two renderings decode apart)
        assert main(argv) == 0  # no keywords: the template's own default (thinking on)
        rows = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
        assert rows[0] == rows[1] == rows[3]
    missing = str(tmp_path / "no_model")
    plain = ["generate", "--model", missing, "--prompt", "hi", "--max-new-tokens", "2"]
    config = template.with_name("chat_template.json")  # HF's file, not a template
    config.write_text(json.dumps({"chat_template": THINKING}), encoding="utf-8")
    bad = template.with_name("bad.jinja")
    bad.write_text("{% for m in messages %}", encoding="utf-8")
    for extra, fragment in (
        (["--chat-template", str(tmp_path / "none.jinja"), "--chat"], "no such file"),
        (["--chat-template", str(bad), "--chat"], "not a valid Jinja chat template"),
        (["--chat-template", "{{ oops", "--chat"], "not a valid Jinja chat template"),
        (["--chat-template-kwargs", '{"tokenize": false}', "--chat"], "sets tokenize"),
        (["--chat-template-kwargs", '{"conversations": 1}', "--chat"], "sets conversations"),
        (["--chat-template", str(config), "--chat"], "is a JSON file"),
        (["--chat-template", str(tmp_path), "--chat"], "is a directory"),
        (["--chat-template-kwargs", "[1]", "--chat"], "must be a JSON object"),
        (["--chat-template-kwargs", "{nope", "--chat"], "is not JSON"),
        (["--chat-template-kwargs", "{}"], "add --chat"),
        (["--chat-template", str(template)], "add --chat"),
    ):
        capsys.readouterr()
        assert main([*plain, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (extra, err)


def test_one_prompt_with_output_is_written_and_ids_rows_may_label_the_prompt(
    dirs, tmp_path, capsys
):
    out = tmp_path / "one.jsonl"
    base = ["generate", "--model", dirs["model"], "--max-new-tokens", "4", "--output", str(out)]
    assert main([*base, "--prompt", "hello", "--logprobs", "1"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == "hello" and len(row["logprobs"]) == len(row["token_ids"]) > 0
    # input_ids are the prompt; an empty "prompt" beside them is only its label
    src = _write_prompts(tmp_path / "ids.jsonl", [{"prompt": "", "input_ids": [5, 6, 7]}])
    assert main([*base, "--prompts", src]) == 0
    # a prompt past the context is named by the file's line (it was "prompt 1", counted from 0)
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [5] * 95}]
    src = _write_prompts(tmp_path / "long.jsonl", rows)
    capsys.readouterr()
    assert main([*base, "--prompts", src]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "long.jsonl:2: the prompt has 95 tokens" in err[0], err
    assert "holds 96" in err[0], err


def test_api_bad_input(dirs):
    fluid = FluidForCausalLM.from_pretrained(dirs["model"])
    model, tok = fluid.model, fluid.tokenizer
    with pytest.raises(PromptError, match="empty"):
        generate(model, tok, [[]])
    with pytest.raises(PromptError, match="context holds 96"):
        generate(model, tok, torch.ones(1, 90, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(HorizonError, match=r"K must lie in \[1, k_max=16\]"):
        generate(model, tok, [[1, 2]], policy="fixed:17")
    with pytest.raises(HorizonError, match="needs a K-head"):
        generate(model, tok, [[1, 2]], policy="khead")
    with pytest.raises(CheckpointError, match="another base model"):
        load_fluid(dirs["model"], dirs["adapter_other"])
    with pytest.raises(CheckpointError, match="another base model"):
        load_khead(dirs["khead_other"], base_fingerprint=load_fluid(dirs["model"]).base_fingerprint)
    with pytest.raises(FluidError, match="no MASK token"):
        FluidForCausalLM.from_pretrained(dirs["nomask"])
    plain = build_tiny_tokenizer()
    with pytest.raises(FluidError, match="no MASK token"):
        generate(model, plain, [[1, 2]])


def test_fluid_for_causal_lm_matches_transformers(dirs):
    fluid = FluidForCausalLM.from_pretrained(dirs["model"], khead=dirs["khead"])
    tok = fluid.tokenizer
    ids, mask = left_pad([tok("one two")["input_ids"], tok("x")["input_ids"]], tok.pad_token_id)
    seq = fluid.generate(ids, mask, max_new_tokens=7)
    assert fluid.last_stats.policy == "khead" and fluid.last_stats.decode_forwards > 0
    assert seq.shape[1] <= ids.shape[1] + 7 and torch.equal(seq[:, : ids.shape[1]], ids)
    eos = fluid.model.generation_config.eos_token_id
    hf = hf_greedy(fluid.model, ids, mask, 7, [eos], tok.pad_token_id)
    assert fluid.last_output.new_tokens == hf
    # transformers' length settings: max_length counts the prompt (keyword or config)
    from transformers import GenerationConfig

    width = ids.shape[1]
    config = GenerationConfig(max_length=width + 4, eos_token_id=[])
    assert fluid.generate(ids, mask, generation_config=config).shape[1] == width + 4
    assert fluid.generate(ids, mask, max_length=width + 3, eos_token_id=[]).shape[1] == width + 3
    assert fluid.generate(ids, mask, 2, generation_config=config).shape[1] == width + 2


def test_a_khead_matches_its_base_in_any_dtype(tmp_path):
    """The base fingerprint reads the saved weights: loaded in float16 (whose rounding of small
    values is not bf16's), the base is still the one its K-head was trained on."""
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok)
    with torch.no_grad():  # a value fp16 rounds away from bf16's rounding of it
        model.get_input_embeddings().weight[0, :4] = torch.tensor([3.3e-6, 1e-5, -2e-6, 5e-7])
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    fp = load_fluid(tmp_path / "model").base_fingerprint
    save_khead(KHead(64, 4), KHeadConfig(64, 4, base_fingerprint=fp), tmp_path / "khead")
    for dtype in ("float32", "bfloat16", "float16"):
        fluid = FluidForCausalLM.from_pretrained(tmp_path / "model", khead=tmp_path / "khead",
                                                 dtype=dtype)  # fmt: skip
        assert fluid.khead is not None and next(fluid.model.parameters()).dtype == getattr(
            torch, dtype
        )


def test_fluid_for_causal_lm_keeps_its_draft_budget_across_calls(dirs):
    """Each ``generate`` call continues from the costs and acceptance the earlier ones measured
    (one budget per policy); ``engine_kwargs`` may be None or bring its own store."""
    fluid = FluidForCausalLM.from_pretrained(dirs["model"], khead=dirs["khead"])
    tok = fluid.tokenizer
    ids, mask = left_pad([tok("one two")["input_ids"], tok("x")["input_ids"]], tok.pad_token_id)
    fluid.generate(ids, mask, max_new_tokens=6, policy="fixed:4")
    (budget,) = fluid.draft_budgets.values()
    steps = budget._decode_steps
    assert steps > 0
    fluid.generate(ids, mask, max_new_tokens=6, policy="fixed:4", engine_kwargs=None)
    assert list(fluid.draft_budgets.values()) == [budget] and budget._decode_steps > steps
    fluid.generate(ids, mask, max_new_tokens=6, policy="entropy")
    assert len(fluid.draft_budgets) == 2
    own: dict = {}
    fluid.generate(ids, mask, max_new_tokens=6, policy="ar", engine_kwargs={"budgets": own})
    assert len(own) == 1 and len(fluid.draft_budgets) == 2


def test_bench_sampler_writes_report(dirs, tmp_path, capsys):
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "count 1 to 5"}, {"prompt": "ab"}])
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "sampler",
        "--model",
        dirs["model"],
        "--khead",
        dirs["khead"],
        "--prompts",
        src,
        "--json",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    for key in ("best_lossless_tpf", "speedup_b1", "speedup_b8", "command", "device", "rows"):
        assert key in report
    assert set(report["speedup_by_batch"]) == {"1", "8"}
    assert report["speedup_by_batch"]["1"] == report["speedup_b1"]
    from fluid_npu import device as devices

    expected = devices.current().device.type  # --device auto: the best device this host has
    assert report["device"]["type"] == expected and report["device"]["name"]
    assert report["command"].startswith("fluid bench sampler --model")
    rows = report["rows"]
    policies = {r["policy"] for r in rows}
    assert policies == {"ar", "fixed:4", "fixed:8", "entropy:2", "khead"}
    assert len(report["rows"]) == 2 * 2 * 5  # batch sizes x loops x policies
    assert all(r["lossless"] for r in report["rows"]) and report["mismatches"] == 0
    assert report["best_lossless_tpf"] >= 1.0 and report["speedup_b1"] > 0
    assert "| batch | loop | policy |" in capsys.readouterr().out
    assert report["speedup_vs_generate"] == report["speedup_by_batch"]
    assert report["repeats"] == 2  # (the default: interleaved timed rounds)
    assert set(report["overhead_efficiency"]) == {"1", "8"} and report["dtype"] == "float32"
    assert set(report["overhead_efficiency_vs_ar"]) == {"1", "8"}
    assert all(0.0 <= r["exact_match_rate"] <= 1.0 for r in report["rows"])
    # the work behind each row: at least one computed position per committed token, and a
    # drafting policy never computes less than plain AR (alone in the batch, AR computes exactly
    # the prompts and one position per new token; a policy that drafts adds slots to that)
    per_token = {(r["batch_size"], r["loop"], r["policy"]): r["computed_per_token"] for r in rows}
    assert all(r["computed_tokens"] >= r["new_tokens"] for r in rows)
    assert per_token[(1, "fused", "fixed:8")] >= per_token[(1, "fused", "ar")] >= 1.0
    static = report["baseline"]["1"]["static_cache"]  # transformers' static cache, same run
    assert static["tokens_per_s"] > 0 and static["exact_match_rate"] == 1.0


def test_overhead_efficiency_is_the_fastest_drafting_rows_against_generate_and_against_ar():
    """Per batch size: the fastest lossless row that drafts (TPF above 1) gives speedup ÷ TPF
    against ``generate`` and, over the lossless ``ar`` row of its own loop, against the engine's
    own AR; None where no row drafts or no such ``ar`` row exists."""
    from fluid_npu.sampling.bench import BenchSettings
    from fluid_npu.sampling.bench_report import build_report

    def row(bs, loop, policy, speedup, tpf, lossless=True):
        return {"batch_size": bs, "loop": loop, "policy": policy, "speedup": speedup, "tpf": tpf,
                "lossless": lossless, "mismatches": [], "ties": []}  # fmt: skip

    rows = [
        row(1, "fused", "ar", 1.2, 1.0), row(1, "reference", "ar", 0.8, 1.0),
        row(1, "fused", "entropy:2", 3.6, 8.0), row(1, "fused", "khead", 3.0, 9.0),
        row(1, "reference", "fixed:8", 9.0, 6.0, lossless=False),  # (not lossless: not counted)
        row(8, "fused", "ar", 1.5, 1.0, lossless=False), row(8, "fused", "entropy:2", 2.0, 4.0),
        row(32, "fused", "ar", 1.1, 1.0), row(32, "fused", "entropy:2", 1.0, 1.0),
    ]  # fmt: skip
    s = BenchSettings(model="m", prompts="p", json_path="j", batch_sizes=[1, 8, 32])
    report = build_report(s, rows, {}, 64, {}, torch.device("cpu"), torch.float32)
    assert report["overhead_efficiency"] == {"1": 3.6 / 8.0, "8": 2.0 / 4.0, "32": None}
    assert report["overhead_efficiency_vs_ar"] == {"1": pytest.approx(3.6 / 1.2 / 8.0),
                                                   "8": None, "32": None}  # fmt: skip


def test_bench_times_the_baseline_and_every_row_in_interleaved_rounds(monkeypatch):
    """Every configuration is warmed up (first batch) before any is timed, then each round runs
    them all once over every batch, each keeping its best time and that round's output: a
    machine that slows down during a run reaches the baseline and the rows alike, not whichever
    was timed first."""
    from types import SimpleNamespace

    from fluid_npu.sampling.bench import BenchSettings, _Runner

    calls: list[tuple[str, int]] = []
    now = [0.0]  # a fake clock: a timed run of a configuration takes its next cost

    def config(name: str, costs: list[float]):
        def fn(batches):
            calls.append((name, len(batches)))
            if len(batches) > 1:  # (a timed run; the warm-up decodes the first batch only)
                now[0] += costs.pop(0)
            return f"{name}-out-{len(calls)}"

        return fn

    import fluid_npu.sampling.bench as bench

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    s = BenchSettings(model="m", prompts="p", json_path="j", repeats=2)
    run = _Runner(SimpleNamespace(device=torch.device("cpu")), s, [0], 0)
    runs = {"generate": config("generate", [5.0, 3.0]), "khead": config("khead", [1.0, 2.0])}
    got = run.timed(runs, [[[1]], [[2]], [[3]]])
    assert calls == [("generate", 1), ("khead", 1)] + [("generate", 3), ("khead", 3)] * 2
    assert got["generate"][1] == 3.0 and got["khead"][1] == 1.0  # each its best round
    # the output (its TPF, work counts) of the round whose time is reported
    assert got["generate"][0] == "generate-out-5" and got["khead"][0] == "khead-out-4"


def test_bench_sampler_in_bf16(dirs, tmp_path):
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "count 1 to 5"}, {"prompt": "ab"}])
    out = tmp_path / "bench.json"
    argv = _bench_argv(dirs["model"], src, out, "--dtype", "bfloat16", "--batch-sizes", "2")
    assert (
        main([*argv, "--loops", "fused", "--policies", "ar,fixed:2", "--max-new-tokens", "6"]) == 0
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["dtype"] == "bfloat16" and report["mismatches"] == 0


def test_bench_sampler_can_leave_out_the_static_cache_baseline(dirs, tmp_path, monkeypatch):
    """``--no-static-baseline``: transformers' static-cache generate is never called (on CUDA it
    compiles per shape), the report has no such entry, and its command says so."""
    import fluid_npu.sampling.bench as bench

    caches = []
    real_hf_greedy = bench.hf_greedy

    def counted(model, ids, mask, new, eos, pad, cache=None):
        caches.append(cache)
        return real_hf_greedy(model, ids, mask, new, eos, pad, cache)

    monkeypatch.setattr(bench, "hf_greedy", counted)
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "count 1 to 5"}, {"prompt": "ab"}])
    out = tmp_path / "bench.json"
    argv = _bench_argv(dirs["model"], src, out, "--batch-sizes", "1", "--repeats", "1")
    extra = ["--loops", "fused", "--policies", "ar", "--max-new-tokens", "4"]
    assert main([*argv, *extra, "--no-static-baseline"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert caches and "static" not in caches
    assert "static_cache" not in report["baseline"]["1"]
    assert "--no-static-baseline" in report["command"]
    caches.clear()
    assert main([*argv, *extra]) == 0  # the default keeps it
    assert "static" in caches
    assert "static_cache" in json.loads(out.read_text(encoding="utf-8"))["baseline"]["1"]


def test_no_adaptive_drafting_reaches_every_engine_of_generate_bench_and_eval(
    dirs, tmp_path, monkeypatch
):
    """``--no-adaptive-drafting`` (as on ``fluid serve``): the engines run with the draft budget
    off — TPF independent of the machine's speed — and the reports say so; the same for
    ``--no-enable-prefix-caching`` (the engines' prefix reuse off)."""
    from fluid_npu.sampling.scheduler import Scheduler

    seen: list[bool] = []
    reuse: list[bool] = []
    init = Scheduler.__init__

    def spy(self, *a, **k):
        seen.append(k.get("adaptive", True))
        reuse.append(k.get("prefix_caching", True))
        init(self, *a, **k)

    monkeypatch.setattr(Scheduler, "__init__", spy)
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "count 1 to 5"}, {"prompt": "ab"}])
    out = tmp_path / "bench.json"
    argv = _bench_argv(dirs["model"], src, out, "--batch-sizes", "2", "--loops", "fused")
    flags = ["--policies", "fixed:4", "--max-new-tokens", "6", "--no-adaptive-drafting"]
    off = "--no-enable-prefix-caching"
    assert main([*argv, *flags, off]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["adaptive_drafting"] is False and "--no-adaptive-drafting" in report["command"]
    assert report["prefix_caching"] is False and off in report["command"]
    assert seen and not any(seen) and not any(reuse)
    seen.clear()
    reuse.clear()
    gen = ["generate", "--model", dirs["model"], "--prompts", src, "--max-new-tokens", "4"]
    assert main([*gen, "--output", str(tmp_path / "o.jsonl"), "--no-adaptive-drafting", off]) == 0
    assert seen and not any(seen) and not any(reuse)
    seen.clear()
    reuse.clear()
    ev = tmp_path / "eval.json"
    data = _write_prompts(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    evargs = ["eval", "--model", dirs["model"], "--task", "gsm8k", "--data", data, "--policy"]
    evargs += ["fixed:4", "--max-new-tokens", "4", "--json", str(ev), "--no-adaptive-drafting"]
    assert main([*evargs, off]) == 0
    assert seen and not any(seen) and not any(reuse)
    assert "--no-adaptive-drafting" in json.loads(ev.read_text(encoding="utf-8"))["command"]
    seen.clear()
    reuse.clear()
    assert main([*argv, "--policies", "ar", "--max-new-tokens", "2"]) == 0  # the default: on
    assert all(seen) and json.loads(out.read_text(encoding="utf-8"))["adaptive_drafting"]
    assert all(reuse) and json.loads(out.read_text(encoding="utf-8"))["prefix_caching"]


def test_bad_dtype_is_one_clear_error(dirs, tmp_path, capsys):
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    assert main(_bench_argv(dirs["model"], src, tmp_path / "o.json", "--dtype", "fp8")) == 2
    err = capsys.readouterr().err
    assert "--dtype 'fp8'" in err and "bfloat16" in err and not (tmp_path / "o.json").exists()


def test_bench_and_eval_render_chats_with_the_given_template_and_variables(
    dirs, tmp_path, monkeypatch, capsys
):
    """``fluid bench sampler --chat`` and ``fluid eval --chat`` decode from the template and
    variables the flags give (the engine's prompts are read back), and refuse them without
    ``--chat``."""
    from fluid_npu.sampling.scheduler import Scheduler

    tok = FluidForCausalLM.from_pretrained(dirs["model"]).tokenizer
    prompts: list[str] = []
    submit = Scheduler.submit

    def spy(self, req):
        prompts.append(tok.decode(req.prompt))
        return submit(self, req)

    monkeypatch.setattr(Scheduler, "submit", spy)
    chat = ["--chat", "--chat-template", THINKING, "--chat-template-kwargs"]
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "count 1 to 5"}])
    argv = _bench_argv(dirs["model"], src, tmp_path / "b.json", "--batch-sizes", "1", "--loops",
                       "fused", "--policies", "ar", "--max-new-tokens", "3")  # fmt: skip
    assert main([*argv, *chat, '{"enable_thinking": false}']) == 0
    assert prompts and all(p.endswith("assistant\n<think>\n\n</think>\n\n") for p in prompts)
    prompts.clear()
    data = _write_prompts(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    evargs = ["eval", "--model", dirs["model"], "--task", "gsm8k", "--data", data, "--policy",
              "fixed:4", "--max-new-tokens", "3", "--json", str(tmp_path / "e.json")]  # fmt: skip
    assert main([*evargs, *chat, '{"enable_thinking": false}']) == 0
    assert prompts and all(p.endswith("assistant\n<think>\n\n</think>\n\n") for p in prompts)
    capsys.readouterr()
    for command in (argv, evargs):
        assert main([*command, "--chat-template-kwargs", "{}"]) == 2
        assert "add --chat" in capsys.readouterr().err


def _bench_argv(model: str, src: str, out, *extra: str) -> list[str]:
    return ["bench", "sampler", "--model", model, "--prompts", src, "--json", str(out), *extra]


def test_bench_sampler_mismatch_exits_1_after_writing(dirs, tmp_path, capsys, monkeypatch):
    from fluid_npu.sampling import bench
    from fluid_npu.sampling.lossless import Difference

    def one_mismatch(model, prompts, ours, theirs, **_):
        return [Difference(row=0, index=0, ours=1, theirs=2, gap=5.0, tie=False)]

    monkeypatch.setattr(bench, "compare", one_mismatch)
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    out = tmp_path / "bench.json"
    extra = ["--max-new-tokens", "3", "--batch-sizes", "1,2", "--loops", "fused"]
    argv = _bench_argv(dirs["model"], src, out, *extra, "--policies", "ar", "--device", "cpu")
    assert main(argv) == 1
    report = json.loads(out.read_text(encoding="utf-8"))  # written before the failure
    assert report["mismatches"] == 2 and not any(r["lossless"] for r in report["rows"])
    assert report["best_lossless_tpf"] is None
    assert report["speedup_by_batch"] == {"1": None, "2": None}
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fluid: 2 of 2 rows were not lossless"), err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--loops", "fused,bogus"], "--loops takes a comma-separated subset"),
        (["--loops", "fused,fused"], "--loops names fused more than once; list each once"),
        (["--loops", "bogus"], "subset of fused,reference, got 'bogus'"),
        (["--policies", ","], "--policies takes comma-separated names like ar,fixed:4; got ','"),
        (
            ["--attn-backend", "flash"],
            "--attn-backend 'flash' is not one of auto, reference, blocked",
        ),
        (["--attn-backend", "eager"], "leave --attn-backend out, or use --loops reference"),
        (["--policies", "ar,khead,ar"], "--policies names ar more than once"),
        (["--batch-sizes", "1,0"], "--batch-sizes needs positive integers"),
        (["--batch-sizes", "1,x"], "--batch-sizes takes integers"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--device", "npu"], "device 'npu' was requested but is not available"),
        (["--device", "npu:1"], "device 'npu:1' was requested but is not available"),
        (["--device", "cpu:0"], "the CPU takes no index; give cpu"),
        (["--device", "cuda:x"], "the index after cuda: is a number (cuda:0)"),
    ],
)
def test_bench_sampler_bad_args_before_loading(tmp_path, capsys, monkeypatch, extra, fragment):
    from fluid_npu import device

    monkeypatch.setattr(device, "is_npu_available", lambda: False)
    monkeypatch.setattr(device, "is_cuda_available", lambda: False)
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    out = tmp_path / "bench.json"
    # the model directory does not exist: an error about it would mean the model was loaded first
    assert main(_bench_argv(str(tmp_path / "no_model"), src, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: "), err
    assert fragment in err[0] and not out.exists()


def test_compile_flag_reaches_the_engine(dirs, tmp_path, monkeypatch):
    from fluid_npu.sampling import scheduler

    seen = {}
    real = scheduler.Scheduler.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        kwargs["compile"] = False  # the wiring is under test here, not inductor (tested apart)
        real(self, *args, **kwargs)

    monkeypatch.setattr(scheduler.Scheduler, "__init__", spy)
    src = _write_prompts(tmp_path / "in.jsonl", [{"prompt": "ab"}, {"prompt": "cd"}])
    out = tmp_path / "o.jsonl"
    argv = ["generate", "--model", dirs["model"], "--prompts", src, "--output", str(out)]
    assert main([*argv, "--compile", "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    assert seen["compile"] is True and seen["max_batch"] == 2


def test_generate_and_serve_end_at_the_tokenizers_own_eos(dirs, tmp_path):
    """A chat checkpoint whose tokenizer ends a turn with a token its generation config does not
    list (early Llama 3): ``fluid generate`` and ``fluid serve`` stop there, as vLLM does, and the
    ending token is counted but not spelled."""
    import shutil

    from transformers import AutoTokenizer

    from fluid_npu.serve.server import ServeSettings, build_scheduler

    model = tmp_path / "model"
    shutil.copytree(dirs["model"], model)
    src = _write_prompts(tmp_path / "in.jsonl", [{"prompt": "hello there"}])

    def row(name: str) -> dict:
        out = tmp_path / name
        argv = ["generate", "--model", str(model), "--prompts", src, "--output", str(out),
                "--max-new-tokens", "12"]  # fmt: skip
        assert main(argv) == 0
        return json.loads(out.read_text(encoding="utf-8").splitlines()[0])

    ids = row("before.jsonl")["token_ids"]
    tok = AutoTokenizer.from_pretrained(model)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and ids[i] >= 32)
    tok.eos_token = tok.convert_ids_to_tokens(ids[k])
    tok.save_pretrained(model)  # the generation config still lists only </s>
    after = row("after.jsonl")
    assert after["token_ids"] == ids[: k + 1] and after["finish_reason"] == "stop"
    assert after["text"] == tok.decode(ids[:k], skip_special_tokens=True)
    scheduler, *_ = build_scheduler(ServeSettings(model=str(model), max_batch=1, max_len=64))
    try:
        assert scheduler.eos_ids == [tok.convert_tokens_to_ids("</s>"), ids[k]]
    finally:
        scheduler.close()


def test_bench_sampler_prints_no_third_party_notices(dirs, tmp_path):
    """A fresh ``fluid bench sampler`` (both loops) shows its own lines only: the versions in its
    JSON come from the installed packages, not from importing peft / deepspeed (which logged
    bitsandbytes' 4-bit kernels notice and DeepSpeed's accelerator probe), and no decoder call
    uses the cache argument transformers deprecated."""
    src = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "ab"}])
    out = tmp_path / "bench.json"
    argv = _bench_argv(dirs["model"], src, out, "--batch-sizes", "1", "--policies", "ar")
    code = "import sys; from fluid_npu.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_ = subprocess.run(
        [sys.executable, "-c", code, *argv, "--max-new-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run_.returncode == 0, run_.stderr
    for notice in ("gemm_4bit", "Setting accelerator", "deprecated"):
        assert notice not in run_.stderr + run_.stdout, run_.stderr
    versions = json.loads(out.read_text(encoding="utf-8"))["versions"]
    assert versions["peft"] == metadata.version("peft")


def test_generate_holds_outputs_to_structured_outputs(dirs, tmp_path, capsys):
    """``--structured-outputs`` (vLLM's field as JSON): every row follows the grammar — here a
    choice — and is the model's own pick under it, batch of two or one row alone; a malformed or
    uncompilable one is one error naming the flag, before anything is decoded."""
    src = _write_prompts(tmp_path / "in.jsonl", [{"prompt": "hello there"}, {"prompt": "a"}])
    spec = '{"choice": ["yes", "no", "maybe so"]}'

    def run(name: str, *extra: str) -> list[dict]:
        out = tmp_path / name
        argv = ["generate", "--model", dirs["model"], "--prompts", src, "--output", str(out),
                "--max-new-tokens", "10", "--structured-outputs", spec, *extra]  # fmt: skip
        assert main(argv) == 0
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    rows = run("two.jsonl", "--batch-size", "2")
    assert [r["text"] in ("yes", "no", "maybe so") for r in rows] == [True, True]
    assert all(r["finish_reason"] == "stop" for r in rows)
    alone = run("one.jsonl", "--batch-size", "1", "--policy", "ar")
    assert [r["token_ids"] for r in alone] == [r["token_ids"] for r in rows]
    base = ["generate", "--model", dirs["model"], "--prompt", "a", "--max-new-tokens", "4"]
    for bad, says in (("[1]", "takes a JSON object"),
                      ('{"regex": "(a"}', "regular expression does not compile"),
                      ('{"xml": "a"}', "structured_outputs has ['xml']")):  # fmt: skip
        assert main([*base, "--structured-outputs", bad]) == 2
        assert says in capsys.readouterr().err
    assert main([*base, "--loop", "reference", "--structured-outputs", spec]) == 2
    assert "need --loop fused" in capsys.readouterr().err


def test_generate_takes_nothing_from_the_checkpoints_generation_config(dirs, tmp_path, capsys):
    # every setting is the command's own: a checkpoint that samples, bans a word and sets
    # no_repeat_ngram_size changes nothing, and says nothing (its EOS ids aside)
    import shutil
    import warnings

    from transformers import GenerationConfig

    argv = ["generate", "--prompt", "one two", "--max-new-tokens", "6", "--policy", "ar"]
    assert main([*argv, "--model", dirs["model"]]) == 0
    want = capsys.readouterr().out
    first = FluidForCausalLM.from_pretrained(dirs["model"]).tokenizer(want)["input_ids"][0]
    copy = tmp_path / "model"
    shutil.copytree(dirs["model"], copy)
    model_config = json.loads((copy / "config.json").read_text())
    GenerationConfig(
        do_sample=True, temperature=5.0, bad_words_ids=[[first]], no_repeat_ngram_size=3,
        eos_token_id=model_config.get("eos_token_id"),
    ).save_pretrained(copy)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*argv, "--model", str(copy)]) == 0
    assert capsys.readouterr().out == want
