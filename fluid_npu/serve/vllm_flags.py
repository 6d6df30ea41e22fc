"""vLLM's ``vllm serve`` flags that a copied command line carries, for ``fluid serve`` and
``fluid run-batch``: those this server does something with (``--root-path``,
``--uvicorn-log-level``; ``--trust-remote-code`` is a model flag, in ``cli.py``), and those that
ask for what it does anyway — accepted and changing nothing (``--enable-prefix-caching``: on by
default; ``--disable-log-requests`` / ``--disable-log-stats`` / ``--disable-uvicorn-access-log``:
nothing is logged unless asked; ``--disable-fastapi-docs``: no docs page;
``--enable-tokenizer-info-endpoint`` / ``--enable-server-load-tracking``: ``/tokenizer_info``
and ``/load`` are always there). One that contradicts another flag is one error naming both.
"""

from __future__ import annotations

import argparse

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
)


def add_vllm_flags(p: argparse.ArgumentParser, *, http: bool) -> None:
    """Add the flags (``http``: the server's own too: ``--root-path``, ``--uvicorn-log-level``)."""
    for flag, why in _ALREADY:
        p.add_argument(flag, action="store_true", help=f"vLLM's; accepted: {why}")
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
    """A vLLM flag that contradicts one of this server's: one error naming both."""
    if args.enable_prefix_caching and args.no_enable_prefix_caching:
        raise ConfigError(
            "--enable-prefix-caching and --no-enable-prefix-caching contradict each other; give one"
        )
    if args.disable_log_requests and args.enable_log_requests:
        raise ConfigError(
            "--disable-log-requests and --enable-log-requests contradict each other; give one"
        )
