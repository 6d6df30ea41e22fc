"""Exact-match tasks in GSM8K format: rows, prompts, the final-number extractor, scoring.

A row is ``{"question": str, "answer": str}`` whose answer ends with a ``#### n`` line (GSM8K's
own format); the reference is the number after ``####``. The format, its reference and the plain
prompt live in ``fluid_npu.data.gsm8k`` (the demo's data is written in it). Two tasks share it:

* ``gsm8k`` — rows from ``--data FILE.jsonl`` (nothing is downloaded);
* ``demo`` — the synthetic word problems of ``fluid_npu.data.demo`` (``demo_split("test", n)``)
  unless ``--data`` is given; the demo's models are trained on exactly the zero-shot prompt below.

Prompts follow lm-evaluation-harness's ``gsm8k`` task. Plain: ``"Question: {q}\\nAnswer:"``, each
few-shot example before it as ``"Question: {q}\\nAnswer: {a}\\n\\n"`` with ``a`` the example's full
answer (its ``#### n`` line included, so the model learns to end with one), rendered with the
``empty`` template — the tokens a model trained with ``template: empty`` saw. Chat: the question as
a user turn of the tokenizer's chat template, few-shot examples as earlier user / assistant turns.
Few-shot examples are the first ``K`` rows of the few-shot file (deterministic, reproducible).

An output is cut at the first ``STOP_STRINGS`` ("Question:", the start of a next example) before
the number is extracted: the one after ``####``, else after "The answer is", else the last number
in the text; commas and ``$`` are dropped and numbers compared by value ("19.0" == "19").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluid_npu.data import demo
from fluid_npu.data.auto_template import TokenizerChatTemplate
from fluid_npu.data.gsm8k import (
    FINAL_NUMBER,
    NUMBER,
    normalize_number,
    prompt_text,
    reference_answer,
)
from fluid_npu.data.templates import Conversation, RowError, rendered_ids
from fluid_npu.errors import ConfigError, DataError

TASKS = ("gsm8k", "demo")
STOP_STRINGS = ("Question:",)
DEFAULT_DEMO_ROWS = 100

_THE_ANSWER_IS = re.compile(rf"[Tt]he (?:final )?answer is:?\s*({NUMBER})")
_ANY_NUMBER = re.compile(NUMBER)


def extract_answer(text: str) -> str | None:
    """The final number of a model's answer (see the module docstring), normalised, or None."""
    for pattern in (FINAL_NUMBER, _THE_ANSWER_IS):
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to the first of ``stops`` (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


def is_correct(output: str, reference: str) -> bool:
    """Whether the number extracted from ``output`` (cut at the stop strings) is ``reference``."""
    return extract_answer(cut_at_stop(output)) == normalize_number(reference)


def read_rows(path: str | Path, what: str = "data") -> list[dict[str, Any]]:
    """The GSM8K rows of a JSONL file, each checked (errors name the file and line)."""
    from fluid_npu.sampling.prompts import read_jsonl

    rows = read_jsonl(path, what)
    for n, row in rows:
        reference_answer(row, f"{path}:{n}")
    return [row for _, row in rows]


def task_rows(task: str, data: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The rows ``task`` is evaluated on: ``data`` when given, else the task's own (demo only)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if data is not None:
        rows = read_rows(data)
    elif task == "demo":
        rows = demo.demo_split("test", limit or DEFAULT_DEMO_ROWS)
    else:
        raise ConfigError(
            f"--task {task} needs --data FILE.jsonl (GSM8K rows: question, answer ending "
            '"#### n"); nothing is downloaded'
        )
    return rows[:limit] if limit is not None else rows


def select_fewshot(rows: Sequence[dict] | None, k: int, where: str = "the few-shot file") -> list:
    """The first ``k`` few-shot rows, checked; ``k`` larger than the rows is a ``DataError``."""
    if k < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {k}")
    if k == 0:
        return []
    if not rows:
        raise ConfigError(f"--num-fewshot {k} needs few-shot examples: pass --fewshot FILE.jsonl")
    if k > len(rows):
        raise DataError(
            f"--num-fewshot {k} asks for more examples than {where} holds ({len(rows)}); "
            f"lower --num-fewshot or add examples"
        )
    for i, row in enumerate(rows[:k]):
        reference_answer(row, f"few-shot example {i + 1}")
    return list(rows[:k])


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` as the model reads plain text: BOS first when the tokenizer adds one (the
    ``empty`` template's rule) unless the text begins with it already — a chat template's
    rendering that wrote it (Llama 3, through lm-eval's ``--apply_chat_template``) gets no
    second one (``templates.rendered_ids``)."""
    return rendered_ids(tokenizer, text)


def encode_question(
    tokenizer: Any,
    question: str,
    shots: Sequence[dict] = (),
    chat: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of one question's prompt, plain or through the tokenizer's chat template (with
    ``template_kwargs`` as its variables)."""
    if not chat:
        return encode_text(tokenizer, prompt_text(question, shots))
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--chat needs a tokenizer with a chat template; this one has none")
    turns: list[tuple[str, str]] = []
    for s in shots:
        turns += [("user", s["question"]), ("assistant", s["answer"])]
    conversation = Conversation([*turns, ("user", question)])
    template = TokenizerChatTemplate(tokenizer, template_kwargs)
    try:
        return template.encode_prompt(tokenizer, conversation)
    except RowError as exc:
        raise DataError(f"--chat: {exc}") from None
