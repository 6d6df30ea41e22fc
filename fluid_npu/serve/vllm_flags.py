"""vLLM's ``vllm serve`` flags that a copied command line carries, for ``fluid serve`` and
``fluid run-batch``: those this server does something with (``--root-path``,
``--uvicorn-log-level``; ``--trust-remote-code`` is a model flag, in ``cli.py``), and those that
ask for what it does anyway — accepted and changing nothing (``--enable-prefix-caching``: on by
default; ``--disable-log-requests`` / ``--disable-log-stats`` / ``--disable-uvicorn-access-log``:
nothing is logged unless asked; ``--disable-fastapi-docs``: no docs page;
``--enable-tokenizer-info-endpoint`` / ``--enable-server-load-tracking``: ``/tokenizer_info``
and ``/load`` are always there; ``--enable-prompt-tokens-details``: usage always has them). One
that contradicts another flag is one error naming both.

Most of the rest of ``vllm serve``'s flags, so a copied command line gets an answer for each
rather than "unrecognized arguments" (as ``LLM``'s keywords do, ``sampling/llm_compat.py``): at
the value that changes nothing here (``--pipeline-parallel-size 1``, ``--kv-cache-dtype auto``,
``--tokenizer`` the model's own directory, ...) one is accepted; a setting of vLLM's own
scheduler or cache (``--block-size``, ``--swap-space``, ``--max-num-batched-tokens``, ...), which
changes no output and has no counterpart in this engine (its slots, prefill chunks and cache are
its own), is accepted and named in one note on stderr; any other value is one error naming the
flag and what to do instead (``--enable-lora``: ``--adapter DIR``; ``--speculative-config``:
FLUID drafts with the model itself, ``--policy`` / ``--khead``; ``--quantization``: no quantized
kernels). They are left out of ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys

from fluid_npu.errors import ConfigError

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_ALREADY = (
    ("--enable-prefix-caching", "on by default (--no-enable-prefix-caching turns it off)"),
    ("--disable-log-requests", "requests are logged only with --enable-log-requests"),
    ("--disable-log-stats", "no periodic statistics are logged (/metrics has them)"),
    ("--disable-uvicorn-access-log", "no access log is written"),
    ("--disable-fastapi-docs", "no /docs page is served"),
    ("--enable-tokenizer-info-endpoint", "/tokenizer_info is always served"),
    ("--enable-server-load-tracking", "/load is always served"),
    ("--enable-prompt-tokens-details", "usage's prompt_tokens_details is always given"),
)


_DOWNLOAD = "nothing is downloaded: the model is a local directory"
_TEXT = "this server reads and writes text"
# a value flag -> (its values that change nothing here, lower-cased; what to do instead)
_NEUTRAL: dict[str, tuple[tuple[str, ...], str]] = {
    "--task": (("auto", "generate"), _TEXT),
    "--runner": (("auto", "generate"), _TEXT),
    "--tokenizer-mode": (("auto", "hf"), "the model's own (fast) tokenizer is used"),
    "--quantization": (("none",), "weights load in --dtype (auto: the checkpoint's); there are "
                       "no quantized kernels here"),
    "--revision": ((), _DOWNLOAD),
    "--tokenizer-revision": ((), _DOWNLOAD),
    "--code-revision": ((), _DOWNLOAD),
    "--download-dir": ((), _DOWNLOAD),
    "--hf-token": ((), _DOWNLOAD),
    "--load-format": (("auto", "safetensors"), "weights load as transformers loads them"),
    "--pipeline-parallel-size": (("1",), "an engine holds the whole model on one device; "
                                 "--data-parallel-size N serves copies"),
    "--distributed-executor-backend": (("mp", "uni"), "one process runs each engine"),
    "--kv-cache-dtype": (("auto",), "the KV cache holds the model's dtype (--dtype)"),
    "--cpu-offload-gb": (("0", "0.0"), "the weights stay on one device"),
    "--speculative-config": (("{}", "null"), "FLUID drafts with the model itself (--policy, "
                             "--khead): there is no draft model"),
    "--guided-decoding-backend": (("auto", "xgrammar"), "structured outputs use xgrammar"),
    "--model-impl": (("auto", "transformers"), "the model loads with transformers"),
    "--limit-mm-per-prompt": (("{}",), _TEXT),
    "--hf-overrides": (("{}",), "edit the model's config.json instead"),
    "--chat-template-content-format": (("auto", "string"), "the chat template gets each "
                                       "message's text as one string, text parts joined one per "
                                       "line (vLLM's 'string' format)"),
    "--response-role": (("assistant",), "answers come from the assistant role"),
    "--api-server-count": (("1",), "one HTTP process fronts the engines; --data-parallel-size N "
                           "serves copies"),
    "--config": ((), "give the flags on the command line"),
}  # fmt: skip
_SECRET = ("--hf-token",)  # (its value is never repeated in an error)
_SHORT = {"--quantization": "-q", "--pipeline-parallel-size": "-pp", "--compilation-config": "-O"}
_ADAPTERS = "a Stage I LoRA adapter merges at load: --adapter DIR (or fluid merge it)"
_REFUSED_SWITCHES = {
    "--enable-lora": _ADAPTERS,
    "--enable-sleep-mode": "the model stays loaded",
    "--disable-sliding-window": "a sliding-window model decodes within its window (--max-len "
    "is capped by it)",
}
# vLLM's own scheduler / cache / compilation settings: no output changes, no counterpart here
_ENGINE_ONLY = (
    "--block-size", "--swap-space", "--max-num-batched-tokens", "--max-seq-len-to-capture",
    "--num-gpu-blocks-override", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
    "--preemption-mode", "--num-scheduler-steps", "--cuda-graph-sizes", "--scheduler-delay-factor",
    "--long-prefill-token-threshold", "--max-num-partial-prefills", "--max-long-partial-prefills",
    "--compilation-config",
)  # fmt: skip
_ENGINE_SWITCHES = (
    "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--disable-custom-all-reduce",
    "--async-scheduling", "--disable-async-output-proc", "--disable-frontend-multiprocessing",
    "--enable-expert-parallel",
)  # fmt: skip


def _dest(flag: str) -> str:
    return "vllm_" + flag.lstrip("-").replace("-", "_")


def add_vllm_flags(p: argparse.ArgumentParser, *, http: bool) -> None:
    """Add the flags (``http``: the server's own too: ``--root-path``, ``--uvicorn-log-level``)."""
    for flag, why in _ALREADY:
        p.add_argument(flag, action="store_true", help=f"vLLM's; accepted: {why}")
    hidden = argparse.SUPPRESS
    for flag in (*_NEUTRAL, "--tokenizer", *_ENGINE_ONLY):
        names = (flag, _SHORT[flag]) if flag in _SHORT else (flag,)
        bare = {"nargs": "?", "const": "true"} if flag == "--hf-token" else {}  # (vLLM's: bare)
        p.add_argument(*names, dest=_dest(flag), default=None, help=hidden, **bare)
    for flag in (*_REFUSED_SWITCHES, *_ENGINE_SWITCHES):
        p.add_argument(flag, dest=_dest(flag), action="store_true", help=hidden)
    p.add_argument("--lora-modules", dest=_dest("--lora-modules"), nargs="+", help=hidden)
    if http:
        p.add_argument(
            "--root-path",
            default="",
            help="the path prefix a proxy in front strips (FastAPI's root_path, vLLM's flag)",
        )
        p.add_argument(
            "--uvicorn-log-level",
            default="warning",
            choices=UVICORN_LOG_LEVELS,
            help="uvicorn's own log level (default warning)",
        )


def check_vllm_flags(args: argparse.Namespace) -> None:
    """A vLLM flag that contradicts one of this server's: one error naming both; one this server
    has no use for at the value given: one error naming it and what to do instead (module
    docstring); vLLM's engine settings given: one note naming them."""
    for flag, (neutral, why) in _NEUTRAL.items():
        value = getattr(args, _dest(flag), None)
        if value is not None and value.strip().lower() not in neutral:
            given = flag if flag in _SECRET else f"{flag} {value}"
            raise ConfigError(f"{given}: {why}; leave {flag} out")
    tokenizer = getattr(args, _dest("--tokenizer"), None)
    if tokenizer is not None and not same_dir(tokenizer, args.model):
        raise ConfigError(
            f"--tokenizer {tokenizer}: the tokenizer is the model directory's own (with its MASK "
            "token); copy its files into the model directory and leave --tokenizer out"
        )
    for flag, why in _REFUSED_SWITCHES.items():
        if getattr(args, _dest(flag), False):
            raise ConfigError(f"{flag}: {why}; leave {flag} out")
    if getattr(args, _dest("--lora-modules"), None):
        raise ConfigError(f"--lora-modules: this server serves one model; {_ADAPTERS}")
    ignored = [f for f in _ENGINE_ONLY if getattr(args, _dest(f), None) is not None]
    ignored += [f for f in _ENGINE_SWITCHES if getattr(args, _dest(f), False)]
    if ignored:
        print(
            f"fluid: note: {', '.join(ignored)}: vLLM's own scheduler and cache settings, which "
            "change no output and have no counterpart in this engine (its slots, prefill chunks "
            "and cache are its own): ignored",
            file=sys.stderr,
        )
    if args.enable_prefix_caching and args.no_enable_prefix_caching:
        raise ConfigError(
            "--enable-prefix-caching and --no-enable-prefix-caching contradict each other; give one"
        )
    if args.disable_log_requests and args.enable_log_requests:
        raise ConfigError(
            "--disable-log-requests and --enable-log-requests contradict each other; give one"
        )


def model_given(args: argparse.Namespace) -> str:
    """The model directory: ``fluid serve MODEL`` (as ``vllm serve MODEL``) or ``--model``; both
    naming two directories, or neither, is one error."""
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and not same_dir(tag, args.model):
        raise ConfigError(
            f"fluid {args.command} {tag} and --model {args.model} name two models; give one"
        )
    model = tag or args.model
    if not model:
        where = "MODEL_DIR (or --model DIR)" if args.command == "serve" else "--model DIR"
        names = args.served_model_name or []
        taken = (  # (a list flag before it takes MODEL as one of its values, as in vLLM)
            f"; --served-model-name took {names[-1]!r} as a name: put the model first"
            if names and os.path.isdir(names[-1])
            else ""
        )
        raise ConfigError(
            f"fluid {args.command} needs a model: fluid {args.command} {where}{taken}"
        )
    return model


def same_dir(a: str, b: str | None) -> bool:
    """Whether ``a`` and ``b`` name the same directory (the same path where neither exists)."""
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b or "")
