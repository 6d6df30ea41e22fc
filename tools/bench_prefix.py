"""The engine's prefix reuse (``sampling/reuse.py``), on against off in one run, on two workloads.

``--workload fewshot`` builds prompts as an evaluation harness builds them: the first ``--shots``
prompts, each followed by the model's own greedy answer, form one shared prefix (the
demonstrations), and every other prompt is asked after it. ``--workload chat`` makes
conversations of ``--turns`` consecutive prompts: all first turns are queued at once, and a
conversation's next turn is submitted when its last one ends (its prompt: the last prompt, the
answer, the next question), as users of a chat server send them. For each batch size and policy
one engine per variant and pass (``Scheduler(prefix_caching=True)`` and ``False``, each variant
with its own draft budget, warmed up by one untimed pass) decodes them all, slots refilled as
requests finish; the variants alternate and each keeps its best time. It reports tokens/s of both,
their ratio (``prefix_speedup``), the positions each computed and the prompt tokens reuse skipped,
and checks that both committed the same tokens (exits 1 where a row differs).

    OMP_NUM_THREADS=1 python tools/bench_prefix.py --model runs/demo/stage1 \
        --khead runs/demo/stage2 --prompts benchmarks/demo_prompts64.jsonl \
        --json benchmarks/prefix_cpu.json --batch-sizes 1,8 --policies ar,khead
"""

from __future__ import annotations

import sys
import time
from typing import Any

from engine_args import ab_row, engine_parser, load, report_head, save

from fluid_npu.sampling.reuse import common_prefix

VARIANTS = {"reuse": True, "no_reuse": False}


def _engine(fluid: Any, policy: str, batch: int, max_len: int, reuse: bool, budgets: dict,
            pool: int = 0) -> Any:  # fmt: skip
    from fluid_npu.sampling.scheduler import Scheduler

    return Scheduler(
        fluid.model, fluid.mask_id, policy=policy, khead=fluid.khead, max_batch=batch,
        max_len=max_len, budgets=budgets, prefix_caching=reuse, prefix_slots=pool if reuse else 0,
    )  # fmt: skip


def _decode(sched: Any, prompts: list[list[int]], max_new: int) -> tuple[float, list[list[int]]]:
    """Wall seconds and tokens per prompt of one pass over ``prompts`` (one engine, kept)."""
    import torch

    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request

    start = time.perf_counter()
    with torch.inference_mode():
        done = run_requests(sched, [Request(str(i), p, max_new) for i, p in enumerate(prompts)])
    return time.perf_counter() - start, [done[str(i)].tokens for i in range(len(prompts))]


def _joiner(fluid: Any, sched: Any) -> Any:
    """``join(prompt, answer, question)``: the next prompt of a conversation (the answer without
    EOS, the question without its BOS: one BOS, at the start)."""
    eos, bos = set(sched.eos_ids), fluid.tokenizer.bos_token_id

    def join(prompt: list[int], answer: list[int], question: list[int]) -> list[int]:
        body = question[1:] if bos is not None and question[:1] == [bos] else question
        return prompt + [x for x in answer if x not in eos] + body

    return join


def few_shot(fluid: Any, prompts: list[list[int]], shots: int, max_new: int) -> list[list[int]]:
    """Every prompt after the first ``shots`` one, asked after those with the model's answers."""
    sched = _engine(fluid, "ar", 1, max(len(p) for p in prompts) + max_new, False, {})
    try:
        _, answers = _decode(sched, prompts[:shots], max_new)
    finally:
        sched.close()
    join = _joiner(fluid, sched)
    prefix = prompts[0]
    for answer, question in zip(answers, [*prompts[1:shots], []]):
        prefix = join(prefix, answer, question)
    return [join(prefix, [], p) for p in prompts[shots:]]


