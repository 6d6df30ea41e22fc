"""The lm-evaluation-harness model type ``fluid``: generation through the elastic sampler,
log-likelihoods through the AR path of the same adapted model.

Importing this module registers the model (``lm_eval.api.registry``), so any lm-eval task runs on
a FLUID model::

    import fluid_npu.eval.harness  # noqa: F401  (registers "fluid")
    lm_eval.simple_evaluate(model="fluid", model_args="model=DIR,khead=DIR,policy=khead", ...)

or from the shell, ``python -m fluid_npu.eval run --model fluid --model_args ... --device cpu``
(lm-eval's own command line with the model registered). The batch size and the device
(``auto``, ``cpu``, ``cuda:0``, ``npu``, …) are lm-eval's ``--batch_size`` / ``--device``, which
its command line always passes; given in ``model_args`` too, the ``model_args`` value wins.
``model_args``: ``model`` (base or merged directory), ``adapter``, ``khead``, ``policy`` (default
``khead`` with a K-head, else ``entropy``), ``loop``, ``max_gen_toks`` (default 256),
``max_length``, ``k_max``, ``mask_token``, ``dtype`` (``auto``, ``float32``, ``bfloat16``,
``float16``), the loader's ``chat_template`` (a template or a file holding one),
``trust_remote_code`` and ``allow_pickle`` (lm-eval's ``--trust_remote_code`` sets the first),
``hf``'s reasoning-model options ``enable_thinking`` (a chat template variable; it needs
``think_end_token`` and refuses log-likelihood tasks), ``chat_template_args`` (the template's
variables, a dict or its JSON) and ``think_end_token`` (a text, or a token id: a generation's
text up to its last one is removed before the ``until`` cut), and the decode engine's switches
``compile`` (False), ``adaptive_drafting`` and ``prefix_caching`` (True; ``fluid eval``'s
``--compile``, ``--no-adaptive-drafting``, ``--no-enable-prefix-caching``); an unknown one is a
``ConfigError``. A loaded ``FluidForCausalLM`` can be passed directly: ``FluidLM(fluid=...)``.

* ``generate_until``: greedy decoding is lossless (the sampler's contract). The request's
  generation kwargs are read as lm-eval's ``hf`` model reads them (``normalize_gen_kwargs``:
  ``max_gen_toks`` or its aliases ``max_new_tokens`` / ``max_tokens`` / ``max_completion_tokens``;
  ``do_sample: false`` or temperature 0 is greedy; a temperature above 0 without ``do_sample``
  samples); decoding ends at the first ``until`` string or at an EOS token — the generation
  config's or the tokenizer's, as ``fluid serve`` ends an output (``hf`` adds the tokenizer's EOS
  to ``until``) — and the text is cut as ``hf`` cuts it (``postprocess_generated_text``: at each
  string in the order given). ``repetition_penalty`` and ``min_new_tokens`` apply as in
  transformers; sampling takes ``temperature``, ``top_k``, ``top_p``, ``min_p`` (unset: the
  generation config's, as transformers) and ``seed``; in greedy decoding those and ``typical_p``
  change nothing (transformers ignores them too); any other setting is a ``ConfigError`` naming it.
  Prompts are rendered like ``fluid eval``'s (the ``empty`` template) and decoded in batches of
  ``batch_size``; the calls' statistics (TPF, K histogram) accumulate in ``generation_stats``.
* ``loglikelihood`` / ``loglikelihood_rolling``: one plain forward of the model (right-padded
  batches), as lm-eval's ``hf`` model scores them: the context's trailing spaces move to the
  continuation, an empty context is the BOS (else EOS) token — the continuation's own first token
  where it is that one — long inputs keep their last ``max_length`` tokens, and rolling windows
  come from lm-eval's own ``get_rolling_token_windows``.
* ``apply_chat_template`` (``--apply_chat_template``) renders as ``hf`` does: without a generation
  prompt the last turn stays open (a task's ``gen_prefix``), and a template that refuses a system
  turn gets the conversation without it; ``chat_template_args`` / ``enable_thinking`` are passed.

lm-eval is the ``eval`` extra; without it importing this module raises a ``ConfigError`` saying
how to install it, and nothing else in ``fluid_npu`` imports it (``harness_generation.py``, its
reading of a generation request, is imported by it alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from fluid_npu.errors import ConfigError

try:
    # lm-eval's own models first: its registry imports them only while it is empty, so a model
    # registered before that would leave hf, vllm, ... unknown in this process
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as _exc:  # the harness was asked for without the eval extra
    raise ConfigError(
        f"the lm-eval model type `fluid` needs lm-evaluation-harness ({_exc}); "
        "install it with: pip install 'fluid-npu[eval]'"
    ) from None

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # for batch_size=auto
TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
DEFAULT_MAX_GEN_TOKS = 256


def _device(device: str | None) -> torch.device:
    from fluid_npu import device as devices

    text = "auto" if device is None else str(device)
    try:
        return devices.claim(force=text)
    except ConfigError as exc:  # lm-eval's command line asks for cuda unless told otherwise
        raise ConfigError(
            f"{exc}; with lm-eval's command line pass --device cpu | cuda | npu | auto"
        ) from None


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"batch_size must be a positive integer or auto, got {value!r}")
    return size


def _flag(name: str, value: Any) -> bool:
    """A boolean model_arg: True / False, or their spelling in a string (as lm-eval passes)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"model_args {name}={value!r} must be True or False")
    return value


