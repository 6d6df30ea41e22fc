"""Peak memory of a long-prompt prefill: the decode engine (chunked, causal) vs the old dense path.

The two ways the sampler has encoded a prompt, on the same model and prompt:

* ``dense`` — the reference loop's ``Engine.prefill`` (the first engine): one forward over the
  whole prompt with a dense ``[B, 1, P, P]`` visibility mask built from the metadata;
* ``engine`` — ``Scheduler``: chunks of ``--chunk`` tokens; the first is plain causal attention
  (no mask tensor), later ones carry a ``[chunk, prefix + chunk]`` mask, so nothing is ``O(P²)``.

Each variant runs in a fresh child process (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors
leave the resident set); the figure is peak RSS (``ru_maxrss``) minus the RSS after the model, the
prompt and (for the engine) its preallocated KV cache exist: the working memory of the prefill.
Both variants must produce the same last hidden state of the prompt's second-to-last token (checked,
max abs difference reported). The model is a random Llama of the demo's width with a long context.

    python tools/bench_prefill_memory.py --tokens 8192 --json benchmarks/prefill_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
VARIANTS = ("dense", "engine")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.tokens + 64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(5, 500, (args.tokens,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        if args.variant == "dense":
            from fluid_npu.sampling.engine import Engine
            from fluid_npu.sampling.stats import GenerateStats

            eng = Engine(
                model,
                [prompt],
                mask_id=1,
                max_new_tokens=1,
                eos_ids=[],
                pad_id=0,
                stats=GenerateStats(),
            )
            base = _rss()
            start = time.perf_counter()
            hidden = eng.prefill(draft=1)[1][0]
        else:
            from fluid_npu.sampling.scheduler import Request, Scheduler

            sched = Scheduler(
                model,
                1,
                policy="fixed:1",
                max_batch=1,
                max_len=args.tokens + 8,
                prefill_chunk=args.chunk,
                eos_ids=[],
            )
            sched.submit(Request("0", prompt.tolist(), 1))
            captured = {}
            original = sched._start
            sched._start = lambda i, sh=None, ah=None: (
                ah is None or captured.setdefault("h", ah[0]),
                original(i, sh, ah),
            )  # (the call that starts the prompt with its first drafts brings its anchor)
            sched._admit()
            base = _rss()
            start = time.perf_counter()
            while not sched.slots[0].running:
                sched._prefill()
            hidden = captured["h"]
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_mem_bytes": peak - base,
        "peak_mem_mib": round((peak - base) / 2**20, 1),
        "seconds": round(seconds, 3),
        "anchor_hidden": hidden.float().tolist(),
        "torch": torch.__version__,
    }


def _run(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant]
    for key in ("tokens", "chunk", "hidden", "layers", "heads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="prompt length")
    p.add_argument("--chunk", type=int, default=512, help="the engine's prefill chunk")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--json", default=None, help="where to write the report")
    p.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(_child(args)))
        return {}
    res = {v: _run(v, args) for v in VARIANTS}
    diff = max(
        abs(a - b)
        for a, b in zip(res["dense"].pop("anchor_hidden"), res["engine"].pop("anchor_hidden"))
    )
    report = {
        "benchmark": "prefill_memory",
        "command": " ".join(["python", "tools/bench_prefill_memory.py", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: getattr(args, k) for k in ("tokens", "chunk", "hidden", "layers", "heads")},
        "method": "peak RSS minus RSS before the prefill, fresh child per variant",
        "dense": res["dense"],
        "engine": res["engine"],
        "engine_peak_mem_ratio": round(
            res["engine"]["peak_mem_bytes"] / max(1, res["dense"]["peak_mem_bytes"]), 4
        ),
        "max_abs_diff_anchor_hidden": diff,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    if diff > 1e-3:
        raise SystemExit(f"the two prefills disagree (max abs diff {diff:.2e})")
    if args.json:
        from fluid_npu.io import write_json_atomic

        write_json_atomic(args.json, report)
    return report


if __name__ == "__main__":
    main()
