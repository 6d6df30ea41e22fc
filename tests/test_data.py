"""The data pipeline: LLaMA-Factory datasets → tokenized SFT examples with response-only labels.

Every check decodes the produced ids with the tiny byte-level tokenizer and compares text, so a
wrong mask, a wrong template or an off-by-one span shows up as a readable diff. Files are written
in pytest's tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import pytest

from fluid_npu.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Conversation,
    TokenizerChatTemplate,
    build_sft_dataset,
    get_template,
    token_occurs,
)
from fluid_npu.data.templates import RowError
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.model.tiny import build_tiny_tokenizer

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(reserved=11)  # [unused0..10] for the openPangu template


def make_args(tmp_path, dataset, **overrides):
    args = dict(
        dataset=dataset,
        dataset_dir=str(tmp_path),
        template="qwen",
        cutoff_len=1024,
        skip_bad_rows=False,
        max_samples=None,
        val_size=0,
        seed=0,
        mask_history=False,
        train_on_prompt=False,
        preprocessing_num_workers=None,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def write_info(tmp_path, info):
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), "utf-8")


def split_text(tok, example):
    """(whole text, text of the labelled tokens); also checks labels copy input_ids."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    response = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    return tok.decode(ids), tok.decode(response)


ALPACA_ROWS = [
    {"instruction": "What is 2+2?", "input": "math", "output": "4"},
    {"instruction": "Say hi", "input": "", "output": "hi there"},
    {"instruction": "Name a colour", "output": "blue"},
]


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

TWO_TURNS = Conversation(
    [("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")], system="S"
)
EXPECTED = {
    "default": ("System: S\nHuman: U1\nAssistant: A1</s>\nHuman: U2\nAssistant: A2</s>", "</s>"),
    "empty": ("SU1A1</s>U2A2</s>", "</s>"),
    "qwen": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
        "A1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>",
        "<|im_end|>",
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "<|eot_id|>",
    ),
    "openpangu": (
        "<s>[unused9]系统：S[unused10][unused9]用户：U1[unused10][unused9]助手：A1[unused10]"
        "[unused9]用户：U2[unused10][unused9]助手：A2[unused10]",
        "[unused10]",
    ),
}


def test_every_named_template_has_an_expected_rendering():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_renders_two_turns(tok, name):
    text, end = EXPECTED[name]
    encoded = get_template(name, tok).encode(tok, TWO_TURNS)
    assert tok.decode(encoded.input_ids) == text
    assert [tok.decode(encoded.input_ids[s:e]) for s, e in encoded.spans] == [
        f"A1{end}",
        f"A2{end}",
    ]


