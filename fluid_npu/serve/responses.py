"""The OpenAI response bodies: completions, chat completions, their stream chunks, and usage.

Pure functions from what a request produced to the JSON the OpenAI client parses. ``usage`` carries
the OpenAI counts plus the request's own FLUID figures: ``forwards`` (decode forwards it took part
in) and ``tpf`` (generated tokens per forward). A choice's end carries ``finish_reason`` and vLLM's
``stop_reason`` (the stop string or stop token id that ended it, else null). A stream ends with a
chunk holding them, and the usage once: with ``stream_options.include_usage`` in the OpenAI-style
extra chunk (empty ``choices``) that follows it, else in that last chunk itself (a client that adds
up the usage of every chunk counts it once either way); then ``data: [DONE]``. With vLLM's
``continuous_usage_stats`` every chunk carries its choice's usage so far as well.

Log-probabilities come as ``(token id, logprob, [(id, logprob), ...])`` per token and are written
in each endpoint's own format: completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset`` (``top_logprobs``: the token itself, then its ``logprobs`` best alternatives —
OpenAI's "up to logprobs + 1", as vLLM writes them; with ``logprobs: 0`` the token alone), chat's
``content`` list of ``{token, logprob, bytes, top_logprobs}`` (the alternatives alone). A token's
text and bytes are its own (``text.TokenText``: part of a multi-byte character is ``bytes:\\xNN``,
and the bytes of consecutive tokens join into the text); ``text_offset`` counts characters of the
returned text (special tokens, which it leaves out, take none — unless the request's
``skip_special_tokens`` is false). A log-probability that is not finite is written as ``-9999.0``
(JSON has no infinities). With ``echo`` the prompt's tokens come first, the first of them with a
null log-probability (nothing predicts it), as vLLM writes it.

A completions request with several prompts has one ``Shape`` per prompt (its choice's ``index``,
its own text offsets), all under one id.
"""

from __future__ import annotations

import codecs
import json
import time
from typing import Any

from fluid_npu.sampling.rules import finite_logprob as _finite
from fluid_npu.serve.text import TokenText

DONE = "data: [DONE]\n\n"
LogprobEntry = tuple[int, float | None, list[tuple[int, float]] | None]  # None: a prompt's first


