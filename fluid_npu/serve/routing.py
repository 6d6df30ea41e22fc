"""Which engine rank of ``fluid serve --data-parallel-size N`` takes a request (the front:
``router.py``).

The ``Router``: a request's start (a chat's tools and messages, a Responses request's tools,
instructions and input, a completion's prompt) is cut into ``BLOCK``-character blocks, hashed as
a chain, and compared with the blocks of each rank's
recent requests: the request goes to the rank that shares the longest start with it — a
conversation's next turn to the rank whose slots hold the turn before it, a shared system prompt to
a rank that has it — if that is at least ``MIN_SHARED`` characters and the rank is no more busy
than the least busy one plus one request per ``SHARED_PER_REQUEST`` characters shared (at most
``slack``, its ``--max-batch``): a long history is worth a short wait, a short system prompt is
not worth any. Otherwise, and among equals, the least busy rank. A request's ``cache_salt``
(vLLM's) seeds its chain of hashes: it follows only requests of the same salt (as a rank's cache
reuses only their rows), so neither its routing nor the front's affinity counter tells one tenant
what another's prompts held.
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from collections import deque
from typing import Any

BLOCK = 64  # characters per block of a request's start that routing compares
MIN_SHARED = 64  # characters a request must share with a rank's recent ones to follow them
SHARED_PER_REQUEST = 512  # characters shared that are worth one request more in the queue
KEY_CHARS = 64 * 1024  # of a request's start compared (a longer shared start says nothing more)
RECENT = 256  # requests remembered per rank


def routing_key(path: str, body: Any) -> str:
    """The text a request's prompt starts with, as far as routing compares it: a chat's tools
    and messages (a next turn extends the previous turn's), a completion's prompt."""
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        given = [body.get("tools"), body.get("messages")]
    elif "/responses" in path:  # (rendered alike: the instructions first, then input)
        turns = body.get("input")  # (a text is the first turn of the list the next turn sends)
        turns = [{"role": "user", "content": turns}] if isinstance(turns, str) else turns
        given = [body.get("tools"), body.get("instructions"), turns]
    else:
        prompt = body.get("prompt")
        given = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(
            prompt[0], int) else prompt  # fmt: skip
    try:
        text = given if isinstance(given, str) else json.dumps(given, ensure_ascii=False)
    except (TypeError, ValueError):
        return ""
    return text[:KEY_CHARS]


def routing_salt(body: Any) -> str | None:
    """A request's ``cache_salt`` (None: none, or not a string: the rank refuses it)."""
    salt = body.get("cache_salt") if isinstance(body, dict) else None
    return salt if isinstance(salt, str) else None


def block_hashes(key: str, salt: str | None = None) -> list[int]:
    """The chained hashes of ``key``'s whole ``BLOCK``-character blocks, the chain seeded by
    ``salt``: two keys of one salt share their first ``n`` hashes exactly when they share their
    first ``n`` blocks; keys of different salts share none."""
    out, chain = [], 0 if salt is None else hash(("cache_salt", salt))
    for start in range(0, len(key) - BLOCK + 1, BLOCK):
        chain = hash((chain, key[start : start + BLOCK]))
        out.append(chain)
    return out


class Router:
    """Which rank takes a request (the module docstring); counts requests in flight per rank."""

    def __init__(self, ranks: int, slack: int) -> None:
        self.slack = slack
        self.busy = [0] * ranks  # requests in flight
        self.routed = [0] * ranks  # requests sent so far (ties go to the one sent fewer)
        self.recent: list[deque[list[int]]] = [deque() for _ in range(ranks)]
        self.known: list[Tally[int]] = [Tally() for _ in range(ranks)]  # block hash -> requests

    def shared(self, rank: int, hashes: list[int]) -> int:
        """Characters of a request's start (its ``hashes``) that ``rank``'s recent ones hold."""
        n = 0
        while n < len(hashes) and hashes[n] in self.known[rank]:
            n += 1
        return n * BLOCK

    def pick(
        self, key: str, skip: set[int] = frozenset(), salt: str | None = None
    ) -> tuple[int, bool] | None:
        """The rank for a request (and whether its shared start chose it); None: no rank left."""
        ranks = [r for r in range(len(self.busy)) if r not in skip]
        if not ranks:
            return None
        least = min(self.busy[r] for r in ranks)
        hashes = block_hashes(key, salt)
        following = []  # (-shared, busy, routed, rank) of the ranks the start may go to
        for r in ranks if hashes else ():
            shared = self.shared(r, hashes)
            allowed = least + min(self.slack, shared // SHARED_PER_REQUEST)
            if shared >= MIN_SHARED and self.busy[r] <= allowed:
                following.append((-shared, self.busy[r], self.routed[r], r))
        if following:
            return min(following)[3], True
        return min(ranks, key=lambda r: (self.busy[r], self.routed[r])), False

    def start(self, rank: int) -> None:
        self.busy[rank] += 1
        self.routed[rank] += 1

    def remember(self, rank: int, key: str, salt: str | None = None) -> None:
        """``rank`` took a request starting with ``key`` (of ``cache_salt`` ``salt``: its slots
        will hold it)."""
        hashes = block_hashes(key, salt)
        if not hashes:
            return
        self.recent[rank].append(hashes)
        self.known[rank].update(hashes)
        if len(self.recent[rank]) > RECENT:  # the oldest is forgotten
            known = self.known[rank]
            for h in self.recent[rank].popleft():
                known[h] -= 1
                if not known[h]:
                    del known[h]

    def end(self, rank: int) -> None:
        self.busy[rank] -= 1
