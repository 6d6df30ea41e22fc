"""``fluid demo`` — the whole FLUID pipeline on a CPU, on a base model the demo builds itself.

1. *data*: the arithmetic word problems of ``fluid_npu.data.demo`` — a training set (alpaca JSONL)
   and the held-out problems in GSM8K format, with an lm-evaluation-harness task for them;
2. *base*: a tokenizer trained on the task and a small Llama pretrained as a plain AR model — the
   stand-in for openPangu (``demo/base.py``); nothing is downloaded;
3. *Stage I* (``demo_stage1.yaml``) on the base, and the *control*: the same recipe and budget on
   a randomly initialised model of the same shape;
4. *Stage II* (``demo_stage2.yaml``): the K-head on the Stage I model;
5. *eval*: accuracy on the held-out problems of the base, the Stage I model (``ar``, ``fixed``,
   ``entropy``, ``khead``) and the control (``fluid_npu.eval``);
6. *bench*: the sampler benchmark at batch size 1 against transformers' ``generate``;
7. *report*: ``summary.json``, ``report.md`` and the plots (``demo/report.py``).

Every stage leaves a marker when it finishes and is skipped on the next run unless a stage it
depends on ran again; ``stages.json`` keeps how long each stage took when it ran (so ``minutes`` in
the summary is the cost of the whole pipeline, however many runs it took) and the settings of the
run that made them: a later run with other settings stops with a clear error (``--fresh`` redoes
everything). Exit status 1 when a policy is not lossless.

The two recipes are package data (``fluid_npu/demo/configs/``; a checkout's ``configs/demo_*.yaml``
link to them), so a pip-installed ``fluid demo`` needs no source checkout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fluid_npu.errors import ConfigError
from fluid_npu.io import prepare_output_dir, write_json_atomic, write_text_atomic

CONFIGS = Path(__file__).resolve().parent / "configs"  # package data (setup.py), not the checkout's
DEFAULT_OUT = Path("runs/demo")
N_TRAIN = 8000
MAX_NEW_TOKENS = 96
EVAL_POLICIES = ("fixed:8", "fixed:16", "entropy", "khead")
BENCH_POLICIES = ("ar", "fixed:8", "fixed:16", "entropy", "khead")
SETTINGS = ("pretrain_steps", "train_problems", "eval_problems", "bench_prompts", "train_steps")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fluid demo`` and its budget flags."""
    p = sub.add_parser(
        "demo",
        help="run the embedded CPU demo end to end",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the demo writes")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--pretrain-steps", type=_positive, default=800, help="base model AR steps")
    p.add_argument("--train-problems", type=_positive, default=N_TRAIN, help="training problems")
    p.add_argument("--eval-problems", type=_positive, default=300, help="held-out problems")
    p.add_argument("--bench-prompts", type=_positive, default=16, help="prompts for the bench")
    p.add_argument(
        "--train-steps",
        type=_positive,
        default=None,
        help="max_steps of Stage I, the control and Stage II (None: the configs' own)",
    )
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch threads (None: one per core)"
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
    """Runs each stage once (see the module docstring); times and settings in ``stages.json``."""

    def __init__(self, out: Path, settings: dict[str, Any], total: int) -> None:
        self.path = out / "stages.json"
        record = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.seconds: dict[str, float] = record.get("seconds", {})
        old = record.get("settings")
        if old is not None and old != settings:
            changed = ", ".join(k for k in settings if old.get(k) != settings[k])
            raise ConfigError(
                f"{out} holds a demo run made with other settings ({changed}); pass --fresh to "
                "redo it, or --out a new directory"
            )
        self.settings = settings
        self.total = total
        self.order: list[str] = []  # stage names in pipeline order
        self.ran: set[str] = set()

    def run(
        self, name: str, marker: Path, fn: Callable[[], Any], needs: Sequence[str] = ()
    ) -> None:
        """Run ``fn`` unless ``marker`` exists and no stage in ``needs`` ran again this time."""
        self.order.append(name)
        stale = [n for n in needs if n in self.ran]
        reuse = marker.exists() and not stale
        state = "done, reused" if reuse else "running"
        if marker.exists() and stale:  # done before, but a stage it needs was redone
            state += f" again (after {stale[0]})"
        print(f"[{len(self.order)}/{self.total}] {name}: {state}", flush=True)
        if reuse:
            return
        start = time.perf_counter()
        fn()
        if not marker.exists():
            raise RuntimeError(f"demo stage {name!r} finished without writing {marker}")
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.ran.add(name)
        write_json_atomic(self.path, {"seconds": self.seconds, "settings": self.settings})
        print(f"      {name} took {self.seconds[name]:.0f} s", flush=True)


def _value(path: Path) -> str:
    return json.dumps(str(path))  # a YAML scalar whatever the path holds ("#", ": ", "[")


def recipe(name: str) -> Path:
    """The demo recipe ``name`` shipped with the package (``fluid_npu/demo/configs/``)."""
    path = CONFIGS / name
    if not path.is_file():
        raise ConfigError(
            f"the demo recipe {path} is missing from the installed package; reinstall fluid-npu "
            "(pip install fluid-npu, or pip install -e . in a checkout)"
        )
    return path


def _train(config: str, overrides: list[str]) -> dict:
    from fluid_npu.config import load_config

    cfg = load_config(recipe(config), overrides)
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
    result = run_eval(
        fluid, "demo", rows, policies, batch_size=16, max_new_tokens=MAX_NEW_TOKENS, echo=print
    )
    write_eval_report(result, out / f"{name}.json", out / f"{name}.md", out)


