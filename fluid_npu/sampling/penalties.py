"""Repetition, presence and frequency penalties and the logit bias in the decode engine: per-slot
token counts kept on the device, and the adjusted logits of a verify step whose every position
sees the drafts before it.

The semantics are vLLM's — transformers' for ``repetition_penalty``, OpenAI's for the other two —
applied to the raw logits before temperature and the filters (the order of both):

* ``repetition_penalty`` ``r`` (1 = off): a token that occurs in the prompt or the output so far
  has its logit divided by ``r`` where positive, multiplied by ``r`` otherwise (transformers'
  ``RepetitionPenaltyLogitsProcessor``);
* ``presence_penalty`` ``a`` and ``frequency_penalty`` ``f`` (0 = off, each in [-2, 2]): logit
  ``− a·[n > 0] − f·n`` where ``n`` counts the token's occurrences in the output so far;
* ``logit_bias`` (OpenAI's, up to 300 tokens, each in [-100, 100]) is added first, at every
  position;
* ``min_tokens`` (transformers' ``min_new_tokens``, vLLM's ``min_tokens``): the request's EOS ids
  get ``-inf`` at every position before that many new tokens;
* vLLM's ``allowed_token_ids``: every other token gets ``-inf`` at every position, first (a
  ``[slots, V]`` mask made at the first request that restricts its tokens);
* ``bad_words`` (vLLM's once tokenized, transformers' ``bad_words_ids``): a sequence's last token
  gets ``-inf`` at a position whose preceding tokens end with the rest of it (a one-token
  sequence: everywhere). Each slot keeps its last ``L`` tokens (``L``: the longest sequence's
  length − 1) — from the output only (vLLM's reading: a sequence needs that many new tokens
  before it), or the prompt's too (transformers') — and position ``j``'s window is those tokens
  followed by the drafts before ``j``.

A verify step scores position ``j`` after the pending drafts ``d_0 … d_{j−1}`` — the sequence the
AR model would have seen there — so "so far" for position ``j`` includes those drafts: the counts
of committed tokens (``[slots, V]``, made at the first penalised request) penalise every position
at once, then only the draft tokens' entries are rewritten per position with what the drafts
before it add (``[R, M+1, M]`` values, no host read). Only the rows of penalised requests are
computed (and pay for full logits). Every committed
token is then the argmax (or the exact sample) of the penalised AR distribution, as transformers'
``generate(repetition_penalty=…)`` decodes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.rules import MAX_BAD_WORD_LEN, MAX_BAD_WORDS, MAX_LOGIT_BIAS, SamplingParams

NONE = -2  # a bad-word window's slot before the text (matches no token, and no "any")


class Penalties:
    """The engine's per-slot penalty settings and counts (``scheduler.Scheduler.penalties``)."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.prompt = torch.zeros((slots, vocab), dtype=torch.bool, device=device)  # in the prompt
        self.count = torch.zeros((slots, vocab), dtype=torch.int32, device=device)  # in the output
        self.rep = torch.ones(slots, dtype=torch.float32, device=device)
        self.presence = torch.zeros(slots, dtype=torch.float32, device=device)
        self.frequency = torch.zeros(slots, dtype=torch.float32, device=device)
        # logit_bias as (token, bias) pairs per slot; unused pairs add 0 to token 0
        self.bias_ids = torch.zeros((slots, MAX_LOGIT_BIAS), dtype=torch.long, device=device)
        self.bias = torch.zeros((slots, MAX_LOGIT_BIAS), dtype=torch.float32, device=device)
        self.min_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.allowed: torch.Tensor | None = None  # [slots, V]: allowed_token_ids (None: any)
        # bad words (None until a request has some): per slot and sequence, the banned last token
        # (-1: no sequence), the tokens before it right-aligned (-1: any, a shorter sequence's
        # start), and the slot's last tokens (NONE: before the text)
        self.bad_last: torch.Tensor | None = None  # [slots, NB]
        self.bad_prefix: torch.Tensor | None = None  # [slots, NB, L]
        self.tail: torch.Tensor | None = None  # [slots, L]
        self.banning: set[int] = set()  # the slots whose running request has some
        # more ids held back before min_tokens than the row's end ids (Request.min_tokens_hold)
        self.hold: torch.Tensor | None = None  # [slots, H], -1 padded

    def admit(
        self, row: int, prompt: Sequence[int], params: SamplingParams, hold: Sequence[int] = ()
    ) -> None:
        """Slot ``row`` starts a request with ``params``' penalties and bias, and ``prompt``;
        ``hold``: more token ids kept out before ``min_tokens`` than the row's end ids."""
        dev = self.prompt.device
        hold = sorted(set(hold)) if params.min_tokens else []
        if hold and (self.hold is None or self.hold.shape[1] < len(hold)):
            more = len(hold) - (0 if self.hold is None else self.hold.shape[1])
            base = self.hold if self.hold is not None else self.prompt.new_empty(
                (self.prompt.shape[0], 0), dtype=torch.long)  # fmt: skip
            self.hold = F.pad(base, (0, more), value=-1)
        if self.hold is not None:
            self.hold[row] = -1
            if hold:
                self.hold[row, : len(hold)] = torch.tensor(hold, dtype=torch.long, device=dev)
        self.prompt[row] = False
        self.count[row] = 0
        self.prompt[row, torch.tensor(list(prompt), dtype=torch.long, device=dev)] = True
        self.rep[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.min_tokens[row] = params.min_tokens
        self.bias_ids[row], self.bias[row] = 0, 0.0
        if params.allowed_token_ids and self.allowed is None:
            self.allowed = torch.ones_like(self.prompt)
        if self.allowed is not None:
            self.allowed[row] = not params.allowed_token_ids
            if params.allowed_token_ids:
                ids = torch.tensor(params.allowed_token_ids, dtype=torch.long, device=dev)
                self.allowed[row, ids] = True
        self.banning.discard(row)
        if params.bad_words:
            self.banning.add(row)
            self._admit_bad_words(row, prompt, params)
        elif not self.banning:  # no slot runs a request with bad words: the steps skip them
            self.bad_last = self.bad_prefix = self.tail = None
        elif self.bad_last is not None:
            self._admit_bad_words(row, prompt, params)
        if params.logit_bias:
            n = len(params.logit_bias)
            ids, values = zip(*params.logit_bias)
            self.bias_ids[row, :n] = torch.tensor(ids, dtype=torch.long, device=dev)
            self.bias[row, :n] = torch.tensor(values, dtype=torch.float32, device=dev)

    def _admit_bad_words(self, row: int, prompt: Sequence[int], params: SamplingParams) -> None:
        words = params.bad_words
        nb = max(len(words), 0 if self.bad_last is None else self.bad_last.shape[1])
        width = max([len(w) - 1 for w in words] + [0 if self.tail is None else self.tail.shape[1]])
        self._fit_bad_words(nb, width)
        assert self.bad_last is not None and self.bad_prefix is not None and self.tail is not None
        last = torch.full((nb,), -1, dtype=torch.long)
        prefix = torch.full((nb, width), -1, dtype=torch.long)
        for b, w in enumerate(words):
            last[b] = w[-1]
            if len(w) > 1:
                prefix[b, width - len(w) + 1 :] = torch.tensor(w[:-1])
        tail = torch.full((width,), NONE, dtype=torch.long)
        seen = list(prompt)[max(len(prompt) - width, 0) :] if params.bad_words_in_prompt else []
        if seen and width:
            tail[width - len(seen) :] = torch.tensor(seen)
        dev = self.prompt.device
        self.bad_last[row], self.bad_prefix[row] = last.to(dev), prefix.to(dev)
        self.tail[row] = tail.to(dev)

    def _fit_bad_words(self, nb: int, width: int) -> None:
        """The bad-word tensors hold ``nb`` sequences of ``width`` + 1 tokens per slot, grown
        where a request needs more: a sequence's start and a slot's earlier tokens are padded on
        the left (any / none), which no shorter sequence reads."""
        slots, dev = self.prompt.shape[0], self.prompt.device
        if self.bad_last is None:
            self.bad_last = torch.full((slots, nb), -1, dtype=torch.long, device=dev)
            self.bad_prefix = torch.full((slots, nb, width), -1, dtype=torch.long, device=dev)
            self.tail = torch.full((slots, width), NONE, dtype=torch.long, device=dev)
            return
        assert self.bad_prefix is not None and self.tail is not None
        more_nb, more_w = nb - self.bad_last.shape[1], width - self.tail.shape[1]
        if more_nb > 0 or more_w > 0:
            self.bad_last = F.pad(self.bad_last, (0, max(more_nb, 0)), value=-1)
            self.bad_prefix = F.pad(self.bad_prefix, (max(more_w, 0), 0, 0, max(more_nb, 0)),
                                    value=-1)  # fmt: skip
            self.tail = F.pad(self.tail, (max(more_w, 0), 0), value=NONE)

    def commit(self, rows: torch.Tensor, toks: torch.Tensor, take: torch.Tensor) -> None:
        """Rows ``rows`` (of the step's ``[hi, W]`` tokens ``toks``) committed their first
        ``take`` tokens: they count as output from now on."""
        toks, take = toks[rows], take[rows]
        kept = torch.arange(toks.shape[1], device=toks.device)[None] < take[:, None]
        at = rows[:, None].expand_as(toks)
        self.count.index_put_((at, toks), kept.to(self.count.dtype), accumulate=True)
        if self.tail is not None and self.tail.shape[1]:  # the last L tokens, after the new ones
            width = self.tail.shape[1]
            text = torch.cat([self.tail[rows], toks], dim=1)
            shift = take[:, None] + torch.arange(width, device=toks.device)[None]
            self.tail[rows] = text.gather(1, shift)

    def release(self, row: int) -> None:
        """Slot ``row``'s request ended: once no slot holds bad words, the steps skip them."""
        self.banning.discard(row)
        if not self.banning:
            self.bad_last = self.bad_prefix = self.tail = None

    def move(self, dst: int, src: int) -> None:
        """A request moved from slot ``src`` to ``dst`` (the scheduler's compaction)."""
        if src in self.banning:
            self.banning.add(dst)
        else:
            self.banning.discard(dst)
        self.banning.discard(src)
        for t in (self.prompt, self.count, self.rep, self.presence, self.frequency,
                  self.bias_ids, self.bias, self.min_tokens, self.allowed, self.bad_last,
                  self.bad_prefix, self.tail, self.hold):  # fmt: skip
            if t is not None:
                t[dst] = t[src]

    def apply(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        m: torch.Tensor,
        rows: torch.Tensor,
        produced: torch.Tensor,
        eos: torch.Tensor,
    ) -> torch.Tensor:
        """The penalised ``logits [R, M+1, V]`` (float32) of the verify positions of slots
        ``rows`` (``[R]``): position ``j`` sees the committed tokens and the row's pending drafts
        before ``j`` (``drafts [R, M]``, the first ``m [R]`` of each row real) and would be new
        token ``produced + j`` of the row (``produced [R]``: committed so far); ``eos [R, E]``:
        each row's EOS ids (-1: none), kept out before its ``min_tokens``.

        The committed counts penalise every position at once (broadcast); then only the entries
        of draft tokens are rewritten, at every position, with the counts the drafts before that
        position add — ``[R, M+1, M]`` values, so no per-position ``[V]`` counts are built. A
        token drafted twice gets the same value from both entries (its count at a position does
        not depend on which of its occurrences wrote it)."""
        r, p, _ = logits.shape
        if self.allowed is not None:  # allowed_token_ids: nothing else may come, whatever else adds
            logits = logits.masked_fill(~self.allowed[rows][:, None, :], -math.inf)
        if self.bad_last is not None:
            logits = self._ban_bad_words(logits, drafts, rows)
        # logit_bias next (transformers' sequence bias comes before its repetition penalty too)
        ids = self.bias_ids[rows][:, None, :].expand(r, p, -1)
        logits = logits.scatter_add(2, ids, self.bias[rows][:, None, :].expand(r, p, -1))
        if self.hold is not None:  # (and the ids held back besides them)
            eos = torch.cat([eos, self.hold[rows]], dim=1)
        # min_tokens: EOS impossible at positions before it (-inf added: a duplicate id adds 0)
        j = torch.arange(p, device=logits.device)
        early = (produced[:, None] + j[None]) < self.min_tokens[rows][:, None]  # [R, P]
        blocked = early[:, :, None] & (eos >= 0)[:, None, :]  # [R, P, E]
        block = torch.where(blocked, -math.inf, 0.0)
        logits = logits.scatter_add(2, eos.clamp(min=0)[:, None, :].expand_as(block), block)
        rep = self.rep[rows][:, None, None]
        presence = self.presence[rows][:, None, None]
        frequency = self.frequency[rows][:, None, None]

        def penalise(x: torch.Tensor, count: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            # transformers' order: a negative logit is multiplied, any other divided
            x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
            return x - frequency * count - presence * (count > 0).to(x.dtype)

        count = self.count[rows].float()  # [R, V]
        prompt = self.prompt[rows]
        out = penalise(logits, count[:, None, :], (prompt | (count > 0))[:, None, :])
        if p == 1 or drafts.shape[1] == 0:
            return out
        d = drafts[:, : p - 1]  # [R, M]
        mm = d.shape[1]
        i = torch.arange(mm, device=d.device)
        real = i[None] < m[:, None]  # [R, M]
        same = (d[:, :, None] == d[:, None, :]) & real[:, None, :]  # [R, i, i']: d_i' = d_i, real
        before = (i[None, :] < torch.arange(p, device=d.device)[:, None]).float()  # [P, M]: i' < j
        occurrences = torch.einsum("rab,jb->rja", same.float(), before)  # [R, P, M]
        at = d[:, None, :].expand(r, p, mm)
        drafted = count.gather(1, d)[:, None, :] + occurrences
        seen = prompt.gather(1, d)[:, None, :] | (drafted > 0)
        return out.scatter(2, at, penalise(logits.gather(2, at), drafted, seen))

    def _ban_bad_words(
        self, logits: torch.Tensor, drafts: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``logits [R, P, V]`` with each bad word's last token at ``-inf`` at the positions
        whose preceding tokens (the slot's last ones, then the drafts before the position) end
        with the rest of it: ``[R, P, NB, L]`` comparisons, no host read."""
        assert self.bad_last is not None and self.bad_prefix is not None and self.tail is not None
        r, p, _ = logits.shape
        last = self.bad_last[rows]  # [R, NB]
        hit = (last >= 0)[:, None, :].expand(r, p, -1)  # [R, P, NB]
        width = self.tail.shape[1]
        if width:
            text = torch.cat([self.tail[rows], drafts[:, : p - 1]], dim=1)  # [R, L + P - 1]
            window = text.unfold(1, width, 1)[:, :, None, :]  # [R, P, 1, L]: before position j
            prefix = self.bad_prefix[rows][:, None]  # [R, 1, NB, L]
            hit = hit & ((window == prefix) | (prefix < 0)).all(dim=-1)
        ban = torch.where(hit, -math.inf, 0.0).to(logits.dtype)
        return logits.scatter_add(2, last.clamp(min=0)[:, None, :].expand(r, p, -1), ban)


def bad_word_sequences(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's ``bad_words`` (text) as token sequences, as vLLM tokenizes them: each word (leading
    whitespace stripped) as the tokenizer encodes it at the start of a text, and again after a
    space where that spells it with other tokens of the same count (a word-start token) — so the
    word is banned at the text's start and in the middle. A word that encodes to nothing, or more
    than ``MAX_BAD_WORDS`` sequences (or one over ``MAX_BAD_WORD_LEN`` tokens), is a
    ``ConfigError``."""
    if len(words) > MAX_BAD_WORDS:  # (before tokenizing them all)
        raise ConfigError(f"bad_words holds {len(words)} words; at most {MAX_BAD_WORDS}")
    out: list[tuple[int, ...]] = []
    for n, word in enumerate(words):
        if not isinstance(word, str):
            raise ConfigError(f"bad_words[{n}] must be a string, got {word!r}")
        bare = _encoded(tokenizer, word.lstrip(), n)
        if not bare:
            raise ConfigError(
                f"bad_words[{n}] is empty (or only whitespace); give a word or leave it out"
            )
        spaced = _encoded(tokenizer, " " + word.lstrip(), n)
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    if len(out) > MAX_BAD_WORDS or max(map(len, out), default=0) > MAX_BAD_WORD_LEN:
        raise ConfigError(
            f"bad_words makes {len(out)} token sequences of up to {max(map(len, out))} tokens; "
            f"at most {MAX_BAD_WORDS} are taken (each word may count twice: with and without a "
            f"leading space) of up to {MAX_BAD_WORD_LEN} tokens"
        )
    return tuple(out)


def _encoded(tokenizer: Any, text: str, n: int) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # the tokenizer's own (e.g. a lone UTF-16 surrogate in the text)
        raise ConfigError(f"the tokenizer cannot encode bad_words[{n}]: {exc}") from None
