"""``fluid bench serve``'s ``ratio_terms``: a FLUID policy's throughput over ``ar``'s split into
TPF, step cost, requests a step and busy share — factors whose product is the measured ratio, so a
reader knows which one to work on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluid_npu.serve.bench_report import build_report, describe_terms, ratio_terms

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
KEYS = ("num_requests", "rate", "concurrency", "max_tokens", "ignore_eos", "chat", "warmup")
QUIET = {"p50": None, "p90": None, "p99": None}


def _result(tpf: float, rows: float, step_ms: float, busy: float, failed: int = 0) -> dict:
    """A policy's figures that obey the engine's arithmetic: tokens/s = TPF × rows ÷ step × busy."""
    engine = {"steps": 100, "step_ms": step_ms, "busy_share": busy, "requests_per_step": rows,
              "engine_cpu_share": 1.0}  # fmt: skip
    return {"output_tokens_per_s": tpf * rows / (step_ms / 1000) * busy, "texts": ["x"],
            "failed": failed, "tpf": tpf, "ttft_ms": QUIET, "itl_ms": QUIET, "tpot_ms": QUIET,
            "engine": engine}  # fmt: skip


def _settings() -> SimpleNamespace:
    return SimpleNamespace(
        command="c", prompts="p", server_args=[], rounds=1, seed=0, **{k: 0 for k in KEYS}
    )


def test_the_terms_multiply_to_the_ratio_and_name_each_factor():
    report = build_report(
        _settings(),
        {"entropy:2": _result(8.0, 9.0, 12.0, 0.9), "ar": _result(1.0, 12.0, 5.0, 0.95)},
        4,
    )
    terms = report["ratio_terms"]["entropy:2"]
    measured = report["throughput_vs_ar"]["entropy:2"]
    assert terms == {"tpf": 8.0, "step_cost": pytest.approx(5 / 12, abs=1e-3), "occupancy": 0.75,
                     "busy": pytest.approx(0.9 / 0.95, abs=1e-3),
                     "product": pytest.approx(measured, abs=1e-3)}  # fmt: skip
    line = describe_terms("entropy:2", terms)
    assert line is not None and "2.37× = TPF ×8.00 · step cost ×0.42" in line
    assert "requests a step ×0.75 · busy ×0.95" in line


def test_no_terms_without_the_engines_figures_or_with_failed_requests():
    ar = _result(1.0, 12.0, 5.0, 0.95)
    blind = {**_result(8.0, 9.0, 12.0, 0.9), "engine": None}  # a server without fluid_step_*
    assert ratio_terms(blind, ar) is None
    assert ratio_terms(_result(8.0, 9.0, 12.0, 0.9, failed=1), ar) is None
    no_rows = _result(8.0, 9.0, 12.0, 0.9)
    no_rows["engine"]["requests_per_step"] = None
    assert ratio_terms(no_rows, ar) is None
    assert describe_terms("khead", None) is None
    report = build_report(_settings(), {"khead": blind, "ar": ar}, 4)
    assert report["ratio_terms"] == {"khead": None}


def _kept_runs() -> list[str]:
    """The kept ``fluid bench serve`` reports whose every policy has the engine's figures."""
    names = []
    for path in sorted(BENCHMARKS.glob("serve*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        results = report.get("results", {})
        if "ar" in results and all(r.get("engine") for r in results.values()):
            names.append(path.name)
    return names


def test_kept_runs_with_engine_figures_include_the_h200_s_and_this_cpu_s():
    assert {"serve_gpu_h200_c16_process.json", "serve_demo_c16_engine_process.json"} <= set(
        _kept_runs()
    )


@pytest.mark.parametrize("name", _kept_runs())
def test_the_terms_of_measured_runs_give_their_measured_ratios(name):
    """On every run kept in ``benchmarks/`` with the engine's figures (an H200's and this CPU's)
    the product is the ratio the run measured, to its rounding: the four factors account for all
    of it."""
    report = json.loads((BENCHMARKS / name).read_text(encoding="utf-8"))
    results = report["results"]
    for policy, measured in report["throughput_vs_ar"].items():
        terms = ratio_terms(results[policy], results["ar"])
        assert terms is not None and terms["product"] == pytest.approx(measured, abs=0.005)
