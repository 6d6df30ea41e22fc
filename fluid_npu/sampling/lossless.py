"""The golden check: the sampler's tokens against transformers' greedy ``generate``.

The sampler is lossless by construction — every committed token is the AR argmax — so any
difference from ``model.generate(do_sample=False)`` can only be floating-point noise picking the
other side of a near-tie (the sampler's forwards batch several tokens, so sums run in another
order). ``compare`` finds each row's first differing token and re-scores it with a fresh full
forward of the shared prefix: when the two candidates' logits are within ``tol`` of each other and
of the maximum, it is a numerical tie (reported, tolerated); anything else is a real mismatch.
After a first difference a row's continuations legitimately diverge, so only that one is judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

TIE_TOL = 1e-4


@dataclass(frozen=True)
class Difference:
    row: int
    index: int  # position among the new tokens
    ours: int | None  # None: our row ended before this token
    theirs: int | None
    gap: float  # |logit(ours) − logit(theirs)| at the shared prefix (inf if a row ended)
    tie: bool

    def to_dict(self) -> dict:
        return asdict(self)


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first EOS."""
    out = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


@torch.inference_mode()
def hf_greedy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    """transformers' greedy ``generate`` on a left-padded batch; new tokens per row, cut at EOS."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=list(eos_ids) if eos_ids else None,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    new = out[:, input_ids.shape[1] :].tolist()
    return [cut_at_eos(row, eos_ids) for row in new]


@torch.inference_mode()
def compare(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    ours: Sequence[Sequence[int]],
    theirs: Sequence[Sequence[int]],
    tol: float = TIE_TOL,
) -> list[Difference]:
    """Every row's first difference between ``ours`` and ``theirs`` (see the module docstring)."""
    diffs = []
    dev = next(model.parameters()).device
    for row, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        a, b = list(a), list(b)
        if a == b:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        mine = a[i] if i < len(a) else None
        other = b[i] if i < len(b) else None
        gap, tie = float("inf"), False
        if mine is not None and other is not None:
            ids = torch.tensor([[*map(int, prompt), *b[:i]]], device=dev)
            logits = model(input_ids=ids).logits[0, -1].float()
            top = logits.max()
            gap = float((logits[mine] - logits[other]).abs())
            tie = (
                gap <= tol
                and float(top - logits[mine]) <= tol
                and float(top - logits[other]) <= tol
            )
        diffs.append(Difference(row, i, mine, other, gap, tie))
    return diffs
