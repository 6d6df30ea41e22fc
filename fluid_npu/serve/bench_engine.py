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
  side, or for the device).

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
    totals = dict.fromkeys(SERIES, 0.0)
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
    if seen != set(SERIES):
        return None
    return {"totals": totals, "engines": max(len(engines), 1)}


def engine_view(
    before: dict[str, Any] | None, after: dict[str, Any] | None, wall: float
) -> dict[str, Any] | None:
    """What the engine did between two scrapes over ``wall`` seconds of load (module docstring)."""
    if before is None or after is None or wall <= 0:
        return None
    d = {k: after["totals"][k] - before["totals"][k] for k in SERIES}
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
    }


def describe(view: dict[str, Any] | None) -> str:
    """One line of a policy's engine figures, for the console."""
    if view is None:
        return "engine figures: none (the server's /metrics lacks fluid_step_* series)"
    cpu = view["engine_cpu_share"]
    return (
        f"engine busy {view['busy_share']:.0%} of the time, {view['steps']} steps of "
        f"{view['step_ms']:.2f} ms, {view['requests_per_step']} requests a step"
        + ("" if cpu is None else f", its thread on a CPU {cpu:.0%} of its steps")
    )
