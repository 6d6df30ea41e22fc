"""The [kernels] figures in one report: memory, attention work and speed of the fused paths.

    python tools/bench_ops.py --json outputs/bench/ops.json [--device accelerator]

* ``lce_peak_mem_ratio`` — peak memory of a Stage I loss step with ``linear_cross_entropy`` ÷ with
  materialised logits (V = 32000, 2048 tokens, hidden 512; ``tools/bench_lce_memory.py``, each
  variant in a fresh process).
* ``attn_compute_ratio`` — query-key pairs the Triton kernel computes (whole visited tiles at the
  tile size it uses, ``attn_tile``) ÷ visible pairs, for the default Stage I layout (N = 1024,
  k_max = 16, anchor_prob 0.5); the dense-mask figure is reported beside it.
* ``blocked_cost_ratio`` and ``stage1_cost_per_token_vs_ar`` — from ``tools/bench_stage1.py``
  (Stage I step with ``blocked`` ÷ with ``reference``; Stage I cost per expanded token ÷ AR cost
  per token), cutoff 1024, CPU.
* With ``--device accelerator``: ``token_stats`` time ÷ the naive computation (logits, log-softmax,
  entropy, argmax) at 8192 tokens × V = 153 376 × hidden 4096 in bf16; Triton attention vs SDPA
  with a dense mask comes from ``tools/bench_triton_attention.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fluid_npu.io import write_json_atomic
from fluid_npu.layout import LayoutConfig, collate, expand
from fluid_ops.attention_tiles import tile_stats

TOOLS = Path(__file__).resolve().parent


def _sub_report(script: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(TOOLS / script), "--json", str(out), *extra]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def attn_work(n: int = 1024, k_max: int = 16, seed: int = 0) -> dict:
    """Tile work of the Triton kernel on the default Stage I layout."""
    layout = LayoutConfig(
        mask_id=1, pad_id=0, k_max=k_max, anchor_prob=0.5, seed=seed, max_slots_ratio=None
    )
    ids = np.random.default_rng(seed).integers(2, 200, n).tolist()
    batch = collate([expand(ids, ids, layout, index=0)], pad_id=0)
    stats = tile_stats(batch.meta)
    stats["dense_ratio"] = stats["dense_pairs"] / stats["visible_pairs"]
    stats["expanded_tokens"] = int(batch.input_ids.shape[1])
    return stats


def token_stats_speed(device: str, tokens: int, vocab: int, hidden: int, repeats: int) -> dict:
    """``token_stats`` vs naive logits → log-softmax → entropy / argmax / CE on ``device``."""
    import fluid_ops
    from fluid_npu import device as devices

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype)
    y = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def naive() -> None:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        (logp.exp() * logp).sum(-1).neg()
        logp.max(-1)
        logp.gather(-1, y[:, None])

    def fused() -> None:
        fluid_ops.token_stats(h, w, y)

    out = {}
    for name, fn in (("naive", naive), ("token_stats", fused)):
        fn()
        devices.synchronize(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            devices.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = statistics.median(times)
    out["token_stats_time_ratio"] = out["token_stats_s"] / out["naive_s"]
    out["shape"] = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": "bfloat16"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "accelerator"],
        help="accelerator = fluid_npu.device.current() (NPU or GPU)",
    )
    ap.add_argument("--skip-stage1", action="store_true", help="skip the (slow) step timings")
    args = ap.parse_args(argv)
    report: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    work = attn_work()
    report["attention_work"] = work
    report["attn_compute_ratio"] = round(work["attn_compute_ratio"], 3)
    report["attn_tile"] = work["attn_tile"]
    print(
        f"attn_compute_ratio {report['attn_compute_ratio']} (tile {work['attn_tile']}; "
        f"dense mask {work['dense_ratio']:.2f})",
        flush=True,
    )
    if args.device == "cpu":
        lce = _sub_report("bench_lce_memory.py", [])
        report["lce_memory"] = lce
        report["lce_peak_mem_ratio"] = lce["lce_peak_mem_ratio"]
        print(f"lce_peak_mem_ratio {report['lce_peak_mem_ratio']}", flush=True)
        if not args.skip_stage1:
            s1 = _sub_report("bench_stage1.py", [])
            report["stage1"] = s1
            report["blocked_cost_ratio"] = s1["blocked_cost_ratio"]
            report["stage1_cost_per_token_vs_ar"] = s1["stage1_cost_per_token_vs_ar"]
    else:
        from fluid_npu import device as devices

        dev = devices.current().device
        if dev.type == "cpu":
            raise SystemExit("bench_ops: --device accelerator needs an NPU or a GPU")
        report["device_name"] = devices.device_name(dev)
        report["token_stats"] = token_stats_speed(str(dev), 8192, 153376, 4096, repeats=10)
        report["token_stats_time_ratio"] = round(report["token_stats"]["token_stats_time_ratio"], 3)
        print(f"token_stats_time_ratio {report['token_stats_time_ratio']}", flush=True)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
