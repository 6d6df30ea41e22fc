"""SentencePiece-like tokenizers built offline for the tests: pieces of one character, ``▁`` for a
space, ``<0xNN>`` byte fallback for every character outside the vocabulary.

* ``byte_fallback_tokenizer``: a fast tokenizer with Llama 2 / Mistral's decoder steps (Replace
  ``▁``, ByteFallback, Fuse, Strip one leading space), as transformers converts SentencePiece
  models.
* ``SlowPieces``: a slow (Python) tokenizer over the same pieces, without a ``backend_tokenizer``,
  as openPangu's remote-code ``PanguTokenizer`` is; it decodes as SentencePiece's own decoder does:
  byte runs to UTF-8 (one U+FFFD per bad byte) and every leading space of the text dropped.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?中文你好北京"
_HEX = re.compile(r"<0x([0-9A-F]{2})>")


def pieces_vocab(chars: str = CHARS) -> dict[str, int]:
    """The special tokens, the 256 byte pieces, then one piece per character of ``chars``."""
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    return vocab


def byte_fallback_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """A Llama 2 / Mistral-style fast tokenizer over ``pieces_vocab(chars)``."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    backend = Tokenizer(
        models.BPE(vocab=pieces_vocab(chars), merges=[], unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class SlowPieces(PreTrainedTokenizer):
    """A slow SentencePiece-like tokenizer (see the module's docstring); adds BOS to a text."""

    def __init__(self, chars: str = CHARS, **kwargs: Any) -> None:
        self._vocab = pieces_vocab(chars)
        self._pieces = {i: t for t, i in self._vocab.items()}
        super().__init__(unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self.added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        out: list[str] = []
        for ch in "▁" + text.replace(" ", "▁"):
            out += [ch] if ch in self._vocab else [f"<0x{b:02X}>" for b in ch.encode()]
        return out

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return self._pieces.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        def piece(t: str) -> bytes:
            hexed = _HEX.fullmatch(t)
            return bytes([int(hexed.group(1), 16)]) if hexed else t.replace("▁", " ").encode()

        raw = b"".join(piece(t) for t in tokens)
        return raw.decode("utf-8", errors="replace").lstrip(" ")

    def build_inputs_with_special_tokens(
        self, ids: list[int], pair: list[int] | None = None
    ) -> list[int]:
        return [self.bos_token_id, *ids, *([self.bos_token_id, *pair] if pair else [])]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()


class SpacedSpecials(SlowPieces):
    """``SlowPieces`` whose text of special tokens depends on their surroundings, as Llama /
    InternLM-style remote tokenizers (openPangu's among them) write them: a space before the run
    that precedes each group of special tokens."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run, after_special = "", [], False
        for token in tokens:
            if token in self.all_special_tokens:
                space = "" if after_special else " "
                out += space + super().convert_tokens_to_string(run) + token
                run, after_special = [], True
            else:
                run.append(token)
                after_special = False
        return out + super().convert_tokens_to_string(run)
