"""The report of a ``fluid bench serve`` run: the JSON (``build_report``: per-policy figures, each
FLUID policy's throughput over ``ar``'s, where that ratio comes from, the share of its outputs
identical to ``ar``'s, the [serve] goal) and its markdown table (``table``).

Where the ratio comes from (``ratio_terms``): an engine's generated tokens a second are its tokens
a step — TPF times the requests a step decodes — over its step time, times the share of the time it
was busy. So a FLUID policy's throughput over ``ar``'s is the product of four factors, each read
from the same run: ``tpf`` (tokens a request commits per forward, over ``ar``'s), ``step_cost``
(``ar``'s step time over the policy's: below 1, a FLUID step is dearer), ``occupancy`` (requests a
step over ``ar``'s: a closed loop leaves a slot empty while its client's next request comes, a
larger share of a short FLUID request's life) and ``busy`` (busy shares). ``product`` is theirs; it
agrees with the measured ratio to within the rounding of its terms when every step's requests
commit tokens, which tells the factor to work on.
"""

from __future__ import annotations

import time
from typing import Any

GOAL_VS_AR = 3.0  # [serve]'s goal: generated-token throughput over ar's at 16 clients


def build_report(s: Any, results: dict[str, Any], n_prompts: int) -> dict[str, Any]:
    """The JSON of a run: ``s`` its ``ServeBenchSettings``, ``results`` each policy's figures."""
    ar = results.get("ar")
    vs_ar, same = {}, {}
    for name, r in results.items():
        if ar is None or name == "ar":
            continue
        # a run with failed requests kept their time but not their tokens: no ratio then (the
        # two sides would not have served the same requests)
        failed = r["failed"] or ar["failed"]
        ar_rate = ar["output_tokens_per_s"]
        vs_ar[name] = (
            None if failed or not ar_rate else round(r["output_tokens_per_s"] / ar_rate, 3)
        )
        pairs = [(a, b) for a, b in zip(r["texts"], ar["texts"]) if a is not None and b is not None]
        same[name] = round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None
    terms = {n: ratio_terms(r, ar) for n, r in results.items() if ar is not None and n != "ar"}
    best = max((v for v in vs_ar.values() if v is not None), default=None)
    for r in results.values():  # the outputs were needed for the comparison, not in the report
        r["sample_texts"] = [t for t in r.pop("texts") if t is not None][:2]
    return {
        "benchmark": "serve",
        "command": s.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompts": s.prompts,
        "n_prompts": n_prompts,
        "settings": {
            k: getattr(s, k)
            for k in (
                "num_requests",
                "rate",
                "concurrency",
                "max_tokens",
                "ignore_eos",
                "chat",
                "warmup",
                "rounds",
                "seed",
            )
        },
        "server_args": s.server_args,
        "results": results,
        "throughput_vs_ar": vs_ar,
        "ratio_terms": terms,
        "identical_to_ar": same,
        "failed_requests": sum(r["failed"] for r in results.values()),
        "goal": {
            "throughput_vs_ar": GOAL_VS_AR,
            "best": best,
            "met": best is not None and best >= GOAL_VS_AR,
        },
    }


def ratio_terms(r: dict[str, Any], ar: dict[str, Any]) -> dict[str, float] | None:
    """The factors of ``r``'s throughput over ``ar``'s (the module docstring); None without both
    engines' figures (a server without the ``fluid_step_*`` series) or with failed requests."""
    a, b = r.get("engine"), ar.get("engine")
    if not a or not b or r["failed"] or ar["failed"] or not ar["tpf"]:
        return None
    try:
        terms = {
            "tpf": r["tpf"] / ar["tpf"],
            "step_cost": b["step_ms"] / a["step_ms"],
            "occupancy": a["requests_per_step"] / b["requests_per_step"],
            "busy": a["busy_share"] / b["busy_share"],
        }
    except (TypeError, ZeroDivisionError):  # (a figure missing or zero: no steps measured)
        return None
    product = 1.0
    for value in terms.values():
        product *= value
    return {k: round(v, 3) for k, v in {**terms, "product": product}.items()}


def describe_terms(name: str, terms: dict[str, float] | None) -> str | None:
    """One console line of ``ratio_terms``."""
    if terms is None:
        return None
    return (
        f"bench serve: {name} over ar: {terms['product']:.2f}× = TPF ×{terms['tpf']:.2f} · step "
        f"cost ×{terms['step_cost']:.2f} · requests a step ×{terms['occupancy']:.2f} · busy "
        f"×{terms['busy']:.2f}"
    )


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report (one row per policy)."""
    lines = [
        "| policy | tokens/s | × ar | TPF | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms "
        "| TPOT p50 ms | requests / step | engine busy | identical to ar | failed |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        ratio = report["throughput_vs_ar"].get(name, 1.0 if name == "ar" else None)
        same = report["identical_to_ar"].get(name, "—" if name != "ar" else "")

        def trio(key: str, r: dict[str, Any] = r) -> str:
            return " / ".join("—" if v is None else f"{v:.1f}" for v in r[key].values())

        engine = r.get("engine") or {}
        rows, busy = engine.get("requests_per_step"), engine.get("busy_share")
        lines.append(
            f"| {name} | {r['output_tokens_per_s']:.1f} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {r['tpf']} | {trio('ttft_ms')} | "
            f"{trio('itl_ms')} | {r['tpot_ms']['p50']} | {'—' if rows is None else rows} | "
            f"{'—' if busy is None else f'{busy:.0%}'} | {same} | {r['failed']} |"
        )
    return "\n".join(lines)
