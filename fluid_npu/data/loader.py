"""Supervised fine-tuning examples from LLaMA-Factory-style datasets: ``build_sft_dataset``.

Stage I and Stage II read tokenized (prompt, response) examples: ``input_ids`` and ``labels`` with
``labels[i] = input_ids[i]`` on response tokens and -100 on prompt tokens (the Stage I layout does
the shift itself). This module reads the files with ``files.py`` (json / jsonl / parquet files or
directories of them, never the network), converts each row with ``formats.py``, renders it with a
chat template from ``templates.py``, truncates to ``cutoff_len`` and reports bad rows — as one clear
``DataError`` naming the dataset, the row's file and place (``files.row_places``) and the fix, or,
with ``skip_bad_rows``, dropped and counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from fluid_npu.data.auto_template import get_template
from fluid_npu.data.files import keep_raw_text, load_raw, row_places
from fluid_npu.data.formats import DatasetSpec, RowError, finalize_spec, resolve_datasets
from fluid_npu.data.formats import to_conversation as _to_conversation
from fluid_npu.data.templates import Encoded, Template
from fluid_npu.data.tokenizer_check import check_tokenizer_encodes
from fluid_npu.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REPORTED_SKIPS = 5  # how many skipped rows the stats keep (dataset, index, "place: problem")
HEAD_ROWS = 8  # the first rows that tell the format (sharegpt tags) and test the tokenizer
# Part of the key of the tokenization cache of ``datasets``: it hashes the mapped function and its
# arguments but not the code they call, so a change to this package's data code must change the
# key: the source of every module of ``data/`` (a module left out that decides a token would leave
# a stale cache after an upgrade)
_CODE = sorted(p.name for p in Path(__file__).parent.glob("*.py"))
_CODE_DIGEST = hashlib.sha256(
    b"".join((Path(__file__).parent / n).read_bytes() for n in _CODE)
).hexdigest()
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "error": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "row": datasets.Value("int64"),  # the row of the dataset the example came from
    }
)


@dataclass
class DataStats:
    """What the pipeline did: rows read, kept, skipped (the first few with why), tokens."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_skipped: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    truncated: int = 0
    tokens: int = 0
    response_tokens: int = 0
    train_examples: int = 0
    eval_examples: int = 0

    def summary(self) -> str:
        text = (
            f"{self.rows_read} rows read, {self.rows_kept} kept ({self.train_examples} train, "
            f"{self.eval_examples} eval examples), {self.truncated} truncated, "
            f"{self.tokens} tokens ({self.response_tokens} with loss)"
        )
        if self.rows_skipped:
            first = ", ".join(f"{name}[{i}]: {why}" for name, i, why in self.skipped)
            text += f"; {self.rows_skipped} bad rows skipped (first: {first})"
        return text


