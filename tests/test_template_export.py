"""A run trained with a named template decodes as it was trained: the template's turn end becomes
the EOS (tokenizer and generation config, saved with the adapter), and a tokenizer without a chat
template gets the named template as Jinja, rendering exactly the ids training encoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import as_overrides, tiny_stage1_recipe
from jinja2 import TemplateError
from synthetic import write_short_dataset

from fluid_npu.config import load_config
from fluid_npu.data.auto_template import get_template
from fluid_npu.data.template_export import (
    TRAINED_TEMPLATE,
    fit_tokenizer,
    jinja,
    served_otherwise,
    trained_template,
    turn_end,
)
from fluid_npu.data.templates import (
    TEMPLATES,
    Conversation,
    _tokenizer_adds_bos,
    rendered_ids,
)
from fluid_npu.model.merge import merge_adapter
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny
from fluid_npu.sampling.pretrained import FluidForCausalLM
from fluid_npu.sampling.prompts import read_chat_template
from fluid_npu.train.stage1 import run_stage1

CONVERSATIONS = [
    # (system, [(role, content), ...]): default system, own system, a tool result, several turns
    (None, [("user", "hi there")]),
    ("Be brief.", [("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")]),
    (None, [("user", "weather?"), ("assistant", "call"), ("observation", "sunny, 20 C")]),
    ("", [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]),
]
HF_ROLE = {"observation": "tool"}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_the_jinja_renders_the_ids_training_encodes(name, case):
    tok = build_tiny_tokenizer(reserved=11, chat_template=False)  # (openpangu's [unusedN])
    template = TEMPLATES[name]
    system, turns = CONVERSATIONS[case]
    conversation = Conversation(messages=turns, system=system)
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": HF_ROLE.get(r, r), "content": c} for r, c in turns
    ]
    text = tok.apply_chat_template(
        messages, chat_template=jinja(template), tokenize=False, add_generation_prompt=True
    )
    assert rendered_ids(tok, text) == template.encode(tok, conversation).input_ids


CALL = {"name": "add", "arguments": {"a": 1, "b": "é"}}
TOOLS = [{"name": "add", "description": "Adds", "parameters": {"type": "object"}}]


@pytest.mark.parametrize("name", [n for n, t in sorted(TEMPLATES.items()) if t.calls])
def test_the_jinja_renders_tools_and_calls_as_training_writes_them(name):
    """Tools listed in the system turn, two calls written in the template's call format (the one
    its model's tool-call parser reads), their two results as one observation turn: the served
    conversation (OpenAI messages, one tool message per result) renders training's ids."""
    tok = build_tiny_tokenizer(reserved=11, chat_template=False)
    template = TEMPLATES[name]
    conversation = Conversation(
        [("user", "1+2?"), ("function", json.dumps([CALL, CALL])),
         ("observation", "3\n</tool_response>\n<tool_response>\n4"), ("assistant", "3, 4")],
        system="S", tools=json.dumps(TOOLS),
    )  # fmt: skip
    calls = [{"id": i, "type": "function", "function": CALL} for i in ("a", "b")]
    messages = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "3", "tool_call_id": "a"},
        {"role": "tool", "content": "4", "tool_call_id": "b"},
        {"role": "assistant", "content": "3, 4"},
    ]  # fmt: skip
    text = tok.apply_chat_template(
        messages, tools=[{"type": "function", "function": f} for f in TOOLS],
        chat_template=jinja(template), tokenize=False,
    )  # fmt: skip
    assert rendered_ids(tok, text) == template.encode(tok, conversation).input_ids
    # text the model wrote before its calls (the parser's content) is given back before them
    messages[2]["content"] = "Sure."
    text = tok.apply_chat_template(messages, chat_template=jinja(template), tokenize=False)
    call = json.dumps(CALL, ensure_ascii=False)
    assert (
        "Sure.[unused11][" + call in text
        or "Sure.<tool_call>\n" + call in text
        or (
            "Sure."
            + json.dumps({"name": "add", "parameters": CALL["arguments"]}, ensure_ascii=False)
            in text
        )
    )


