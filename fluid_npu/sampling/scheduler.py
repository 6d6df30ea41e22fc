"""The decode engine: request slots over a static KV cache, continuous batching, fused steps.

A ``Scheduler`` owns the model and ``max_batch`` request slots in one preallocated ``SlotKV``.
Requests are ``submit``-ted into a queue (first come, first served; by ``Request.priority`` with
``scheduling_policy="priority"``, as vLLM's ``--scheduling-policy``: running requests are never
preempted); every ``step()``:

1. retires aborted requests and admits waiting ones into free slots (the free slot whose cache
   still holds the longest prefix of the prompt, which is then not encoded again, else one that
   holds nothing: ``reuse.py``);
2. runs one **prefill** forward for the slots still encoding their prompt (``prefill.py``): each
   row its next chunk of at most ``prefill_chunk`` tokens of ``prompt[:-1]`` (a chunk that starts
   a prompt, with no drafts, is plain causal attention — no mask tensor); the chunk that ends a
   prompt also drafts the first tokens (a block of MASK slots anchored at the prompt's ``P-2``, as
   Stage I trains);
3. runs one **fused decode** forward for every running slot (``step.py``; ``fused.py`` for the
   method): verify the pending drafts against the AR argmax, commit, draft the next block — all
   on the device;
4. reads back one small packed tensor (the only host synchronisation of the step) and turns it
   into ``Event``s: committed tokens, finished requests (EOS / ``max_new_tokens``), statistics.
   On a CPU, where the host is the device, a step with one plain greedy request does 3-4 on Python
   numbers instead (``host_step.py``: the same tokens, events and choices, a sixth of the calls).

Shapes are fixed per step: the decode batch is the slot range ``[0, hi)`` and the width is ``(M +
1) + A·K`` with ``M`` pending drafts and ``A`` candidate blocks (``hi`` and ``M`` rounded up to
powers of two and the keys to multiples of 64 when compiled), both decided from the previous step's
read-back; rows that do not take part are ``PAD``. So a step's work is a bounded set of shapes that
``torch.compile`` (``compile=True``) or a device graph can capture — a handful for AR, more once
the draft budget varies the block length (docs/engine.md measures what that costs a compiled step
on a CPU). Eager forwards of a Llama, Mistral, Qwen2 or Qwen3 decoder (openPangu included) run as
plain tensor calls (``lean.py``: the same arithmetic, bit for bit, without ~15 module calls per
layer; ``lean=False`` runs the modules).

**Drafting that pays for itself** (``drafting.py``): each step's block length and second block
follow a fitted model of the measured step cost and the acceptance seen so far, and a row whose
drafts earn less than a block costs decodes as plain AR, probing now and then. These choices follow
measured time, so they vary run to run (in float32 the tokens never do; in bfloat16 / float16 a
step of another width may round a near-tie the other way: README, Drafting); ``adaptive=False``
turns them off, and while a sampling request is in the batch they stay per-row (so its seed is
batch-invariant in float32: docs/engine.md, Sampling).
``budgets=`` (a dict the caller keeps, as ``FluidForCausalLM`` does) lets engines on the same model
share what they measured — one budget per policy, ``adaptive`` setting, device, dtype and forward —
instead of each starting from the prior.

Every committed token is an AR argmax of the model, so each request's output equals greedy
decoding of it alone, whatever else shares the batch (``tests/test_scheduler.py``).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import MutableMapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_npu.sampling.compaction import CompactionMixin
from fluid_npu.sampling.drafting import DraftBudget
from fluid_npu.sampling.fused import DEFAULT_ANCHORS, DEFAULT_COVERAGE
from fluid_npu.sampling.head import LMHead
from fluid_npu.sampling.host_step import HostStepMixin
from fluid_npu.sampling.inputs import (
    check_request,
    eos_and_pad,
)
from fluid_npu.sampling.kv import (
    SlotKV,
    hold_slot_attention,
    register_slot_attention,
    release_slot_attention,
)
from fluid_npu.sampling.lean import LeanDecoder
from fluid_npu.sampling.memory import engine_slots, short_of_free
from fluid_npu.sampling.penalties import Penalties
from fluid_npu.sampling.policies import Policy, block_bound, parse_policy
from fluid_npu.sampling.prefill import PrefillMixin
from fluid_npu.sampling.requests import (
    LOGPROBS_MODES,
    SCHEDULING_POLICIES,
    Event,
    Request,
    Slot,
    enqueue,
)
from fluid_npu.sampling.reuse import SlotPrefixes
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.step import StepMixin, _pow2, _round_up
from fluid_npu.sampling.support import (
    PinnedRope,
    cache_keyword,
    check_engine_support,
    engine_context,
)

PREFILL_CHUNK = 512
CAPACITY_STEP = 256  # a compiled engine's cache length is a multiple of this


class Scheduler(PrefillMixin, StepMixin, HostStepMixin, CompactionMixin):
    """Continuous-batching lossless decoder; see the module docstring. Not thread-safe.
    ``memory_fraction``: vLLM's ``gpu_memory_utilization`` (``memory.py``; ``max_batch=None``:
    as many slots as it holds); ``host_step=False``: a CPU engine's lone greedy row steps on
    tensors too (``host_step.py``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        mask_id: int,
        *,
        policy: str | Policy = "entropy",
        khead: torch.nn.Module | None = None,
        k_max: int | None = None,
        k_min: int = 1,
        max_batch: int | None = 8,
        max_len: int | None = None,
        eos_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        tokenizer: Any = None,
        prefill_chunk: int = PREFILL_CHUNK,
        anchors: int = DEFAULT_ANCHORS,
        coverage: float = DEFAULT_COVERAGE,
        adaptive: bool = True,
        compile: bool = False,
        lean: bool = True,
        compile_options: dict[str, Any] | None = None,
        budgets: MutableMapping[Any, DraftBudget] | None = None,
        prefix_caching: bool = True,
        prefix_slots: int = 0,
        scheduling_policy: str = "fcfs",
        logprobs_mode: str = "raw_logprobs",
        memory_fraction: float | None = None,
        host_step: bool = True,
    ) -> None:
        for name, value, choices in (
            ("scheduling_policy", scheduling_policy, SCHEDULING_POLICIES),
            ("logprobs_mode", logprobs_mode, LOGPROBS_MODES),
        ):
            if value not in choices:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")
        self.scheduling_policy = scheduling_policy
        self.logprobs_mode = logprobs_mode
        if (max_batch is not None and max_batch < 1) or prefill_chunk < 1:
            raise ConfigError(
                f"max_batch and prefill_chunk must be at least 1, got {max_batch}, {prefill_chunk}"
            )
        if prefix_slots < 0 or (prefix_slots and not prefix_caching):
            raise ConfigError(
                f"prefix_slots must be 0 or more, and 0 without prefix_caching (rows that only "
                f"keep prefixes for reuse); got {prefix_slots}"
            )
        if anchors < 1 or coverage <= 0:
            raise ConfigError(f"anchors must be >= 1 and coverage > 0, got {anchors}, {coverage}")
        self.policy = parse_policy(
            policy, k_max=block_bound(k_max, khead), k_min=k_min, has_khead=khead is not None
        )
        check_engine_support(model)  # features whose arithmetic depends on how forwards are cut
        self.model = model
        self.device = next(model.parameters()).device
        self.host_step = host_step and self.device.type == "cpu"  # (host_step.py)
        self._host_views: dict[str, tuple[torch.Tensor, Any]] = {}
        self._host_layouts: dict[tuple, tuple] = {}  # (host_step.py's masks)
        self.khead = None if khead is None else khead.to(self.device)
        self.mask_id = int(mask_id)
        self.tokenizer = tokenizer  # decodes committed text for stop strings
        self._special = frozenset(getattr(tokenizer, "all_special_ids", None) or [])
        self.eos_ids, self.pad_id = eos_and_pad(model, eos_ids, pad_id)
        self.k = self.policy.block_len
        # what a request may fill, the model's own context (step.py) and why (the server says it)
        self.max_len, self.positions, self.max_len_reason = engine_context(model, max_len, self.k)
        self.anchors, self.coverage, self.adaptive = anchors, coverage, adaptive
        self.prefill_chunk = prefill_chunk
        # (a chunk is never longer than a prompt, so a --prefill-chunk past max_len costs nothing)
        widest = max(min(prefill_chunk, self.max_len), 1 + self.k + anchors * self.k) + self.k
        dtype = next(model.parameters()).dtype
        capacity = self.max_len + widest
        if compile:
            capacity = _round_up(capacity, CAPACITY_STEP)
        max_batch = engine_slots((model, self.khead), max_batch, memory_fraction, capacity, dtype,
                                 prefix_slots if prefix_caching else 0, compile)  # fmt: skip
        self.slots_n = max_batch
        cache_slots = max_batch
        if compile:  # the cache's shape is a compiled one: a few sizes, so engines made for
            # other batches and lengths (a generate call each) reuse what an earlier one compiled
            # instead of spending dynamo's recompile limit, which every engine in a process shares
            cache_slots = _pow2(max_batch)
        # rows past the slots (and a compiled engine's padding) only keep prefixes (reuse.py)
        pool = list(range(cache_slots, cache_slots + prefix_slots)) if prefix_caching else []
        fix = None if memory_fraction is None else short_of_free(memory_fraction)
        self.kv = SlotKV(model, cache_slots + len(pool), capacity, dtype, self.device, fix)
        self.head = LMHead(model)
        self._init_state()
        self.waiting: deque[Slot] = deque()
        self.slots: list[Slot | None] = [None] * max_batch
        # what free slots and the pool's rows hold (reuse.py)
        self.prefixes = SlotPrefixes(self.kv.slots, prefix_caching, pool)
        self._ids: set[str] = set()
        self._aborted: list[Slot] = []  # aborted, their "abort" events due at the next step
        self.prefill_forwards = 0
        self.decode_forwards = 0
        self.computed_tokens = 0  # rows x width of every forward (GenerateStats.computed_tokens)
        self.accept_hist: Counter = Counter()
        self.k_hist: Counter = Counter()
        self._next_shape = (0, 0)  # (M, A) of the next decode step, from the last read-back
        self._prior_replaced = False  # whether the rows' optimistic prior met the history
        self._decoder = model.get_decoder()
        self._rope = PinnedRope(model)  # a dynamic rope at the frequencies generate uses
        # the decoder's forward without module dispatch where it is exactly the same (lean.py)
        self._lean = LeanDecoder.of(model) if lean else None
        self._holds_attention = False
        if self._lean is None:  # the model's modules run: they attend over the slots
            register_slot_attention()
            hold_slot_attention(model)
            self._holds_attention = True
        try:  # a failure from here on gives the model its attention back
            self._cache_kw = cache_keyword(model)
            # the decode step's forward under torch.compile (prefill stays eager), its settings
            self._compiled = None
            self._compile_key: tuple[tuple[str, str], ...] | None = None  # (the budget's key)
            if compile:
                # inductor on a CPU, its CUDA graphs on CUDA, TorchAir's aclgraph on an NPU
                options = devices.compile_kwargs(self.device.type, compile_options)
                target = self._decoder if self._lean is None else self._lean
                options.setdefault("dynamic", False)  # static shapes (bucketed): see docs/engine.md
                if options.get("mode") == "reduce-overhead" or self.device.type != "cpu":
                    # device graphs record only when every input the graph writes keeps its address
                    # (the cache is written in place each step): as transformers' StaticCache does
                    for t in (*self.kv.keys, *self.kv.values):
                        torch._dynamo.mark_static_address(t)
                self._compiled = torch.compile(target, **options)
                self._compile_key = tuple(sorted((k, repr(v)) for k, v in options.items()))
            self.budget = self._budget(budgets)
        except BaseException:
            self.close()
            raise

    def _budget(self, budgets: MutableMapping[Any, DraftBudget] | None) -> DraftBudget:
        """This engine's draft budget: a new one, or the one ``budgets`` keeps for this policy,
        ``adaptive`` setting, device, dtype and forward (compiled — with its settings: a backend
        or mode costs its own time — lean or modules); costs and acceptance carry over between
        engines."""
        fixed = self.policy.kind == "fixed"
        if budgets is None:
            return DraftBudget(self.k, fixed=fixed, adaptive=self.adaptive)
        dtype = next(self.model.parameters()).dtype
        forward = (self._compile_key, self._lean is not None)
        key = (self.policy, self.adaptive, forward, str(self.device), dtype)
        if key not in budgets:
            budgets[key] = DraftBudget(self.k, fixed=fixed, adaptive=self.adaptive)
        return budgets[key]

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        s, k, dev = self.slots_n, max(self.k, 1), self.device
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.length = z(s)  # committed cache entries (= position of the last committed token)
        self.last = z(s)  # last committed token (v_0, fed by the next step)
        self.drafts, self.logp, self.m = z(s, k), z(s, k, dtype=torch.float32), z(s)
        self.cand = torch.full((s, self.anchors), -1, dtype=torch.long, device=dev)
        self._from_v0 = self.cand.clone()  # one candidate block, at accept length 0
        self._from_v0[:, :1] = 0
        self.new_count, self.max_new = z(s), z(s)
        self.eos = torch.full((s, max(1, len(self.eos_ids))), -1, dtype=torch.long, device=dev)
        self.run = z(s, dtype=torch.bool)
        self.arm = torch.full((s,), -1, dtype=torch.long, device=dev)  # (constrained.py)
        self.ema = torch.ones(s, dtype=torch.float32, device=dev)
        self.paid = z(s, dtype=torch.bool)  # the row drafted a block for its current drafts
        self.overflowed = z(s, dtype=torch.bool)  # float16: a prompt token's key / value overflowed
        self._watch = next(self.model.parameters()).dtype == torch.float16  # (kv.py)
        self._overflow: torch.Tensor | None = None  # the last forward's per-entry flags
        # sampling (rules.py): per-slot settings, the drafts' q(x) and the slots' hidden states
        self.temp, self.top_p, self.min_p = (z(s, dtype=torch.float32) for _ in range(3))
        self.top_k, self.seed = z(s), z(s)
        self.qprob = z(s, k, dtype=torch.float32)
        self.dhid: torch.Tensor | None = None  # [slots, K, H], made at the first sampled request
        self.penalties: Penalties | None = None  # made at the first penalised request

    def close(self) -> None:
        """Give the model its own attention back once no other open engine runs on it (the
        scheduler is unusable afterwards; closing twice is harmless)."""
        if self._holds_attention:
            self._holds_attention = False
            release_slot_attention(self.model)

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
        check_request(
            req,
            self.model,
            block=self.k,
            max_len=self.max_len,
            by_priority=self.scheduling_policy == "priority",
            has_tokenizer=self.tokenizer is not None,
        )
        self._check_grammar(req)  # (constrained.py)
        if req.eos_ids is not None and len(req.eos_ids) > self.eos.shape[1]:
            self._widen_eos(len(req.eos_ids))
        self._ids.add(req.request_id)
        params = req.sampling or SamplingParams()
        if params.seed is None and not params.greedy:
            # unseeded: a seed from torch's global generator (transformers samples from it, so
            # torch.manual_seed reproduces a run and two runs differ, as in vLLM without a seed)
            params = replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
        slot = Slot(req, [int(t) for t in req.prompt], params)
        if req.grammar is not None:
            slot.matcher = req.grammar.matcher(self.eos_ids if req.eos_ids is None else req.eos_ids)
            slot.armed = req.grammar_after is not None
        if params.prompt_logprobs is not None:
            slot.prompt_lps = []  # filled by the prefill (prefill.py), sent with the first event
        enqueue(self.waiting, slot, self.scheduling_policy == "priority")

    def _widen_eos(self, n: int) -> None:
        pad = torch.full((self.slots_n, n - self.eos.shape[1]), -1, dtype=torch.long)
        self.eos = torch.cat([self.eos, pad.to(self.device)], dim=1)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot is free before the next step, which emits an "abort" event.
        The id is free at once (as in vLLM): a request may be submitted under it again."""
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        for s in self.waiting:
            if s.req.request_id == request_id:
                self.waiting.remove(s)  # never admitted: nothing to free
                self._aborted.append(s)
                return True
        for s in self.slots:
            if s is not None and s.req.request_id == request_id:
                self._aborted.append(s)
                return True
        raise AssertionError(f"request id {request_id!r} is neither waiting nor running")

    def _withdraw(self, request_ids: Sequence[str]) -> None:
        """Take back requests submitted but never stepped, without an event (``run_requests``)."""
        ids = set(request_ids)
        self.waiting = deque(s for s in self.waiting if s.req.request_id not in ids)
        self._ids -= ids

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit, prefill a chunk, decode once; this step's events (see the module docstring)."""
        events = self._retire_aborted()
        self._admit()
        self._compact()
        if any(s is not None and not s.running for s in self.slots):
            self._prefill()
        if any(s is not None and s.running for s in self.slots):
            events += self._decode()
        ended = time.monotonic()  # (the engine's clock: Event.at)
        for event in events:
            event.at = ended
        return events

    def _retire_aborted(self) -> list[Event]:
        events = []
        for slot in self._aborted:
            rid = slot.req.request_id
            at = [i for i, s in enumerate(self.slots) if s is slot]  # (a waiting one has none)
            for i in at:
                self._free(i, "abort")
            new, forwards = (len(slot.new), slot.forwards) if at else (0, 0)
            events.append(Event(rid, [], True, "abort", new, forwards, 0, cached=slot.cached,
                                **slot.times()))  # fmt: skip
        self._aborted.clear()
        return events

    def _free(self, i: int, reason: str | None) -> None:
        """Slot ``i``'s request ended (``reason``: its finish reason); the slot keeps the entries
        its request wrote, for a later prompt that starts with the same tokens (``reuse.py``)."""
        s, self.slots[i] = self.slots[i], None
        self.run[i] = False
        if self.penalties is not None:
            self.penalties.release(i)
        broken = reason == "error" or (reason == "abort" and self._watch)
        # (float16: an entry may be an overflow written as zero)
        self.prefixes.release(i, [] if broken else s.written())
