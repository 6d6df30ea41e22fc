"""The Prometheus metrics of one ``fluid serve`` process (``GET /metrics``).

Each server has its own registry (so several servers can live in one test process). Counted where
the figure is known:

* on the event loop, per request: ``fluid_requests_total{endpoint, finish_reason}`` (finish reason,
  or the HTTP status of a refused request), ``fluid_request_tpf`` (tokens per decode forward of
  each finished request), ``fluid_time_to_first_token_seconds`` (arrival to the end of the step
  that made the first token), ``fluid_inter_token_latency_seconds`` (the gap between the steps
  that gave one request tokens: one observation per step, however many tokens it gave — what vLLM
  observes, so a multi-token step shows as one longer gap), ``fluid_request_time_per_output_token
  _seconds`` (per request: first to last token over the tokens after the first; 0 for a
  one-token request, as vLLM records it), ``fluid_e2e_request_latency_seconds``,
  ``fluid_request_queue_time_seconds`` / ``_prefill_time_seconds`` / ``_decode_time_seconds`` /
  ``_inference_time_seconds`` (vLLM's phases: submitted to given a slot, to the first token, to
  the last token; a slot to the last token), ``fluid_request_prompt_tokens`` /
  ``fluid_request_generation_tokens`` / ``fluid_request_params_max_tokens`` (per finished choice),
  ``fluid_request_params_n`` / ``fluid_request_max_num_generation_tokens`` (per prompt, once its
  ``n`` choices ended: ``n`` and the longest choice). Times come from the engine's clock (each
  event carries when its step ended), so event-loop lag or a slow reader does not move them;
* in the engine thread, per step: ``fluid_prompt_tokens_total`` (prompt tokens given a slot: one
  prompt per choice, as vLLM counts its ``n`` child requests), ``fluid_generation_tokens_total``
  (the tokens the step committed, so ``rate()`` follows a long generation as it runs),
  ``fluid_iteration_tokens_total`` (a histogram: prompt tokens admitted plus tokens committed, per
  step), ``fluid_accepted_draft_tokens`` (drafted tokens that went into a request's output in the
  step), ``fluid_num_requests_running`` / ``fluid_num_requests_waiting`` (the scheduler's own counts
  after the step), ``fluid_kv_cache_usage_perc`` (request slots held ÷ slots: the engine reserves a
  whole ``max_len`` row of the KV cache per request, so 1 means a new request waits, vLLM's
  meaning; a free slot still holding a reusable prefix counts as free, as vLLM's unreferenced
  cached blocks do), ``fluid_step_seconds``, ``fluid_step_requests`` (a histogram: the requests
  that held a slot in the step, those it ended included — the mean is the batch's occupancy),
  ``fluid_engine_cpu_seconds_total`` (the engine thread's own CPU time in its steps: far below
  ``fluid_step_seconds_sum`` on an accelerator whose host has cores to spare, the thread waited —
  for the interpreter's lock, held by the HTTP side, or for the device),
  ``fluid_prefix_cache_queries_total`` / ``fluid_prefix_cache_hits_total`` (prompt tokens
  admitted, and of them those a slot's cache already held: ``sampling/reuse.py``; vLLM's pair of
  the same meaning),
  ``fluid_spec_decode_num_drafts_total`` / ``_num_draft_tokens_total`` /
  ``_num_accepted_tokens_total`` / ``_num_accepted_tokens_per_pos_total{position}`` (the drafts
  each request verified in the step, and those the verify accepted, by position — before a stop
  string or limit cuts the output, as vLLM counts them).

The same figures are also exposed under vLLM's names (``VLLM_NAMES``: ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:prompt_tokens_total``, ``vllm:request_success_total
{finished_reason}`` — requests the engine ended, refusals left out —, the latency, phase and
per-request token histograms with vLLM's bucket edges, the prefix-cache pair and the
speculative-decoding counters — a request's verify of its drafts in a step is one draft, as a
vLLM drafter's proposal is), each with vLLM's ``model_name`` label, so the dashboards, alerts and
autoscalers written for vLLM (its Grafana dashboard's panels) read the series they share with
this server.

prometheus-client's metrics are thread-safe, so both sides write without locks.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# vLLM's bucket edges (vllm/v1/metrics/loggers.py), so its dashboards' quantiles and a sum over
# vLLM and fluid servers ``by (le)`` mean the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
TPF_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
ACCEPT_BUCKETS = tuple(float(i) for i in range(17))


def step_request_buckets(max_batch: int) -> tuple[int, ...]:
    """Bucket edges for the requests in a step: powers of two below ``max_batch``, then it."""
    edges = [1]
    while edges[-1] * 2 < max_batch:
        edges.append(edges[-1] * 2)
    return (*edges, max_batch) if max_batch > 1 else (1,)


def token_buckets(max_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, ... up to ``max_len`` (vLLM's ``build_1_2_5_buckets(max_model_len)``)."""
    out = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# ours -> vLLM's (``_VllmNames``): the same series under the names vLLM's users read
