"""How a chat request's conversation becomes a prompt: its messages as the chat template gets
them (``conversation``, the rule ``fluid generate`` applies to a ``messages`` line) and vLLM's
rendering fields checked (``chat_render``): ``chat_template_kwargs`` (the template's variables, over
``--default-chat-template-kwargs``; not the rendering's own arguments), ``add_generation_prompt``,
``continue_final_message`` (the last message, the assistant's, left open; not with
``add_generation_prompt: true``) and ``chat_template`` (a request's own, which the app takes only
with ``--trust-request-chat-template``). ``text.chat_ids`` renders a ``ChatRender``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluid_npu.errors import ConfigError, DataError
from fluid_npu.sampling.prompts import (
    chat_messages,
    check_template_syntax,
    reserved_template_kwargs,
)
from fluid_npu.serve.errors import APIError


@dataclass
class ChatRender:
    """How a request's conversation is rendered (``text.chat_ids``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # over the server's defaults
    template: str | None = None  # the request's own chat template; None: the server's


def conversation(given: list[Any]) -> list[dict[str, str]]:
    """The messages as the chat template gets them (``prompts.chat_messages``, the rule
    ``fluid generate`` applies to a ``messages`` line); a message it refuses is a 400."""
    try:
        dumped = [m.model_dump(exclude_none=True, exclude={"annotations"}) for m in given]
        # (the other output-only fields are null by their type: exclude_none leaves them out)
        return chat_messages(dumped, "messages")
    except DataError as exc:
        raise APIError(str(exc).removeprefix("messages: "), param="messages") from None


def chat_render(req: Any, messages: list[dict[str, str]]) -> ChatRender:
    """A request's rendering fields, checked: ``continue_final_message`` needs the last message
    to be the assistant's and ``add_generation_prompt`` not true (vLLM's and transformers' rule),
    ``chat_template_kwargs`` may not set the rendering's own arguments, and a request's
    ``chat_template`` must compile."""
    cont = bool(req.continue_final_message)
    if cont and req.add_generation_prompt:
        raise APIError(
            "continue_final_message and add_generation_prompt cannot both be true: send "
            "add_generation_prompt: false to continue the last message",
            param="continue_final_message",
        )
    if cont and messages[-1]["role"] != "assistant":
        raise APIError(
            "continue_final_message continues the last message, which must be the assistant's "
            f"(it is the {messages[-1]['role']}'s)",
            param="continue_final_message",
        )
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = reserved_template_kwargs(kwargs)
    if reserved:
        raise APIError(
            f"chat_template_kwargs sets {', '.join(reserved)}: arguments of the rendering itself, "
            "not template variables (add_generation_prompt, continue_final_message and "
            "chat_template are request fields)",
            param="chat_template_kwargs",
        )
    if req.chat_template is not None:
        if not req.chat_template.strip():
            raise APIError("chat_template is empty", param="chat_template")
        try:
            check_template_syntax(req.chat_template, "chat_template")
        except ConfigError as exc:
            raise APIError(str(exc), param="chat_template") from None
    return ChatRender(
        add_generation_prompt=not cont and req.add_generation_prompt is not False,
        continue_final_message=cont,
        template_kwargs=kwargs,
        template=req.chat_template,
    )
