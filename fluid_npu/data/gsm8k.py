"""The GSM8K row format and its plain prompt, shared by the demo's data and by ``fluid eval``.

A row is ``{"question": str, "answer": str}`` whose answer ends with a ``#### n`` line (GSM8K's
own format); its reference is the number after ``####`` (``reference_answer``). The plain prompt
follows lm-evaluation-harness's ``gsm8k`` task: ``"Question: {q}\\nAnswer:"``, each few-shot
example before it as ``"Question: {q}\\nAnswer: {a}\\n\\n"`` — the prompt the demo's models are
trained on (``data/demo.py``) and evaluated with (``eval/tasks.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from fluid_npu.errors import DataError

FIELDS = ("question", "answer")
NUMBER = r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"  # as written in an answer: sign, $, commas, ".5"
FINAL_NUMBER = re.compile(rf"####\s*({NUMBER})")  # the answer's final "#### n" line


def normalize_number(text: str) -> str | None:
    """``"$1,000.50"`` → ``"1000.5"``, ``"19.0"`` → ``"19"``; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def reference_answer(row: Any, where: str) -> str:
    """The number after ``####`` in a row's answer; a ``DataError`` naming ``where`` otherwise."""
    if not isinstance(row, dict):
        raise DataError(f'{where}: each row must be a JSON object with "question" and "answer"')
    missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
    if missing:
        raise DataError(
            f'{where}: the row has no text field "{missing[0]}"; GSM8K rows need "question" and '
            '"answer" (a solution ending in a line "#### n")'
        )
    if not row["question"].strip():
        raise DataError(f"{where}: the question is empty")
    match = FINAL_NUMBER.search(row["answer"])
    value = normalize_number(match.group(1)) if match else None
    if value is None:
        raise DataError(
            f'{where}: the answer has no final "#### n" line with a number; GSM8K answers end '
            'with e.g. "#### 72"'
        )
    return value


def prompt_text(question: str, shots: Sequence[dict] = ()) -> str:
    """The plain (non-chat) prompt: few-shot examples, then ``Question: ...\\nAnswer:``."""
    head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{head}Question: {question}\nAnswer:"