VLLM_NAMES = {
    "fluid_num_requests_running": "vllm:num_requests_running",
    "fluid_num_requests_waiting": "vllm:num_requests_waiting",
    "fluid_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "fluid_prompt_tokens": "vllm:prompt_tokens",
    "fluid_generation_tokens": "vllm:generation_tokens",
    "fluid_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "fluid_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "fluid_request_time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
    "fluid_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "fluid_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "fluid_request_prefill_time_seconds": "vllm:request_prefill_time_seconds",
    "fluid_request_decode_time_seconds": "vllm:request_decode_time_seconds",
    "fluid_request_inference_time_seconds": "vllm:request_inference_time_seconds",
    "fluid_iteration_tokens_total": "vllm:iteration_tokens_total",
    "fluid_request_params_n": "vllm:request_params_n",
    "fluid_request_params_max_tokens": "vllm:request_params_max_tokens",
    "fluid_request_max_num_generation_tokens": "vllm:request_max_num_generation_tokens",
    "fluid_request_prompt_tokens": "vllm:request_prompt_tokens",
    "fluid_request_generation_tokens": "vllm:request_generation_tokens",
    "fluid_prefix_cache_queries": "vllm:prefix_cache_queries",
    "fluid_prefix_cache_hits": "vllm:prefix_cache_hits",
    "fluid_spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "fluid_spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "fluid_spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
    "fluid_spec_decode_num_accepted_tokens_per_pos": "vllm:spec_decode_num_accepted_tokens_per_pos",
}


class _VllmNames(Collector):
    """Our series again under vLLM's names, with its ``model_name`` label, read at each scrape
    (nothing is counted twice); ``vllm:request_success_total`` from ``fluid_requests_total``."""

    def __init__(self, sources: list[Any], requests: Counter, model_name: str) -> None:
        self.sources, self.requests, self.model = sources, requests, model_name

    def collect(self) -> Any:
        for source in self.sources:
            for fam in source.collect():
                name = VLLM_NAMES[fam.name]
                out = Metric(name, fam.documentation, fam.type)
                for x in fam.samples:
                    labels = {**x.labels, "model_name": self.model}
                    out.add_sample(name + x.name[len(fam.name) :], labels, x.value, x.timestamp)
                yield out
        # requests the engine ended, by vLLM's finished_reason (its four from the start, at 0)
        done = dict.fromkeys(("stop", "length", "abort", "error"), 0.0)
        for fam in self.requests.collect():
            for x in fam.samples:
                reason = x.labels["finish_reason"]
                if x.name.endswith("_total") and not reason.isdigit():  # (a status: refused)
                    reason = "stop" if reason == "tool_calls" else reason
                    done[reason] = done.get(reason, 0.0) + x.value
        success = CounterMetricFamily(
            "vllm:request_success", "Requests the engine ended, by finish reason",
            labels=["finished_reason", "model_name"],
        )  # fmt: skip
        for reason, value in sorted(done.items()):
            success.add_metric([reason, self.model], value)
        yield success


class ServerMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(
        self, model_name: str, positions: int = 0, max_len: int = 1 << 20, max_batch: int = 256
    ) -> None:
        """``positions``: the draft positions whose acceptance is counted from the start (the
        engine's block length; later ones appear when first accepted); ``max_len``: the longest
        sequence, where the token histograms' buckets end (vLLM's ``max_model_len``);
        ``max_batch``: the engine's slots, where the step-requests buckets end."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fluid_requests",
            "Requests answered, by endpoint and finish reason (or refusal status)",
            ["endpoint", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fluid_prompt_tokens", "Prompt tokens given a slot (one prompt per choice)", registry=r
        )
        self.generation_tokens = Counter(
            "fluid_generation_tokens",
            "Tokens generated, counted at the step that made them",
            registry=r,
        )

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        tokens = token_buckets(max_len)
        self.tpf = hist(
            "fluid_request_tpf", "Tokens per decode forward of each finished request", TPF_BUCKETS
        )
        self.accepted = hist(
            "fluid_accepted_draft_tokens",
            "Drafted tokens accepted into a request's output, per request per step",
            ACCEPT_BUCKETS,
        )
        self.ttft = hist(
            "fluid_time_to_first_token_seconds", "Request arrival to its first token", TTFT_BUCKETS
        )
        self.itl = hist(
            "fluid_inter_token_latency_seconds",
            "Time between two steps that gave one request tokens (one observation per step)",
            TOKEN_LATENCY_BUCKETS,
        )
        self.tpot = hist(
            "fluid_request_time_per_output_token_seconds",
            "Per request: first to last token, over the tokens after the first",
            TOKEN_LATENCY_BUCKETS,
        )
        latency = REQUEST_LATENCY_BUCKETS
        self.e2e = hist(
            "fluid_e2e_request_latency_seconds", "Request arrival to its last token", latency
        )
        # vLLM's phases of a request: submitted to the engine, given a slot, first, last token
        self.phases = {
            name: hist(f"fluid_request_{name}_time_seconds", doc, latency)
            for name, doc in (
                ("queue", "Submitted to the engine, to given a slot"),
                ("prefill", "Given a slot, to its first token"),
                ("decode", "First token to last token"),
                ("inference", "Given a slot, to its last token"),
            )
        }
        self.request_prompt = hist(
            "fluid_request_prompt_tokens", "Prompt tokens of each finished choice", tokens
        )
        self.request_generation = hist(
            "fluid_request_generation_tokens", "Tokens generated for each finished choice", tokens
        )
        self.max_tokens = hist(
            "fluid_request_params_max_tokens", "max_tokens of each finished choice", tokens
        )
        self.n = hist("fluid_request_params_n", "n of each prompt, once it ended", N_BUCKETS)
        self.longest = hist(
            "fluid_request_max_num_generation_tokens",
            "Tokens of a prompt's longest choice, once its n choices ended",
            tokens,
        )
        self.iteration = hist(
            "fluid_iteration_tokens_total",
            "Prompt tokens admitted plus tokens committed, per step",
            ITERATION_BUCKETS,
        )
        self.step_seconds = hist(
            "fluid_step_seconds", "Duration of one scheduler step", STEP_BUCKETS
        )
        self.step_requests = hist(
            "fluid_step_requests",
            "Requests holding a slot in a scheduler step (those it ended included)",
            step_request_buckets(max_batch),
        )
        self.engine_cpu = Counter(
            "fluid_engine_cpu_seconds",
            "CPU time of the engine thread in its scheduler steps",
            registry=r,
        )
        self.cache_queries = Counter(
            "fluid_prefix_cache_queries", "Prompt tokens admitted into the engine", registry=r
        )
        self.cache_hits = Counter(
            "fluid_prefix_cache_hits",
            "Admitted prompt tokens a slot's cache already held (not encoded again)",
            registry=r,
        )
        self._seen = (0, 0)  # the scheduler's (queried, hits) at the last step
        # the drafts as vLLM's speculative decoding counts them: a request's verify of drafts in a
        # step is one draft; acceptance rate = accepted / draft tokens, mean acceptance length =
        # 1 + accepted / drafts, per position = accepted_per_pos / drafts
        self.drafts = Counter(
            "fluid_spec_decode_num_drafts", "Request steps that verified drafts", registry=r
        )
        self.draft_tokens = Counter(
            "fluid_spec_decode_num_draft_tokens", "Drafted tokens verified", registry=r
        )
        self.accepted_tokens = Counter(
            "fluid_spec_decode_num_accepted_tokens",
            "Drafted tokens accepted into a request's output",
            registry=r,
        )
        self.accepted_at = Counter(
            "fluid_spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by their position in the verified drafts",
            ["position"],
            registry=r,
        )
        # (the children, made once: a step counts each position once, not once per row)
        self._accepted_at = [self.accepted_at.labels(position=str(p)) for p in range(positions)]
        self.running = Gauge("fluid_num_requests_running", "Requests in the batch", registry=r)
        self.waiting = Gauge("fluid_num_requests_waiting", "Requests queued", registry=r)
        self.kv_usage = Gauge(
            "fluid_kv_cache_usage_perc",
            "Request slots held, over slots (1: a new request waits for one)",
            registry=r,
        )
        info = Gauge("fluid_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        mirrored = [
            self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
            self.ttft, self.itl, self.tpot, self.e2e, *self.phases.values(), self.iteration,
            self.n, self.max_tokens, self.longest, self.request_prompt, self.request_generation,
            self.cache_queries, self.cache_hits, self.drafts, self.draft_tokens,
            self.accepted_tokens, self.accepted_at,
        ]  # fmt: skip
        r.register(_VllmNames(mirrored, self.requests, model_name))

    def on_step(
        self, scheduler: Any, events: list[Any], seconds: float, cpu_seconds: float = 0.0
    ) -> None:
        """Engine-thread hook, after every step (``cpu_seconds``: the thread's CPU time in it)."""
        self.step_seconds.observe(seconds)
        self.engine_cpu.inc(cpu_seconds)
        ended = sum(1 for ev in events if ev.finished and ev.finish_reason != "abort")
        self.step_requests.observe(scheduler.num_running + ended)  # (an abort left before it)
        made = drafts = drafted = accepted = 0
        at: list[int] = []  # accepted drafts by position, summed over the step's rows
        for ev in events:
            made += len(ev.tokens)
            if ev.tokens:
                self.accepted.observe(ev.accepted)
            if ev.drafted:  # (as vLLM counts them: accepted by the verify, before a stop's cut)
                drafts += 1
                drafted += ev.drafted
                accepted += ev.drafts_accepted
                at += [0] * (ev.drafts_accepted - len(at))
                for pos in range(ev.drafts_accepted):
                    at[pos] += 1
        if drafts:
            self.drafts.inc(drafts)
            self.draft_tokens.inc(drafted)
            self.accepted_tokens.inc(accepted)
            for pos, n in enumerate(at):
                child = (
                    self._accepted_at[pos]
                    if pos < len(self._accepted_at)
                    else self.accepted_at.labels(position=str(pos))
                )
                child.inc(n)
        if made:
            self.generation_tokens.inc(made)
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_usage.set(scheduler.num_running / max(scheduler.slots_n, 1))
        now = (scheduler.prefixes.queried, scheduler.prefixes.hits)
        admitted = now[0] - self._seen[0]
        if now != self._seen:
            self.prompt_tokens.inc(admitted)
            self.cache_queries.inc(admitted)
            self.cache_hits.inc(now[1] - self._seen[1])
            self._seen = now
        self.iteration.observe(admitted + made)

    def on_failure(self) -> None:
        """Engine-thread hook: the engine failed, its requests were answered; none runs or waits."""
        self.running.set(0)
        self.waiting.set(0)
        self.kv_usage.set(0)

    def refused(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, finish_reason=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