def test_template_defaults_for_system(tok):
    one = Conversation([("user", "Q"), ("assistant", "R")])
    pangu = get_template("openpangu", tok).encode(tok, one).input_ids
    assert (
        tok.decode(pangu)
        == "<s>[unused9]系统：[unused10][unused9]用户：Q[unused10][unused9]助手：R[unused10]"
    )
    qwen = get_template("qwen", tok).encode(tok, one).input_ids
    assert tok.decode(qwen).startswith(QWEN_SYSTEM + "<|im_start|>user\nQ")
    prompt = get_template("qwen", tok).encode_prompt(tok, Conversation([("user", "Q")]))
    assert (
        tok.decode(prompt) == QWEN_SYSTEM + "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_chat_template_marks_content_and_end_token(tok):
    template = get_template(None, tok)
    assert isinstance(template, TokenizerChatTemplate) and not template.has_generation_markers
    encoded = template.encode(tok, TWO_TURNS)
    assert tok.decode(encoded.input_ids) == tok.apply_chat_template(
        [{"role": "system", "content": "S"}]
        + [{"role": r, "content": c} for r, c in TWO_TURNS.messages],
        tokenize=False,
    )
    assert [tok.decode(encoded.input_ids[s:e]) for s, e in encoded.spans] == [
        "A1<|im_end|>",
        "A2<|im_end|>",
    ]
    # The tiny tokenizer's chat template is ChatML: same ids and spans as the named `qwen` one,
    # except the trailing newline ChatML puts after the last <|im_end|> (a prompt token).
    named = get_template("qwen", tok).encode(tok, TWO_TURNS)
    assert encoded.input_ids == [*named.input_ids, tok.encode("\n")[0]]
    assert encoded.spans == named.spans


def test_tokenizer_chat_template_bos(tok):
    # openPangu-like: the tokenizer prepends BOS to text, the chat template does not write it.
    adds = build_tiny_tokenizer()
    adds.add_bos_token = True
    encoded = get_template("auto", adds).encode(adds, TWO_TURNS)
    assert tok.decode(encoded.input_ids).startswith("<s><|im_start|>system\nS")
    assert [tok.decode(encoded.input_ids[s:e]) for s, e in encoded.spans] == [
        "A1<|im_end|>",
        "A2<|im_end|>",
    ]
    default = get_template("default", adds).encode(adds, TWO_TURNS).input_ids
    assert tok.decode(default).startswith("<s>System: S\nHuman: U1")
    # Llama-3-like: the template writes BOS itself; no second one.
    adds.chat_template = "{{ bos_token }}" + adds.chat_template
    encoded = get_template("auto", adds).encode(adds, TWO_TURNS)
    assert tok.decode(encoded.input_ids[:2]) == "<s><|im_start|>"


def test_tokenizer_chat_template_with_generation_markers(tok):
    marked = build_tiny_tokenizer()
    marked.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ 'A: ' }}{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    template = get_template("auto", marked)
    assert template.has_generation_markers
    encoded = template.encode(marked, TWO_TURNS)
    assert tok.decode(encoded.input_ids) == "system: S\nuser: U1\nA: A1</s>\nuser: U2\nA: A2</s>\n"
    assert [tok.decode(encoded.input_ids[s:e]) for s, e in encoded.spans] == ["A1</s>", "A2</s>"]


def test_chat_template_that_rewrites_history_is_refused(tok):
    odd = build_tiny_tokenizer()
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"
    )
    with pytest.raises(RowError, match="cannot be located") as refused:
        get_template("auto", odd).encode_examples(odd, TWO_TURNS)
    assert "`template:` to one of" in str(refused.value)  # (the fix: a named template)


def test_template_selection(tok):
    plain = build_tiny_tokenizer(chat_template=False)
    assert get_template("auto", plain) is TEMPLATES["default"]
    with pytest.raises(ConfigError) as err:
        build_sft_dataset(SimpleNamespace(dataset="x", template="chatml-ish", cutoff_len=8), tok)
    for name in ("auto", "default", "empty", "qwen", "llama3", "openpangu"):
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------
# Formats and files
# ---------------------------------------------------------------------------------------------


def test_alpaca_with_column_mapping(tmp_path, tok):
    rows = [
        {
            "q": "What is 2+2?",
            "ctx": "math",
            "a": "4",
            "sys": "Be brief.",
            "hist": [["Hi", "Hello"]],
        },
        {"q": "Say hi", "ctx": "", "a": "hi there", "sys": None, "hist": []},
    ]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    columns = {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}
    write_info(tmp_path, {"mine": {"file_name": "mine.jsonl", "columns": columns}})
    data = build_sft_dataset(make_args(tmp_path, "mine"), tok)
    assert data.eval is None and len(data.train) == 2
    text, response = split_text(tok, data.train[0])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhat is 2+2?\nmath<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>"
    )
    assert response == "Hello<|im_end|>4<|im_end|>"  # history responses are learned too
    text, response = split_text(tok, data.train[1])
    assert (
        text
        == QWEN_SYSTEM
        + "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>"
    )
    assert response == "hi there<|im_end|>"
    assert data.stats.rows_read == data.stats.rows_kept == 2
    assert data.stats.response_tokens == sum(
        sum(lab != IGNORE_INDEX for lab in ex["labels"]) for ex in data.train
    )


