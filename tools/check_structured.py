"""Structured outputs on a real model: the engine's constrained tokens against a one-sequence
reference, and what the drafts save, in each dtype — printed and saved as JSON.

    python tools/check_structured.py --model runs/real/base --json benchmarks/structured_real.json

For every dtype (float32, bfloat16) and JSON style (free whitespace, as vLLM's default, and none:
``disable_any_whitespace``): the reference decodes the prompt one forward per token over the whole
sequence (transformers' forward, the grammar's mask on the last logits, their argmax); the engine
(``Scheduler``) decodes it under ``ar`` and ``entropy``; transformers' greedy ``generate`` with
xgrammar's logits processor (what a transformers user holds an output to a grammar with) decodes
it too. Reported: whether each engine output is the reference's and ``generate``'s token for
token, the wall time against ``generate``'s (each warmed up once, then the best of ``--repeats``
interleaved rounds), its tokens and decode forwards (the engine's drafts
under a grammar: the model's own, cut where the grammar refuses, or the text the grammar forces),
and the text. The prompt goes through the model's chat template; the MASK id is the project's rule
(``fluid_npu.model.mask_token``), so an untrained base drafts nothing useful and only forced text
saves forwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_npu.io import write_json_atomic
from fluid_npu.model.mask_token import resolve_mask_token
from fluid_npu.sampling.grammar import GrammarCompiler, allowed_tokens
from fluid_npu.sampling.inputs import serving_eos
from fluid_npu.sampling.lossless import TIE_ULPS, fp32_scorer, resolution
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.scheduler import Request, Scheduler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    },
    "required": ["name", "age", "city"],
}
QUESTION = (
    "Describe a fictional person as JSON with a name, an age and a city (Paris, Oslo or Lima)."
)


def reference(
    model: Any, grammar: Any, prompt: list[int], max_new: int, eos: list[int]
) -> list[int]:
    """Greedy decoding under ``grammar``, one full forward per token."""
    matcher = grammar.matcher(eos)
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            allowed = allowed_tokens([matcher], logits.shape[-1])[0]
            t = int(logits.masked_fill(~allowed, -torch.inf).argmax())
            matcher.accept_token(t)
            out.append(t)
            ids.append(t)
            if t in eos:
                break
    return out


def hf_generate(
    model: Any, grammar: Any, prompt: list[int], max_new: int, eos: list[int]
) -> tuple[list[int], float]:
    """transformers' greedy ``generate`` with xgrammar's own logits processor (what a
    transformers user holds an output to a grammar with): its new tokens and seconds."""
    from xgrammar.contrib.hf import LogitsProcessor

    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0],
                             logits_processor=[LogitsProcessor(grammar.compiled)])  # fmt: skip
    return out[0, len(prompt) :].tolist(), time.perf_counter() - t0


@torch.inference_mode()
def generate_difference(
    scorer: Any, dtype: torch.dtype, prompt: list[int], ours: list[int], theirs: list[int]
) -> dict[str, Any] | None:
    """Where ``ours`` first parts from ``generate``'s ``theirs`` (None: never, up to our end), and
    whether it is a near-tie by the project's rule (``lossless``): the two tokens' float32
    logits (``scorer``: ``fp32_scorer``'s getter) at most ``TIE_ULPS`` of ``dtype``'s
    resolution apart."""
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if i is None:
        if len(theirs) >= len(ours):  # (generate may go on past EOS to pad)
            return None
        # generate ended first: its EOS is the difference, unless it ran out of length
        return {"at": len(theirs), "engine": ours[len(theirs)], "generate": None,
                "fp32_gap": None, "tolerance": None, "tie": False}  # fmt: skip
    logits = scorer()(input_ids=torch.tensor([prompt + ours[:i]])).logits[0, -1].float()
    a, b = float(logits[ours[i]]), float(logits[theirs[i]])
    tol = TIE_ULPS * resolution(dtype, max(abs(a), abs(b)))
    return {"at": i, "engine": ours[i], "generate": theirs[i], "fp32_gap": abs(a - b),
            "tolerance": tol, "tie": abs(a - b) <= tol}  # fmt: skip


def engine_pass(sched: Any, request: Any) -> tuple[tuple[list[int], int], float]:
    """One decode of ``request`` on the engine ``sched``: (its tokens, decode forwards), seconds
    (a server's engine is built once: its construction is not timed)."""
    before = sched.decode_forwards
    t0 = time.perf_counter()
    got = run_requests(sched, [request])[request.request_id][0]
    took = time.perf_counter() - t0
    return (got, sched.decode_forwards - before), took


def best_rounds(sides: dict[str, Any], repeats: int) -> dict[str, tuple[Any, float]]:
    """Each of ``sides`` (name -> a call returning (output, seconds)) warmed up once, then timed
    in ``repeats`` interleaved rounds: name -> (the output, the seconds) of its fastest round."""
    for side in sides.values():
        side()
    best: dict[str, tuple[Any, float]] = {}
    for _ in range(repeats):
        for name, side in sides.items():
            out, sec = side()
            if name not in best or sec < best[name][1]:
                best[name] = (out, sec)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="a chat model folder (fluid real prepare's base)"
    )
    ap.add_argument("--json", required=True, help="where the report is written")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model).eval()
    mask_id = resolve_mask_token(tok, base).id  # (the project's rule: fluid real's choice too)
    messages = [{"role": "user", "content": QUESTION}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"])  # fmt: skip
    eos = serving_eos(base, tok)
    vocab = base.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(tok, vocab, eos)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        scorer = fp32_scorer(model)  # (a divergence from generate judged in float32)
        for free in (True, False):
            grammar = compiler.compile("json", SCHEMA, any_whitespace=free)
            want = reference(model, grammar, prompt, args.max_new_tokens, eos)
            engines = {  # (no prefix reuse: every timed pass prefills its prompt, as generate)
                policy: Scheduler(
                    model,
                    mask_id,
                    policy=policy,
                    max_batch=1,
                    eos_ids=eos,
                    tokenizer=tok,
                    prefix_caching=False,
                )
                for policy in ("ar", "entropy")
            }
            request = Request("a", prompt, args.max_new_tokens, grammar=grammar)
            sides = {"generate": partial(hf_generate, model, grammar, prompt,
                                         args.max_new_tokens, eos)}  # fmt: skip
            sides.update({p: partial(engine_pass, sched, request) for p, sched in engines.items()})
            best = best_rounds(sides, args.repeats)
            hf, hf_s = best["generate"]
            for policy in engines:
                (got, forwards), seconds = best[policy]
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "any_whitespace": free,
                    "policy": policy,
                    "equal_to_reference": got == want,
                    # transformers' generate may go on past EOS to pad: compared up to it
                    "equal_to_generate": got == hf[: len(got)],
                    "generate_difference": generate_difference(scorer, dtype, prompt, got, hf),
                    "tokens": len(got),
                    "decode_forwards": forwards,
                    "seconds": round(seconds, 3),
                    "generate_seconds": round(hf_s, 3),
                    "speedup_vs_generate": round(hf_s / seconds, 2),
                    "text": tok.decode(got, skip_special_tokens=True),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "model": args.model,
        "schema": SCHEMA,
        "question": QUESTION,
        "repeats": args.repeats,
        "all_equal": all(r["equal_to_reference"] for r in rows),
        # every engine row equal to generate's, or parted from it only on a near-tie
        "generate_equal_or_tie": all(
            r["generate_difference"] is None or r["generate_difference"]["tie"] for r in rows
        ),
        "rows": rows,
        "command": " ".join(["python", *sys.argv]),
    }
    write_json_atomic(Path(args.json), report)
    print(f"wrote {args.json}: all equal to the reference: {report['all_equal']}")
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
