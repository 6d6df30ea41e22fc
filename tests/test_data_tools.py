"""Training on tool-use and multi-turn conversations with the tokenizer's own chat template.

A tool call in LLaMA-Factory's data is a ``function_call`` turn holding JSON; a tokenizer's
template writes calls from structured ``tool_calls`` (with their markers) and answers from
``tool`` messages. What a model trains on must be what ``fluid serve`` renders for the same
conversation sent as OpenAI messages — else it learns calls the server's tool-call parser never
reads. Each check compares the trained ids with the server's rendering (``chat_template_ids``).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from fluid_npu.data import IGNORE_INDEX, TEMPLATES, build_sft_dataset
from fluid_npu.data.template_export import turn_end
from fluid_npu.data.tooluse import check_tools
from fluid_npu.errors import DataError
from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.sampling.prompts import chat_messages, chat_template_ids
from fluid_npu.serve.tool_text import PARSERS, ToolCallText

# A hermes-style template (Qwen2.5's layout): tools listed in the system turn, each call in
# <tool_call> tags with its arguments as JSON, each result in a tool turn naming its call.
HERMES = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, '
    '"id": "{{ c.id }}"}\n</tool_call>{% endfor %}'
    "{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3.1's rule: one call per assistant turn, refused by the template itself
ONE_CALL = (
    "{% for m in messages %}{% if m.tool_calls and m.tool_calls | length > 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function | tojson }}"
    "{% endfor %}</s>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
TOOLS = [{"name": "add", "description": "Adds", "parameters": {"type": "object"}}]
CALL = {"name": "add", "arguments": {"a": 1, "b": 2}}


def sharegpt_row(call: object = CALL, result: str = "3", tools: bool = True) -> dict:
    """A LLaMA-Factory sharegpt row with a tool call, its result and the answer (and the tools
    offered, unless ``tools`` is false: for templates that write none)."""
    return {
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": result},
            {"from": "gpt", "value": "It is 3."},
        ],
        "tools": json.dumps(TOOLS) if tools else None,
    }


def openai_row(results: list[tuple[str, str]]) -> dict:
    """A ``formatting: openai`` row: two calls (ids x and y), ``results`` (id, text) and the
    answer."""
    call = {"name": "add", "arguments": '{"a": 1}'}
    calls = [{"id": i, "type": "function", "function": call} for i in ("x", "y")]
    return {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "content": text, "tool_call_id": i} for i, text in results),
            {"role": "assistant", "content": "done"},
        ],
        "tools": None,
    }


def trained(tmp_path, tok, rows, formatting="sharegpt", **overrides):
    """The examples ``rows`` give with the tokenizer's own template (``template: auto``)."""
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    entry = {"file_name": "t.jsonl", "formatting": formatting}
    if formatting == "sharegpt":
        entry["columns"] = {"messages": "conversations", "tools": "tools"}
    elif formatting == "openai":
        entry["columns"] = {"messages": "messages", "tools": "tools"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"t": entry}), "utf-8")
    args = dict(
        dataset="t", dataset_dir=str(tmp_path), template="auto", cutoff_len=2048,
        skip_bad_rows=False, max_samples=None, val_size=0, seed=0, mask_history=False,
        train_on_prompt=False, preprocessing_num_workers=None, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    args.update(overrides)
    return build_sft_dataset(SimpleNamespace(**args), tok)


def responses(tok, example) -> list[str]:
    """The loss-carrying runs of an example, decoded."""
    out, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            out, run = [*out, tok.decode(run)], []
    return out + ([tok.decode(run)] if run else [])


@pytest.fixture
def tok():
    tok = build_tiny_tokenizer()
    tok.chat_template = HERMES
    return tok


def test_a_tool_call_trains_as_the_server_renders_it(tmp_path, tok):
    """The sharegpt row's ids are the server's rendering of the same conversation (the call with
    its markers, the result answering it, the tools in OpenAI's form); the call and the answer
    carry the loss, the result does not."""
    example = trained(tmp_path, tok, [sharegpt_row()]).train[0]
    served = chat_messages(
        [
            {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "content": "3", "tool_call_id": "call00001"},
            {"role": "assistant", "content": "It is 3."},
        ],
        "request",
    )  # fmt: skip
    tools = check_tools([{"type": "function", "function": TOOLS[0]}], "tools")
    ids = chat_template_ids(tok, served, add_generation_prompt=False, tools=tools)
    assert example["input_ids"] == ids
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "call00001"}\n'
    assert responses(tok, example) == [f"{call}</tool_call><|im_end|>", "It is 3.<|im_end|>"]
    # The prompt the server decodes a call from is the trained text up to the first response.
    prompt = chat_template_ids(tok, served[:1], tools=tools)
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][len(prompt)] != IGNORE_INDEX


