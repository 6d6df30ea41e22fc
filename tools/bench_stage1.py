"""Stage I training cost per expanded token vs plain AR fine-tuning per token, in one run.

    python tools/bench_stage1.py --json outputs/bench/stage1.json [--cutoff 1024] [--repeats 3]

Builds a small Llama (hidden 128, 4 layers; random weights: cost does not depend on them), one
example of ``--cutoff`` response tokens expanded with the default anchor settings (anchor_prob 0.5,
k_max 16, so ≈ 5.25× the tokens), and times a full training step (forward + backward) of:

* plain AR fine-tuning on the unexpanded example (causal SDPA, materialised logits) — the baseline;
* Stage I with each attention path: the model's own ``sdpa`` with a dense mask, ``fluid_ops``
  ``reference`` (dense mask) and ``blocked`` (structure-aware), plus ``triton`` when it can run;
  each with the fused ``linear_cross_entropy`` loss, and the dense ``sdpa`` one also with
  materialised logits.

``stage1_cost_per_token_vs_ar`` = (Stage I step time / expanded tokens) ÷ (AR step time / tokens)
for the default path (``blocked`` + fused loss on CPU). Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluid_npu.io import write_json_atomic
from fluid_npu.layout import LayoutConfig, collate, expand, noise_vocabulary
from fluid_npu.model.attention import configure_attention
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.train.stage1 import stage1_loss
from fluid_ops.dispatch import why_unavailable

# The model shape the recorded figures (README) were measured with: the demo's today, kept apart so
# the demo can change without moving these figures.
BENCH_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to save the JSON report")
    ap.add_argument("--cutoff", type=int, default=1024)
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, **BENCH_MODEL).train()
    rng = np.random.default_rng(0)
    n = args.cutoff
    ids = rng.integers(0, 250, n).tolist()
    labels = ids[:]
    layout = LayoutConfig(
        mask_id=tok.mask_token_id,
        pad_id=tok.pad_token_id,
        k_max=args.k_max,
        noise_ids=noise_vocabulary(tok, len(tok)),
        seed=0,
    )
    batch = collate([expand(ids, labels, layout, index=0)], tok.pad_token_id)
    inputs = {k: getattr(batch, k) for k in ("input_ids", "labels", "position_ids", "anchor")}
    inputs["n_main"] = batch.n_main
    expanded = int(batch.input_ids.shape[1])

    x = torch.tensor([ids])
    y = torch.tensor([[*ids[1:], -100]])

    def ar_step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        F.cross_entropy(logits[0].float(), y[0], ignore_index=-100).backward()

    configure_attention(model, "sdpa")
    t_ar = _time(ar_step, args.repeats)
    rows = []
    paths = [("sdpa", False), ("sdpa", True), ("reference", True), ("blocked", True)]
    if why_unavailable("attention", "triton", torch.device("cpu")) is None:
        paths.append(("triton", True))
    for backend, fused in paths:
        configure_attention(model, backend)

        def s1_step(fused: bool = fused) -> None:
            model.zero_grad(set_to_none=True)
            loss, _ = stage1_loss(model, inputs, fused=fused)
            loss.backward()

        t = _time(s1_step, args.repeats)
        rows.append(
            {
                "attention": backend,
                "loss": "linear_cross_entropy" if fused else "materialised logits",
                "step_s": round(t, 4),
                "cost_per_token_vs_ar": round((t / expanded) / (t_ar / n), 3),
            }
        )
        print(
            f"{backend:>9} fused={fused!s:5} step {t:.3f}s  per-token vs AR "
            f"{rows[-1]['cost_per_token_vs_ar']:.3f}",
            flush=True,
        )
    default = next(r for r in rows if r["attention"] == "blocked")
    reference = next(r for r in rows if r["attention"] == "reference")
    report = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {"arch": "llama", **BENCH_MODEL, "vocab": len(tok)},
        "cutoff_len": n,
        "expanded_tokens": expanded,
        "expansion": round(expanded / n, 3),
        "ar_step_s": round(t_ar, 4),
        "rows": rows,
        "stage1_cost_per_token_vs_ar": default["cost_per_token_vs_ar"],
        "stage1_cost_per_token_vs_ar_reference": reference["cost_per_token_vs_ar"],
        "blocked_cost_ratio": round(default["step_s"] / reference["step_s"], 3),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
