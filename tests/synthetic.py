"""A short synthetic dataset for the tests: counting, count-downs, letter runs and repetitions.

Rows are short enough for the tests' 64-token cutoff with the byte-level tiny tokenizer, and their
answers are predictable several tokens ahead. Written as an alpaca-format JSONL plus a
``dataset_info.json`` entry (dataset ``fluid_demo``), so tests go through the real data pipeline.
(The CPU demo's own task, arithmetic word problems, is ``fluid_npu.data.demo``.)
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from fluid_npu.io import write_json_atomic, write_text_atomic

LETTERS = string.ascii_lowercase


def _count(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 60)
    b = a + rng.randint(6, 24)
    return f"count {a} to {b}", " ".join(str(i) for i in range(a, b + 1))


def _countdown(rng: random.Random) -> tuple[str, str]:
    b = rng.randint(8, 70)
    a = max(0, b - rng.randint(6, 20))
    return f"countdown {b} to {a}", " ".join(str(i) for i in range(b, a - 1, -1))


def _letters(rng: random.Random) -> tuple[str, str]:
    i = rng.randint(0, 14)
    j = rng.randint(i + 6, 25)
    return f"letters {LETTERS[i]} to {LETTERS[j]}", " ".join(LETTERS[i : j + 1])


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
    n = rng.randint(3, 7)
    return f"repeat {word} {n} times", " ".join([word] * n)


TASKS = (_count, _countdown, _letters, _repeat)


def short_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` alpaca rows (instruction / input / output) of the synthetic task."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = rng.choice(TASKS)(rng)
        rows.append({"instruction": prompt, "input": "", "output": answer})
    return rows


def write_short_dataset(directory: str | Path, n_train: int = 2000, seed: int = 0) -> Path:
    """Write ``demo.jsonl`` and ``dataset_info.json`` (dataset ``fluid_demo``) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = short_examples(n_train, seed)
    write_text_atomic(out / "demo.jsonl", [json.dumps(row) + "\n" for row in rows])
    write_json_atomic(out / "dataset_info.json", {"fluid_demo": {"file_name": "demo.jsonl"}})
    return out