@dataclass
class SFTData:
    """Tokenized examples (columns ``input_ids``, ``labels``) and how they were made."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: DataStats
    template: str
    # the conversation of each train example where a template split conversations into one
    # example per response turn (a held-out part taken later keeps them whole); None: one each
    train_groups: list[int] | None = None


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def _bad(problem: str) -> dict[str, Any]:
    return {"input_ids": [], "labels": [], "error": problem, "truncated": False}


def _tokenize_rows(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    spec: DatasetSpec,
    template: Template,
    tokenizer: Any,
    cutoff_len: int,
    mask_history: bool,
    train_on_prompt: bool,
    code_digest: str,
) -> dict[str, list[Any]]:
    """Rows → examples: ``input_ids`` / ``labels`` and the ``row`` each came from, or an ``error``
    text for a bad row. A row is one example, or one per response turn where the template renders
    a turn otherwise once later turns follow (``encode_examples``; with ``mask_history`` the last).

    ``code_digest`` is unused here: it only keys the ``datasets`` cache on this package's code.
    """
    out: dict[str, list[Any]] = {name: [] for name in _FEATURES}
    for at, index in enumerate(indices):
        row = {column: values[at] for column, values in batch.items()}
        try:
            examples = template.encode_examples(tokenizer, _to_conversation(row, spec))
        except RowError as e:
            examples = [_bad(str(e))]
        else:
            if mask_history:
                examples = [_last_turn(examples[-1])]
            # a later turn whose response starts past cutoff_len is left out, as truncating one
            # sequence leaves it out; the conversation then counts as truncated
            fits = examples[:1] + [e for e in examples[1:] if e.spans[-1][0] < cutoff_len]
            labelled = [_labelled(e, cutoff_len, train_on_prompt) for e in fits]
            if len(fits) < len(examples) and not labelled[-1]["error"]:
                labelled[-1]["truncated"] = True
            examples = labelled
        bad = [e for e in examples if e["error"]]
        for example in bad[:1] or examples:  # (a bad turn makes the row bad)
            for name, value in example.items():
                out[name].append(value)
            out["row"].append(index)
    return out


def _last_turn(encoded: Encoded) -> Encoded:
    return Encoded(encoded.input_ids, encoded.spans[-1:])


def _labelled(encoded: Encoded, cutoff_len: int, train_on_prompt: bool) -> dict[str, Any]:
    """One example's ``input_ids`` / ``labels`` (its response spans), or its ``error``."""
    ids, spans = encoded.input_ids, encoded.spans
    if not any(end > start for start, end in spans):
        return _bad("the rendered conversation has no response tokens")
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    truncated = len(ids) > cutoff_len
    if not any(start < min(end, cutoff_len) for start, end in spans):
        return _bad(
            f"no response token fits in cutoff_len={cutoff_len} (the response starts at token "
            f"{spans[-1][0]}); raise cutoff_len or shorten the prompt"
        )
    return {
        "input_ids": ids[:cutoff_len],
        "labels": labels[:cutoff_len],
        "error": "",
        "truncated": truncated,
    }


def _sample_texts(spec: DatasetSpec, head: list[dict[str, Any]]) -> list[str]:
    """The message texts of the ``head`` rows that convert (for ``check_tokenizer_encodes``)."""
    texts = []
    for row in head:
        try:
            texts += [content for _, content in _to_conversation(row, spec).messages]
        except RowError:
            continue
    return texts


def _head(raw: datasets.Dataset) -> list[dict[str, Any]]:
    return raw.select(range(min(HEAD_ROWS, len(raw)))).to_list()


def _is_good(errors: list[str]) -> list[bool]:
    return [e == "" for e in errors]


def _tokenize_dataset(
    spec: DatasetSpec, raw: datasets.Dataset, template: Template, tokenizer: Any, args: Any
) -> datasets.Dataset:
    workers = getattr(args, "preprocessing_num_workers", None)
    return raw.map(
        _tokenize_rows,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_FEATURES,
        num_proc=workers if workers and workers > 1 else None,
        desc=f"Tokenizing {spec.name}",
        fn_kwargs={
            "spec": spec,
            "template": template,
            "tokenizer": tokenizer,
            "cutoff_len": int(args.cutoff_len),
            "mask_history": bool(getattr(args, "mask_history", False)),
            "train_on_prompt": bool(getattr(args, "train_on_prompt", False)),
            "code_digest": _CODE_DIGEST,
        },
    )


def _draw(spec: DatasetSpec, n_rows: int, rng: np.random.RandomState) -> list[int]:
    """The rows ``num_samples`` takes, as LLaMA-Factory draws them: a random permutation cut to
    ``num_samples``; beyond the rows, the whole permutation and a random remainder (with
    replacement)."""
    target = spec.num_samples
    assert target is not None
    indexes = rng.permutation(n_rows)[:target]
    if target > len(indexes):
        indexes = np.concatenate((indexes, rng.choice(n_rows, target - len(indexes))))
    logger.info("dataset %r: drew num_samples=%d of its %d rows", spec.name, target, n_rows)
    return indexes.tolist()


