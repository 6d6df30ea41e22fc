"""The decode engine: request slots over a static KV cache, continuous batching, fused steps.

A ``Scheduler`` owns the model and ``max_batch`` request slots in one preallocated ``SlotKV``.
Requests are ``submit``-ted into a FIFO queue; every ``step()``:

1. retires aborted requests and admits waiting ones into free slots (lowest index first);
2. runs one **prefill** forward for the slots still encoding their prompt: each row its next
   chunk of at most ``prefill_chunk`` tokens of ``prompt[:-1]`` (a chunk that starts a prompt,
   with no drafts, is plain causal attention — no mask tensor); the chunk that ends a prompt also
   drafts the first ``K`` tokens (MASK slots anchored at the prompt's ``P-2``, as Stage I trains);
3. runs one **fused decode** forward for every running slot (``fused.py`` for the method): verify
   the pending drafts against the AR argmax, commit, draft the next block — all on the device;
4. reads back one small packed tensor (the only host synchronisation of the step) and turns it
   into ``Event``s: committed tokens, finished requests (EOS / ``max_new_tokens``), statistics.

Shapes are fixed per step: the decode batch is the slot range ``[0, hi)`` with ``hi`` rounded up
to a power of two, and the width is ``(M + 1) + A·K`` with ``M`` (pending drafts) rounded up to a
power of two and ``A`` candidate blocks, both decided from the previous step's read-back; rows
that do not take part are ``PAD``. So a step's work is a handful of shapes that ``torch.compile``
(``compile=True``) or a device graph can capture.

**Drafting that pays for itself.** Step seconds are measured for every shape that runs and fitted
as ``c0 + c1 · tokens`` (``_cost_model``): overhead-bound steps (a small batch, a CPU-light model)
make width nearly free, compute-bound ones (a large batch) make it expensive. From that model and
the acceptance seen so far (accepted drafts per verify at every depth), each step picks its block
length among ``K``, ``K/2``, ``K/4`` for the most expected tokens per second, and a second block
only while it adds less than ``BLOCK_MARGIN`` to the step. Every row keeps an average of the drafts
it got accepted per verify (``ema``); a row whose drafts earn less than a block costs (``_price``)
decodes as plain AR (no block, width 1 when every row does) and probes again every ``PROBE_EVERY``
steps, like vLLM's adaptive draft length. These choices follow measured time, so they vary run to
run (the tokens never do); ``adaptive=False`` turns them off: every row always drafts, and ``A`` is
what the drafts' coverage asks for (DESIGN §1.3's loop).

Every committed token is an AR argmax of the model, so each request's output equals greedy
decoding of it alone, whatever else shares the batch (``tests/test_scheduler.py``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from fluid_npu.errors import ConfigError
from fluid_npu.model.attention import attention_kind
from fluid_npu.sampling.api import PromptError, check_context, eos_and_pad
from fluid_npu.sampling.fused import DEFAULT_ANCHORS, DEFAULT_COVERAGE, choose_anchors
from fluid_npu.sampling.head import LMHead
from fluid_npu.sampling.kv import (
    SLOT_ATTENTION,
    ForwardPlan,
    SlotKV,
    register_slot_attention,
    step_mask,
)
from fluid_npu.sampling.policies import DEFAULT_K_MAX, Policy, parse_policy
from fluid_npu.sampling.rules import (
    ACCEPT,
    DRAFT,
    DRAW,
    SamplingParams,
    filtered_probs,
    residual,
    sample,
    uniform,
)
from fluid_ops.meta import MAIN, PAD

PREFILL_CHUNK = 512
PROBE_EVERY = 16  # steps between probes of a row decoding as AR
EMA = 0.7  # weight of the past in accept_ema
BLOCK_MARGIN = 0.15  # a second block per step while it costs less than this much more
DEFAULT_PRICE = 0.25  # a block's relative cost assumed before it is measured
LEN_PROBE_EVERY = 32  # steps between full-length blocks once a shorter one is chosen
MIN_VERIFIES = 8  # verifies observed before the block length adapts
DEFAULT_MAX_LEN = 4096
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)  # a 4D stand-in: transformers builds no mask


@dataclass
class Request:
    """One generation request: prompt token ids and its own limits."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    eos_ids: Sequence[int] | None = None  # None: the scheduler's default EOS ids
    sampling: SamplingParams | None = None  # None: greedy
    stop: Sequence[str] = ()  # stop strings, checked on the committed text (needs a tokenizer)


