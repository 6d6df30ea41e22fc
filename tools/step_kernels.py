"""What each of the decode step's seven kernels saves per call on this device: the engine's own
calls, replayed through the torch rule and through the Triton kernel.

The seven step ops (``step_inputs``, ``step_mask``, ``verify_drafts``, ``block_hits``,
``logit_stats``, ``choose_anchors``, ``draft_gate``; docs/engine.md) each replace several small
torch ops with one Triton launch on CUDA. What that is worth depends on the host: a launch-bound
step pays each kernel's dispatch, and a Triton launch has its own Python-side cost. This tool
decodes the prompts through the engine as a server does (``max_batch`` = the batch size, slots
refilled as requests finish, the draft budget on unless ``--no-adaptive``), keeps a copy of every
call's arguments, and then replays the calls of each op back to back with each back end that can run
here — the device synchronised only after each pass, so the figure is what a launch-bound step pays
per call — and reports per op: calls per decode step (a loaded server's prefills' calls included),
µs per call with each back end, what the kernel saves per decode step, and the calls whose outputs
differ (integers exactly; the statistics' argmax and, to 1e-4, their log-probability and entropy).
Where the Triton back end cannot run (a CPU outside ``TRITON_INTERPRET=1``) only the torch rule is
timed, and the reason is reported; under the interpreter the kernels run as Python (``interpreted``
in the
report): their outputs are checked, their times are no device's.

    python tools/step_kernels.py --model runs/demo/stage1 --khead runs/demo/stage2 \\
        --prompts benchmarks/demo_prompts64.jsonl --json OUT.json --batch-sizes 16 \\
        --policies entropy:2 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from engine_args import engine_parser, grid, load, report_head, save

# (op, module that looks the function up at call time, its attribute there)
OPS = (
    ("step_inputs", "fluid_npu.sampling.step", "step_inputs"),
    ("step_mask", "fluid_npu.sampling.step", "step_mask"),
    ("verify_drafts", "fluid_npu.sampling.step", "verify_drafts"),
    ("block_hits", "fluid_npu.sampling.step", "block_hits"),
    ("logit_stats", "fluid_npu.sampling.head", "logit_stats"),
    ("choose_anchors", "fluid_ops.anchors", "choose_anchors"),
    ("draft_gate", "fluid_npu.sampling.step", "draft_gate"),
)


def _copy(x: Any) -> Any:
    """A copy of a call's argument, tensors with their strides (the engine's row slices)."""
    if not torch.is_tensor(x):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


Calls = dict[str, list]


def capture(fluid: Any, prompts: list[list[int]], batch: int, policy: str, adaptive: bool,
            max_new: int, max_calls: int) -> tuple[Calls, dict[str, int], int]:  # fmt: skip
    """The calls of the seven ops in one warm pass of the engine (each op's first ``max_calls``:
    a large vocabulary's logits are kept per call), and its decode steps."""
    import importlib

    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    sched = Scheduler(fluid.model, fluid.mask_id, policy=policy, khead=fluid.khead,
                      max_batch=batch, adaptive=adaptive, host_step=False)  # fmt: skip
    calls: dict[str, list] = {op: [] for op, _, _ in OPS}
    seen = dict.fromkeys(calls, 0)
    keeping = [False]
    originals = []
    for op, module, name in OPS:
        mod = importlib.import_module(module)
        rule = getattr(mod, name)
        originals.append((mod, name, rule))

        def kept(*a: Any, _op: str = op, _rule: Callable = rule, **kw: Any) -> Any:
            if keeping[0]:
                seen[_op] += 1
                if len(calls[_op]) < max_calls:
                    calls[_op].append(([_copy(x) for x in a], {k: _copy(v) for k, v in kw.items()}))
            return _rule(*a, **kw)

        setattr(mod, name, kept)
    steps = [0]
    decode = sched._decode

    def counted() -> Any:
        steps[0] += keeping[0]
        return decode()

    sched._decode = counted
    try:
        reqs = [Request(f"w{i}", p, max_new) for i, p in enumerate(prompts)]
        run_requests(sched, reqs)  # warm-up: the budget's choices settle
        keeping[0] = True
        run_requests(sched, [Request(str(i), p, max_new) for i, p in enumerate(prompts)])
    finally:
        for mod, name, rule in originals:
            setattr(mod, name, rule)
        sched.close()
    return calls, seen, steps[0]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):  # (TokenStats, the step inputs, the verify's outputs)
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    if a.dtype.is_floating_point:
        return bool(torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4, equal_nan=True))
    return bool(torch.equal(a, b))


