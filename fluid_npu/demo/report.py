"""The demo's results on disk: ``summary.json``, ``report.md`` and the plots.

``write_report(out, order, seconds, wall, command)`` reads what the stages left under ``out`` (the
base model's pretraining log, the Stage I / control / Stage II ``run.json`` files, the three
evaluations and the sampler benchmark; each once) and writes:

* ``summary.json`` — ``base_acc``, ``stage1_ar_acc``, ``scratch_acc``, ``best_tpf`` (the largest
  TPF among the FLUID model's policies whose outputs are all identical to AR), ``speedup_b1``
  (batch-1 tokens/s ÷ transformers ``generate`` of the fastest lossless policy), ``minutes`` (the
  whole pipeline: the sum of every stage's time when it ran; None when a stage's time is unknown)
  and each goal of the demo with its figure and whether it is met;
* ``plots/loss_curves.png`` (pretraining, Stage I and the control, Stage II) and
  ``plots/accuracy_tpf.png`` (every model and policy); the evaluation's own K histogram
  (``eval/fluid_k_hist.png``) and Stage II's K-head report (``stage2/khead_report.png``);
* ``report.md`` — the tables and plots, with the commands that reproduce them.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from fluid_npu.eval.lossless_rule import is_lossless, not_lossless
from fluid_npu.eval.report import pyplot, save_figure
from fluid_npu.eval.runner import BASELINE
from fluid_npu.io import write_json_atomic, write_text_atomic

# name: (goal text, test on the summary)
GOALS: dict[str, tuple[str, Any]] = {
    "base_acc": ("≥ 0.80", lambda s: s["base_acc"] >= 0.80),
    "stage1_ar_acc": ("≥ base_acc − 0.01", lambda s: s["stage1_ar_acc"] >= s["base_acc"] - 0.01),
    "best_tpf": ("≥ 5.0, identical to AR", lambda s: (s["best_tpf"] or 0.0) >= 5.0),
    "speedup_b1": ("≥ 3.0 vs transformers generate", lambda s: (s["speedup_b1"] or 0.0) >= 3.0),
    "minutes": ("≤ 15 after set-up", lambda s: s["minutes"] is not None and s["minutes"] <= 15.0),
    # "clearly": a gap of at least 0.10, over three standard errors of a 300-problem accuracy
    "scratch_acc": (
        "≤ stage1_ar_acc − 0.10",
        lambda s: s["scratch_acc"] <= s["stage1_ar_acc"] - 0.10,
    ),
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_results(out: Path) -> dict[str, Any]:
    """What the stages left under ``out``, read once: ``evals`` (base / fluid / scratch), ``bench``
    and ``stage2`` (its ``run.json``)."""
    return {
        "evals": {n: _load(out / "eval" / f"{n}.json") for n in ("base", "fluid", "scratch")},
        "bench": _load(out / "bench" / "sampler.json"),
        "stage2": _load(out / "stage2" / "run.json"),
    }


def summarize(
    results: dict[str, Any], order: list[str], seconds: dict[str, float]
) -> dict[str, Any]:
    """The summary figures and goals from ``load_results`` and the stage times."""
    evals, bench = results["evals"], results["bench"]
    fluid = evals["fluid"]["results"]
    lossless = {p: r for p, r in fluid.items() if p != BASELINE and is_lossless(r)}
    best = max(lossless, key=lambda p: lossless[p]["tpf"], default=None)
    summary: dict[str, Any] = {
        "base_acc": evals["base"]["results"]["ar"]["accuracy"],
        "stage1_ar_acc": fluid["ar"]["accuracy"],
        "scratch_acc": evals["scratch"]["results"]["ar"]["accuracy"],
        "best_tpf": None if best is None else lossless[best]["tpf"],
        "best_tpf_policy": best,
        "speedup_b1": bench["speedup_by_batch"].get("1"),
        "minutes": (
            round(sum(seconds[n] for n in order) / 60, 2)
            if all(n in seconds for n in order)
            else None
        ),
        "eval_problems": evals["fluid"]["n"],
        "bench_prompts": bench["n_prompts"],
        "lossless": not not_lossless(evals["fluid"]) and bench["mismatches"] == 0,
    }
    summary["goals"] = {
        name: {"value": summary[name], "goal": text, "met": bool(test(summary))}
        for name, (text, test) in GOALS.items()
    }
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _curves(out: Path) -> dict[str, dict[str, list[float]]]:
    curves = {"base (AR pretraining)": _load(out / "base" / "pretrain_log.json")}
    for name, path in (
        ("Stage I", out / "stage1"),
        ("control (random init)", out / "scratch" / "stage1"),
        ("Stage II (K-head)", out / "stage2"),
    ):
        log = [e for e in _load(path / "run.json").get("log_history", []) if "loss" in e]
        curves[name] = {
            key: [e.get(key) for e in log] for key in ("step", "loss", "loss_ar", "loss_diff")
        }
    return curves


def plot_losses(out: Path, path: Path) -> Path | None:
    """Loss curves of every training stage, one panel each."""
    plt = pyplot("loss-curve")
    if plt is None:
        return None
    curves = _curves(out)
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, (name, c) in zip(axes, curves.items()):
        for key, label in (("loss", "loss"), ("loss_ar", "AR"), ("loss_diff", "slots")):
            values = [(s, v) for s, v in zip(c["step"], c.get(key) or []) if v is not None]
            if values:
                ax.plot(*zip(*values), label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats, log scale)")
    return save_figure(plt, fig, path)


def plot_accuracy_tpf(evals: dict[str, Any], path: Path) -> Path | None:
    """Held-out accuracy against TPF: the base, the control and every FLUID policy."""
    plt = pyplot("accuracy-vs-TPF")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, marker in (("base", "s"), ("scratch", "x"), ("fluid", "o")):
        result = evals[name]
        for policy, r in ((p, result["results"][p]) for p in result["policies"]):
            label = {"base": "base (AR)", "scratch": "control (AR)"}.get(name, f"FLUID {policy}")
            ax.scatter(r["tpf"], r["accuracy"], marker=marker, s=60, label=label)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(plt, fig, path)


def _markdown(
    results: dict[str, Any],
    summary: dict[str, Any],
    seconds: dict[str, float],
    wall: float,
    command: str,
) -> str:
    fluid, bench, stage2 = results["evals"]["fluid"], results["bench"], results["stage2"]
    goals = [
        [name, g["value"], g["goal"], "yes" if g["met"] else "**no**"]
        for name, g in summary["goals"].items()
    ]
    accuracy = []
    for name, label in (
        ("base", "base"),
        ("fluid", "FLUID (Stage I + II)"),
        ("scratch", "control"),
    ):
        result = results["evals"][name]
        for policy, r in ((p, result["results"][p]) for p in result["policies"]):
            accuracy.append(
                [label, policy, r["accuracy"], r["tpf"], r["tokens_per_s"], r["identical_to_ar"]]
            )
    rows = bench["rows"]
    bench_rows = [["transformers generate", 1.0, bench["baseline"]["1"]["tokens_per_s"], 1.0, "–"]]
    bench_rows += [
        [r["policy"], r["tpf"], r["tokens_per_s"], r["speedup"], "yes" if r["lossless"] else "no"]
        for r in rows
    ]
    khead = [
        ["K-head", *_head(stage2, "khead")],
        [f"best constant (K = {stage2.get('const_k')}, the labels' mode)", *_head(stage2, "const")],
    ]
    example = fluid["samples"][0]
    parts = [
        "# FLUID CPU demo report",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.processor() or platform.machine()}, device {fluid['device'].get('type')}. "
        f"Held-out problems: {summary['eval_problems']}; sampler benchmark: "
        f"{summary['bench_prompts']} prompts, batch 1, greedy, "
        f"{bench['max_new_tokens']} new tokens at most.",
        "## Goals",
        _table(["figure", "value", "goal", "met"], goals),
        "## Stages",
        _table(
            ["stage", "seconds"],
            [[k, round(v)] for k, v in seconds.items()] + [["total", round(sum(seconds.values()))]],
        ),
        f"This run took {wall / 60:.1f} min (finished stages are reused).",
        "## Accuracy at a speed (held-out problems, `fluid_npu.eval`)",
        _table(["model", "policy", "accuracy", "TPF", "tokens/s", "identical to AR"], accuracy),
        "![accuracy vs TPF](plots/accuracy_tpf.png)",
        "## Sampler vs transformers `generate` (batch 1, `fluid bench sampler`)",
        _table(["decoder", "TPF", "tokens/s", "speedup", "lossless"], bench_rows),
        "## K-head (Stage II, held-out anchors)",
        _table(["predictor", "exact", "within ±1", "mean abs error"], khead),
        "![K chosen per step](eval/fluid_k_hist.png) ![K-head report](stage2/khead_report.png)",
        "## Training",
        "![loss curves](plots/loss_curves.png)",
        "## Example (first held-out problem, greedy AR = every lossless policy)",
        f"> {example['question']}\n\n```\n{example['outputs']['ar'].get('text', '')}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def _head(stage2: dict[str, Any], who: str) -> list[Any]:
    return [
        stage2.get(f"{who}_exact_acc"),
        stage2.get(f"{who}_within1_acc"),
        stage2.get(f"{who}_mae"),
    ]


def write_report(
    out: Path, order: list[str], seconds: dict[str, float], wall: float, command: str
) -> dict[str, Any]:
    """Write ``summary.json``, the plots and ``report.md`` under ``out``; returns the summary.

    ``order``: the stage names in pipeline order; ``seconds``: each one's time when it ran;
    ``wall``: this run's time; ``command``: how the demo was started.
    """
    results = load_results(out)
    summary = summarize(results, order, seconds)
    write_json_atomic(out / "summary.json", summary)
    plot_losses(out, out / "plots" / "loss_curves.png")
    plot_accuracy_tpf(results["evals"], out / "plots" / "accuracy_tpf.png")
    timed = {name: seconds[name] for name in order if name in seconds}
    write_text_atomic(out / "report.md", [_markdown(results, summary, timed, wall, command)])
    return summary
