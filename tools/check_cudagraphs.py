"""Whether a compiled engine's decode step really runs as device graphs on this accelerator.

``Scheduler(compile=True)`` compiles the decode step with ``mode="reduce-overhead"`` on CUDA (on an
Ascend NPU with TorchAir's backend, which this does not check): inductor's cudagraph trees then
record the step as a CUDA graph — unless they skip it, which they say only on an off-by-default log
and in ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]`` (a graph that writes an input
whose address is not static is skipped: the engine marks its cache static for this). This decodes
the prompts through a compiled engine and an eager one on the same model, and reports the skips, the
decode forwards and the rows whose tokens differ (in bf16 a fused kernel may round a near-tie the
other way); exit 1 when a step was skipped.

    python tools/check_cudagraphs.py --model runs/demo/stage1 --prompts \
        benchmarks/demo_prompts64.jsonl --json cudagraphs_gpu.json --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL with 'prompt' per line")
    ap.add_argument("--json", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto", help="auto (the best accelerator) or a type")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    import torch
    from torch._dynamo.utils import counters

    from fluid_npu import device as devices
    from fluid_npu.io import write_json_atomic
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.scheduler import Request, Scheduler

    dev = devices.claim(force=None if args.device == "auto" else args.device)
    fluid = FluidForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=dev)
    with open(args.prompts, encoding="utf-8") as fh:
        texts = [json.loads(line)["prompt"] for line in fh if line.strip()][: args.num_prompts]
    prompts = [fluid.tokenizer(t)["input_ids"] for t in texts]
    report: dict[str, Any] = {"command": " ".join(sys.argv), "device": str(dev)}
    tokens = {}
    for compiled in (False, True):
        counters.clear()
        sched = Scheduler(
            fluid.model, fluid.mask_id, policy="entropy", max_batch=len(prompts), compile=compiled
        )
        try:
            reqs = [Request(str(i), p, args.max_new_tokens) for i, p in enumerate(prompts)]
            with torch.inference_mode():
                run_requests(sched, reqs)  # warm-up: compiles and records
                out = run_requests(sched, [Request(f"b{r.request_id}", r.prompt,
                                                   r.max_new_tokens) for r in reqs])  # fmt: skip
        finally:
            sched.close()
        tokens[compiled] = [out[f"b{i}"].tokens for i in range(len(prompts))]
        name = "compiled" if compiled else "eager"
        report[name] = {
            "decode_forwards": sched.decode_forwards,
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        }
    report["rows_differing"] = sum(a != b for a, b in zip(tokens[False], tokens[True]))
    write_json_atomic(args.json, report)
    print(json.dumps(report))
    return 1 if report["compiled"]["cudagraph_skips"] else 0


if __name__ == "__main__":
    sys.exit(main())
