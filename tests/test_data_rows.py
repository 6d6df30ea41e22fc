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
