"""Decoding a list of requests to the end on one ``Scheduler``: the offline path of ``generate``
(``api.py``), the tools and the tests.

``run_requests`` checks every request before any is queued (a repeated id, or a request the
scheduler refuses, leaves nothing behind), steps the scheduler until all have finished, and returns
each request's tokens, last event and log-probabilities (its prompt's too, when asked for); a
request that overflowed to NaN / inf is one ``NumericalError`` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from fluid_npu.errors import ConfigError, NumericalError
from fluid_npu.sampling.requests import Event, PromptLogprob, Request

if TYPE_CHECKING:
    from fluid_npu.sampling.scheduler import Scheduler


class Finished(NamedTuple):
    """A request decoded to the end by ``run_requests``."""

    tokens: list[int]
    final: Event  # its last event (finish_reason, forwards)
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_logprobs: list[PromptLogprob] | None = None  # with SamplingParams.prompt_logprobs
    ranks: list[int] | None = None  # with logprobs: each token's rank (Event.ranks)


def run_requests(
    sched: Scheduler, requests: Sequence[Request], stream: Any = None, finished: Any = None
) -> dict[str, Finished]:
    """Decode ``requests`` to the end; ``stream(index, tokens)`` as tokens commit,
    ``finished(index)`` as each request ends."""
    index = {r.request_id: n for n, r in enumerate(requests)}
    final: dict[str, Event] = {}
    new: dict[str, list[int]] = {r.request_id: [] for r in requests}
    lps: dict[str, list[float] | None] = {r.request_id: None for r in requests}
    tops: dict[str, list | None] = {r.request_id: None for r in requests}
    prompt_lps: dict[str, list[PromptLogprob] | None] = {r.request_id: None for r in requests}
    ranks: dict[str, list[int] | None] = {r.request_id: None for r in requests}
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise ConfigError(
                f"request id {r.request_id!r} is given twice; give every request its own id"
            )
        seen.add(r.request_id)
    submitted: list[str] = []
    try:
        for r in requests:
            sched.submit(r)
            submitted.append(r.request_id)
    except Exception:
        sched._withdraw(submitted)  # a bad request queues none of them
        raise
    try:
        _drain(sched, index, final, new, lps, tops, prompt_lps, ranks, stream, finished)
    except BaseException:  # (a KeyboardInterrupt too) the engine is left with none of them
        _abandon(sched, [rid for rid in submitted if rid not in final])
        raise
    broken = [index[rid] for rid, ev in final.items() if ev.finish_reason == "error"]
    if broken:
        raise NumericalError(
            f"request(s) {sorted(broken)} (0-based, in the order given) stopped: the model's "
            "activations overflowed to NaN or inf on their tokens (transformers' sampling refuses "
            "such probabilities; its greedy decoding returns token 0 from there on). float16 "
            "overflows where bfloat16 does not: run it in bfloat16 or float32 (--dtype)"
        )
    return {
        rid: Finished(new[rid], final[rid], lps[rid], tops[rid], prompt_lps[rid], ranks[rid])
        for rid in new
    }


def _drain(
    sched: Scheduler,
    index: dict[str, int],
    final: dict[str, Event],
    new: dict[str, list[int]],
    lps: dict[str, Any],
    tops: dict[str, Any],
    prompt_lps: dict[str, Any],
    ranks: dict[str, Any],
    stream: Any,
    finished: Any,
) -> None:
    """Step ``sched`` until it has no work, gathering each request's events."""
    while sched.has_work():
        for ev in sched.step():
            rid = ev.request_id
            if rid not in new:  # (not one of these: nothing else runs on an offline engine)
                continue
            new[rid].extend(ev.tokens)
            if ev.logprobs is not None:
                lps[rid] = lps[rid] or []
                lps[rid].extend(ev.logprobs)
            if ev.top_logprobs is not None:
                tops[rid] = tops[rid] or []
                tops[rid].extend(ev.top_logprobs)
            if ev.prompt_logprobs is not None:
                prompt_lps[rid] = ev.prompt_logprobs
            if ev.ranks is not None:
                ranks[rid] = (ranks[rid] or []) + ev.ranks
            if stream is not None and ev.tokens:
                stream(index[rid], ev.tokens)
            if ev.finished:
                final[rid] = ev
                if finished is not None:
                    finished(index[rid])


def _abandon(sched: Scheduler, rids: list[str]) -> None:
    """Abort ``rids`` after a failure mid-decode (an interrupt, a callback's error), so the
    engine is clean for its next requests; a second failure while doing so is not raised over
    the first."""
    try:
        for rid in rids:
            sched.abort(rid)
        while sched.has_work():
            sched.step()
    except Exception:  # (the first error is the one raised)
        pass
