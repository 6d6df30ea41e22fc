"""Reasoning outputs: a thinking model's reasoning apart from its answer (``--reasoning-parser``).

Thinking models (DeepSeek-R1 and its distillations, Qwen3, openPangu-Embedded's slow thinking)
write their reasoning between two marker tokens before the answer. With ``fluid serve
--reasoning-parser NAME`` a chat completion returns that reasoning in the message's ``reasoning``
(and, for the clients that read the older name, ``reasoning_content``: vLLM writes both) and the
answer alone in ``content``; streamed, ``delta.reasoning`` chunks come before ``delta.content``
ones. ``/v1/completions`` returns the text as it is, as vLLM does.

The split is made on token ids, not text: the markers are single tokens that a tokenizer may call
special (openPangu's ``[unused16]`` / ``[unused17]``), and special tokens are left out of the text.
An output is reasoning from its start when its first token opens a block, or when the prompt
leaves one open (a chat template that writes the opening marker itself: DeepSeek-R1, Qwen3
thinking models); the block ends at the closing marker, and what follows is the answer. Otherwise
(a template that closed an empty block, ``enable_thinking: false``) the whole output is the answer.
An output cut before its closing marker (``max_tokens``) is all reasoning. The markers themselves
are counted in ``usage`` and carry log-probabilities, but are in neither text. Stop strings end the
request in either part; none spans a closing marker — the server searches each part's text and the
engine starts its search afresh after the marker (``Request.stop_reset``), so both end alike.
Unlike vLLM's ``deepseek_r1`` parser, a closing marker in an output that neither the prompt nor
the output opened does not turn the text before it into reasoning (it stays answer).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.detok import Detokenizer, context_ids


@dataclass(frozen=True)
class Markers:
    """The opening and closing marker of a reasoning block (their text)."""

    start: str
    end: str


PARSERS = {  # vLLM's names where it has the parser
    "deepseek_r1": Markers("<think>", "</think>"),
    "qwen3": Markers("<think>", "</think>"),
    "openpangu": Markers("[unused16]", "[unused17]"),
}


CLOSED_TAIL = 8  # tokens a template may write after the block it closes (whitespace)


@dataclass(frozen=True)
class ReasoningParser:
    """A parser bound to a tokenizer: the markers' token ids (``tokenizer``: reads what follows
    a prompt's last closing marker)."""

    name: str
    start: int
    end: int
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def opened(self, prompt: Sequence[int]) -> bool:
        """Whether ``prompt`` leaves a reasoning block open (its last marker is an opening one)."""
        at = self._last_marker(prompt)
        return at is not None and prompt[at] == self.start

    def closed(self, prompt: Sequence[int]) -> bool:
        """Whether the end of ``prompt`` closed a reasoning block (``enable_thinking: false``: the
        template closes an empty block after opening the assistant's turn): its last marker is a
        closing one with nothing but whitespace after it, so this turn's output is all answer. A
        block closed earlier in the conversation — a previous turn's reasoning, which templates
        keep in a tool loop — leaves this turn free to reason."""
        at = self._last_marker(prompt)
        if at is None or prompt[at] != self.end or len(prompt) - at - 1 > CLOSED_TAIL:
            return False
        tail = list(prompt[at + 1 :])
        return not tail or self.tokenizer is None or not self.tokenizer.decode(tail).strip()

    def _last_marker(self, prompt: Sequence[int]) -> int | None:
        for at in range(len(prompt) - 1, -1, -1):
            if prompt[at] in (self.start, self.end):
                return at
        return None


