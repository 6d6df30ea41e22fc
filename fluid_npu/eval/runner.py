"""``run_eval``: accuracy at a speed — every horizon policy beside the AR baseline, same prompts.

Users judge a FLUID model by its accuracy *and* by how fast it gets there. ``run_eval`` encodes the
task's prompts once (``tasks.py``), then decodes all of them in batches with each policy through
the sampler — ``ar`` first, always, as the baseline — and scores every output with the task's
extractor. Per policy it reports:

* ``accuracy`` (and ``correct`` of ``n``);
* ``tpf`` — new tokens per forward per sequence, counted by the sampler (1.0 for ``ar``);
* ``tokens_per_s`` — new tokens over the summed wall time of the sampler calls, and ``speedup``,
  its ratio to ``ar``'s in the same run; each policy is warmed up once on one prompt first;
* ``identical_to_ar`` — the fraction of prompts whose new tokens equal AR's token for token: 1.0
  for a lossless policy (the sampler's contract), below only through numerical near-ties, which
  ``ties`` lists (each first divergence re-scored in fp32, ``sampling.lossless.compare``) and
  ``mismatches`` counts the rest;
* ``k_hist`` / ``mean_k`` — the horizons the policy drafted per row-step (``GenerateStats``), and
  ``accept_hist`` / ``mean_accept`` — the drafted tokens accepted per row-step.

``samples`` keeps each prompt's reference and, per policy, the extracted answer and whether it is
right; the text is kept for ``ar`` and for any output that differs from AR's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fluid_npu.data.gsm8k import reference_answer
from fluid_npu.data.tokenizer_check import check_tokenizer_encodes
from fluid_npu.errors import ConfigError
from fluid_npu.eval.tasks import (
    STOP_STRINGS,
    TASKS,
    cut_at_stop,
    encode_question,
    extract_answer,
    select_fewshot,
)

if TYPE_CHECKING:
    from fluid_npu.sampling.stats import GenerateStats

BASELINE = "ar"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256
WARMUP_TOKENS = 8


def policy_names(fluid: Any, policies: Sequence[str], k_max: int | None = None) -> list[str]:
    """``ar`` then the other policies, each checked and canonically spelt, without repeats."""
    from fluid_npu.sampling.policies import block_bound, parse_policy

    k_max = block_bound(k_max, fluid.khead)
    names = [BASELINE]
    for spec in policies:
        name = parse_policy(spec, k_max=k_max, has_khead=fluid.khead is not None).name
        if name not in names:
            names.append(name)
    return names


def run_eval(
    fluid: Any,
    task: str,
    rows: Sequence[dict],
    policies: Sequence[str] = (),
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    fewshot_rows: Sequence[dict] | None = None,
    num_fewshot: int = 0,
    loop: str = "fused",
    gen_kwargs: dict[str, Any] | None = None,
    warmup: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``fluid`` (a ``FluidForCausalLM``) on GSM8K-format ``rows``: ``ar`` + ``policies``.

    Bad input — a row without its fields or its ``#### n``, ``num_fewshot`` beyond the few-shot
    rows, a misspelt policy, a bad size — raises a ``FluidError`` before anything is decoded.
    ``template_kwargs``: the chat template's variables (with ``chat``). ``gen_kwargs`` go to the
    sampler (``k_max``, ``anchors``, ``attn_backend``); ``echo`` receives
    one progress line per policy. Returns the report described in the module docstring.
    """
    from fluid_npu.io import versions
    from fluid_npu.sampling.api import LOOPS, eos_and_pad
    from fluid_npu.sampling.bench import decode_batches, split_batches
    from fluid_npu.sampling.bench_report import device_info
    from fluid_npu.sampling.inputs import serving_eos
    from fluid_npu.sampling.lossless import compare, fp32_scorer
    from fluid_npu.sampling.stats import GenerateStats

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if loop not in LOOPS:
        raise ConfigError(f"unknown sampler loop {loop!r}; choose {' or '.join(LOOPS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(
            f"batch_size and max_new_tokens must be at least 1, got {batch_size}, {max_new_tokens}"
        )
    if not rows:
        raise ConfigError(f"task {task} has no rows to evaluate")
    gen_kwargs = dict(gen_kwargs or {})
    references = [reference_answer(row, f"{task} row {i + 1}") for i, row in enumerate(rows)]
    shots = select_fewshot(fewshot_rows, num_fewshot)
    names = policy_names(fluid, policies, gen_kwargs.get("k_max"))
    tok = fluid.tokenizer
    check_tokenizer_encodes(tok, [row["question"] for row in rows[:8]])  # it, not the prompts
    prompts = [encode_question(tok, row["question"], shots, chat, template_kwargs) for row in rows]
    _, pad = eos_and_pad(fluid.model, pad=tok.pad_token_id)
    batches = split_batches(prompts, batch_size)

    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[list[int]]] = {}
    texts: dict[str, list[str]] = {}
    answers: dict[str, list[str | None]] = {}
    decode_kwargs = dict(gen_kwargs)  # decoding ends at the stop strings outputs are cut at
    decode_kwargs.setdefault("stop_strings", list(STOP_STRINGS))
    decode_kwargs.setdefault("stop_in_prompt", False)  # in the answer only, as the server
    # the tokenizer's EOS ends an output too, as fluid serve ends one; one set for every policy,
    # so each is compared with an AR baseline that stopped where it would
    decode_kwargs.setdefault("eos_token_id", serving_eos(fluid.model, tok))
    scorer = fp32_scorer(fluid.model)  # one fp32 copy (if any) for every policy's check
    for name in names:
        if warmup:
            decode_batches(fluid, [prompts[:1]], name, loop, WARMUP_TOKENS, pad, decode_kwargs)
        new, parts = decode_batches(fluid, batches, name, loop, max_new_tokens, pad, decode_kwargs)
        outputs[name] = new
        texts[name] = [tok.decode(t, skip_special_tokens=True) for t in new]
        answers[name] = [extract_answer(cut_at_stop(t)) for t in texts[name]]
        r = _figures(name, GenerateStats.merged(parts), answers[name], references, new, outputs)
        r["speedup"] = _ratio(r, results.get(BASELINE, r))
        if name != BASELINE:  # a divergence from ar is excused only as an fp32-judged near-tie
            diffs = compare(fluid.model, prompts, new, outputs[BASELINE], scorer=scorer)
            r["ties"] = [d.to_dict() for d in diffs if d.tie]
            r["mismatches"] = sum(not d.tie for d in diffs)
        results[name] = r
        if echo is not None:
            echo(
                f"eval: {task} {name:12s} accuracy {r['accuracy']:.3f} TPF {r['tpf']:.2f} "
                f"{r['tokens_per_s']:.1f} tok/s (x{r['speedup']:.2f}) "
                f"identical to ar {r['identical_to_ar']:.3f}"
            )
    samples = []
    for i, (row, ref) in enumerate(zip(rows, references)):
        per_policy = {}
        for name in names:
            same = outputs[name][i] == outputs[BASELINE][i]
            entry: dict[str, Any] = {"answer": answers[name][i], "correct": answers[name][i] == ref}
            if name != BASELINE:
                entry["identical_to_ar"] = same
            if name == BASELINE or not same:
                entry["text"] = texts[name][i]
            per_policy[name] = entry
        samples.append({"question": row["question"], "reference": ref, "outputs": per_policy})
    return {
        "task": task,
        "n": len(rows),
        "num_fewshot": len(shots),
        "chat": chat,
        "loop": loop,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "gen_kwargs": gen_kwargs,
        "policies": names,
        "results": results,
        "samples": samples,
        "device": device_info(fluid.device),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _figures(
    name: str,
    stats: GenerateStats,
    answers: list[str | None],
    references: list[str],
    new: list[list[int]],
    outputs: dict[str, list[list[int]]],
) -> dict[str, Any]:
    correct = sum(a == r for a, r in zip(answers, references))
    identical = sum(a == b for a, b in zip(new, outputs[BASELINE]))
    figures = stats.to_dict()
    figures.update(
        policy=name,
        accuracy=correct / len(references),
        correct=correct,
        identical_to_ar=identical / len(new),
        row_forwards=sum(stats.row_forwards),
    )
    for key in ("batch_size", "loop"):
        figures.pop(key)
    return figures


def _ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    return row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
