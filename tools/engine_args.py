"""What the engine benchmarks in ``tools/`` share: their flags, the model and prompts they load, the
head of their JSON report, an A/B row and its writing (``bench_lean.py``, ``bench_prefix.py``,
``step_ops.py``; run as scripts from any directory).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def engine_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every engine benchmark takes: a model (+ K-head), prompts, where the JSON goes,
    batch sizes, policies, new tokens, dtype and device."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--khead", default=None)
    ap.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'input_ids' per line")
    ap.add_argument("--json", required=True, help="where the JSON report is written")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--policies", default="ar,entropy")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None, help="cpu, cuda, npu (default: cpu)")
    return ap


def grid(args: argparse.Namespace) -> list[tuple[int, str]]:
    """Every (batch size, policy) of ``--batch-sizes`` × ``--policies``, in that order."""
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    return [(b, p) for b in sizes for p in args.policies.split(",")]


def load(args: argparse.Namespace) -> tuple[Any, list[list[int]]]:
    """The FLUID model (``FluidForCausalLM``) and the prompts' token ids."""
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.prompts import encode_prompt, quiet_loading, read_prompt_lines

    with quiet_loading():
        fluid = FluidForCausalLM.from_pretrained(
            args.model, khead=args.khead, dtype=args.dtype, device=args.device
        )
    prompts = [encode_prompt(fluid.tokenizer, r, where=f"{args.prompts}:{n}").ids
               for n, r in read_prompt_lines(args.prompts)]  # fmt: skip
    return fluid, prompts


def report_head(argv: list[str] | None, fluid: Any, prompts: list[list[int]],
                args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """The command, device, dtype and sizes every report starts with."""
    from fluid_npu.sampling.bench_report import device_info

    return {
        "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "device": device_info(fluid.device),
        "dtype": str(next(fluid.model.parameters()).dtype),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
    }


def ab_row(batch: int, policy: str, out: dict[str, list[list[int]]],
           best: dict[str, float]) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """What every variant-against-variant row starts with (sizes, each variant's tokens/s from its
    best time ``best``), and whether every variant committed the same tokens ``out``."""
    first = next(iter(out.values()))
    same = all(toks == first for toks in out.values())
    total = sum(len(t) for t in first)
    row = {"batch_size": batch, "policy": policy, "new_tokens": total, "identical_tokens": same}
    return {**row, **{f"{n}_tokens_per_s": total / best[n] for n in out}}, same


def save(path: str, report: dict[str, Any]) -> None:
    """The JSON report at ``path`` (its folder made; written atomically)."""
    from pathlib import Path

    from fluid_npu.io import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