def _drop_bad_rows(
    spec: DatasetSpec,
    processed: datasets.Dataset,
    skip: bool,
    stats: DataStats,
    rows: Sequence[int] | None,
) -> datasets.Dataset:
    """Raise on the first bad row, or drop them and count them (``skip``). ``rows``: the file row
    of each example (num_samples / max_samples took them), None when they are the file's rows."""
    table = _columns(processed, "error", "row")
    errors = table.column("error")
    bad = pc.indices_nonzero(pc.not_equal(errors, "")).to_pylist()
    if not bad:
        return processed
    of = [table.column("row")[i].as_py() for i in bad]  # (a bad row gives one example)
    source = of if rows is None else [rows[i] for i in of]  # (the row in the files)
    if not skip:
        more = f" ({len(bad) - 1} more bad rows in this dataset)" if len(bad) > 1 else ""
        place = row_places(spec, source[:1])[source[0]]
        raise DataError(
            f"dataset {spec.name!r}: {place}: {errors[bad[0]].as_py()}{more}. Fix the row, "
            "or set skip_bad_rows: true to drop such rows"
        )
    stats.rows_skipped += len(bad)
    shown = max(REPORTED_SKIPS - len(stats.skipped), 0)
    places = row_places(spec, source[:shown]) if shown else {}
    stats.skipped += [
        (spec.name, row, f"{places[row]}: {errors[i].as_py()}")
        for i, row in zip(bad[:shown], source[:shown])
    ]
    return processed.filter(_is_good, input_columns="error", batched=True)


def _columns(dataset: datasets.Dataset, *names: str) -> Any:
    """Columns of ``dataset`` as one Arrow table (respecting any indices mapping)."""
    return dataset.select_columns(list(names)).with_format("arrow")[:]


def _count(dataset: datasets.Dataset, stats: DataStats) -> None:
    table = _columns(dataset, "input_ids", "labels", "truncated")
    ids, labels = table.column("input_ids"), table.column("labels")
    stats.tokens += pc.sum(pc.list_value_length(ids)).as_py() or 0
    response = pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)
    stats.response_tokens += pc.sum(response).as_py() or 0
    stats.truncated += pc.sum(table.column("truncated")).as_py() or 0


def _split(
    data: datasets.Dataset, val_size: float, seed: int, groups: list[int]
) -> tuple[Any, Any, list[int] | None]:
    """Train and eval examples, as LLaMA-Factory splits them (``train_test_split`` with the
    seed); where a conversation gave one example per response turn (``groups``: each example's
    conversation), its examples stay on one side and ``val_size`` counts conversations. Also the
    train examples' conversations where they are not one example each (else None)."""
    if not val_size:
        return data, None, None if len(set(groups)) == len(data) else groups
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise DataError(f"val_size={val_size} must be a fraction in (0, 1) or a number of examples")
    test_size: float | int = int(val_size) if val_size >= 1 else float(val_size)
    whole = len(set(groups)) == len(data)
    units = data if whole else datasets.Dataset.from_dict({"group": sorted(set(groups))})
    # datasets rounds the held-out fraction up
    held = test_size if isinstance(test_size, int) else math.ceil(test_size * len(units))
    if not 1 <= held < len(units):
        what = "examples" if whole else "conversations"
        raise DataError(
            f"val_size={val_size} holds out {held} of {len(units)} {what}; both train and eval "
            "need at least one: lower val_size or add data"
        )
    parts = units.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    if whole:
        return parts["train"], parts["test"], None
    out = set(parts["test"]["group"])
    train = [i for i, g in enumerate(groups) if g not in out]
    held = data.select([i for i, g in enumerate(groups) if g in out])
    return data.select(train), held, [groups[i] for i in train]


