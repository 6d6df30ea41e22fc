"""Prefix reuse in the decode engine: a free slot's cache keeps its last request's keys and values,
and a request whose prompt starts with those tokens takes that slot and encodes only the rest.

A slot's cache index is its token's position (``kv.py``), and nothing overwrites a free slot below
its committed length: a decode step writes its idle rows at or past their length, a prefill writes
only the rows it encodes, and compaction swaps what it moves with what the free slot held. So when
a request leaves, ``SlotPrefixes`` records which tokens its slot still holds — the prompt and the
output but the last token for a request that decoded (the last one is fed by the step that never
came), what the prefill had encoded for one that left earlier — and admission gives the next
request the free slot with the longest common prefix, if it is ``MIN_REUSE`` tokens or more (when
none is: a slot that holds nothing, else the one that has held its tokens longest). Compaction,
which moves a running request down into a free slot to keep the decode range small, swaps the two
slots' contents when the lower one holds something (two copies of a few rows, against encoding a
conversation again). Those entries were computed from the same tokens at the same positions, so
attending to them is attending to what a fresh prefill computes (bit for bit where the arithmetic
does not depend on how a prompt is cut into forwards; the same reading as chunked prefill where it
does).

What pays: a conversation's next turn (its prompt starts with the last turn's prompt and answer,
still in the slot it left), a shared system prompt or few-shot examples (every slot ends up
holding them). vLLM's automatic prefix caching shares hashed blocks between requests; this keeps
one prefix per slot, with no extra memory and no lookup structure. At least one prompt token is
always encoded (the last one before ``v_0``: its hidden state anchors the first drafts), a request
that wants its prompt's log-probabilities encodes all of it, and a slot whose request ended with an
error (float16 overflow) holds nothing; in float16 neither does one whose request was aborted (its
prompt's overflow may not have been judged yet; every abort is treated so, disconnects included).
A request's ``cache_salt`` (vLLM's) keys what it may reuse: only rows written by requests of the
same salt (the unsalted ones share among themselves), so one tenant cannot tell from the time to
its first token what another's prompts held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_BLOCK = 256  # tokens compared at once by common_prefix
# the fewest tokens worth reusing: a prefill that starts past 0 attends through a mask instead of
# the causal kernel, which costs more than encoding a few tokens saves (measured: a 2-token shared
# start made a batch-1 chat 3 % slower); vLLM's prefix cache matches whole blocks of 16 too
MIN_REUSE = 16


def common_prefix(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``cap`` (compared a block at a time,
    then token by token inside the first block that differs)."""
    hi = min(len(a), len(b), cap)
    n = 0
    while n < hi:
        m = min(n + _BLOCK, hi)
        if a[n:m] != b[n:m]:
            while a[n] == b[n]:  # (they differ before m)
                n += 1
            return n
        n = m
    return max(hi, 0)


@dataclass
class Placement:
    """Where ``SlotPrefixes.place`` put a prompt, and the cache rows the engine copies for it."""

    slot: int  # the free slot the request takes
    cached: int  # leading prompt tokens found (its entries at [0, cached) once the copies are done)
    source: int | None = None  # a pool row holding them: its [0, cached) are copied to ``slot``
    keep: int = 0  # ``slot``'s own [0, keep), copied first ...
    save_to: int | None = None  # ... to this pool row (``source`` itself when swapped)


