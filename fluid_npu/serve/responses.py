"""The OpenAI response bodies: completions, chat completions, their stream chunks, and usage.

Pure functions from what a request produced to the JSON the OpenAI client parses. ``usage`` carries
the OpenAI counts plus the request's own FLUID figures: ``forwards`` (decode forwards it took part
in) and ``tpf`` (generated tokens per forward). A stream ends with a chunk holding the
``finish_reason`` and ``usage``; with ``stream_options.include_usage`` the OpenAI-style extra chunk
(empty ``choices``, ``usage``) follows; then ``data: [DONE]``.

Log-probabilities come as ``(token id, logprob, [(id, logprob), ...])`` per token and are written
in each endpoint's own format: completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset``, chat's ``content`` list of ``{token, logprob, bytes, top_logprobs}``; a token's
text is its own decoding (special tokens included).
"""

from __future__ import annotations

import json
import time
from typing import Any

DONE = "data: [DONE]\n\n"
LogprobEntry = tuple[int, float, list[tuple[int, float]]]


def usage(prompt_tokens: int, completion_tokens: int, forwards: int) -> dict[str, Any]:
    tpf = completion_tokens / forwards if forwards else 0.0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "forwards": forwards,
        "tpf": round(tpf, 4),
    }


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Shape:
    """The bodies of one request: ``chat`` or plain completion, with its id, time and model."""

    def __init__(self, chat: bool, request_id: str, model: str, tokenizer: Any = None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.tokenizer = tokenizer  # for the text of log-probability tokens
        self.created = int(time.time())
        self.offset = 0  # completions' text_offset of the next token

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
        """The ``logprobs`` of a choice for ``entries`` (None: none were asked for)."""
        if entries is None:
            return None
        if self.chat:

            def item(tok: int, lp: float) -> dict[str, Any]:
                text = self._text(tok)
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

            content = [
                {**item(tok, lp), "top_logprobs": [item(t, p) for t, p in top]}
                for tok, lp, top in entries
            ]
            return {"content": content, "refusal": None}
        texts = [self._text(tok) for tok, _, _ in entries]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        tops = [{self._text(t): p for t, p in top} for _, _, top in entries]
        return {
            "tokens": texts,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": tops if any(tops) else None,
            "text_offset": offsets,
        }

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(
        self,
        text: str,
        finish_reason: str | None,
        use: dict[str, Any],
        logprobs: list[LogprobEntry] | None = None,
    ) -> dict[str, Any]:
        """The non-streamed answer."""
        if self.chat:
            body = self._head("chat.completion")
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        else:
            body = self._head("text_completion")
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self.logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        body["choices"] = [choice]
        body["usage"] = use
        return body

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        use: dict[str, Any] | None = None,
        role: bool = False,
        logprobs: list[LogprobEntry] | None = None,
    ) -> str:
        """One stream event: a text delta (``None``: none), its tokens' log-probabilities, maybe
        the end and the usage."""
        lps = self.logprobs(logprobs)
        if self.chat:
            body = self._head("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}
        else:
            body = self._head("text_completion")
            choice = {
                "index": 0,
                "text": text or "",
                "logprobs": lps,
                "finish_reason": finish_reason,
            }
        body["choices"] = [choice]
        if use is not None:
            body["usage"] = use
        return sse(body)

    def usage_chunk(self, use: dict[str, Any]) -> str:
        """The OpenAI ``include_usage`` chunk: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._head(kind)
        body["choices"] = []
        body["usage"] = use
        return sse(body)
