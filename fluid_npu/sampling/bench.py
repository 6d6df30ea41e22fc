"""``fluid bench sampler``: TPF and speed of every policy × loop against transformers' ``generate``.

For each batch size (default 1 and 8) the prompts are decoded in batches, first by transformers'
greedy ``generate`` (the baseline, timed in the same run; and with its static cache, which it
compiles where it auto-compiles), then by the sampler — the decode engine keeping that many
requests in flight, refilling slots as rows finish — for every policy
(``ar``, ``fixed:4``, ``fixed:8``, ``entropy``, and ``khead`` when a K-head is given) and loop
(``fused``, ``reference``). Each row reports TPF and tokens/s, both also as ratios to the baseline,
and the losslessness check of its tokens against the baseline's (``lossless.compare``: mismatches
and tolerated numerical ties). Every configuration is warmed up once before any is timed, then
timed in ``repeats`` interleaved rounds (each round runs the baseline and every row once; each
keeps its best time), so a drifting machine reaches the baseline and the rows alike; the engine
keeps its draft budget (measured step costs and acceptance) from the warm-up on, as a
long-lived engine would. Each fused row also counts the work its forwards did
(``computed_tokens``, ``computed_per_token`` per committed token) and, from the engine's fitted
step cost, the ``speedup_ceiling`` that per-token compute alone allows (``compute_bound``).

Top-level keys: ``best_lossless_tpf`` (the largest TPF among rows without a mismatch; None when
no row is lossless), ``speedup_vs_generate`` (= ``speedup_by_batch``: per batch size, the best
tokens/s ratio among those rows) and its ``speedup_b1`` / ``speedup_b8`` entries,
``overhead_efficiency`` (per batch size, the fastest lossless *drafting* row's — TPF above 1,
so not ``ar``'s — speedup over ``generate`` ÷ its TPF; the speedup holds the engine's own lead
at TPF 1 too, so where the budget barely drafts, e.g. TPF 1.01 at batch 32, it passes 1) and
``overhead_efficiency_vs_ar`` (that row's speedup over the engine's own ``ar`` row in the same
loop ÷ its TPF: how much of the TPF the engine turns into speed; None without an ``ar`` row),
``mismatches`` and ``ties`` (totals over the rows), ``dtype``, the command, the device the
model ran on (type, index, name), the baseline figures and every row (with its
``exact_match_rate``: rows token-identical to ``generate`` in the same dtype). The JSON is
written atomically and a markdown table is printed. Settings are checked (one ``ConfigError``
each) before the model is loaded; ``settings.device`` is ``auto`` (the
``fluid_npu.device.current()`` choice) or a device type to force.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_npu.io import check_output_file
from fluid_npu.sampling.bench_report import (
    bench_row,
    build_report,
    compute_bound,
    print_row,
    table,
)
from fluid_npu.sampling.lossless import compare, exact_match_rate, fp32_scorer, hf_greedy
from fluid_npu.sampling.policies import HorizonError, block_bound, parse_policy
from fluid_npu.sampling.prompts import encode_prompt, left_pad, quiet_loading, read_prompt_lines
from fluid_npu.sampling.stats import GenerateStats

DEFAULT_POLICIES = ("ar", "fixed:4", "fixed:8", "entropy")


@dataclass
class BenchSettings:
    model: str
    prompts: str
    json_path: str
    adapter: str | None = None
    khead: str | None = None
    max_new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    policies: tuple[str, ...] | None = None
    loops: tuple[str, ...] = ("fused", "reference")
    chat: bool = False
    chat_template: str | None = None  # a Jinja template replacing the tokenizer's (its text)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # the chat template's variables
    mask_token: str | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    repeats: int = 2  # interleaved timed rounds (``_Runner.timed``)
    device: str = "auto"
    dtype: str = "auto"
    static_baseline: bool = True
    trust_remote_code: bool = False  # the model directory's own code (openPangu's tokenizer)


def check_settings(s: BenchSettings) -> torch.device:
    """Every setting that needs no model, one ``ConfigError`` each; returns the device to use."""
    from fluid_npu.sampling.api import LOOPS

    bad_loops = [loop for loop in s.loops if loop not in LOOPS]
    if not s.loops or bad_loops:
        raise ConfigError(
            f"--loops takes a comma-separated subset of {','.join(LOOPS)}, "
            f"got {','.join(s.loops)!r}"
        )
    if s.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {s.repeats}")
    for flag, given in (("--policies", s.policies or ()), ("--loops", s.loops)):
        twice = sorted({x for x in given if list(given).count(x) > 1})
        if twice:
            raise ConfigError(f"{flag} names {', '.join(twice)} more than once; list each once")
    sizes = s.batch_sizes
    if not sizes or not all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes
    ):
        raise ConfigError(f"batch sizes must be positive integers like 1,8, got {sizes!r}")
    if s.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {s.max_new_tokens}")
    from fluid_npu.sampling.inputs import parse_dtype

    parse_dtype(s.dtype)
    check_output_file(s.json_path, "--json")  # before the runs, not after them
    return devices.claim(force=s.device)


def split_batches(items: list[list[int]], size: int) -> list[list[list[int]]]:
    """``items`` in consecutive batches of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_batches(
    fluid: Any,
    batches: list[list[list[int]]],
    policy: str,
    loop: str,
    max_new_tokens: int,
    pad: int,
    gen_kwargs: dict[str, Any] | None = None,
) -> tuple[list[list[int]], list[GenerateStats]]:
    """The sampler on prompts grouped in batches (``fluid``: a ``FluidForCausalLM``, on its device;
    the fused loop continues from its draft budgets): new tokens per prompt.

    The fused loop runs every prompt through one decode engine with ``len(batches[0])`` slots,
    each refilled as soon as its row finishes (one ``GenerateStats``); the reference loop decodes
    each left-padded batch in turn (one ``GenerateStats`` per batch). ``gen_kwargs`` may carry
    ``stop_strings`` (on the fused loop decoding of a row ends at one, ``fluid``'s tokenizer reading
    the text; the reference loop has no stops and decodes on, for the caller to cut) and the other
    sampling keywords of ``generate``.
    """
    from fluid_npu.sampling.api import generate

    kwargs = dict(gen_kwargs or {})
    if loop != "fused":
        kwargs.pop("stop_strings", None)
    if kwargs.get("stop_strings"):
        kwargs.setdefault("tokenizer", fluid.tokenizer)
    if loop == "fused" and batches:
        engine = {**kwargs.get("engine_kwargs", {}), "max_batch": len(batches[0])}
        kwargs = fluid.engine_kwargs({**kwargs, "engine_kwargs": engine})  # + its draft budgets
        batches = [[p for b in batches for p in b]]
    new, stats = [], []
    for b in batches:
        ids, mask = left_pad(b, pad)
        out = generate(
            fluid.model,
            fluid.mask_id,
            ids.to(fluid.device),
            mask.to(fluid.device),
            policy=policy,
            loop=loop,
            max_new_tokens=max_new_tokens,
            khead=fluid.khead,
            **kwargs,
        )
        new += out.new_tokens
        stats.append(out.stats)
    return new, stats


