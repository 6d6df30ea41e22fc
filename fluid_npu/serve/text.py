"""Text in and out of the server: prompts to token ids, token ids to streamed text with ``stop``.

* ``completion_ids`` encodes a completion prompt exactly as ``fluid generate --prompt`` does
  (``fluid_npu.sampling.prompts.encode_prompt``), so a served completion equals the offline one;
  token-id prompts are used as given (checked against the vocabulary).
* ``chat_ids`` renders the messages with the tokenizer's chat template (``--chat-template``
  replaces it; a request may bring its own with ``--trust-request-chat-template``), the assistant
  turn opened or the last assistant message continued, with the template's variables
  (``chat_template_kwargs`` over ``--default-chat-template-kwargs``), and encodes the text as
  training and ``fluid generate --chat`` do (the tokenizer's BOS first where the template does not
  write it: ``templates.rendered_ids``).
* committed token ids become text deltas through ``fluid_npu.sampling.detok.Detokenizer`` (shared
  with ``fluid generate``, so a served text equals the offline one).
* ``TokenText`` is one token's own bytes and text for log-probabilities: a token may hold part of
  a UTF-8 character (byte-level BPE, SentencePiece byte fallback), so its bytes come from its
  vocabulary spelling, not from decoding it alone (which gives U+FFFD).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fluid_npu.errors import FluidError
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.rendering import ChatRender


def completion_ids(tokenizer: Any, prompt: str | list[int], add_special: bool = True) -> list[int]:
    """Token ids of a completion prompt (a text's with the tokenizer's special tokens unless
    ``add_special`` is false); a bad one (a text that encodes to no tokens too: ``""`` without a
    BOS, never whitespace, as vLLM reads it) is an ``APIError`` naming ``prompt``."""
    from fluid_npu.sampling.prompts import encode_prompt

    row = {"input_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    try:
        return encode_prompt(tokenizer, row, where="prompt", add_special_tokens=add_special).ids
    except FluidError as exc:
        raise APIError(str(exc).removeprefix("prompt: "), param="prompt") from None
    except Exception as exc:  # the tokenizer's own (e.g. a lone UTF-16 surrogate in the text)
        raise APIError(f"the tokenizer cannot encode the prompt: {exc}", param="prompt") from None


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a text (``/tokenize``); with special tokens, those of ``completion_ids``."""
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    except Exception as exc:  # the tokenizer's own (e.g. a lone UTF-16 surrogate in the text)
        raise APIError(f"the tokenizer cannot encode the prompt: {exc}", param="prompt") from None
    return [int(t) for t in ids]


def tokenizer_info(tokenizer: Any, max_len: int) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's class, special tokens, chat template and the
    server's context (what lm-evaluation-harness's remote tokenizer reads)."""

    def spelled(name: str) -> str | None:
        token = getattr(tokenizer, name, None)
        return None if token is None else str(token)

    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": spelled("bos_token"),
        "eos_token": spelled("eos_token"),
        "pad_token": spelled("pad_token"),
        "unk_token": spelled("unk_token"),
        "chat_template": template if isinstance(template, str) else None,
        "model_max_length": max_len,
        "vocab_size": len(tokenizer),
    }


def chat_ids(
    tokenizer: Any,
    messages: list[dict[str, str]],
    render: ChatRender | None = None,
    default_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template (or the request's),
    as ``render`` says (default: the assistant turn opened); the template's variables are
    ``default_kwargs`` (``--default-chat-template-kwargs``) with the request's over them;
    ``tools``: the functions the request offers (the template lists them). The
    same ids as training, ``fluid eval --chat`` and ``fluid generate`` give the conversation."""
    render = render or ChatRender()
    if render.template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(
            "this model's tokenizer has no chat template; start the server with --chat-template, "
            "or use /v1/completions",
            param="messages",
        )
    from fluid_npu.sampling.prompts import ToolsIgnored, chat_template_ids

    param = "messages" if render.template is None else "chat_template"  # whose fault
    try:
        ids = chat_template_ids(
            tokenizer,
            messages,
            render.add_generation_prompt,
            continue_final_message=render.continue_final_message,
            template_kwargs={**(default_kwargs or {}), **render.template_kwargs},
            template=render.template,
            tools=tools,
        )
    except ToolsIgnored as exc:
        raise APIError(str(exc), param="tools") from None
    except Exception as exc:  # the template's own error (e.g. a role it does not allow)
        raise APIError(f"the chat template rejected the messages: {exc}", param=param) from None
    if not ids:
        raise APIError("the chat template rendered these messages as no text", param=param)
    return ids


_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet inverted: each byte is spelled by one printable character (itself
    where printable, else the next code point from 256 on, in byte order)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _decoder_parts(tokenizer: Any) -> list[dict[str, Any]]:
    """A fast tokenizer's decoder steps (a sequence's parts); empty for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    spec = json.loads(backend.to_str()).get("decoder") or {}
    return spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]


def _byte_pieces(tokenizer: Any) -> bool:
    """Whether the vocabulary spells bytes as SentencePiece's byte fallback does (``<0x00>`` …
    ``<0xFF>``), for a tokenizer without a fast decoder to say so."""
    try:  # (membership: some tokenizers raise on an unknown piece, others answer a default id)
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary to list: no pieces to go by
        return False
    return all(piece in vocab for piece in ("<0x00>", "<0xE4>", "<0xFF>"))


class TokenText:
    """One token's bytes and printable text (log-probabilities' ``token`` / ``bytes``), cached.

    Byte-level tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) spell each byte with one character;
    SentencePiece byte fallback (Llama 2, Mistral, Gemma; openPangu's slow ``PanguTokenizer``,
    known by its ``<0xNN>`` pieces) has ``<0xNN>`` tokens and ``▁`` for a space; other tokenizers'
    tokens are their decoded text. A token whose bytes are not UTF-8 on
    their own is written ``bytes:\\xNN…`` (as the OpenAI API writes such tokens).
    ``strip_start``: how many leading spaces the decoder drops from a text (SentencePiece's ``▁``
    before the first word), so character offsets in the returned text can leave them out.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        parts = _decoder_parts(tokenizer)
        kinds = {str(p.get("type")) for p in parts}
        self.byte_level = "ByteLevel" in kinds
        # a slow SentencePiece tokenizer has no decoder steps to read: its byte pieces tell, and
        # its decoder drops the leading space as the fast conversion's Strip(start=1) does
        slow_pieces = not parts and _byte_pieces(tokenizer)
        self.byte_fallback = "ByteFallback" in kinds or slow_pieces
        self.strip_start = int(slow_pieces) + sum(
            int(p.get("start", 0))
            for p in parts
            if p.get("type") == "Strip" and p.get("content") == " "
        )
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._alphabet = _byte_alphabet() if self.byte_level else {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def bytes(self, token: int) -> bytes:
        return self._entry(token)[1]

    def text(self, token: int) -> str:
        return self._entry(token)[0]

    def _entry(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            raw = self._bytes(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token] = (text, raw)
        return hit

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if token in self.special or not isinstance(piece, str):
            return self.tokenizer.decode([token]).encode("utf-8")
        if self.byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if self.byte_fallback:
            hexed = _HEX_BYTE.fullmatch(piece)
            return bytes([int(hexed.group(1), 16)]) if hexed else piece.replace("▁", " ").encode()
        return self.tokenizer.decode([token]).encode("utf-8")
