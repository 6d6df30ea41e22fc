"""What the real run measures: gold NLL, and every decoder on the same GSM8K prompts at batch 1.

* ``gold_nll`` — teacher-forced NLL (nats per token) of the gold GSM8K solutions, each after its
  question rendered by the chat template, over the solution's tokens and the turn-end token; the
  base and the Stage I model's AR path (adapter merged) are scored on exactly the same tokens.
* ``decode_all`` — for each prompt, in turn and in the same process: transformers' greedy
  ``generate`` on the base (its accuracy), greedy ``generate`` on the Stage I model (the reference
  every FLUID policy must equal token for token, and the speed baseline), transformers'
  prompt-lookup decoding (``prompt_lookup_num_tokens``, training-free drafting) on the Stage I
  model, and each FLUID policy through the public ``FluidForCausalLM.generate`` — twice: as the
  engine runs by default (its draft budget decodes as AR where drafts do not pay on this
  machine) and with the budget off (``, always drafting``: every step drafts as the policy says,
  so TPF shows what the slots can draft). Batch 1 because prompt-lookup decoding takes one
  sequence, and because that is the latency a user sees.

TPF is new tokens per model forward: for transformers' decoders the forwards are counted with a
hook on the model (the prompt's forward, which also yields the first token, counts as one); for
FLUID the sampler counts its decode forwards (its prompt encoding is not one, since it yields no
token). Tokens/s is new tokens over wall time, everything included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fluid_npu.eval.tasks import encode_question, is_correct
from fluid_npu.sampling.lossless import cut_at_eos, plain_generation

PROMPT_LOOKUP_TOKENS = 10  # transformers' own example value for prompt_lookup_num_tokens
ALWAYS = ", always drafting"  # the suffix of a FLUID decoder run with the draft budget off
WARMUP_TOKENS = 4


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The question as a user turn of the tokenizer's chat template, ready for the reply."""
    return encode_question(tokenizer, question, chat=True)


def gold_ids(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: the chat prompt, then the gold solution and the turn-end token."""
    from fluid_npu.data.auto_template import get_template
    from fluid_npu.data.templates import Conversation

    conversation = Conversation([("user", row["question"]), ("assistant", row["answer"])])
    enc = get_template("auto", tokenizer).encode(tokenizer, conversation)
    start, end = enc.spans[0]
    return enc.input_ids[:end], start


def gold_nll(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Mean NLL per gold-solution token over ``rows`` (and per row), teacher forced."""
    total, count, per_row = 0.0, 0, []
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for row in rows:
            ids, start = gold_ids(tokenizer, row)
            x = torch.tensor([ids], device=dev)
            logits = model(x).logits[0, start - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, start:], reduction="sum").item()
            n = len(ids) - start
            per_row.append(nll / n)
            total, count = total + nll, count + n
    return {"nll": total / count, "tokens": count, "rows": len(rows), "per_row": per_row}


class ForwardCounter:
    """Counts the forwards of a model (a forward pre-hook) while in a ``with`` block."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count, self._handle = model, 0, None

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> ForwardCounter:
        self.count = 0
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


def _hf_decode(model: Any, ids: list[int], max_new: int, eos: list[int], **kw: Any) -> dict:
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with ForwardCounter(model) as fc, torch.inference_mode(), plain_generation(model):
        start = time.perf_counter()
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0] if eos else None,
            **kw,
        )
        wall = time.perf_counter() - start
    new = out[0, len(ids) :].tolist()
    return {"tokens": cut_at_eos(new, eos), "forwards": fc.count, "wall_s": wall}


def _fluid_decode(
    fluid: Any, ids: list[int], max_new: int, policy: str, adaptive: bool = True
) -> dict:
    """One prompt through ``FluidForCausalLM.generate``; ``adaptive=False`` turns the engine's
    draft budget off, so every step drafts as the policy says (what the slots can draft, not
    only what pays on this machine)."""
    x = torch.tensor([ids], device=fluid.device)
    with plain_generation(fluid.model):  # plain greedy, whatever the checkpoint's config says
        fluid.generate(  # (the mask: a chat prompt holds the pad id where it is the EOS)
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            policy=policy,
            engine_kwargs={"adaptive": adaptive},
        )
    out, stats = fluid.last_output, fluid.last_stats
    return {
        "tokens": out.new_tokens[0],
        "forwards": sum(stats.row_forwards),
        "wall_s": stats.wall_s,
    }


def decoders(
    base: Any, fluid: Any, policies: Sequence[str], eos: list[int], max_new: int
) -> dict[str, Callable[[list[int]], dict]]:
    """name → decode function of one prompt's ids; ``generate`` (the Stage I model) first."""
    model = fluid.model
    table: dict[str, Callable[[list[int]], dict]] = {
        "generate": lambda ids: _hf_decode(model, ids, max_new, eos),
        "prompt_lookup": lambda ids: _hf_decode(
            model, ids, max_new, eos, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS
        ),
    }
    for policy in policies:
        table[f"fluid {policy}"] = lambda ids, p=policy: _fluid_decode(fluid, ids, max_new, p)
    for policy in policies:
        table[f"fluid {policy}{ALWAYS}"] = lambda ids, p=policy: _fluid_decode(
            fluid, ids, max_new, p, adaptive=False
        )
    if base is not None:
        table["base generate"] = lambda ids: _hf_decode(base, ids, max_new, eos)
    return table


