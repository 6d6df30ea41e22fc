"""One decode step of the engine (``scheduler.py``): verify, commit, draft — fixed shapes, one read.

``StepMixin._decode`` is the fused step of DESIGN §1.3 over the running slots ``[0, hi)``: the main
tokens (``v_0`` and the pending drafts; their count rounded up to a power of two when compiled),
then the candidate MASK blocks; after the forward, everything — the accepted length, the
correction (argmax, or the rejection rule of ``rules.py`` for sampling rows), EOS,
``max_new_tokens``, the next drafts and blocks, the AR fallback — is computed on the device, and
one packed tensor (plus logprobs when a request wants them) is read back and turned into
``Event``s on the host, where stop strings are checked on the committed text. ``_draft`` turns
slot hidden states into drafts (argmax, or drawn from the slots' own distribution ``q`` for
sampling rows) for both the prefill and this step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fluid_npu import device as devices
from fluid_npu.sampling.constrained import ConstrainedMixin
from fluid_npu.sampling.events import EventsMixin
from fluid_npu.sampling.fused import choose_anchors
from fluid_npu.sampling.kv import ForwardPlan
from fluid_npu.sampling.requests import Event
from fluid_npu.sampling.rules import DRAFT, sample, uniform
from fluid_npu.sampling.sampled import SampledMixin
from fluid_npu.sampling.step_inputs import step_inputs
from fluid_npu.sampling.stops import StopsMixin
from fluid_ops.gate import draft_gate
from fluid_ops.hits import block_hits
from fluid_ops.step_mask import step_mask
from fluid_ops.verify import commit_tokens, verify_drafts

_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)  # a 4D stand-in: transformers builds no mask
EMA = 0.7  # weight of the past in a row's accepted-drafts average


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class StepMixin(SampledMixin, ConstrainedMixin, StopsMixin, EventsMixin):
    """The decode step of ``Scheduler`` (which owns the state these methods read and write)."""

    # ------------------------------------------------------------------ forwards

    def _forward(
        self,
        lo: int,
        ids: torch.Tensor,
        pos: torch.Tensor,
        anchor: torch.Tensor,
        length: torch.Tensor,
        causal: bool = False,
        compiled: bool = False,
        rows: list[int] | None = None,
        mask_of: Callable[[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[B, W, H]`` of new tokens written at ``length + t`` in slots ``lo…``
        (or in the slots ``rows``); ``mask_of(extent)``: the mask ``step_mask`` would give, made
        by the caller (``host_step.py``)."""
        b, w = ids.shape
        write = length[:, None] + torch.arange(w, device=ids.device)[None]
        slots = range(lo, lo + b) if rows is None else rows
        top = w if causal else self._max_extent(slots, w)  # every new entry's index lies below
        if top > self.kv.capacity:  # (kv.py writes by flat index: past capacity, another row's)
            raise RuntimeError(
                f"a forward would write cache entries up to index {top - 1}, past the slot "
                f"cache's {self.kv.capacity} (sized to max_len plus the widest forward): an "
                "engine bug; nothing was written"
            )
        if causal:
            plan = ForwardPlan(lo, lo + b, write, w, None, causal=True)
        else:
            # keys [0, extent): the committed entries and this forward's; rounded for few shapes
            extent = min(self.kv.capacity, self._bucket(top, 64))
            mask = step_mask(length, pos, anchor, extent) if mask_of is None else mask_of(extent)
            plan = ForwardPlan(lo, lo + b, write, extent, mask)
        if rows is not None:
            plan.rows = torch.tensor(rows, dtype=torch.long, device=ids.device)
        if self._watch:  # float16: which of this forward's entries overflowed (kv.py)
            plan.overflow = torch.zeros((b, w), dtype=torch.bool, device=ids.device)
        self._overflow = plan.overflow
        self.kv.set_plan(plan)
        self.computed_tokens += ids.numel()
        if self.positions is not None and top > self.positions:
            # a MASK slot past the model's context drafts a token no request can commit (max_len
            # is at most the context), so it reads the last position: a table of learned
            # positions (GPT-2, OPT) is never indexed past its end. Host bound, no device read;
            # the visibility above keeps the true positions.
            pos = pos.clamp(max=self.positions - 1)
        use_compiled = self._compiled is not None and lo == 0 and not causal and compiled
        try:
            # (support.py: a dynamic rope at generate's frequencies; device.py: no cuDNN plans)
            with self._rope(), devices.engine_attention(ids.device):
                if self._lean is not None:  # the same arithmetic without module dispatch (lean.py)
                    hidden = (self._compiled if use_compiled else self._lean)(ids, pos, self.kv)
                else:
                    run = self._compiled if use_compiled else self._decoder
                    hidden = run(
                        input_ids=ids,
                        attention_mask=_NO_MASK if plan.mask is None else plan.mask,  # 4D as is
                        position_ids=pos,
                        use_cache=True,
                        fluid_plan=plan,
                        **{self._cache_kw: self.kv},
                    ).last_hidden_state
        finally:
            self.kv.clear_plan()
        return hidden

    def _bucket(self, n: int, to: int) -> int:
        """``n`` rounded up to a multiple of ``to`` when the step is compiled (few shapes)."""
        return _round_up(n, to) if self._compiled is not None else n

    def _max_extent(self, slots: range | list[int], w: int) -> int:
        # host-side bound, no device read: every slot's length is at most max_len
        top = 0
        for i in slots:
            s = self.slots[i]
            if s is not None:
                top = max(top, len(s.prompt) + len(s.new))
        return min(top, self.max_len) + w

    def _sampling_rows(self, hi: int) -> tuple[bool, bool, list[int]]:
        """Whether any slot below ``hi`` samples, whether any wants logprobs, and the running
        rows whose logits penalties / a bias / ``min_tokens`` adjust (host flags)."""
        live = [s.params for s in self.slots[:hi] if s is not None]
        adjusted = [i for i, s in enumerate(self.slots[:hi])
                    if s is not None and s.running and s.params.adjusted]  # fmt: skip
        return any(not p.greedy for p in live), any(p.logprobs for p in live), adjusted

    def _draft(
        self,
        rows: slice | list[int],
        hidden: torch.Tensor,
        anchor_hidden: torch.Tensor,
        first: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drafts ``[b, L]``, their log-confidence and how many to keep, from slot hidden states
        of the slots ``rows`` (a range: the decode step's; a list: the prompts a prefill ended).

        Greedy rows draft the slots' argmax; sampling rows draw from the slots' filtered
        distribution ``q`` (the draft for position ``first + j`` with that position's DRAFT
        uniform) and keep ``q(draft)`` and the hidden states for the next step's verify.
        """
        st = self.head.stats(hidden)
        drafts, conf = st.argmax, st.max_logprob
        slots = self.slots[rows] if isinstance(rows, slice) else [self.slots[i] for i in rows]
        if any(s is not None and not s.params.greedy for s in slots):
            at = rows if isinstance(rows, slice) else torch.tensor(rows, device=self.device)
            n = hidden.shape[1]
            q = self._filtered(self.head.logits(hidden), at)
            where = first.to(self.device)[:, None] + torch.arange(n, device=self.device)
            anchor = first.to(self.device)[:, None] - 2  # slot j guesses anchor + 2 + j
            drawn = sample(q, uniform(self.seed[at][:, None], where, DRAFT, anchor))
            qp = q.gather(-1, drawn[..., None])[..., 0]
            sampled = (self.temp[at] > 0)[:, None]
            drafts = torch.where(sampled, drawn, drafts)
            conf = torch.where(sampled, qp.clamp(min=1e-30).log(), conf)
            self.qprob[at, :n] = qp
            self.dhid[at, :n] = hidden.to(self.dhid.dtype)
        return drafts, conf, self.policy.keep(st.entropy, anchor_hidden, self.khead)

    def _decode(self) -> list[Event]:
        hi = 1 + max(i for i, s in enumerate(self.slots) if s is not None and s.running)
        hi = _pow2(hi) if self._compiled is not None else hi
        hi = min(hi, self.slots_n)
        big_m, n_blocks = self._next_shape
        # constrained rows (grammar.py): the drafts their grammars force, masks made below
        constrained, forced, armed = self._constrained_rows(hi)
        big_m = max([big_m, *map(len, forced)])
        if self._compiled is not None:  # a few shapes for the compiled step; exact sizes else
            big_m = min(_pow2(big_m) if big_m else 0, self.k)
        n_blocks = min(n_blocks, self.anchors) if self.k else 0
        k = self.k  # this step's block length
        any_sampled, any_lp, penalised = self._sampling_rows(hi)
        # a sampling row's tokens depend on its drafts (the rejection rule), so while one is in
        # the batch the block choices stay per-row (no timing-driven shape choices): its seed
        # then gives the same tokens alone or in any batch
        adaptive = self.adaptive and not any_sampled
        if adaptive and n_blocks:
            k = self.budget.choose_length(hi)
            n_blocks = self.budget.choose_blocks(hi, big_m, n_blocks, k)
        plain = not (constrained or armed or any_sampled or any_lp or penalised)
        if self._host_step_ok(hi, plain):  # one greedy row on a CPU: host_step.py
            return self._decode_host(big_m, n_blocks, k)
        dev = self.device
        if constrained:
            self._set_drafts(constrained, forced, big_m)
        run = self.run[:hi]
        base = self.length[:hi]
        j = torch.arange(big_m + 1, device=dev)
        drafts = self.drafts[:hi, :big_m]
        # the main tokens (v_0 and the pending drafts), then a MASK block per candidate length
        ids_t, pos_t, anchor_t, m, cand = step_inputs(
            self.last[:hi], drafts, base, self.m[:hi], run, self.cand[:hi, :n_blocks], k,
            self.mask_id,
        )  # fmt: skip
        width = ids_t.shape[1]
        compiles = _compiles() if self._compiled is not None else 0
        t0 = time.perf_counter()
        hidden = self._forward(0, ids_t, pos_t, anchor_t, base, compiled=True)
        self.decode_forwards += 1
        allowed = self._grammar_masks(constrained, forced, big_m) if constrained else None

        adjusted = sorted({*penalised, *constrained})
        # (every row adjusted: their argmax is the adjusted logits', one LM-head pass, not two)
        ar = None if len(adjusted) == hi else self.head.argmax(hidden[:, : big_m + 1])
        logits = None
        if any_sampled or any_lp:
            logits = self.head.logits(hidden[:, : big_m + 1])  # [hi, M+1, V]
        pen_rows = None
        raw = logits  # the model's own, for logprobs (the adjusted rows' are replaced below)
        if adjusted and any_lp and self.logprobs_mode.startswith("raw"):
            raw = logits.clone()
        if adjusted:  # the penalised (penalties.py) / constrained AR distribution, and its argmax
            at = torch.tensor(adjusted, device=dev)
            own = self.head.logits(hidden[at, : big_m + 1]) if logits is None else logits[at]
            if penalised:
                pen_rows = torch.tensor(penalised, device=dev)
                pen = [adjusted.index(i) for i in penalised]
                count, eos_ids = self.new_count[pen_rows], self.eos[pen_rows]
                own[pen] = self.penalties.apply(
                    own[pen], drafts[pen_rows], m[pen_rows], pen_rows, count, eos_ids
                )
            if constrained:  # every verified position masked by the row's grammar
                ours = [adjusted.index(i) for i in constrained]
                own[ours] = own[ours].masked_fill(~allowed, -math.inf)
            if logits is not None:
                logits[at] = own
            best = own.argmax(dim=-1)
            ar = best if ar is None else ar.index_copy(0, at, best)
            # positions where the adjustments left no token (allowed tokens all banned, EOS held
            # back by min_tokens, ...): nothing there is the model's, so a greedy row ends before
            # (the argmax is -inf exactly where every token is: a gather, not a pass over V)
            none_left = torch.isneginf(own.gather(-1, best[..., None])[..., 0])
            nothing = torch.zeros((hi, big_m + 1), dtype=torch.bool, device=dev)
            nothing = nothing.index_copy(0, at, none_left)
        else:
            nothing = None
        verified = None  # the tokens the verify built (greedy steps; sampling rows' come below)
        if big_m:  # (fluid_ops.verify: one launch on CUDA)
            a, corr, verified = verify_drafts(drafts, ar, m, nothing, tokens=not any_sampled)
        else:  # nothing to verify: the argmax after v_0 is the step's token (a = m = 0)
            a, corr = m, ar
        broken = None  # sampling rows whose distribution is not finite (they end as "error")
        empty = None  # rows left nothing to draw or pick (they end after their accepted drafts)
        if any_sampled:
            a, corr, broken, empty = self._verify_sampled(logits, drafts, m, base, a, corr, hi,
                                                          big_m)  # fmt: skip
        if nothing is not None:  # a greedy row whose argmax would be one of no token's
            stuck = nothing.gather(1, a[:, None])[:, 0] & (self.temp[:hi] == 0)
            empty = stuck if empty is None else empty | stuck
        toks = corr  # [hi, M+1]: the accepted drafts, then the correction
        if big_m:  # (sampling rows: the rejection rule set a and the correction anew)
            toks = commit_tokens(drafts, corr, a) if any_sampled else verified
        take = torch.minimum(a + 1, self.max_new[:hi] - self.new_count[:hi])
        if empty is not None:  # the accepted drafts, no draw (constrained.py ends the row)
            take = torch.where(empty, torch.minimum(take, a), take)
        eos = self.eos[:hi]
        is_eos = (toks[:, :, None] == eos[:, None, :]).any(dim=-1) & (j[None] < take[:, None])
        hit_eos = is_eos.any(dim=1)
        take = torch.where(hit_eos, is_eos.long().argmax(dim=1) + 1, take)
        arm_cut = None
        if armed:  # a row whose grammar starts after a token stops its step there (constrained.py)
            take, arm_cut = self._cut_at_arm(toks, take, a, j, hi)
            hit_eos = (is_eos & (j[None] < take[:, None])).any(dim=1)  # (an EOS after it: not)
        take = torch.where(run, take, 0)
        # the position a new block's first slot guesses (after the correction), from the length
        # before this step's commit; only sampling rows' draws read it
        first = base + a + 2 if any_sampled else base
        done = run & (hit_eos | (self.new_count[:hi] + take >= self.max_new[:hi]))
        if empty is not None:
            empty = empty & run & ~done  # (done 3 in the read: constrained.py's "stop")
            done = done | empty
        if self._overflow is not None:  # float16: a committed token's key / value overflowed
            # (v_0 and the accepted drafts fed this step: entries 0 ... take - 1; a rejected draft
            # that overflows is never part of the sequence)
            fed = j[None] < take.clamp(min=1)[:, None]
            own = (self._overflow[:, : big_m + 1] & fed).any(dim=1) | self.overflowed[:hi]
            broken = own if broken is None else broken | own
        if broken is not None:  # nothing drawn from NaN / inf is committed: the row ends here
            broken = broken & run
            take = torch.where(broken, 0, take)
            done = done | broken
        self.new_count[:hi] += take
        self.length[:hi] += take
        if pen_rows is not None:  # the committed tokens count from the next step on
            self.penalties.commit(pen_rows, toks, take)
        self.last[:hi] = torch.where(
            run, toks.gather(1, (take - 1).clamp(min=0)[:, None])[:, 0], self.last[:hi]
        )
        if self.adaptive:
            paid = self.paid[:hi] & run
            self.ema[:hi] = torch.where(
                paid, EMA * self.ema[:hi] + (1 - EMA) * a.float(), self.ema[:hi]
            )
        m_next = torch.zeros(hi, dtype=torch.long, device=dev)
        self.paid[:hi] = False
        blocks_had = (cand >= 0).sum(dim=1)  # candidate blocks each row had in this step
        hit_block = torch.full_like(a, -1)  # which of them the accepted length hit (-1: none)
        if n_blocks:  # the block anchored at the accepted length (fluid_ops.hits: one launch on
            # CUDA); a row whose grammar cut its step has none: the block was drafted after
            # tokens it did not commit
            blk, has, hit_block = block_hits(cand, a, run, arm_cut)
            rows = torch.arange(hi, device=dev)
            sel = hidden[:, big_m + 1 :].view(hi, n_blocks, k, -1)[rows, blk]
            drafted, conf, keep = self._draft(slice(0, hi), sel, hidden[rows, a], first)
            m_next = torch.where(has, keep, 0)
            self.drafts[:hi, :k], self.logp[:hi, :k] = drafted, conf
            self.paid[:hi] = has  # the next verify judges a block this row paid for
        cand_next = torch.full((hi, self.anchors), -1, dtype=torch.long, device=dev)
        probe = self.adaptive and bool(k) and self.budget.probe_due(hi)
        # a plain AR step of a batch where no row drafts and no probe is due leaves every row AR:
        # averages only move on verifies, so rows return to drafting through probes (or a new
        # request that drafts) and the step skips the pricing below
        all_ar = self.adaptive and not (n_blocks or big_m or probe or any_sampled)
        if k and not all_ar:
            if n_blocks:
                cand_next = choose_anchors(self.logp[:hi], m_next, self.anchors, self.coverage)
            else:  # no block, so no pending drafts: what choose_anchors gives for m = 0
                cand_next = self._from_v0[:hi]
            if self.adaptive:  # drafts already made are verified; new blocks only where they pay
                # a block widens the step for every row, so the rows worth a block draft only while
                # together they earn what the whole batch pays (fluid_ops.gate: one launch on
                # CUDA); every row that decodes as AR probes on the same step (probe_due above):
                # one wide step per probe interval for the batch, not one per row
                cand_next = draft_gate(cand_next, self.ema[:hi], run, done, self.temp[:hi],
                                       self.budget.price(hi), probe)  # fmt: skip
        self.m[:hi] = m_next
        self.cand[:hi] = cand_next
        # the step's one host read: per row take, done, accepted, drafted, tokens; then the shape
        n_cand = (cand_next >= 0).sum(dim=1)
        packed_t = torch.cat(
            [
                take[:, None],
                done[:, None].long()
                + (0 if broken is None else broken[:, None].long())
                + (0 if empty is None else 2 * empty[:, None].long()),
                a[:, None],
                m[:, None],
                toks,
                torch.stack([m_next.max(), n_cand.max()])[None].expand(hi, 2),
                blocks_had[:, None],
                hit_block[:, None],
            ],
            dim=1,
        )
        n_top = 0
        if any_lp:  # logprobs of the committed tokens (+ the best alternatives), same read
            n_top = max(s.params.top_logprobs for s in self.slots[:hi] if s is not None)
            lp = self._logprobs(raw, logits, hi)
            chosen = lp.gather(-1, toks[..., None])  # [hi, M+1, 1]
            rank = (lp >= chosen).sum(dim=-1)  # tokens at least as likely (vLLM's rank)
            parts = [packed_t.double(), chosen[..., 0].double(), rank.double()]
            if n_top:
                top = lp.topk(n_top, dim=-1)
                parts += [top.indices.flatten(1).double(), top.values.flatten(1).double()]
            packed_t = torch.cat(parts, dim=1)
        reading = sorted(constrained + armed)
        if reading and k:  # their next drafts, which their masks are built through
            packed_t = torch.cat([packed_t, m_next[:, None], self.drafts[:hi, :k]], dim=1)
        packed = packed_t.tolist()
        if self._compiled is None or _compiles() == compiles:  # a step that compiled is no cost
            self.budget.record(hi, width, time.perf_counter() - t0)
        width_int = 4 + big_m + 1 + 2  # the two shape columns end here; two block columns follow
        self._next_shape = (int(packed[0][width_int - 2]), int(packed[0][width_int - 1]))
        if reading and k:
            self._keep_drafts(reading, packed, k)
        events = self._events(packed, hi, big_m, k, n_top)
        if self.adaptive and not self._prior_replaced and self.budget.has_history():
            # the first requests started on the optimistic prior (K); now that verifies tell what
            # drafts earn, no row keeps more credit than that (on the device: no read)
            self.ema.clamp_(max=self.budget.prior_accept())
            self._prior_replaced = True
        return events


def _compiles() -> int:
    """Frames torch.compile has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
