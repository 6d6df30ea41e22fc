"""The synthetic reasoning task of the CPU demo: arithmetic word problems with short solutions.

Each problem is templated prose around random numbers — "Mia has 12 apples. She buys 7 more
apples. How many apples does Mia have now?" — and its solution restates the numbers, does the
arithmetic step by step and ends with ``The answer is n.``. The prose is predictable several tokens
ahead (what FLUID's horizon slots exploit); the results of the arithmetic are not.

Splits are deterministic: problems are drawn from one seeded stream and a problem belongs to the
held-out ``test`` split when a stable hash of its question says so, so no test question is ever a
training question. Rows come in GSM8K format (``question``, ``answer`` = solution + ``#### n``); the
training data is also written as an alpaca-format JSONL + ``dataset_info.json`` (dataset
``fluid_demo``) so Stage I and II go through the same data pipeline as a real run.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from fluid_npu.data.gsm8k import prompt_text  # the zero-shot GSM8K prompt: trained and evaluated
from fluid_npu.errors import DataError
from fluid_npu.io import write_json_atomic, write_text_atomic

NAMES = (
    ("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
    ("Ivy", "She"), ("Max", "He"), ("Lily", "She"), ("Ben", "He"), ("Nora", "She"), ("Owen", "He"),
)  # fmt: skip
ITEMS = ("apples", "pears", "books", "cards", "shells", "coins", "stamps", "pens", "cups", "eggs")
BOXES = ("boxes", "bags", "baskets", "jars", "crates", "trays")
MAX_OPERAND = 20  # sums and products stay small enough for a tiny model to learn exactly
TEST_FRACTION = 0.2
MAX_MISSES = 10_000  # draws in a row that give nothing new before a split counts as exhausted

Problem = tuple[str, str, int]  # question, solution (ending "The answer is n."), answer


def _people(rng: random.Random) -> tuple[tuple[str, str], str]:
    (name, pron), (friend, _) = rng.sample(NAMES, 2)
    return (name, pron), friend


def _add(rng: random.Random) -> Problem:
    (name, pron), _ = _people(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    question = (
        f"{name} has {a} {item}. {pron} buys {b} more {item}. How many {item} does {name} have now?"
    )
    solution = (
        f"{name} starts with {a} {item}. {pron} buys {b} more, so {name} has {a} + {b} = {a + b} "
        f"{item}. The answer is {a + b}."
    )
    return question, solution, a + b


def _sub(rng: random.Random) -> Problem:
    (name, pron), friend = _people(rng)
    item = rng.choice(ITEMS)
    a = rng.randint(4, MAX_OPERAND)
    b = rng.randint(1, a - 1)
    question = (
        f"{name} has {a} {item}. {pron} gives {b} {item} to {friend}. How many {item} does "
        f"{name} have left?"
    )
    solution = (
        f"{name} starts with {a} {item}. {pron} gives {b} to {friend}, so {name} has {a} - {b} = "
        f"{a - b} {item} left. The answer is {a - b}."
    )
    return question, solution, a - b


def _mul(rng: random.Random) -> Problem:
    (name, _), _ = _people(rng)
    item, box = rng.choice(ITEMS), rng.choice(BOXES)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = (
        f"{name} has {a} {box}. Each of the {box} holds {b} {item}. How many {item} does {name} "
        f"have in all?"
    )
    solution = (
        f"{name} has {a} {box} with {b} {item} in each, so {name} has {a} * {b} = {a * b} {item}. "
        f"The answer is {a * b}."
    )
    return question, solution, a * b


def _two_step(rng: random.Random) -> Problem:
    (name, pron), friend = _people(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    c = rng.randint(1, a + b - 1)
    s, r = a + b, a + b - c
    question = (
        f"{name} has {a} {item}. {pron} buys {b} more {item} and then gives {c} {item} to "
        f"{friend}. How many {item} does {name} have now?"
    )
    solution = (
        f"{name} starts with {a} {item}. After buying {b} more, {name} has {a} + {b} = {s} {item}. "
        f"After giving {c} to {friend}, {name} has {s} - {c} = {r} {item}. The answer is {r}."
    )
    return question, solution, r


KINDS: tuple[Callable[[random.Random], Problem], ...] = (_add, _sub, _mul, _two_step)


def is_test_question(question: str) -> bool:
    """Whether ``question`` belongs to the held-out split (a stable hash, not Python's ``hash``)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") < TEST_FRACTION * 2**32


def _stream(split: str, seed: int) -> Iterator[Problem]:
    if split not in ("train", "test"):
        raise ValueError(f"unknown demo split {split!r}; use 'train' or 'test'")
    rng = random.Random(seed)
    seen: set[str] = set()
    misses = 0
    while True:
        problem = rng.choice(KINDS)(rng)
        if problem[0] in seen or is_test_question(problem[0]) != (split == "test"):
            misses += 1
            if misses > MAX_MISSES:  # the split is nearly exhausted: fail instead of spinning
                raise DataError(
                    f"the demo's {split} split has no more than about {len(seen)} distinct "
                    "problems; ask for fewer"
                )
            continue
        misses = 0
        seen.add(problem[0])
        yield problem


def demo_problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first ``n`` distinct problems of ``split`` ("train" | "test") as (question, solution,
    answer)."""
    stream = _stream(split, seed)
    return [next(stream) for _ in range(n)]


def demo_split(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of ``split`` in GSM8K format: ``question``; ``answer`` = solution + ``#### n``."""
    return [
        {"question": q, "answer": f"{solution}\n#### {answer}"}
        for q, solution, answer in demo_problems(split, n, seed)
    ]


def demo_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` training problems as alpaca rows: instruction = the prompt, output = " " + solution."""
    return [
        {"instruction": prompt_text(q), "input": "", "output": f" {solution}"}
        for q, solution, _ in demo_problems("train", n, seed)
    ]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    write_text_atomic(path, [json.dumps(row) + "\n" for row in rows])
    return path


def write_demo_dataset(directory: str | Path, n_train: int = 2000, seed: int = 0) -> Path:
    """Write ``demo.jsonl`` and ``dataset_info.json`` (dataset ``fluid_demo``) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "demo.jsonl", demo_examples(n_train, seed))
    write_json_atomic(out / "dataset_info.json", {"fluid_demo": {"file_name": "demo.jsonl"}})
    return out


def write_gsm8k(path: str | Path, split: str, n: int, seed: int = 0) -> Path:
    """Export ``n`` rows of ``split`` as a GSM8K-format JSONL (for ``fluid eval --data``)."""
    return _write_jsonl(Path(path), demo_split(split, n, seed))


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of the first ``n`` held-out problems, for the sampler demo and benchmarks."""
    return [prompt_text(q) for q, _, _ in demo_problems("test", n, seed)]