def decode_all(
    base: Any,
    fluid: Any,
    rows: Sequence[dict[str, str]],
    policies: Sequence[str],
    max_new: int,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every decoder on every row (see the module docstring); figures per decoder, and the rows."""
    from fluid_npu.sampling.api import eos_and_pad

    eos, _ = eos_and_pad(fluid.model)
    warm = chat_ids(fluid.tokenizer, rows[0]["question"])
    for fn in decoders(base, fluid, policies, eos, WARMUP_TOKENS).values():
        fn(warm)  # one short call each, so no decoder pays first-call costs in the figures
    table = decoders(base, fluid, policies, eos, max_new)
    runs: dict[str, list[dict]] = {name: [] for name in table}
    samples = []
    for i, row in enumerate(rows):
        ids = chat_ids(fluid.tokenizer, row["question"])
        for name, fn in table.items():
            runs[name].append(fn(ids))
        ref = runs["generate"][-1]["tokens"]
        sample: dict[str, Any] = {"question": row["question"], "prompt_tokens": len(ids)}
        for name in table:
            r = runs[name][-1]  # scored once here; _figures sums these
            text = fluid.tokenizer.decode(r["tokens"], skip_special_tokens=True)
            r["correct"] = is_correct(text, _reference(row))
            r["identical"] = r["tokens"] == ref
            sample[name] = {
                "correct": r["correct"],
                "identical": r["identical"],
                "new_tokens": len(r["tokens"]),
            }
        sample["text"] = fluid.tokenizer.decode(ref, skip_special_tokens=True)
        samples.append(sample)
        if echo is not None:
            echo(f"decode: {i + 1}/{len(rows)} prompts ({len(ref)} tokens)")
    figures = {name: _figures(runs[name]) for name in table}
    base_tps = figures["generate"]["tokens_per_s"]
    for f in figures.values():
        f["speed_vs_generate"] = f["tokens_per_s"] / base_tps if base_tps else 0.0
    return {
        "decoders": figures,
        "order": list(table),  # the JSON's keys are sorted; this is the run order
        "samples": samples,
        "max_new_tokens": max_new,
        "n": len(rows),
    }


def _reference(row: dict[str, str]) -> str:
    from fluid_npu.data.gsm8k import reference_answer

    return reference_answer(row, "gsm8k row")


def _figures(runs: list[dict]) -> dict[str, Any]:
    """One decoder's totals over its runs (each already scored by ``decode_all``)."""
    tokens = sum(len(r["tokens"]) for r in runs)
    forwards = sum(r["forwards"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    correct = sum(r["correct"] for r in runs)
    return {
        "new_tokens": tokens,
        "forwards": forwards,
        "wall_s": wall,
        "tpf": tokens / forwards if forwards else 0.0,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "accuracy": correct / len(runs),
        "correct": correct,
        "identical_to_generate": sum(r["identical"] for r in runs) / len(runs),
    }
