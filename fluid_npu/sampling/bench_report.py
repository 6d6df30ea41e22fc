"""The rows and report of ``fluid bench sampler`` (``bench.py`` runs it): one row per batch size ×
policy × loop, the compute bound of each fused row, the report's top-level keys, the printed table.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from fluid_npu import device as devices
from fluid_npu import host


def unlossless_rows(report: dict[str, Any]) -> int:
    """How many rows of a report have a real mismatch with transformers' greedy tokens."""
    return sum(1 for r in report["rows"] if not r["lossless"])


def bench_row(
    bs: int,
    pol: str,
    loop: str,
    new: list,
    stats: list,
    wall: float,
    base: dict[str, Any],
    diffs: list,
) -> dict[str, Any]:
    """One row of the report: a policy × loop at one batch size, against that batch's baseline."""
    tokens = sum(len(t) for t in new)
    row_forwards = sum(sum(st.row_forwards) for st in stats)
    tpf = tokens / row_forwards if row_forwards else 0.0
    accept: dict[str, int] = {}
    khist: dict[str, int] = {}
    for st in stats:
        for hist, dst in ((st.accept_hist, accept), (st.k_hist, khist)):
            for k, v in hist.items():
                dst[str(k)] = dst.get(str(k), 0) + v
    mismatches = [d.to_dict() for d in diffs if not d.tie]
    ties = [d.to_dict() for d in diffs if d.tie]
    return {
        "batch_size": bs,
        "policy": stats[0].policy if stats else pol,
        "loop": loop,
        "new_tokens": tokens,
        "decode_forwards": sum(st.decode_forwards for st in stats),
        "prefill_forwards": sum(st.prefill_forwards for st in stats),
        "computed_tokens": (computed := sum(st.computed_tokens for st in stats)),
        "computed_per_token": computed / tokens if tokens else 0.0,
        "cached_prompt_tokens": sum(st.cached_tokens for st in stats),  # (reuse.py)
        "tpf": tpf,
        "tpf_ratio": tpf / base["tpf"],
        "tokens_per_s": tokens / wall,
        "speedup": (tokens / wall) / base["tokens_per_s"],
        "wall_s": wall,
        "lossless": not mismatches,
        "mismatches": mismatches,
        "ties": ties,
        "accept_hist": dict(sorted(accept.items(), key=lambda kv: int(kv[0]))),
        "k_hist": dict(sorted(khist.items(), key=lambda kv: int(kv[0]))),
    }


def compute_bound(fluid: Any, row: dict[str, Any], baseline_s: float) -> dict[str, Any]:
    """The engine's fitted step cost for the row's policy (``DraftBudget.cost_model``: seconds ≈
    c0 + c1 · tokens) and what it implies: ``compute_floor_s`` — the row's computed tokens at c1
    each, its wall time with every per-forward cost removed — and ``speedup_ceiling``, the
    baseline's wall time over that floor: no overhead work can take the row past it."""
    fit = None
    for key, budget in getattr(fluid, "draft_budgets", {}).items():
        if key[0].name == row["policy"]:  # keyed by (policy, ...): Scheduler._budget
            fit = budget.cost_model()
    if fit is None or fit[1] <= 0:
        return {}
    floor = row["computed_tokens"] * fit[1]
    return {
        "step_cost_fit": {"c0_ms": fit[0] * 1e3, "c1_us_per_token": fit[1] * 1e6},
        "compute_floor_s": floor,
        "speedup_ceiling": baseline_s / floor if floor else None,
    }


def best_lossless(rows: list[dict[str, Any]], key: str, bs: int | None = None) -> float | None:
    """The largest ``key`` among the lossless rows (of batch size ``bs``); None if there is none."""
    vals = [r[key] for r in rows if r["lossless"] and (bs is None or r["batch_size"] == bs)]
    return max(vals) if vals else None


def build_report(
    s: Any,
    rows: list,
    baseline: dict,
    n_prompts: int,
    vers: dict,
    dev: torch.device,
    dtype: torch.dtype,
) -> dict:
    """The report of a run (``s``: its ``BenchSettings``); the keys are ``bench.py``'s."""
    by_batch = {str(bs): best_lossless(rows, "speedup", bs) for bs in s.batch_sizes}
    efficiency, against_ar = {}, {}
    for bs in s.batch_sizes:
        best = max(
            (r for r in rows if r["lossless"] and r["batch_size"] == bs and r["tpf"] > 1.0),
            key=lambda r: r["speedup"],
            default=None,
        )
        efficiency[str(bs)] = None if best is None else best["speedup"] / best["tpf"]
        ar = next((r for r in rows if r["batch_size"] == bs and r["policy"] == "ar"
                   and r["loop"] == (best or {}).get("loop") and r["lossless"]), None)  # fmt: skip
        against_ar[str(bs)] = (
            None if best is None or ar is None else best["speedup"] / ar["speedup"] / best["tpf"]
        )
    return {
        "benchmark": "sampler",
        "command": s.command,
        "model": s.model,
        "adapter": s.adapter,
        "khead": s.khead,
        "prompts": s.prompts,
        "n_prompts": n_prompts,
        "max_new_tokens": s.max_new_tokens,
        "repeats": s.repeats,  # interleaved timed rounds; each row's best is reported
        "device": device_info(dev),
        "versions": vers,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "baseline": {str(k): v for k, v in baseline.items()},
        "best_lossless_tpf": best_lossless(rows, "tpf"),
        "speedup_by_batch": by_batch,
        "speedup_vs_generate": by_batch,
        "overhead_efficiency": efficiency,
        "overhead_efficiency_vs_ar": against_ar,
        "dtype": str(dtype).removeprefix("torch."),
        "adaptive_drafting": (s.gen_kwargs.get("engine_kwargs") or {}).get("adaptive", True),
        "prefix_caching": (s.gen_kwargs.get("engine_kwargs") or {}).get("prefix_caching", True),
        "speedup_b1": best_lossless(rows, "speedup", 1),
        "speedup_b8": best_lossless(rows, "speedup", 8),
        "mismatches": sum(len(r["mismatches"]) for r in rows),
        "ties": sum(len(r["ties"]) for r in rows),
        "rows": rows,
    }


def device_info(dev: torch.device) -> dict[str, Any]:
    """The device the model actually ran on, its name, and the host CPU."""
    return {
        "type": dev.type,
        "index": dev.index,
        "name": devices.device_name(dev),
        "cpu": host.cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def print_row(r: dict[str, Any]) -> None:
    """One line per row, once its batch size's interleaved rounds are done."""
    print(
        f"bench: b={r['batch_size']} {r['loop']:9s} {r['policy']:12s} TPF {r['tpf']:.2f} "
        f"{r['tokens_per_s']:.1f} tok/s (x{r['speedup']:.2f}) "
        f"mismatches {len(r['mismatches'])} ties {len(r['ties'])}",
        flush=True,
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (printed at the end of a run)."""
    lines = [
        "| batch | loop | policy | TPF | tokens/s | speedup | computed / token | ceiling "
        "| lossless |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ceiling = r.get("speedup_ceiling")
        lines.append(
            f"| {r['batch_size']} | {r['loop']} | {r['policy']} | {r['tpf']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {r['computed_per_token']:.2f} | "
            f"{'' if ceiling is None else f'{ceiling:.2f}'} | "
            f"{'yes' if r['lossless'] else 'NO'} ({len(r['ties'])} ties) |"
        )
    return "\n".join(lines)
