"""Where a decode engine's time goes on this device: each phase's wall time, per policy and batch,
with the draft budget on and off.

Each configuration decodes every prompt of ``--prompts`` through a fresh engine (``max_batch`` =
the batch size, slots refilled as requests finish) twice untimed, then once with the device
synchronised around every decode step (``decode``), prefill forward (``prefill``), admission and
compaction, so each phase's time is its own. Reported per row: tokens/s of that pass (slowed a
little by the synchronisations), the steps and the committed tokens per step, each phase's total
and the decode steps' and prefills' p50 / p90 / max in ms — a max far above the p90 is a one-off
cost of a new shape (on CUDA, cuDNN's SDPA built a plan per shape: ``device.engine_attention``)
— and the draft budget's fitted step cost (``c0`` ms + ``c1`` µs per token) and block length.
``--profile POLICY:BATCH,...`` adds ``torch.profiler``'s table (host and device time per op) of
one warm pass for each: on an accelerator a small model's step is host-bound, and this says by
which ops.

    python tools/step_times.py --model runs/demo/stage1 --khead runs/demo/stage2 \\
        --prompts benchmarks/demo_prompts64.jsonl --json OUT.json --batch-sizes 8,32 \\
        --policies ar,fixed:16,entropy:2,khead --device cuda --dtype bfloat16
"""

from __future__ import annotations

import sys
import time
from typing import Any

from engine_args import engine_parser, grid, load, report_head, save

PHASES = ("decode", "prefill", "admit", "compact")


def _ms(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (seconds) in ms, nearest rank; None for none."""
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)


def _engine(fluid: Any, policy: str, batch: int, adaptive: bool) -> tuple[Any, dict[str, list]]:
    """A fresh engine whose phases record their synchronised wall times."""
    from fluid_npu import device as devices
    from fluid_npu.sampling.scheduler import Scheduler

    sched = Scheduler(fluid.model, fluid.mask_id, policy=policy, khead=fluid.khead,
                      max_batch=batch, adaptive=adaptive)  # fmt: skip
    times: dict[str, list[float]] = {p: [] for p in PHASES}

    def timed(name: str, fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            devices.synchronize(fluid.device)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                devices.synchronize(fluid.device)
                times[name].append(time.perf_counter() - start)

        return run

    for name in PHASES:
        setattr(sched, f"_{name}", timed(name, getattr(sched, f"_{name}")))
    return sched, times


def _pass(fluid: Any, sched: Any, prompts: list[list[int]], max_new: int, tag: str) -> tuple:
    """Every prompt decoded to the end: (seconds, committed tokens)."""
    from fluid_npu import device as devices
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request

    reqs = [Request(f"{tag}{i}", p, max_new) for i, p in enumerate(prompts)]
    devices.synchronize(fluid.device)
    start = time.perf_counter()
    done = run_requests(sched, reqs)
    devices.synchronize(fluid.device)
    return time.perf_counter() - start, sum(len(f.tokens) for f in done.values())


def measure(fluid: Any, prompts: list[list[int]], batch: int, policy: str, adaptive: bool,
            max_new: int) -> dict[str, Any]:  # fmt: skip
    """One row: the third pass of a fresh engine, phase by phase."""
    sched, times = _engine(fluid, policy, batch, adaptive)
    try:
        _pass(fluid, sched, prompts, max_new, "w")
        _pass(fluid, sched, prompts, max_new, "v")
        for t in times.values():
            t.clear()
        wall, tokens = _pass(fluid, sched, prompts, max_new, "t")
        fit = sched.budget.cost_model()
        length = sched.budget.length
    finally:
        sched.close()
    dec, pre = times["decode"], times["prefill"]
    return {
        "batch_size": batch,
        "policy": policy,
        "adaptive": adaptive,
        "tokens_per_s": round(tokens / wall, 1),
        "new_tokens": tokens,
        "decode_steps": len(dec),
        "tokens_per_step": round(tokens / max(len(dec), 1), 2),
        **{f"{p}_ms_total": round(sum(times[p]) * 1e3, 2) for p in PHASES},
        "decode_ms": {"p50": _ms(dec, 0.5), "p90": _ms(dec, 0.9), "max": _ms(dec, 1.0)},
        "prefills": len(pre),
        "prefill_ms": {"p50": _ms(pre, 0.5), "p90": _ms(pre, 0.9), "max": _ms(pre, 1.0)},
        "step_cost_fit": None if fit is None else {"c0_ms": fit[0] * 1e3, "c1_us": fit[1] * 1e6},
        "block_length": length,
    }


def profile_table(fluid: Any, prompts: list[list[int]], batch: int, policy: str,
                  max_new: int) -> str:  # fmt: skip
    """``torch.profiler``'s per-op table (host and device time) of one warm pass."""
    from torch.profiler import profile

    from fluid_npu import device as devices

    sched, _ = _engine(fluid, policy, batch, True)
    try:
        _pass(fluid, sched, prompts, max_new, "w")
        with profile(activities=devices.profiler_activities(fluid.device)) as prof:
            _pass(fluid, sched, prompts, max_new, "p")
    finally:
        sched.close()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                     max_name_column_width=44)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--no-adaptive-rows", action="store_true",
                    help="leave out the rows with the draft budget off")  # fmt: skip
    ap.add_argument("--profile", default="", help="POLICY:BATCH,... to profile (e.g. khead:32)")
    args = ap.parse_args(argv)

    fluid, prompts = load(args)
    report: dict[str, Any] = {**report_head(argv, fluid, prompts, args), "rows": []}
    for batch, policy in grid(args):
        for adaptive in [True] if policy == "ar" or args.no_adaptive_rows else [True, False]:
            row = measure(fluid, prompts, batch, policy, adaptive, args.max_new_tokens)
            report["rows"].append(row)
            print(
                f"step_times: b={batch} {policy:10s} adaptive={adaptive!s:5s} "
                f"{row['tokens_per_s']:9.1f} tok/s, {row['decode_steps']} steps "
                f"(p50 {row['decode_ms']['p50']} / p90 {row['decode_ms']['p90']} / max "
                f"{row['decode_ms']['max']} ms), {row['prefills']} prefills (p50 "
                f"{row['prefill_ms']['p50']} ms), fit {row['step_cost_fit']}",
                flush=True,
            )
    report["profiles"] = {}
    for spec in filter(None, args.profile.split(",")):
        policy, batch = spec.rsplit(":", 1)
        table = profile_table(fluid, prompts, int(batch), policy, args.max_new_tokens)
        report["profiles"][spec] = table
        print(f"=== profile {spec}\n{table}", flush=True)
    save(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
