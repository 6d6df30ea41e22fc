"""``fluid bench serve``: a load generator for ``fluid serve``, FLUID against ``ar`` in one run.

For each policy (default: ``khead`` when a K-head is given, else ``entropy``, then ``ar``) a
``fluid serve`` process is started with the same flags but ``--policy``; all run at once, idle
while another is loaded. Each is warmed up, then sent the same ``--num-requests`` streamed
requests — prompts taken in turn from the JSONL, arrivals a Poisson process at ``--rate`` per
second (``inf``: all at once), at most ``--concurrency`` in flight — in ``--rounds`` slices that
visit the servers in turn, so a change in the machine's load (a shared box) falls on every policy
alike; then each is drained. ``--url`` loads one running server instead.

Per policy: generated-token throughput (completion tokens ÷ the summed wall time of its slices),
requests/s, TTFT, ITL (gap between successive streamed chunks: with FLUID one chunk holds every
token a step committed), TPOT ((end − first token) ÷ (tokens − 1)) and end-to-end latency at
p50 / p90 / p99, the TPF over all requests (completion tokens ÷ the forwards the server reported),
and failures; from the server's ``/metrics``, the engine's steps, busy share and requests per
step, and where the server's time to first token went (``bench_engine.py``). Across policies:
throughput ÷ ``ar``'s, its four factors (``bench_report.ratio_terms``: TPF, step cost, requests a
step, busy share) and the fraction of outputs identical to ``ar``'s (greedy decoding is
lossless, so every FLUID output should equal AR's; ``--check-lossless`` judges each one that does
not in fp32: ``bench_lossless.py``). The JSON (command, machine, versions, every
figure) is written atomically and a markdown table printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from fluid_npu.errors import ConfigError, DataError, FluidError
from fluid_npu.host import cpu_name, frozen_heap
from fluid_npu.serve.bench_engine import describe, engine_view, scrape
from fluid_npu.serve.bench_lossless import describe as verdict_line
from fluid_npu.serve.bench_lossless import judge, served_ids
from fluid_npu.serve.bench_report import build_report, describe_terms, table
from fluid_npu.serve.launch import ServerProcess

BENCH_KEYS = (
    "model", "adapter", "khead", "url", "policies", "prompts", "json", "num_requests", "rate",
    "concurrency", "max_tokens", "ignore_eos", "chat", "structured_outputs", "warmup", "rounds",
    "seed", "dtype", "device", "max_batch", "gpu_memory_utilization", "max_len", "compile",
    "mask_token",
    "no_adaptive_drafting", "threads", "no_enable_prefix_caching", "prefix_cache_slots",
    "data_parallel_size", "no_engine_process", "check_lossless",
)  # fmt: skip
PERCENTILES = (50, 90, 99)


@dataclass
class ServeBenchSettings:
    prompts: str
    json_path: str
    url: str | None = None
    policies: tuple[str, ...] | None = None
    num_requests: int = 64
    rate: float = math.inf
    concurrency: int = 16
    max_tokens: int = 128
    ignore_eos: bool = False
    chat: bool = False
    structured_outputs: dict[str, Any] | None = None  # sent with every request (vLLM's field)
    warmup: int = 4
    rounds: int = 4
    seed: int = 0
    api_key: str | None = None  # sent as a bearer token; servers started here get it too
    check_lossless: bool = False  # judge outputs that differ from ar's in fp32 (bench_lossless)
    server_args: list[str] = field(default_factory=list)
    command: str = ""

    def check(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise ConfigError("--num-requests, --concurrency and --max-tokens must be at least 1")
        if not self.rate > 0:
            raise ConfigError(f"--rate must be > 0 requests/s (inf: all at once), got {self.rate}")
        if self.warmup < 0 or not 1 <= self.rounds <= self.num_requests:
            raise ConfigError(
                f"--warmup must be >= 0 and --rounds in 1..--num-requests, got {self.warmup}, "
                f"{self.rounds}"
            )
        if self.url is not None and self.policies:
            raise ConfigError("--policies needs servers started here (--model), not --url")
        if self.check_lossless and (self.url is not None or self.structured_outputs is not None):
            raise ConfigError(
                "--check-lossless judges the policies' outputs against ar's on servers started "
                "here (--model), without --structured-outputs (a grammar's masked argmax is not "
                "the model's); leave one of them out"
            )


Prompt = str | dict[str, Any]  # a text, or a chat request's conversation fields


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of a JSONL file: each line's ``prompt`` text, or its ``messages`` (a
    conversation, sent to the chat route; ``fluid generate`` reads the same lines) with its
    ``tools`` (rendered into the prompt; sent with ``tool_choice: "none"``, so any server answers
    in text). Errors name the file and line."""
    from fluid_npu.sampling.prompts import chat_messages, read_prompt_lines

    out: list[Prompt] = []
    for n, row in read_prompt_lines(path):  # (one of prompt / input_ids / messages a line)
        if "messages" in row:
            chat_messages(row["messages"], f"{path}:{n}")  # (checked; sent as the line gives it)
            chat: dict[str, Any] = {"messages": row["messages"]}
            if row.get("tools") is not None:  # (checked by read_prompt_lines)
                chat.update(tools=row["tools"], tool_choice="none")
            out.append(chat)
        elif "input_ids" in row or not isinstance(row.get("prompt"), str):
            raise DataError(
                f'{path}:{n}: fluid bench serve sends text: each line needs "prompt" (text) or '
                '"messages" (a conversation)'
            )
        else:
            out.append(row["prompt"])
    return out


