"""What a request must pass before ``fluid serve``'s engine takes it (``app.py`` asks): the model
it names (404 for another), the chat template it brings (only with
``--trust-request-chat-template``), its prompt (cut by vLLM's ``truncate_prompt_tokens``) and
``max_tokens`` against the context (400), its decoding settings (the engine's checks, token ids
within the vocabulary, log-probability alternatives, priority: 400), the server's capacity (429
with ``Retry-After`` while ``--max-batch`` running and ``--max-queue`` waiting requests fill it;
400 for more than both hold) and its id (one running request per id: ``http.request_id``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluid_npu.errors import ConfigError, FluidError
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.serve import protocol
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.http import id_in_use
from fluid_npu.serve.rendering import ChatRender
from fluid_npu.serve.token_fields import check_logprobs

if TYPE_CHECKING:
    from fluid_npu.serve.worker import Worker

RETRY_AFTER_S = 1
# log-probability values (a token's and its alternatives') one answer may hold: ~500 bytes each
# while the answer is built, so a 256-prompt echo with 20 alternatives (5.4 M) took 2.7 GB and
# stalled every stream for seconds; a server started with --max-logprobs -1 takes any
MAX_LOGPROB_VALUES = 1 << 20


class Admission:
    """The checks of one server, and the ids running: ``config`` is its ``app.ServeConfig``
    (``model_name``, ``max_len``, ``max_batch``, ``max_queue``, ``trust_request_chat_template``,
    ``max_logprobs`` and ``defaults`` are read; not imported here, as ``app`` imports this
    module)."""

    def __init__(self, config: Any, worker: Worker) -> None:
        self.config, self.worker = config, worker
        self.running: dict[str, int] = {}  # request id -> its choices not yet closed

    def model(self, name: str | None) -> None:
        """A 404 for a model this server does not serve (None or "": the request named none, as
        vLLM takes it; the served names and the aliases are this model)."""
        cfg = self.config
        if name and name not in (cfg.model_name, *cfg.other_names, *cfg.aliases):
            served = " or ".join(repr(n) for n in (cfg.model_name, *cfg.other_names))
            raise APIError(
                f"the model {name!r} is not served here; this server serves {served}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def template(self, render: ChatRender) -> None:
        """A 400 for a request's own chat template, unless the server trusts them."""
        if render.template is not None and not self.config.trust_request_chat_template:
            raise APIError(
                "this server renders conversations with its own chat template; a request's "
                "chat_template needs a server started with --trust-request-chat-template",
                param="chat_template",
            )

    def truncated(
        self,
        prompts: list[list[int]],
        keep: int | None,
        ends: list[tuple[int, int]] | None = None,
    ) -> list[list[int]]:
        """vLLM's ``truncate_prompt_tokens``: each prompt's last ``keep`` tokens (-1: the whole
        context's worth, which leaves a longer prompt no room, as in vLLM; None: whole), a text's
        special tokens at its ``ends`` kept (``inputs.truncated_prompt``); more than the context,
        or too few for a text beside its special tokens, is a 400, as vLLM answers."""
        from fluid_npu.sampling.inputs import truncated_prompt

        ends = ends or [(0, 0)] * len(prompts)
        try:
            return [truncated_prompt(ids, keep, self.config.max_len, end)
                    for ids, end in zip(prompts, ends)]  # fmt: skip
        except ConfigError as exc:
            raise APIError(str(exc), param="truncate_prompt_tokens") from None

    def sampling(self, s: protocol.Sampling, room: int, chat: bool, vocab: int) -> SamplingParams:
        """The engine's settings of a request whose prompts may generate ``room`` tokens (the
        fewest of its prompts'), the server's defaults filled in; each bad value — ``min_tokens``
        past the room, too many log-probability alternatives, a token id beyond the model's
        ``vocab``, a priority this server does not order by, the engine's own checks — is a 400
        naming it."""
        if s.params["min_tokens"] > room:
            raise APIError(
                f"min_tokens={s.params['min_tokens']} exceeds the {room} tokens this request may "
                f"generate ({s.max_tokens_field} or the context); lower min_tokens",
                param="min_tokens",
            )
        check_logprobs(s, chat, self.config.max_logprobs, vocab)
        try:
            params = SamplingParams(**self.config.defaults.fill(s.params))
        except FluidError as exc:  # the engine's own check, beyond what protocol.py checks
            raise APIError(str(exc)) from None
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                          ("allowed_token_ids", params.allowed_token_ids),
                          ("bad_words", [t for w in params.bad_words for t in w]),
                          ("stop_token_ids", s.stop_token_ids)):  # fmt: skip
            if ids and max(ids) >= vocab:
                raise APIError(f"{name} names token {max(ids)}, outside the model's vocabulary "
                               f"({vocab} tokens)", param=name)  # fmt: skip
        policy = getattr(self.worker.scheduler, "scheduling_policy", "fcfs")
        if s.priority and policy != "priority":
            raise APIError(
                f"priority={s.priority}: this server starts requests in arrival order; start it "
                "with --scheduling-policy priority, or leave priority out",
                param="priority",
            )
        return params

    def length(self, prompt: list[int], sampling: protocol.Sampling, param: str) -> int:
        """The tokens a prompt may generate (its ``max_tokens``, else the context's room); a 400
        when the prompt, or the prompt and ``max_tokens``, do not fit the context."""
        context = self.config.max_len
        room = context - len(prompt)
        if room < 1:
            raise APIError(
                f"the prompt has {len(prompt)} tokens; this server's context holds {context} "
                "tokens including the completion",
                param=param,
            )
        if sampling.max_tokens is None:
            return room
        if sampling.max_tokens > room:
            name = sampling.max_tokens_field
            asked = (
                f"{name} was not given, and the completions default of {sampling.max_tokens}"
                if sampling.max_tokens_default
                else f"{name}={sampling.max_tokens}"
            )
            raise APIError(
                f"{asked} with a {len(prompt)}-token prompt exceeds the context of {context} "
                f"tokens; ask for at most {room}",
                param=name,
            )
        return sampling.max_tokens

    def answer_size(
        self, prompts: list[list[int]], limits: list[int], s: protocol.Sampling, chat: bool
    ) -> None:
        """A 400 when the log-probabilities a request asks for (``s``, its alternatives
        resolved by ``sampling``) would pass ``MAX_LOGPROB_VALUES`` in memory at once: its
        prompts' (``prompt_logprobs``, or an echo's: each choice carries its own) and, for an
        answer sent whole with a ``max_tokens`` given (``limits``: each prompt's), its outputs'.
        A stream holds no whole answer, and without ``max_tokens`` the output's length is the
        model's to end, so neither counts the outputs."""
        if self.config.max_logprobs < 0:
            return
        top, ptop = s.params["top_logprobs"] or 0, s.params["prompt_logprobs"]
        whole = s.params["logprobs"] and not s.stream and s.max_tokens is not None
        out = (1 + top) * sum(limits) * s.n if whole else 0
        into = (
            (1 + ptop) * sum(map(len, prompts)) * (s.n if s.echo else 1) if ptop is not None else 0
        )
        values = out + into
        if values > MAX_LOGPROB_VALUES:
            if into > out:
                name = "prompt_logprobs" if s.prompt_logprobs is not None else "logprobs"
            else:
                name = "top_logprobs" if chat and top else "logprobs"
            raise APIError(
                f"this request asks for {values:,} log-probability values (tokens and their "
                f"alternatives, over its {'prompts' if into > out else 'outputs'}); an answer "
                f"holds at most {MAX_LOGPROB_VALUES:,} here: ask for fewer alternatives, fewer "
                "or shorter prompts, or fewer tokens (a server started with --max-logprobs -1 "
                "takes any)",
                param=name,
            )

    def capacity(self, n: int, copies: int = 1) -> None:
        """Room for ``n`` more requests (prompts x ``copies``): 429 while the queue is full; 400
        for more than the batch and the queue hold together (no wait makes room for them)."""
        cfg = self.config
        if cfg.max_queue is None:
            return
        room = cfg.max_batch + cfg.max_queue
        if n > room:
            raise APIError(
                f"the request asks for {n} completions (prompts x n); this server runs and queues "
                f"at most {room} at once: send fewer prompts or a smaller n per request",
                param="n" if copies > 1 else "prompt",
            )
        if self.worker.outstanding + n > room:
            raise APIError(
                f"the server is at capacity ({cfg.max_batch} running, {cfg.max_queue} queued); "
                "retry later",
                status=429,
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def id_free(self, rid: str, param: str = "X-Request-Id") -> None:
        """A 400 while another running request holds the id ``rid`` (``param``: where it came
        from); ``take_id`` checks again as it takes it."""
        if rid in self.running:
            raise id_in_use(rid, param)

    def take_id(self, rid: str, choices: int, param: str = "X-Request-Id") -> None:
        """Hold ``rid`` for a request of ``choices`` choices; a 400 while another holds it
        (``param``: where the id came from)."""
        self.id_free(rid, param)
        self.running[rid] = choices

    def release_id(self, rid: str, n: int = 1) -> None:
        """``n`` of the choices of the request ``rid`` closed (its id is free after the last)."""
        self.running[rid] -= n
        if self.running[rid] <= 0:
            del self.running[rid]