def test_empty_system_is_unset(tmp_path, tok):
    """``"system": ""`` keeps the template's default system, as LLaMA-Factory's ``system or
    default_system`` does (alpaca's system column, sharegpt's column and system message)."""
    alpaca = [
        {"instruction": "Q", "output": "R", "system": ""},
        {"instruction": "Q", "output": "R"},
    ]
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "R"}]
    sharegpt = [
        {"conversations": turns, "system": ""},
        {"conversations": [{"from": "system", "value": ""}, *turns]},
        {"conversations": turns},
    ]
    write_jsonl(tmp_path / "a.jsonl", alpaca)
    write_jsonl(tmp_path / "s.jsonl", sharegpt)
    columns = {"prompt": "instruction", "response": "output", "system": "system"}
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "columns": columns}})
    data = build_sft_dataset(make_args(tmp_path, "a, s.jsonl"), tok)
    expected = QWEN_SYSTEM + "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nR<|im_end|>"
    assert [split_text(tok, ex)[0] for ex in data.train] == [expected] * 5
    assert len({tuple(ex["input_ids"]) for ex in data.train}) == 1


def test_sharegpt_with_custom_tags(tmp_path, tok):
    rows = [
        {
            "chat": [
                {"who": "sys", "text": "S"},
                {"who": "me", "text": "U1"},
                {"who": "bot", "text": "A1"},
                {"who": "me", "text": "U2"},
                {"who": "bot", "text": "A2"},
            ]
        }
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    tags = {
        "role_tag": "who",
        "content_tag": "text",
        "user_tag": "me",
        "assistant_tag": "bot",
        "system_tag": "sys",
    }
    entry = {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "chat"}}
    write_info(tmp_path, {"chat": entry | {"tags": tags}})
    for template in ("qwen", "openpangu"):
        (example,) = build_sft_dataset(make_args(tmp_path, "chat", template=template), tok).train
        text, response = split_text(tok, example)
        assert text == EXPECTED[template][0]
        assert response == "A1{0}A2{0}".format(EXPECTED[template][1])
    args = make_args(tmp_path, "chat", mask_history=True)
    assert split_text(tok, build_sft_dataset(args, tok).train[0])[1] == "A2<|im_end|>"
    args = make_args(tmp_path, "chat", train_on_prompt=True)
    example = build_sft_dataset(args, tok).train[0]
    assert example["labels"] == example["input_ids"]


def test_sharegpt_defaults_and_openai_messages_by_path(tmp_path, tok):
    share = [{"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]}]
    openai = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
            ]
        }
    ]
    write_jsonl(tmp_path / "share.jsonl", share)
    write_jsonl(tmp_path / "openai.jsonl", openai)
    args = make_args(tmp_path, f"share.jsonl,{tmp_path / 'openai.jsonl'}", template="empty")
    data = build_sft_dataset(args, tok)
    assert [split_text(tok, ex) for ex in data.train] == [("UA</s>", "A</s>"), ("SUA</s>", "A</s>")]