def _pct(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    arr = np.asarray(values) * scale
    return {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}


async def _one(
    client: httpx.AsyncClient, s: ServeBenchSettings, model: str, prompt: Prompt
) -> dict[str, Any]:
    """One streamed request; its timings, text, usage and error (if any)."""
    if isinstance(prompt, dict):  # a conversation: the chat route, --chat or not
        path, body = "/v1/chat/completions", dict(prompt)
    elif s.chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    # greedy (the policies' outputs must then be identical: the OpenAI default is temperature 1);
    # usage in the stream is asked for, as the OpenAI API wants (fluid serve sends it anyway)
    body.update(
        model=model,
        max_tokens=s.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    if s.ignore_eos:  # not an OpenAI field: sent only when asked for (vLLM and fluid serve know it)
        body["ignore_eos"] = True
    if s.structured_outputs is not None:
        body["structured_outputs"] = s.structured_outputs
    if s.check_lossless:  # (vLLM's field: the prompt's ids and each chunk's, bench_lossless.py)
        body["return_token_ids"] = True
    rec: dict[str, Any] = {"chunks": [], "text": "", "usage": None, "error": None, "ids": []}
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    rec["error"] = data["error"]["message"]
                rec["prompt_ids"] = data.get("prompt_token_ids") or rec.get("prompt_ids")
                for choice in data.get("choices", []):
                    rec["prompt_ids"] = choice.get("prompt_token_ids") or rec["prompt_ids"]
                    rec["ids"] += choice.get("token_ids") or []
                    delta = choice.get("delta") or {}  # (a reasoning parser's text counts)
                    piece = choice.get("text") or "".join(
                        delta.get(k) or "" for k in ("reasoning", "content")
                    )
                    if piece:
                        rec["chunks"].append(time.perf_counter() - start)
                        rec["text"] += piece
                    rec["finish_reason"] = choice.get("finish_reason") or rec.get("finish_reason")
                rec["usage"] = data.get("usage") or rec["usage"]
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["e2e"] = time.perf_counter() - start
    if rec["usage"] is None and rec["error"] is None:
        rec["error"] = "the stream ended without usage"
    return rec


async def _load(
    url: str, s: ServeBenchSettings, model: str, jobs: list[tuple[int, Prompt]], seed: int
) -> tuple[list[dict[str, Any]], float]:
    """Send ``jobs`` (index, prompt) with Poisson arrivals; their records and the wall time."""
    limits = httpx.Limits(max_connections=s.concurrency + 4)
    headers = _auth(s)
    async with httpx.AsyncClient(
        base_url=url, timeout=None, limits=limits, headers=headers
    ) as client:
        gate = asyncio.Semaphore(s.concurrency)

        async def send(prompt: Prompt) -> dict[str, Any]:
            async with gate:
                return await _one(client, s, model, prompt)

        rng = random.Random(seed)
        start = time.perf_counter()
        tasks = []
        due = 0.0
        for _, prompt in jobs:
            if math.isfinite(s.rate):
                due += rng.expovariate(s.rate)
                await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send(prompt)))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - start