CALLED = [{"role": "user", "content": "x"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "messages", "refusal"),
    [
        ("qwen", [{"role": "assistant", "content": "x"}], "start with a user message"),
        ("qwen", [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
         "the first"),
        ("default", CALLED, "does not render tool calls"),  # (a template without a call format)
    ],
)  # fmt: skip
def test_the_jinja_refuses_what_training_never_encodes(name, messages, refusal):
    tok = build_tiny_tokenizer(chat_template=False)
    with pytest.raises(TemplateError, match=refusal):
        tok.apply_chat_template(messages, chat_template=jinja(TEMPLATES[name]))
    # a developer message first is the system message, as OpenAI's API reads it
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    render = dict(chat_template=jinja(TEMPLATES["qwen"]), tokenize=False)
    assert tok.apply_chat_template(developer, **render) == tok.apply_chat_template(system, **render)


def test_a_saved_template_is_read_as_the_named_one_and_carries_the_bos():
    # Stage II (template: auto) on a Stage I tokenizer trains through the named template again,
    # and a tokenizer that adds BOS to plain text gets it written by the template, as trained
    tok = build_tiny_tokenizer(chat_template=False)
    tok.add_bos_token = True  # (this tokenizer now prepends <s> to plain text)
    assert _tokenizer_adds_bos(tok)
    fit_tokenizer(TEMPLATES["qwen"], tok, build_tiny_model("llama", tok))
    assert get_template("auto", tok) is TEMPLATES["qwen"]
    conversation = Conversation(messages=[("user", "hi")])
    # as vLLM's chat route tokenizes a rendered chat: no special tokens added
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert list(ids) == TEMPLATES["qwen"].encode(tok, conversation).input_ids


def test_fit_tokenizer_sets_the_turn_end_as_eos_and_the_template_as_chat_template():
    tok = build_tiny_tokenizer(chat_template=False)
    model = build_tiny_model("llama", tok)
    old_eos = tok.eos_token_id
    changes = fit_tokenizer(TEMPLATES["qwen"], tok, model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and len(changes) == 2
    assert model.generation_config.eos_token_id == [end, old_eos]
    assert tok.chat_template == jinja(TEMPLATES["qwen"])
    # a template ending responses with {eos} keeps the EOS; a tokenizer's own template stays
    tok = build_tiny_tokenizer()
    own = tok.chat_template
    assert turn_end(TEMPLATES["default"]) is None
    assert fit_tokenizer(TEMPLATES["default"], tok, build_tiny_model("llama", tok)) == []
    assert tok.chat_template == own and tok.eos_token == "</s>"


def _qwen_run(tmp_path, **tok_kwargs: bool) -> tuple[Path, Path]:
    """A one-step Stage I run with the qwen template on a tiny base: (base, output)."""
    base = save_tiny(tmp_path / "base", "llama", **tok_kwargs)
    data = write_short_dataset(tmp_path / "data", n_train=8, seed=0)
    out = tmp_path / "stage1"
    recipe = tiny_stage1_recipe(
        base, data, template="qwen", cutoff_len=256, max_steps=1, save_steps=1,
        output_dir=str(out),
    )  # fmt: skip
    run_stage1(load_config(None, as_overrides(recipe)))
    return base, out


def test_a_trained_adapter_ends_at_its_templates_turn_end(tmp_path):
    base, out = _qwen_run(tmp_path, chat_template=False)
    saved = json.loads((out / "generation_config.json").read_text())
    # a checkpoint carries it too (an adapter's checkpoint-N is used as the final one is)
    in_checkpoint = json.loads((out / "checkpoint-1" / "generation_config.json").read_text())
    assert in_checkpoint["eos_token_id"] == saved["eos_token_id"]
    fluid = FluidForCausalLM.from_pretrained(base, adapter=out)
    end = fluid.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fluid.tokenizer.eos_token == "<|im_end|>" and saved["eos_token_id"][0] == end
    assert fluid.generation_config.eos_token_id[0] == end
    assert fluid.tokenizer.chat_template == jinja(TEMPLATES["qwen"])
    assert not (out / TRAINED_TEMPLATE).exists()  # (the template is its chat template now)


def test_a_named_template_the_tokenizers_own_serves_differently_is_warned(caplog):
    # the tokenizer keeps its own chat template (serving renders with it): a named template that
    # writes conversations otherwise trains a format the model is not served — warned, with the
    # first difference; one that writes the same text is not
    from fluid_npu.data.template_export import warn_if_served_differently

    tok = build_tiny_tokenizer(chat_template=False)
    tok.chat_template = (  # (Qwen2.5's: another default system prompt than the qwen template's)
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
        "You are Qwen.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    caplog.set_level("WARNING", logger="fluid_npu.data.template_export")
    assert warn_if_served_differently(TEMPLATES["qwen"], tok)
    [record] = caplog.records
    assert "template: auto" in record.getMessage() and "served 'Qwen." in record.getMessage()
    caplog.clear()
    tok.chat_template = jinja(TEMPLATES["qwen"])  # (the same format: nothing to say)
    assert not warn_if_served_differently(TEMPLATES["qwen"], tok) and not caplog.records
    assert trained_template(TEMPLATES["qwen"], tok) is None  # (the run's check: nothing to save)
    assert not caplog.records


# openPangu's own chat template (its tokenizer_config.json): no tools, no tool calls
PANGU_OWN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '[unused9]系统：[unused10]' }}{% endif %}{% if message['role'] == 'system' %}"
    "{{ '[unused9]系统：' + message['content'] + '[unused10]' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{'[unused9]助手：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{'[unused9]工具：' + message['content'] + '[unused10]'}}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{'[unused9]用户：' + message['content'] + '[unused10]'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)


def test_a_tokenizer_whose_own_template_drops_tools_is_served_otherwise(caplog):
    """openPangu's own template leaves the BOS to its tokenizer, which prepends it when encoding,
    so it renders a plain chat as the openpangu template trains it (BOS included); it drops the
    tools and the calls, which is the difference named — after the system turn's header, not at
    the BOS. The run is told, and saves the format it trained."""
    tok = build_tiny_tokenizer(reserved=13)
    tok.add_bos_token = True  # (as openPangu's tokenizer_config.json sets it)
    tok.chat_template = PANGU_OWN
    template = TEMPLATES["openpangu"]
    found = served_otherwise(template, tok)
    assert found is not None and found.conversation == "a chat with a tool call"
    assert (found.at, found.before) == (len("[unused9]系统："), "[unused9]系统：")
    assert found.trained.startswith("You have access to the following tools")
    assert found.served.startswith("[unused10][unused9]用户：1+2?")
    caplog.set_level("WARNING", logger="fluid_npu.data.template_export")
    assert trained_template(template, tok).text == jinja(template, True)
    assert "from character 12 of the served text (after '[unused9]系统：')" in caplog.text
    tok.chat_template = jinja(template)  # (its own format: nothing to save)
    assert served_otherwise(template, tok) is None and trained_template(template, tok) is None
    # a tokenizer that does not prepend the BOS serves the chat without the one training wrote
    tok.add_bos_token, tok.chat_template = False, PANGU_OWN
    found = served_otherwise(template, tok)
    assert found.conversation == "a plain chat" and found.at == 0 and found.trained[:3] == "<s>"


def test_a_run_served_otherwise_saves_the_format_it_trained(tmp_path, caplog):
    """A base whose own chat template (plain ChatML) renders otherwise than the qwen template
    (its default system prompt): the run saves the qwen template's Jinja beside the adapter and
    in its checkpoints, a file --chat-template reads, which loading names and merging (fluid merge,
    save_pretrained) keeps; a base
    without a template gets none (the template becomes its chat template)."""
    base, out = _qwen_run(tmp_path)
    saved = out / TRAINED_TEMPLATE
    assert read_chat_template(str(saved)) == jinja(TEMPLATES["qwen"], False)
    assert (out / "checkpoint-1" / TRAINED_TEMPLATE).read_text() == saved.read_text()
    # loading it without that template says so, with the file; merged, the model keeps it
    caplog.set_level("WARNING", logger="fluid_npu.data.template_export")
    FluidForCausalLM.from_pretrained(base, adapter=out)
    assert str(saved) in caplog.text and "--chat-template" in caplog.text
    caplog.clear()
    served = FluidForCausalLM.from_pretrained(base, adapter=out, chat_template=saved)
    assert not caplog.records and served.tokenizer.chat_template == saved.read_text()
    merged = merge_adapter(base, out, tmp_path / "merged")
    assert (merged / TRAINED_TEMPLATE).read_text() == saved.read_text()
    again = served.save_pretrained(tmp_path / "saved")  # (the Python API's merged save too)
    assert (again / TRAINED_TEMPLATE).read_text() == saved.read_text()
    # a new run over it in the format the base serves leaves no earlier run's file behind
    data = tmp_path / "data"
    recipe = tiny_stage1_recipe(
        base, data, template="auto", cutoff_len=256, max_steps=1, save_steps=1,
        output_dir=str(out), overwrite_output_dir=True,
    )  # fmt: skip
    run_stage1(load_config(None, as_overrides(recipe)))
    assert not saved.exists() and not (out / "checkpoint-1" / TRAINED_TEMPLATE).exists()
