"""``fluid bench sampler``: its flags and command (the benchmark itself is ``bench.py``).

It exits with status 1 (after writing its report) when any row is not lossless; bad input is one
``ConfigError`` (status 2). ``fluid bench serve`` registers as another target of the same ``bench``
command (``fluid_npu.serve.cli``).
"""

from __future__ import annotations

import argparse
import sys

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.cli import (
    PROMPTS_HELP,
    add_model_args,
    check_chat_flags,
    check_common,
    command_line,
    gen_kwargs,
)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (TPF and speed against transformers)")
    targets = p.add_subparsers(dest="target", metavar="TARGET", parser_class=type(p))
    s = targets.add_parser("sampler", help="policies x loops vs transformers' greedy generate")
    add_model_args(s)
    s.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    s.add_argument("--json", required=True, help="where the JSON report is written")
    s.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    s.add_argument("--policies", default=None, help="comma-separated (default: ar,fixed:4,...)")
    s.add_argument("--loops", default="fused,reference", help="comma-separated loops")
    s.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed rounds, each running the baseline and every row once (each keeps its best)",
    )
    s.add_argument(
        "--no-static-baseline",
        action="store_true",
        help="leave out the second baseline, generate with transformers' static cache (on CUDA "
        "transformers compiles it anew for each batch shape and prompt length: minutes)",
    )
    s.set_defaults(handler=bench_command)
    p.set_defaults(handler=lambda args: _bench_usage(p))


def _bench_usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 0


BENCH_KEYS = (
    "model",
    "adapter",
    "khead",
    "prompts",
    "json",
    "max_new_tokens",
    "batch_sizes",
    "policies",
    "loops",
    "repeats",
    "no_static_baseline",
    "k_max",
    "anchors",
    "attn_backend",
    "mask_token",
    "device",
    "dtype",
    "compile",
    "no_adaptive_drafting",
    "no_enable_prefix_caching",
    "chat",
    "chat_template",
    "chat_template_kwargs",
)


def _names(flag: str, given: str, example: str) -> tuple[str, ...]:
    """A comma-separated list of names (blanks between commas dropped); none is an error."""
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    if not names:
        raise ConfigError(f"{flag} takes comma-separated names like {example}; got {given!r}")
    return names


def bench_command(args: argparse.Namespace) -> int:
    from fluid_npu.sampling.bench import BenchSettings, run_sampler_bench
    from fluid_npu.sampling.bench_report import unlossless_rows

    check_common(args)
    try:
        sizes = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            f"--batch-sizes takes integers like 1,8, got {args.batch_sizes!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"--batch-sizes needs positive integers like 1,8, got {args.batch_sizes!r}"
        )
    from fluid_npu.sampling.prompts import read_prompt_lines

    rows = read_prompt_lines(args.prompts)
    check_chat_flags(args, args.chat or any("messages" in r for _, r in rows))
    policies = None if args.policies is None else _names("--policies", args.policies, "ar,fixed:4")
    settings = BenchSettings(
        model=args.model,
        adapter=args.adapter,
        khead=args.khead,
        prompts=args.prompts,
        json_path=args.json,
        max_new_tokens=args.max_new_tokens,
        batch_sizes=sizes,
        policies=policies,
        loops=_names("--loops", args.loops, "fused,reference"),
        chat=args.chat,
        chat_template=args.chat_template_text,
        template_kwargs=args.template_kwargs,
        mask_token=args.mask_token,
        gen_kwargs=gen_kwargs(args),
        command=command_line(["fluid", "bench", "sampler"], args, BENCH_KEYS),
        repeats=args.repeats,
        static_baseline=not args.no_static_baseline,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    report = run_sampler_bench(settings)  # checks the settings before loading the model
    bad = unlossless_rows(report)
    if bad:
        print(
            f"fluid: {bad} of {len(report['rows'])} rows were not lossless "
            f"({report['mismatches']} mismatches); see {settings.json_path}",
            file=sys.stderr,
        )
        return 1
    return 0