def test_parallel_calls_get_one_result_each(tmp_path, tok):
    """``formatting: openai``: two calls and their two results — each result is its own tool
    message answering its call, as the server renders the request."""
    row = openai_row([("x", "1"), ("y", "2")])
    row["tools"] = [{"type": "function", "function": TOOLS[0]}]
    text = tok.decode(trained(tmp_path, tok, [row], formatting="openai").train[0]["input_ids"])
    assert "<|im_start|>tool\n1 (call00001)<|im_end|>\n<|im_start|>tool\n2 (call00002)" in text
    assert text.count('"id": "call0000') == 2 and "</tool_response>" not in text
    assert text.count('{"type": "function", "function": {"name": "add"') == 1  # (kept as given)


@pytest.mark.parametrize(
    "call, message",
    [
        ("add(1, 2)", "function-call turn 1 is not JSON"),
        ({"name": "add", "args": {}}, "call 0 must be"),
        ({"name": "add", "arguments": "[1]"}, "arguments must be a JSON object"),
    ],
)
def test_a_bad_call_names_the_row(tmp_path, tok, call, message):
    """A function-call turn the template cannot be given: one error naming the row and what the
    turn must hold; with skip_bad_rows the row is dropped and counted."""
    bad = sharegpt_row(call if isinstance(call, dict) else None)
    if not isinstance(call, dict):
        bad["conversations"][1]["value"] = call
    with pytest.raises(DataError, match=message) as refused:
        trained(tmp_path, tok, [sharegpt_row(), bad])
    assert "t.jsonl" in str(refused.value) and "skip_bad_rows" in str(refused.value)
    data = trained(tmp_path, tok, [sharegpt_row(), bad], skip_bad_rows=True)
    assert len(data.train) == 1 and data.stats.rows_skipped == 1


def test_a_template_refusing_a_conversation_names_the_row(tmp_path):
    """A template's own refusal (Llama 3.1: one call per turn) is the row's error, not a crash in
    tokenization; the rows it renders train."""
    tok = build_tiny_tokenizer()
    tok.chat_template = ONE_CALL  # (it writes no tools: rows without them)
    one, two = sharegpt_row(tools=False), sharegpt_row([CALL, CALL], tools=False)
    with pytest.raises(DataError, match="refused this conversation: This model only supports"):
        trained(tmp_path, tok, [one, two])
    data = trained(tmp_path, tok, [one, two], skip_bad_rows=True)
    assert len(data.train) == 1
    assert responses(tok, data.train[0])[0] == '{"name": "add", "arguments": {"a": 1, "b": 2}}</s>'


def test_a_template_that_does_not_write_calls_trains_their_json(tmp_path):
    """A template that renders an assistant turn without its ``tool_calls`` (plain ChatML,
    Qwen2's) would train the call as an empty answer: the call's JSON is its text instead."""
    tok = build_tiny_tokenizer()  # (ChatML: content only, no tools)
    example = trained(tmp_path, tok, [sharegpt_row(tools=False)]).train[0]
    assert responses(tok, example) == [json.dumps(CALL) + "<|im_end|>", "It is 3.<|im_end|>"]