def trained(base: Path, stage1: Path) -> tuple[Path, Path | None]:
    """``(model, adapter)`` of a Stage I output: base + LoRA adapter, or the fine-tuned model."""
    if (stage1 / "adapter_config.json").is_file():
        return base, stage1
    return stage1, None


def _fresh(out: Path) -> None:
    """Empty ``out`` for ``--fresh``: only a demo run (or an empty directory), nothing else."""
    if not out.exists():
        return
    if out.is_dir() and ((out / "stages.json").is_file() or not any(out.iterdir())):
        shutil.rmtree(out)
        return
    raise ConfigError(
        f"--fresh would delete {out}, which is not a demo output directory (no stages.json); "
        "choose --out a new or demo directory"
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run (or reuse) every stage, then write the report; 1 when a policy is not lossless."""
    from fluid_npu.data.demo import write_demo_dataset, write_gsm8k
    from fluid_npu.demo.base import pretrain_base, random_like
    from fluid_npu.demo.report import write_report
    from fluid_npu.eval.lm_eval_task import write_lm_eval_task
    from fluid_npu.sampling.bench import BenchSettings, run_sampler_bench

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.fresh:
        _fresh(out)
    prepare_output_dir(out)
    settings = {key: getattr(args, key) for key in SETTINGS}
    stages = Stages(out, settings, total=9)
    start = time.perf_counter()
    data = write_demo_dataset(out / "data", n_train=args.train_problems, seed=0)
    test = write_gsm8k(data / "test.jsonl", "test", args.eval_problems)  # the held-out problems
    write_lm_eval_task(data / "lm_eval", "fluid_demo", test, max_gen_toks=MAX_NEW_TOKENS)
    base, stage1, stage2 = out / "base", out / "stage1", out / "stage2"
    scratch_base, scratch = out / "scratch" / "base", out / "scratch" / "stage1"
    evals, bench = out / "eval", out / "bench"
    steps = [] if args.train_steps is None else [f"max_steps={args.train_steps}"]

    def pretrain() -> None:
        curve = pretrain_base(base, args.pretrain_steps, n_problems=args.train_problems)
        write_json_atomic(base / "pretrain_log.json", curve)

    def stage1_on(model: Path, output: Path) -> None:
        shutil.rmtree(output, ignore_errors=True)  # a run cut short restarts from scratch
        paths = [f"model_name_or_path={_value(model)}", f"dataset_dir={_value(data)}"]
        _train("demo_stage1.yaml", [*paths, f"output_dir={_value(output)}", *steps])

    def control() -> None:
        random_like(base, scratch_base)  # the base's shape and tokenizer, random weights
        stage1_on(scratch_base, scratch)

    def khead() -> None:
        shutil.rmtree(stage2, ignore_errors=True)
        model, adapter = trained(base, stage1)
        paths = [f"model_name_or_path={_value(model)}", f"dataset_dir={_value(data)}"]
        if adapter is not None:
            paths.append(f"adapter_name_or_path={_value(adapter)}")
        _train("demo_stage2.yaml", [*paths, f"output_dir={_value(stage2)}", *steps])

    def sampler_bench() -> None:
        from fluid_npu.data.demo import demo_prompts

        lines = [json.dumps({"prompt": p}) + "\n" for p in demo_prompts(args.bench_prompts)]
        prompts = write_text_atomic(bench / "prompts.jsonl", lines)
        model, adapter = trained(base, stage1)
        settings = BenchSettings(
            model=str(model),
            adapter=None if adapter is None else str(adapter),
            khead=str(stage2),
            prompts=str(prompts),
            json_path=str(bench / "sampler.json"),
            max_new_tokens=MAX_NEW_TOKENS,
            batch_sizes=(1,),
            policies=BENCH_POLICIES,
            loops=("fused",),
            repeats=2,
            command="fluid demo (stage: bench)",
        )
        run_sampler_bench(settings)

    b, s1 = "base: tokenizer + AR pretraining", "Stage I (demo_stage1.yaml)"
    ctl, s2 = "control: Stage I on a random init", "Stage II: K-head (demo_stage2.yaml)"
    stages.run(b, base / "pretrain_log.json", pretrain)
    stages.run(s1, stage1 / "run.json", lambda: stage1_on(base, stage1), needs=[b])
    stages.run(ctl, scratch / "run.json", control, needs=[b])
    stages.run(s2, stage2 / "run.json", khead, needs=[s1])
    stages.run(
        "eval: base model (ar)",
        evals / "base.json",
        lambda: _evaluate(evals, "base", base, None, None, (), test),
        needs=[b],
    )
    stages.run(
        "eval: FLUID model (ar, fixed, entropy, khead)",
        evals / "fluid.json",
        lambda: _evaluate(evals, "fluid", *trained(base, stage1), stage2, EVAL_POLICIES, test),
        needs=[s1, s2],
    )
    stages.run(
        "eval: control (ar)",
        evals / "scratch.json",
        lambda: _evaluate(evals, "scratch", *trained(scratch_base, scratch), None, (), test),
        needs=[ctl],
    )
    stages.run(
        "bench: sampler vs transformers generate, batch 1",
        bench / "sampler.json",
        sampler_bench,
        needs=[s1, s2],
    )
    print(f"[{stages.total}/{stages.total}] report", flush=True)
    command = " ".join(["fluid", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else "fluid demo"
    summary = write_report(out, stages.order, stages.seconds, time.perf_counter() - start, command)
    print(f"  summary: {json.dumps(summary)}")
    print(f"  report:  {out / 'report.md'}")
    return 0 if summary["lossless"] else 1