def build_sft_dataset(args: Any, tokenizer: Any) -> SFTData:
    """Load, convert, tokenize and split the datasets named by ``args.dataset``.

    ``args`` is any object with the data keys of the config (``dataset``, ``dataset_dir``,
    ``template``, ``cutoff_len``, ``skip_bad_rows``, ``max_samples``, ``val_size``, ``seed``,
    ``mask_history``, ``train_on_prompt``; optional ``preprocessing_num_workers``, ``cache_dir``,
    ``enable_thinking``: the chat template's variable, where the tokenizer's template is used).
    A dataset_info.json entry's ``num_samples`` draws that many rows with ``seed`` (repeating rows
    when it exceeds them), then ``max_samples`` keeps the first rows of each dataset, as in
    LLaMA-Factory. A bad row is named by its file and line.
    """
    cutoff_len = int(args.cutoff_len)
    if cutoff_len < 2:
        raise DataError(f"cutoff_len={cutoff_len} is too small; use at least 2 (1024 is typical)")
    thinking = getattr(args, "enable_thinking", None)  # (LLaMA-Factory's key)
    kwargs = None if thinking is None else {"enable_thinking": bool(thinking)}
    template = get_template(getattr(args, "template", None), tokenizer, kwargs)
    specs = resolve_datasets(args.dataset, getattr(args, "dataset_dir", "data"))
    skip = bool(getattr(args, "skip_bad_rows", False))
    max_samples = getattr(args, "max_samples", None)
    stats, parts, groups = DataStats(), [], []
    # LLaMA-Factory draws num_samples with numpy's global RNG, which its parser seeds with the
    # run's seed: one generator for all the datasets, in their order, draws the same rows
    rng = np.random.RandomState(int(args.seed))
    for spec in specs:
        raw = load_raw(spec, getattr(args, "cache_dir", None))
        spec = finalize_spec(spec, raw.column_names, _head(raw))
        spec, raw = keep_raw_text(spec, raw)
        rows = None if spec.num_samples is None else _draw(spec, len(raw), rng)
        if max_samples is not None:
            rows = (range(len(raw)) if rows is None else rows)[: int(max_samples)]
        if rows is not None:
            raw = raw.select(rows)
        check_tokenizer_encodes(tokenizer, _sample_texts(spec, _head(raw)))
        stats.rows_read += len(raw)
        processed = _tokenize_dataset(spec, raw, template, tokenizer, args)
        kept = _drop_bad_rows(spec, processed, skip, stats, rows)
        if len(kept):
            _count(kept, stats)
            # the conversation of each example, across the datasets (one split side each)
            offset = len(groups) and groups[-1] + 1
            groups += [offset + r for r in _columns(kept, "row").column("row").to_pylist()]
            parts.append(kept.remove_columns(["error", "truncated", "row"]))
    if not parts:
        raise DataError(
            f"no usable examples in {args.dataset!r}: all {stats.rows_read} rows are bad "
            f"({stats.summary()})"
        )
    data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    stats.rows_kept = stats.rows_read - stats.rows_skipped
    train, evaluation, train_groups = _split(
        data, float(getattr(args, "val_size", 0) or 0), int(args.seed), groups
    )
    stats.train_examples = len(train)
    stats.eval_examples = 0 if evaluation is None else len(evaluation)
    log = logger.warning if stats.rows_skipped else logger.info
    log("data (%s, template %s): %s", args.dataset, template.name, stats.summary())
    return SFTData(train, evaluation, stats, template.name, train_groups)


def token_occurs(dataset: Any, token_id: int) -> bool:
    """Whether ``token_id`` appears in the ``input_ids`` of any example of ``dataset``.

    ``dataset`` is a ``datasets.Dataset`` (scanned with Arrow), any iterable of examples, or None.
    """
    if dataset is None:
        return False
    if isinstance(dataset, datasets.Dataset):
        for table in dataset.with_format("arrow").iter(batch_size=65536):
            flat = pc.list_flatten(table.column("input_ids"))
            if pc.any(pc.equal(flat, token_id)).as_py():
                return True
        return False
    return any(token_id in example["input_ids"] for example in dataset)
