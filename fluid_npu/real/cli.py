"""``fluid real prepare`` and ``fluid real run``: the subcommands and their budget flags.

The defaults are the budget for this project's 2-core CPU when it is idle (about an hour);
``fluid real run --help`` lists every flag. A smaller budget is the same command with smaller
numbers; a larger one (a GPU) with larger ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fluid_npu.demo.pipeline import _positive  # the demo's budget flags take the same integers

DEFAULT_OUT = "runs/real"


def add_real_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fluid real`` with its ``prepare`` and ``run`` subcommands."""
    real = sub.add_parser("real", help="FLUID on SmolLM2-135M-Instruct and real GSM8K problems")
    inner = real.add_subparsers(dest="real_command", metavar="{prepare,run}", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = inner.add_parser("prepare", help="install, convert and write the real assets once")
    p.add_argument("--out", default=DEFAULT_OUT, help="the run directory")
    p.set_defaults(handler=_prepare)
    r = inner.add_parser(
        "run", help="distill, Stage I, Stage II, measure, report", formatter_class=fmt
    )
    r.add_argument("--out", default=DEFAULT_OUT, help="the run directory (prepared)")
    r.add_argument("--fresh", action="store_true", help="redo every stage")
    r.add_argument("--threads", type=_positive, default=None, help="torch threads (None: all)")
    add = r.add_argument
    add("--distill-questions", type=_positive, default=96, help="questions the base answers")
    add("--distill-tokens", type=_positive, default=160, help="max tokens of a distilled answer")
    add("--stage1-steps", type=_positive, default=60, help="Stage I optimizer steps")
    add("--batch-size", type=_positive, default=4, help="examples per Stage I / II step")
    add("--save-every", type=_positive, default=15, help="Stage I checkpoint interval (curve)")
    add("--stage2-steps", type=_positive, default=20, help="Stage II optimizer steps")
    add("--curve-prompts", type=_positive, default=4, help="problems per point of the curve")
    add("--curve-tokens", type=_positive, default=48, help="new tokens per curve problem")
    add("--nll-problems", type=_positive, default=100, help="problems scored for gold NLL")
    add("--eval-problems", type=_positive, default=12, help="problems every decoder runs on")
    add("--max-new-tokens", type=_positive, default=160, help="new tokens per problem")
    add(
        "--policies",
        nargs="+",
        default=["fixed:4", "entropy", "khead"],
        help="FLUID horizon policies",
    )
    r.set_defaults(handler=_run)


def _prepare(args: argparse.Namespace) -> int:
    import json

    from fluid_npu.real.prepare import prepare_assets

    record = prepare_assets(Path(args.out))
    print(f"fluid: real assets ready in {args.out}: {json.dumps(record['mask_token'])}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fluid_npu.real.pipeline import run_real

    return run_real(args)