@dataclass
class Event:
    """What one step produced for one request."""

    request_id: str
    tokens: list[int]  # committed in this step (may be empty)
    finished: bool
    finish_reason: str | None  # "stop" (EOS), "length" (max_new_tokens), "abort"
    new_tokens: int  # committed so far
    forwards: int  # decode forwards this request took part in so far
    accepted: int  # drafted tokens accepted in this step
    logprobs: list[float] | None = None  # of ``tokens``, when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None  # (token id, logprob) best first


@dataclass
class _Slot:
    req: Request
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefilled: int = 0  # prompt[:-1] tokens encoded so far
    stopped: bool = False  # a stop string ended it
    running: bool = False
    forwards: int = 0
    new: list[int] = field(default_factory=list)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class Scheduler:
    """Continuous-batching lossless decoder; see the module docstring. Not thread-safe."""

    def __init__(
        self,
        model: PreTrainedModel,
        mask_id: int,
        *,
        policy: str | Policy = "entropy",
        khead: torch.nn.Module | None = None,
        k_max: int | None = None,
        k_min: int = 1,
        max_batch: int = 8,
        max_len: int | None = None,
        eos_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        tokenizer: Any = None,
        prefill_chunk: int = PREFILL_CHUNK,
        anchors: int = DEFAULT_ANCHORS,
        coverage: float = DEFAULT_COVERAGE,
        adaptive: bool = True,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ConfigError(
                f"max_batch and prefill_chunk must be at least 1, got {max_batch}, {prefill_chunk}"
            )
        if anchors < 1 or coverage <= 0:
            raise ConfigError(f"anchors must be >= 1 and coverage > 0, got {anchors}, {coverage}")
        if k_max is None:
            k_max = getattr(khead, "k_max", DEFAULT_K_MAX)
        self.policy = parse_policy(policy, k_max=k_max, k_min=k_min, has_khead=khead is not None)
        self.model = model
        self.device = next(model.parameters()).device
        self.khead = None if khead is None else khead.to(self.device)
        self.mask_id = int(mask_id)
        self.tokenizer = tokenizer  # decodes committed text for stop strings
        self.eos_ids, self.pad_id = eos_and_pad(model, eos_ids, pad_id)
        cfg = model.config.get_text_config()
        limit = getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_LEN
        self.max_len = int(max_len or min(limit, DEFAULT_MAX_LEN))
        self.k = self.policy.block_len
        self.anchors, self.coverage, self.adaptive = anchors, coverage, adaptive
        self.prefill_chunk = prefill_chunk
        self.slots_n = max_batch
        widest = max(prefill_chunk, 1 + self.k + anchors * self.k) + self.k
        dtype = next(model.parameters()).dtype
        self.kv = SlotKV(model, max_batch, self.max_len + widest, dtype, self.device)
        self.head = LMHead(model)
        self._init_state()
        self.waiting: deque[_Slot] = deque()
        self.slots: list[_Slot | None] = [None] * max_batch
        self._ids: set[str] = set()
        self._aborted: list[str] = []
        self.prefill_forwards = 0
        self.decode_forwards = 0
        self.accept_hist: Counter = Counter()
        self.k_hist: Counter = Counter()
        self.step_cost: dict[tuple[int, int], float] = {}  # (rows, width) -> seconds (EMA)
        self._fit: tuple[float, float] | None = None  # the step cost model, see _cost_model
        self._len = self.k  # the block length chosen last
        self.verifies_by_len = [0] * (self.k + 1)  # verifies of drafts from blocks of length L
        self.accepted_by_count = [0] * (self.k + 2)  # verifies that accepted a drafts
        self._drafted_len = self.k  # block length of the drafts the next step verifies
        self._len_steps = 0
        self._next_shape = (0, 0)  # (M, A) of the next decode step, from the last read-back
        register_slot_attention()
        self._restore = attention_kind(model)
        model.set_attn_implementation(SLOT_ATTENTION)
        self._cache_kw = _cache_keyword(model)
        self._decoder = model.get_decoder()
        self._compiled = None  # the decode step's forward under torch.compile (prefill stays eager)
        if compile:
            # inductor on a CPU; on an accelerator also device graphs ("reduce-overhead"); an
            # Ascend graph mode comes as compile_options={"backend": torchair's npu backend}
            options = dict(compile_options or {})
            if "backend" not in options:
                options.setdefault("mode", None if self.device.type == "cpu" else "reduce-overhead")
            self._compiled = torch.compile(self._decoder, dynamic=False, **options)

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        s, k, dev = self.slots_n, max(self.k, 1), self.device
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.length = z(s)  # committed cache entries (= position of the last committed token)
        self.last = z(s)  # last committed token (v_0, fed by the next step)
        self.drafts, self.logp, self.m = z(s, k), z(s, k, dtype=torch.float32), z(s)
        self.cand = torch.full((s, self.anchors), -1, dtype=torch.long, device=dev)
        self.new_count, self.max_new = z(s), z(s)
        self.eos = torch.full((s, max(1, len(self.eos_ids))), -1, dtype=torch.long, device=dev)
        self.run = z(s, dtype=torch.bool)
        self.ema = torch.ones(s, dtype=torch.float32, device=dev)
        self.paid = z(s, dtype=torch.bool)  # the row drafted a block for its current drafts
        self.since_probe = z(s)
        # sampling (rules.py): per-slot settings, the drafts' q(x) and the slots' hidden states
        self.temp, self.top_p, self.min_p = (z(s, dtype=torch.float32) for _ in range(3))
        self.top_k, self.seed = z(s), z(s)
        self.qprob = z(s, k, dtype=torch.float32)
        self.dhid: torch.Tensor | None = None  # [slots, K, H], made at the first sampled request
        self._seeds = itertools.count(1)

    def close(self) -> None:
        """Give the model its own attention back (the scheduler is unusable afterwards)."""
        self.model.set_attn_implementation(self._restore)

    # ------------------------------------------------------------------ requests

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.slots if s is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0 or bool(self._aborted)

    def submit(self, req: Request) -> None:
        """Queue a request; a bad one is a ``PromptError`` / ``ConfigError`` naming the problem."""

        if req.request_id in self._ids:
            raise ConfigError(f"request id {req.request_id!r} is already queued or running")
        if not req.prompt:
            raise PromptError(f"request {req.request_id!r}: the prompt is empty; give some tokens")
        if req.max_new_tokens < 1:
            raise ConfigError(
                f"request {req.request_id!r}: max_new_tokens must be at least 1, "
                f"got {req.max_new_tokens}"
            )
        check_context(self.model, [len(req.prompt)], req.max_new_tokens, self.k)
        if len(req.prompt) + req.max_new_tokens > self.max_len:
            raise PromptError(
                f"request {req.request_id!r}: prompt ({len(req.prompt)} tokens) + max_new_tokens "
                f"({req.max_new_tokens}) exceeds the engine's max_len {self.max_len}; shorten "
                "the prompt or lower max_new_tokens"
            )
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise PromptError(
                f"request {req.request_id!r}: token ids must lie in [0, {vocab}) (the vocabulary)"
            )
        if req.stop and self.tokenizer is None:
            raise ConfigError(
                f"request {req.request_id!r} has stop strings but the Scheduler has no tokenizer "
                "to read the text with; pass Scheduler(..., tokenizer=...)"
            )
        if any(not isinstance(x, str) or not x for x in req.stop):
            raise ConfigError(f"request {req.request_id!r}: stop strings must be non-empty text")
        if req.eos_ids is not None and len(req.eos_ids) > self.eos.shape[1]:
            self._widen_eos(len(req.eos_ids))
        self._ids.add(req.request_id)
        params = req.sampling or SamplingParams()
        if params.seed is None and not params.greedy:
            params = replace(params, seed=next(self._seeds))
        self.waiting.append(_Slot(req, [int(t) for t in req.prompt], params))

    def _widen_eos(self, n: int) -> None:
        pad = torch.full((self.slots_n, n - self.eos.shape[1]), -1, dtype=torch.long)
        self.eos = torch.cat([self.eos, pad.to(self.device)], dim=1)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot is free before the next step, which emits an "abort" event."""
        if request_id not in self._ids:
            return False
        self._aborted.append(request_id)
        return True

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit, prefill a chunk, decode once; this step's events (see the module docstring)."""
        events = self._retire_aborted()
        self._admit()
        if any(s is not None and not s.running for s in self.slots):
            self._prefill()
        if any(s is not None and s.running for s in self.slots):
            events += self._decode()
        return events

    def _retire_aborted(self) -> list[Event]:
        events = []
        for rid in self._aborted:
            self._ids.discard(rid)
            for i, s in enumerate(self.slots):
                if s is not None and s.req.request_id == rid:
                    self._free(i)
                    events.append(Event(rid, [], True, "abort", len(s.new), s.forwards, 0))
            for s in list(self.waiting):
                if s.req.request_id == rid:
                    self.waiting.remove(s)
                    events.append(Event(rid, [], True, "abort", 0, 0, 0))
        self._aborted.clear()
        return events

    def _free(self, i: int) -> None:
        self.slots[i] = None
        self.run[i] = False

    def _admit(self) -> None:
        for i in range(self.slots_n):
            if not self.waiting:
                return
            if self.slots[i] is None:
                slot = self.waiting.popleft()
                self.slots[i] = slot
                eos = list(slot.req.eos_ids) if slot.req.eos_ids is not None else self.eos_ids
                row = torch.full((self.eos.shape[1],), -1, dtype=torch.long)
                row[: len(eos)] = torch.tensor(eos, dtype=torch.long)
                self.eos[i] = row.to(self.device)
                self.max_new[i] = slot.req.max_new_tokens
                self.new_count[i] = 0
                self.length[i] = 0
                self.run[i] = False
                self._set_sampling(i, slot.params)

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

    def _sampling_rows(self, hi: int) -> tuple[bool, bool]:
        """Whether any slot below ``hi`` samples, and whether any wants logprobs (host flags)."""
        live = [s.params for s in self.slots[:hi] if s is not None]
        return any(not p.greedy for p in live), any(p.logprobs for p in live)

    def _filtered(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        t, k, p, m = (x[rows] for x in (self.temp, self.top_k, self.top_p, self.min_p))
        return filtered_probs(logits, t, k, p, m)

    def _draft(
        self,
        rows: slice,
        hidden: torch.Tensor,
        anchor_hidden: torch.Tensor,
        first: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drafts ``[b, L]``, their log-confidence and how many to keep, from slot hidden states.

        Greedy rows draft the slots' argmax; sampling rows draw from the slots' filtered
        distribution ``q`` (the draft for position ``first + j`` with that position's DRAFT
        uniform) and keep ``q(draft)`` and the hidden states for the next step's verify.
        """
        st = self.head.stats(hidden)
        drafts, conf = st.argmax, st.max_logprob
        lo, hi = rows.start, rows.stop
        if any(s is not None and not s.params.greedy for s in self.slots[lo:hi]):
            n = hidden.shape[1]
            q = self._filtered(self.head.logits(hidden), rows)
            where = first.to(self.device)[:, None] + torch.arange(n, device=self.device)
            drawn = sample(q, uniform(self.seed[rows][:, None], where, DRAFT))
            qp = q.gather(-1, drawn[..., None])[..., 0]
            sampled = (self.temp[rows] > 0)[:, None]
            drafts = torch.where(sampled, drawn, drafts)
            conf = torch.where(sampled, qp.clamp(min=1e-30).log(), conf)
            self.qprob[rows, :n] = qp
            self.dhid[rows, :n] = hidden.to(self.dhid.dtype)
        return drafts, conf, self.policy.keep(st.entropy, anchor_hidden, self.khead)

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
    ) -> torch.Tensor:
        """Hidden states ``[B, W, H]`` of new tokens written at ``length + t`` in slots ``lo…``
        (or in the slots ``rows``)."""
        b, w = ids.shape
        write = length[:, None] + torch.arange(w, device=ids.device)[None]
        slots = range(lo, lo + b) if rows is None else rows
        if causal:
            plan = ForwardPlan(lo, lo + b, write, w, None, causal=True)
        else:
            # keys [0, extent): the committed entries and this forward's; rounded for few shapes
            extent = min(self.kv.capacity, _round_up(self._max_extent(slots, w), 64))
            mask = step_mask(length, pos, anchor, extent)
            plan = ForwardPlan(lo, lo + b, write, extent, mask)
        if rows is not None:
            plan.rows = torch.tensor(rows, dtype=torch.long, device=ids.device)
        self.kv.set_plan(plan)
        run = (
            self._compiled
            if (self._compiled is not None and lo == 0 and not causal and compiled)
            else self._decoder
        )
        out = run(
            input_ids=ids,
            attention_mask=_NO_MASK if plan.mask is None else plan.mask,  # 4D: passed through
            position_ids=pos,
            use_cache=True,
            fluid_plan=plan,
            **{self._cache_kw: self.kv},
        )
        self.kv.plan = None
        return out.last_hidden_state

    def _max_extent(self, slots: range | list[int], w: int) -> int:
        # host-side bound, no device read: every slot's length is at most max_len
        top = 0
        for i in slots:
            s = self.slots[i]
            if s is not None:
                top = max(top, len(s.prompt) + len(s.new))
        return min(top, self.max_len) + w

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
        draft = k if k > 0 and any(last for _, _, last in chunks.values()) else 0
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
            if draft and last and p >= 2:
                ids[r, width:] = self.mask_id
                pos[r, width:] = torch.arange(p - 1, p - 1 + draft)
                anchor[r, width:] = p - 2
        causal = draft == 0 and all(start == 0 for start, _, _ in chunks.values())
        dev = self.device
        # a prefilling slot's chunk goes right after what it has encoded so far
        length = torch.tensor([chunks[i][0] for i in rows], dtype=torch.long, device=dev)
        hidden = self._forward(
            rows[0], ids.to(dev), pos.to(dev), anchor.to(dev), length, causal, rows=rows
        )
        self.prefill_forwards += 1
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
        self.ema[i] = max(1.0, self._expected_accept(self._len))  # optimistic: drafts first
        self.since_probe[i] = 0
        big_m, n_blocks = self._next_shape
        self._next_shape = (big_m, max(n_blocks, 1 if self.k else 0))
        if slot_hidden is None or self.k == 0:
            self.m[i] = 0
            self.paid[i] = False
            self.cand[i] = -1
            if self.k > 0:
                self.cand[i, 0] = 0  # no drafts yet: draft from v_0 in the first step
            self.run[i] = True
            return
        p = len(s.prompt)
        drafts, conf, keep = self._draft(
            slice(i, i + 1), slot_hidden[None], anchor_hidden[None], torch.tensor([p])
        )
        self.drafts[i], self.logp[i] = drafts[0], conf[0]
        self.m[i] = keep[0]
        self.paid[i] = True
        self.cand[i] = choose_anchors(conf, keep, self.anchors, self.coverage, fixed=True)[0]
        self.run[i] = True
        self._next_shape = (self.k, self._next_shape[1])  # widest: no host read of keep

    # ------------------------------------------------------------------ decode

    def _decode(self) -> list[Event]:
        hi = _pow2(1 + max(i for i, s in enumerate(self.slots) if s is not None and s.running))
        hi = min(hi, self.slots_n)
        big_m, n_blocks = self._next_shape
        big_m = min(_pow2(big_m) if big_m else 0, self.k)
        n_blocks = min(n_blocks, self.anchors) if self.k else 0
        k = self.k  # this step's block length
        any_sampled, any_lp = self._sampling_rows(hi)
        # a sampling row's tokens depend on its drafts (the rejection rule), so while one is in
        # the batch the block choices stay per-row (no timing-driven shape choices): its seed
        # then gives the same tokens alone or in any batch
        adaptive = self.adaptive and not any_sampled
        if adaptive and n_blocks:
            k = self._len = self._choose_len(hi, big_m)
            n_blocks = self._choose_blocks(hi, big_m, n_blocks, k)
        dev = self.device
        run = self.run[:hi]
        base = self.length[:hi]
        m = torch.where(run, self.m[:hi].clamp(max=big_m), 0)
        j = torch.arange(big_m + 1, device=dev)
        drafts = self.drafts[:hi, :big_m]
        ids = [torch.cat([self.last[:hi, None], drafts], dim=1)]
        pos = [base[:, None] + j[None]]
        anchor = [torch.where(run[:, None] & (j[None] <= m[:, None]), MAIN, PAD)]
        cand = torch.where(run[:, None], self.cand[:hi, :n_blocks], -1)
        if n_blocks:
            c = base[:, None] + cand.clamp(min=0)
            ids.append(torch.full((hi, n_blocks * k), self.mask_id, dtype=torch.long, device=dev))
            pos.append((c[:, :, None] + torch.arange(1, k + 1, device=dev)).reshape(hi, -1))
            blk = torch.where(cand >= 0, c, PAD)
            anchor.append(blk[:, :, None].expand(hi, n_blocks, k).reshape(hi, -1))
        ids_t, pos_t, anchor_t = (torch.cat(t, dim=1) for t in (ids, pos, anchor))
        width = ids_t.shape[1]
        t0 = time.perf_counter()
        hidden = self._forward(0, ids_t, pos_t, anchor_t, base, compiled=True)
        self.decode_forwards += 1

        ar = self.head.argmax(hidden[:, : big_m + 1])
        match = (drafts == ar[:, :big_m]) & (j[None, :big_m] < m[:, None])
        a = match.long().cumprod(dim=1).sum(dim=1)
        corr = ar.gather(1, a[:, None])
        logits = None
        if any_sampled or any_lp:
            logits = self.head.logits(hidden[:, : big_m + 1])  # [hi, M+1, V]
        if any_sampled:
            a, corr = self._verify_sampled(logits, drafts, m, base, a, corr, hi, big_m)
        toks = torch.cat([drafts, corr], dim=1).scatter(1, a[:, None], corr)  # [hi, M+1]
        take = torch.minimum(a + 1, self.max_new[:hi] - self.new_count[:hi])
        eos = self.eos[:hi]
        is_eos = (toks[:, :, None] == eos[:, None, :]).any(dim=-1) & (j[None] < take[:, None])
        hit_eos = is_eos.any(dim=1)
        take = torch.where(hit_eos, is_eos.long().argmax(dim=1) + 1, take)
        take = torch.where(run, take, 0)
        done = run & (hit_eos | (self.new_count[:hi] + take >= self.max_new[:hi]))
        self.new_count[:hi] += take
        self.length[:hi] += take
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
        if n_blocks:
            hit = cand == a[:, None]
            has = hit.any(dim=1) & run
            rows = torch.arange(hi, device=dev)
            sel = hidden[:, big_m + 1 :].view(hi, n_blocks, k, -1)[rows, hit.long().argmax(dim=1)]
            first = base + a + 2  # the block's first slot guesses the position after the correction
            drafted, conf, keep = self._draft(slice(0, hi), sel, hidden[rows, a], first)
            m_next = torch.where(has, keep, 0)
            self.drafts[:hi, :k], self.logp[:hi, :k] = drafted, conf
            self.paid[:hi] = has  # the next verify judges a block this row paid for
        cand_next = torch.full((hi, self.anchors), -1, dtype=torch.long, device=dev)
        if k:
            cand_next = choose_anchors(
                self.logp[:hi], m_next, self.anchors, self.coverage, fixed=True
            )
            if self.adaptive:  # drafts already made are verified; new blocks only where they pay
                worth = self.ema[:hi] >= self._price(hi)
                probe = self.since_probe[:hi] >= PROBE_EVERY
                draft_on = worth | probe | (self.temp[:hi] > 0)
                self.since_probe[:hi] = torch.where(draft_on, 0, self.since_probe[:hi] + 1)
                cand_next = torch.where(draft_on[:, None], cand_next, -1)
        self.m[:hi] = m_next
        self.cand[:hi] = cand_next
        # the step's one host read: per row take, done, accepted, drafted, tokens; then the shape
        n_cand = (cand_next >= 0).sum(dim=1)
        packed_t = torch.cat(
            [
                take[:, None],
                done[:, None].long(),
                a[:, None],
                m[:, None],
                toks,
                torch.stack([m_next.max(), n_cand.max()])[None].expand(hi, 2),
            ],
            dim=1,
        )
        n_top = 0
        if any_lp:  # logprobs of the committed tokens (+ the best alternatives), same read
            n_top = max(s.params.top_logprobs for s in self.slots[:hi] if s is not None)
            lp = self._logprobs(logits, hi)
            parts = [packed_t.double(), lp.gather(-1, toks[..., None])[..., 0].double()]
            if n_top:
                top = lp.topk(n_top, dim=-1)
                parts += [top.indices.flatten(1).double(), top.values.flatten(1).double()]
            packed_t = torch.cat(parts, dim=1)
        packed = packed_t.tolist()
        self._record_cost(hi, width, time.perf_counter() - t0, n_blocks)
        width_int = 4 + big_m + 1 + 2
        self._next_shape = (int(packed[0][width_int - 2]), int(packed[0][width_int - 1]))
        events = self._events(packed, hi, big_m, n_top)
        self._drafted_len = k if n_blocks else 0
        return events

    def _events(
        self, packed: list[list[float]], hi: int, big_m: int, n_top: int = 0
    ) -> list[Event]:
        events = []
        w = big_m + 1
        for i in range(hi):
            s = self.slots[i]
            if s is None or not s.running:
                continue
            row = packed[i]
            take, done, a, m = (int(x) for x in row[:4])
            toks = [int(t) for t in row[4 : 4 + take]]
            lps = tops = None
            if s.params.logprobs:
                at = 4 + w + 2
                lps = row[at : at + take]
                if s.params.top_logprobs:
                    ids = row[at + w : at + w + w * n_top]
                    vals = row[at + w + w * n_top : at + w + 2 * w * n_top]
                    n = s.params.top_logprobs
                    tops = [
                        [(int(ids[t * n_top + r]), vals[t * n_top + r]) for r in range(n)]
                        for t in range(take)
                    ]
            if s.req.stop and toks:
                cut = self._stop_cut(s, toks)
                if cut is not None:
                    toks, done = toks[:cut], 1
                    lps = None if lps is None else lps[:cut]
                    tops = None if tops is None else tops[:cut]
            if m and self._drafted_len:  # a verify of drafts from a block of _drafted_len
                self.verifies_by_len[min(self._drafted_len, self.k)] += 1
                self.accepted_by_count[a] += 1
            s.forwards += 1
            s.new.extend(toks)
            self.accept_hist[a] += 1
            self.k_hist[m] += 1
            reason = None
            if done:
                stopped = toks and (toks[-1] in self._eos_of(i) or s.stopped)
                reason = "stop" if stopped else "length"
                self._ids.discard(s.req.request_id)
                self._free(i)
            events.append(
                Event(
                    s.req.request_id, toks, bool(done), reason, len(s.new), s.forwards, a, lps, tops
                )
            )
        return events

    def _stop_cut(self, s: _Slot, toks: list[int]) -> int | None:
        """How many of this step's ``toks`` to keep when one completes a stop string (the one
        that completes it included, as transformers' ``stop_strings`` cuts), else None."""
        longest = max(len(x) for x in s.req.stop)
        before = s.new[-(longest + 8) :]
        text_before = self.tokenizer.decode(before, skip_special_tokens=False)
        for n in range(1, len(toks) + 1):
            text = self.tokenizer.decode(before + toks[:n], skip_special_tokens=False)
            fresh = text[max(0, len(text_before) - longest + 1) :]
            if any(x in fresh for x in s.req.stop):
                s.stopped = True
                return n
        return None

    def _logprobs(self, logits: torch.Tensor, hi: int) -> torch.Tensor:
        """Log-probabilities under the AR distribution after temperature (1 for greedy rows)."""
        t = torch.where(self.temp[:hi] > 0, self.temp[:hi], 1.0)[:, None, None]
        return (logits / t).log_softmax(dim=-1)

    def _verify_sampled(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        m: torch.Tensor,
        base: torch.Tensor,
        a_greedy: torch.Tensor,
        corr_greedy: torch.Tensor,
        hi: int,
        big_m: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative rejection sampling for the sampling rows (``rules.py``); greedy rows keep
        their argmax results. Returns accepted counts ``[hi]`` and corrections ``[hi, 1]``."""
        dev = self.device
        rows = slice(0, hi)
        p = self._filtered(logits, rows)  # [hi, M+1, V]
        j = torch.arange(big_m, device=dev)
        seed = self.seed[:hi]
        guess = base[:, None] + 1 + j[None]  # the position each draft guesses
        p_draft = p[:, :big_m].gather(-1, drafts[..., None])[..., 0]
        u = uniform(seed[:, None], guess, ACCEPT)
        ok = (u * self.qprob[:hi, :big_m].double() <= p_draft.double()) & (j[None] < m[:, None])
        a = ok.long().cumprod(dim=1).sum(dim=1)
        idx = torch.arange(hi, device=dev)
        p_a = p[idx, a]
        dist = p_a
        if self.dhid is not None and big_m:
            q_a = self._filtered(self.head.logits(self.dhid[idx, a.clamp(max=self.k - 1)]), rows)
            dist = torch.where((a < m)[:, None], residual(p_a, q_a), p_a)
        drawn = sample(dist, uniform(seed, base + 1 + a, DRAW))
        sampled = self.temp[:hi] > 0
        a = torch.where(sampled, a, a_greedy)
        return a, torch.where(sampled[:, None], drawn[:, None], corr_greedy)

    def _eos_of(self, i: int) -> list[int]:
        s = self.slots[i]
        return list(s.req.eos_ids) if s.req.eos_ids is not None else self.eos_ids

    # ------------------------------------------------------------------ measured costs

    def _record_cost(self, rows: int, width: int, seconds: float, blocks: int = 0) -> None:
        old = self.step_cost.get((rows, width))
        self.step_cost[(rows, width)] = seconds if old is None else EMA * old + (1 - EMA) * seconds
        self._fit = None

    def _cost_model(self) -> tuple[float, float] | None:
        """``(c0, c1)``: step seconds ≈ c0 + c1 · tokens in the step, least squares over every
        shape measured so far (None until two different token counts have run)."""
        if self._fit is None:
            pts = [(r * w, t) for (r, w), t in self.step_cost.items()]
            xs = {x for x, _ in pts}
            if len(xs) < 2:
                return None
            n = len(pts)
            mx, my = sum(x for x, _ in pts) / n, sum(t for _, t in pts) / n
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            c1 = max(0.0, sum((x - mx) * (t - my) for x, t in pts) / sxx)
            self._fit = (max(my - c1 * mx, 1e-9), c1)
        return self._fit

    def _step_seconds(self, rows: int, width: int) -> float | None:
        fit = self._cost_model()
        return None if fit is None else fit[0] + fit[1] * rows * width

    def _price(self, rows: int) -> float:
        """Accepted drafts per verify that a block must earn: its relative extra cost."""
        ar = self._step_seconds(rows, 1)
        drafted = self._step_seconds(rows, 2 * self._len + 1)
        if ar is None or drafted is None:
            return DEFAULT_PRICE  # until the cost of steps has been measured
        return max(0.0, drafted / ar - 1.0)

    def _choose_len(self, rows: int, big_m: int) -> int:
        """This step's block length (elastic policies; ``fixed:K`` keeps ``K``): of ``K``, ``K/2``
        and ``K/4``, the one with the most expected
        tokens per second at this batch size — acceptance from the verifies so far, seconds from
        the measured cost model. The full length runs every ``LEN_PROBE_EVERY`` steps so the
        acceptance of every depth stays measured."""
        k = self.k
        self._len_steps += 1
        if self.policy.kind == "fixed":  # fixed:K is a fixed horizon, by definition
            return k
        if not self.adaptive or k <= 2 or self._len_steps % LEN_PROBE_EVERY == 0:
            return k
        if sum(self.verifies_by_len) < MIN_VERIFIES or self._cost_model() is None:
            return k

        def rate(n: int) -> float:
            return (1 + self._expected_accept(n)) / self._step_seconds(rows, min(big_m, n) + 1 + n)

        return max(sorted({k, max(2, k // 2), max(2, k // 4)}, reverse=True), key=rate)

    def _expected_accept(self, length: int) -> float:
        """Expected accepted drafts per verify when blocks hold ``length`` slots (from history)."""
        total = 0.0
        reached = sum(self.accepted_by_count)  # verifies that accepted >= j drafts, j = 0 ...
        tried = sum(self.verifies_by_len)  # verifies whose block reached depth j
        for j in range(1, length + 1):
            reached -= self.accepted_by_count[j - 1]
            tried -= self.verifies_by_len[j - 1]
            if tried <= 0:
                break
            total += reached / tried
        return total

    def _choose_blocks(self, rows: int, big_m: int, wanted: int, length: int) -> int:
        """Blocks for this step: what the drafts' coverage asks for, a second one only while the
        cost model says it adds less than ``BLOCK_MARGIN`` to the step."""
        if wanted <= 1:
            return wanted
        one = self._step_seconds(rows, big_m + 1 + length)
        two = self._step_seconds(rows, big_m + 1 + 2 * length)
        if one is None or two is None:
            return 1
        return 2 if two <= (1 + BLOCK_MARGIN) * one else 1


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _cache_keyword(model: PreTrainedModel) -> str:
    """``cache`` on transformers >= 5.24 (``past_key_values`` is deprecated there), else the old."""
    import inspect

    params = inspect.signature(model.get_decoder().forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Finished(NamedTuple):
    """A request decoded to the end by ``run_requests``."""

    tokens: list[int]
    final: Event  # its last event (finish_reason, forwards)
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


def run_requests(
    sched: Scheduler, requests: Sequence[Request], stream: Any = None
) -> dict[str, Finished]:
    """Decode ``requests`` to the end; ``stream(index, tokens)`` as tokens commit."""
    index = {r.request_id: n for n, r in enumerate(requests)}
    final: dict[str, Event] = {}
    new: dict[str, list[int]] = {r.request_id: [] for r in requests}
    lps: dict[str, list[float] | None] = {r.request_id: None for r in requests}
    tops: dict[str, list | None] = {r.request_id: None for r in requests}
    for r in requests:
        sched.submit(r)
    while sched.has_work():
        for ev in sched.step():
            rid = ev.request_id
            new[rid].extend(ev.tokens)
            if ev.logprobs is not None:
                lps[rid] = (lps[rid] or []) + ev.logprobs
            if ev.top_logprobs is not None:
                tops[rid] = (tops[rid] or []) + ev.top_logprobs
            if stream is not None and ev.tokens:
                stream(index[rid], ev.tokens)
            if ev.finished:
                final[rid] = ev
    return {rid: Finished(new[rid], final[rid], lps[rid], tops[rid]) for rid in new}