def usage(
    prompt_tokens: int, completion_tokens: int, forwards: int, cached_tokens: int = 0
) -> dict[str, Any]:
    """OpenAI's usage (``prompt_tokens_details.cached_tokens``: prompt tokens the engine found in
    a slot's cache, as the OpenAI API and vLLM report them), plus the request's decode forwards
    and TPF."""
    tpf = completion_tokens / forwards if forwards else 0.0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "forwards": forwards,
        "tpf": round(tpf, 4),
    }


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Shape:
    """The bodies of one request: ``chat`` or plain completion, with its id, time and model."""

    def __init__(
        self,
        chat: bool,
        request_id: str,
        model: str,
        tokens: TokenText | None = None,
        index: int = 0,
        created: int | None = None,
        skip_special: bool = True,
        return_ids: bool = False,
        as_ids: bool = False,
    ) -> None:
        self.chat = chat
        self.skip_special = skip_special  # whether the returned text leaves special tokens out
        self.return_ids = return_ids  # vLLM's return_token_ids: the prompt's and output's ids
        self.prompt_ids: list[int] = []  # (set by the app when return_ids)
        self._prompt_sent = False  # a stream carries them in the choice's first chunk
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids: logprobs' tokens "token_id:N"
        self.prompt_top: int | None = None  # vLLM's prompt_logprobs: alternatives (None: off)
        self.id = request_id
        self.model = model
        self.tokens = tokens  # the text and bytes of log-probability tokens
        self.index = index  # the choice's
        self.created = int(time.time()) if created is None else created
        self.offset = 0  # completions' text_offset of the next token
        self._chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.strip = tokens.strip_start if tokens is not None else 0  # leading spaces dropped
        # echo: after this many (prompt) entries the completion's start at this text offset, with
        # ``strip`` then as the completion alone has it
        self.echo: tuple[int, int, int] | None = None
        self._entries = 0  # entries written so far
        self.reasoning = False  # chat with a reasoning parser: messages carry ``reasoning``
        self.show_reasoning = True  # (vLLM's include_reasoning: false leaves it out, null)

    def echoing(self, prompt_entries: int, prompt_text: str) -> None:
        """The text returned starts with ``prompt_text``, whose log-probabilities (when asked for)
        are the first ``prompt_entries`` entries: offsets count them from 0, and the completion's
        from the end of that text."""
        self.echo = (prompt_entries, len(prompt_text), self.strip)
        self.strip = self.tokens.strip_start if self.tokens is not None else 0

    def logprobs(self, entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
        """The ``logprobs`` of a choice for ``entries`` (None: none were asked for)."""
        if entries is None:
            return None
        words = self.tokens
        if words is None:
            raise ValueError("log-probabilities need the tokenizer's TokenText")
        name = (lambda t: f"token_id:{t}") if self.as_ids else words.text  # (bytes stay the text's)
        if self.chat:

            def item(tok: int, lp: float) -> dict[str, Any]:
                raw = words.bytes(tok)
                return {"token": name(tok), "logprob": _finite(lp), "bytes": list(raw)}

            content = [
                {**item(tok, lp), "top_logprobs": [item(t, p) for t, p in top]}
                for tok, lp, top in entries
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for tok, _, _ in entries:
            if self.echo is not None and self._entries == self.echo[0]:  # the completion starts
                self.offset, self.strip = self.echo[1], self.echo[2]
            self._entries += 1
            offsets.append(self.offset)
            if not self.skip_special or tok not in words.special:  # (the text's characters)
                piece = self._chars.decode(words.bytes(tok))
                while self.strip and piece:  # the spaces the decoder drops at the start
                    self.strip = self.strip - 1 if piece[0] == " " else 0
                    piece = piece[1:] if piece[0] == " " else piece
                self.offset += len(piece)
        # the token itself, then its alternatives (OpenAI's "up to logprobs + 1", as vLLM)
        tops = [None if top is None or lp is None else
                {name(tok): _finite(lp), **{name(t): _finite(p) for t, p in top}}
                for tok, lp, top in entries]  # fmt: skip
        return {
            "tokens": [name(tok) for tok, _, _ in entries],
            "token_logprobs": [_finite(lp) for _, lp, _ in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def prompt_logprobs(self, lps: list[Any] | None) -> list[Any] | None:
        """vLLM's ``prompt_logprobs`` from the engine's (logprob, alternatives, rank) per prompt
        token after the first: null for the first, then ``{id: {logprob, rank, decoded_token}}``
        for the token and its ``prompt_top`` best alternatives (ranks 1, 2, ...)."""
        if lps is None or self.prompt_top is None or self.tokens is None:
            return None
        words = self.tokens

        def entry(tok: int, lp: float, rank: int) -> dict[str, Any]:
            return {"logprob": _finite(lp), "rank": rank, "decoded_token": words.text(tok)}

        out: list[Any] = [None]
        for tok, (lp, top, rank) in zip(self.prompt_ids[1:], lps):
            one = {tok: entry(tok, lp, rank)}
            for k, (t, v) in enumerate(top if self.prompt_top < 0 else top[: self.prompt_top], 1):
                one.setdefault(t, entry(t, v, k))
            out.append({str(t): e for t, e in one.items()})
        return out

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(
        self,
        text: str,
        finish_reason: str | None,
        logprobs: list[LogprobEntry] | None = None,
        reasoning: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
        token_ids: list[int] | None = None,
        prompt_lps: list[Any] | None = None,
        stop_reason: int | str | None = None,
    ) -> dict[str, Any]:
        """This shape's choice of a non-streamed answer (``stop_reason``: vLLM's, the stop string
        or token id that ended it; ``reasoning``: the reasoning parser's
        part, written as vLLM writes it: ``reasoning`` and ``reasoning_content``, null when the
        output had none, and a null ``content`` when only reasoning came; ``tool_calls``: the
        calls parsed out of the answer, ``tools.py``, with a null ``content`` when none came
        before them)."""
        out: dict[str, Any] = {"index": self.index}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if self.reasoning:
                thought = reasoning or None
                if thought is not None and not text:
                    out["message"]["content"] = None
                thought = thought if self.show_reasoning else None
                out["message"].update(reasoning=thought, reasoning_content=thought)
            if tool_calls:
                out["message"]["tool_calls"] = tool_calls
                out["message"]["content"] = text or None
        else:
            out["text"] = text
        out["logprobs"] = self.logprobs(logprobs)
        out["finish_reason"] = finish_reason
        out["stop_reason"] = stop_reason
        if self.prompt_top is not None and not self.chat:  # (a chat's: beside the choices)
            out["prompt_logprobs"] = self.prompt_logprobs(prompt_lps)
        if self.return_ids:  # vLLM's return_token_ids (a chat's prompt ids: beside the choices)
            if not self.chat:
                out["prompt_token_ids"] = list(self.prompt_ids)
            out["token_ids"] = list(token_ids or [])
        return out

    def _token_ids(self, body: dict[str, Any], choice: dict[str, Any], ids: Any) -> None:
        """A stream's ``return_token_ids``: the ids this chunk delivers in ``choice``; the
        prompt's in the choice's first chunk, in the choice (completions) or the body (chat)."""
        if not self.return_ids:
            return
        if not self._prompt_sent:
            (body if self.chat else choice)["prompt_token_ids"] = list(self.prompt_ids)
            self._prompt_sent = True
        choice["token_ids"] = list(ids or [])

    def answer(
        self, choices: list[dict[str, Any]], use: dict[str, Any], prompt_lps: Any = None
    ) -> dict[str, Any]:
        """The non-streamed answer holding ``choices`` (by ``index``); a chat's prompt token ids
        and ``prompt_lps`` beside them (its choices share their prompt)."""
        body = self._head("chat.completion" if self.chat else "text_completion")
        if self.chat and self.prompt_top is not None:
            body["prompt_logprobs"] = self.prompt_logprobs(prompt_lps)
        if self.chat and self.return_ids:
            body["prompt_token_ids"] = list(self.prompt_ids)
        body["choices"] = sorted(choices, key=lambda c: c["index"])
        body["usage"] = use
        return body

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        use: dict[str, Any] | None = None,
        role: bool = False,
        logprobs: list[LogprobEntry] | None = None,
        reasoning: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
        token_ids: list[int] | None = None,
        stop_reason: int | str | None = None,
    ) -> str:
        """One stream event: a text delta (``None``: none), its tokens' log-probabilities, maybe
        the end (vLLM's ``stop_reason`` beside ``finish_reason``) and the usage; chat with a
        reasoning parser: the reasoning's delta as ``delta.reasoning`` /
        ``delta.reasoning_content`` (and no empty ``content`` beside it);
        ``tool_calls``: the answer's calls, each whole with its ``index``."""
        lps = self.logprobs(logprobs)
        if self.chat:
            body = self._head("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            reasoning = reasoning if self.show_reasoning else ""
            if reasoning:
                delta.update(reasoning=reasoning, reasoning_content=reasoning)
            if tool_calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            if text is not None and (text or not (reasoning or tool_calls)):
                delta["content"] = text
            choice = {
                "index": self.index,
                "delta": delta,
                "logprobs": lps,
                "finish_reason": finish_reason,
            }
        else:
            body = self._head("text_completion")
            choice = {
                "index": self.index,
                "text": text or "",
                "logprobs": lps,
                "finish_reason": finish_reason,
            }
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        self._token_ids(body, choice, token_ids)
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
