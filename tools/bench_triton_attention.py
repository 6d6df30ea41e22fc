"""Benchmark: the block-sparse Triton FLUID attention against SDPA with a dense bool mask.

Builds one synthetic Stage I layout (main stream of ``--n-main`` tokens, the first ``--prompt``
of them prompt; every response column an anchor with probability ``--anchor-prob`` and
``k_c ~ U{1..k_max}`` slots; slots after the main stream in anchor order), then times forward +
backward of ``fluid_ops.attention_triton.triton_attention`` and of
``F.scaled_dot_product_attention`` given the dense ``visibility`` mask (k/v expanded to the query
heads beforehand, so SDPA runs its fused masked kernel), in bf16 on the accelerator that
``fluid_npu.device.current()`` picks (an NPU or a GPU; the script refuses to run on a CPU-only
host). Times are wall-clock (``time.perf_counter``) between device synchronizations. Both are
measured in the same run; the figure of merit is the ratio triton ÷ SDPA. Also reports the
compute ratio of the tile selection (``tile_stats``) and the max deviation from SDPA.

    python tools/bench_triton_attention.py --json bench.json
    python tools/bench_triton_attention.py --tiles 64x32,64x64,128x64   # compare tile shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fluid_npu import device as hw
from fluid_npu.io import write_json_atomic
from fluid_ops import attention_tiles, attention_triton
from fluid_ops.attention_tiles import tile_stats
from fluid_ops.attention_triton import triton_attention
from fluid_ops.meta import MAIN, AttnMeta, visibility


def stage1_layout(
    n_main: int, prompt: int, k_max: int, anchor_prob: float, seed: int = 0
) -> AttnMeta:
    """One Stage I row: main stream then slot groups in anchor order (``[1, L]`` metadata)."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.arange(prompt, n_main - 1)  # columns whose next token is a response token
    anchors = cols[torch.rand(len(cols), generator=g) < anchor_prob]
    ks = torch.randint(1, k_max + 1, (len(anchors),), generator=g)
    slot_anchor = torch.repeat_interleave(anchors, ks)
    starts = torch.cumsum(ks, 0) - ks
    j = torch.arange(int(ks.sum())) - torch.repeat_interleave(starts, ks) + 1
    pos = torch.cat([torch.arange(n_main), slot_anchor + j])[None]
    anchor = torch.cat([torch.full((n_main,), MAIN), slot_anchor])[None]
    return AttnMeta.self_attention(pos, anchor, n_main=n_main)


def timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs.

    Each run is timed with ``time.perf_counter`` between two synchronizations of ``device``, so the
    figure covers the queued kernels, not just their launch.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        hw.synchronize(device)
        start = time.perf_counter()
        fn()
        hw.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _profiler_activity(device: torch.device) -> torch.profiler.ProfilerActivity:
    """The profiler activity that records kernels of ``device`` (out-of-tree back ends such as the
    NPU register as ``PrivateUse1``)."""
    acts = torch.profiler.ProfilerActivity
    return getattr(acts, device.type.upper(), acts.PrivateUse1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-main", type=int, default=1000)
    ap.add_argument("--prompt", type=int, default=250, help="prompt tokens (no anchors)")
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--anchor-prob", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tiles", default="default", help="comma list of MxN tile shapes, or default")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--launch",
        default="",
        help="Triton launch overrides, e.g. fwd.num_warps=8,bwd.num_stages=3 (tuning)",
    )
    ap.add_argument("--profile", action="store_true", help="print a kernel time table per tile")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    choice = hw.current()
    if choice.type == "cpu":
        ap.exit(2, "this benchmark needs an accelerator (NPU or GPU); none is available here\n")

    dev = choice.device
    for item in filter(None, args.launch.split(",")):
        key, value = item.split("=")
        kernel, option = key.split(".")
        attention_triton._LAUNCH[kernel][option] = int(value)
    rows = [
        stage1_layout(args.n_main, args.prompt, args.k_max, args.anchor_prob, seed=i)
        for i in range(args.batch)
    ]
    width = max(r.q_pos.shape[1] for r in rows)
    pad = [width - r.q_pos.shape[1] for r in rows]  # right-pad slot regions (anchor PAD = -2)
    pos = torch.cat([F.pad(r.q_pos, (0, p), value=0) for r, p in zip(rows, pad)])
    anc = torch.cat([F.pad(r.q_anchor, (0, p), value=-2) for r, p in zip(rows, pad)])
    meta = AttnMeta.self_attention(pos, anc, n_main=args.n_main).to(dev)

    b, hq, hk, d, length = args.batch, args.heads, args.kv_heads, args.head_dim, width
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.bfloat16)

    q, k, v = rand(b, hq, length, d), rand(b, hk, length, d), rand(b, hk, length, d)
    do = rand(b, hq, length, d)
    scale = d**-0.5
    mask = visibility(meta)[:, None]  # [B, 1, L, L] bool, True = attend
    ke, ve = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, ke, ve)]
    ql, kl, vl, kel, vel = leaves

    def sdpa():
        return F.scaled_dot_product_attention(ql, kel, vel, attn_mask=mask, scale=scale)

    def sdpa_causal():  # the dense causal flash kernel on the same length, for scale
        return F.scaled_dot_product_attention(ql, kel, vel, is_causal=True, scale=scale)

    def fwd_bwd(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, [t for t in leaves if t.requires_grad], do, allow_unused=True)

        return run

    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": hw.device_name(dev),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "shape": {"batch": b, "heads": hq, "kv_heads": hk, "head_dim": d, "length": length},
        "layout": {
            "n_main": args.n_main,
            "prompt": args.prompt,
            "k_max": args.k_max,
            "anchor_prob": args.anchor_prob,
        },
        "dtype": "bfloat16",
        "time_unit": "ms (median of wall-clock timings between device synchronizations)",
        "date": time.strftime("%Y-%m-%d"),
        "launch": attention_triton._LAUNCH,
    }
    ref = sdpa().detach().float()
    results["sdpa_mask_fwd_ms"] = timed(sdpa, args.warmup, args.iters, dev)
    results["sdpa_mask_fwd_bwd_ms"] = timed(fwd_bwd(sdpa), args.warmup, args.iters, dev)
    results["sdpa_causal_fwd_bwd_ms"] = timed(fwd_bwd(sdpa_causal), args.warmup, args.iters, dev)

    tiles = [None] if args.tiles == "default" else [t.split("x") for t in args.tiles.split(",")]
    results["triton"] = []
    for tile in tiles:
        bm, bn = (None, None) if tile is None else (int(tile[0]), int(tile[1]))

        def tri(bm=bm, bn=bn):
            return triton_attention(ql, kl, vl, meta, scale, block_m=bm, block_n=bn)

        stats = tile_stats(meta, bm, bn)
        bm_, bn_ = stats["attn_tile"]

        def plan(bm_=bm_, bn_=bn_):  # the torch-side tile selection alone, uncached
            return attention_tiles._build_visits(meta, bm_, bn_, dev)

        fwd = timed(tri, args.warmup, args.iters, dev)
        fwd_bwd_ms = timed(fwd_bwd(tri), args.warmup, args.iters, dev)
        entry = {
            "attn_tile": stats["attn_tile"],
            "attn_compute_ratio": round(stats["attn_compute_ratio"], 4),
            "dense_compute_ratio": round(stats["dense_pairs"] / stats["visible_pairs"], 4),
            "plan_ms": timed(plan, args.warmup, args.iters, dev),
            "fwd_ms": fwd,
            "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_bwd_ratio_vs_sdpa_mask": fwd_bwd_ms / results["sdpa_mask_fwd_bwd_ms"],
            "fwd_ratio_vs_sdpa_mask": fwd / results["sdpa_mask_fwd_ms"],
            "max_abs_diff_vs_sdpa": float((tri().detach().float() - ref).abs().max()),
        }
        results["triton"].append(entry)
        if args.profile:
            with torch.profiler.profile(activities=[_profiler_activity(dev)]) as prof:
                fwd_bwd(tri)()
                hw.synchronize(dev)
            print(f"tile {stats['attn_tile']}:")
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=20))
    print(json.dumps(results, indent=2))
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
