"""The decode step of a lone greedy request on a CPU: ``step.py``'s bookkeeping on Python numbers.

On a CPU the "device" is the host, so what ``step.py`` keeps on the device to spare accelerators a
synchronisation buys nothing there, and its cost is the calls: the bookkeeping after a forward —
accept, commit, EOS, ``max_new_tokens``, the next drafts and candidate blocks, the AR fallback —
is ~200 tensor calls of a few elements each, about a third of a decode step of a small model at
batch 1 (docs/engine.md). ``HostStepMixin._decode_host`` runs the same step for one running row
with that arithmetic on Python numbers, reading and writing the engine's per-slot state through
``Tensor.numpy()`` views of the same memory (so the tensor step takes over from the next step on,
whenever a second request joins), and calls the model, the LM head, the horizon policy and the
K-head on exactly the tensors ``step.py`` gives them: the same forwards, logits and drafts, bit for
bit. What it restates on Python numbers: step.py's accept / commit / EOS / limit / AR-fallback
rules, ``layout.slot_block``'s placement of the candidate blocks, ``fluid_ops.step_mask``'s
assembly of the mask (from the new tokens' ``visibility``, kept per layout relative to the row's
length) and ``fused.choose_anchors`` (on Python floats: double, where the tensor version rounds
to float32, exact ties taken shortest first — which blocks a step drafts can differ at a near-tie
of two accept lengths' scores: a step's shape, never a token; a CPU engine's prefill picks its
first candidate blocks with it too, ``prefill.py``). ``tests/test_host_step.py`` holds each to
the tensor version: a change to one of those rules must change its host twin.

It runs where ``step.py`` would read a step and nothing else: a CPU engine, not compiled (a
compiled step is the tensor one), one running slot, greedy, no logprobs, no logits adjusted
(penalties, a bias, ``min_tokens``, a grammar), not float16 (its overflow watch).
``Scheduler(host_step=False)`` turns it off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from fluid_npu.sampling.requests import Event
from fluid_npu.sampling.step import EMA
from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility

MASK_LAYOUTS = 256  # new tokens' layouts (relative to their row's length) whose visibility is kept


class HostStepMixin:
    """``Scheduler``'s decode step of one running greedy row on a CPU (module docstring)."""

    def _host_step_ok(self, hi: int, plain: bool) -> bool:
        """Whether this step runs on Python numbers: one running slot, nothing but greedy
        decoding (``plain``), an eager CPU engine."""
        return hi == 1 and plain and self.host_step and self._compiled is None and not self._watch

    def _host(self, name: str) -> np.ndarray:
        """The numpy view of the state tensor ``name`` (made again when the tensor is replaced)."""
        t = getattr(self, name)
        view = self._host_views.get(name)
        if view is None or view[0] is not t:
            view = self._host_views[name] = (t, t.numpy())
        return view[1]

    def _host_mask(
        self, base: int, pos: list[int], anchor: list[int]
    ) -> Callable[[int], torch.Tensor]:
        """``fluid_ops.step_mask`` of one row whose new tokens start at cache index ``base``: the
        committed entries for every real query, then the new tokens' own visibility — which
        depends only on their layout relative to ``base`` (``fluid_ops.meta.visibility`` is
        translation-invariant), so it is computed once per layout and kept."""
        key = (tuple(p - base for p in pos), tuple(a - base if a >= 0 else a for a in anchor))
        layout = self._host_layouts.get(key)
        if layout is None:
            if len(self._host_layouts) >= MASK_LAYOUTS:
                self._host_layouts.clear()
            rel = [torch.tensor([x], device=self.device) for x in key]
            vis = visibility(AttnMeta.self_attention(*rel))[0]  # [W, W]
            real = torch.tensor([[a != PAD] for a in anchor], device=self.device)
            pad = [j for j, a in enumerate(anchor) if a == PAD]  # queries that see nothing ...
            layout = self._host_layouts[key] = (vis, real, pad)
        vis, real, pad = layout
        w = len(pos)

        def mask_of(extent: int) -> torch.Tensor:
            mask = torch.zeros((1, 1, w, extent), dtype=torch.bool, device=self.device)
            rows = mask[0, 0]
            if base:
                rows[:, :base] = real
            rows[:, base : base + w] = vis
            if pad:  # ... are opened to key 0, as step_mask does: no softmax is empty
                rows[pad, 0] = True
            return mask

        return mask_of

    def _decode_host(self, big_m: int, n_blocks: int, k: int) -> list[Event]:
        v = self._host
        length, last, new_count, m_state, cand_state = map(
            v, ("length", "last", "new_count", "m", "cand")
        )
        base = int(length[0])
        m = min(int(m_state[0]), big_m)
        drafts = v("drafts")[0, :big_m].tolist()
        cand = cand_state[0, :n_blocks].tolist()
        # the inputs step.py builds: v_0 and the pending drafts (PAD past m), then the blocks
        ids = [int(last[0]), *drafts]
        pos = list(range(base, base + big_m + 1))
        anchor = [MAIN if j <= m else PAD for j in range(big_m + 1)]
        for c in cand:
            at = base + max(c, 0)
            ids += [self.mask_id] * k
            pos += range(at + 1, at + k + 1)
            anchor += [at if c >= 0 else PAD] * k
        dev = self.device
        ids_t, pos_t, anchor_t = (torch.tensor([x], dtype=torch.long, device=dev)
                                  for x in (ids, pos, anchor))  # fmt: skip
        width = len(ids)
        t0 = time.perf_counter()
        mask_of = self._host_mask(base, pos, anchor)
        hidden = self._forward(0, ids_t, pos_t, anchor_t, self.length[:1], mask_of=mask_of)
        self.decode_forwards += 1
        ar = self.head.argmax(hidden[:, : big_m + 1])[0].tolist()
        a = 0
        while a < m and drafts[a] == ar[a]:
            a += 1
        toks = [*drafts, ar[a]]
        toks[a] = ar[a]
        max_new = int(v("max_new")[0])
        room = max_new - int(new_count[0])
        take = min(a + 1, room)
        eos = set(v("eos")[0].tolist())
        hit_eos = False
        for t in range(take):
            if toks[t] in eos:
                take, hit_eos = t + 1, True
                break
        done = hit_eos or int(new_count[0]) + take >= max_new
        new_count[0] += take
        length[0] += take
        last[0] = toks[max(take - 1, 0)]
        paid = v("paid")
        if self.adaptive and paid[0]:  # float32, as the tensor step: 0.7 * ema + 0.3 * a
            ema = v("ema")
            ema[0] = np.float32(EMA) * ema[0] + np.float32(1 - EMA) * np.float32(a)
        paid[0] = False
        m_next, hit_block = 0, -1
        if n_blocks:
            hit_block = cand.index(a) if a in cand else -1
            if hit_block >= 0:
                start = big_m + 1 + hit_block * k
                sel = hidden[:, start : start + k]
                drafted, conf, keep = self._draft(slice(0, 1), sel, hidden[:, a], self.length[:1])
                # (one row: the K-head reads the anchor's hidden state as step.py's [1, H])
                m_next = int(keep[0])
                self.drafts[:1, :k], self.logp[:1, :k] = drafted, conf
                paid[0] = True
        cand_next = [-1] * self.anchors
        probe = self.adaptive and bool(k) and self.budget.probe_due(1)
        all_ar = self.adaptive and not (n_blocks or big_m or probe)
        if k and not all_ar:
            if n_blocks:
                logp = v("logp")[0, :m_next].tolist()
                cand_next = choose_anchors_host(logp, m_next, self.anchors, self.coverage)
            else:
                cand_next = v("_from_v0")[0].tolist()
            if self.adaptive:  # one row: it drafts while its own average earns the price
                price = np.float32(self.budget.price(1))
                if not (v("ema")[0] >= price or probe):
                    cand_next = [-1] * self.anchors
        m_state[0] = m_next
        cand_state[0] = cand_next
        n_cand = sum(c >= 0 for c in cand_next)
        blocks_had = sum(c >= 0 for c in cand)
        row = [take, int(done), a, m, *toks, m_next, n_cand, blocks_had, hit_block]
        self.budget.record(1, width, time.perf_counter() - t0)
        self._next_shape = (m_next, n_cand)
        events = self._events([row], 1, big_m, k)
        if self.adaptive and not self._prior_replaced and self.budget.has_history():
            self.ema.clamp_(max=self.budget.prior_accept())
            self._prior_replaced = True
        return events


def choose_anchors_host(logp: list[float], m: int, count: int, coverage: float) -> list[int]:
    """``fused.choose_anchors`` for one row on Python floats: the candidate accept lengths that
    get a block (``count`` of them, ``-1`` = none), most likely first until ``coverage``.
    ``logp``: the pending drafts' log-confidences (the first ``m`` are read)."""
    scores, reach = [], 1.0
    for j in range(m):
        p = math.exp(logp[j])
        scores.append(reach * (1.0 - p))  # P(a = j): drafts 1 … j accepted, j + 1 rejected
        reach *= p
    scores.append(reach)  # P(a = m): every draft accepted
    order = sorted(range(m + 1), key=lambda j: -scores[j])[:count]
    out, mass = [], 0.0
    for j in order:
        if mass >= coverage:
            break
        out.append(j)
        mass += scores[j]
    return out + [-1] * (count - len(out))
