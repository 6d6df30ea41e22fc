"""The engine's lean eager forward (``sampling/lean.py``) against the model's modules, in one run.

For each batch size and policy it decodes every prompt of ``--prompts`` through the decode engine
twice per repeat — ``Scheduler(lean=True)`` and ``Scheduler(lean=False)``, alternating, each
variant with its own draft budget (warmed up by one untimed pass) — and keeps each variant's best
time. It reports tokens/s of both, their ratio (``lean_speedup``), the pass's wall time over its
decode steps (``*_ms_per_step``: the prefills and the engine's set-up are in it), and checks
that both variants committed exactly the same tokens (the lean forward is the modules' arithmetic
bit for bit; the draft budget's timing-driven choices change shapes, never tokens).
Exits 1 when any row's tokens differ.

    OMP_NUM_THREADS=1 python tools/bench_lean.py --model runs/demo/stage1 --khead runs/demo/stage2 \
        --prompts benchmarks/demo_prompts64.jsonl --json benchmarks/lean_cpu.json
"""

from __future__ import annotations

import sys
import time
from typing import Any

from engine_args import ab_row, engine_parser, load, report_head, save

VARIANTS = {"lean": True, "modules": False}


def _decode(fluid: Any, prompts: list[list[int]], batch: int, policy: str, lean: bool,
            budgets: dict, max_new: int) -> tuple[float, list[list[int]], int]:  # fmt: skip
    """Wall seconds, tokens per prompt and decode steps of one pass over ``prompts``."""
    import torch

    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    tokens: list[list[int]] = []
    steps = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch):
            part = prompts[lo : lo + batch]
            sched = Scheduler(
                fluid.model,
                fluid.mask_id,
                policy=policy,
                khead=fluid.khead,
                max_batch=len(part),
                max_len=max(len(p) for p in part) + max_new,
                lean=lean,
                budgets=budgets,
            )
            try:
                reqs = [Request(str(i), p, max_new) for i, p in enumerate(part)]
                done = run_requests(sched, reqs)
            finally:
                sched.close()
            tokens += [done[str(i)][0] for i in range(len(part))]
            steps += sched.decode_forwards
    return time.perf_counter() - start, tokens, steps


def main(argv: list[str] | None = None) -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from fluid_npu.sampling.lean import LeanDecoder

    fluid, prompts = load(args)
    if LeanDecoder.of(fluid.model) is None:
        print(f"bench_lean: {args.model} does not take the lean forward", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        **report_head(argv, fluid, prompts, args),
        "repeats": args.repeats,
        "rows": [],
    }
    failed = False
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for policy in args.policies.split(","):
            budgets = {name: {} for name in VARIANTS}
            best = {name: float("inf") for name in VARIANTS}
            steps, out = {}, {}
            for name, lean in VARIANTS.items():  # warm-up: fills each variant's budget
                _decode(fluid, prompts, batch, policy, lean, budgets[name], args.max_new_tokens)
            for _ in range(args.repeats):
                for name, lean in VARIANTS.items():
                    sec, toks, n = _decode(
                        fluid, prompts, batch, policy, lean, budgets[name], args.max_new_tokens
                    )
                    if sec < best[name]:
                        best[name], steps[name], out[name] = sec, n, toks
            row, same = ab_row(batch, policy, out, best)
            failed |= not same
            row = {
                **row,
                **{f"{n}_ms_per_step": 1e3 * best[n] / steps[n] for n in VARIANTS},
                "lean_speedup": best["modules"] / best["lean"],
            }
            report["rows"].append(row)
            print(
                f"bench_lean: b={batch} {policy:10s} lean {row['lean_tokens_per_s']:.0f} tok/s, "
                f"modules {row['modules_tokens_per_s']:.0f} tok/s: x{row['lean_speedup']:.2f} "
                f"({'same tokens' if same else 'TOKENS DIFFER'})",
                flush=True,
            )
    save(args.json, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
