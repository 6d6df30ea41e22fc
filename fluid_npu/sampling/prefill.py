"""Admission and prefill of the engine (``scheduler.py``): waiting requests into free slots, then
their prompts into the slot cache, a chunk per step.

``PrefillMixin._admit`` gives each waiting request a free slot (the one whose cache still holds
the longest prefix of its prompt, which it then does not encode; else one that holds nothing:
``reuse.py``), with its EOS ids, token budget and sampling settings (one write per setting for all
the slots a step admits: on an eager accelerator every write is a launch). ``_prefill`` runs one
forward for every slot still encoding its prompt: each its next chunk of at most
``prefill_chunk`` tokens of ``prompt[:-1]`` (a forward of first chunks without drafts is plain
causal attention, no mask tensor); the chunk that ends a prompt also drafts the first tokens —
MASK slots anchored at the prompt's ``P-2``, as Stage I trains them; as many as the decode steps'
blocks now hold (``K`` for a sampling request) — unless drafting has not been paying. ``_start``
turns those slots into the requests' first drafts and candidate blocks, for every prompt the chunk
ended at once: from the next step on the slots decode (``step.py``).
"""

from __future__ import annotations

import time

import torch

from fluid_npu import device as devices
from fluid_npu.layout import slot_block
from fluid_npu.sampling.fused import choose_anchors
from fluid_npu.sampling.host_step import choose_anchors_host
from fluid_npu.sampling.penalties import Penalties
from fluid_npu.sampling.requests import Slot
from fluid_npu.sampling.reuse import MIN_REUSE, common_prefix
from fluid_ops.meta import MAIN, PAD

PROMPT_LOGITS = 1 << 24  # prompt logprobs: logits per LM-head call (64 MiB in float32)


