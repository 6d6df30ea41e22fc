"""The reference loop's engine: prompts, prefill, cached forwards, token statistics, commits.

The fused loop runs on the decode engine (``scheduler.py``: static slot cache, continuous
batching); this first engine remains for the published FLUID loop (``reference.py``), which refines
drafts over several forwards and is kept as the research baseline. ``Engine`` owns one
``generate`` call's state for the rows still running: the ``RowCache``, each row's next position
and last committed token, and the output buffer of the whole batch. The loop decides what to feed;
the engine runs it and commits tokens:

* prompts are taken row by row from ``input_ids`` / ``attention_mask`` (any padding side) and
  left-padded again, positions counted from each row's first real token (as transformers does);
* the prefill encodes every prompt but its last token (main tokens, ``PAD`` for padding), so it
  commits nothing and every new token costs a counted decode forward — greedy decoding is TPF 1.0;
  the fused loop also has it draft the first tokens (slots anchored at the prompt's ``P-2``);
* ``commit`` takes up to ``cnt[b]`` candidate tokens per row, stops at the first EOS (kept) and at
  ``max_new_tokens``, and keeps the output on the host (one transfer per step, no tiny kernels); a
  row that stops leaves the batch (``retire``);
* the LM head: ``argmax`` (verification) and ``slot_stats`` (argmax, max log-prob, entropy of the
  drafts) are ``head.LMHead``'s, shared with the decode engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

import fluid_ops
from fluid_npu.layout import slot_block
from fluid_npu.model.attention import forward_hidden
from fluid_npu.sampling.cache import RowCache
from fluid_npu.sampling.head import LMHead
from fluid_npu.sampling.stats import GenerateStats
from fluid_npu.sampling.support import PinnedRope, check_engine_support
from fluid_ops.meta import MAIN, PAD

StreamFn = Callable[[int, list[int]], None]  # (row, newly committed token ids)


def split_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> list[torch.Tensor]:
    """Each row's real prompt tokens (1-D tensors), whatever side the padding is on."""
    if attention_mask is None:
        return list(input_ids)
    keep = attention_mask.to(torch.bool)
    return [row[m] for row, m in zip(input_ids, keep)]