def summarize(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The figures of one policy's run (see the module docstring)."""
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok)
    forwards = sum(r["usage"].get("forwards", 0) for r in ok)
    ttft = [r["chunks"][0] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tpot = [
        (r["e2e"] - r["chunks"][0]) / (r["usage"]["completion_tokens"] - 1)
        for r in ok
        if r["chunks"] and r["usage"]["completion_tokens"] > 1
    ]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({str(r["error"]) for r in records if r["error"] is not None})[:5],
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in ok),
        "cached_prompt_tokens": sum(
            (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in ok
        ),  # found in a slot's cache (the engine's prefix reuse), not encoded
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "tpf": round(tokens / forwards, 3) if forwards else None,
        "ttft_ms": _pct(ttft),
        "ttft_mean_ms": round(float(np.mean(ttft)) * 1000, 3) if ttft else None,
        "itl_ms": _pct(itl),
        "tpot_ms": _pct(tpot),
        "e2e_ms": _pct([r["e2e"] for r in ok]),
        "texts": [r["text"] if r["error"] is None else None for r in records],
        "ids": served_ids(records),
    }


def _auth(s: ServeBenchSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}


def _served_model(url: str, s: ServeBenchSettings) -> str:
    """The name a server serves (its ``/v1/models``); a refusal is one clear error."""
    try:
        resp = httpx.get(f"{url}/v1/models", timeout=30, headers=_auth(s))
    except httpx.HTTPError as exc:
        hint = (
            "; a server whose certificate no known authority signed: SSL_CERT_FILE=its CA file"
            if "CERTIFICATE_VERIFY_FAILED" in str(exc)
            else ""
        )
        raise ConfigError(f"--url {url}: cannot reach it ({exc}){hint}") from None
    if resp.status_code == 401:
        raise ConfigError(
            f"{url} wants an API key: give it with --api-key or $FLUID_API_KEY"
            + (" (the one given was refused)" if s.api_key else "")
        )
    if resp.status_code != 200:
        raise DataError(f"{url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    return resp.json()["data"][0]["id"]


def _machine(url: str) -> dict[str, Any]:
    """What ran: the server's ``/health`` info (None, with the reason, when it no longer
    answers: a server that died during the load still gets its figures reported)."""
    from fluid_npu.io import versions

    out: dict[str, Any] = {"server": None, "cpu": cpu_name(), "versions": versions()}
    try:
        out["server"] = httpx.get(f"{url}/health", timeout=30).json().get("info", {})
    except (httpx.HTTPError, ValueError) as exc:
        out["server_error"] = f"{type(exc).__name__}: {exc}"
    return out


def server_flag(server_args: list[str], name: str) -> str | None:
    """The value of flag ``name`` among the servers' flags (None: not given)."""
    return server_args[server_args.index(name) + 1] if name in server_args else None


def default_policies(server_args: list[str]) -> tuple[str, ...]:
    """The servers' policies when ``--policies`` is not given: the K-head's (``--khead``, or the
    one a saved model keeps) and ``ar``."""
    from fluid_npu.model.khead import saved_khead

    model = server_flag(server_args, "--model")
    saved = model is not None and saved_khead(model, server_flag(server_args, "--adapter"))
    return ("khead" if "--khead" in server_args or saved else "entropy", "ar")


def split_rounds(jobs: list[Any], rounds: int) -> list[list[Any]]:
    """``jobs`` in ``rounds`` consecutive slices as even as they allow (sizes differ by at most
    one), none empty while there are at least as many jobs as rounds."""
    cuts = [r * len(jobs) // rounds for r in range(rounds + 1)]
    return [jobs[a:b] for a, b in itertools.pairwise(cuts)]


def run_rounds(
    urls: dict[str, str], s: ServeBenchSettings, prompts: list[Prompt]
) -> dict[str, Any]:
    """Warm every server, then load them in turn, ``rounds`` times, and summarise each.

    Every server gets the same requests in the same order and arrival times; interleaving the
    servers round by round spreads a change in the machine's load over all of them alike.
    """
    with frozen_heap():  # (the load generator's own collections would stall every client)
        return _run_rounds(urls, s, prompts)


def _run_rounds(
    urls: dict[str, str], s: ServeBenchSettings, prompts: list[Prompt]
) -> dict[str, Any]:
    models = {n: _served_model(u, s) for n, u in urls.items()}
    warm = [(i, prompts[i % len(prompts)]) for i in range(s.warmup)]
    for name, url in urls.items():
        asyncio.run(_load(url, replace(s, rate=math.inf), models[name], warm, s.seed))
    jobs = [(i, prompts[i % len(prompts)]) for i in range(s.num_requests)]
    slices = split_rounds(jobs, s.rounds)
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in urls}
    walls = dict.fromkeys(urls, 0.0)
    before = {n: scrape(u, _auth(s)) for n, u in urls.items()}  # (after the warm-up's steps)
    load = [round(os.getloadavg()[0], 2)]
    for r in range(s.rounds):
        chunk = slices[r]
        for name, url in urls.items():
            recs, wall = asyncio.run(_load(url, s, models[name], chunk, s.seed + r))
            records[name] += recs
            walls[name] += wall
        load.append(round(os.getloadavg()[0], 2))
    results = {}
    for name, url in urls.items():
        results[name] = summarize(records[name], walls[name])
        results[name]["engine"] = engine_view(before[name], scrape(url, _auth(s)), walls[name])
        # the host's 1-minute load average at the start and after each round: other work on
        # the machine skews timings
        results[name]["machine"] = {**_machine(url), "loadavg_1m": load}
        _print(name, results[name])
    return results


def run_serve_bench(s: ServeBenchSettings) -> dict[str, Any]:
    """Run every policy's load and write the report (see the module docstring)."""
    from fluid_npu.io import write_json_atomic

    s.check()
    prompts = read_prompts(s.prompts)
    if s.url is not None:
        results = run_rounds({"server": s.url.rstrip("/")}, s, prompts)
    else:
        policies = s.policies or default_policies(s.server_args)
        with contextlib.ExitStack() as stack:
            servers = {}
            for policy in policies:
                print(f"bench serve: starting fluid serve --policy {policy}", flush=True)
                env = {"FLUID_API_KEY": s.api_key} if s.api_key else None  # not on the command line
                servers[policy] = stack.enter_context(
                    ServerProcess([*s.server_args, "--policy", policy], env=env)
                )
            results = run_rounds({p: srv.url for p, srv in servers.items()}, s, prompts)
        for policy, srv in servers.items():
            results[policy]["server_exit_status"] = srv.returncode
    ids = {name: r.pop("ids") for name, r in results.items()}
    verdicts, unjudged = {}, None
    if s.check_lossless and "ar" in results:  # (the servers have stopped: the memory is free)
        try:
            verdicts = judge(results, ids, lambda: _fp32_model(s.server_args))
        except FluidError as exc:  # (the figures are still written)
            unjudged = exc
        for name, verdict in verdicts.items():
            results[name]["lossless"] = verdict
            print(verdict_line(name, verdict), flush=True)
    report = build_report(s, results, len(prompts))
    write_json_atomic(s.json_path, report)  # written whatever happened: the figures say what did
    print(table(report))
    for name, terms in report["ratio_terms"].items():
        if (line := describe_terms(name, terms)) is not None:
            print(line)
    print(f"bench serve: wrote {s.json_path}", flush=True)
    bad = {n: r["server_exit_status"] for n, r in results.items() if r.get("server_exit_status")}
    if bad:
        raise DataError(
            f"fluid serve exited with a non-zero status after the drain: {bad} (the report was "
            f"written to {s.json_path}; the server's own output says why)"
        )
    if unjudged is not None:
        raise ConfigError(
            f"--check-lossless could not score the outputs that differ: {unjudged} (the report, "
            f"{s.json_path}, was written without its verdict)"
        )
    wrong = {n: v["mismatches"] for n, v in verdicts.items() if v["mismatches"]}
    if wrong:
        raise DataError(
            f"outputs differ from ar's where fp32 sees no near-tie: {wrong} (not lossless; the "
            f"report, {s.json_path}, lists them under results.<policy>.lossless)"
        )
    return report


def _fp32_model(server_args: list[str]) -> Any:
    """The servers' model (with its adapter) in float32 on the servers' device, to score."""
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.prompts import quiet_loading

    def flag(name: str) -> str | None:
        return server_flag(server_args, name)

    device = flag("--device")
    where = {"device_map": "auto"} if device in (None, "auto") else {"device": device}
    with quiet_loading():
        fluid = FluidForCausalLM.from_pretrained(
            flag("--model"), flag("--adapter"), dtype="float32", mask_token=flag("--mask-token"),
            trust_remote_code="--trust-remote-code" in server_args, **where,
        )  # fmt: skip
    return fluid.model


def _print(name: str, r: dict[str, Any]) -> None:
    print(
        f"bench serve: {name}: {r['output_tokens_per_s']:.1f} tok/s, TPF {r['tpf']}, TTFT p50 "
        f"{r['ttft_ms']['p50']} ms, ITL p50 {r['itl_ms']['p50']} ms, {r['failed']} failed; "
        f"{describe(r.get('engine'))}",
        flush=True,
    )
