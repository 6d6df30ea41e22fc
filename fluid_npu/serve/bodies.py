"""What every ``fluid serve`` request body shares: strict pydantic models (an unknown field is an
error), a chat message and its text parts, ``stream_options``, and ``validate`` — a body checked
by its model, or one OpenAI-style ``APIError`` naming the offending field and, for an unknown one,
the fields the server takes there. ``protocol.py`` builds the completion and chat bodies on them;
``responses_request.py`` and ``tokenizing.py`` validate theirs here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fluid_npu.serve.errors import APIError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None  # null: false, unless continuous_usage_stats asks for it
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks: accepted, none added
    continuous_usage_stats: bool | None = None  # vLLM's: every chunk carries the usage so far


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null: an assistant's (reasoning / calls alone)
    name: str | None = None  # a participant's name: handed to the chat template, as vLLM does
    reasoning: str | None = None  # an assistant turn's, as --reasoning-parser returned it
    reasoning_content: str | None = None  # (its older name, which clients still send back)
    tool_calls: list[Any] | None = None  # an assistant turn's (checked in tooluse.py)
    tool_call_id: str | None = None  # a tool message's: the call it answers
    # what the openai client's message objects carry back as null (its helpers' ``parsed``
    # too) and a message's ``annotations``: output, not conversation, so left out (OUTPUT_ONLY)
    refusal: None = None
    audio: None = None
    function_call: None = None
    parsed: None = None
    annotations: list[Any] | None = None


OUTPUT_ONLY = {"refusal", "audio", "function_call", "parsed", "annotations"}  # of a Message


def _param(loc: tuple[Any, ...]) -> str:
    """``messages[0].content`` from pydantic's location (union member tags left out)."""
    out = str(loc[0])
    if out == "messages":
        for part in loc[1:]:
            if isinstance(part, int):
                out += f"[{part}]"
            else:  # a message's field (or an unknown key): what follows are union member tags
                out += f".{part}"
                break
    elif out == "stream_options" and len(loc) > 1:
        out += f".{loc[1]}"
    return out


def _nested(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model of a nested object an unknown field sits in (None: the body's)."""
    return {"messages": Message, "stream_options": StreamOptions}.get(str(loc[0]))


def validate(
    model: type[BaseModel],
    body: Any,
    where: Callable[[tuple[Any, ...]], str] = _param,
    nested: Callable[[tuple[Any, ...]], type[BaseModel] | None] = _nested,
) -> Any:
    """``body`` checked by ``model``, else one ``APIError`` naming the field (``where``: its
    name from pydantic's location; ``nested``: the model an unknown field's neighbours are of)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"]
        param = where(loc) if loc else None
        if len(loc) > 2 and loc[0] == "messages" and loc[2] == "content":
            raise APIError(
                f"{param}: a message's content is a string or a list of text parts "
                '[{"type": "text", "text": "..."}] (this server reads text only)',
                param=param,
            ) from None
        if err["type"] == "extra_forbidden":
            inner = nested(loc) if len(loc) > 1 else None
            fields = (inner or model).model_fields
            hidden = OUTPUT_ONLY if inner is Message else set()  # (a message's output fields)
            known = ", ".join(sorted({f.alias or k for k, f in fields.items()} - hidden))
            raise APIError(
                f"unknown field {param!r}; this server accepts {known}", param=param
            ) from None
        if err["type"] == "missing":
            raise APIError(f"{param!r} is required", param=param) from None
        raise APIError(f"{param}: {err['msg']}", param=param) from None