class _Runner:
    """Decodes the prompts in batches with transformers or the sampler, timed."""

    def __init__(self, fluid: Any, s: BenchSettings, eos_ids: list[int], pad: int) -> None:
        self.fluid, self.s, self.eos_ids, self.pad = fluid, s, eos_ids, pad

    def _inputs(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(batch, self.pad)
        return ids.to(self.fluid.device), mask.to(self.fluid.device)

    def hf(self, batches: list[list[list[int]]], cache: str | None = None) -> list[list[int]]:
        out: list[list[int]] = []
        for b in batches:
            ids, mask = self._inputs(b)
            out += hf_greedy(
                self.fluid.model, ids, mask, self.s.max_new_tokens, self.eos_ids, self.pad, cache
            )
        return out

    def ours(self, batches: list[list[list[int]]], policy: str, loop: str) -> tuple[list, list]:
        return decode_batches(
            self.fluid, batches, policy, loop, self.s.max_new_tokens, self.pad, self.s.gen_kwargs
        )

    def timed(self, runs: dict[Any, Any], batches: list[list[list[int]]]) -> dict[Any, Any]:
        """Each of ``runs`` (name -> a function of the batches) warmed up on the first batch, then
        ``repeats`` rounds in which every one decodes all ``batches`` in turn: name -> (the output
        of its fastest round, that round's wall time). Interleaved, so the machine's drift over a
        run (a shared host's neighbours, clocks, the process's own first passes) reaches every
        configuration and its baseline alike, instead of whichever one was timed first or last.
        The output is the fastest round's because an engine's draft budget changes what it does
        from round to round: the TPF and work counts a row reports are those of the time it
        reports."""
        for fn in runs.values():
            fn(batches[:1])
        best = dict.fromkeys(runs, float("inf"))
        out: dict[Any, Any] = {}
        for _ in range(self.s.repeats):
            for name, fn in runs.items():
                devices.synchronize(self.fluid.device)
                start = time.perf_counter()
                got = fn(batches)
                devices.synchronize(self.fluid.device)
                took = time.perf_counter() - start
                if took < best[name] or name not in out:
                    best[name], out[name] = took, got
        return {name: (out[name], best[name]) for name in runs}


def run_sampler_bench(s: BenchSettings) -> dict[str, Any]:
    """Run the benchmark described by ``s``; returns (and writes) the report."""
    from fluid_npu.io import versions, write_json_atomic
    from fluid_npu.sampling.inputs import eos_and_pad, parse_dtype
    from fluid_npu.sampling.pretrained import FluidForCausalLM

    dev = check_settings(s)
    lines = read_prompt_lines(s.prompts)
    with quiet_loading():
        fluid = FluidForCausalLM.from_pretrained(
            s.model,
            s.adapter,
            s.khead,
            mask_token=s.mask_token,
            device=dev,
            dtype=parse_dtype(s.dtype),
            chat_template=s.chat_template,
            trust_remote_code=s.trust_remote_code,
        )
    model, tok = fluid.model, fluid.tokenizer
    where = s.prompts
    prompts = [
        encode_prompt(
            tok, r, chat=s.chat, where=f"{where}:{n}", template_kwargs=s.template_kwargs
        ).ids
        for n, r in lines
    ]
    eos_ids, pad = eos_and_pad(model, pad=tok.pad_token_id)
    policies = _policies(s, fluid)
    run = _Runner(fluid, s, eos_ids, pad)
    scorer = fp32_scorer(model)  # one fp32 copy (if any) for every row's check

    baseline: dict[int, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for bs in s.batch_sizes:
        batches = split_batches(prompts, bs)
        runs: dict[Any, Any] = {"generate": run.hf}
        if s.static_baseline:
            runs["static"] = lambda b: run.hf(b, "static")
        for loop in s.loops:
            for pol in policies:
                runs[loop, pol] = lambda b, pol=pol, loop=loop: run.ours(b, pol, loop)
        timed = run.timed(runs, batches)
        ref, hf_s = timed["generate"]
        n_ref = sum(len(t) for t in ref)
        baseline[bs] = {"tokens": n_ref, "wall_s": hf_s, "tokens_per_s": n_ref / hf_s, "tpf": 1.0}
        if s.static_baseline:
            static, st_s = timed["static"]
            baseline[bs]["static_cache"] = {
                "wall_s": st_s,
                "tokens_per_s": sum(len(t) for t in static) / st_s,
                "compiled": hasattr(model, "_compiled_call"),  # transformers auto-compiled it
                "exact_match_rate": exact_match_rate(static, ref),
            }
        for loop in s.loops:
            for pol in policies:
                (new, stats), wall = timed[loop, pol]
                diffs = compare(model, prompts, new, ref, scorer=scorer)
                rows.append(bench_row(bs, pol, loop, new, stats, wall, baseline[bs], diffs))
                rows[-1]["exact_match_rate"] = exact_match_rate(new, ref)
                if loop == "fused":
                    rows[-1].update(compute_bound(fluid, rows[-1], hf_s))
                print_row(rows[-1])
    dtype = next(model.parameters()).dtype
    report = build_report(s, rows, baseline, len(prompts), versions(), fluid.device, dtype)
    write_json_atomic(s.json_path, report)
    print(table(rows))
    best = report["best_lossless_tpf"]
    print(
        f"best_lossless_tpf={'none' if best is None else f'{best:.2f}'} "
        f"speedup_by_batch={report['speedup_by_batch']} -> {s.json_path}"
    )
    return report


def _policies(s: BenchSettings, fluid: Any) -> list[str]:
    """The policies to run: the user's (all must be valid) or the defaults that fit ``k_max``."""
    k_max = block_bound(s.gen_kwargs.get("k_max"), fluid.khead)
    has_khead = fluid.khead is not None
    if s.policies:
        for p in s.policies:
            parse_policy(p, k_max=k_max, has_khead=has_khead)  # a HorizonError names the bad one
        return list(s.policies)
    chosen = []
    for p in (*DEFAULT_POLICIES, *(("khead",) if has_khead else ())):
        try:
            parse_policy(p, k_max=k_max, has_khead=has_khead)
        except HorizonError as exc:
            print(f"bench: skipping {p}: {exc}")
            continue
        chosen.append(p)
    return chosen
