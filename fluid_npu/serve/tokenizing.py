"""vLLM's tokenizer routes on ``fluid serve``: ``POST /tokenize`` (a text, or a conversation
rendered as the chat route renders it), ``POST /detokenize`` and ``GET /tokenizer_info`` —
lm-evaluation-harness finds them and then needs no local tokenizer. Their work runs on the app's
tokenizing thread (a 4 MiB text takes seconds), beside the event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from fluid_npu.serve import protocol
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.http import read_json
from fluid_npu.serve.rendering import ChatRender
from fluid_npu.serve.text import chat_ids, text_ids, tokenizer_info


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
        req, conversation = protocol.parse_tokenize(await read_json(request))
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
        req = protocol.parse_detokenize(await read_json(request))
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