class Engine:
    """State of one sampler call; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        prompts: list[torch.Tensor],
        *,
        mask_id: int,
        max_new_tokens: int,
        eos_ids: list[int],
        pad_id: int,
        stats: GenerateStats,
        stream: StreamFn | None = None,
    ) -> None:
        check_engine_support(model)
        self.model = model
        self._rope = PinnedRope(model)
        # the model's context: a MASK slot past it drafts nothing a row can commit, and reads the
        # last position (a table of learned positions, GPT-2's, ends there; as the engine does)
        self._positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.head = LMHead(model)
        self.mask_id = mask_id
        self.max_new = max_new_tokens
        self.stats = stats
        self.stream = stream
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        self._eos = set(eos_ids)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]  # new tokens per original row
        self.row_forwards = [0] * batch
        self.row_ids = list(range(batch))  # original index of each active row
        self.cache = RowCache(batch, self.device)
        self.next_pos = lengths.to(self.device)  # committed tokens = position of the next one
        self.last = torch.stack([p[-1] for p in prompts]).to(self.device, torch.long)
        self._prompts = prompts
        self._lengths = lengths

    @property
    def active(self) -> int:
        return len(self.row_ids)

    # ------------------------------------------------------------------ forwards

    def prefill(self, draft: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Encode each prompt but its last token into the cache (left-padded, ``PAD`` anchors).

        With ``draft > 0`` the same forward also drafts the first tokens: ``draft`` MASK slots
        anchored at the prompt's second-to-last token ``c = P-2`` (positions ``P-1 …``), so slot
        ``j`` guesses ``x_{P-1+j}`` — the first new tokens, verified by the first decode step.
        Returns the slots' hidden states ``[B, draft, H]`` and the anchors' ``[B, H]`` (rows with
        a one-token prompt get ``PAD`` slots), or None. The slots leave the cache at once.
        """
        width = int(self._lengths.max()) - 1
        if width <= 0:
            return None
        batch = len(self._prompts)
        ids = torch.zeros((batch, width), dtype=torch.long)
        pos = torch.zeros((batch, width), dtype=torch.long)
        anchor = torch.full((batch, width), PAD, dtype=torch.long)
        for row, p in enumerate(self._prompts):
            n = len(p) - 1
            if n > 0:
                ids[row, width - n :] = p[:-1]
                pos[row, width - n :] = torch.arange(n)
                anchor[row, width - n :] = MAIN
        if draft > 0:
            c = self._lengths - 2  # the anchor's position; the last prefill column holds it
            block = slot_block(c, draft, self.mask_id, live=c >= 0)
            ids = torch.cat([ids, block.input_ids], dim=1)
            pos = torch.cat([pos, block.position_ids], dim=1)
            anchor = torch.cat([anchor, block.anchor], dim=1)
        ids, pos, anchor = (t.to(self.device) for t in (ids, pos, anchor))
        hidden = self._run(ids, pos, anchor, n_main=width)
        self.stats.prefill_forwards += 1
        if draft <= 0:
            return None
        self.cache.crop(draft)
        return hidden[:, width:], hidden[:, width - 1]

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, anchor: torch.Tensor, n_main: int
    ) -> torch.Tensor:
        """One decode forward of new tokens ``[B, W]`` over the cache; returns hidden ``[B, W, H]``.

        The new entries are appended to the cache; the caller keeps or drops them (``keep_new``).
        """
        hidden = self._run(ids, pos, anchor, n_main)
        self.stats.decode_forwards += 1
        for r in self.row_ids:
            self.row_forwards[r] += 1
        return hidden

    def _run(
        self, ids: torch.Tensor, pos: torch.Tensor, anchor: torch.Tensor, n_main: int
    ) -> torch.Tensor:
        meta = self.cache.meta(pos, anchor, n_main)
        at = pos  # (the metadata keeps the true positions)
        if self._positions is not None and int(pos.max()) >= self._positions:
            at = pos.clamp(max=self._positions - 1)
        with self._rope():  # a dynamic rope at generate's frequencies (support.py)
            hidden, _ = forward_hidden(
                self.model, ids, at, meta, cache=self.cache.kv, use_cache=True
            )
        self.cache.appended(pos, anchor)
        self.stats.computed_tokens += ids.numel()
        return hidden

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The AR argmax of the LM head on ``hidden [..., H]`` (``LMHead.argmax``)."""
        return self.head.argmax(hidden)

    def slot_stats(self, hidden: torch.Tensor) -> fluid_ops.TokenStats:
        """Argmax, max log-prob and entropy of the LM head on ``hidden`` (``LMHead.stats``)."""
        return self.head.stats(hidden)

    # ------------------------------------------------------------------ commits

    def commit(self, cand: torch.Tensor, cnt: torch.Tensor) -> tuple[list[bool], list[int]]:
        """Commit the first ``cnt[b]`` tokens of ``cand [B, C]`` per active row.

        Stops after an EOS (kept) and at ``max_new_tokens``. Returns ``(finished, committed)`` per
        active row and advances ``next_pos`` by what was committed; ``last`` is left to the loop.
        The bookkeeping runs on the host: two small transfers instead of a dozen tiny kernels.
        """
        finished, committed = [], []
        for r, toks, k in zip(self.row_ids, cand.tolist(), cnt.tolist()):
            out = self.tokens[r]
            take = toks[: min(k, self.max_new - len(out))]
            for i, t in enumerate(take):
                if t in self._eos:
                    take = take[: i + 1]
                    break
            out.extend(take)
            committed.append(len(take))
            finished.append(len(out) >= self.max_new or (bool(take) and take[-1] in self._eos))
            if self.stream is not None and take:
                self.stream(r, take)
        self.next_pos = self.next_pos + torch.tensor(committed, device=self.device)
        return finished, committed

    def retire(self, finished: list[bool]) -> torch.Tensor | None:
        """Drop finished rows; returns the kept indices (for the loop's own state) or None."""
        if not any(finished):
            return None
        kept = [i for i, f in enumerate(finished) if not f]
        self.row_ids = [self.row_ids[i] for i in kept]
        keep = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.next_pos = self.next_pos[keep]
        self.last = self.last[keep]
        self.cache.select(keep)
        return keep

    def new_tokens(self) -> list[list[int]]:
        return [list(t) for t in self.tokens]

    def finish(self) -> None:
        self.stats.new_tokens = [len(t) for t in self.tokens]
        self.stats.row_forwards = list(self.row_forwards)
        self.stats.finalize()
