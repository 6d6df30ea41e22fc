"""An evaluation on disk: the JSON record, a markdown table and two PNG plots.

``write_eval_report(result, json_path, markdown_path=None, plot_dir=None)`` writes the
``run_eval`` record as JSON and, when asked, the markdown table (``markdown_table``) and the plots
into ``plot_dir``, named after the JSON file:

* ``<stem>_accuracy_tpf.png`` — accuracy against tokens per forward, one point per policy (``ar``
  at TPF 1.0), the legend giving each one's figures and speedup: what speed buys what accuracy;
* ``<stem>_k_hist.png`` — the horizons K each policy drafted per row-step, as fractions (``ar``
  drafts nothing and is left out).

Every file is written to a temporary sibling and renamed into place. matplotlib (the ``eval`` and
``dev`` extras) is optional: without it the plots are skipped with a warning, as in
``train/khead_report.py``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COLUMNS = (
    ("policy", "policy", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("TPF", "tpf", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
    ("speedup vs ar", "speedup", "{:.2f}"),
    ("identical to ar", "identical_to_ar", "fraction"),
    ("mean K", "mean_k", "{:.2f}"),
    ("mean accepted", "mean_accept", "{:.2f}"),
)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per policy (``ar`` first) under a line naming the task, the rows and the device."""
    dev = result.get("device", {})
    head = (
        f"**{result['task']}**: {result['n']} prompts, {result['num_fewshot']}-shot"
        f"{', chat' if result.get('chat') else ''}, {result['loop']} loop, batch "
        f"{result['batch_size']}, at most {result['max_new_tokens']} new tokens, on "
        f"{dev.get('name') or dev.get('type', '?')}"
        f"{', ' + result['dtype'] if result.get('dtype') else ''}"
    )
    lines = [head, ""]
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    lines.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    lines.append("|---|" + "---:|" * (len(COLUMNS) - 1))
    for name in result["policies"]:
        r = result["results"][name]
        cells = [
            fraction(r[key]) if fmt == "fraction" else fmt.format(r[key]) for _, key, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fraction(value: float) -> str:
    """A share in [0, 1] to 3 decimals, rounded down: one differing row in thousands must not
    read 1.000."""
    return f"{math.floor(value * 1000) / 1000:.3f}"


def plot_paths(json_path: str | Path, plot_dir: str | Path) -> tuple[Path, Path]:
    """Where the accuracy-vs-TPF and K-histogram PNGs of ``json_path``'s report go."""
    stem = Path(json_path).stem
    return Path(plot_dir) / f"{stem}_accuracy_tpf.png", Path(plot_dir) / f"{stem}_k_hist.png"


def write_eval_report(
    result: dict[str, Any],
    json_path: str | Path,
    markdown_path: str | Path | None = None,
    plot_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write the JSON (and the markdown table, and the PNGs); returns what was written by kind."""
    from fluid_npu.io import write_json_atomic, write_text_atomic

    written: dict[str, Path] = {}
    if markdown_path is not None:
        written["markdown"] = write_text_atomic(markdown_path, [markdown_table(result)])
    if plot_dir is not None:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        acc_path, k_path = plot_paths(json_path, plot_dir)
        for kind, path in (
            ("accuracy_tpf", plot_accuracy_vs_tpf(result, acc_path)),
            ("k_hist", plot_k_histogram(result, k_path)),
        ):
            if path is not None:
                written[kind] = path
    write_json_atomic(json_path, result)  # last: its presence means the whole report is there
    written["json"] = Path(json_path)
    return written


def pyplot(what: str) -> Any:
    """matplotlib's pyplot on the Agg back end, or None (with a warning) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        logger.warning("matplotlib is not installed (%s): no %s plot", exc, what)
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG through a temporary sibling and a rename; close it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_accuracy_vs_tpf(result: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy against TPF, a point per policy; None when matplotlib is missing."""
    plt = pyplot("accuracy-vs-TPF")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = "sovD^<>p*hX"
    for i, name in enumerate(result["policies"]):
        r = result["results"][name]
        label = f"{name}: {r['accuracy']:.3f} at TPF {r['tpf']:.2f} (x{r['speedup']:.2f} tok/s)"
        ax.scatter(r["tpf"], r["accuracy"], s=50, marker=markers[i % len(markers)], label=label)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(0.9, max(r["tpf"] for r in result["results"].values()) * 1.1 + 0.1)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['task']}: accuracy vs TPF ({result['n']} prompts)")
    return save_figure(plt, fig, path)


def plot_k_histogram(result: dict[str, Any], path: str | Path) -> Path | None:
    """The drafted horizons per row-step of every non-``ar`` policy, as fractions (bars)."""
    plt = pyplot("K-histogram")
    if plt is None:
        return None
    policies = [p for p in result["policies"] if p != "ar"]
    hists = {p: {int(k): c for k, c in result["results"][p]["k_hist"].items()} for p in policies}
    ks = sorted({k for h in hists.values() for k in h}) or [0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(len(policies), 1)
    for i, p in enumerate(policies):
        total = sum(hists[p].values()) or 1
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in ks]
        ax.bar(xs, [hists[p].get(k, 0) / total for k in ks], width, label=p)
    ax.set_xticks(ks)
    ax.set_xlabel("drafted horizon K per step")
    ax.set_ylabel("fraction of row-steps")
    if policies:
        ax.legend()
    ax.set_title(f"{result['task']}: horizons chosen per step")
    return save_figure(plt, fig, path)
