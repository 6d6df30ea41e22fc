"""vLLM's offline API on the decode engine: ``LLM(model=DIR, khead=DIR).generate(prompts,
SamplingParams(...))`` and ``.chat(messages, ...)``, with vLLM's names, defaults and outputs, so a
script written for ``vllm.LLM`` runs on a FLUID model by changing its import::

    from fluid_npu.sampling.llm import LLM, SamplingParams

    llm = LLM(model="runs/demo/stage1", khead="runs/demo/stage2")
    for out in llm.generate(["Q: 2 + 2 = ?"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text, out.outputs[0].finish_reason)

One ``Scheduler`` (``max_num_seqs`` slots) serves every call, so prefixes are reused across calls
and the drafting budget keeps what it measured. Greedy outputs are the model's own AR argmax
(lossless); sampled ones are exact AR sampling, a seeded request reproducible alone or in any batch
(in float32).

``SamplingParams`` takes vLLM's fields as vLLM reads them (defaults too: ``temperature`` 1,
``max_tokens`` 16, ``top_k`` 0 or -1 off): ``n`` (copy ``j`` of a seeded request draws with
``seed + j``), ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, the three penalties,
``logit_bias``, ``allowed_token_ids``, ``bad_words`` (tokenized as vLLM does), ``stop`` (the text
cut before it, or after it with ``include_stop_str_in_output``), ``stop_token_ids``,
``ignore_eos``, ``max_tokens`` (None, or more than the context leaves: the output ends where the
context is full, as vLLM's offline engine ends it), ``min_tokens``, ``logprobs`` /
``prompt_logprobs`` (N alternatives, -1 the whole vocabulary, each a ``Logprob`` with ``rank``
and ``decoded_token``), ``skip_special_tokens``, ``detokenize`` (False: token ids only, no text
or ``decoded_token``), ``truncate_prompt_tokens`` and ``structured_outputs``
(``StructuredOutputsParams(json= | regex= | choice= | grammar= | json_object=True)``, or the same
as a dict: the output follows it, as ``fluid serve``'s field; not with ``ignore_eos`` or
``stop_token_ids``, as there). vLLM's other fields (beam search, ``logits_processors``,
``output_kind``, ...) are not fields here: passing one is a ``TypeError`` naming it, never
ignored. ``generate`` without ``sampling_params`` takes what ``LLM(generation_config=)`` (auto:
the model's, vllm, or a folder) sets, ``max_new_tokens`` as ``max_tokens``, as vLLM does.

Numbers are taken as vLLM takes them (an int for a float, a numpy scalar, a whole float for a
count); a wrong type or value is a ``ConfigError`` naming the field. A call interrupted mid-way
(Ctrl-C, an error) aborts what it queued, so the engine is clean for the next one.

``llm.get_metrics()`` gives vLLM's ``Counter`` / ``Vector`` / ``Gauge`` list (requests running
and waiting, the speculative-decoding counters). The data classes live in ``llm_params.py``;
vLLM's other constructor keywords, ``TokensPrompt`` / ``TextPrompt`` and the other tasks'
methods in ``llm_compat.py`` (all imported from here too). A difference from vLLM, said here
rather than hidden: ``decoded_token`` is the token decoded alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from fluid_npu.data.tooluse import check_tools
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.sampling.detok import Detokenizer, end_tokens
from fluid_npu.sampling.generation_defaults import generation_config_of
from fluid_npu.sampling.inputs import special_ends, text_specials, truncated_prompt
from fluid_npu.sampling.llm_compat import (
    TextPrompt,
    TokensPrompt,
    VLLMOtherTasks,
    by_prompt,
    check_logprobs_cap,
    check_sizes,
    check_text_chat,
    check_vllm_keywords,
    default_params,
    engine_switches,
    no_lora,
    progress_bar,
)
from fluid_npu.sampling.llm_params import (
    CompletionOutput,
    Counter,
    Gauge,
    Logprob,
    Metric,
    RequestOutput,
    SamplingParams,
    StructuredOutputsParams,
    Vector,
    engine_metrics,
    logprob_entry,
    one_each,
)
from fluid_npu.sampling.prompts import chat_messages, chat_template_ids, reserved_template_kwargs
from fluid_npu.sampling.rules import INT64_MAX

Prompt = str | Mapping[str, Any]  # a text, {"prompt": text} or {"prompt_token_ids": [...]}


class LLM(VLLMOtherTasks):
    """A FLUID model for offline decoding, vLLM's way (the module docstring).

    ``model`` / ``adapter`` / ``khead`` / ``mask_token`` / ``dtype`` / ``device`` /
    ``chat_template`` / ``trust_remote_code``: as ``FluidForCausalLM.from_pretrained``;
    ``max_num_seqs``: requests decoded at once (the engine's slots; default 8, or with
    ``gpu_memory_utilization`` — the share of the device's memory the weights and the KV cache
    may take, as vLLM's — as many as fit, at most 256); ``tensor_parallel_size``: 1 only (one
    device holds the model); ``enforce_eager``: vLLM's, but eager by default here — False
    compiles the decode step (``Scheduler(compile=True)``, docs/engine.md); ``max_model_len``:
    prompt and output tokens per request (None: the model's context, at most 4096); ``policy``:
    the drafting horizon (``khead`` with a K-head, else ``entropy``); ``seed``: where unseeded
    requests' seeds come from (None: torch's global generator); ``enable_prefix_caching``,
    ``logprobs_mode`` and ``scheduling_policy`` as vLLM's flags; ``engine_kwargs`` go to the
    ``Scheduler``; ``max_logprobs``: vLLM's cap on a request's alternatives (None: no cap);
    vLLM's other keywords: ``llm_compat.check_vllm_keywords``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        khead: str | Path | None = None,
        mask_token: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        policy: str | None = None,
        seed: int | None = None,
        enable_prefix_caching: bool = True,
        logprobs_mode: str = "raw_logprobs",
        scheduling_policy: str = "fcfs",
        chat_template: str | Path | None = None,
        trust_remote_code: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
        max_logprobs: int | None = None,
        **vllm_keywords: Any,
    ) -> None:
        from fluid_npu.sampling.inputs import serving_eos
        from fluid_npu.sampling.memory import check_fraction
        from fluid_npu.sampling.pretrained import FluidForCausalLM
        from fluid_npu.sampling.scheduler import Scheduler

        read = check_vllm_keywords(vllm_keywords, model, adapter)
        choice, self._override = read["generation_config"], read["override_generation_config"]
        check_sizes(max_num_seqs, max_model_len)
        folder = None  # (a folder's generation_config.json: read now, before the model loads)
        if choice not in ("auto", "vllm"):
            folder = generation_config_of(choice, None, "generation_config")
        self._max_logprobs = max_logprobs
        if tensor_parallel_size != 1:
            raise ConfigError(
                f"tensor_parallel_size={tensor_parallel_size}: this LLM holds the whole model on "
                "one device; leave it at 1"
            )
        if gpu_memory_utilization is not None:
            check_fraction(gpu_memory_utilization)  # (before the model loads)
        if max_num_seqs is None and gpu_memory_utilization is None:
            max_num_seqs = 8
        switches = engine_switches(enforce_eager, engine_kwargs)
        self.fluid = FluidForCausalLM.from_pretrained(
            model, adapter, khead, dtype=dtype, mask_token=mask_token, device=device,
            chat_template=chat_template, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        check_sizes(max_num_seqs, max_model_len, self.fluid.model)
        self.tokenizer = self.fluid.tokenizer
        self.eos_ids = serving_eos(self.fluid.model, self.tokenizer)  # as fluid serve ends
        self.engine = Scheduler(
            self.fluid.model, self.fluid.mask_id,
            policy=policy or ("khead" if self.fluid.khead is not None else "entropy"),
            khead=self.fluid.khead, eos_ids=self.eos_ids, max_batch=max_num_seqs,
            memory_fraction=gpu_memory_utilization, max_len=max_model_len,
            tokenizer=self.tokenizer, prefix_caching=enable_prefix_caching,
            logprobs_mode=logprobs_mode, scheduling_policy=scheduling_policy,
            **switches,
        )  # fmt: skip
        self._model_name = read["served_model_name"] or str(model)  # (the metrics' label)
        self._generation_config = (
            folder if folder is not None else generation_config_of(choice, self.fluid.model)
        )
        self._specials = text_specials(self.tokenizer)  # (kept when a text is truncated)
        self._seeds = None if seed is None else random.Random(seed)
        self._count = 0
        self._grammars: Any = None  # a GrammarCompiler, made at the first constrained request

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_metrics(self) -> list[Metric]:
        """vLLM's ``LLM.get_metrics()``: the requests running and waiting, and the
        speculative-decoding counters over every call so far (``llm_params.engine_metrics``)."""
        return engine_metrics(self.engine, self._model_name)

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without ``sampling_params``: what ``LLM(generation_config=)``'s
        config (the model's by default) sets, else vLLM's defaults."""
        return SamplingParams(**default_params(self._generation_config, self._override))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Each prompt's ``RequestOutput``, in the order given; ``sampling_params``: one for all,
        or one per prompt; ``priority``: one per prompt (lower first; needs
        ``LLM(scheduling_policy="priority")``, as vLLM); ``lora_request``: None only (the Stage I
        adapter is merged into the one model served)."""
        no_lora(lora_request)
        one = isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence)
        items = [prompts] if one else list(prompts)  # (a bad one is refused by _encode)
        if priority is not None and len(priority) != len(items):
            raise ConfigError(f"{len(priority)} priorities for {len(items)} prompts; give one each")
        encoded = [self._encode(p, n) for n, p in enumerate(items)]
        return self._run(items, encoded, sampling_params, use_tqdm, priority)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        lora_request: Any = None,
        chat_template_content_format: str = "auto",
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, rendered by the chat template as
        ``fluid serve``'s chat route renders them, then decoded as ``generate`` decodes. Text
        parts of a message are joined into one text (vLLM's ``"string"`` content format)."""
        no_lora(lora_request)
        check_text_chat(chat_template_content_format, mm_processor_kwargs)
        reserved = reserved_template_kwargs(dict(chat_template_kwargs or {}))
        if reserved:
            raise ConfigError(
                f"chat_template_kwargs sets {', '.join(reserved)}: arguments of the rendering "
                "itself (add_generation_prompt, continue_final_message and chat_template are "
                "chat()'s own), not template variables"
            )
        if continue_final_message and add_generation_prompt:
            raise ConfigError(
                "continue_final_message and add_generation_prompt cannot both be true: pass "
                "add_generation_prompt=False to continue the last message"
            )
        offered = None if tools is None else check_tools(tools, "tools")  # (as the server)
        one = bool(messages) and isinstance(messages[0], Mapping)
        talks = [messages] if one else list(messages)
        if not getattr(self.tokenizer, "chat_template", None) and chat_template is None:
            raise ConfigError(
                "this model's tokenizer has no chat template; pass chat_template=, or use generate"
            )
        encoded = []
        for n, talk in enumerate(talks):
            ids = chat_template_ids(
                self.tokenizer, chat_messages(list(talk), f"conversation {n}"),
                add_generation_prompt, continue_final_message=continue_final_message,
                template_kwargs=chat_template_kwargs, template=chat_template, tools=offered,
            )  # fmt: skip
            encoded.append((self.tokenizer.decode(ids), ids, (0, 0)))  # (no special tokens added)
        return self._run(talks, encoded, sampling_params, use_tqdm)

    def _encode(self, prompt: Prompt, n: int) -> tuple[str | None, list[int], tuple[int, int]]:
        """A prompt's text (None for token ids), token ids and how many of their first and last
        are special tokens the tokenizer added (kept by ``truncate_prompt_tokens``)."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, Mapping) or not {"prompt", "prompt_token_ids"} & set(prompt):
            raise ConfigError(
                f"prompt {n}: give a text, {{'prompt': text}} or {{'prompt_token_ids': [...]}}"
            )
        extra = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
        if extra:  # (multi_modal_data, ...: this model reads text)
            raise ConfigError(f"prompt {n}: {', '.join(extra)} is not supported; give text or ids")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"prompt {n}: 'prompt' must be a text, got {text!r}")
        if "prompt_token_ids" in prompt:
            given = prompt["prompt_token_ids"]
            vocab = self.fluid.model.get_input_embeddings().weight.shape[0]
            if not isinstance(given, (list, tuple)) or not all(
                isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab
                for t in given
            ):  # (numpy integers too)
                raise ConfigError(
                    f"prompt {n}: prompt_token_ids must be a list of token ids in [0, {vocab})"
                )
            ids, ends = [int(t) for t in given], (0, 0)
        else:
            ids = [int(t) for t in self.tokenizer(text)["input_ids"]]
            ends = special_ends(self._specials, ids)
        if not ids:
            raise ConfigError(f"prompt {n} is empty: it encodes to no tokens; give some text")
        return text, ids, ends

    def _draw(self) -> int:
        """An unseeded request's seed: from ``LLM(seed=)``'s stream, else torch's generator."""
        if self._seeds is not None:
            return self._seeds.randint(-INT64_MAX - 1, INT64_MAX)
        import torch

        return int(torch.randint(-(2**62), 2**62, ()).item())

    def _run(
        self,
        items: list[Any],
        encoded: list[tuple[str | None, list[int], tuple[int, int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool | Callable[..., Any],
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        from fluid_npu.sampling.offline import run_requests
        from fluid_npu.sampling.penalties import bad_word_sequences
        from fluid_npu.sampling.requests import Request

        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = one_each(sampling_params, len(items))
        context = self.engine.max_len
        requests, plans = [], []
        for n, ((text, ids, ends), sp) in enumerate(zip(encoded, params)):
            check_logprobs_cap(sp, self._max_logprobs, n)
            try:
                ids = truncated_prompt(ids, sp.truncate_prompt_tokens, context, ends)
            except ConfigError as exc:  # (a cut text keeps its text, as vLLM's prompt does)
                raise ConfigError(f"prompt {n}: {exc}") from None
            room = context - len(ids)
            if room < 1:
                own, why = self.engine.positions, self.engine.max_len_reason
                # (raising it helps only where a default or the caller's value left room)
                helps = why.startswith("the default cap") or why == "as asked"
                more = (
                    f", or raise LLM(max_model_len=...) up to the model's own context ({own})"
                    if helps and own is not None and own > context
                    else f" ({why})"
                )
                raise ConfigError(
                    f"prompt {n} has {len(ids)} tokens and leaves no room for an output: the "
                    f"context holds {context} (max_model_len): shorten it{more}"
                )
            # where the context is full, the output ends (finish_reason length), as vLLM's engine
            budget = room if sp.max_tokens is None else min(sp.max_tokens, room)
            vocab = self.fluid.model.get_input_embeddings().weight.shape[0]
            seed = sp.seed if sp.seed is not None or sp.temperature == 0 else self._draw()
            banned = bad_word_sequences(self.tokenizer, sp.bad_words or [])
            engine = sp.engine_params(vocab, seed, banned)
            grammar = self._grammar(sp, n)
            eos, ends, _ = end_tokens(
                self.eos_ids,
                sp.stop_token_ids or [],
                sp.ignore_eos,
                sp.include_stop_str_in_output,
                sp.skip_special_tokens,
            )
            rid = f"{self._count}"
            self._count += 1
            plans.append((rid, text, ids, sp, eos))
            for copy in range(sp.n):
                requests.append(Request(
                    f"{rid}-{copy}", ids, budget, eos_ids=ends,
                    sampling=engine.seeded_for(copy), stop=list(sp.stop or []),
                    skip_special=sp.skip_special_tokens,
                    min_tokens_hold=tuple(self.eos_ids) if sp.ignore_eos and sp.min_tokens else (),
                    grammar=grammar, priority=0 if priority is None else priority[n],
                ))  # fmt: skip
        bar = progress_bar(use_tqdm, [plan[3].n for plan in plans])
        try:
            done = run_requests(self.engine, requests, finished=bar and bar.tick)
        except (ConfigError, DataError) as exc:  # (a request refused: named as the prompt given)
            raise type(exc)(by_prompt(str(exc), [plan[0] for plan in plans])) from None
        finally:
            if bar is not None:
                bar.close()
        return [self._output(plan, done) for plan in plans]

    def _output(self, plan: tuple, done: Mapping[str, Any]) -> RequestOutput:
        rid, text, ids, sp, eos = plan
        spell = self.tokenizer if sp.detokenize else None  # (logprobs' decoded_token)
        outs = []
        for copy in range(sp.n):
            got = done[f"{rid}-{copy}"]
            stops = set(sp.stop_token_ids or ()) - set(eos)
            # vLLM counts a generation-config EOS that is not the tokenizer's as a stop token
            named = {*stops, *(t for t in eos if t != self.tokenizer.eos_token_id)}
            _, _, unspelled = end_tokens(
                self.eos_ids,
                sp.stop_token_ids or [],
                sp.ignore_eos,
                sp.include_stop_str_in_output,
                sp.skip_special_tokens,
            )
            d = Detokenizer(self.tokenizer, sp.stop, ids, unspelled, min_tokens=sp.min_tokens,
                            include_stop=sp.include_stop_str_in_output,
                            skip_special=sp.skip_special_tokens)  # fmt: skip
            # detokenize=False (vLLM's): token ids only, no text (no stop strings: refused then)
            out_text = d.add(got.tokens) + d.flush() if sp.detokenize else ""
            tokens = got.tokens[: d.tokens_used] if d.stopped else got.tokens
            reason = got.final.finish_reason
            stop_reason: int | str | None = None
            if d.stopped:
                reason, stop_reason = "stop", d.matched
            elif reason == "stop" and tokens and tokens[-1] in named:
                stop_reason = tokens[-1]
            lps = None
            if sp.logprobs is not None:
                tops = got.top_logprobs or [[]] * len(tokens)
                vals, ranks = got.logprobs or [], got.ranks or [None] * len(tokens)
                lps = [
                    logprob_entry(spell, t, v, top, r)
                    for t, v, top, r in zip(tokens, vals, tops, ranks)
                ]
            outs.append(CompletionOutput(
                copy, out_text, list(tokens),
                None if lps is None else sum(e[t].logprob for t, e in zip(tokens, lps)),
                lps, reason, stop_reason,
            ))  # fmt: skip
        first = done[f"{rid}-0"]
        prompt_lps = None
        if sp.prompt_logprobs is not None and first.prompt_logprobs is not None:
            prompt_lps = [None] + [
                logprob_entry(spell, t, lp, top, rank)
                for t, (lp, top, rank) in zip(ids[1:], first.prompt_logprobs)
            ]
        forwards = sum(done[f"{rid}-{c}"].final.forwards for c in range(sp.n))
        made = sum(len(o.token_ids) for o in outs)
        return RequestOutput(
            rid, text, list(ids), prompt_lps,  # (token ids given: no prompt text, as vLLM)
            outs, True, first.final.cached,
            {"forwards": forwards, "tpf": made / forwards if forwards else 0.0},
        )  # fmt: skip

    def _grammar(self, sp: SamplingParams, n: int) -> Any:
        """``sp.structured_outputs`` compiled (None: not given); a bad one is a ``ConfigError``."""
        spec = sp.structured(n)
        if spec is None:
            return None
        from fluid_npu.sampling.grammar import GrammarCompiler

        if self._grammars is None:
            vocab = self.fluid.model.get_output_embeddings().weight.shape[0]
            self._grammars = GrammarCompiler(self.tokenizer, vocab, self.eos_ids)
        kind, body, free = spec
        return self._grammars.compile(kind, body, any_whitespace=free)


__all__ = [
    "LLM", "CompletionOutput", "Counter", "Gauge", "Logprob", "Metric", "RequestOutput",
    "SamplingParams", "StructuredOutputsParams", "TextPrompt", "TokensPrompt", "Vector",
]  # fmt: skip
