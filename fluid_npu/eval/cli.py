"""``fluid eval``: accuracy, TPF and speed of horizon policies beside the AR baseline.

``fluid eval --model DIR [--adapter DIR] [--khead DIR] --task gsm8k --data FILE.jsonl
[--fewshot FILE.jsonl --num-fewshot K] [--chat] --policy P [P ...] [--max-new-tokens N]
[--batch-size B] --json OUT.json``:
``--task demo`` takes the demo's held-out problems when no ``--data`` is given (``--limit`` of
them, 100 by default). ``--policy`` takes several policies and may be repeated; ``ar`` always runs
too, first, as the baseline (default: ``khead`` with a K-head, else ``entropy``). The JSON goes to
``--json``, the markdown table beside it (``--markdown``) and the two PNGs into ``--plot-dir``
(default: the JSON's folder); the table is also printed. Every input that needs no model (files,
rows, few-shot count, sizes, policies against the sampler's k_max, device) is checked before the
model is loaded. Exit status 1, after the report is written, when a policy's outputs are not
identical to AR's (the rule of ``lossless_rule.py``, shared with the demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluid_npu.errors import CheckpointError, ConfigError

DEFAULT_NUM_FEWSHOT = 5  # --fewshot without --num-fewshot: lm-evaluation-harness's gsm8k
EVAL_KEYS = (
    "model",
    "adapter",
    "khead",
    "task",
    "data",
    "limit",
    "fewshot",
    "num_fewshot",
    "policy",
    "loop",
    "max_new_tokens",
    "batch_size",
    "k_max",
    "anchors",
    "attn_backend",
    "mask_token",
    "device",
    "json",
    "markdown",
    "plot_dir",
    "chat",
    "chat_template",
    "chat_template_kwargs",
    "dtype",
    "compile",
    "no_adaptive_drafting",
    "no_enable_prefix_caching",
)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fluid eval`` and its flags."""
    from fluid_npu.eval.runner import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
    from fluid_npu.eval.tasks import TASKS
    from fluid_npu.sampling.cli import add_model_args

    p = sub.add_parser("eval", help="accuracy at a speed: policies vs AR on GSM8K-format tasks")
    add_model_args(p)
    p.add_argument("--task", required=True, choices=TASKS, help="gsm8k (needs --data) or demo")
    p.add_argument("--data", default=None, help="JSONL rows: question, answer ending '#### n'")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--fewshot", default=None, help="JSONL of few-shot examples (same format)")
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="examples per prompt (default 5 w/ --fewshot)"
    )
    p.add_argument(
        "--policy",
        nargs="+",
        action="extend",
        default=None,
        help="one or more of fixed:K | entropy[:T] | khead (ar always runs as the baseline)",
    )
    p.add_argument("--loop", default="fused", choices=("fused", "reference"))
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per batch")
    p.add_argument("--json", required=True, help="where the JSON report is written")
    p.add_argument("--markdown", default=None, help="markdown table (default: beside the JSON)")
    p.add_argument("--plot-dir", default=None, help="where the PNGs go (default: JSON's folder)")
    p.set_defaults(handler=eval_command, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)


def khead_k_max(khead: str | Path | None) -> int | None:
    """The ``k_max`` a K-head directory was trained with, read before any model loads (None when
    there is no K-head or its config is unreadable: loading it reports that)."""
    from fluid_npu.model.khead import read_khead_config

    if khead is None:
        return None
    try:
        return read_khead_config(khead).k_max
    except CheckpointError:
        return None


def eval_command(args: argparse.Namespace) -> int:
    """Check every input, load the model, evaluate, write the report; 0 on success, 1 (after
    writing the report) when a policy is not lossless (``eval/lossless_rule.py``)."""
    from fluid_npu.eval.lossless_rule import lossless_status
    from fluid_npu.eval.report import markdown_table, write_eval_report
    from fluid_npu.eval.runner import run_eval
    from fluid_npu.eval.tasks import read_rows, select_fewshot, task_rows
    from fluid_npu.io import check_output_file, prepare_output_dir
    from fluid_npu.sampling.cli import (
        check_chat_flags,
        check_common,
        command_line,
        device_from_args,
        gen_kwargs,
        load_model,
    )
    from fluid_npu.sampling.policies import block_bound, parse_policy

    check_common(args)
    check_chat_flags(args, args.chat)
    if args.num_fewshot is None:
        args.num_fewshot = DEFAULT_NUM_FEWSHOT if args.fewshot else 0
    rows = task_rows(args.task, args.data, args.limit)
    fewshot = read_rows(args.fewshot, "few-shot") if args.fewshot else None
    select_fewshot(fewshot, args.num_fewshot, args.fewshot or "the few-shot file")
    json_path = Path(args.json)
    if json_path.suffix != ".json":
        raise ConfigError(f"--json takes a path ending in .json, got {args.json!r}")
    markdown = Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    plot_dir = Path(args.plot_dir) if args.plot_dir else json_path.parent
    # writable before the model loads, each named by its flag
    check_output_file(json_path, "--json")
    check_output_file(markdown, "--markdown" if args.markdown else "--json")
    prepare_output_dir(plot_dir, "--plot-dir" if args.plot_dir else "the folder of --json")
    from fluid_npu.model.khead import saved_khead

    khead = args.khead or saved_khead(args.model, args.adapter)  # (as from_pretrained finds it)
    k_max = block_bound(args.k_max, khead_k_max(khead))
    for spec in args.policy or ():
        parse_policy(spec, k_max=k_max, has_khead=khead is not None)
    dev = device_from_args(args)
    fluid = load_model(args, dev)
    policies = args.policy or ["khead" if fluid.khead is not None else "entropy"]
    result = run_eval(
        fluid,
        args.task,
        rows,
        policies,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        template_kwargs=args.template_kwargs,
        fewshot_rows=fewshot,
        num_fewshot=args.num_fewshot,
        loop=args.loop,
        gen_kwargs=gen_kwargs(args),
        echo=lambda line: print(line, file=sys.stderr, flush=True),
    )
    result["command"] = command_line(["fluid", "eval"], args, EVAL_KEYS)
    result.update(model=args.model, adapter=args.adapter, khead=args.khead, data=args.data)
    result["dtype"] = str(next(fluid.model.parameters()).dtype).removeprefix("torch.")
    written = write_eval_report(result, json_path, markdown, plot_dir)
    print(markdown_table(result))
    print("fluid: wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    status, message = lossless_status(result, str(json_path))
    if message:
        print(message, file=sys.stderr)
    return status
