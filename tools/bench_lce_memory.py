"""Peak memory and time of one LM-head loss step: ``linear_cross_entropy`` vs materialised logits.

The step is what Stage I does at the LM head: forward and backward to hidden and weight (fp32 by
default; ``--dtype bfloat16`` for a bf16 head).

* ``materialised``: ``F.cross_entropy(F.linear(hidden, weight), labels)`` then ``backward()`` (the
  logits are not held by Python, so autograd keeps only what it needs: the log-softmax);
* ``lce``: ``fluid_ops.linear_cross_entropy(hidden, weight, labels)`` then ``backward()``.

How memory is measured (CPU): each variant runs in a fresh child process, so nothing one variant
allocated or cached can hide in the other's numbers. The child imports everything, runs the step
once on tiny inputs (lazy imports, e.g. torch._dynamo pulled in by custom ops, are loaded before the
baseline), allocates the inputs, reads its current resident set (``/proc/self/statm``), runs one
step, and reads the peak resident set ``ru_maxrss``. The figure is ``peak − baseline``: the extra
memory the step needed at its worst moment, counting the gradients it creates. The children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every large tensor with ``mmap`` and returns it on
free: the resident set then follows live tensors instead of a heap that never shrinks. The child
checks that the step really raised the peak (otherwise the figure would be meaningless and it
fails). With ``--device accelerator`` (the device ``fluid_npu.device.current()`` picks: an NPU or a
GPU) the figure is the allocator's peak − the allocated bytes before the step, the allocator's own
count (``fluid_npu.device.memory_stats``).

Time: after the measured step the child repeats the step ``--repeats`` times (grads reset to None)
and reports the median wall time (``time.perf_counter`` between device synchronizations); the
ratio is lce / materialised, both measured in this run.

    python tools/bench_lce_memory.py --json OUT.json

(``tools/bench_ops.py`` runs it for the [kernels] report: ``benchmarks/ops_cpu.json``, key
``lce_memory``.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
VARIANTS = ("materialised", "lce")
_CHILD_ARGS = ("tokens", "vocab", "hidden", "chunk_tokens", "chunk_vocab", "repeats", "device")
_CHILD_ARGS += ("dtype", "backend")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _resolve_device(name: str) -> torch.device:
    """``cpu`` or ``accelerator`` (``fluid_npu.device.current()``) as a ``torch.device``."""
    import torch

    from fluid_npu import device as hw

    if name == "cpu":
        return torch.device("cpu")
    choice = hw.current()
    if choice.type == "cpu":
        print(
            "--device accelerator: no accelerator is available here; use --device cpu",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return choice.device


def _child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from fluid_npu import device as hw
    from fluid_ops import vocab, vocab_tiles
    from fluid_ops.vocab import linear_cross_entropy

    device = _resolve_device(args.device)
    on_accel = device.type != "cpu"
    dtype = getattr(torch, args.dtype)
    chunks = {"chunk_tokens": args.chunk_tokens, "chunk_vocab": args.chunk_vocab}
    chunks = {k: v for k, v in chunks.items() if v is not None}
    ct = args.chunk_tokens or vocab.DEFAULT_CHUNK_TOKENS

    def step(hidden, weight, labels):
        if args.variant == "materialised":
            loss = F.cross_entropy(F.linear(hidden, weight), labels)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, backend=args.backend, **chunks)
        loss.backward()
        return loss.detach()

    def inputs(tokens, vocab, seed):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(tokens, args.hidden, generator=gen)
        weight = torch.randn(vocab, args.hidden, generator=gen) / args.hidden**0.5
        labels = torch.randint(0, vocab, (tokens,), generator=gen)
        labels[::10] = -100  # prompt tokens carry no loss, as in Stage I
        hidden, weight, labels = (
            hidden.to(device, dtype),
            weight.to(device, dtype),
            labels.to(device),
        )
        return hidden.requires_grad_(), weight.requires_grad_(), labels

    step(*inputs(8, 64, 1))  # warm-up on tiny inputs: lazy imports and one-time setup
    hidden, weight, labels = inputs(args.tokens, args.vocab, 0)
    if on_accel:
        hw.synchronize(device)
        hw.reset_peak_memory(device)
        before = hw.memory_stats(device)["allocated_mib"] * 2**20
    else:
        before, peak_before = _rss_bytes(), _peak_rss_bytes()
    loss = step(hidden, weight, labels)
    if on_accel:
        hw.synchronize(device)
        peak = hw.memory_stats(device)["peak_allocated_mib"] * 2**20 - before
    else:
        peak_after = _peak_rss_bytes()
        if peak_after <= peak_before:
            raise SystemExit("the step did not raise the peak resident set: measurement invalid")
        peak = peak_after - before

    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        hw.synchronize(device)
        start = time.perf_counter()
        step(hidden, weight, labels)
        hw.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_mem_bytes": int(peak),
        "peak_mem_mib": round(peak / 2**20, 1),
        "time_s_median": statistics.median(times),
        "time_s": times,
        "loss": float(loss),
        "chunks": {  # what the lce variant runs with (library defaults unless given)
            "chunk_tokens": ct,
            "chunk_vocab": args.chunk_vocab
            or f"auto ({vocab_tiles.vocab_chunk(args.tokens, args.vocab, ct, 0)})",
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": hw.device_name(device) if on_accel else platform.processor(),
    }


def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant]
    for key in _CHILD_ARGS:
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} child failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: the library's")
    parser.add_argument("--chunk-vocab", type=int, default=None, help="default: the library's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="auto", help="vocab back end: auto, torch or triton")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "accelerator"],
        help="cpu (resident set) or accelerator (the one fluid_npu.device.current() picks; "
        "allocator peak)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results to this file")
    parser.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant is not None:
        print(json.dumps(_child(args)))
        return {}

    device = args.device
    if device == "accelerator":  # fail early, before starting the children; report which one
        device = str(_resolve_device(device))
    results = {v: _run_variant(v, args) for v in VARIANTS}
    mat, lce = results["materialised"], results["lce"]
    report = {
        "command": " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": device,
            "device_name": mat["device_name"],
            "torch": mat["torch"],
            "threads": mat["threads"],
        },
        "config": {
            "tokens": args.tokens,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "dtype": args.dtype,
            "backend": args.backend,
            **lce["chunks"],
            "repeats": args.repeats,
        },
        "method": (
            "peak RSS (ru_maxrss) minus RSS after allocating inputs, fresh child per variant, "
            "MALLOC_MMAP_THRESHOLD_=65536"
            if args.device == "cpu"
            else "accelerator allocator peak (max_memory_allocated) minus memory_allocated before "
            "the step"
        ),
        "materialised_fp32_logits_bytes": args.tokens * args.vocab * 4,
        "materialised": mat,
        "lce": lce,
        "lce_peak_mem_ratio": round(lce["peak_mem_bytes"] / mat["peak_mem_bytes"], 4),
        "lce_time_ratio": round(lce["time_s_median"] / mat["time_s_median"], 4),
        "loss_abs_diff": abs(lce["loss"] - mat["loss"]),
    }
    print(
        f"materialised: peak {mat['peak_mem_mib']} MiB, {mat['time_s_median']:.3f} s | "
        f"lce: peak {lce['peak_mem_mib']} MiB, {lce['time_s_median']:.3f} s | "
        f"lce_peak_mem_ratio {report['lce_peak_mem_ratio']} | "
        f"lce_time_ratio {report['lce_time_ratio']} | loss diff {report['loss_abs_diff']:.2e}"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        from fluid_npu.io import write_json_atomic

        write_json_atomic(args.json, report)
    return report


if __name__ == "__main__":
    main()
