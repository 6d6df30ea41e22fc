"""How a dataset's columns are read, as LLaMA-Factory reads them: an alpaca ``columns`` mapping
reads only the columns it names (its ``parser.py`` sets every other role to None), either prompt
column may be empty, and OpenAI messages given by path keep their tool calls. Mistakes in a
description get an error naming the fix, and so does a tokenizer's chat template that would leave
a row's tools or tool results out of its training text."""

from __future__ import annotations

import json

import pytest
from test_data import make_args, split_text, write_info, write_jsonl
from test_data_tools import sharegpt_row, trained

from fluid_npu.data import build_sft_dataset
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.model.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(reserved=11)


def user_turns(tok, data) -> list[str]:
    """The text of each example's last user turn (qwen template)."""
    texts = [split_text(tok, ex)[0] for ex in data.train]
    return [t.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0] for t in texts]


def test_an_alpaca_mapping_reads_only_the_columns_it_names(tmp_path, tok):
    """``{"prompt": "input", "response": "output"}`` (a common entry) reads ``input`` once, not
    again as the default query column; an ``input`` column the mapping leaves out is not read;
    a query without a prompt, or a null instruction beside an input, is the user turn alone."""
    rows = [{"instruction": "Answer briefly.", "input": "What is a tort?", "output": "A wrong."}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4", "input": "x"}])
    write_jsonl(tmp_path / "n.jsonl", [{"instruction": None, "input": "3+3?", "output": "6"}])
    write_info(
        tmp_path,
        {
            "by_input": {
                "file_name": "a.jsonl",
                "columns": {"prompt": "input", "response": "output"},
            },
            "no_input": {
                "file_name": "a.jsonl",
                "columns": {"prompt": "instruction", "response": "output"},
            },
            "query_only": {
                "file_name": "q.jsonl",
                "columns": {"query": "question", "response": "answer"},
            },
            "plain": {"file_name": "a.jsonl"},
        },
    )
    got = {
        name: user_turns(tok, build_sft_dataset(make_args(tmp_path, name), tok))
        for name in ("by_input", "no_input", "query_only", "plain", "n.jsonl")
    }
    assert got == {
        "by_input": ["What is a tort?"],
        "no_input": ["Answer briefly."],
        "query_only": ["2+2?"],
        "plain": ["Answer briefly.\nWhat is a tort?"],  # (no mapping: LLaMA-Factory's defaults)
        "n.jsonl": ["3+3?"],
    }


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"columns": {"prompt": "instruction"}}, 'no response column.*"response": "output"'),
        ({"columns": {"response": "output", "system": "s"}}, 'no prompt.*"prompt": "instruction"'),
        ({"columns": {"messages": "conversations"}}, '"formatting": "sharegpt"'),
    ],
)
def test_a_mapping_that_reads_nothing_names_the_fix(tmp_path, tok, entry, needle):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "R"}])
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", **entry}})
    with pytest.raises(DataError, match=needle):
        build_sft_dataset(make_args(tmp_path, "a"), tok)


def test_a_csv_file_is_refused_with_the_conversion(tmp_path, tok):
    (tmp_path / "x.csv").write_text("instruction,output\nq,a\n")
    write_info(tmp_path, {"x": {"file_name": "x.csv"}})
    with pytest.raises(DataError, match=r"not a .*file \(csv.*to_json.* x\.csv x\.jsonl"):
        build_sft_dataset(make_args(tmp_path, "x"), tok)


CALL = {"id": "c1", "type": "function", "function": {"name": "get_w", "arguments": '{"c": "P"}'}}
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"t": 20}'},
        {"role": "assistant", "content": "It is 20."},
    ]
}


def test_openai_messages_given_by_path_keep_their_tool_calls(tmp_path, tok):
    """A file of OpenAI messages given by path trains as ``formatting: openai`` does (its calls
    and results in the template's format), not as sharegpt messages that lose the calls."""
    write_jsonl(tmp_path / "oa.jsonl", [OPENAI_ROW])
    entry = {"file_name": "oa.jsonl", "formatting": "openai", "columns": {"messages": "messages"}}
    write_info(tmp_path, {"oa": entry})
    by_path = build_sft_dataset(make_args(tmp_path, "oa.jsonl"), tok)
    described = build_sft_dataset(make_args(tmp_path, "oa"), tok)
    assert by_path.train[0]["input_ids"] == described.train[0]["input_ids"]
    text, response = split_text(tok, by_path.train[0])
    assert '"name": "get_w"' in response and "It is 20." in response
    assert '{"t": 20}' in text and '{"t": 20}' not in response


def test_tool_calls_under_sharegpt_formatting_are_refused_not_dropped(tmp_path, tok):
    """A message's ``tool_calls`` under ``formatting: sharegpt`` (whose converter does not read
    them) is a row error naming ``formatting: openai``, not a turn trained without its calls."""
    row = json.loads(json.dumps(OPENAI_ROW))
    row["messages"][1]["content"] = "Let me check."
    talk = row["messages"]
    row["messages"] = [*talk[:2], {"role": "user", "content": "ok"}, *talk[3:]]
    write_jsonl(tmp_path / "oa.jsonl", [row])
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant"}  # fmt: skip
    entry = {"file_name": "oa.jsonl", "formatting": "sharegpt", "tags": tags}
    write_info(tmp_path, {"oa": entry | {"columns": {"messages": "messages"}}})
    with pytest.raises(DataError, match=r'tool_calls.*"formatting": "openai"'):
        build_sft_dataset(make_args(tmp_path, "oa"), tok)


TURNS_ONLY = (  # a template of user and assistant turns (as Phi-3-mini's first one)
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "<|im_start|>assistant\n{% elif m.role == 'assistant' %}{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
)


def test_a_template_that_leaves_out_tools_or_results_is_refused(tmp_path, caplog):
    """Tools the template does not write (plain ChatML) or tool results it drops would train
    calls and answers on grounds the model never sees: a ``ConfigError`` naming the templates
    that write them. A system prompt it drops is a warning (the server drops it too); the rest
    trains."""
    tok = build_tiny_tokenizer()  # (ChatML: writes every role, no tools)
    with pytest.raises(ConfigError, match=r"does not write the tools .* set `template:`"):
        trained(tmp_path, tok, [sharegpt_row()])
    tok.chat_template = TURNS_ONLY
    with pytest.raises(ConfigError, match="does not write the tool results"):
        trained(tmp_path, tok, [sharegpt_row(tools=False)])
    talk = [("system", "Talk like a pirate."), ("human", "hi"), ("gpt", "yo")]
    row = {"conversations": [{"from": f, "value": v} for f, v in talk], "tools": None}
    with caplog.at_level("WARNING", logger="fluid_npu.data.auto_template"):
        example = trained(tmp_path, tok, [row]).train[0]
    assert "does not write a system message" in caplog.text
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert tok.decode(example["input_ids"]) == text

    # what the check reads is the template's: a template that trims contents (Llama 3's) still
    # writes a result "0\n"; one that fails on tools=None (it iterates over them) writes tools
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "trim").mkdir()
    trained(tmp_path / "trim", tok, [sharegpt_row(result="0\n", tools=False)])
    tok.chat_template = (
        "{% for t in tools %}{{ t.function.name }}\n{% endfor %}{% for m in messages %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "iter").mkdir()
    example = trained(tmp_path / "iter", tok, [sharegpt_row()]).train[0]
    assert tok.decode(example["input_ids"]).startswith("add\n")