def replay(fn: Callable, calls: list, backend: str, repeats: int, device: torch.device) -> float:
    """µs per call of ``calls`` through ``backend``, back to back (one warm pass first)."""
    from fluid_npu import device as devices

    for args, kw in calls:
        fn(*args, **kw, backend=backend)
    devices.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for args, kw in calls:
            fn(*args, **kw, backend=backend)
    devices.synchronize(device)
    return (time.perf_counter() - start) / (repeats * len(calls)) * 1e6


def measure(calls: dict[str, list], seen: dict[str, int], steps: int, repeats: int,
            device: torch.device) -> dict:  # fmt: skip
    """Per op: calls per decode step (``seen``: all its calls, kept or not), µs per call with each
    back end, the saving per step."""
    import importlib

    from fluid_ops import dispatch

    out: dict[str, Any] = {}
    saved = 0.0
    for op, module, name in OPS:
        fn = getattr(importlib.import_module(module), name)
        per_step = round(seen[op] / max(steps, 1), 2)
        row: dict[str, Any] = {"calls": seen[op], "calls_timed": len(calls[op]),
                               "calls_per_decode_step": per_step}  # fmt: skip
        if not calls[op]:
            out[op] = row
            continue
        row["torch_us_per_call"] = round(replay(fn, calls[op], "torch", repeats, device), 2)
        why = dispatch.why_unavailable(op, "triton", device)
        if why is not None:
            row["triton_unavailable"] = why
        else:
            row["triton_us_per_call"] = round(replay(fn, calls[op], "triton", repeats, device), 2)
            row["differing_calls"] = sum(
                not _same(fn(*a, **kw, backend="triton"), fn(*a, **kw, backend="torch"))
                for a, kw in calls[op]
            )
            row["saved_us_per_decode_step"] = round(
                per_step * (row["torch_us_per_call"] - row["triton_us_per_call"]), 2
            )
            saved += row["saved_us_per_decode_step"]
        out[op] = row
    out["saved_us_per_decode_step"] = round(saved, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = engine_parser(__doc__ or "")
    ap.add_argument("--no-adaptive", action="store_true", help="the draft budget off")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over the calls")
    ap.add_argument("--max-calls", type=int, default=256, help="calls kept and timed per op")
    args = ap.parse_args(argv)
    fluid, prompts = load(args)
    report: dict[str, Any] = {**report_head(argv, fluid, prompts, args),
                              "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
                              "rows": []}  # fmt: skip
    for batch, policy in grid(args):
        calls, seen, steps = capture(fluid, prompts, batch, policy, not args.no_adaptive,
                                     args.max_new_tokens, args.max_calls)  # fmt: skip
        row = {"batch_size": batch, "policy": policy, "decode_steps": steps,
               **measure(calls, seen, steps, args.repeats, fluid.device)}  # fmt: skip
        report["rows"].append(row)
        parts = []
        for op, _, _ in OPS:
            r = row[op]
            if "torch_us_per_call" not in r:
                continue
            kernel = f" / {r['triton_us_per_call']}" if "triton_us_per_call" in r else ""
            parts.append(f"{op} {r['calls_per_decode_step']}× {r['torch_us_per_call']}{kernel}")
        print(
            f"step_kernels: b={batch} {policy}: µs a call, torch rule / kernel: "
            + "; ".join(parts)
            + f"; saved {row['saved_us_per_decode_step']} µs a decode step"
        )
    save(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