@pytest.mark.parametrize(
    "turns, message",
    [
        ([("human", "hi"), ("observation", "3"), ("gpt", "ok")], None),  # (not at turn 0)
        ([("human", "go"), ("gpt", "sure"), ("observation", "3"), ("gpt", "ok")],
         "observation turn 2 answers no function call"),
        ([("human", "go"), ("function_call", json.dumps([CALL, CALL])),
          ("observation", "1\n</tool_response>\n<tool_response>\n2\n</tool_response>\n"
                          "<tool_response>\n3"), ("gpt", "ok")],
         "observation turn 2 holds 3 results for 2 calls"),
    ],
)  # fmt: skip
def test_results_that_answer_no_call_name_the_row(tmp_path, tok, turns, message):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": None}
    if message is None:  # (sharegpt's roles: a conversation cannot open with a tool result)
        with pytest.raises(DataError, match="roles do not alternate"):
            trained(tmp_path, tok, [row])
        return
    with pytest.raises(DataError, match=message):
        trained(tmp_path, tok, [row])


def test_one_result_for_several_calls_answers_the_first(tmp_path, tok):
    """LLaMA-Factory's rows often give one observation for parallel calls: it answers the first."""
    text = tok.decode(trained(tmp_path, tok, [sharegpt_row([CALL, CALL])]).train[0]["input_ids"])
    assert "<|im_start|>tool\n3 (call00001)<|im_end|>" in text and "call00002)" not in text


def test_openai_results_follow_their_calls(tmp_path, tok):
    """``formatting: openai`` results given out of order answer the calls they name."""
    row = openai_row([("y", "of y"), ("x", "of x")])
    text = tok.decode(trained(tmp_path, tok, [row], formatting="openai").train[0]["input_ids"])
    assert text.index("of x (call00001)") < text.index("of y (call00002)")


def test_bad_tools_and_a_failing_template_name_the_row(tmp_path, tok):
    bad = sharegpt_row()
    bad["tools"] = "[{not json"
    with pytest.raises(DataError, match=r"t\.jsonl.*the tools column is not JSON"):
        trained(tmp_path, tok, [bad])
    needs_tools = build_tiny_tokenizer()
    needs_tools.chat_template = "{% for t in tools %}{{ t.function.name }}{% endfor %}"
    row = sharegpt_row()
    row["tools"] = None
    with pytest.raises(DataError, match=r"refused this conversation: .*\(TypeError\)"):
        trained(tmp_path, needs_tools, [row])


# Qwen3's rule: the last assistant turn (only) gets an empty <think> block, so a turn renders
# otherwise once later turns follow
LAST_THINKS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def multi_turn(*answers: str) -> dict:
    turns = []
    for i, answer in enumerate(answers):
        turns += [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, "tools": None}


def test_a_template_that_rewrites_earlier_turns_trains_one_example_per_turn(tmp_path):
    """Each response turn trains in its own example — the conversation up to it, as the server
    renders the prompt of that turn — where one sequence cannot hold every turn as served."""
    tok = build_tiny_tokenizer()
    tok.chat_template = LAST_THINKS
    data = trained(tmp_path, tok, [multi_turn("A0", "A1")])
    assert data.stats.rows_kept == 1 and len(data.train) == 2
    think = "<think>\n\n</think>\n\n"
    for i, example in enumerate(data.train):
        assert responses(tok, example) == [f"{think}A{i}<|im_end|>"]  # (the turn's own loss)
        served = chat_messages(
            [{"role": r, "content": c} for k in range(i) for r, c in (("user", f"q{k}"),
             ("assistant", f"A{k}"))] + [{"role": "user", "content": f"q{i}"}], "request",
        )  # fmt: skip
        prompt = chat_template_ids(tok, served)
        assert example["input_ids"][: len(prompt)] == prompt
        assert example["labels"][len(prompt) - 1] == IGNORE_INDEX != example["labels"][len(prompt)]
    assert "A0<|im_end|>" in tok.decode(data.train[1]["input_ids"])  # (history without the block)
    # mask_history: the last turn alone, as for any template
    (last,) = trained(tmp_path, tok, [multi_turn("A0", "A1")], mask_history=True).train
    assert last["input_ids"] == data.train[1]["input_ids"]


