"""``fluid demo`` — the whole FLUID pipeline on a CPU, on a base model the demo builds itself.

1. *data*: the arithmetic word problems of ``fluid_npu.data.demo`` — a training set (alpaca JSONL)
   and the held-out problems in GSM8K format, with an lm-evaluation-harness task for them;
2. *base*: a tokenizer trained on the task and a small Llama pretrained as a plain AR model — the
   stand-in for openPangu (``demo/base.py``); nothing is downloaded;
3. *Stage I* (``configs/demo_stage1.yaml``) on the base, and the *control*: the same recipe and
   budget on a randomly initialised model of the same shape;
4. *Stage II* (``configs/demo_stage2.yaml``): the K-head on the Stage I model;
5. *eval*: accuracy on the held-out problems of the base, the Stage I model (``ar``, ``fixed``,
   ``entropy``, ``khead``) and the control (``fluid_npu.eval``);
6. *bench*: the sampler benchmark at batch size 1 against transformers' ``generate``;
7. *report*: ``summary.json``, ``report.md`` and the plots (``demo/report.py``).

Every stage leaves a marker when it finishes and is skipped on the next run (``--fresh`` redoes
everything); ``stages.json`` keeps how long each stage took when it ran, so ``minutes`` in the
summary is the cost of the whole pipeline, however many runs it took. Exit status 1 when a policy
is not lossless.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fluid_npu.train.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("runs/demo")
N_TRAIN = 8000
EVAL_POLICIES = ("fixed:8", "fixed:16", "entropy", "khead")
BENCH_POLICIES = ("ar", "fixed:8", "fixed:16", "entropy", "khead")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded CPU demo end to end")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the demo writes (runs/demo)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--pretrain-steps", type=_positive, default=800, help="base model AR steps")
    p.add_argument("--train-problems", type=_positive, default=N_TRAIN, help="training problems")
    p.add_argument("--eval-problems", type=_positive, default=300, help="held-out problems")
    p.add_argument("--bench-prompts", type=_positive, default=16, help="prompts for the bench")
    p.add_argument(
        "--train-steps",
        type=_positive,
        default=None,
        help="max_steps of Stage I, the control and Stage II (default: the configs' own)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads (default: torch's choice, one per core)",
    )
    p.set_defaults(handler=run_demo)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class Stages:
    """Runs each stage once: skipped when its marker exists, else timed into ``stages.json``."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.seconds: dict[str, float] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )
        self.order: list[str] = []  # stage names in pipeline order (stages.json is sorted)
        self.count = 0

    def run(self, name: str, marker: Path, fn: Callable[[], Any], total: int) -> None:
        self.count += 1
        self.order.append(name)
        state = "done, reused" if marker.exists() else "running"
        print(f"[{self.count}/{total}] {name}: {state}", flush=True)
        if marker.exists():
            return
        start = time.time()
        fn()
        if not marker.exists():
            raise RuntimeError(f"demo stage {name!r} finished without writing {marker}")
        self.seconds[name] = round(time.time() - start, 1)
        write_json_atomic(self.path, self.seconds)
        print(f"      {name} took {self.seconds[name]:.0f} s", flush=True)


def _train(config: str, overrides: list[str]) -> dict:
    from fluid_npu.config import load_config

    cfg = load_config(ROOT / "configs" / config, overrides)
    if cfg.fluid.stage == "fluid_stage1":
        from fluid_npu.train.stage1 import run_stage1

        return run_stage1(cfg)
    from fluid_npu.train.stage2 import run_stage2

    return run_stage2(cfg)


def _evaluate(
    out: Path,
    name: str,
    model: Path,
    adapter: Path | None,
    khead: Path | None,
    policies: Sequence[str],
    data: Path,
) -> None:
    from fluid_npu.eval import run_eval, task_rows, write_eval_report
    from fluid_npu.sampling import FluidForCausalLM
    from fluid_npu.sampling.prompts import quiet_loading

    with quiet_loading():
        fluid = FluidForCausalLM.from_pretrained(model, adapter=adapter, khead=khead)
    rows = task_rows("demo", data=data)
    result = run_eval(fluid, "demo", rows, policies, batch_size=16, max_new_tokens=96, echo=print)
    write_eval_report(result, out / f"{name}.json", out / f"{name}.md", out)


def trained(base: Path, stage1: Path) -> tuple[Path, Path | None]:
    """``(model, adapter)`` of a Stage I output: base + LoRA adapter, or the fine-tuned model."""
    if (stage1 / "adapter_config.json").is_file():
        return base, stage1
    return stage1, None


