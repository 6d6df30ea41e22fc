"""Stop strings of the decode engine: where a step's committed tokens complete one.

``stop_cut`` is read on the host after each step's one device read (``step.py``), for the rows
that asked for stop strings. A stop string is found in the text as it is returned — special
tokens skipped, as the server's text and vLLM read it (a ``<mask>`` or ``</s>`` is no text to match
``s>`` in), or written out where the request asks for them (``Request.skip_special``, vLLM's
``skip_special_tokens: false``) — and the tokens kept run through the one that completes it, as
transformers' ``stop_strings`` cuts. Only a window of the earlier tokens is decoded as context,
counted in bytes of text (a token spells at least one, and one character may take several
tokens); a newly completed stop string ends past the text the earlier tokens alone spelled —
compared by common prefix, since a character split over tokens reads as U+FFFD until its last
byte comes. The window never begins inside a character (up to three tokens more are taken): a
byte-fallback decoder would spell the whole run of byte tokens it cuts as U+FFFDs.

A request's ``min_tokens`` holds stop strings back as vLLM does (its detokenizer's check, vLLM
#22014): no step's tokens are searched until the output is longer than ``min_tokens``, and a match
then counts only where it ends past the text of the first ``min_tokens`` tokens — one that began
within that text and ends after it counts, one that lay wholly within it never does. The server's
text (``detok.Detokenizer``) reads them alike. A request without ``min_tokens`` is searched as
before, at the same cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fluid_npu.sampling.detok import context_ids, decode_written, written_alone
from fluid_npu.sampling.requests import Slot


def stop_cut(
    tokenizer: Any,
    special: frozenset[int],
    earlier: Sequence[int],
    toks: Sequence[int],
    stops: Sequence[str],
    context: int = 0,
    held: int = 0,
    skip_special: bool = True,
) -> int | None:
    """How many of ``toks`` (this step's, after ``earlier``) to keep when one of them completes
    a string of ``stops``, else None; ``special``: the tokenizer's special ids. The first
    ``context`` tokens of ``earlier`` are the prompt's: decoded only for how the output after them
    is spelled (a SentencePiece decoder drops the leading space of a text), no stop string may
    begin in their text. The first ``held`` of ``toks`` are within the request's ``min_tokens``:
    none of them ends the request, and a stop string must end past their text. With
    ``skip_special`` False the text spells special tokens too (a slow tokenizer's as the server's
    text writes them: ``detok.written_alone``)."""
    longest = max(len(x.encode("utf-8")) for x in stops)
    before: list[int] = []  # the last earlier tokens that spell longest + 8 of them
    spelled = 0
    for t in reversed(earlier):
        if spelled >= longest + 8:
            break
        before.append(t)
        spelled += not skip_special or t not in special
    before.reverse()

    written = {} if skip_special else written_alone(tokenizer)

    def decode(ids: list[int]) -> str:
        return decode_written(tokenizer, ids, skip_special, written)

    # not from inside a character: a byte-fallback decoder would spell the whole run of byte
    # tokens it cuts as U+FFFDs, a stop string in them too (a character's first byte is at most
    # three tokens back; text that stays U+FFFD further back is the output's own). The window is
    # decoded whole: its first four tokens alone may end inside the next character, a run that
    # reads as U+FFFDs however it begins.
    text_before = decode(before)
    for _ in range(3):
        if len(before) == len(earlier) or not text_before.startswith("\ufffd"):
            break
        before.insert(0, earlier[-len(before) - 1])
        text_before = decode(before)

    kept = max(0, context - (len(earlier) - len(before)))  # prompt tokens still in the window
    floor = len(decode(before[:kept])) if kept else 0
    text_held = decode([*before, *toks[:held]]) if held else ""
    for n in range(held + 1, len(toks) + 1):
        text = decode([*before, *toks[:n]])
        same = _common_prefix(text_before, text)
        least = _common_prefix(text_held, text) if held else 0  # the min_tokens text's end
        if any(text.find(x, max(floor, same - len(x) + 1, least - len(x) + 1)) >= 0 for x in stops):
            return n
    return None


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StopsMixin:
    """Stop strings on a decode step's committed tokens (``step.py``; the ``Scheduler`` owns the
    tokenizer and the slots)."""

    def _stop_cut(self, s: Slot, toks: list[int]) -> int | None:
        """How many of this step's ``toks`` slot ``s`` keeps when one completes a stop string
        (``stops.py``), else None. No stop string spans the request's ``stop_reset`` token: the
        search starts afresh after it, read after the prompt's tail and it."""
        reset, done, new = s.req.stop_reset, 0, s.new
        while True:
            found = reset is not None and reset in toks[done:]
            cut = toks.index(reset, done) + 1 if found else None
            n = self._stop_cut_part(s, new, toks[done:cut])
            if n is not None or cut is None:
                s.stopped = s.stopped or n is not None
                return None if n is None else done + n
            new, done = [*new, *toks[done:cut]], cut  # (a copy only when a reset came)

    def _stop_cut_part(self, s: Slot, new: list[int], toks: list[int]) -> int | None:
        """``_stop_cut`` for a run of tokens after the output's ``new`` ones (a reset at most
        their last)."""
        held = max(0, s.params.min_tokens - len(new))  # of toks, within min_tokens
        if held >= len(toks):  # (none of them may end the request: nothing to search)
            return None
        window = 4 * (max(len(x.encode("utf-8")) for x in s.req.stop) + 8)  # stop_cut's, and more
        recent = new[-window:]
        reset = s.req.stop_reset
        if reset is not None and reset in recent:  # the text after the last reset
            last = len(recent) - 1 - recent[::-1].index(reset)
            tail = self._context(s)
            earlier, context = [*tail, *recent[last:]], len(tail) + 1
        elif s.req.stop_in_prompt and len(new) < window:
            earlier, context = [*s.prompt[-window:], *new], 0
        elif len(new) < window:  # the output's text as the server spells it after its prompt
            tail = self._context(s)
            earlier, context = [*tail, *new], len(tail)
        else:
            earlier, context = new, 0
        return stop_cut(self.tokenizer, self._special, earlier, toks, s.req.stop, context, held,
                        s.req.skip_special)  # fmt: skip

    def _context(self, s: Slot) -> list[int]:
        """The prompt tokens slot ``s``'s output is read after (``detok.context_ids``; found on
        its first search, then kept)."""
        if s.context is None:
            s.context = context_ids(self.tokenizer, s.prompt, s.req.skip_special)
        return s.context
