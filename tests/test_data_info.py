"""The dataset_info.json keys beyond the columns: ``num_samples`` draws rows as LLaMA-Factory does
(with the run's seed, repeating rows past the file's), and the hub keys ``split`` / ``subset`` /
``folder``, which mean nothing for a local file, are refused rather than ignored."""

from __future__ import annotations

import numpy as np
import pytest
from test_data import make_args, split_text, write_info, write_jsonl

from fluid_npu.data import build_sft_dataset
from fluid_npu.errors import DataError
from fluid_npu.model.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(reserved=11)


def lf_draws(seed, draws):
    """LLaMA-Factory's ``_load_single_dataset`` (data/loader.py) for ``(rows, num_samples)`` of
    each dataset in turn, after its parser's ``transformers.set_seed(seed)``."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = []
        for n_rows, target_num in draws:
            indexes = np.random.permutation(n_rows)[:target_num]
            target_num -= len(indexes)
            if target_num > 0:
                expand_indexes = np.random.choice(n_rows, target_num)
                indexes = np.concatenate((indexes, expand_indexes), axis=0)
            out.append(indexes.tolist())
        return out
    finally:
        np.random.set_state(state)


def responses(tok, data):
    return [split_text(tok, ex)[1].removesuffix("</s>") for ex in data.train]


@pytest.fixture
def two_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": f"a{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": f"b{i}"} for i in range(6)])
    return tmp_path


@pytest.mark.parametrize("seed", [0, 7])
def test_num_samples_draws_the_rows_llama_factory_draws(two_files, tok, seed):
    """4 of a's 10 rows (no repeats), then 15 of b's 6 rows (all 6, and 9 drawn again)."""
    write_info(
        two_files,
        {
            "a": {"file_name": "a.jsonl", "num_samples": 4},
            "b": {"file_name": "b.jsonl", "num_samples": 15},
        },
    )
    args = make_args(two_files, "a, b", template="empty", seed=seed)
    got = responses(tok, build_sft_dataset(args, tok))
    draw_a, draw_b = lf_draws(seed, [(10, 4), (6, 15)])
    assert got == [f"a{i}" for i in draw_a] + [f"b{i}" for i in draw_b]
    assert len(set(draw_a)) == 4 and set(draw_b[:6]) == set(range(6)) and len(draw_b) == 15
    assert responses(tok, build_sft_dataset(args, tok)) == got  # the same rows for a seed
    other = make_args(two_files, "a, b", template="empty", seed=seed + 1)
    assert responses(tok, build_sft_dataset(other, tok)) != got


def test_max_samples_keeps_the_first_drawn_rows(two_files, tok):
    write_info(two_files, {"a": {"file_name": "a.jsonl", "num_samples": 25}})
    args = make_args(two_files, "a", template="empty", max_samples=12)
    (draw,) = lf_draws(0, [(10, 25)])
    assert responses(tok, build_sft_dataset(args, tok)) == [f"a{i}" for i in draw[:12]]


def test_a_bad_drawn_row_is_named_by_its_line(tmp_path, tok):
    rows = [{"instruction": "q", "output": f"r{i}"} for i in range(10)]
    rows[7]["output"] = ""
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_info(tmp_path, {"a": {"file_name": "a.jsonl", "num_samples": 10}})
    where = f"{tmp_path / 'a.jsonl'} line 8: the response is empty"
    with pytest.raises(DataError, match=f"dataset 'a': {where}. Fix the row"):
        build_sft_dataset(make_args(tmp_path, "a"), tok)
    data = build_sft_dataset(make_args(tmp_path, "a", skip_bad_rows=True), tok)
    assert data.stats.skipped == [("a", 7, where)]
    assert data.stats.rows_kept == 9


REFUSED = {
    "split-test": ({"split": "test"}, "split 'test'.*remove `split`"),
    "subset": ({"subset": "en"}, "`subset` is for a dataset on a hub.*remove `subset`"),
    "folder": ({"folder": "data"}, "`folder` is for a dataset on a hub.*remove `folder`"),
    "num_samples-zero": ({"num_samples": 0}, "num_samples=0 must be a whole number"),
    "num_samples-text": ({"num_samples": "5"}, "num_samples='5' must be a whole number"),
    "num_samples-bool": ({"num_samples": True}, "num_samples=True must be a whole number"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_without_a_meaning_for_a_local_file_are_refused(two_files, tok, case):
    keys, message = REFUSED[case]
    write_info(two_files, {"a": {"file_name": "a.jsonl", **keys}})
    with pytest.raises(DataError, match=f"dataset 'a' in .*dataset_info.json: {message}"):
        build_sft_dataset(make_args(two_files, "a"), tok)


def test_split_train_and_null_hub_keys_are_accepted(two_files, tok):
    entry = {"file_name": "a.jsonl", "split": "train", "subset": None, "folder": None}
    write_info(two_files, {"a": entry})
    assert len(build_sft_dataset(make_args(two_files, "a"), tok).train) == 10
