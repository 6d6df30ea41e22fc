"""The flags of ``fluid bench serve`` (``fluid_npu.serve.bench``), registered with the CLI.

It starts one ``fluid serve`` per policy — the FLUID policy and ``ar`` by default, the model flags
of ``fluid serve`` (``cli.py``) otherwise the same — and loads each with the same requests, or loads
a running server given by ``--url`` (whose own settings hold: a server flag given with ``--url`` is
an error, not silently dropped).
"""

from __future__ import annotations

import argparse
import os

from fluid_npu.errors import ConfigError
from fluid_npu.serve.cli import SERVER_KEYS, SERVER_SWITCHES, _add_model_flags, need_serve_extra


def add_bench_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``fluid bench serve``: a target of the ``bench`` command the sampler registers."""
    bench = sub.choices.get("bench")
    if bench is None:
        raise RuntimeError("register `fluid bench` before `fluid bench serve`")
    targets = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    s = targets.add_parser("serve", help="load `fluid serve`: throughput, TTFT, ITL vs ar")
    _add_model_flags(s)
    s.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model ids the servers started here answer to (vLLM's flag; the load names the "
        "first, as /v1/models lists it)",
    )
    s.add_argument("--url", default=None, help="load this running server instead (no --model)")
    s.add_argument(
        "--policies", default=None, help="comma-separated (default: khead or entropy,ar)"
    )
    s.add_argument(
        "--prompts",
        required=True,
        help="JSONL with 'prompt' (text) or 'messages' (a conversation, sent to the chat route) "
        "per line",
    )
    s.add_argument("--json", required=True, help="where the JSON report is written")
    s.add_argument("--num-requests", type=int, default=64, help="requests per policy")
    s.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    s.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    s.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request")
    s.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-tokens each")
    s.add_argument("--chat", action="store_true", help="send prompts to /v1/chat/completions")
    s.add_argument(
        "--structured-outputs",
        default=None,
        metavar="JSON",
        help='vLLM\'s structured_outputs sent with every request, e.g. \'{"regex": "[0-9]+"}\'',
    )
    s.add_argument(
        "--check-lossless",
        action="store_true",
        help="ask for token ids and judge every output that differs from ar's in fp32 (the model "
        "loaded here once the servers stop): a near-tie of the served dtype, or a failure",
    )
    s.add_argument("--warmup", type=int, default=4, help="untimed requests first, per server")
    s.add_argument("--rounds", type=int, default=4, help="slices visiting the servers in turn")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    s.add_argument(
        "--api-key",
        default=None,
        help="bearer key of the servers (default: $FLUID_API_KEY; servers started here get it)",
    )
    # what a server flag is when not given: with --url, a flag set otherwise is an error
    defaults = {
        key: s.get_default(key) for key in (*SERVER_KEYS, *SERVER_SWITCHES, "served_model_name")
    }
    s.set_defaults(handler=bench_serve_command, server_defaults=defaults)


def bench_serve_command(args: argparse.Namespace) -> int:
    need_serve_extra()
    from fluid_npu.sampling.cli import command_line
    from fluid_npu.sampling.specs import json_object_flag
    from fluid_npu.serve.bench import BENCH_KEYS, ServeBenchSettings, run_serve_bench

    if (args.url is None) == (args.model is None):
        raise ConfigError("give exactly one of --model DIR (servers started here) or --url URL")
    if args.url is not None:
        spelled = {"max_len": "--max-len (--max-model-len)", "max_batch":
                   "--max-batch (--max-num-seqs)"}  # fmt: skip
        given = [
            spelled.get(key, f"--{key.replace('_', '-')}")
            for key, default in args.server_defaults.items()
            if getattr(args, key) != default
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} configure the servers started here (--model DIR), and the "
                "server at --url runs with its own settings: drop them, or start it with them"
            )
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else None
    settings = ServeBenchSettings(
        prompts=args.prompts,
        json_path=args.json,
        url=args.url,
        policies=policies,
        num_requests=args.num_requests,
        rate=args.rate,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        chat=args.chat,
        structured_outputs=json_object_flag(args.structured_outputs, "--structured-outputs"),
        warmup=args.warmup,
        rounds=args.rounds,
        seed=args.seed,
        api_key=args.api_key or os.environ.get("FLUID_API_KEY") or None,
        check_lossless=args.check_lossless,
        server_args=_server_args(args),
        command=command_line(["fluid", "bench", "serve"], args, BENCH_KEYS),
    )
    report = run_serve_bench(settings)
    return 1 if report["failed_requests"] else 0


def _server_args(args: argparse.Namespace) -> list[str]:
    """The ``fluid serve`` flags a spawned server gets from the bench's own flags."""
    out: list[str] = []
    for key in ("model", *SERVER_KEYS):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    out += ["--compile"] if args.compile else []
    out += ["--no-engine-process"] if args.no_engine_process else []
    out += ["--no-adaptive-drafting"] if args.no_adaptive_drafting else []
    out += ["--no-enable-prefix-caching"] if args.no_enable_prefix_caching else []
    out += ["--trust-remote-code"] if args.trust_remote_code else []
    out += ["--served-model-name", *args.served_model_name] if args.served_model_name else []
    return out
