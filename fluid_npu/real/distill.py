"""Stage I training data for the real model: self-distillation on questions that are not GSM8K.

The base model answers GSM-style arithmetic word problems — the questions of the demo's own
generator (``fluid_npu.data.demo``, training split; nothing of GSM8K) — greedily, through its chat
template, and those answers become the assistant turns Stage I trains on. Why its own answers:

* the AR path is trained on what it already predicts, so Stage I does not pull the model toward
  another distribution (the goal is to keep its NLL on the real gold solutions);
* the horizon slots learn to predict the model's own greedy continuation, which is exactly what
  lossless decoding verifies, so what they learn is what the sampler can accept.

Only answers that end with the model's EOS within ``max_new_tokens`` are kept (the slots and the AR
path should learn where the model stops), and none holding another special token (the MASK is one).
Written as an alpaca JSONL plus ``dataset_info.json`` (dataset ``real_distill``), read by
``fluid train`` with the tokenizer's chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluid_npu.errors import DataError
from fluid_npu.io import write_json_atomic, write_text_atomic

DATASET = "real_distill"
FILE = "distill.jsonl"


def distill_questions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct word problems from the demo generator's training split (no GSM8K text)."""
    from fluid_npu.data.demo import demo_problems

    return [q for q, _, _ in demo_problems("train", n, seed)]


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    echo: Callable[[str], None] | None = None,
) -> list[tuple[str, bool]]:
    """The model's greedy answer to each question (chat template, left-padded batches) and whether
    it ended with EOS; an answer holding another special token is returned empty."""
    from fluid_npu.eval.tasks import encode_question
    from fluid_npu.sampling.inputs import eos_and_pad
    from fluid_npu.sampling.lossless import plain_generation
    from fluid_npu.sampling.prompts import left_pad

    eos_list, pad = eos_and_pad(model, pad=tokenizer.pad_token_id)
    eos_ids = set(eos_list)
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special} - eos_ids
    out: list[tuple[str, bool]] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [encode_question(tokenizer, q, chat=True) for q in chunk]
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]
        with torch.inference_mode(), plain_generation(model):  # the model's own argmax
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in gen[:, width:].tolist():
            ended = next((i for i, t in enumerate(row) if t in eos_ids), None)
            answer = row[: ended if ended is not None else len(row)]
            if special.intersection(answer):  # a control token (the MASK may be one): unusable
                out.append(("", False))
                continue
            out.append((tokenizer.decode(answer).strip(), ended is not None))
        if echo is not None:
            echo(f"distill: {min(start + batch_size, len(questions))}/{len(questions)} answers")
    return out


def write_distill_dataset(
    base_dir: Path,
    out_dir: Path,
    n_questions: int,
    max_new_tokens: int,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Answer ``n_questions`` with the base model and write the ``real_distill`` dataset."""
    from fluid_npu.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir)
    questions = distill_questions(n_questions)
    answers = greedy_answers(model, tokenizer, questions, max_new_tokens, echo=echo)
    rows = [
        {"instruction": q, "input": "", "output": a}
        for q, (a, ended) in zip(questions, answers)
        if ended and a
    ]
    if not rows:
        raise DataError(
            f"the base model finished none of its {len(questions)} distillation answers within "
            f"{max_new_tokens} new tokens; raise --distill-tokens"
        )
    write_text_atomic(out_dir / FILE, (json.dumps(r) + "\n" for r in rows))
    stats = {
        "questions": len(questions),
        "kept": len(rows),
        "dropped": len(questions) - len(rows),  # no EOS in time, or a special token inside
        "max_new_tokens": max_new_tokens,
        "source": "fluid_npu.data.demo training-split questions, answered greedily by the base",
    }
    write_json_atomic(out_dir / "distill.json", stats)
    write_json_atomic(out_dir / "dataset_info.json", {DATASET: {"file_name": FILE}})
    return stats
