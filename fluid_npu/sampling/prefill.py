"""Admission and prefill of the engine (``scheduler.py``): waiting requests into free slots, then
their prompts into the slot cache, a chunk per step.

``PrefillMixin._admit`` gives each free slot (lowest index first) the next waiting request, with
its EOS ids, token budget and sampling settings. ``_prefill`` runs one forward for every slot
still encoding its prompt: each its next chunk of at most ``prefill_chunk`` tokens of
``prompt[:-1]`` (a forward of first chunks without drafts is plain causal attention, no mask
tensor); the chunk that ends a prompt also drafts the first tokens — MASK slots anchored at the
prompt's ``P-2``, as Stage I trains them; as many as the decode steps' blocks now hold (``K`` for a
sampling request) — unless drafting has not been paying. ``_start``
turns those slots into the request's first drafts and candidate blocks: from the next step on the
slot decodes (``step.py``).
"""

from __future__ import annotations

import time

import torch

from fluid_npu import device as devices
from fluid_npu.layout import slot_block
from fluid_npu.sampling.fused import choose_anchors
from fluid_npu.sampling.rules import SamplingParams
from fluid_ops.meta import MAIN, PAD


class PrefillMixin:
    """Admission and chunked prefill of ``Scheduler`` (which owns the state these methods use)."""

    def _admit(self) -> None:
        for i in range(self.slots_n):
            if not self.waiting:
                return
            if self.slots[i] is None:
                slot = self.waiting.popleft()
                self.slots[i] = slot
                eos = self._eos_of(i)
                row = torch.full((self.eos.shape[1],), -1, dtype=torch.long)
                row[: len(eos)] = torch.tensor(eos, dtype=torch.long)
                self.eos[i] = row.to(self.device)
                self.max_new[i] = slot.req.max_new_tokens
                self.new_count[i] = 0
                self.length[i] = 0
                self.run[i] = False
                self._set_sampling(i, slot.params)

    def _decode_rows(self) -> int:
        """The rows the next decode step computes (the price of a draft is per step)."""
        return 1 + max((i for i, x in enumerate(self.slots) if x is not None), default=0)

    def _set_sampling(self, i: int, params: SamplingParams) -> None:
        self.temp[i] = params.temperature
        self.top_k[i] = params.top_k
        self.top_p[i] = params.top_p
        self.min_p[i] = params.min_p
        self.seed[i] = params.seed or 0
        if not params.greedy and self.dhid is None and self.k:
            h = self.model.config.get_text_config().hidden_size
            dtype = next(self.model.parameters()).dtype
            self.dhid = torch.zeros((self.slots_n, self.k, h), dtype=dtype, device=self.device)

    def _prefill(self) -> None:
        """One forward: every prefilling slot encodes its next chunk of ``prompt[:-1]``."""
        rows = [i for i, s in enumerate(self.slots) if s is not None and not s.running]
        chunks: dict[int, tuple[int, list[int], bool]] = {}
        for i in rows:
            s = self.slots[i]
            body = s.prompt[:-1]
            chunk = body[s.prefilled : s.prefilled + self.prefill_chunk]
            chunks[i] = (s.prefilled, chunk, s.prefilled + len(chunk) >= len(body))
        width = max(len(c) for _, c, _ in chunks.values())
        k = self.k
        ending = [i for i, (_, _, last) in chunks.items() if last]
        # the chunk that ends a prompt drafts the first tokens — unless drafting has not been paying
        # — as many as the decode steps' blocks hold (sampling rows always draft K: their tokens
        # must not depend on the batch's history)
        sampling = any(not self.slots[i].params.greedy for i in ending)
        rows_next = self._decode_rows()
        draft = 0
        if k > 0 and ending and (sampling or self.budget.drafting_pays(rows_next)):
            draft = k if sampling else self.budget.prefill_length(rows_next)
        if width == 0 and draft == 0:  # one-token prompts only: nothing to encode
            for i in rows:
                self._start(i, None, None)
            return
        b = len(rows)
        at = {i: r for r, i in enumerate(rows)}  # slot -> row of this forward
        ids = torch.full((b, width + draft), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, width + draft), dtype=torch.long)
        anchor = torch.full((b, width + draft), PAD, dtype=torch.long)
        for i, (start, chunk, last) in chunks.items():
            r, n = at[i], len(chunk)
            if n:
                ids[r, :n] = torch.tensor(chunk)
                pos[r, :n] = torch.arange(start, start + n)
                anchor[r, :n] = MAIN
            p = len(self.slots[i].prompt)
            if draft and last and p >= 2:  # the first drafts: slots anchored at P-2
                block = slot_block(torch.tensor(p - 2), draft, self.mask_id)
                ids[r, width:], pos[r, width:], anchor[r, width:] = block[:3]
        causal = draft == 0 and all(start == 0 for start, _, _ in chunks.values())
        dev = self.device
        # a prefilling slot's chunk goes right after what it has encoded so far
        length = torch.tensor([chunks[i][0] for i in rows], dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        hidden = self._forward(
            rows[0], ids.to(dev), pos.to(dev), anchor.to(dev), length, causal, rows=rows
        )
        self.prefill_forwards += 1
        if self.adaptive and draft:  # what width costs, known before the first decode step
            devices.synchronize(dev)
            self.budget.record_prefill(b * (width + draft), time.perf_counter() - t0)
        for i, (start, chunk, last) in chunks.items():
            s = self.slots[i]
            s.prefilled = start + len(chunk)
            self.length[i] = s.prefilled
            if last:
                r = at[i]
                p = len(s.prompt)
                if draft and p >= 2:
                    self._start(i, hidden[r, width:], hidden[r, width - 1])
                else:
                    self._start(i, None, None)

    def _start(
        self, i: int, slot_hidden: torch.Tensor | None, anchor_hidden: torch.Tensor | None
    ) -> None:
        """Slot ``i`` finished its prefill: it decodes from the next step on."""
        s = self.slots[i]
        s.running = True
        self.length[i] = len(s.prompt) - 1
        self.last[i] = s.prompt[-1]
        self.ema[i] = self.budget.prior_accept()  # what drafts have earned so far (K at first)
        big_m, n_blocks = self._next_shape
        if slot_hidden is None or self.k == 0:
            self.m[i] = 0
            s.drafted = 0
            self.paid[i] = False
            self.cand[i] = -1
            if self.k > 0 and (
                not s.params.greedy or self.budget.drafting_pays(self._decode_rows())
            ):
                self.cand[i, 0] = 0  # no drafts yet: draft from v_0 in the first step
                self._next_shape = (big_m, max(n_blocks, 1))
            self.run[i] = True  # (a row that starts as AR adds no block to the next step)
            return
        p, n = len(s.prompt), slot_hidden.shape[0]
        drafts, conf, keep = self._draft(
            slice(i, i + 1), slot_hidden[None], anchor_hidden[None], torch.tensor([p])
        )
        self.drafts[i, :n], self.logp[i, :n] = drafts[0], conf[0]
        self.m[i] = keep[0]
        self.paid[i] = True
        s.drafted = n
        self.cand[i] = choose_anchors(conf, keep, self.anchors, self.coverage)[0]
        self.run[i] = True
        self._next_shape = (max(big_m, n), max(n_blocks, 1))  # widest: no host read of keep