def check_parser_name(name: str) -> Markers:
    """The markers of the parser ``name``; an unknown one is a ``ConfigError`` naming the flag."""
    if name not in PARSERS:
        raise ConfigError(f"--reasoning-parser {name!r} is not one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]


def reasoning_parser(name: str, tokenizer: Any) -> ReasoningParser:
    """The parser ``name`` for ``tokenizer``; an unknown name, or markers that are not single
    tokens of this tokenizer, is a ``ConfigError`` naming ``--reasoning-parser``."""
    markers = check_parser_name(name)
    ids = []
    for marker in (markers.start, markers.end):
        tok = tokenizer.convert_tokens_to_ids(marker)
        encoded = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not isinstance(tok, int) or tok == tokenizer.unk_token_id or encoded != [tok]:
            raise ConfigError(
                f"--reasoning-parser {name}: {marker!r} is not one token of this model's "
                "tokenizer, so this is not a model that parser is for"
            )
        ids.append(tok)
    return ReasoningParser(name, ids[0], ids[1], tokenizer)


class ReasoningText:
    """A chat output's text in two parts, reasoning then answer, as ``Detokenizer`` gives one
    text (the same interface: ``add``, ``flush``, ``stopped``, ``tokens_used``), with the
    reasoning deltas in ``reasoning_delta`` after each call.

    Each part is its own ``Detokenizer`` (stop strings searched in it), started again after every
    closing marker with the prompt's last tokens and the marker as context: no stop string and no
    character spans a marker, as the engine reads it (``Request.stop_reset``)."""

    def __init__(
        self,
        tokenizer: Any,
        parser: ReasoningParser,
        stop: Sequence[str] | None,
        prompt: Sequence[int],
        eos_ids: Collection[int],
        spelled: Mapping[int, str] | None = None,
        min_tokens: int = 0,
        include_stop: bool = False,
        skip_special: bool = True,
    ) -> None:
        self.tokenizer, self.parser, self.stop, self.eos = tokenizer, parser, stop, eos_ids
        self.min_tokens, self.include_stop = min_tokens, include_stop  # (each part's, as one)
        self.skip_special = skip_special  # (the markers are never written either way)
        self.spelled = spelled  # special tokens the answer writes out (tool-call markers)
        self.tail = context_ids(tokenizer, prompt, skip_special)
        self.thinking = parser.opened(prompt)  # reasoning until the closing marker
        self.first = True  # no output token seen yet
        self.done = 0  # tokens of the parts before the current one, markers included
        self.thought = 0  # ... of them the reasoning's (the markers of its block included)
        self.part = self._part(prompt)
        self.reasoning_delta = ""

    @property
    def stopped(self) -> bool:
        return self.part.stopped

    @property
    def matched(self) -> str | None:
        return self.part.matched

    @property
    def spelled_context(self) -> bool:
        return self.part.spelled_context

    @property
    def tokens_used(self) -> int:
        return self.done + self.part.tokens_used

    @property
    def reasoning_tokens(self) -> int:
        """The output's tokens that are reasoning: its text and the markers of its block."""
        return self.thought + (self.part.tokens_used if self.thinking else 0)

    def add(self, tokens: Sequence[int]) -> str:
        """Feed committed tokens; returns the answer's new text (the reasoning's is in
        ``reasoning_delta``)."""
        self.reasoning_delta = ""
        answer = ""
        run: list[int] = []
        for tok in tokens:
            first, self.first = self.first, False
            opens = first and tok == self.parser.start  # the output opens its own block
            if opens or tok == self.parser.end:
                answer += self._feed(run)
                run = []
                if self.part.stopped:
                    break
                answer += self._flush()
                self.done += self.part.tokens_used + 1  # the marker: counted, never spelled
                if self.thinking or opens:  # (a block's own tokens, its closing marker too)
                    self.thought += (self.part.tokens_used if self.thinking else 0) + 1
                self.thinking = opens
                self.part = self._part([*self.tail, tok])
                continue
            run.append(tok)
        return answer + self._feed(run)

    def _part(self, context: list[int]) -> Detokenizer:
        """The detokenizer of the part that starts now (after ``context``)."""
        spelled = None if self.thinking else self.spelled
        least = max(0, self.min_tokens - self.done)  # (the output's tokens before this part)
        return Detokenizer(self.tokenizer, self.stop, context, self.eos, spelled, least,
                           self.include_stop, self.skip_special)  # fmt: skip

    def _feed(self, run: list[int]) -> str:
        """Feed a run of one part's tokens; the answer's text (the reasoning's is kept)."""
        if not run or self.part.stopped:
            return ""
        text = self.part.add(run)
        if self.thinking:
            self.reasoning_delta += text
            return ""
        return text

    def _flush(self) -> str:
        text = self.part.flush()
        if self.thinking:
            self.reasoning_delta += text
            return ""
        return text

    def flush(self) -> str:
        """The text still held back at the end of the output (the reasoning's too)."""
        return self._flush()
