"""``fluid real run`` — FLUID on a real pretrained chat model, end to end, with cached stages.

On the assets of ``fluid real prepare`` (``OUT/base``, ``OUT/data/gsm8k_test.jsonl``):

1. *distill*: the base model's greedy answers to word problems that are not GSM8K
   (``real/distill.py``) — the Stage I / II training data;
2. *Stage I* (``configs/real_stage1.yaml``: LoRA r16 / α32, k_masks 16), checkpoints every
   ``--save-every`` steps for the curve below;
3. *Stage II* (``configs/real_stage2.yaml``): the K-head on the frozen Stage I model;
4. *gold NLL* of the base and of the Stage I model's AR path on every test problem;
5. *curve*: FLUID TPF on a few test prompts at step 0 (the base's untrained slots) and at every
   Stage I checkpoint, the engine's draft budget off (every step drafts) — how TPF grows with
   adaptation;
6. *decode*: on ``--eval-problems`` test problems at batch 1, in one process: transformers'
   ``generate`` (base, Stage I), prompt lookup and every FLUID policy, with the draft budget on
   (the default) and off (``real/measure.py``);
7. *report*: ``summary.json``, ``report.md`` and plots (``real/report.py``).

Stages are cached as in ``fluid demo`` (``fluid_npu.demo.pipeline.Stages``): a finished stage is
reused unless one it needs ran again, and other settings on the same directory are an error.
Exit status 1 when a FLUID policy's tokens differ from transformers' greedy ``generate``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fluid_npu.errors import ConfigError, DataError
from fluid_npu.io import prepare_output_dir, write_json_atomic
from fluid_npu.real.prepare import TEST_FILE

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
CURVE_POLICIES = ("fixed:4", "entropy")
FRESH = ("stages.json", "summary.json", "report.md", "stage1", "stage2", "eval", "plots")
SETTINGS = (
    "distill_questions",
    "distill_tokens",
    "stage1_steps",
    "batch_size",
    "save_every",
    "stage2_steps",
    "curve_prompts",
    "curve_tokens",
    "nll_problems",
    "eval_problems",
    "max_new_tokens",
    "policies",
)


def _value(path: Path) -> str:
    return json.dumps(str(path))  # a YAML scalar whatever the path holds


def train_stage(config: str, overrides: list[str]) -> dict[str, Any]:
    """``fluid train CONFIG overrides…`` in this process; returns the run record."""
    from fluid_npu.config import load_config

    if not (CONFIGS / config).is_file():
        raise ConfigError(f"the recipe {CONFIGS / config} is missing: run from a source checkout")
    cfg = load_config(CONFIGS / config, overrides)
    if cfg.fluid.stage == "fluid_stage1":
        from fluid_npu.train.stage1 import run_stage1

        return run_stage1(cfg)
    from fluid_npu.train.stage2 import run_stage2

    return run_stage2(cfg)


def checkpoints(stage1: Path) -> list[tuple[int, Path]]:
    """``(step, adapter dir)`` of every Stage I checkpoint and of the final adapter, by step."""
    found = {}
    for d in stage1.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "adapter_model.safetensors").is_file():
            found[int(m.group(1))] = d
    run = json.loads((stage1 / "run.json").read_text())
    found[int(run["global_step"])] = stage1
    return sorted(found.items())


def _load_fluid(base: Path, adapter: Path | None, khead: Path | None = None) -> Any:
    from fluid_npu.sampling import FluidForCausalLM
    from fluid_npu.sampling.prompts import quiet_loading

    with quiet_loading():
        return FluidForCausalLM.from_pretrained(base, adapter=adapter, khead=khead)


def tpf_curve(base: Path, stage1: Path, rows: list[dict], max_new: int) -> list[dict[str, Any]]:
    """FLUID TPF of ``CURVE_POLICIES`` on ``rows`` at step 0 and at every Stage I checkpoint."""
    from fluid_npu.real.measure import _fluid_decode, chat_ids

    points = []
    for step, adapter in [(0, None), *checkpoints(stage1)]:
        fluid = _load_fluid(base, adapter)
        point: dict[str, Any] = {"step": step}
        for policy in CURVE_POLICIES:
            runs = [  # the draft budget off: what the slots can draft, step by step
                _fluid_decode(
                    fluid, chat_ids(fluid.tokenizer, r["question"]), max_new, policy, adaptive=False
                )
                for r in rows
            ]
            tokens = sum(len(r["tokens"]) for r in runs)
            point[policy] = tokens / max(1, sum(r["forwards"] for r in runs))
        print(
            f"curve: step {step}: " + ", ".join(f"{p} TPF {point[p]:.2f}" for p in CURVE_POLICIES)
        )
        points.append(point)
    return points


def run_real(args: argparse.Namespace) -> int:
    """Run (or reuse) every stage, then write the report; 1 when a policy is not lossless."""
    from fluid_npu.demo.pipeline import Stages
    from fluid_npu.eval.tasks import read_rows
    from fluid_npu.real.distill import write_distill_dataset
    from fluid_npu.real.measure import decode_all, gold_nll
    from fluid_npu.real.report import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base, test = out / "base", out / TEST_FILE
    if not (base / "config.json").is_file() or not test.is_file():
        raise ConfigError(
            f"{out} has no prepared model and problems; run `fluid real prepare --out {out}` first"
        )
    prepare_output_dir(out)
    if args.fresh:
        for name in (*FRESH, "data/distill.jsonl", "data/distill.json", "data/dataset_info.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    rows = read_rows(test)
    if max(args.eval_problems, args.curve_prompts, args.nll_problems) > len(rows):
        raise DataError(
            f"{test} holds {len(rows)} problems; lower --eval-problems, --curve-prompts or "
            "--nll-problems"
        )
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["policies"] = list(args.policies)
    stages = Stages(out, settings, total=7)
    start = time.perf_counter()
    data, stage1, stage2, evals = out / "data", out / "stage1", out / "stage2", out / "eval"
    paths = [f"model_name_or_path={_value(base)}", f"dataset_dir={_value(data)}"]
    batch = [f"per_device_train_batch_size={args.batch_size}"]

    def stage1_run() -> None:
        shutil.rmtree(stage1, ignore_errors=True)
        steps = [f"max_steps={args.stage1_steps}", f"save_steps={args.save_every}"]
        train_stage("real_stage1.yaml", [*paths, f"output_dir={_value(stage1)}", *steps, *batch])

    def stage2_run() -> None:
        shutil.rmtree(stage2, ignore_errors=True)
        extra = [f"adapter_name_or_path={_value(stage1)}", f"max_steps={args.stage2_steps}"]
        train_stage("real_stage2.yaml", [*paths, f"output_dir={_value(stage2)}", *extra, *batch])

    def nll() -> None:
        from fluid_npu.model.loading import load_model, load_tokenizer

        tok = load_tokenizer(base)
        scored = rows[: args.nll_problems]
        result = {"base": gold_nll(load_model(base), tok, scored)}
        print(f"nll: base {result['base']['nll']:.4f} nats/token", flush=True)
        fluid = _load_fluid(base, stage1)
        result["stage1"] = gold_nll(fluid.model, fluid.tokenizer, scored)
        print(f"nll: Stage I AR path {result['stage1']['nll']:.4f} nats/token", flush=True)
        write_json_atomic(evals / "nll.json", result)

    def curve() -> None:
        points = tpf_curve(base, stage1, rows[: args.curve_prompts], args.curve_tokens)
        record = {"policies": CURVE_POLICIES, "points": points, "prompts": args.curve_prompts}
        record["adaptive"] = False  # measured with the draft budget off (the report says so)
        write_json_atomic(evals / "curve.json", {**record, "max_new_tokens": args.curve_tokens})

    def decode() -> None:
        from fluid_npu.model.loading import load_model

        fluid = _load_fluid(base, stage1, stage2)
        result = decode_all(
            load_model(base), fluid, rows[: args.eval_problems], args.policies,
            args.max_new_tokens, echo=lambda m: print(m, flush=True),
        )  # fmt: skip
        result["mask_token"] = {"token": fluid.tokenizer.mask_token, "id": fluid.mask_id}
        write_json_atomic(evals / "decode.json", result)

    s1, s2 = "Stage I (configs/real_stage1.yaml)", "Stage II: K-head (configs/real_stage2.yaml)"
    d = "distill: the base's greedy answers to non-GSM8K word problems"
    stages.run(
        d,
        data / "distill.json",
        lambda: write_distill_dataset(
            base, data, args.distill_questions, args.distill_tokens, echo=print
        ),
    )
    stages.run(s1, stage1 / "run.json", stage1_run, needs=[d])
    stages.run(s2, stage2 / "run.json", stage2_run, needs=[s1])
    stages.run("gold NLL: base and Stage I AR path", evals / "nll.json", nll, needs=[s1])
    stages.run("curve: TPF against Stage I steps", evals / "curve.json", curve, needs=[s1])
    stages.run("decode: generate, prompt lookup, FLUID", evals / "decode.json", decode, needs=[s2])
    print(f"[{stages.total}/{stages.total}] report", flush=True)
    command = " ".join(["fluid", *sys.argv[1:]]) if sys.argv[1:2] == ["real"] else "fluid real run"
    summary = write_report(out, stages.order, stages.seconds, time.perf_counter() - start, command)
    print(f"  summary: {json.dumps(summary['figures'])}")
    print(f"  report:  {out / 'report.md'}")
    return 0 if summary["figures"]["lossless"] else 1
