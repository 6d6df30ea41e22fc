"""The sampler's command-line flags and helpers that ``fluid generate`` (``generate_cli.py``),
``fluid bench sampler`` (``bench_cli.py``), ``fluid eval`` and ``fluid bench serve`` share.

Bad input raises ``FluidError`` subclasses, which ``fluid_npu.cli`` prints as one line before
exiting with status 2.

``--device`` (default ``auto``: ``fluid_npu.device.current()``, the best available accelerator, else
the CPU) names the device type to run on; one that is not available is a ``ConfigError``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.defaults import DEFAULT_ANCHORS

if TYPE_CHECKING:
    import torch

    from fluid_npu.sampling.pretrained import FluidForCausalLM


PROMPTS_HELP = "JSONL with 'prompt' (text), 'input_ids' or 'messages' (a chat) per line"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags every sampler command shares: model, adapter, K-head, sampler and device."""
    p.add_argument("--model", required=True, help="base (or merged) HF model directory")
    p.add_argument("--adapter", default=None, help="Stage I LoRA adapter directory")
    p.add_argument("--khead", default=None, help="Stage II K-head directory")
    p.add_argument("--mask-token", default=None, help="MASK token (default: the tokenizer's)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model directory's own code where it needs it (openPangu's tokenizer)",
    )
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (a file, or the template itself) instead of the tokenizer's",
    )
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="the chat template's variables, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument(
        "--k-max", type=int, default=None, help="largest horizon (default: K-head's, 16)"
    )
    p.add_argument(
        "--anchors",
        type=int,
        default=DEFAULT_ANCHORS,
        help="fused loop: the most draft blocks per step (the engine adds the second only while "
        "it is cheap)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default: the best available accelerator, else the CPU) or a device to "
        "force: a type (npu, cuda, cpu) or one card (npu:1); an unavailable one is an error",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the engine's decode step under torch.compile: inductor on a CPU, with CUDA "
        "graphs (reduce-overhead) on CUDA, TorchAir's reduce-overhead graph mode (aclgraph; "
        "needs torchair, not yet run on a 910B) on an Ascend NPU: slower first steps, faster "
        "ones after",
    )
    p.add_argument(
        "--no-adaptive-drafting",
        action="store_true",
        help="fused loop: every step drafts the policy's blocks (the draft budget off: no choices "
        "from measured step costs): the same TPF on any machine, not the fastest",
    )
    p.add_argument(
        "--no-enable-prefix-caching",
        action="store_true",
        help="every prompt encoded whole (by default a prompt that starts with what a free slot's "
        "cache still holds, e.g. a shared few-shot prefix, encodes only the rest)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (the checkpoint's) | float32 | bfloat16 | float16: the dtype the model runs in",
    )
    p.add_argument(
        "--attn-backend",
        default=None,
        help="reference loop: sdpa (default) | eager | auto | reference | blocked | npu | triton "
        "(the fused loop's engine attends over its slot cache itself)",
    )


