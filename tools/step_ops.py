"""Device ops the decode engine dispatches per decode step and per prefill, outside and inside the
forward: what each costs in launches on an eager accelerator, measured on any machine.

On a CPU an op is ~1-3 µs of dispatch; on an eager NPU or GPU every op that is not a view is a
kernel launch (tens of µs of host work on an NPU), so the engine's bookkeeping around the model —
verify, commit, draft, the next blocks, admission, the prefill's first drafts — is paid per op
whatever the model size. This tool decodes every prompt of ``--prompts`` through the engine
(``max_batch`` = the batch size, slots refilled as requests finish, as ``fluid bench sampler`` does)
under a ``TorchDispatchMode`` that counts every aten op, and splits them by where they ran:
``decode`` (a decode step outside its forward), ``prefill`` (a prefill outside its forward, its
requests' admission included) and ``forward`` (inside the model forward, its attention mask
included; ``mask_kernels_per_forward``: the mask's share, which ``fluid_ops.step_mask``'s Triton
back end makes one launch on CUDA; ``anchor_kernels_per_decode_step`` / ``_per_prefill``: the next
blocks' lengths', ``fluid_ops.choose_anchors``, likewise; ``stats_kernels_per_…``: the drafts'
statistics of their logits, ``fluid_ops.logit_stats``, likewise; ``inputs_kernels_per_decode_step``:
a decode step's inputs, ``fluid_npu.sampling.step_inputs``, likewise; ``verify_…`` / ``gate_…``:
its verify, ``fluid_ops.verify``, and the draft budget's gate, ``fluid_ops.gate``, likewise;
``hits_…``: the block the accepted length hit, ``fluid_ops.hits``, likewise).
``kernels`` leaves out view ops (``is_view``) and those that only touch metadata (``NO_LAUNCH``:
``to`` that needs no copy, ``detach_``, a Python scalar wrapped on the host, ...): no launch on any
device. On a CPU the small input tensors a step builds on the host before moving them are counted
too, so on an accelerator the launches are at most these counts. Counts depend a little on the
draft budget's timing-driven shape choices; ``--no-adaptive`` makes them repeatable.

    python tools/step_ops.py --model runs/demo/stage1 --khead runs/demo/stage2 \\
        --prompts benchmarks/demo_prompts64.jsonl --json benchmarks/step_ops_cpu.json
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from engine_args import engine_parser, grid, load, report_head, save

# ops that only change a tensor's metadata, hand the same tensor back, or wrap a Python scalar on
# the host (``torch.where(c, x, 0)``): no launch on an accelerator either
NO_LAUNCH = {
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::alias", "aten::to",
    "aten::resolve_conj", "aten::resolve_neg", "aten::scalar_tensor",
}  # fmt: skip


SHARES = ("mask", "anchors", "stats", "inputs", "verify", "hits", "gate")  # step ops counted apart


def count(fluid: Any, prompts: list[list[int]], batch: int, policy: str, adaptive: bool,
          max_new: int) -> dict[str, Any]:  # fmt: skip
    """Ops (and non-view ops) per decode step, per prefill and per forward of one warm pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    where = ["other"]
    ops: Counter = Counter()
    kernels: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            launch = not (func.is_view or func._schema.name in NO_LAUNCH)
            regions = {where[-1]}
            if where[-1] in SHARES:  # (their caller's too)
                regions |= {where[-2], f"{where[-1]}_{where[-2]}"}
            for region in regions:
                ops[region] += 1
                kernels[region] += launch
            return func(*args, **(kwargs or {}))

    # the tensor step, as an accelerator runs it (a CPU engine's lone greedy row otherwise keeps
    # its bookkeeping on the host: sampling/host_step.py)
    sched = Scheduler(fluid.model, fluid.mask_id, policy=policy, khead=fluid.khead,
                      max_batch=batch, adaptive=adaptive, host_step=False)  # fmt: skip
    calls: Counter = Counter()

    def within(name: str, fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            where.append(name)
            calls[name] += 1
            try:
                return fn(*a, **kw)
            finally:
                where.pop()

        return run

    sched._forward = within("forward", sched._forward)
    from fluid_npu.sampling import head
    from fluid_npu.sampling import step as engine_step
    from fluid_ops import anchors

    mask_rule = engine_step.step_mask  # the forward's mask (fluid_ops.step_mask), counted apart
    engine_step.step_mask = within("mask", mask_rule)
    anchor_rule = anchors.choose_anchors  # the next blocks' lengths, counted apart
    anchors.choose_anchors = within("anchors", anchor_rule)
    stats_rule = head.logit_stats  # the drafts' statistics of their logits, counted apart
    head.logit_stats = within("stats", stats_rule)
    inputs_rule = engine_step.step_inputs  # a decode step's inputs, counted apart
    engine_step.step_inputs = within("inputs", inputs_rule)
    verify_rule = engine_step.verify_drafts  # the verify (fluid_ops.verify), counted apart
    engine_step.verify_drafts = within("verify", verify_rule)
    hits_rule = engine_step.block_hits  # the block the verify hit (fluid_ops.hits), counted apart
    engine_step.block_hits = within("hits", hits_rule)
    gate_rule = engine_step.draft_gate  # the draft budget's gate (fluid_ops.gate), counted apart
    engine_step.draft_gate = within("gate", gate_rule)
    sched._decode = within("decode", sched._decode)
    sched._prefill = within("prefill", sched._prefill)
    sched._admit = within("prefill", sched._admit)  # admission is a prefill's share
    try:
        reqs = [Request(f"w{i}", p, max_new) for i, p in enumerate(prompts)]
        run_requests(sched, reqs)  # warm-up: the budget's choices settle
        ops.clear(), kernels.clear(), calls.clear()
        before = sched.prefill_forwards
        with Count():
            reqs = [Request(str(i), p, max_new) for i, p in enumerate(prompts)]
            done = run_requests(sched, reqs)
    finally:
        engine_step.step_mask = mask_rule
        anchors.choose_anchors = anchor_rule
        head.logit_stats = stats_rule
        engine_step.step_inputs = inputs_rule
        engine_step.verify_drafts = verify_rule
        engine_step.draft_gate = gate_rule
        engine_step.block_hits = hits_rule
        sched.close()
    steps, forwards = calls["decode"], calls["forward"]
    prefills = sched.prefill_forwards - before
    per = lambda c, n: round(c / max(n, 1), 1)  # noqa: E731
    return {
        "batch_size": batch,
        "policy": policy,
        "adaptive": adaptive,
        "new_tokens": sum(len(f.tokens) for f in done.values()),
        "decode_steps": steps,
        "prefills": prefills,
        "forwards": forwards,
        "decode_ops_per_step": per(ops["decode"], steps),
        "decode_kernels_per_step": per(kernels["decode"], steps),
        "prefill_ops_per_prefill": per(ops["prefill"], prefills),
        "prefill_kernels_per_prefill": per(kernels["prefill"], prefills),
        "forward_ops_per_forward": per(ops["forward"], forwards),
        "forward_kernels_per_forward": per(kernels["forward"], forwards),
        # of which the attention mask (torch's rule; fluid_ops.step_mask's Triton back end, picked
        # on CUDA, makes it one launch)
        "mask_kernels_per_forward": per(kernels["mask"], forwards),
        # of a decode step's / a prefill's, the next blocks' lengths (fluid_ops.choose_anchors;
        # its Triton back end, picked on CUDA, makes them one launch a call)
        "anchor_kernels_per_decode_step": per(kernels["anchors_decode"], steps),
        "anchor_kernels_per_prefill": per(kernels["anchors_prefill"], prefills),
        # the drafts' statistics of their logits (fluid_ops.logit_stats: likewise one launch)
        "stats_kernels_per_decode_step": per(kernels["stats_decode"], steps),
        "stats_kernels_per_prefill": per(kernels["stats_prefill"], prefills),
        # a decode step's inputs (fluid_npu.sampling.step_inputs: likewise one launch)
        "inputs_kernels_per_decode_step": per(kernels["inputs_decode"], steps),
        # its verify (fluid_ops.verify) and the draft budget's gate (fluid_ops.gate, adaptive
        # drafting only): likewise one launch each
        "verify_kernels_per_decode_step": per(kernels["verify_decode"], steps),
        "gate_kernels_per_decode_step": per(kernels["gate_decode"], steps),
        # the block the accepted length hit (fluid_ops.hits): likewise
        "hits_kernels_per_decode_step": per(kernels["hits_decode"], steps),
    }


def main(argv: list[str] | None = None) -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--no-adaptive", action="store_true", help="the draft budget off: repeatable")
    args = ap.parse_args(argv)

    fluid, prompts = load(args)
    report: dict[str, Any] = {**report_head(argv, fluid, prompts, args), "rows": []}
    for batch, policy in grid(args):
        row = count(fluid, prompts, batch, policy, not args.no_adaptive, args.max_new_tokens)
        report["rows"].append(row)
        print(
            f"step_ops: b={batch} {policy:10s} decode step {row['decode_ops_per_step']} ops "
            f"({row['decode_kernels_per_step']} kernels), prefill "
            f"{row['prefill_ops_per_prefill']} ({row['prefill_kernels_per_prefill']}), "
            f"forward {row['forward_ops_per_forward']} ({row['forward_kernels_per_forward']}, "
            f"{row['mask_kernels_per_forward']} of them the mask's; the next blocks' lengths "
            f"{row['anchor_kernels_per_decode_step']} a step, {row['anchor_kernels_per_prefill']} "
            f"a prefill; the drafts' statistics {row['stats_kernels_per_decode_step']} / "
            f"{row['stats_kernels_per_prefill']}; a decode step's inputs "
            f"{row['inputs_kernels_per_decode_step']}; its verify "
            f"{row['verify_kernels_per_decode_step']}; the block it hit "
            f"{row['hits_kernels_per_decode_step']}; the draft budget's gate "
            f"{row['gate_kernels_per_decode_step']})",
            flush=True,
        )
    save(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
