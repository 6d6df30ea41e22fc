"""The decode engine's static KV cache: one preallocated row per request slot, written in place.

``SlotKV`` holds, per layer, keys and values ``[slots, kv_heads, capacity, head_dim]`` allocated
once (zeros, so no stale memory is ever NaN); a cache larger than the device's free memory is one
``ConfigError`` naming its size and the fix before anything is allocated (on a CPU the kernel's OOM
killer would otherwise end the process later, without a word). A slot's cache index *is* the token's
position: a request in slot ``s`` with ``n`` committed tokens holds positions ``0 … n-2`` at indices
``0 … n-2`` (the last committed token is fed by the next step). A forward writes its ``W`` new
entries per row at indices ``len_b … len_b + W − 1`` (``index_copy_``; compiled, ``index_put_``:
no reallocation, no concatenation, no copy of the cache); after the step only the accepted main
tokens — which come first in a step's memory order, at index = position — count as committed, so
nothing needs cutting: whatever lies at or beyond a row's committed length is simply never visible.

Visibility, per forward, from the committed lengths and the new tokens' §1.1 metadata alone
(``fluid_ops.step_mask``: a torch rule, and one Triton launch where a step costs what it
launches): a real query sees every committed entry of its row (every anchor of a step lies
at or after the row's last committed position, so the §1.1 rule reduces to that), and the new
entries by ``fluid_ops.meta.visibility`` of the step itself. Stale entries (rejected drafts, a
previous request's tail) are at or beyond ``len_b + W`` or overwritten, so they are never seen.

Decode steps address the contiguous range of slots ``[0, hi)``: the cache hands the attention a
view (``keys[:hi, :, :extent]``), never a copy, and writes go through the whole cache tensor at
absolute slot indices (under ``torch.compile`` a write into a view of some rows would become a copy
of the whole cache every step). A prefill forward addresses only the slots that are
encoding a prompt (``rows``): their new entries are written in place, and the attention reads a
gathered copy of just those rows' ``[0, extent)`` — the prompt chunk itself, plus the prefix
already encoded for a long prompt's later chunks — so a prefill never computes idle rows. The
attention itself is the registered ``fluid_slots`` implementation (``slot_attention``): one SDPA
call with the step's bool mask, or ``is_causal`` for a prefill chunk that starts a prompt (no mask
tensor at all). An engine that runs the model's own modules holds the model on that attention
(``hold_slot_attention``); the last engine to let go gives the model its own back.

A masked entry must be harmless whatever it holds, and attention multiplies it by a zero weight: 0 ×
NaN is NaN. In float16 a token's keys or values can overflow (a "massive activation" past 65504;
bfloat16 and float32 have float32's range), and in the cache such an entry would poison every
query of its row that merely has it in range — the step's own drafts for the main tokens, and a
later request in the same slot (transformers keeps no such entry: its cache is one request's).
So float16 entries are written with NaN / inf as zero: nothing of an overflow reaches another
request, or the step's main tokens through a masked draft entry. The request whose own token
overflowed is ended instead: each forward's plan collects which entries overflowed
(``ForwardPlan.overflow``), and the engine ends a request — ``finish_reason`` "error", nothing more
committed — when one of its *committed* tokens did (a prompt token, or a step's fed token up to
the accepted length: a rejected draft that overflows is harmless, as in transformers, which never
feeds it). transformers decodes NaN there (token 0 when greedy; its sampling raises).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_npu.model.attention import attention_kind
from fluid_ops.attention_blocked import _sdpa

SLOT_ATTENTION = "fluid_slots"
# the plan of the engine forward running in this thread (None outside one): the attention reads
# it when a decoder layer does not hand its keywords on to the attention (StableLM, Nemotron)
_ACTIVE_PLAN: ContextVar[ForwardPlan | None] = ContextVar("fluid_active_plan", default=None)


@dataclass
class ForwardPlan:
    """What one engine forward writes and attends (set on the cache before the model runs).

    ``lo, hi``: the slot range ``[lo, hi)``, or ``rows [B]`` (slot indices, gathered); ``write
    [B, W]``: the cache index of each new token;
    ``extent``: keys ``[0, extent)`` are handed to the attention; ``mask [B, 1, W, extent]`` (True
    = attend) or ``causal`` (every row starts at index 0 with no slots: plain causal attention
    over the first ``W`` keys).
    """

    lo: int
    hi: int
    write: torch.Tensor
    extent: int
    mask: torch.Tensor | None
    causal: bool = False
    rows: torch.Tensor | None = None
    overflow: torch.Tensor | None = None  # [B, W] float16: entries whose key / value was NaN / inf


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """The model's layers, KV heads and head size: what a cache holds per position."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def kv_row_bytes(model: PreTrainedModel, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of one cache row (a request slot, or a prefix-cache row): keys and values of
    ``capacity`` positions in every layer."""
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * capacity * head_dim * dtype.itemsize


class SlotKV(Cache):
    """Static per-slot KV cache (see the module docstring); a transformers ``Cache`` for the model.

    Only ``update`` is used by the decoder layers: it writes the new keys / values where the
    current ``ForwardPlan`` says and returns views over ``[0, extent)`` of the plan's rows.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        fix: str | None = None,
    ) -> None:
        """``fix``: what the error of a cache that does not fit says to do (default: smaller
        sizes)."""
        layers, kv_heads, head_dim = kv_shape(model)
        shape = (slots, kv_heads, capacity, head_dim)
        need = slots * kv_row_bytes(model, capacity, dtype)
        why = (
            f"the engine's KV cache needs {need / 2**30:.2f} GiB (keys and values: {layers} "
            f"layers x {slots} rows (request slots, and prefix-cache rows if any) x {capacity} "
            f"positions x {kv_heads} KV heads x {head_dim} x {dtype.itemsize} bytes)"
        )
        fix = fix or (
            "lower max_batch (--max-batch), max_len (--max-len) or fluid serve's "
            "--prefix-cache-slots"
        )
        free = devices.free_memory(device)
        if free is not None and need > free:  # before the allocator (on a CPU: the OOM killer)
            raise ConfigError(f"{why} but {device} has {free / 2**30:.2f} GiB free; {fix}")
        try:
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if "memory" not in str(exc).lower():
                raise
            raise ConfigError(f"{why} and {device} could not allocate it; {fix}") from None
        self.slots, self.capacity = slots, capacity
        self.layers: list[Any] = []  # transformers' layer objects are not used
        self.plan: ForwardPlan | None = None
        self._rows: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def move_entries(
        self, dst: int, src: int | None, n: int, keep: int = 0, keep_to: int | None = None
    ) -> None:
        """Every layer's entries ``[0, n)`` of row ``src`` into row ``dst``; first, with
        ``keep_to``, ``dst``'s own ``[0, keep)`` into row ``keep_to`` (``src`` itself: a swap).
        In place, between forwards (compaction and prefix reuse: ``reuse.py``)."""
        for t in (*self.keys, *self.values):
            kept = t[dst, :, :keep].clone() if keep_to is not None and keep else None
            if src is not None and n:
                t[dst, :, :n] = t[src, :, :n]
            if kept is not None:
                t[keep_to, :, :keep] = kept

    def swap_rows(self, moves: Sequence[tuple[int, int, int, int]]) -> None:
        """``move_entries(dst, src, n, keep, src if keep else None)`` for every ``(dst, src, n,
        keep)`` of ``moves`` at once (compaction: no row is both a source and a destination), in
        four launches a layer tensor however many rows move instead of up to three a row. Every
        row copies the longest move's ``n`` (and ``keep``) entries: what lands past a row's own
        count is past its length or its kept prefix, never read."""
        dev = self.keys[0].device
        dst = torch.tensor([m[0] for m in moves], device=dev)
        src = torch.tensor([m[1] for m in moves], device=dev)
        n = max(m[2] for m in moves)
        swapped = [m for m in moves if m[3]]
        keep = max((m[3] for m in swapped), default=0)
        if swapped:
            keep_from = torch.tensor([m[0] for m in swapped], device=dev)
            keep_to = torch.tensor([m[1] for m in swapped], device=dev)
        for t in (*self.keys, *self.values):
            kept = t[keep_from, :, :keep] if keep else None  # (advanced indexing: a copy)
            if n:
                t[dst, :, :n] = t[src, :, :n]
            if kept is not None:
                t[keep_to, :, :keep] = kept

    def set_plan(self, plan: ForwardPlan) -> None:
        self.plan = plan
        _ACTIVE_PLAN.set(plan)
        if plan.rows is not None:
            self._rows = plan.rows[:, None]
        else:
            self._rows = torch.arange(plan.lo, plan.hi, device=plan.write.device)[:, None]
        self._flat = None  # (the eager writes' indices: made by the forward's first update)

    def _flat_rows(self, plan: ForwardPlan) -> torch.Tensor:
        """The eager writes' indices, shared by every layer of a forward: the same writes as one
        index_copy_ per tensor into the cache seen as [slots * kv_heads * capacity, head_dim], at
        each new entry's row in the new keys' [B, W, H] order. Every index is distinct (a slot per
        row, an index per token) and in range — a write past capacity would land in another row
        here, not raise, so the engine checks its host bound on the indices before it sets a plan
        (step.py ``_forward``)."""
        _, heads, cap, _ = self.keys[0].shape
        h = torch.arange(heads, device=plan.write.device)
        return ((self._rows[:, :, None] * heads + h) * cap + plan.write[:, :, None]).flatten()

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        if plan is None:
            raise RuntimeError("SlotKV.update called without a ForwardPlan (use the Scheduler)")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # written through the whole cache tensor at absolute slot indices, never through a view
        # of some of its rows: under torch.compile a write into a view of a graph input is
        # functionalised into a copy of the whole cache every step (measured: 16 of 32 slots ran
        # 3-20x slower than all 32); [B, H, W, D] -> [B, W, H, D]: the layout of an index with
        # rows and columns broadcast
        new_k, new_v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        if new_k.dtype != keys.dtype or new_v.dtype != values.dtype:  # (most models: no call)
            new_k, new_v = new_k.to(keys.dtype), new_v.to(values.dtype)
        if keys.dtype == torch.float16:  # see the module docstring: no NaN / inf enters the cache
            if plan.overflow is not None:  # which entries overflowed (the engine judges them)
                fine = torch.isfinite(new_k).flatten(2).all(-1) & torch.isfinite(new_v).flatten(
                    2
                ).all(-1)
                plan.overflow |= ~fine
            new_k = torch.nan_to_num(new_k, nan=0.0, posinf=0.0, neginf=0.0)
            new_v = torch.nan_to_num(new_v, nan=0.0, posinf=0.0, neginf=0.0)
        if not torch.compiler.is_compiling():  # (compiled: below, no scatter in the graph)
            if self._flat is None:
                self._flat = self._flat_rows(plan)
            d = keys.shape[-1]
            keys.view(-1, d).index_copy_(0, self._flat, new_k.reshape(-1, d))
            values.view(-1, d).index_copy_(0, self._flat, new_v.reshape(-1, d))
        else:
            keys[self._rows, :, plan.write] = new_k
            values[self._rows, :, plan.write] = new_v
        if plan.rows is None:
            if plan.lo == 0 and plan.hi == keys.shape[0]:  # every row (a call less per tensor)
                return keys[:, :, : plan.extent], values[:, :, : plan.extent]
            return (
                keys[plan.lo : plan.hi, :, : plan.extent],
                values[plan.lo : plan.hi, :, : plan.extent],
            )
        keys, values = keys[:, :, : plan.extent], values[:, :, : plan.extent]
        return keys.index_select(0, plan.rows), values.index_select(0, plan.rows)

    def clear_plan(self) -> None:
        """The forward is over (or failed): no plan until the next ``set_plan``."""
        self.plan = None
        _ACTIVE_PLAN.set(None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.plan is None else int(self.plan.extent)

    def __len__(self) -> int:
        return len(self.keys)


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    fluid_plan: ForwardPlan | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """The ``fluid_slots`` attention: SDPA over the slot cache under the plan's mask.

    The plan comes as a keyword through the decoder, or — for decoder layers that do not hand
    their keywords on to the attention (StableLM, Nemotron) — from the engine forward running in
    this thread. Without one (any forward outside the engine, e.g. a plain ``model(...)`` or
    ``generate`` while a ``Scheduler`` owns the model) it is exactly transformers' ``sdpa``
    attention.
    """
    if fluid_plan is None:
        fluid_plan = _ACTIVE_PLAN.get()
    if fluid_plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **_
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if fluid_plan.causal:
        w = query.shape[2]
        out = _sdpa(query, key[:, :, :w], value[:, :, :w], scale, is_causal=True)
    else:
        out = _sdpa(query, key, value, scale, mask=fluid_plan.mask)
    return out.transpose(1, 2).contiguous(), None


def register_slot_attention() -> None:
    """Register ``fluid_slots`` with transformers (idempotent), with sdpa's mask function.

    The engine's own forwards pass their mask as a 4D tensor, which transformers hands through
    untouched; every other forward gets the mask sdpa would.
    """
    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


# engines running a model's own modules switch it to the slot attention: the first one saves the
# model's attention and the last one to close gives it back (closing one engine must not take the
# slot attention from another still decoding on the same model)
_SLOT_HOLDERS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def hold_slot_attention(model: PreTrainedModel) -> None:
    """An engine runs ``model``'s modules over its slots: the slot attention, until released."""
    held = _SLOT_HOLDERS.get(model)
    if held is None or held[0] == 0:
        _SLOT_HOLDERS[model] = held = [0, attention_kind(model)]
        model.set_attn_implementation(SLOT_ATTENTION)
    held[0] += 1


def release_slot_attention(model: PreTrainedModel) -> None:
    """That engine is done; the last one gives the model its own attention back."""
    held = _SLOT_HOLDERS.get(model)
    if held is None or held[0] == 0:
        return
    held[0] -= 1
    if held[0] == 0:
        model.set_attn_implementation(held[1])