class SlotPrefixes:
    """The tokens each free slot's (and each pool row's) cache holds, and where a prompt goes.

    ``pool``: cache rows that never decode and only keep prefixes for later requests
    (``Scheduler(prefix_slots=N)``): a slot's tokens move there (the pool's least recently
    released row is overwritten) when a request takes the slot and would overwrite ``MIN_REUSE``
    or more of them — a request with nothing to reuse, or one that shares only the start (a
    system prompt) — and back into a free slot when a prompt starts with them: a copy of a few
    cache rows instead of encoding them, so more conversations keep their history than there are
    slots.
    """

    def __init__(self, rows: int, enabled: bool = True, pool: list[int] | None = None) -> None:
        self.enabled = enabled
        self.held: list[list[int]] = [[] for _ in range(rows)]
        self.salt: list[str | None] = [None] * rows  # the cache_salt of who wrote each row
        self.released = [0] * rows  # when each row's held tokens were recorded (a counter)
        self.pool = list(pool or []) if enabled else []
        self._clock = 0
        self.queried = 0  # prompt tokens admitted
        self.hits = 0  # of them, found in a slot's cache (not encoded)

    def _oldest(self, rows: list[int]) -> int:
        """A row that holds nothing, else the one whose tokens were recorded longest ago."""
        return min(rows, key=lambda i: (self.released[i], i) if self.held[i] else (0, i))

    def match(
        self,
        prompt: list[int],
        free: list[int],
        busy: dict[int, list[int]] | None = None,
        salt: str | None = None,
    ) -> tuple[int, int]:
        """The row whose tokens share the longest prefix with ``prompt`` (``MIN_REUSE`` at least;
        a free slot before a pool row before a busy slot, the lowest index among equals) and that
        length; ``(-1, 0)`` when none does. ``busy``: the tokens each busy slot has encoded;
        ``salt``: the request's ``cache_salt`` — only rows written under the same one count."""
        best, found = -1, 0
        cap = len(prompt) - 2  # the token before v_0 is always encoded (it anchors the drafts)
        if not self.enabled or cap < MIN_REUSE:
            return best, found
        rows = {i: self.held[i] for i in [*free, *self.pool]} | (busy or {})
        for i, tokens in rows.items():
            if self.salt[i] != salt:
                continue
            n = common_prefix(tokens, prompt, cap)
            if n > found and n >= MIN_REUSE:
                best, found = i, n
        return best, found

    def place(
        self,
        prompt: list[int],
        free: list[int],
        hit: tuple[int, int] = (-1, 0),
        salt: str | None = None,
    ) -> Placement:
        """The free slot (``free`` in index order) for ``prompt``, how many of its leading tokens
        are found, and the copies that bring them (``Placement``).

        ``hit``: ``match``'s row and length (the default: none, the prompt is encoded whole);
        tokens found in a pool row or a busy
        slot (what it has encoded: its entries below its length never change) are copied into
        the free slot chosen as when nothing matches: one that holds nothing, else the one whose
        tokens were recorded longest ago — so a request does not take the place of a conversation
        that may go on. What the chosen slot held and the request does not take goes into the pool
        (a pool row the request takes whole receives it: a swap), else it is lost.
        """
        self.queried += len(prompt)
        best, found = hit
        self.hits += found
        source = best if found and best not in free else None
        slot = best if found and source is None else self._oldest(free)
        keep = len(self.held[slot])
        taken = found if source is None else 0  # of the slot's own tokens, what the request uses
        save_to = None
        if self.pool and keep >= MIN_REUSE and keep - taken >= MIN_REUSE:
            if source is not None and found == len(self.held[source]):
                save_to = source  # the request takes that row whole: swapped
            else:
                rows = [i for i in self.pool if i != source]
                save_to = self._oldest(rows) if rows else None
        if save_to is not None:
            self.held[save_to], self.released[save_to] = self.held[slot], self.released[slot]
            self.salt[save_to] = self.salt[slot]
        self.held[slot] = []  # occupied: what it holds is the new request's from now on
        self.salt[slot] = salt
        return Placement(slot, found, source, keep if save_to is not None else 0, save_to)

    def release(self, slot: int, tokens: list[int]) -> None:
        """``slot`` is free and its cache holds ``tokens`` at indices ``0 …``."""
        self._clock += 1
        self.held[slot] = tokens if self.enabled else []
        self.released[slot] = self._clock

    def occupy(self, slot: int, salt: str | None = None) -> None:
        """``slot`` receives a running request (of ``cache_salt`` ``salt``) by compaction (its
        cache is overwritten)."""
        self.held[slot], self.salt[slot] = [], salt

    def move(self, slot: int, to: int) -> None:
        """Compaction swapped two slots' caches: what ``slot`` held (and its age) is in ``to``
        now, and ``slot`` receives a running request."""
        self.held[to], self.released[to] = self.held[slot], self.released[slot]
        self.held[slot] = []
        self.salt[to], self.salt[slot] = self.salt[slot], self.salt[to]  # (to: the request's)