def test_two_datasets_joined_with_a_comma(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": "y"}])
    write_info(tmp_path, {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl"}})
    data = build_sft_dataset(make_args(tmp_path, "a, b", template="empty"), tok)
    responses = [split_text(tok, ex)[1] for ex in data.train]
    assert responses == ["4</s>", "hi there</s>", "blue</s>", "y</s>"]
    assert data.stats.rows_read == 4


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "directory"])
def test_file_kinds_give_the_same_examples(tmp_path, tok, kind):
    rows = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
        for r in ALPACA_ROWS
    ]
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows, indent=2), "utf-8")
    elif kind == "jsonl":
        write_jsonl(tmp_path / "d.jsonl", rows)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    else:
        (tmp_path / "d").mkdir()
        write_jsonl(tmp_path / "d" / "part0.jsonl", rows[:2])
        (tmp_path / "d" / "part1.json").write_text(json.dumps(rows[2:]), "utf-8")
        (tmp_path / "d" / "README.md").write_text("not data", "utf-8")
    file_name = {"json": "d.json", "jsonl": "d.jsonl", "parquet": "d.parquet", "directory": "d"}[
        kind
    ]
    write_info(tmp_path, {"d": {"file_name": file_name}})
    data = build_sft_dataset(make_args(tmp_path, "d", template="default"), tok)
    assert [split_text(tok, ex) for ex in data.train] == [
        ("Human: What is 2+2?\nmath\nAssistant: 4</s>", "4</s>"),
        ("Human: Say hi\nAssistant: hi there</s>", "hi there</s>"),
        ("Human: Name a colour\nAssistant: blue</s>", "blue</s>"),
    ]


