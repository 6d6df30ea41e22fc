"""Choosing the MASK token that fills FLUID's horizon slots (DESIGN §5).

Resolution order:

1. ``mask_token`` from the config — must already be a single token of the tokenizer;
2. the tokenizer's own mask token;
3. a reserved special token that the chat template and thinking markers do not use (openPangu's
   ``[unusedN]``, Llama-3's ``<|reserved_special_token_N|>``); openPangu's ``[unused32]`` first, as
   the FLUID reference used it, then the highest-numbered free one;
4. when allowed (Stage I), a new ``<|mask|>`` token, with the embedding matrix resized and the new
   row initialised to the mean embedding.

The chosen token is recorded as the tokenizer's ``mask_token`` so the saved tokenizer carries it and
Stage II / the sampler resolve the same id. ``check_unused`` fails clearly when the token occurs in
the training data, since a MASK that is also a real token would leak labels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu.errors import ConfigError, DataError, FluidError

NEW_MASK = "<|mask|>"
RESERVED_PATTERNS = (
    re.compile(r"^\[unused(\d+)\]$"),
    re.compile(r"^<\|reserved_special_token_(\d+)\|>$"),
)
PREFERRED_RESERVED = ("[unused32]",)
# Special tokens with a meaning in openPangu's chat format / tool calls / thinking mode, never used
# as MASK (its own chat template writes only the first two: the others are not found there)
PANGU_USED = ("[unused9]", "[unused10]", "[unused11]", "[unused12]", "[unused16]", "[unused17]")


@dataclass(frozen=True)
class MaskToken:
    token: str
    id: int
    source: str  # "config" | "tokenizer" | "reserved" | "unused special" | "added" | "adapter"


def _single_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def reserved_candidates(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Reserved special tokens not used by the chat template or thinking markers, best first."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    found: list[tuple[int, str]] = []
    for token in tokenizer.get_vocab():
        for pattern in RESERVED_PATTERNS:
            m = pattern.match(token)
            if m and token not in PANGU_USED and token not in template:
                found.append((int(m.group(1)), token))
    found.sort(reverse=True)
    names = [t for _, t in found]
    preferred = [t for t in PREFERRED_RESERVED if t in names]
    return preferred + [t for t in names if t not in preferred]


def unused_special_candidates(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special added tokens that no role of the tokenizer and no chat-template text uses, by
    descending id; empty for a tokenizer without a chat template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if not template:
        return []
    roles = {
        getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos", "pad", "unk", "cls")
    }
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = [
        (int(tid), added.content)
        for tid, added in decoder.items()
        if getattr(added, "special", False)
        and added.content not in roles
        and added.content not in template
        and added.content not in PANGU_USED
    ]
    return [token for _, token in sorted(found, reverse=True)]


def resolve_mask_token(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None = None,
    *,
    configured: str | None = None,
    allow_new: bool = False,
) -> MaskToken:
    """Pick the MASK token (see the module docstring); may add a token and resize ``model``."""
    if configured:
        tid = _single_id(tokenizer, configured)
        if tid is None:
            raise ConfigError(
                f"mask_token {configured!r} is not a token of this tokenizer; choose an existing "
                "single token (e.g. a reserved [unusedN]) or remove the key to let fluid pick one"
            )
        tokenizer.mask_token = configured
        return _embedded(MaskToken(configured, tid, "config"), tokenizer, model)
    if tokenizer.mask_token is not None and tokenizer.mask_token_id is not None:
        mask = MaskToken(tokenizer.mask_token, int(tokenizer.mask_token_id), "tokenizer")
        return _embedded(mask, tokenizer, model)
    for source, candidates in (
        ("reserved", reserved_candidates(tokenizer)),
        ("unused special", unused_special_candidates(tokenizer)),
    ):
        if candidates:
            token = candidates[0]
            tokenizer.mask_token = token
            mask = MaskToken(token, int(tokenizer.convert_tokens_to_ids(token)), source)
            return _embedded(mask, tokenizer, model)
    if not allow_new:
        raise FluidError(
            "the tokenizer has no MASK token and no reserved token to use as one; this model was "
            "not trained with FLUID (Stage I saves its tokenizer with the MASK token), or set "
            "mask_token to an existing token"
        )
    if model is None:
        raise ValueError("adding a MASK token needs the model, to resize its embeddings")
    tokenizer.add_special_tokens({"mask_token": NEW_MASK})
    tid = int(tokenizer.convert_tokens_to_ids(NEW_MASK))
    old = _rows(model)
    if tid >= old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_rows(model, old)
    return MaskToken(NEW_MASK, tid, "added")


def _rows(model: PreTrainedModel) -> int:
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is this process's (empty) partition
    embeddings = model.get_input_embeddings()
    return int(getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0])


def _embedded(
    mask: MaskToken, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None
) -> MaskToken:
    """``mask``, when the model has an embedding row for it (a tokenizer with more tokens than
    the weights have rows belongs to another checkpoint: a ConfigError says so)."""
    if model is not None and mask.id >= _rows(model):
        raise ConfigError(
            f"the MASK token {mask.token!r} has id {mask.id}, past the model's {_rows(model)} "
            f"embedding rows: the tokenizer ({len(tokenizer)} tokens) is not the one these "
            "weights were saved with; use the model's own tokenizer files"
        )
    return mask


def init_new_rows(model: PreTrainedModel, n_old: int) -> None:
    """Rows past ``n_old`` (a new MASK token) in the input and output embeddings start at the mean
    of the old rows, deterministically, so a base + adapter reload rebuilds them exactly."""
    weights = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    out = model.get_output_embeddings()
    if out is not None:
        weights[id(out.weight)] = out.weight
    with torch.no_grad():
        for weight in weights.values():
            if weight.shape[0] > n_old:
                weight[n_old:] = weight[:n_old].mean(dim=0, keepdim=True)


def check_unused(mask: MaskToken, occurs: Callable[[int], bool]) -> None:
    """Raise a DataError when the MASK token id occurs in the training data."""
    if occurs(mask.id):
        raise DataError(
            f"the MASK token {mask.token!r} (id {mask.id}, from {mask.source}) occurs in the "
            "training data; set mask_token to a token that never appears in the data"
        )
