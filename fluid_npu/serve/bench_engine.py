"""The engine's side of a ``fluid bench serve`` load, read from the server's ``/metrics``.

A closed-loop load (``--rate inf``, ``--concurrency C``) keeps C requests in flight, but a slot
whose request just ended stays empty until that client's next request has crossed the network,
been tokenized and reached the engine between two steps — about one step for every request. A
FLUID request ends in a few steps where AR's takes one per token, so that gap costs FLUID a larger
share of its slots. The figures here make it visible, per policy, over the timed slices only
(the counters are read before the first slice and after the last; a server idles while another is
loaded, and idling adds no steps):

* ``steps``, ``step_ms`` (mean duration of a scheduler step), ``busy_share`` (the steps' time over
  the policy's wall time: below 1 the engine waited for work);
* ``requests_per_step`` (the mean of ``fluid_step_requests``: the batch's occupancy, out of
  ``--max-batch``);
* ``engine_cpu_share`` (the engine thread's CPU time over its steps' time: on a host with cores to
  spare, what is missing is time the thread waited — for the interpreter's lock, held by the HTTP
  side, or for the device);
* ``first_token`` — where the server's mean time to first token goes, from vLLM's request phases:
  ``to_engine_ms`` (arrival at the server until the engine takes the request: parsing, tokenizing,
  the way to the engine and the wait for the step then running to end), ``queue_ms`` (waiting for a
  slot), ``first_step_ms`` (the admitting step: prefill and first decode); their sum is
  ``server_ttft_ms``. Against the client's mean TTFT (``ttft_mean_ms`` of the policy's figures)
  the rest is the way between client and server. A slot whose request ended stays empty for about
  the way back to the client, its next request's way in and ``to_engine_ms``: the closed loop's
  share of ``ratio_terms``' occupancy (``bench_report.py``).

A server without these series (another implementation, an older build) gets ``None``; behind
``--data-parallel-size`` the ranks' series are summed and ``busy_share`` is per rank.
"""

from __future__ import annotations

from typing import Any

import httpx

SERIES = (
    "fluid_step_seconds_count",
    "fluid_step_seconds_sum",
    "fluid_step_requests_count",
    "fluid_step_requests_sum",
    "fluid_engine_cpu_seconds_total",
)
# the first token's phases (optional: a server without them still gets the figures above)
PHASES = (
    "fluid_time_to_first_token_seconds_sum",
    "fluid_time_to_first_token_seconds_count",
    "fluid_request_queue_time_seconds_sum",
    "fluid_request_queue_time_seconds_count",
    "fluid_request_prefill_time_seconds_sum",
    "fluid_request_prefill_time_seconds_count",
)


def scrape(url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    """The engine's counters now (summed over ranks) and how many engines report them; ``None``
    when the server has no ``/metrics`` or not these series."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(f"{url}/metrics", timeout=30, headers=headers)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    totals = dict.fromkeys((*SERIES, *PHASES), 0.0)
    seen: set[str] = set()
    engines: set[tuple[tuple[str, str], ...]] = set()
    try:
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                    seen.add(sample.name)
                    if sample.name == "fluid_step_seconds_count":
                        engines.add(tuple(sorted(sample.labels.items())))
    except ValueError:  # not Prometheus' text format
        return None
    if not seen >= set(SERIES):
        return None
    return {"totals": totals, "engines": max(len(engines), 1), "phases": seen >= set(PHASES)}


def engine_view(
    before: dict[str, Any] | None, after: dict[str, Any] | None, wall: float
) -> dict[str, Any] | None:
    """What the engine did between two scrapes over ``wall`` seconds of load (module docstring)."""
    if before is None or after is None or wall <= 0:
        return None
    d = {k: after["totals"].get(k, 0.0) - before["totals"].get(k, 0.0) for k in (*SERIES, *PHASES)}
    steps = round(d["fluid_step_seconds_count"])
    if steps <= 0:
        return None
    busy = d["fluid_step_seconds_sum"]
    rows = d["fluid_step_requests_count"]
    return {
        "steps": steps,
        "step_ms": round(busy / steps * 1000, 3),
        "busy_share": round(busy / (wall * after["engines"]), 3),
        "requests_per_step": round(d["fluid_step_requests_sum"] / rows, 2) if rows else None,
        "engine_cpu_share": round(d["fluid_engine_cpu_seconds_total"] / busy, 3) if busy else None,
        "first_token": _first_token(d) if before.get("phases") and after.get("phases") else None,
    }


def _first_token(d: dict[str, float]) -> dict[str, float] | None:
    """The server's mean time to first token and its phases (module docstring), in ms; None
    unless all three were counted over the same requests (a request that ends early — aborted,
    failed — counts a first token but no phases, and the means would not add up)."""
    keys = {"ttft": "fluid_time_to_first_token_seconds",
            "queue": "fluid_request_queue_time_seconds",
            "step": "fluid_request_prefill_time_seconds"}  # fmt: skip
    counts = {round(d[f"{key}_count"]) for key in keys.values()}
    if len(counts) != 1 or min(counts) <= 0:
        return None
    n = counts.pop()
    mean = {name: d[f"{key}_sum"] / n * 1000 for name, key in keys.items()}
    return {
        "server_ttft_ms": round(mean["ttft"], 3),
        "to_engine_ms": round(mean["ttft"] - mean["queue"] - mean["step"], 3),
        "queue_ms": round(mean["queue"], 3),
        "first_step_ms": round(mean["step"], 3),
    }


def describe(view: dict[str, Any] | None) -> str:
    """One line of a policy's engine figures, for the console."""
    if view is None:
        return "engine figures: none (the server's /metrics lacks fluid_step_* series)"
    cpu, first = view["engine_cpu_share"], view.get("first_token")
    return (
        f"engine busy {view['busy_share']:.0%} of the time, {view['steps']} steps of "
        f"{view['step_ms']:.2f} ms, {view['requests_per_step']} requests a step"
        + ("" if cpu is None else f", its thread on a CPU {cpu:.0%} of its steps")
        + (
            ""
            if first is None
            else f"; first token {first['server_ttft_ms']:.1f} ms in the server: "
            f"{first['to_engine_ms']:.1f} to reach the engine, {first['queue_ms']:.1f} queued, "
            f"{first['first_step_ms']:.1f} the admitting step"
        )
    )
