"""``fluid generate``, the sampler's command-line entry point (its shared flags: ``cli.py``).

``fluid generate --model DIR [--adapter DIR] [--khead DIR] --policy P --loop L
(--prompt TEXT [--output OUT.jsonl] | --prompts IN.jsonl --output OUT.jsonl) --max-new-tokens N
--batch-size B [--chat] [--device D] [--dtype auto|float32|bfloat16|float16] [--logprobs N]``:
one ``--prompt`` without ``--output`` streams its text to the terminal as steps commit tokens;
otherwise the prompts are decoded with ``B`` requests in flight (the engine refills a slot as soon
as its row finishes; ``--loop reference``: consecutive batches of ``B``) and written atomically,
one JSON line per prompt with ``prompt``, ``text``, ``token_ids`` (new tokens only), ``forwards``,
``tpf``, ``finish_reason`` and, with ``--logprobs`` (which needs ``--output``), ``logprobs`` /
``top_logprobs``. Statistics go to stderr.

A bad flag or prompt raises a ``FluidError`` subclass before the model loads where it can.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.cli import (
    PROMPTS_HELP,
    add_model_args,
    check_chat_flags,
    check_common,
    device_from_args,
    gen_kwargs,
    load_model,
)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="lossless elastic decoding with a FLUID model")
    add_model_args(p)
    p.add_argument("--policy", default="entropy", help="ar | fixed:K | entropy[:T] | khead")
    p.add_argument("--loop", default="fused", choices=("fused", "reference"))
    p.add_argument("--prompt", default=None, help="one prompt, streamed to the terminal")
    p.add_argument("--prompts", default=None, help=PROMPTS_HELP)
    p.add_argument("--output", default=None, help="JSONL to write (with --prompts)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling, exact"
    )
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k best (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling: min-p (0 = off)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty on prompt and output tokens, greedy or sampling "
        "(1 = off)",
    )
    p.add_argument(
        "--min-new-tokens", type=int, default=0, help="no EOS before this many new tokens"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling: prompt i is seeded seed + i")
    p.add_argument(
        "--stop", action="append", default=None, help="a stop string (repeat the flag for more)"
    )
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="write each token's log-probability and its N best alternatives (0-20)",
    )
    p.add_argument(
        "--logprobs-mode",
        default=None,
        help="what --logprobs writes (vLLM's modes): raw_logprobs (the model's own, the default) | "
        "processed_logprobs (the distribution the token was drawn from: penalties, grammar, "
        "temperature, top-k/top-p/min-p) | raw_logits | processed_logits",
    )
    p.add_argument(
        "--structured-outputs",
        default=None,
        metavar="JSON",
        help="hold every output to a grammar, vLLM's structured_outputs: one of json (a schema), "
        'regex, choice, grammar, json_object, e.g. \'{"regex": "[0-9]+"}\'',
    )
    p.set_defaults(handler=generate_command)


FLAGS = {"min_tokens": "--min-new-tokens", "top_logprobs": "--logprobs"}  # (params named otherwise)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``fluid generate``'s sampling flags as ``generate`` keywords (checked before loading)."""
    from fluid_npu.sampling.requests import LOGPROBS_MODES
    from fluid_npu.sampling.rules import MAX_TOP_LOGPROBS, SamplingParams

    logprobs = args.logprobs is not None
    if logprobs and not 0 <= args.logprobs <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"--logprobs N takes N in [0, {MAX_TOP_LOGPROBS}], got {args.logprobs}")
    if args.logprobs_mode is not None and args.logprobs_mode not in LOGPROBS_MODES:
        raise ConfigError(
            f"--logprobs-mode {args.logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}"
        )
    if args.logprobs_mode is not None and not logprobs:
        raise ConfigError("--logprobs-mode says what --logprobs N writes: add --logprobs N")
    try:
        SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            min_tokens=args.min_new_tokens,
            logprobs=logprobs,
            top_logprobs=args.logprobs or 0,
        )
    except ConfigError as exc:  # (the message leads with the parameter's name: say the flag's)
        name, _, rest = str(exc).partition(" ")
        raise ConfigError(f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {rest}") from None
    if args.min_new_tokens > args.max_new_tokens:  # (vLLM refuses min_tokens > max_tokens too)
        raise ConfigError(
            f"--min-new-tokens {args.min_new_tokens} exceeds --max-new-tokens "
            f"{args.max_new_tokens}: no row could end before its budget; lower it"
        )
    return {
        "do_sample": args.temperature > 0,
        "temperature": args.temperature if args.temperature > 0 else 1.0,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "min_new_tokens": args.min_new_tokens,
        "seed": args.seed,
        "stop_strings": args.stop or [],  # (given: the checkpoint's config supplies none)
        "stop_in_prompt": False,  # in the output only: the same text as fluid serve returns
        "logprobs": logprobs,
        "top_logprobs": args.logprobs or 0,
        **({"logprobs_mode": args.logprobs_mode} if args.logprobs_mode else {}),
    }


def generate_command(args: argparse.Namespace) -> int:
    from fluid_npu.io import check_output_file
    from fluid_npu.sampling.api import PromptError, eos_and_pad
    from fluid_npu.sampling.detok import output_text
    from fluid_npu.sampling.inputs import check_context, serving_eos
    from fluid_npu.sampling.lossless import special_ids_only
    from fluid_npu.sampling.policies import block_bound, parse_policy
    from fluid_npu.sampling.prompts import (
        empty_prompt,
        encode_prompt,
        left_pad,
        read_prompt_lines,
    )
    from fluid_npu.sampling.rules import finite_logprob
    from fluid_npu.sampling.specs import flag_grammar, json_object_flag

    check_common(args)
    sampling = sampling_kwargs(args)
    if args.loop != "fused" and (args.stop or args.logprobs is not None or args.structured_outputs):
        raise ConfigError("--stop, --logprobs and --structured-outputs need --loop fused")
    json_object_flag(args.structured_outputs, "--structured-outputs")  # (before the model loads)
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts IN.jsonl")
    if args.output is None and (args.prompts is not None or args.logprobs is not None):
        raise ConfigError(
            f"{'--prompts' if args.prompts is not None else '--logprobs'} needs --output "
            "OUT.jsonl (the rows, log-probabilities included, are written there)"
        )
    if args.prompt is not None:
        lines = [(1, {"prompt": args.prompt})]
        where = "--prompt"
    else:
        lines = read_prompt_lines(args.prompts)
        where = args.prompts
    for n, r in lines:  # what needs no model is checked before loading it
        if empty_prompt(r):
            raise PromptError(f"{where}:{n}: the prompt is empty; give some text")
    check_chat_flags(args, args.chat or any("messages" in r for _, r in lines))
    if args.output is not None:  # a path that cannot be written fails now, not after decoding
        check_output_file(args.output, "--output")
    fluid = load_model(args, device_from_args(args))
    tok = fluid.tokenizer
    prompts = [
        encode_prompt(
            tok, r, chat=args.chat, where=f"{where}:{n}", template_kwargs=args.template_kwargs
        )
        for n, r in lines
    ]
    # a prompt past the context is named by its line (the engine counts prompts from 0)
    horizon = parse_policy(args.policy, k_max=block_bound(args.k_max, fluid.khead),
                           has_khead=fluid.khead is not None).block_len  # fmt: skip
    check_context(fluid.model, [len(p.ids) for p in prompts], args.max_new_tokens, horizon,
                  names=[f"{where}:{n}: the prompt" if args.prompts else "the prompt"
                         for n, _ in lines])  # fmt: skip
    # the generation config's EOS ids and the tokenizer's own, as fluid serve (and vLLM) stop
    eos_ids, pad = eos_and_pad(fluid.model, serving_eos(fluid.model, tok), tok.pad_token_id)
    # every setting is the command's own: the checkpoint's generation config supplies none (its
    # EOS and pad ids aside), neither directly nor through a merge with a config passed
    fluid.model.generation_config = special_ids_only(fluid.model.generation_config)
    sampling = {**sampling, "eos_token_id": eos_ids}
    grammar = flag_grammar(
        json_object_flag(args.structured_outputs, "--structured-outputs"), tok, fluid.model
    )
    if grammar is not None:
        sampling["grammar"] = grammar
    if args.output is None:  # one --prompt: its text streamed to stdout
        return _stream_one(fluid, prompts[0].ids, args, sampling)
    out_rows = []
    # the engine (fused loop) keeps --batch-size slots busy, refilling each as its row finishes;
    # the reference loop decodes consecutive batches
    group = len(prompts) if args.loop == "fused" else args.batch_size
    kwargs = gen_kwargs(args)
    if args.loop == "fused":
        kwargs["engine_kwargs"] = {**kwargs.get("engine_kwargs", {}), "max_batch": args.batch_size}
    for start in range(0, len(prompts), group):
        chunk = prompts[start : start + group]
        ids, mask = left_pad([p.ids for p in chunk], pad)
        # a call seeds its row r with seed + r (no seed: 1 + r): prompt i is seeded seed + i
        # whichever batch it falls in, as the engine seeds it
        first = 1 if args.seed is None else args.seed
        fluid.generate(
            ids,
            mask,
            max_new_tokens=args.max_new_tokens,
            policy=args.policy,
            loop=args.loop,
            **kwargs,
            **{**sampling, "seed": first + start},
        )
        st, out = fluid.last_stats, fluid.last_output
        for i, p in enumerate(chunk):
            new = out.new_tokens[i]
            given = lines[start + i][1]
            row = {
                "prompt": p.text,
                **({"messages": given["messages"]} if "messages" in given else {}),
                "text": output_text(tok, p.ids, new, eos_ids),  # as fluid serve returns it
                "token_ids": new,
                "forwards": st.row_forwards[i],
                "tpf": st.row_tpf(i),
            }
            if out.finish_reasons is not None:
                row["finish_reason"] = out.finish_reasons[i]
            else:  # the reference loop stops at EOS or at the budget
                row["finish_reason"] = "stop" if new and new[-1] in eos_ids else "length"
            if out.logprobs is not None:  # (JSON has no -inf: NO_LOGPROB, as fluid serve)
                row["logprobs"] = [finite_logprob(v) for v in out.logprobs[i]]
            if out.top_logprobs is not None:
                row["top_logprobs"] = [
                    [[t, finite_logprob(v)] for t, v in top] for top in out.top_logprobs[i]
                ]
            out_rows.append(row)
        print(
            f"fluid: {min(start + len(chunk), len(prompts))}/{len(prompts)} prompts, "
            f"TPF {st.tpf:.2f}",
            file=sys.stderr,
        )
    from fluid_npu.sampling.prompts import write_jsonl_atomic

    path = write_jsonl_atomic(args.output, out_rows)
    print(f"fluid: wrote {len(out_rows)} rows to {path}", file=sys.stderr)
    return 0


class _TextStream:
    """Prints an output's text as it grows (whole characters only; ``detok.py``)."""

    def __init__(self, tokenizer: Any, prompt: list[int], eos_ids: list[int]) -> None:
        from fluid_npu.sampling.detok import Detokenizer

        self.detok = Detokenizer(tokenizer, prompt=prompt, eos_ids=eos_ids)

    def __call__(self, row: int, tokens: list[int]) -> None:
        sys.stdout.write(self.detok.add(tokens))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.detok.flush() + "\n")
        sys.stdout.flush()


def _stream_one(
    fluid: Any, ids: list[int], args: argparse.Namespace, sampling: dict[str, Any]
) -> int:
    import torch

    stream = _TextStream(fluid.tokenizer, ids, sampling["eos_token_id"])
    fluid.generate(
        torch.tensor([ids]),
        None,
        max_new_tokens=args.max_new_tokens,
        policy=args.policy,
        loop=args.loop,
        stream=stream,
        **gen_kwargs(args),
        **sampling,
    )
    stream.close()
    st = fluid.last_stats
    print(
        f"fluid: {st.total_new_tokens} tokens in {st.decode_forwards} forwards "
        f"(+{st.prefill_forwards} prefill), TPF {st.tpf:.2f}, {st.tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0