# Mistral v0.3's rule: the system prompt goes into the last user turn only, when that turn ends
# the conversation (the prompt of a turn the server renders), so no turn's prompt is a prefix of
# the conversation that holds its answer
SYSTEM_LAST = (
    "{% set system = messages[0].content if messages[0].role == 'system' else '' %}"
    "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}[INST] "
    "{% if loop.last and system %}{{ system }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}"
)
# ... and a template that writes nothing for an assistant turn without content
SKIPS_EMPTY = (
    "{% set system = messages[0].content if messages[0].role == 'system' else '' %}"
    "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}<|im_start|>user\n"
    "{% if loop.last and system %}{{ system }}\n{% endif %}{{ m.content }}<|im_end|>\n"
    "{% elif m.content %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Hermes 3's rule: a tool result that ends the conversation has no newline before <|im_end|>
LAST_RESULT = HERMES.replace(
    "({{ m.tool_call_id }}){% endif %}",
    "({{ m.tool_call_id }}){% if not loop.last %}{{ '\\n' }}{% endif %}{% endif %}",
)


def test_a_turn_whose_prompt_renders_otherwise_trains_after_the_served_prompt(tmp_path, caplog):
    """Where the template renders a turn's prompt otherwise once the turn follows (Mistral
    v0.3's system prompt, Hermes 3's last tool result), each turn trains after the prompt the
    server renders for it, its loss on the turn's own tokens."""
    tok = build_tiny_tokenizer()
    tok.chat_template = SYSTEM_LAST
    history = [{"role": "system", "content": "Be brief."}]
    rows = [{"messages": [*history, {"role": "user", "content": "q0"},
                          {"role": "assistant", "content": "A0"},
                          {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "A1"}], "tools": None}]  # fmt: skip
    with caplog.at_level("WARNING", logger="fluid_npu.data.auto_template"):
        data = trained(tmp_path, tok, rows, formatting="openai")
    assert "system" not in caplog.text  # (written into the last user turn: trained, served)
    assert data.stats.rows_kept == 1 and len(data.train) == 2
    for i, example in enumerate(data.train):
        assert responses(tok, example) == [f" A{i}</s>"]  # (the space the template writes too)
        served = [*history, *rows[0]["messages"][1 : 2 + 2 * i]]
        prompt = chat_template_ids(tok, chat_messages(served, "request"))
        assert tok.decode(prompt).endswith(f"[INST] Be brief.\n\nq{i}[/INST]")
        assert example["input_ids"][: len(prompt)] == prompt
        assert example["labels"][len(prompt) - 1] == IGNORE_INDEX
    # a tool call, its result (the last message of the answer's prompt) and the answer
    tok.chat_template = LAST_RESULT
    (tmp_path / "hermes").mkdir()
    (call, answer) = trained(tmp_path / "hermes", tok, [sharegpt_row()]).train
    assert responses(tok, answer) == ["It is 3.<|im_end|>"]
    assert tok.decode(answer["input_ids"]).endswith(
        "3 (call00001)<|im_end|>\n<|im_start|>assistant\nIt is 3.<|im_end|>\n"
    )  # (no newline after the result: as served)
    assert responses(tok, call)[0].startswith("<tool_call>")
    # a template that writes nothing for an empty turn: the header the served prompt ends with is
    # not trained again; an answer whose text cannot be found is a bad row, not a bad dataset
    tok.chat_template = SKIPS_EMPTY
    (tmp_path / "skips").mkdir()
    data = trained(tmp_path / "skips", tok, rows, formatting="openai")
    assert [responses(tok, e) for e in data.train] == [["A0<|im_end|>"], ["A1<|im_end|>"]]
    assert tok.decode(data.train[1]["input_ids"]).endswith(
        "user\nBe brief.\nq1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    )
    lost = {"messages": [*history, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "LOST"}]}  # fmt: skip
    tok.chat_template = SKIPS_EMPTY.replace("{{ m.content }}<|im_end|>\n{% endif %}",
                                            "{{ m.content | replace('LOST', 'x') }}<|im_end|>\n"
                                            "{% endif %}")  # fmt: skip
    with pytest.raises(DataError, match=r"line 2: .* cannot be located; set `template:`"):
        trained(tmp_path / "skips", tok, [*rows, {**lost, "tools": None}], formatting="openai")
    kept = trained(tmp_path / "skips", tok, [*rows, {**lost, "tools": None}], formatting="openai",
                   skip_bad_rows=True)  # fmt: skip
    assert kept.stats.rows_kept == 1


def test_a_bad_row_among_expanded_ones_is_named_by_its_line(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = LAST_THINKS
    rows = [multi_turn("A0", "A1"), multi_turn("A0", "A1", "A2"), multi_turn("A0", " ")]
    with pytest.raises(DataError, match=r"t\.jsonl line 3: the response is empty"):
        trained(tmp_path, tok, rows)
    data = trained(tmp_path, tok, rows, skip_bad_rows=True)
    assert (data.stats.rows_read, data.stats.rows_kept, len(data.train)) == (3, 2, 5)


def test_a_conversations_examples_stay_on_one_side_of_val_size(tmp_path):
    """val_size holds out whole conversations (else a turn's example would be trained on while
    a later turn of the same conversation, holding it as history, is evaluated)."""
    tok = build_tiny_tokenizer()
    tok.chat_template = LAST_THINKS
    rows = [multi_turn(f"x{r}", f"y{r}") for r in range(6)]
    data = trained(tmp_path, tok, rows, val_size=0.5)
    sides = []
    for examples in (data.train, data.eval):
        texts = [tok.decode(e["input_ids"]) for e in examples]
        sides.append(sorted(r for r in range(6) for t in texts if f"x{r}<" in t))
    assert len(data.train) == len(data.eval) == 6  # (3 conversations each, 2 turns each)
    assert all(side.count(r) == 2 for side in sides for r in side)
    assert not set(sides[0]) & set(sides[1])


# Qwen3's thinking switch: off, the generation prompt carries an empty <think> block and so does
# the last assistant turn
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_enable_thinking_reaches_the_tokenizers_template(tmp_path, caplog):
    """LLaMA-Factory's ``enable_thinking: false``: the answers train after the empty <think>
    block the prompt then carries (as the server renders it with that variable), no loss on it."""
    tok = build_tiny_tokenizer()
    tok.chat_template = THINKING
    (example,) = trained(tmp_path, tok, [multi_turn("A0")], enable_thinking=False).train
    assert responses(tok, example) == ["A0<|im_end|>"]
    served = chat_messages([{"role": "user", "content": "q0"}], "request")
    prompt = chat_template_ids(tok, served, template_kwargs={"enable_thinking": False})
    assert example["input_ids"][: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("assistant\n<think>\n\n</think>\n\n")
    (default,) = trained(tmp_path, tok, [multi_turn("A0")]).train  # (the block carries loss)
    assert responses(tok, default) == ["<think>\n\n</think>\n\nA0<|im_end|>"]
    with caplog.at_level("WARNING"):
        trained(tmp_path, tok, [multi_turn("A0")], enable_thinking=False, template="qwen")
    assert "enable_thinking apply to the tokenizer's own chat template only" in caplog.text


def test_a_later_turn_past_cutoff_len_is_left_out_as_truncation_would(tmp_path):
    """A split conversation whose later turn starts past cutoff_len keeps the turns that fit
    (counted truncated), as one truncated sequence would; only a first turn that does not fit
    makes the row bad."""
    tok = build_tiny_tokenizer()
    tok.chat_template = LAST_THINKS
    row = multi_turn("A0", "A1")
    row["conversations"][2]["value"] = "q " * 60  # a long second question
    data = trained(tmp_path, tok, [row], cutoff_len=50)
    assert len(data.train) == 1 and data.stats.truncated == 1
    assert responses(tok, data.train[0]) == ["<think>\n\n</think>\n\nA0<|im_end|>"]
    row["conversations"][0]["value"] = "q " * 60  # the first turn past it too: the row is bad
    with pytest.raises(DataError, match="no response token fits in cutoff_len=50"):
        trained(tmp_path, tok, [row], cutoff_len=50)


def test_openai_results_follow_their_calls_whatever_the_ids_type(tmp_path, tok):
    row = openai_row([])
    row["messages"][1]["tool_calls"][0]["id"], row["messages"][1]["tool_calls"][1]["id"] = "1", "2"
    row["messages"][2:2] = [{"role": "tool", "content": "of 2", "tool_call_id": 2},
                            {"role": "tool", "content": "of 1", "tool_call_id": 1}]  # fmt: skip
    text = tok.decode(trained(tmp_path, tok, [row], formatting="openai").train[0]["input_ids"])
    assert text.index("of 1 (call00001)") < text.index("of 2 (call00002)")


def test_split_conversations_are_kept_for_stage_iis_held_out_part(tmp_path):
    """With val_size 0 the train examples' conversations go with the data (SFTData.train_groups),
    so Stage II's own held-out part keeps conversations whole too."""
    tok = build_tiny_tokenizer()
    tok.chat_template = LAST_THINKS
    data = trained(tmp_path, tok, [multi_turn(f"x{r}", f"y{r}") for r in range(3)])
    assert data.train_groups == [0, 0, 1, 1, 2, 2]
    assert trained(tmp_path, build_tiny_tokenizer(), [multi_turn("a", "b")]).train_groups is None


@pytest.mark.parametrize("name", [n for n, t in sorted(TEMPLATES.items()) if t.calls])
def test_a_named_template_trains_calls_its_models_parser_reads(tmp_path, name):
    """openpangu / qwen / llama3 write a function-call turn as their models write calls (the
    format of --tool-call-parser pangu / hermes / llama3_json), so the call the model learns is
    one the server reads back; the tools are listed in the system turn as one JSON list."""
    tok = build_tiny_tokenizer(reserved=13)  # (openPangu's [unusedN] markers)
    template = TEMPLATES[name]
    row = sharegpt_row(call=[CALL, {"name": "add", "arguments": {"a": 3, "b": 4}}])
    (example,) = trained(tmp_path, tok, [row], template=name).train
    call, answer = responses(tok, example)
    end = turn_end(template)
    assert call.endswith(end) and answer == f"It is 3.{end}"
    reader = ToolCallText(PARSERS[template.calls])
    content = reader.add(call.removesuffix(end))
    rest, found = reader.finish()
    assert content + rest == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                     for c in found] == [("add", CALL["arguments"]),
                                                         ("add", {"a": 3, "b": 4})]  # fmt: skip
    assert "tools:\n" + json.dumps(TOOLS) in tok.decode(example["input_ids"])
    # no tools ("[]", as many rows without them write it): no listing, as a request without tools;
    # a call in OpenAI's own shape (its id and type ignored) trains as the plain one
    openai_call = {"id": "x", "type": "function", "function": CALL}
    plain = {"conversations": [row["conversations"][0],
                               {"from": "function_call", "value": json.dumps(openai_call)},
                               *row["conversations"][2:]], "tools": "[]"}  # fmt: skip
    (tmp_path / "plain").mkdir()
    (other,) = trained(tmp_path / "plain", tok, [plain], template=name).train
    assert "tools:" not in tok.decode(other["input_ids"])
    same = {**plain, "conversations": [plain["conversations"][0],
                                       {"from": "function_call", "value": json.dumps(CALL)},
                                       *plain["conversations"][2:]]}  # fmt: skip
    (tmp_path / "same").mkdir()
    (bare,) = trained(tmp_path / "same", tok, [same], template=name).train
    assert bare["input_ids"] == other["input_ids"]
    bad = {**row, "conversations": [row["conversations"][0], {"from": "function_call",
                                                               "value": "add(1, 2)"}]}  # fmt: skip
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError, match="line 1: function-call turn 1 is not JSON"):
        trained(tmp_path / "bad", tok, [bad], template=name)
