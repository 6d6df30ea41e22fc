"""Compaction of the decode engine (``scheduler.py``): running requests move down into the free
slots below them, so a decode step computes as few rows as there are requests.

A move copies a slot's committed cache entries and its per-row state (``ROW_STATE``) once, when a
request leaves — never per step — and swaps the free slot's kept prefix (``reuse.py``) up into the
row it vacates. The requests that end in the same step move in one batch (``kv.swap_rows`` and one
index copy per state tensor): on an eager accelerator every copy is a launch.
"""

from __future__ import annotations

import torch


class CompactionMixin:
    """Compaction of ``Scheduler`` (which owns the state these methods use)."""

    ROW_STATE = (
        "length", "last", "drafts", "logp", "m", "cand", "new_count", "max_new", "eos", "run",
        "ema", "paid", "temp", "top_p", "min_p", "top_k", "seed", "qprob", "overflowed", "arm",
    )  # fmt: skip

    def _compact(self) -> None:
        """Move running requests down into free slots below them, so the decode range ``[0, hi)``
        stays as small as the number of requests (no idle rows computed). A move copies one slot's
        committed cache once, when a request leaves — never per step — and swaps it with what the
        free slot held for a later prompt (``reuse.py``); with requests waiting, the free slots are
        refilled instead. Several moves at once (requests that ended in the same step) share their
        copies: a few launches per state tensor for all of them (``_move_rows``)."""
        if self.waiting:
            return
        moves = []  # (dst, src, committed entries, dst's prefix kept in src)
        while True:
            free = [i for i, x in enumerate(self.slots) if x is None]
            busy = [i for i, x in enumerate(self.slots) if x is not None]
            if not free or not busy or free[0] > busy[-1]:
                break
            src, dst = busy[-1], free[0]  # (a source never becomes a destination, nor the reverse)
            slot = self.slots[src]
            if not slot.running:
                break  # a prompt still prefilling stays where it is
            written = slot.written()  # its committed cache entries' tokens
            h = len(self.prefixes.held[dst])  # a free slot's prefix (reuse.py) moves up, not lost
            moves.append((dst, src, len(written), h))
            self.slots[dst], self.slots[src] = slot, None
            if h:  # src holds dst's prefix now (no step writes a free row below its length)
                self.prefixes.move(dst, src)
            else:  # src still holds the request's entries
                self.prefixes.occupy(dst, slot.req.cache_salt)
                self.prefixes.release(src, written)
        if moves:
            self._move_rows(moves)

    def _move_rows(self, moves: list[tuple[int, int, int, int]]) -> None:
        """The device side of ``_compact``'s moves: each row's cache entries and per-row state."""
        if len(moves) == 1:  # (plain row copies: fewer launches than index copies for one row)
            dst, src, n, h = moves[0]
            self.kv.move_entries(dst, src, n, h, src if h else None)
        else:
            self.kv.swap_rows(moves)
            dst, src = (torch.tensor(x, device=self.device) for x in list(zip(*moves))[:2])
        for name in self.ROW_STATE:
            t = getattr(self, name)
            t[dst] = t[src]
        self.run[src] = False
        kept = [(m[1], m[3]) for m in moves if m[3]]  # src holds dst's prefix: its length
        if kept:
            at, h = zip(*kept)
            self.length[list(at)] = torch.tensor(h, device=self.device)
        for d, s, _, _ in moves:  # (sampling rows' draft states, penalties: rare)
            if self.dhid is not None:
                self.dhid[d] = self.dhid[s]
            if self.penalties is not None:
                self.penalties.move(d, s)
