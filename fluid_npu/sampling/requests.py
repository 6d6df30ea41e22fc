"""What flows through the decode engine: a ``Request`` in, ``Event``s out, and a ``Slot`` between.

The serving layer and ``run_requests`` speak only these; the engine (``scheduler.py``) owns slots.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fluid_npu.sampling.grammar import Grammar
from fluid_npu.sampling.rules import SamplingParams

# a prompt token's log-probability, its best alternatives (token id, logprob) and its rank (1:
# the model's argmax; vLLM's ``rank``: the tokens at least as likely, itself included)
PromptLogprob = tuple[float, list[tuple[int, float]], int]


@dataclass
class Request:
    """One generation request: prompt token ids and its own limits."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    eos_ids: Sequence[int] | None = None  # None: the scheduler's default EOS ids
    sampling: SamplingParams | None = None  # None: greedy
    stop: Sequence[str] = ()  # stop strings, checked on the committed text (needs a tokenizer)
    # a stop string may begin in the prompt, as transformers' stop_strings read the whole
    # sequence (False: in the output only, as the OpenAI API and vLLM match them)
    stop_in_prompt: bool = False
    # a token no stop string spans: the search starts afresh after it (a reasoning parser's
    # closing marker, so the engine ends where the server's split text finds a stop)
    stop_reset: int | None = None
    # the text stop strings are searched in: special tokens skipped (True, the server's default
    # text) or written out (False: vLLM's skip_special_tokens: false)
    skip_special: bool = True
    # structured output (grammar.py): every token follows this grammar, which ends with EOS ...
    grammar: Grammar | None = None
    # ... or every token after this one (a reasoning parser's closing marker: the grammar holds
    # the answer, not the reasoning before it)
    grammar_after: int | None = None
    # with the scheduler's "priority" policy: lower values are admitted first (vLLM's rule), ties
    # in arrival order; under "fcfs" (the default) it must stay 0
    priority: int = 0
    # vLLM's cache_salt: a prompt reuses only cache entries written by requests of the same salt
    # (None: unsalted), so tenants cannot learn from timing what others' prompts held (reuse.py)
    cache_salt: str | None = None
    # more tokens held back before SamplingParams.min_tokens besides the ones that end it (vLLM
    # holds the model's EOS back there even under ignore_eos, which then does not end on it)
    min_tokens_hold: Sequence[int] = ()


@dataclass
class Event:
    """What one step produced for one request."""

    request_id: str
    tokens: list[int]  # committed in this step (may be empty)
    finished: bool
    # "stop" (EOS), "length" (max_new_tokens), "abort", "error" (the model overflowed to NaN /
    # inf on the request's tokens or a sampled distribution; nothing of that step is committed)
    finish_reason: str | None
    new_tokens: int  # committed so far
    forwards: int  # decode forwards this request took part in so far
    accepted: int  # drafted tokens accepted in this step and kept in ``tokens``
    logprobs: list[float] | None = None  # of ``tokens``, when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None  # (token id, logprob) best first
    # with SamplingParams.prompt_logprobs, in the request's first event only: for each prompt
    # token after the first, its log-probability, the best alternatives and its rank
    prompt_logprobs: list[PromptLogprob] | None = None
    cached: int = 0  # prompt tokens found in the slot's cache, not encoded (reuse.py)
    # with logprobs: each token's rank where its log-probability is read (1: the most likely;
    # the tokens at least as likely are counted, vLLM's rule)
    ranks: list[int] | None = None
    drafted: int = 0  # drafts verified for the request in this step
    # of them, those the verify accepted (``accepted``: those kept, after a stop or limit's cut)
    drafts_accepted: int = 0
    # the request's times (``time.monotonic()``, the engine's clock, as vLLM's engine core stamps
    # its outputs): when the step that made this event ended, when the request was submitted and
    # when it was given a slot (None: never, an abort while it waited)
    at: float = 0.0  # (set by Scheduler.step)
    queued_at: float | None = None
    admitted_at: float | None = None


@dataclass
class Slot:
    req: Request
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefilled: int = 0  # prompt[:-1] tokens encoded so far (or found in the slot's cache)
    cached: int = 0  # of them, found in the slot's cache (reuse.py)
    stopped: bool = False  # a stop string ended it
    running: bool = False
    forwards: int = 0
    drafted: int = 0  # length of the block its pending drafts came from (0: none pending)
    # its prompt's log-probabilities as the prefill reads them, until its first event carries them
    prompt_lps: list[PromptLogprob] | None = None
    new: list[int] = field(default_factory=list)
    matcher: Any = None  # with a grammar: its state after the committed tokens (grammar.py)
    armed: bool = False  # its grammar starts after Request.grammar_after, not yet committed
    next_drafts: list[int] = field(default_factory=list)  # a constrained row's, as last read
    model_drafts: bool = False  # its pending drafts are the model's (not forced text)
    # the prompt's last tokens its output's text is read after (detok.context_ids), found once
    context: list[int] | None = None
    queued_at: float = field(default_factory=time.monotonic)  # submitted (the engine's clock)
    admitted_at: float | None = None  # given a slot

    def times(self) -> dict[str, float | None]:
        """When the request was queued and given a slot, as its events carry them."""
        return {"queued_at": self.queued_at, "admitted_at": self.admitted_at}

    def written(self) -> list[int]:
        """The tokens whose keys and values its slot holds at indices ``0 …``: prompt and output
        but the last token once it decodes (the last is fed by the next step), else the prompt's
        encoded part."""
        if self.running:
            return (self.prompt + self.new)[: len(self.prompt) - 1 + len(self.new)]
        return self.prompt[: self.prefilled]


SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy values
# what a request's logprobs hold (vLLM's --logprobs-mode values): the model's own distribution
# (raw, the default) or the one the token was chosen from (processed: logit bias, penalties,
# grammar, temperature, top-k / top-p / min-p); as log-probabilities or as logits
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


def enqueue(waiting: deque[Slot], slot: Slot, by_priority: bool) -> None:
    """Put ``slot`` in the queue of requests waiting for a slot: last (first come, first served),
    or with ``by_priority`` before every waiting request of a higher ``priority`` value."""
    at = len(waiting)  # (from the back: with equal priorities, the common case, at once)
    while by_priority and at and waiting[at - 1].req.priority > slot.req.priority:
        at -= 1
    waiting.insert(at, slot)
