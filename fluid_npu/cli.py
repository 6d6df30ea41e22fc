"""The ``fluid`` command (train, merge, generate, bench, eval, demo, real, serve, run-batch), one
error style.

A bad input (a ``FluidError``: config, dataset, checkpoint, prompt, flag) prints one line on stderr
— ``fluid: error: <what is wrong and how to fix it>`` — and exits with status 2; the traceback is
shown only with ``--debug``. Subcommands live beside what they run and register themselves here
through ``add_parser`` functions, so this file stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence

from fluid_npu.errors import FluidError

# (module, function adding the subcommand's parser); each handler returns an exit code.
SUBCOMMANDS = (
    ("fluid_npu.cli", "_add_train"),
    ("fluid_npu.cli", "_add_merge"),
    ("fluid_npu.sampling.generate_cli", "add_generate_parser"),
    ("fluid_npu.sampling.bench_cli", "add_bench_parser"),
    ("fluid_npu.eval.cli", "add_eval_parser"),
    ("fluid_npu.demo", "add_demo_parser"),
    ("fluid_npu.real", "add_real_parser"),
    ("fluid_npu.serve.cli", "add_serve_parser"),
    ("fluid_npu.serve.cli", "add_run_batch_parser"),
    ("fluid_npu.serve.bench_cli", "add_bench_serve_parser"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise FluidError(f"{message} (see `{self.prog} --help`)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train Stage I or Stage II from a YAML recipe")
    p.add_argument("config", help="YAML recipe (LLaMA-Factory key names + FLUID keys)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from fluid_npu.config import load_config

    cfg = load_config(args.config, args.overrides)
    before = {k: os.environ.get(k) for k in ONE_PROCESS}
    if (cfg.train.deepspeed or cfg.train.fsdp) and one_process_environment(os.environ):
        logging.getLogger("fluid_npu").warning(
            "deepspeed / fsdp without a launcher: training as one process on one device "
            "(several devices: bash run_npu.sh train, or torchrun)"
        )
    try:
        if cfg.fluid.stage == "fluid_stage1":
            from fluid_npu.train.stage1 import run_stage1

            record = run_stage1(cfg)
        else:
            from fluid_npu.train.stage2 import run_stage2

            record = run_stage2(cfg)
    finally:  # (a later run in this process is not distributed by what this one set)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    keys = ("train_loss", "loss_ar", "loss_diff", "khead_exact_acc")
    summary = ", ".join(f"{k}={record[k]:.4f}" for k in keys if isinstance(record.get(k), float))
    if is_main_process():  # torchrun runs one process per device: one line, not one per rank
        print(f"fluid: {cfg.fluid.stage} finished -> {cfg.train.output_dir} ({summary})")
    if _close_process_group() and os.environ.get("TORCHELASTIC_RUN_ID"):
        _exit_without_teardown()
    return 0


# what one_process_environment sets, and what says a launcher started this process
ONE_PROCESS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHED = ("WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def one_process_environment(env: MutableMapping[str, str]) -> bool:
    """Where no launcher set the distributed environment (``WORLD_SIZE`` / ``LOCAL_RANK``), set
    that of one process on a free local port, as transformers' docs do for DeepSpeed in a notebook
    (DeepSpeed and FSDP need a process group, which the Trainer makes from it); returns whether
    it did. LLaMA-Factory's ``llamafactory-cli train`` starts torchrun itself instead."""
    if any(k in env for k in LAUNCHED):  # (torchrun's, or an MPI / Slurm launch's own)
        return False
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    return True


def _close_process_group() -> bool:
    """Leave the process group together: every rank waits for the others, then tears it down.
    Returns whether there was a group to leave."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def _exit_without_teardown() -> None:
    """End a finished torchrun worker at once, skipping interpreter finalization.

    Everything the run promised (checkpoints, adapter, ``run.json``) is on disk and the process
    group is destroyed, yet on gloo a DeepSpeed ZeRO-3 rank still aborted during finalization now
    and then ("terminate called without an active exception": twice in this project's CI, never
    in 20 local runs), the known gloo hazard of C++ collective work freed while the interpreter is
    torn down. torchrun then reports the
    whole finished run as failed. Flushing the streams and leaving with ``os._exit(0)`` removes
    that window; it runs only after a clean finish, so any real failure still surfaces."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def is_main_process() -> bool:
    """Whether this is rank 0 of a distributed run (or not a distributed run at all)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a Stage I LoRA adapter into its base model")
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="Stage I adapter directory")
    p.add_argument("--output", required=True, help="where the merged HF model is written")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle .bin base")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model directory's own code where it needs it (openPangu's tokenizer)",
    )
    p.add_argument(
        "--max-shard-size",
        help="largest safetensors file written (LLaMA-Factory's export_size), e.g. 500MB "
        "(default 5GB)",
    )
    p.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    from fluid_npu.model.merge import merge_adapter

    size = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
    out = merge_adapter(
        args.base, args.adapter, args.output, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, **size,
    )  # fmt: skip
    print(f"fluid: merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fluid",
        description="FLUID on Ascend NPUs, CUDA and CPU: Stage I / II training, the elastic "
        "sampler, benchmarks and the CPU demo.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module_name, fn in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        adder: Callable[[argparse._SubParsersAction], None] = getattr(module, fn)
        adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLUID_DEBUG") == "1"
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return 0
        return int(args.handler(args) or 0)
    except FluidError as exc:
        if debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fluid: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fluid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