def check_common(args: argparse.Namespace) -> None:
    """Check the shared flags that need no model; one ``ConfigError`` names the bad one."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.k_max is not None and args.k_max < 1:
        raise ConfigError(f"--k-max must be at least 1, got {args.k_max}")
    if args.anchors < 1:
        raise ConfigError(
            f"--anchors must be at least 1 (the most draft blocks per step), got {args.anchors}"
        )
    from fluid_npu.sampling.inputs import check_attn_backend, parse_dtype
    from fluid_npu.sampling.prompts import parse_template_kwargs, read_chat_template

    if getattr(args, "loops", None) is not None:  # fluid bench sampler: several
        loops, fix = [s.strip() for s in args.loops.split(",")], "--loops reference"
    else:
        loops, fix = [getattr(args, "loop", "fused")], "--loop reference"
    check_attn_backend(args.attn_backend, loops, flag="--attn-backend", fix=fix)
    parse_dtype(getattr(args, "dtype", "auto"))
    template = getattr(args, "chat_template", None)
    args.chat_template_text = None if template is None else read_chat_template(template)
    args.template_kwargs = parse_template_kwargs(getattr(args, "chat_template_kwargs", None))


def check_chat_flags(args: argparse.Namespace, chat_prompts: bool) -> None:
    """``--chat-template`` and ``--chat-template-kwargs`` only shape chat prompts (``--chat`` or
    ``messages`` lines): given without any, a ``ConfigError`` rather than a flag with no effect."""
    given = [
        flag
        for flag, value in (
            ("--chat-template", getattr(args, "chat_template", None)),
            ("--chat-template-kwargs", getattr(args, "chat_template_kwargs", None)),
        )
        if value is not None
    ]
    if given and not chat_prompts:
        raise ConfigError(
            f"{' and '.join(given)} shape chat prompts, and none is rendered here: add --chat "
            '(or give "messages" lines), or leave them out'
        )


def device_from_args(args: argparse.Namespace) -> torch.device:
    """The ``--device`` to run on, and that ``--attn-backend`` can run there (checked before any
    model is loaded)."""
    from fluid_npu import device as devices
    from fluid_npu.model.attention import check_backend

    dev = devices.claim(force=args.device)
    if getattr(args, "attn_backend", None) is not None:
        check_backend(args.attn_backend, dev.type, flags=True)
    return dev


def load_model(args: argparse.Namespace, dev: torch.device) -> FluidForCausalLM:
    """The ``FluidForCausalLM`` the flags name, on ``dev``."""
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.prompts import quiet_loading

    with quiet_loading():
        return FluidForCausalLM.from_pretrained(
            args.model,
            args.adapter,
            args.khead,
            mask_token=args.mask_token,
            device=dev,
            dtype=getattr(args, "dtype", "auto"),
            chat_template=getattr(args, "chat_template_text", None),
            trust_remote_code=args.trust_remote_code,
        )


def gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler keywords the flags set (``k_max``, ``anchors``, ``attn_backend``, and the
    engine's ``compile``, ``adaptive`` and ``prefix_caching``)."""
    out: dict[str, Any] = {
        "k_max": args.k_max,
        "anchors": args.anchors,
        "attn_backend": args.attn_backend,
    }
    engine = engine_switches(
        compile=getattr(args, "compile", False),
        adaptive=not getattr(args, "no_adaptive_drafting", False),
        prefix_caching=not getattr(args, "no_enable_prefix_caching", False),
    )
    if engine:
        out["engine_kwargs"] = engine
    return out


def engine_switches(*, compile: bool, adaptive: bool, prefix_caching: bool) -> dict[str, Any]:
    """The decode engine's keywords for its switches, those away from their defaults (compile
    off, adaptive drafting and prefix caching on): what ``--compile``,
    ``--no-adaptive-drafting`` and ``--no-enable-prefix-caching`` set, and lm-eval's model_args."""
    given = {"compile": compile, "adaptive": adaptive, "prefix_caching": prefix_caching}
    default = {"compile": False, "adaptive": True, "prefix_caching": True}
    return {k: v for k, v in given.items() if v != default[k]}


def command_line(words: Sequence[str], args: argparse.Namespace, keys: Sequence[str]) -> str:
    """The command that reproduces a run: ``words``, then ``--key value`` for each key that is set.

    A ``True`` flag is written bare, a list as its items; ``None`` and ``False`` are left out.
    """
    parts = list(words)
    for key in keys:
        value = getattr(args, key, None)
        if value is None or value is False:
            continue
        parts.append(f"--{key.replace('_', '-')}")
        if isinstance(value, (list, tuple)):
            parts += [shlex.quote(str(v)) for v in value]
        elif value is not True:
            parts.append(shlex.quote(str(value)))  # (a JSON value's quotes and spaces kept)
    return " ".join(parts)