def test_cutoff_len_truncates_the_response(tmp_path, tok):
    rows = [{"instruction": "Q", "output": "abcdefghij"}, {"instruction": "Q", "output": "ab"}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    # "Human: Q\nAssistant: " is 20 byte tokens; 24 leaves room for 4 response tokens.
    data = build_sft_dataset(make_args(tmp_path, "t.jsonl", template="default", cutoff_len=24), tok)
    first, second = (split_text(tok, ex) for ex in data.train)
    assert first == ("Human: Q\nAssistant: abcd", "abcd")
    assert second == ("Human: Q\nAssistant: ab</s>", "ab</s>")
    assert all(len(ex["input_ids"]) <= 24 for ex in data.train)
    assert data.stats.truncated == 1
    with pytest.raises(DataError, match=r"t\.jsonl line 1: .*cutoff_len=20"):
        build_sft_dataset(make_args(tmp_path, "t.jsonl", template="default", cutoff_len=20), tok)


def test_val_size_fraction_and_count(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    write_jsonl(tmp_path / "v.jsonl", rows)
    one = build_sft_dataset(make_args(tmp_path, "v.jsonl", val_size=0.2, seed=3), tok)
    two = build_sft_dataset(make_args(tmp_path, "v.jsonl", val_size=0.2, seed=3), tok)
    assert (len(one.train), len(one.eval)) == (8, 2)
    assert one.eval["input_ids"] == two.eval["input_ids"]
    texts = {tok.decode(ex["input_ids"]) for ex in [*one.train, *one.eval]}
    assert len(texts) == 10
    counted = build_sft_dataset(make_args(tmp_path, "v.jsonl", val_size=3), tok)
    assert (counted.stats.train_examples, counted.stats.eval_examples) == (7, 3)
    with pytest.raises(DataError, match="val_size"):
        build_sft_dataset(make_args(tmp_path, "v.jsonl", val_size=10), tok)
    few = build_sft_dataset(make_args(tmp_path, "v.jsonl", max_samples=4), tok)
    assert few.stats.rows_read == 4 and len(few.train) == 4


# ---------------------------------------------------------------------------------------------
# Bad rows and bad files
# ---------------------------------------------------------------------------------------------

BAD_ROWS = [
    {"instruction": "ok", "output": "fine"},
    {"instruction": "ok", "output": "also fine"},
    {"instruction": "number", "output": 42},
    {"instruction": "empty", "output": "  "},
    {"instruction": "missing"},
    {"instruction": "ok", "output": "last"},
]


def test_bad_row_is_reported_with_its_file_and_line(tmp_path, tok):
    write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    write_info(tmp_path, {"mixed": {"file_name": "bad.jsonl"}})
    with pytest.raises(DataError) as err:
        build_sft_dataset(make_args(tmp_path, "mixed"), tok)
    message = str(err.value)
    assert f"dataset 'mixed': {tmp_path / 'bad.jsonl'} line 3: column 'output'" in message
    assert "int" in message
    assert "skip_bad_rows: true" in message and "2 more bad rows" in message


def test_skip_bad_rows_skips_and_counts(tmp_path, tok):
    write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    data = build_sft_dataset(make_args(tmp_path, "bad.jsonl", skip_bad_rows=True), tok)
    assert [split_text(tok, ex)[1] for ex in data.train] == [
        "fine<|im_end|>",
        "also fine<|im_end|>",
        "last<|im_end|>",
    ]
    stats = data.stats
    assert (stats.rows_read, stats.rows_kept, stats.rows_skipped) == (6, 3, 3)
    where = tmp_path / "bad.jsonl"
    assert [(i, why) for _, i, why in stats.skipped] == [
        (2, f"{where} line 3: column 'output' has type int (42), expected text"),
        (3, f"{where} line 4: the response is empty"),
        (4, f"{where} line 5: column 'output' is missing"),
    ]
    assert "3 bad rows skipped" in stats.summary()


def test_sharegpt_roles_must_alternate(tmp_path, tok):
    rows = [
        {"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "U"}, {"from": "human", "value": "U"}]},
    ]
    write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: .*roles do not alternate: message 1 is 'human'"):
        build_sft_dataset(make_args(tmp_path, "s.jsonl"), tok)


def test_missing_empty_and_malformed_files(tmp_path, tok):
    write_info(tmp_path, {"gone": {"file_name": "gone.jsonl"}, "empty": {"file_name": "e.jsonl"}})
    (tmp_path / "e.jsonl").write_text("", "utf-8")
    with pytest.raises(DataError, match=r"'gone'.*gone\.jsonl does not exist"):
        build_sft_dataset(make_args(tmp_path, "gone"), tok)
    with pytest.raises(DataError, match=r"e\.jsonl is empty"):
        build_sft_dataset(make_args(tmp_path, "empty"), tok)
    (tmp_path / "blank.jsonl").write_text("\n\n", "utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl is empty"):
        build_sft_dataset(make_args(tmp_path, "blank.jsonl"), tok)
    lines = [
        '{"instruction": "a", "output": "b"}',
        '{"instruction": "c", "output": "d"}',
        '{"instruction": "e",',
    ]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl line 3: malformed JSON"):
        build_sft_dataset(make_args(tmp_path, "broken.jsonl"), tok)
    (tmp_path / "broken.json").write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": ]\n', "utf-8"
    )
    with pytest.raises(DataError, match=r"broken\.json line 3: malformed JSON"):
        build_sft_dataset(make_args(tmp_path, "broken.json"), tok)


def test_unknown_dataset_and_missing_column(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    write_info(
        tmp_path, {"alpaca_demo": {"file_name": "a.jsonl"}, "other": {"file_name": "a.jsonl"}}
    )
    with pytest.raises(DataError) as err:
        build_sft_dataset(make_args(tmp_path, "alpaca_dem"), tok)
    assert "did you mean 'alpaca_demo'" in str(err.value) and "other" in str(err.value)
    columns = {"prompt": "instruction", "response": "answer"}
    write_info(tmp_path, {"cols": {"file_name": "a.jsonl", "columns": columns}})
    with pytest.raises(DataError, match="no column 'answer'"):
        build_sft_dataset(make_args(tmp_path, "cols"), tok)
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell its format"):
        build_sft_dataset(make_args(tmp_path, "odd.jsonl"), tok)


def test_token_occurs(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    data = build_sft_dataset(make_args(tmp_path, "a.jsonl", val_size=1), tok)
    im_end, unused = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("[unused3]")
    assert token_occurs(data.train, im_end) and token_occurs(data.eval, im_end)
    assert not token_occurs(data.train, unused) and not token_occurs(None, im_end)
    assert token_occurs([{"input_ids": [1, unused]}], unused)


def test_openai_formatting_reads_tool_calls_as_llama_factory_does():
    """``formatting: openai``: an assistant message's ``tool_calls`` is a function-call turn (the
    calls' ``function`` objects as JSON) and consecutive tool results one observation, as
    LLaMA-Factory's OpenAI converter reads them; a role its tags do not name says which tags."""
    from pathlib import Path

    from fluid_npu.data.formats import OPENAI_TAGS, DatasetSpec, RowError, to_conversation

    columns = {"messages": "messages", "system": None, "tools": "tools"}
    spec = DatasetSpec("t", Path("t.jsonl"), "openai", columns, OPENAI_TAGS)
    call = {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    row = {
        "tools": [{"name": "add"}],
        "messages": [
            {"role": "user", "content": "1+2 and 3+4?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": call},
                {"id": "c2", "type": "function", "function": call}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"},
            {"role": "tool", "content": "7", "tool_call_id": "c2"},
            {"role": "assistant", "content": "3 and 7"},
        ],
    }  # fmt: skip
    conv = to_conversation(row, spec)
    assert [r for r, _ in conv.messages] == ["user", "function", "observation", "assistant"]
    assert json.loads(conv.messages[1][1]) == [call, call]
    assert conv.messages[2][1] == "3\n</tool_response>\n<tool_response>\n7"
    assert json.loads(conv.tools) == [{"name": "add"}]
    with pytest.raises(RowError, match=r"tags` of a dataset_info\.json entry"):
        to_conversation({"messages": [{"role": "human", "content": "x"}]}, spec)
    ends_on_results = {"messages": row["messages"][:3]}  # (user, calls, a result: no answer)
    conv = to_conversation(ends_on_results, spec)  # its last results dropped, as LLaMA-Factory
    assert [r for r, _ in conv.messages] == ["user", "function"]


def test_alpaca_tools_and_unsupported_columns_by_path(tmp_path, tok):
    """An alpaca entry may map a ``tools`` column (LLaMA-Factory's alpaca converter reads one);
    a file given by path with an ``images`` column is refused, not trained without its images."""
    tools = [{"name": "add", "parameters": {}}]
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "1+2?", "output": "3", "tools": tools}])
    columns = {"prompt": "instruction", "response": "output", "tools": "tools"}
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "columns": columns}})
    qwen = build_sft_dataset(make_args(tmp_path, "a"), tok).train[0]
    write_info(tmp_path, {"a": {"file_name": "a.jsonl"}})
    plain = build_sft_dataset(make_args(tmp_path, "a"), tok).train[0]
    assert '"add"' in tok.decode(qwen["input_ids"]) and '"add"' not in tok.decode(
        plain["input_ids"]
    )
    talk = [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "a cat"}]
    rows = [{"messages": talk, "images": ["cat.png"]}]
    write_jsonl(tmp_path / "mllm.jsonl", rows)
    with pytest.raises(DataError, match="'images' column"):
        build_sft_dataset(make_args(tmp_path, str(tmp_path / "mllm.jsonl")), tok)


def test_a_misspelt_dataset_info_key_is_named(tmp_path, tok):
    """LLaMA-Factory ignores an entry key it does not read, so a misspelt ``columns`` maps
    nothing; here it is one error naming it and the key meant."""
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "colums": {"response": "output"}}})
    with pytest.raises(DataError, match="unknown key 'colums'; did you mean 'columns'"):
        build_sft_dataset(make_args(tmp_path, "a"), tok)
    # an older LLaMA-Factory's file_sha1 is read by neither; a hub key is refused even beside a
    # file_name (LLaMA-Factory would read the hub's data instead of the file)
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "file_sha1": None}})
    assert len(build_sft_dataset(make_args(tmp_path, "a"), tok).train) == len(ALPACA_ROWS)
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "hf_hub_url": "org/set"}})
    with pytest.raises(DataError, match="it names hf_hub_url, but fluid-npu reads local files"):
        build_sft_dataset(make_args(tmp_path, "a"), tok)