def _chat(sched: Any, convs: list[list[list[int]]], max_new: int,
          join: Any) -> tuple[float, list[list[int]]]:  # fmt: skip
    """Wall seconds and every turn's tokens (conversation by conversation) of conversations
    decoded turn after turn: a conversation's next turn is submitted when its last one ends, its
    prompt the last prompt, the answer and the next question."""
    import torch

    from fluid_npu.sampling.scheduler import Request

    out: dict[tuple[int, int], list[int]] = {}
    prompt: dict[str, tuple[int, int, list[int]]] = {}

    def submit(c: int, t: int, ids: list[int]) -> None:
        prompt[f"{c}.{t}"] = (c, t, ids)
        out[(c, t)] = []
        sched.submit(Request(f"{c}.{t}", ids, max_new))

    start = time.perf_counter()
    with torch.inference_mode():
        for c, questions in enumerate(convs):
            submit(c, 0, questions[0])
        while sched.has_work():
            for ev in sched.step():
                c, t, ids = prompt[ev.request_id]
                out[(c, t)] += ev.tokens
                if ev.finished and t + 1 < len(convs[c]):
                    submit(c, t + 1, join(ids, out[(c, t)], convs[c][t + 1]))
    wall = time.perf_counter() - start
    return wall, [out[(c, t)] for c in range(len(convs)) for t in range(len(convs[c]))]


def main(argv: list[str] | None = None) -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--workload", default="fewshot", choices=("fewshot", "chat"))
    ap.add_argument("--shots", type=int, default=4, help="fewshot: demonstrations in the prefix")
    ap.add_argument("--turns", type=int, default=4, help="chat: turns of each conversation")
    ap.add_argument(
        "--prefix-slots", type=int, default=0, help="reuse: cache rows that only keep prefixes"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    fluid, plain = load(args)
    max_new = args.max_new_tokens
    if args.workload == "chat":  # conversations of --turns consecutive prompts, --turns each
        n = len(plain) // args.turns
        convs = [plain[c * args.turns : (c + 1) * args.turns] for c in range(n)]
        max_len = max(sum(len(q) for q in conv) for conv in convs) + args.turns * max_new
        prompts = [conv[0] for conv in convs]
        head = {"conversations": n, "turns": args.turns}
    else:
        prompts = few_shot(fluid, plain, args.shots, max_new)
        max_len = max(len(p) for p in prompts) + max_new
        head = {
            "shots": args.shots,
            "prompt_tokens": sum(len(p) for p in prompts),
            "shared_prefix_tokens": common_prefix(prompts[0], prompts[1], len(prompts[0])),
        }
    report: dict[str, Any] = {
        **report_head(argv, fluid, prompts, args),
        "workload": args.workload,
        "prefix_slots": args.prefix_slots,
        **head,
        "repeats": args.repeats,
        "rows": [],
    }
    failed = False
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for policy in args.policies.split(","):
            best = {name: float("inf") for name in VARIANTS}
            budgets: dict[str, dict] = {name: {} for name in VARIANTS}
            out, counts = {}, {}
            for rep in range(args.repeats + 1):  # the first pass warms each variant's budget
                for name, on in VARIANTS.items():
                    # a new engine per pass (its slots hold nothing yet), the variant's budget kept
                    sched = _engine(
                        fluid, policy, batch, max_len, on, budgets[name], args.prefix_slots
                    )
                    try:
                        if args.workload == "chat":
                            sec, toks = _chat(sched, convs, max_new, _joiner(fluid, sched))
                        else:
                            sec, toks = _decode(sched, prompts, max_new)
                    finally:
                        sched.close()
                    if rep and sec < best[name]:
                        best[name], out[name] = sec, toks
                        counts[name] = (
                            sched.computed_tokens, sched.prefixes.hits, sched.prefixes.queried
                        )  # fmt: skip
            row, same = ab_row(batch, policy, out, best)
            failed |= not same
            row = {
                **row,
                **{f"{n}_computed_tokens": counts[n][0] for n in VARIANTS},
                "cached_prompt_tokens": counts["reuse"][1],
                "prompt_tokens": counts["reuse"][2],
                "prefix_speedup": best["no_reuse"] / best["reuse"],
            }
            report["rows"].append(row)
            print(
                f"bench_prefix: b={batch} {policy:8s} reuse {row['reuse_tokens_per_s']:.0f} tok/s, "
                f"none {row['no_reuse_tokens_per_s']:.0f} tok/s: x{row['prefix_speedup']:.2f}; "
                f"computed {row['reuse_computed_tokens']} vs {row['no_reuse_computed_tokens']} "
                f"({'same tokens' if same else 'TOKENS DIFFER'})",
                flush=True,
            )
    save(args.json, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
