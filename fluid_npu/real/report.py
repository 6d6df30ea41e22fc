"""The real run's results: ``summary.json``, ``report.md`` and the plots.

``summary.json`` holds ``figures`` — gold NLL of the base and of the Stage I AR path and their
ratio, accuracies, the best lossless FLUID TPF and its ratio to prompt lookup's, the fastest
lossless FLUID decoder's tokens/s over ``generate``'s, whether every FLUID policy equalled
``generate`` token for token, the MASK token of Stage I, Stage II and the sampler — each goal of
the issue with its figure and whether it is met, the stage times and the machine. ``report.md``
shows them as tables with the plots: Stage I / II loss curves, TPF against Stage I steps (the
trend when a budget is too small for a goal) and TPF / speed per decoder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fluid_npu.eval.report import pyplot, save_figure
from fluid_npu.host import cpu_name
from fluid_npu.io import versions, write_json_atomic, write_text_atomic
from fluid_npu.real.measure import ALWAYS

GOALS: dict[str, tuple[str, Any]] = {
    "nll_ratio": ("≤ 1.02 (Stage I AR ÷ base, gold solutions)", lambda v: v <= 1.02),
    "lossless": ("every FLUID policy = generate", lambda v: v is True),
    "best_tpf": ("≥ 2.5", lambda v: v >= 2.5),
    "tpf_vs_prompt_lookup": ("≥ 2.0", lambda v: v >= 2.0),
    "speed_vs_generate": ("≥ 1.5 (tokens/s, batch 1)", lambda v: v >= 1.5),
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def machine() -> dict[str, Any]:
    """The CPU's model name, its cores and torch's threads (the figures depend on them)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def summarize(out: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """The figures and goals from what the stages left under ``out``."""
    nll, decode = _load(out / "eval" / "nll.json"), _load(out / "eval" / "decode.json")
    s1, s2 = _load(out / "stage1" / "run.json"), _load(out / "stage2" / "run.json")
    dec = decode["decoders"]
    fluid = {n: r for n, r in dec.items() if n.startswith("fluid ")}
    exact = {n: r for n, r in fluid.items() if r["identical_to_generate"] == 1.0}
    best = max(exact, key=lambda n: exact[n]["tpf"], default=None)
    fastest = max(exact, key=lambda n: exact[n]["tokens_per_s"], default=None)
    masks = {
        "stage1": s1["mask_token"]["token"],
        "stage2": s2["mask_token"]["token"],
        "sampler": decode["mask_token"]["token"],
    }
    figures: dict[str, Any] = {
        "base_nll": nll["base"]["nll"],
        "stage1_nll": nll["stage1"]["nll"],
        "nll_ratio": nll["stage1"]["nll"] / nll["base"]["nll"],
        "nll_rows": nll["base"]["rows"],
        "base_acc": dec["base generate"]["accuracy"],
        "stage1_acc": dec["generate"]["accuracy"],
        "eval_problems": decode["n"],
        "lossless": len(exact) == len(fluid),
        "best_tpf": exact[best]["tpf"] if best else 0.0,
        "best_tpf_policy": best,
        "prompt_lookup_tpf": dec["prompt_lookup"]["tpf"],
        "speed_vs_generate": exact[fastest]["speed_vs_generate"] if fastest else 0.0,
        "fastest_policy": fastest,
        "prompt_lookup_speed_vs_generate": dec["prompt_lookup"]["speed_vs_generate"],
        "stage1_steps": s1["global_step"],
        "stage2_steps": s2["global_step"],
        "mask_token": masks,
        "mask_token_same": len(set(masks.values())) == 1,
    }
    pl = figures["prompt_lookup_tpf"]
    figures["tpf_vs_prompt_lookup"] = figures["best_tpf"] / pl if pl else 0.0
    goals = {
        name: {"value": figures[name], "goal": text, "met": bool(test(figures[name]))}
        for name, (text, test) in GOALS.items()
    }
    return {
        "figures": figures,
        "goals": goals,
        "stage_seconds": seconds,
        "stage_order": [[k, v] for k, v in seconds.items()],  # the keys above are sorted
        "minutes": round(sum(seconds.values()) / 60, 1),
        "machine": machine(),
        "versions": versions(),
    }


def plot_losses(out: Path, path: Path) -> Path | None:
    """Stage I (AR and slot losses) and Stage II loss curves."""
    plt = pyplot("loss-curve")
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, (name, stage) in zip(axes, (("Stage I", "stage1"), ("Stage II (K-head)", "stage2"))):
        log = [e for e in _load(out / stage / "run.json").get("log_history", []) if "loss" in e]
        for key, label in (("loss", "loss"), ("loss_ar", "AR"), ("loss_diff", "slots")):
            pts = [(e["step"], e[key]) for e in log if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats)")
    return save_figure(plt, fig, path)


def plot_curve(curve: dict[str, Any], path: Path, prompt_lookup_tpf: float) -> Path | None:
    """FLUID TPF against Stage I steps, one line per policy, with the two TPF goals."""
    plt = pyplot("TPF-vs-steps")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [p["step"] for p in curve["points"]]
    for policy in curve["policies"]:
        ax.plot(steps, [p[policy] for p in curve["points"]], marker="o", label=f"FLUID {policy}")
    ax.axhline(2.5, color="grey", linestyle="--", linewidth=1, label="goal: TPF 2.5")
    ax.axhline(
        2 * prompt_lookup_tpf, color="grey", linestyle=":", linewidth=1,
        label=f"goal: 2 × prompt lookup ({2 * prompt_lookup_tpf:.2f})",
    )  # fmt: skip
    ax.set_xlabel("Stage I steps")
    ax.set_ylabel("tokens per forward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def plot_decoders(decode: dict[str, Any], path: Path) -> Path | None:
    """TPF and tokens/s ÷ generate per decoder (Stage I model, batch 1)."""
    plt = pyplot("decoders")
    if plt is None:
        return None
    names = [n for n in decode["order"] if n != "base generate"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, label in (
        (axes[0], "tpf", "tokens per forward"),
        (axes[1], "speed_vs_generate", "tokens/s ÷ generate"),
    ):
        ax.bar(range(len(names)), [decode["decoders"][n][key] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(plt, fig, path)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(out: Path, summary: dict[str, Any], wall: float, command: str) -> str:
    f, m = summary["figures"], summary["machine"]
    decode, curve = _load(out / "eval" / "decode.json"), _load(out / "eval" / "curve.json")
    prep = _load(out / "prepare.json") if (out / "prepare.json").is_file() else {}
    goals = [[n, g["value"], g["goal"], g["met"]] for n, g in summary["goals"].items()]
    order = ["base generate", *(n for n in decode["order"] if n != "base generate")]
    decoders = [
        [n, r["accuracy"], r["tpf"], r["tokens_per_s"], r["speed_vs_generate"],
         r["identical_to_generate"] if n != "base generate" else None]
        for n, r in ((n, decode["decoders"][n]) for n in order)
    ]  # fmt: skip
    points = [[p["step"], *(p[q] for q in curve["policies"])] for p in curve["points"]]
    sample = decode["samples"][0]
    # what the files say they measured (a run directory from an older build has neither)
    always = ""
    if any(n.endswith(ALWAYS) for n in decode["order"]):
        always = (
            " A FLUID policy runs as the engine does by default (its draft budget decodes as AR "
            "where drafts do not pay on this machine) and `always drafting` (the budget off: TPF "
            "shows what the slots can draft)."
        )
    budget_off = ""
    if curve.get("adaptive") is False:
        budget_off = "; the draft budget is off (every step drafts), so the curve shows what the "
        budget_off += "slots can draft"
    parts = [
        "# FLUID on SmolLM2-135M-Instruct and real GSM8K problems",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}; {m['cpu']} ({m['cores']} cores, "
        f"{m['torch_threads']} torch threads); model {prep.get('model', {}).get('package', '?')} "
        f"(GGUF → HF, max logit difference {prep.get('model', {}).get('max_logit_diff', '?')}); "
        f"problems {prep.get('problems', {}).get('package', '?')}. MASK token: "
        f"{', '.join(f'{k} `{v}`' for k, v in f['mask_token'].items())} (the same: "
        f"{_fmt(f['mask_token_same'])}).",
        "## Goals",
        _table(["figure", "value", "goal", "met"], goals),
        "## Gold-solution NLL (teacher forced, nats per token)",
        _table(
            ["model", "NLL", "problems"],
            [
                ["base", f["base_nll"], f["nll_rows"]],
                ["Stage I, AR path", f["stage1_nll"], f["nll_rows"]],
            ],
        ),
        f"## Decoders on {decode['n']} GSM8K problems (batch 1, greedy, "
        f"≤ {decode['max_new_tokens']} new tokens)",
        "Every decoder but the first runs the Stage I model; `identical` = the fraction of "
        "problems whose tokens equal transformers' greedy `generate` on it." + always,
        _table(["decoder", "accuracy", "TPF", "tokens/s", "× generate", "identical"], decoders),
        "![decoders](plots/decoders.png)",
        "## TPF against Stage I steps",
        f"FLUID on the first {curve['prompts']} problems (≤ {curve['max_new_tokens']} new tokens); "
        "step 0 is the base model with untrained MASK slots" + budget_off + ".",
        _table(["step", *curve["policies"]], points),
        "![TPF vs steps](plots/tpf_vs_steps.png)",
        "## Training",
        f"Stage I {f['stage1_steps']} steps, Stage II {f['stage2_steps']} steps.",
        "![loss curves](plots/loss_curves.png)",
        "## Stages",
        _table(
            ["stage", "seconds"],
            [[k, round(v)] for k, v in summary["stage_order"]]
            + [["total", round(sum(summary["stage_seconds"].values()))]],
        ),
        f"This invocation took {wall / 60:.1f} min (finished stages are reused).",
        "## Example (first problem; every lossless policy gives the same text)",
        f"> {sample['question']}\n\n```\n{sample['text']}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def write_report(
    out: Path, order: list[str], seconds: dict[str, float], wall: float, command: str
) -> dict[str, Any]:
    """Write ``summary.json``, the plots and ``report.md`` under ``out``; returns the summary.
    ``order``: the stage names in pipeline order; ``seconds``: each one's time when it ran."""
    summary = summarize(out, {n: seconds[n] for n in order if n in seconds})
    summary["command"] = command
    write_json_atomic(out / "summary.json", summary)
    plot_losses(out, out / "plots" / "loss_curves.png")
    curve = _load(out / "eval" / "curve.json")
    plot_curve(curve, out / "plots" / "tpf_vs_steps.png", summary["figures"]["prompt_lookup_tpf"])
    plot_decoders(_load(out / "eval" / "decode.json"), out / "plots" / "decoders.png")
    write_text_atomic(out / "report.md", [_markdown(out, summary, wall, command)])
    return summary