class PrefillMixin:
    """Admission and chunked prefill of ``Scheduler`` (which owns the state these methods use)."""

    def _admit(self) -> None:
        """Waiting requests into free slots (``reuse.py`` chooses which), their per-slot settings
        written once for all of them."""
        rows = []
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not self.waiting or not free:
            return
        # what each busy slot has encoded of its prompt (its entries below that never change); not
        # in float16, where an entry written as zero may not have been judged an overflow yet
        busy = {
            i: s.prompt[: s.prefilled]
            for i, s in enumerate(self.slots)
            if s is not None and not self._watch
        }
        waiting = []  # requests that wait for a slot to encode the prefix they share ...
        while self.waiting and len(free) > len(waiting):  # ... each keeps a free slot, so no
            # request behind it in the queue (later, or of a higher priority value) overtakes it
            s = self.waiting.popleft()
            # the row whose cache holds the longest prefix of the prompt (reuse.py); a request
            # that wants its prompt's log-probabilities encodes all of it
            salt = s.req.cache_salt
            hit = (
                self.prefixes.match(s.prompt, free, busy, salt) if s.prompt_lps is None else (-1, 0)
            )
            if s.prompt_lps is None and self._worth_waiting(s, hit[1]):
                waiting.append(s)
                continue
            placed = self.prefixes.place(s.prompt, free, hit, salt)
            # the found tokens from a pool row or busy slot; what the slot held, to the pool
            self.kv.move_entries(
                placed.slot, placed.source, placed.cached, placed.keep, placed.save_to
            )
            i, s.prefilled = placed.slot, placed.cached
            s.cached, s.admitted_at = placed.cached, time.monotonic()
            free.remove(i)
            self.slots[i] = s
            if not self._watch:
                busy[i] = s.prompt[: s.cached]
            rows.append(i)
        self.waiting.extendleft(reversed(waiting))  # (first in the queue, in their order)
        if not rows:
            return
        slots = [self.slots[i] for i in rows]
        dev = self.device
        at = torch.tensor(rows, device=dev)
        width = self.eos.shape[1]
        eos = [(ids := self._eos_of(i)) + [-1] * (width - len(ids)) for i in rows]
        self.eos[at] = torch.tensor(eos, dtype=torch.long, device=dev)
        self.max_new[at] = torch.tensor([s.req.max_new_tokens for s in slots], device=dev)
        arm = [s.req.grammar_after if s.armed else -1 for s in slots]  # (constrained.py)
        self.arm[at] = torch.tensor(arm, dtype=torch.long, device=dev)
        self.new_count.index_fill_(0, at, 0)
        self.overflowed.index_fill_(0, at, False)
        if any(s.cached for s in slots):  # encoding starts after what the slot holds
            self.length[at] = torch.tensor([s.cached for s in slots], device=dev)
        else:
            self.length.index_fill_(0, at, 0)
        self.run.index_fill_(0, at, False)
        params = [s.params for s in slots]
        self.temp[at] = torch.tensor([p.temperature for p in params], device=dev)
        self.top_k[at] = torch.tensor([p.top_k for p in params], device=dev)
        self.top_p[at] = torch.tensor([p.top_p for p in params], device=dev)
        self.min_p[at] = torch.tensor([p.min_p for p in params], device=dev)
        self.seed[at] = torch.tensor([p.seed or 0 for p in params], device=dev)
        if any(not p.greedy for p in params) and self.dhid is None and self.k:
            h = self.model.config.get_text_config().hidden_size
            dtype = next(self.model.parameters()).dtype
            self.dhid = torch.zeros((self.slots_n, self.k, h), dtype=dtype, device=dev)
        for i, s in zip(rows, slots):  # penalties (penalties.py): counts from the prompt on
            p = s.params
            if p.adjusted and self.penalties is None:
                vocab = self.head.weight.shape[0]
                self.penalties = Penalties(self.slots_n, vocab, dev)
            if p.adjusted:
                self.penalties.admit(i, s.prompt, p, s.req.min_tokens_hold)

    def _worth_waiting(self, s: Slot, found: int) -> bool:
        """Whether ``s`` should wait a step: a slot still encoding its prompt will hold at least
        ``MIN_REUSE`` more of ``s``'s prompt than the ``found`` tokens any row holds now (requests
        that share a prefix and arrive together: the first encodes it, the others copy it). That
        slot's prefill moves on every step, so the wait ends."""
        cap = len(s.prompt) - 2
        if not self.prefixes.enabled or cap < MIN_REUSE or self._watch:
            return False
        for t in self.slots:
            if t is not None and not t.running and t.req.cache_salt == s.req.cache_salt:
                n = common_prefix(t.prompt[:-1], s.prompt, cap)
                if n - found >= MIN_REUSE and t.prefilled < n:
                    return True
        return False

    def _decode_rows(self) -> int:
        """The rows the next decode step computes (the price of a draft is per step)."""
        return 1 + max((i for i, x in enumerate(self.slots) if x is not None), default=0)

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
        # (a row under a grammar takes none: grammar.py; one whose grammar starts later does)
        drafting = [i for i in ending if self.slots[i].matcher is None or self.slots[i].armed]
        sampling = any(not self.slots[i].params.greedy for i in drafting)
        rows_next = self._decode_rows()
        draft = 0
        if k > 0 and drafting and (sampling or self.budget.drafting_pays(rows_next)):
            draft = k if sampling else self.budget.prefill_length(rows_next)
        if width == 0:  # one-token prompts only: nothing to encode and no anchor to draft from
            self._start(rows)
            return
        b = len(rows)
        at_row = {i: r for r, i in enumerate(rows)}  # slot -> row of this forward
        # built as lists on the host, one tensor each (few ops however many rows)
        pad = [self.pad_id] * width, [0] * width, [PAD] * width
        ids, pos, anchor = ([], [], [])
        for i in rows:
            start, chunk, _ = chunks[i]
            n = len(chunk)
            ids.append(chunk + pad[0][n:])
            pos.append(list(range(start, start + n)) + pad[1][n:])
            anchor.append([MAIN] * n + pad[2][n:])
        ids, pos, anchor = (
            torch.tensor(x, dtype=torch.long).reshape(b, width) for x in (ids, pos, anchor)
        )
        drafted = [i for i in drafting if draft and len(self.slots[i].prompt) >= 2]
        if draft:  # the first drafts: slots anchored at P-2 (PAD in rows that end no prompt)
            live = [i in drafted for i in rows]
            at_p2 = [len(self.slots[i].prompt) - 2 if d else 0 for i, d in zip(rows, live)]
            block = slot_block(torch.tensor(at_p2), draft, self.mask_id, live=torch.tensor(live))
            ids, pos, anchor = (torch.cat(x, dim=1) for x in zip((ids, pos, anchor), block[:3]))
        causal = draft == 0 and all(start == 0 for start, _, _ in chunks.values())
        dev = self.device
        # a prefilling slot's chunk goes right after what it has encoded so far
        length = torch.tensor([chunks[i][0] for i in rows], dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        anchor = anchor.to(dev)
        hidden = self._forward(rows[0], ids.to(dev), pos.to(dev), anchor, length, causal, rows=rows)
        self.prefill_forwards += 1
        self._prompt_logprobs(rows, chunks, hidden)
        if self.adaptive and draft and self.budget.needs_prefill_timing():  # what width costs,
            # known before the first decode step (later the steps' own costs tell: no wait here)
            devices.synchronize(dev)
            self.budget.record_prefill(b * (width + draft), time.perf_counter() - t0)
        for i, (start, chunk, _) in chunks.items():
            self.slots[i].prefilled = start + len(chunk)
        at = torch.tensor(rows, device=dev)  # a prefilling slot's length: what it has encoded
        self.length[at] = torch.tensor([self.slots[i].prefilled for i in rows], device=dev)
        if self._overflow is not None:  # float16: a prompt token overflowed (judged next step)
            hit = (self._overflow[:, :width] & (anchor[:, :width] == MAIN)).any(dim=1)
            self.overflowed[at] = self.overflowed[at] | hit
        # the prompts this chunk ended decode from the next step: with their first drafts (one
        # batch for all of them), or without (a prompt of one token, or drafting not paying)
        if drafted:  # the anchor: each prompt's last encoded token (shorter chunks are padded)
            r = torch.tensor([at_row[i] for i in drafted], device=dev)
            end = torch.tensor([len(chunks[i][1]) - 1 for i in drafted], device=dev)
            self._start(drafted, hidden[r, width:], hidden[r, end])
        self._start([i for i in ending if i not in drafted])

    def _prompt_logprobs(
        self, rows: list[int], chunks: dict[int, tuple[int, list[int], bool]], hidden: torch.Tensor
    ) -> None:
        """The log-probabilities of the prompt tokens this forward's chunks predict, for the
        requests that ask for them (``SamplingParams.prompt_logprobs``): the hidden state at prompt
        position ``j`` gives token ``j + 1``'s under the model's own distribution (no temperature:
        a score must not move with a decoding setting, as vLLM's raw prompt logprobs); the LM head
        runs over at most ``PROMPT_LOGITS`` logits at a time. One host read per such request and
        chunk (only these requests pay it)."""
        vocab = self.head.weight.shape[0]
        piece = max(1, PROMPT_LOGITS // vocab)
        for r, i in enumerate(rows):
            s = self.slots[i]
            start, chunk, _ = chunks[i]
            if s.prompt_lps is None or not chunk:
                continue
            n, n_top = len(chunk), s.params.prompt_logprobs or 0
            targets = torch.tensor(s.prompt[start + 1 : start + n + 1], device=self.device)
            for lo in range(0, n, piece):
                hi = min(lo + piece, n)  # (the row's padding and draft slots follow its chunk)
                lp = self.head.logits(hidden[r, lo:hi]).log_softmax(-1)
                own = lp.gather(-1, targets[lo:hi, None])
                parts = [own, (lp >= own).sum(-1, keepdim=True)]  # its rank, counted as vLLM
                if n_top:
                    top = lp.topk(n_top, dim=-1)
                    parts += [top.indices, top.values]
                read = torch.cat([x.double() for x in parts], dim=1).tolist()
                s.prompt_lps += [
                    (row[0], [(int(t), v) for t, v in zip(row[2 : 2 + n_top], row[2 + n_top :])],
                     int(row[1]))
                    for row in read
                ]  # fmt: skip

    def _start(
        self,
        rows: list[int],
        slot_hidden: torch.Tensor | None = None,
        anchor_hidden: torch.Tensor | None = None,
    ) -> None:
        """The slots ``rows`` finished their prefill: they decode from the next step on. With
        ``slot_hidden [R, n, H]`` (and their anchors' ``anchor_hidden [R, H]``) those slots become
        their first drafts; without, the first step drafts a block from ``v_0`` where drafting
        pays (a sampling request always drafts)."""
        if not rows:
            return
        dev = self.device
        slots = [self.slots[i] for i in rows]
        at = torch.tensor(rows, device=dev)  # (their length, P - 1, is what the prefill wrote)
        self.last[at] = torch.tensor([s.prompt[-1] for s in slots], device=dev)
        # what drafts have earned so far (K at first)
        self.ema.index_fill_(0, at, self.budget.prior_accept())
        big_m, n_blocks = self._next_shape
        if slot_hidden is None or self.k == 0:
            self.m.index_fill_(0, at, 0)
            self.paid.index_fill_(0, at, False)
            pays = self.k > 0 and self.budget.drafting_pays(self._decode_rows())
            first = [self.k > 0 and (pays or not s.params.greedy) for s in slots]
            cand = torch.full((len(rows), self.anchors), -1, dtype=torch.long)
            cand[:, 0] = torch.tensor(first, dtype=torch.long) - 1  # 0: a block from v_0
            self.cand[at] = cand.to(dev)
            if any(first):
                self._next_shape = (big_m, max(n_blocks, 1))
            for s in slots:
                s.drafted = 0
                s.running = True
            # (a row that starts as AR adds no block to the next step)
            self.run.index_fill_(0, at, True)
            return
        n = slot_hidden.shape[1]
        prompt = torch.tensor([len(s.prompt) for s in slots])
        drafts, conf, keep = self._draft(rows, slot_hidden, anchor_hidden, prompt)
        self.drafts[at, :n], self.logp[at, :n] = drafts, conf
        self.m[at] = keep
        self.paid.index_fill_(0, at, True)
        if self.host_step:  # a CPU: host numbers cost no read (host_step.py), and fewer calls
            cand = [choose_anchors_host(c[:m], m, self.anchors, self.coverage)
                    for c, m in zip(conf.tolist(), keep.tolist())]  # fmt: skip
            self.cand[at] = torch.tensor(cand, dtype=torch.long)
        else:
            self.cand[at] = choose_anchors(conf, keep, self.anchors, self.coverage)
        for s in slots:
            s.drafted = n
            s.running = True
        self.run.index_fill_(0, at, True)
        # no host read of keep or of how many candidates each row got (choose_anchors gives up
        # to ``anchors``): a sampling row gets room for all of them (a narrower step would drop
        # some, and its tokens would then depend on its neighbours); greedy rows' first step
        # keeps the blocks the batch had (at least one: measured faster, and their tokens are
        # the argmax either way)
        sampling = any(not s.params.greedy for s in slots)
        self._next_shape = (max(big_m, n), self.anchors if sampling else max(n_blocks, 1))
