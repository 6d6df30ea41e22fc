"""``/metrics`` as vLLM's Grafana dashboard and alerts read it: the series its panels query
(KV-cache usage, the request phases, the longest choice of a prompt, ``n`` and ``max_tokens``,
tokens per step), counted once per choice where vLLM counts its child requests, on vLLM's bucket
edges. A scripted engine (``test_serve_http``) paces the steps, so each figure is known."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from test_serve_http import PacedScheduler, _metric, _until, client, serving

from fluid_npu.serve.metrics import REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, token_buckets


def test_token_buckets_are_vllms():
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_buckets(600)[-1] == 500 and token_buckets(1) == (1,)


def test_the_dashboards_series():
    sched = PacedScheduler(max_batch=2)
    with serving(sched) as (url, _, worker):
        c = client(url)
        done: list[Any] = []

        def ask(**kw: Any) -> threading.Thread:
            body = {"model": "tiny", "prompt": "one two", "extra_body": {"ignore_eos": True}}
            thread = threading.Thread(
                target=lambda: done.append(c.completions.create(**body, **kw))
            )
            thread.start()
            return thread

        thread = ask(max_tokens=7)
        _until(lambda: worker.outstanding == 1, "the request in flight")
        assert _metric(url, "vllm:kv_cache_usage_perc") == 0.0
        sched.allowed.release(1)  # admitted: one slot of two held
        _until(lambda: _metric(url, "fluid_generation_tokens_total") == 1, "the first step")
        assert _metric(url, "vllm:kv_cache_usage_perc") == 0.5
        sched.allowed.release(1000)
        thread.join(60)
        _until(lambda: worker.outstanding == 0, "the request closed")
        assert _metric(url, "vllm:kv_cache_usage_perc") == 0.0
        ask(max_tokens=5, n=2).join(60)  # two choices of one prompt
        ask(max_tokens=1).join(60)  # a one-token request
        _until(lambda: worker.outstanding == 0, "every request closed")
        single, pair, one = done
        # prompt tokens once per choice (vLLM's child requests), the same as the cache's queries
        prompts = single.usage.prompt_tokens + 2 * pair.usage.prompt_tokens
        prompts += one.usage.prompt_tokens
        assert _metric(url, "vllm:prompt_tokens_total") == prompts
        assert _metric(url, "vllm:prefix_cache_queries_total") == prompts
        made = _metric(url, "vllm:generation_tokens_total")
        assert made == 7 + 2 * 5 + 1
        assert _metric(url, "vllm:iteration_tokens_total_sum") == prompts + made
        # per prompt once its choices ended: n, and its longest choice (not their sum)
        assert _metric(url, "vllm:request_params_n_count") == 3
        assert _metric(url, "vllm:request_params_n_sum") == 1 + 2 + 1
        assert _metric(url, "vllm:request_max_num_generation_tokens_sum") == 7 + 5 + 1
        # per choice: max_tokens, and the phases (a slot's time: its prefill plus its decode)
        assert _metric(url, "vllm:request_params_max_tokens_sum") == 7 + 2 * 5 + 1
        phases = ("queue", "prefill", "decode", "inference")
        for phase in phases:
            assert _metric(url, f"vllm:request_{phase}_time_seconds_count") == 4, phase
        decode = _metric(url, "vllm:request_decode_time_seconds_sum")
        prefill = _metric(url, "vllm:request_prefill_time_seconds_sum")
        inference = _metric(url, "vllm:request_inference_time_seconds_sum")
        assert decode > 0 and inference == pytest.approx(prefill + decode, rel=1e-6)
        assert inference <= _metric(url, "vllm:e2e_request_latency_seconds_sum")
        # a one-token request's time per output token is 0, counted as vLLM counts it
        assert _metric(url, "vllm:request_time_per_output_token_seconds_count") == 4
        text = httpx.get(f"{url}/metrics").text
        # vLLM's bucket edges: its dashboards' quantiles mean the same on both servers
        assert f'vllm:time_to_first_token_seconds_bucket{{le="{TTFT_BUCKETS[-1]}"' in text
        last = REQUEST_LATENCY_BUCKETS[-1]
        assert f'vllm:e2e_request_latency_seconds_bucket{{le="{last}"' in text
        assert 'vllm:request_prompt_tokens_bucket{le="500.0"' in text  # (max_len 600)
        assert 'vllm:request_prompt_tokens_bucket{le="1000.0"' not in text


def test_an_engine_failure_leaves_no_usage_behind():
    from types import SimpleNamespace

    from fluid_npu.serve.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    full = SimpleNamespace(num_running=4, num_waiting=2, slots_n=4,
                           prefixes=SimpleNamespace(queried=0, hits=0))  # fmt: skip
    metrics.on_step(full, [], 0.01)
    read = metrics.registry.get_sample_value
    assert read("vllm:kv_cache_usage_perc", {"model_name": "m"}) == 1.0
    metrics.on_failure()  # (nothing runs or waits any more, nothing holds a slot)
    assert read("vllm:kv_cache_usage_perc", {"model_name": "m"}) == 0.0
    assert read("fluid_num_requests_running") == 0.0


def test_a_step_of_several_drafting_rows_counts_each_accepted_position_once_per_row():
    """A step's events are summed: rows that accepted 3, 1 and 0 of their drafts (and one that
    verified none) add 2 / 1 / 1 to positions 0 / 1 / 2, 3 verifies of 3 + 2 + 4 drafts and 4
    accepted — a position past the engine's block length appears when first accepted."""
    from types import SimpleNamespace

    from fluid_npu.sampling.requests import Event
    from fluid_npu.serve.metrics import ServerMetrics

    metrics = ServerMetrics("m", positions=2)
    sched = SimpleNamespace(num_running=4, num_waiting=0, slots_n=4,
                            prefixes=SimpleNamespace(queried=0, hits=0))  # fmt: skip
    rows = [(4, 3, 3), (2, 2, 1), (1, 4, 0), (1, 0, 0)]  # (tokens, drafted, drafts accepted)
    events = [
        Event(f"r{i}", [7] * n, False, None, n, 1, n - 1, drafted=d, drafts_accepted=a)
        for i, (n, d, a) in enumerate(rows)
    ]
    metrics.on_step(sched, events, 0.01)
    metrics.on_step(sched, events[1:2], 0.01)  # (a second step adds to the same series)
    read = metrics.registry.get_sample_value
    per_pos = "fluid_spec_decode_num_accepted_tokens_per_pos_total"
    assert [read(per_pos, {"position": str(p)}) for p in range(3)] == [3.0, 1.0, 1.0]
    assert read("fluid_spec_decode_num_drafts_total") == 4.0
    assert read("fluid_spec_decode_num_draft_tokens_total") == 3 + 2 + 4 + 2
    assert read("fluid_spec_decode_num_accepted_tokens_total") == 4 + 1
    assert read("fluid_generation_tokens_total") == 8 + 2
