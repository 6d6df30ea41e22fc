"""A tokenizer that turns text into nothing, named as the cause before any row is blamed.

transformers 5 picks some tokenizer classes from the checkpoint's ``model_type`` rather than from
``tokenizer_config.json`` (e.g. ``Qwen2Tokenizer`` for every ``qwen2`` checkpoint). Given a
tokenizer saved in another format (word-level, unigram), that class silently encodes words as no
ids at all, and every row would fail as "no response tokens" — or train on the EOS token alone.
``check_tokenizer_encodes`` tries the dataset's own text first (training data in ``loader.py``,
the questions in ``fluid eval``) and says which class was loaded, which class the checkpoint asks
for, and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluid_npu.errors import DataError


def _saved_json(tokenizer: Any, name: str) -> dict[str, Any]:
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def loaded_class_note(tokenizer: Any) -> str:
    """Why this class was loaded, when the checkpoint's own files ask for another one."""
    loaded = type(tokenizer).__name__
    wanted = _saved_json(tokenizer, "tokenizer_config.json").get("tokenizer_class")
    model_type = _saved_json(tokenizer, "config.json").get("model_type")
    if not wanted or wanted.removesuffix("Fast") == loaded.removesuffix("Fast"):
        return ""
    by = f" for model_type {model_type!r}" if model_type else ""
    return f"; its tokenizer_config.json names {wanted}, but transformers loaded {loaded}{by}"


def check_tokenizer_encodes(tokenizer: Any, texts: Iterable[str]) -> None:
    """A ``DataError`` naming the tokenizer when a non-empty text encodes to no token ids."""
    for text in texts:
        if not text.strip() or tokenizer(text, add_special_tokens=False)["input_ids"]:
            continue
        where = getattr(tokenizer, "name_or_path", "") or "the model directory"
        sample = text if len(text) <= 40 else text[:37] + "..."
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}, from {where}) turns the text {sample!r} "
            f"into no token ids{loaded_class_note(tokenizer)}: the tokenizer, not the data, is "
            "broken. Save the tokenizer in a format that class reads (a BPE tokenizer.json), or "
            "use a transformers version that loads the class the checkpoint names"
        )
