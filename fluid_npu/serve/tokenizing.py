"""vLLM's tokenizer routes on ``fluid serve`` and their request bodies: ``POST /tokenize`` (a
text, or a conversation rendered as the chat route renders it), ``POST /detokenize`` and
``GET /tokenizer_info`` — lm-evaluation-harness finds them and then needs no local tokenizer.
Their work runs on the app's tokenizing thread (a 4 MiB text takes seconds), beside the event
loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from fluid_npu.serve.errors import APIError
from fluid_npu.serve.http import read_parsed
from fluid_npu.serve.protocol import (
    ChatRequest,
    Message,
    Sampling,
    _Rendering,
    _Strict,
    check_chat_lists,
    validate,
)
from fluid_npu.serve.rendering import ChatRender, chat_render, conversation
from fluid_npu.serve.text import chat_ids, text_ids, tokenizer_info
from fluid_npu.serve.tools import ToolSetting, tool_setting


class TokenizeBody(_Rendering):
    """vLLM's ``/tokenize``: a text (``prompt``) or a conversation (``messages``, rendered as the
    chat route renders it)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None  # text: True (BOS as a completion gets it); chat: False
    return_token_strs: bool | None = None
    tools: list[Any] | None = None  # messages: the functions offered, rendered as chat does


class DetokenizeBody(_Strict):
    """vLLM's ``/detokenize``."""

    model: str | None = None
    tokens: list[int]


RENDER_FIELDS = tuple(_Rendering.model_fields)


def parse_tokenize(body: Any) -> tuple[TokenizeBody, ChatRequest | None]:
    """A checked ``/tokenize`` body (exactly one of ``prompt`` and ``messages``) and, with
    messages, the conversation as the chat route takes it (its ``messages`` and ``render``)."""
    check_chat_lists(body)  # (the chat route's bounds)
    req: TokenizeBody = validate(TokenizeBody, body)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give either prompt (a text) or messages (a conversation)", param="prompt")
    if req.messages is not None and not req.messages:
        raise APIError("messages is empty; give at least one message", param="messages")
    if req.prompt is not None:
        given = [name for name in (*RENDER_FIELDS, "tools") if getattr(req, name) is not None]
        if given:
            raise APIError(f"{given[0]} applies to messages, not to a prompt", param=given[0])
        return req, None
    if req.add_special_tokens:
        raise APIError(
            "add_special_tokens must be false or absent with messages: the chat template "
            "places the special tokens itself",
            param="add_special_tokens",
        )
    messages = conversation(req.messages)
    tools = ToolSetting(tool_setting(req.tools, "none", None, None).tools)  # rendered, not parsed
    render = chat_render(req, messages)
    return req, ChatRequest(messages, Sampling(max_tokens=None), render, tools)


def parse_detokenize(body: Any) -> DetokenizeBody:
    """A checked ``/detokenize`` body: non-negative token ids."""
    req: DetokenizeBody = validate(DetokenizeBody, body)
    if any(t < 0 for t in req.tokens):
        raise APIError("tokens must be non-negative token ids", param="tokens")
    return req


def tokenizer_routes(
    app: FastAPI,
    tokenizer: Any,
    max_len: int,
    template_kwargs: dict[str, Any],
    tokenizing: Executor,
    authorize: Callable[[Request], None],
    check_model: Callable[[str | None], None],
    check_template: Callable[[ChatRender], None],
) -> None:
    """Add the three routes to ``app`` (the app's key, model and template checks apply)."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        authorize(request)
        req, conversation = await read_parsed(request, parse_tokenize)
        check_model(req.model)
        if conversation is not None:
            check_template(conversation.render)

        def answer() -> bytes:  # on the tokenizing thread, the JSON too (4 MiB of text: seconds)
            if conversation is not None:  # as the chat route renders them
                ids = chat_ids(tokenizer, conversation.messages, conversation.render,
                               template_kwargs, conversation.tools.tools)  # fmt: skip
            else:
                ids = text_ids(tokenizer, req.prompt or "", req.add_special_tokens is not False)
            strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
            body = {"count": len(ids), "max_model_len": max_len, "tokens": ids,
                    "token_strs": strs}  # fmt: skip
            return json.dumps(body, ensure_ascii=False).encode()

        loop = asyncio.get_running_loop()
        content = await loop.run_in_executor(tokenizing, answer)
        return Response(content, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        req = await read_parsed(request, parse_detokenize)
        check_model(req.model)
        if req.tokens and max(req.tokens) >= len(tokenizer):
            raise APIError(
                f"token id {max(req.tokens)} is outside the vocabulary ({len(tokenizer)})",
                param="tokens",
            )
        loop = asyncio.get_running_loop()
        return {"prompt": await loop.run_in_executor(tokenizing, tokenizer.decode, req.tokens)}

    @app.get("/tokenizer_info")
    async def info(request: Request) -> dict[str, Any]:
        authorize(request)
        return tokenizer_info(tokenizer, max_len)
