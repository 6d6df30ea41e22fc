"""Incremental detokenization: a growing output's text, as ``fluid serve`` and ``fluid generate``
return it.

``Detokenizer`` turns committed token ids into text deltas — the output's text with special tokens
skipped (or written out: ``skip_special=False``, vLLM's ``skip_special_tokens: false``) —
decoding only the newest tokens with a few before them as context, so a long output costs linear,
not quadratic, time; a trailing incomplete UTF-8 character is held back; with ``stop``
strings the text is cut before the first one (OpenAI's rule: the stop string is not returned) and
the tail that could still become one is held back until it cannot — or, with ``include_stop``
(vLLM's ``include_stop_str_in_output``), after the first one to be complete, nothing held back.
With ``min_tokens`` no stop string ends the output before that many tokens, as vLLM reads it: the
text is searched once the count is passed, and a match counts only where it ends after the text of
the first ``min_tokens`` tokens (one that began within it and ends later counts).

The text is what the tokens spell *after the prompt*, as vLLM and transformers' text-generation
pipeline return it: the last prompt tokens are decoded as context before the first output tokens,
so a SentencePiece tokenizer (Llama 2, Mistral, Gemma), which drops the leading space of a text,
keeps the space that separates the completion from the prompt (``" Paris"`` after ``"… is"``,
not ``"Paris"``). The context is taken longer (``context_ids``) where its last ``PROMPT_CONTEXT``
tokens would begin inside a character — a byte-fallback decoder spells a whole run of byte tokens as
U+FFFDs when the run begins mid-character, the output's own bytes included — or spell only
whitespace (a SentencePiece decoder drops every leading space, so such a context spells nothing).
A chunk of the output that spells nothing or only whitespace (skipped special tokens, a run of
``"▁"``) is never the context alone either, for the same reason.
An EOS token that ends the output (``eos_ids``) is counted but never spelled, as vLLM leaves it out
of the text — whether or not the tokenizer calls it special, and whether or not special tokens are
written. ``spelled`` names special tokens that are written out after all (openPangu's tool-call
markers, which the server's tool parser reads in the text), the text between them decoded as
before. With special tokens written out, a slow tokenizer's added tokens are written the same way
(``written_alone``): its own decode may spell them otherwise with what surrounds them (a space
before each, in Llama / InternLM-style remote code such as openPangu's), so a text decoded in
pieces would not begin as the whole does; the engine's stop search (``stops.py``) reads that text.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any

PROMPT_CONTEXT = 4  # prompt tokens decoded before the output's first ones (at least)
CONTEXT_LIMIT = 4 * PROMPT_CONTEXT  # ... and at most, however they spell
WINDOW_LIMIT = 64  # tokens of whitespace-only chunks a context may grow by before it moves on


def context_ids(tokenizer: Any, prompt: Sequence[int], skip_special: bool = True) -> list[int]:
    """The prompt's last tokens an output's text is decoded after: ``PROMPT_CONTEXT`` of them, more
    (up to ``CONTEXT_LIMIT``) while their text begins inside a character or is only whitespace."""
    n = min(PROMPT_CONTEXT, len(prompt))
    while n < min(len(prompt), CONTEXT_LIMIT):
        head = tokenizer.decode(list(prompt[-n:]), skip_special_tokens=skip_special)
        if head.strip() and not head.startswith("\ufffd"):
            break
        n += 1
    return [int(t) for t in prompt[len(prompt) - n :]]


class Detokenizer:
    """Text deltas of one output; ``tokens_used`` counts the tokens taken (up to a stop string)."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] | None = None,
        prompt: Sequence[int] = (),
        eos_ids: Collection[int] = (),
        spelled: Mapping[int, str] | None = None,
        min_tokens: int = 0,
        include_stop: bool = False,
        skip_special: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special  # False: special tokens are written out as their text
        self.spelled = dict(spelled or {})  # special tokens written out (a tool-call marker)
        # the tokens written as themselves between runs decoded alone: with special tokens skipped
        # the spelled ones; written out, none for a fast tokenizer (its decode writes them), every
        # added token for a slow one, whose own spelling of them depends on what surrounds them
        self.written = self.spelled if skip_special else written_alone(tokenizer)
        self.stop = list(stop or [])
        self.reach = max((len(s) for s in self.stop), default=1) - 1  # a stop begins this far back
        self.hold = 0 if include_stop else self.reach  # the tail held back from the stream
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        self.floor = 0  # characters of ``text`` the first min_tokens tokens spell (no stop ends in)
        self.eos = frozenset(int(t) for t in eos_ids)
        self.ids = context_ids(tokenizer, prompt, skip_special) if prompt else []
        self.start = len(self.ids)  # ids[:start]: prompt context; ids[start:]: the output's
        self.head = self._decode(self.ids)  # the context's own text (not part of the output)
        self.ended = 0  # EOS tokens taken (counted, never spelled)
        self.text = ""  # the decoded output so far (cut at a stop string once one is found)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found: the output ends here
        self.matched: str | None = None  # ... which one (vLLM's stop_reason)
        self.prefix, self.read = 0, self.start  # ids[prefix:read]: context; ids[:read] settled
        self.settled = 0  # characters of ``text`` that ids[:read] spell

    @property
    def spelled_context(self) -> bool:
        """Whether the prompt context spells any text (so the output's leading space is kept)."""
        return bool(self.head)

    @property
    def tokens_used(self) -> int:
        return len(self.ids) - self.start + self.ended

    def add(self, tokens: Sequence[int]) -> str:
        """Feed committed tokens; returns the text that is now safe to send (maybe empty).

        With stop strings the tokens are taken one at a time, so ``tokens_used`` counts exactly
        the tokens up to the one that completed the stop string (after ``min_tokens``).
        """
        if self.stopped:
            return ""
        if not self.stop:
            for tok in tokens:
                self._take(tok)
            self._advance(final=False)
            return self._release(final=False)
        for tok in tokens:
            self._take(tok)
            start = max(0, self.settled - self.reach)  # a stop may begin in the unsearched tail
            self._advance(final=False)
            if self.tokens_used <= self.min_tokens:  # (vLLM's: no stop string before min_tokens)
                self.floor = len(self.text)
                continue
            end = self._stop_end(start)
            if end is not None:
                self.text = self.text[:end]
                self.stopped = True
                return self._release(final=True)
        return self._release(final=False)

    def _stop_end(self, start: int) -> int | None:
        """Where the text ends at a stop string found from ``start`` on (one that ends after
        ``floor``): before the first to begin, or after the first to end (``include_stop``)."""
        found = []
        for n, s in enumerate(self.stop):
            at = self.text.find(s, max(start, self.floor - len(s) + 1))
            if at >= 0:
                found.append(((at + len(s), at) if self.include_stop else (at, at), n))
        if not found:
            return None
        where, n = min(found)
        self.matched = self.stop[n]
        return where[0]

    def flush(self) -> str:
        """The text still held back, at the end of the output."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(final=True)

    def _take(self, tok: int) -> None:
        if tok in self.eos:
            self.ended += 1
        else:
            self.ids.append(int(tok))

    def _decode(self, tokens: list[int]) -> str:
        return decode_written(self.tokenizer, tokens, self.skip_special, self.written)

    def _advance(self, final: bool) -> None:
        """Bring ``text`` up to every token fed. The newest tokens' text is decoded with the
        previous chunk before them; while it ends in an incomplete multi-byte character it stays
        provisional (those tokens are decoded again with the next ones) and only the text before
        its trailing U+FFFDs counts: a byte-fallback tokenizer (Llama 2, Mistral, Gemma) spells a
        whole run of byte tokens as one U+FFFD per byte until its last character is complete."""
        if self.read == len(self.ids):
            return
        now = self._decode(self.ids[self.prefix :])
        before = self._decode(self.ids[self.prefix : self.read])
        if now.endswith("\ufffd") and not final:
            if now.startswith(before):  # what is certain so far (a prefix of the final text)
                self.text = self.text[: self.settled] + now[len(before) :].rstrip("\ufffd")
            return
        if not now.startswith(before):  # the context changed its own spelling (rare)
            self.text = self._whole()
        else:
            self.text = self.text[: self.settled] + now[len(before) :]
        spelled = bool(self.text[self.settled :].strip())
        self.settled = len(self.text)
        # a chunk that spelled nothing (skipped special tokens) or only whitespace is no context
        # alone: decoded first, its text would be lost (a SentencePiece decoder drops it)
        if spelled or self.read - self.prefix > WINDOW_LIMIT:
            self.prefix = self.read
        self.read = len(self.ids)

    def _whole(self) -> str:
        """The output's text decoded in one piece (after the context's own text)."""
        whole = self._decode(self.ids)
        if whole.startswith(self.head):
            return whole[len(self.head) :]
        return self._decode(self.ids[self.start :])

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stop:  # the tail that could still begin a stop string waits
            end = max(self.sent, end - self.hold)
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def written_alone(tokenizer: Any) -> dict[int, str]:
    """The added (special) tokens of a slow tokenizer, each with its own text: written out, they
    go between runs decoded alone (as vLLM's slow-tokenizer path does, here without its optional
    spaces between them) — for a slow tokenizer's own decode may
    spell them otherwise with what surrounds them (Llama / InternLM-style remote tokenizers, as
    openPangu's, put a space before each), so that a text decoded in pieces would not begin as the
    whole does. Empty for a fast tokenizer, whose decode spells them the same in any piece. Found
    once per tokenizer (again where tokens were added to it since)."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return {}
    size = len(tokenizer)
    known = _WRITTEN.get(tokenizer)
    if known is not None and known[0] == size:
        return known[1]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = {int(i): str(t) for i, t in added.items()}
    for i in getattr(tokenizer, "all_special_ids", None) or ():
        out.setdefault(int(i), str(tokenizer.convert_ids_to_tokens(int(i))))
    _WRITTEN[tokenizer] = (size, out)
    return out


# written_alone's answers, per tokenizer (with its size then)
_WRITTEN: weakref.WeakKeyDictionary[Any, tuple[int, dict[int, str]]] = weakref.WeakKeyDictionary()


def decode_written(
    tokenizer: Any, tokens: Sequence[int], skip_special: bool, written: Mapping[int, str]
) -> str:
    """The text of ``tokens`` with the ``written`` ones as their own text between runs decoded
    alone (``Detokenizer.written``); the tokenizer's own decode where none of them is there."""
    if not written or written.keys().isdisjoint(tokens):
        return tokenizer.decode(list(tokens), skip_special_tokens=skip_special)
    out, run = [], []  # the runs between written tokens decoded alone, the tokens written
    for tok in tokens:
        if tok in written:
            out += [tokenizer.decode(run, skip_special_tokens=True), written[tok]]
            run = []
        else:
            run.append(tok)
    return "".join(out) + tokenizer.decode(run, skip_special_tokens=True)


def output_text(
    tokenizer: Any, prompt: Sequence[int], new: Sequence[int], eos_ids: Collection[int] = ()
) -> str:
    """The whole text of an output ``new`` after ``prompt``, as ``Detokenizer`` streams it."""
    d = Detokenizer(tokenizer, prompt=prompt, eos_ids=eos_ids)
    return d.add(new) + d.flush()


def end_tokens(
    eos_ids: Sequence[int],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    include_stop: bool,
    skip_special: bool,
) -> tuple[list[int], list[int], list[int]]:
    """A request's ``(eos, ends, unspelled)`` as vLLM reads its settings: the EOS ids that end it
    (none under ``ignore_eos``), every token that ends it (those and ``stop_token_ids``), and the
    ones its text never spells — all of them, but with ``include_stop_str_in_output`` the stop
    tokens are written, and the EOS too where special tokens are (``skip_special_tokens: false``).
    ``fluid serve`` and the offline ``LLM`` both read them here."""
    eos = [] if ignore_eos else list(eos_ids)
    ends = [*eos, *(t for t in dict.fromkeys(stop_token_ids) if t not in eos)]
    if not include_stop:
        return eos, ends, ends
    return eos, ends, eos if skip_special else []