def _chat_args(enable_thinking: Any, given: Any, think_end_token: Any) -> dict[str, Any]:
    """The chat template's variables as lm-eval's ``hf`` model sets them: ``chat_template_args``
    (a dict, or its JSON) and ``enable_thinking`` (which needs ``think_end_token``)."""
    if isinstance(given, str):
        with contextlib.suppress(ValueError):  # (not JSON: refused below, named)
            given = json.loads(given) if given.strip() else None
    if given is not None and not isinstance(given, dict):
        raise ConfigError(
            f"model_args chat_template_args={given!r} must be a JSON object of the chat "
            'template\'s variables, e.g. {"enable_thinking": false}'
        )
    args = dict(given or {})
    if enable_thinking is not None:
        args["enable_thinking"] = _flag("enable_thinking", enable_thinking)
        if args["enable_thinking"] and think_end_token is None:
            raise ConfigError(
                "model_args enable_thinking=True needs think_end_token (the text or token id "
                "that ends the thinking, e.g. think_end_token=</think>)"
            )
    return args


@register_model("fluid")
class FluidLM(LM):
    """A ``FluidForCausalLM`` behind lm-eval's ``LM`` interface (see the module docstring)."""

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        khead: str | None = None,
        policy: str | None = None,
        loop: str = "fused",
        batch_size: int | str | None = 1,
        device: str | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_length: int | None = None,
        k_max: int | None = None,
        mask_token: str | None = None,
        dtype: str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it; batches here are fixed
        compile: bool = False,
        adaptive_drafting: bool = True,
        prefix_caching: bool = True,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        enable_thinking: bool | None = None,
        chat_template_args: dict[str, Any] | str | None = None,
        think_end_token: str | int | None = None,
        fluid: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        from fluid_npu.eval.runner import policy_names
        from fluid_npu.sampling.api import LOOPS
        from fluid_npu.sampling.cli import engine_switches
        from fluid_npu.sampling.pretrained import FluidForCausalLM
        from fluid_npu.sampling.prompts import quiet_loading

        if unknown:
            raise ConfigError(
                f"unknown model_args for the fluid model: {', '.join(sorted(unknown))}; valid: "
                "model, adapter, khead, policy, loop, batch_size, device, max_gen_toks, "
                "max_length, k_max, mask_token, dtype, compile, adaptive_drafting, "
                "prefix_caching, chat_template, trust_remote_code, allow_pickle, "
                "enable_thinking, chat_template_args, think_end_token"
            )
        compile = _flag("compile", compile)
        adaptive_drafting = _flag("adaptive_drafting", adaptive_drafting)
        prefix_caching = _flag("prefix_caching", prefix_caching)
        trust_remote_code = _flag("trust_remote_code", trust_remote_code)
        allow_pickle = _flag("allow_pickle", allow_pickle)
        self.chat_template_args = _chat_args(enable_thinking, chat_template_args, think_end_token)
        self.enable_thinking = bool(self.chat_template_args.get("enable_thinking"))
        if isinstance(think_end_token, str) and think_end_token.isdigit():  # a token id, as hf
            think_end_token = int(think_end_token)
        self.think_end_token = think_end_token
        if loop not in LOOPS:
            raise ConfigError(f"unknown sampler loop {loop!r}; choose {' or '.join(LOOPS)}")
        self.batch_size = _batch_size(batch_size)  # checked before the model is loaded
        if fluid is None:
            if model is None:
                raise ConfigError("the fluid model needs model_args model=DIR (base or merged)")
            with quiet_loading():
                fluid = FluidForCausalLM.from_pretrained(
                    model,
                    adapter,
                    khead,
                    mask_token=mask_token,
                    device=_device(device),
                    dtype=dtype,
                    chat_template=chat_template,
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                )
        self.fluid = fluid
        self.tokenizer = fluid.tokenizer
        self._device = fluid.device
        self.loop = loop
        self.max_gen_toks = int(max_gen_toks)
        cfg = fluid.model.config.get_text_config()
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self.gen_kwargs: dict[str, Any] = {"k_max": k_max} if k_max else {}
        # the decode engine's switches, as fluid eval's flags set them
        engine = engine_switches(
            compile=compile, adaptive=adaptive_drafting, prefix_caching=prefix_caching
        )
        if engine:
            self.gen_kwargs["engine_kwargs"] = engine
        policy = policy or ("khead" if fluid.khead is not None else "entropy")
        self.policy = policy_names(fluid, [policy], k_max)[-1]  # checked, canonically spelt
        self._stats: list[Any] = []

    # ------------------------------------------------------------------ lm-eval plumbing

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> FluidLM:
        """``model_args`` plus lm-eval's own settings (``--batch_size``, ``--device``): a setting
        given in both is taken from ``model_args`` (lm-eval's command line passes its own)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> FluidLM:
        """As ``create_from_arg_string``, from a dict of ``model_args``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "fluid")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the tokenizer's chat template writes it, as lm-eval's ``hf`` model
        renders it: without a generation prompt the last (assistant) turn is left open (a task's
        ``gen_prefix``), and a template that refuses a system turn gets the turns without it."""
        from jinja2.exceptions import TemplateError

        def render(turns: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                turns,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                **self.chat_template_args,
            )

        try:
            return render(chat_history)
        except TemplateError:
            logger.warning(
                "the chat template refused the conversation; trying without system turns"
            )
            return render([turn for turn in chat_history if turn["role"] != "system"])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def generation_stats(self) -> Any:
        """The sampler statistics of every ``generate_until`` batch so far, merged."""
        from fluid_npu.sampling.stats import GenerateStats

        return GenerateStats.merged(self._stats)

    def _encode(self, text: str) -> list[int]:
        from fluid_npu.eval.tasks import encode_text

        return encode_text(self.tokenizer, text)

    # ------------------------------------------------------------------ log-likelihoods

    def _context_continuation(self, context: str, continuation: str) -> tuple[list, list]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:  # scored after the prefix token alone: no BOS of the template's own
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if cont and cont[0] == self.prefix_token_id:  # it starts with it: that is the context
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        ctx = self._encode(context)
        whole = self._encode(context + continuation)
        return ctx, whole[len(ctx) :]

    @torch.inference_mode()
    def score_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is the greedy one)`` per token pair."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        model, dev = self.fluid.model, self.fluid.device
        too_long = [i for i, (_, cont) in enumerate(pairs) if len(cont) > self.max_length]
        if too_long:
            raise ConfigError(
                f"request {too_long[0]}: the continuation is longer than max_length "
                f"({self.max_length} tokens)"
            )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1) :][:-1] for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            logp = logits.float().log_softmax(dim=-1)
            for row, i in enumerate(chunk):
                cont = torch.tensor(pairs[i][1], device=dev)
                n = len(seqs[row])
                rows = logp[row, n - len(cont) : n]
                score = float(rows.gather(1, cont[:, None]).sum())
                out[i] = (score, bool((rows.argmax(dim=-1) == cont).all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        if self.enable_thinking:  # as lm-eval's hf: a thinking model's score is of no answer
            raise ConfigError(
                "model_args enable_thinking=True is for generative tasks only; drop it (or set "
                "it False) for log-likelihood tasks"
            )
        pairs = [self._context_continuation(*r.args) for r in requests]
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if empty:
            raise ConfigError(f"loglikelihood request {empty[0]} has an empty continuation")
        results = self.score_tokens(pairs)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            (text,) = r.args
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self.score_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from fluid_npu.eval.harness_generation import generation_settings, generation_text
        from fluid_npu.sampling.api import eos_and_pad
        from fluid_npu.sampling.bench import decode_batches, split_batches
        from fluid_npu.sampling.inputs import serving_eos

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        _, pad = eos_and_pad(self.fluid.model, pad=self.tokenizer.pad_token_id)
        # the tokenizer's EOS ends an output too, as hf ends one (it adds its text to ``until``)
        eos = serving_eos(self.fluid.model, self.tokenizer)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            until, max_gen, applied = generation_settings(
                requests[indices[0]].args[1],
                self.max_gen_toks,
                getattr(self.fluid.model, "generation_config", None),
            )
            keep = self.max_length - max_gen
            if keep < 1:
                raise ConfigError(
                    f"max_gen_toks {max_gen} leaves no room for the prompt in max_length "
                    f"{self.max_length}; lower max_gen_toks or raise max_length"
                )
            prompts = [self._encode(requests[i].args[0])[-keep:] for i in indices]
            kwargs = {**self.gen_kwargs, **applied, "eos_token_id": eos}
            if until:  # decoding ends at lm-eval's stop sequences (``decode_batches``)
                kwargs["stop_strings"] = list(until)
                kwargs["stop_in_prompt"] = False  # lm-eval matches in the continuation only
            new, stats = decode_batches(
                self.fluid,
                split_batches(prompts, self.batch_size),
                self.policy,
                self.loop,
                max_gen,
                pad,
                kwargs,
            )
            self._stats += stats
            for i, tokens in zip(indices, new):
                text = generation_text(tokens, self.tokenizer, until, self.think_end_token)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line with the model ``fluid`` registered: ``python -m fluid_npu.eval``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
