"""Where a bad dataset row is reported: its file and 1-based line (blank lines counted), the array
index in a file holding one JSON array, the 0-based row of a parquet file — for a directory of
files, a line that is no JSON object, and an array element that is none."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data import BAD_ROWS, make_args, write_info

from fluid_npu.data import build_sft_dataset
from fluid_npu.errors import DataError
from fluid_npu.model.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(reserved=11)


def _lines(rows):
    return [json.dumps(r) for r in rows]


GOOD, MISSING = BAD_ROWS[:2], {"instruction": "no output"}
# (files to write, the dataset's file_name, where its bad row is)
ROW_PLACES = {
    "directory": (
        {"d/a.jsonl": _lines(GOOD * 3), "d/b.jsonl": _lines([*GOOD, MISSING])},
        "d",
        "d/b.jsonl line 3",  # a.jsonl holds 6 good rows
    ),
    "blank-lines": (
        {"b.jsonl": ["", *_lines(GOOD), "  ", "", *_lines([MISSING, *GOOD])]},
        "b.jsonl",
        "b.jsonl line 6",
    ),
    "json-array": (
        {"a.json": [json.dumps([*GOOD, MISSING], indent=2)]},
        "a.json",
        "a.json array index 2",
    ),
    "line-not-an-object": (
        {"n.jsonl": [*_lines(GOOD), '["x"]', *_lines(GOOD)]},
        "n.jsonl",
        "n.jsonl line 3: an array, not an object",
    ),
    "bom-json-array": (  # (a UTF-8 BOM, as some editors write one: datasets reads past it)
        {"a.json": ["\ufeff" + json.dumps([*GOOD, MISSING])]},
        "a.json",
        "a.json array index 2",
    ),
    "bom-line-not-an-object": (
        {"n.jsonl": ["\ufeff" + _lines(GOOD)[0], _lines(GOOD)[1], '["x"]']},
        "n.jsonl",
        "n.jsonl line 3: an array, not an object",
    ),
    "array-element-not-an-object": (
        {"e.json": [json.dumps([*GOOD, 7])]},
        "e.json",
        "e.json array index 2: a number, not an object",
    ),
}


@pytest.mark.parametrize("case", list(ROW_PLACES))
def test_bad_row_is_named_by_its_file_and_line(tmp_path, tok, case):
    files, file_name, where = ROW_PLACES[case]
    for name, lines in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("\n".join(lines) + "\n", "utf-8")
    write_info(tmp_path, {"x": {"file_name": file_name}})
    with pytest.raises(DataError) as err:
        build_sft_dataset(make_args(tmp_path, "x"), tok)
    assert f"dataset 'x': {tmp_path / where}" in str(err.value)


def test_bad_parquet_row_is_named_by_its_row(tmp_path, tok):
    datasets.Dataset.from_list([*GOOD, MISSING]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p\.parquet row 2 \(0-based\): column 'output'"):
        build_sft_dataset(make_args(tmp_path, "p.parquet"), tok)


# Outputs that are valid JSON as text: a column that datasets types Json (one mistyped row does
# that) would decode them to 2, True, None; a column of dates would become timestamps.
JSON_LIKE = ["2", "true", "null", "hello", "2020-01-01"]


def _alpaca_row(output):
    return {"instruction": "q", "output": output}


def _sharegpt_row(output):
    return {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": output}]}


@pytest.mark.parametrize("kind", ["alpaca-jsonl", "alpaca-json-array", "sharegpt-jsonl"])
@pytest.mark.parametrize("bad", [7, True])
def test_one_mistyped_row_blames_only_itself(tmp_path, tok, kind, bad):
    """200 good rows whose outputs are text that is valid JSON, one row whose output is no text:
    the error names exactly that row, and skip_bad_rows drops only it, the good texts intact."""
    make = _sharegpt_row if kind.startswith("sharegpt") else _alpaca_row
    outputs = [JSON_LIKE[i % len(JSON_LIKE)] for i in range(200)]
    rows = [make(o) for o in outputs]
    rows.insert(136, make(bad))
    name = "b.json" if kind.endswith("array") else "b.jsonl"
    lines = [json.dumps(rows)] if kind.endswith("array") else _lines(rows)
    (tmp_path / name).write_text("\n".join(lines) + "\n", "utf-8")
    where = f"{tmp_path / name} {'array index 136' if kind.endswith('array') else 'line 137'}"
    what = "column 'output'" if kind.startswith("alpaca") else "message 1 'value'"
    problem = f"{what} has type {type(bad).__name__} ({bad!r}), expected text"

    with pytest.raises(DataError) as err:
        build_sft_dataset(make_args(tmp_path, name, template="empty"), tok)
    assert f"dataset {name!r}: {where}: {problem}. Fix the row" in str(err.value)

    data = build_sft_dataset(make_args(tmp_path, name, template="empty", skip_bad_rows=True), tok)
    stats = data.stats
    assert (stats.rows_read, stats.rows_kept, stats.rows_skipped) == (201, 200, 1)
    assert stats.skipped == [(name, 136, f"{where}: {problem}")]
    responses = [
        tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab >= 0])
        for ex in data.train
    ]
    assert responses == [f"{o}</s>" for o in outputs]


def test_a_column_of_dates_stays_text(tmp_path, tok):
    """pyarrow reads a column of dates as timestamps: they stay the text the file holds."""
    dates = ["2020-01-01", "2021-12-31 10:00:00"]
    (tmp_path / "d.jsonl").write_text("\n".join(_lines(map(_alpaca_row, dates))) + "\n", "utf-8")
    data = build_sft_dataset(make_args(tmp_path, "d.jsonl", template="empty"), tok)
    assert [tok.decode(ex["input_ids"]) for ex in data.train] == [f"q{d}</s>" for d in dates]
