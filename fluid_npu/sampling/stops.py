"""Stop strings of the decode engine: where a step's committed tokens complete one.

``stop_cut`` is read on the host after each step's one device read (``step.py``), for the rows
that asked for stop strings. A stop string is found in the text as it is returned — special
tokens skipped, as the server's text and vLLM read it (a ``<mask>`` or ``</s>`` is no text to match
``s>`` in) — and the tokens kept run through the one that completes it, as transformers'
``stop_strings`` cuts. Only a window of the earlier tokens is decoded as context, counted in bytes
of text (a token spells at least one, and one character may take several tokens); a newly
completed stop string ends past the text the earlier tokens alone spelled — compared by common
prefix, since a character split over tokens reads as U+FFFD until its last byte comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def stop_cut(
    tokenizer: Any,
    special: frozenset[int],
    earlier: Sequence[int],
    toks: Sequence[int],
    stops: Sequence[str],
    context: int = 0,
) -> int | None:
    """How many of ``toks`` (this step's, after ``earlier``) to keep when one of them completes
    a string of ``stops``, else None; ``special``: the tokenizer's special ids. The first
    ``context`` tokens of ``earlier`` are the prompt's: decoded only for how the output after them
    is spelled (a SentencePiece decoder drops the leading space of a text), no stop string may
    begin in their text."""
    longest = max(len(x.encode("utf-8")) for x in stops)
    before: list[int] = []  # the last earlier tokens that spell longest + 8 of them
    spelled = 0
    for t in reversed(earlier):
        if spelled >= longest + 8:
            break
        before.append(t)
        spelled += t not in special
    before.reverse()
    kept = max(0, context - (len(earlier) - len(before)))  # prompt tokens still in the window
    floor = len(tokenizer.decode(before[:kept], skip_special_tokens=True)) if kept else 0
    text_before = tokenizer.decode(before, skip_special_tokens=True)
    for n in range(1, len(toks) + 1):
        text = tokenizer.decode([*before, *toks[:n]], skip_special_tokens=True)
        same = _common_prefix(text_before, text)
        if any(text.find(x, max(floor, same - len(x) + 1)) >= 0 for x in stops):
            return n
    return None


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