def run_demo(args: argparse.Namespace) -> int:
    from fluid_npu.data.demo import write_demo_dataset, write_gsm8k
    from fluid_npu.demo.base import pretrain_base, random_like
    from fluid_npu.demo.report import write_report
    from fluid_npu.eval.lm_eval_task import write_lm_eval_task
    from fluid_npu.sampling.bench import BenchSettings, run_sampler_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = write_demo_dataset(out / "data", n_train=args.train_problems, seed=0)
    write_gsm8k(data / "test.jsonl", "test", args.eval_problems)  # the held-out problems, exported
    write_lm_eval_task(data / "lm_eval", "fluid_demo", data / "test.jsonl", max_gen_toks=96)
    base, stage1, stage2 = out / "base", out / "stage1", out / "stage2"
    scratch_base, scratch = out / "scratch" / "base", out / "scratch" / "stage1"
    evals, bench = out / "eval", out / "bench"
    stages = Stages(out)
    test = data / "test.jsonl"
    steps = [] if args.train_steps is None else [f"max_steps={args.train_steps}"]
    total = 9

    def pretrain() -> None:
        curve = pretrain_base(base, args.pretrain_steps, n_problems=args.train_problems)
        write_json_atomic(base / "pretrain_log.json", curve)

    def stage1_on(model: Path, output: Path) -> Callable[[], None]:
        def train() -> None:
            shutil.rmtree(output, ignore_errors=True)  # a run cut short restarts from scratch
            paths = [f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={output}"]
            _train("demo_stage1.yaml", paths + steps)

        return train

    def scratch_stage1() -> None:
        if not (scratch_base / "config.json").is_file():
            random_like(base, scratch_base)
        stage1_on(scratch_base, scratch)()

    def khead() -> None:
        shutil.rmtree(stage2, ignore_errors=True)
        model, adapter = trained(base, stage1)
        paths = [f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={stage2}"]
        if adapter is not None:
            paths.append(f"adapter_name_or_path={adapter}")
        _train("demo_stage2.yaml", paths + steps)

    stages.run("base: tokenizer + AR pretraining", base / "pretrain_log.json", pretrain, total)
    stages.run(
        "Stage I (configs/demo_stage1.yaml)", stage1 / "run.json", stage1_on(base, stage1), total
    )
    stages.run("control: Stage I on a random init", scratch / "run.json", scratch_stage1, total)
    stages.run("Stage II: K-head (configs/demo_stage2.yaml)", stage2 / "run.json", khead, total)
    stages.run(
        "eval: base model (ar)",
        evals / "base.json",
        lambda: _evaluate(evals, "base", base, None, None, (), test),
        total,
    )
    stages.run(
        "eval: FLUID model (ar, fixed, entropy, khead)",
        evals / "fluid.json",
        lambda: _evaluate(evals, "fluid", *trained(base, stage1), stage2, EVAL_POLICIES, test),
        total,
    )
    stages.run(
        "eval: control (ar)",
        evals / "scratch.json",
        lambda: _evaluate(evals, "scratch", *trained(scratch_base, scratch), None, (), test),
        total,
    )

    def sampler_bench() -> None:
        from fluid_npu.data.demo import demo_prompts
        from fluid_npu.train.io import write_text_atomic

        prompts = write_text_atomic(
            bench / "prompts.jsonl",
            [json.dumps({"prompt": p}) + "\n" for p in demo_prompts(args.bench_prompts)],
        )
        model, adapter = trained(base, stage1)
        settings = BenchSettings(
            model=str(model),
            adapter=None if adapter is None else str(adapter),
            khead=str(stage2),
            prompts=str(prompts),
            json_path=str(bench / "sampler.json"),
            max_new_tokens=96,
            batch_sizes=(1,),
            policies=BENCH_POLICIES,
            loops=("fused",),
            repeats=2,
            command="fluid demo (stage: bench)",
        )
        run_sampler_bench(settings)

    stages.run(
        "bench: sampler vs transformers generate, batch 1",
        bench / "sampler.json",
        sampler_bench,
        total,
    )
    print(f"[{total}/{total}] report", flush=True)
    order = [name for name in stages.order if name in stages.seconds]
    summary = write_report(out, {name: stages.seconds[name] for name in order}, time.time() - start)
    print(f"  summary: {json.dumps(summary)}")
    print(f"  report:  {out / 'report.md'}")
    return 0 if summary["lossless"] else 1
