"""Prompt files and prompt encoding for ``fluid generate`` and ``fluid bench sampler``.

``read_jsonl`` reads any JSONL file line by line (errors name the file and line). A line of a
prompts file holds ``"prompt"`` (text, tokenized as the tokenizer does by default, or through its
chat template with ``chat=True``), ``"input_ids"`` (a list of token ids, used as given) or
``"messages"`` (a conversation in the OpenAI chat format — ``role``, ``content`` as text or text
parts, optional ``name``, an assistant's ``tool_calls`` and a ``tool`` message's ``tool_call_id``;
with ``"tools"`` beside it the functions offered, ``tooluse.py`` — rendered by the tokenizer's chat
template with the assistant turn opened, as ``fluid serve``'s chat route and vLLM's ``LLM.chat``
do; system prompts and earlier turns included). Bad lines are ``DataError``s naming the file and
line. Output JSONL is written atomically (a temporary file beside the target, then a rename), so a
crash never leaves half a file behind.
``quiet_loading`` keeps transformers' progress bars off stderr while the commands load a model.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fluid_npu.data.tooluse import check_tool_calls, check_tools
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.io import utf8_lines
from fluid_npu.sampling.inputs import PromptError


@dataclass
class Prompt:
    text: str | None  # None when the line gave input_ids
    ids: list[int]


def read_jsonl(path: str | Path, what: str = "prompts") -> list[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSONL file of ``what``.

    A missing file, a line that is not JSON and a file without rows are ``DataError``s naming the
    file (and line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file {str(p)!r} does not exist; pass a JSONL file")
    rows = []
    for n, line in utf8_lines(p):  # (a byte that is not UTF-8: a DataError naming the line)
        if n == 1:
            line = line.removeprefix("\ufeff")  # (a byte-order mark is not a row)
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
    if not rows:
        raise DataError(f"{what} file {p} holds no {what}")
    return rows


PROMPT_KEYS = ("prompt", "input_ids", "messages")  # what a prompts line may hold


def read_prompt_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a prompts JSONL file (each row with ``prompt``, ``input_ids`` or
    ``messages``): errors about a row name its line, blank lines counted."""
    rows = []
    for n, row in read_jsonl(path, "prompts"):
        if not isinstance(row, dict) or not any(k in row for k in PROMPT_KEYS):
            raise DataError(
                f'{path}:{n}: each line needs "prompt" (text), "input_ids" (ids) or "messages" '
                "(a chat conversation)"
            )
        given = [k for k in PROMPT_KEYS if k in row and (k != "prompt" or "input_ids" not in row)]
        if len(given) > 1:  # (a "prompt" beside "input_ids" is that line's label)
            raise DataError(f"{path}:{n}: give one of {' / '.join(given)} per line, not both")
        if "messages" in row:  # checked here, before any model is loaded
            chat_messages(row["messages"], f"{path}:{n}")
        if row.get("tools") is not None:  # (null: none, as the server reads it)
            if "messages" not in row:
                raise DataError(f'{path}:{n}: "tools" go with "messages" (a conversation)')
            check_tools(row["tools"], f"{path}:{n}: tools")
        rows.append((n, row))
    return rows


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompts JSONL file (each with ``prompt``, ``input_ids`` or ``messages``)."""
    return [row for _, row in read_prompt_lines(path)]


def empty_prompt(row: dict[str, Any]) -> bool:
    """Whether a row's prompt is empty before any tokenizer reads it: ``input_ids`` (``prompt``
    is then a label) or ``messages`` that are ``[]``. A text is empty only where it encodes to no
    tokens (``encode_prompt``: whitespace is a prompt, and ``""`` one with a tokenizer that adds a
    BOS), as ``fluid serve`` and vLLM read it."""
    if "input_ids" in row:
        return row["input_ids"] == []
    return "messages" in row and row["messages"] == []


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    row: dict[str, Any],
    *,
    chat: bool = False,
    where: str = "",
    template_kwargs: dict[str, Any] | None = None,
    add_special_tokens: bool = True,
) -> Prompt:
    """Token ids of one prompt row; a prompt of no tokens (``input_ids: []``, a text that encodes
    to none) is a ``PromptError``. ``template_kwargs``: the chat template's variables, for
    ``--chat`` and ``messages`` rows; ``add_special_tokens``: a plain text's (its BOS)."""
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise DataError(f"{where}: input_ids must be a list of non-negative integers")
        if not ids:
            raise PromptError(f"{where}: the prompt is empty (input_ids = [])")
        if max(ids) >= len(tokenizer):
            raise DataError(
                f"{where}: token id {max(ids)} is outside the vocabulary ({len(tokenizer)})"
            )
        return Prompt(row.get("prompt"), list(ids))
    if "messages" in row:
        messages = chat_messages(row["messages"], where)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f'{where}: a "messages" line needs a tokenizer with a chat template')
        tools = None if row.get("tools") is None else check_tools(row["tools"], f"{where}: tools")
        return Prompt(None, _rendered(tokenizer, messages, where, template_kwargs, tools))
    text = row["prompt"]
    if not isinstance(text, str):
        raise DataError(f"{where}: prompt must be a string")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--chat needs a tokenizer with a chat template; this one has none")
        user = [{"role": "user", "content": text}]
        return Prompt(text, _rendered(tokenizer, user, where, template_kwargs))
    encoded = tokenizer(text) if add_special_tokens else tokenizer(text, add_special_tokens=False)
    ids = [int(t) for t in encoded["input_ids"]]
    if not ids:  # ("" without a BOS; whitespace is text, as vLLM reads it)
        raise PromptError(f"{where}: the prompt is empty: it encodes to no tokens; give some text")
    return Prompt(text, ids)


# what fluid serve's chat route takes ("tool": a tool call's result, answering its tool_call_id)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# an assistant turn's reasoning, as a reasoning parser returned it (vLLM's name and the older
# one): handed to the chat template under both names (Qwen3's reads reasoning_content)
REASONING_KEYS = ("reasoning", "reasoning_content")


def join_text_parts(content: str | list[dict[str, Any]]) -> str:
    """A message's text: its string, or its text parts one per line (vLLM's join)."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def chat_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A ``messages`` line as the chat template takes it: each message's ``role``, its text (a
    string, or ``{"type": "text", "text": ...}`` parts joined one per line) and its ``name`` where
    given — what ``fluid serve``'s chat route hands the template for the same messages."""
    if not isinstance(value, list) or not value:
        raise PromptError(f'{where}: "messages" must be a non-empty list of chat messages')
    out = []
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            given = isinstance(m, dict) and "role" in m
            has = f'has role {m["role"]!r}; a "role" is' if given else 'needs a "role":'
            raise DataError(f"{at} {has} one of {', '.join(CHAT_ROLES)}")
        unknown = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id",
                            *REASONING_KEYS}  # fmt: skip
        if unknown:
            raise DataError(
                f"{at} has {sorted(unknown)}; a message holds role, content, name (an "
                "assistant's: reasoning, tool_calls; a tool's: tool_call_id)"
            )
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # (OpenAI's null: reasoning / calls alone)
            content = ""
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        )
        if not isinstance(content, str) and not parts_ok:
            raise DataError(
                f'{at}: "content" must be text or a list of text parts '
                '({"type": "text", "text": ...}); only text is read'
            )
        message = {"role": m["role"], "content": join_text_parts(content)}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise DataError(f'{at}: "name" must be text')
            message["name"] = m["name"]
        given = [m[k] for k in REASONING_KEYS if m.get(k) is not None]
        if given:
            if m["role"] != "assistant" or not all(isinstance(r, str) for r in given):
                raise DataError(f"{at}: only an assistant message carries a reasoning, as text")
            if len(set(given)) > 1:
                raise DataError(f"{at}: reasoning and reasoning_content disagree; give one")
            message.update(dict.fromkeys(REASONING_KEYS, given[0]))  # templates read either
        _tool_fields(m, message, at)
        out.append(message)
    return out


def _tool_fields(m: dict[str, Any], message: dict[str, Any], at: str) -> None:
    """An assistant message's ``tool_calls`` and a tool message's ``tool_call_id``, checked into
    ``message`` (``tooluse.py``)."""
    if m.get("tool_calls") is not None:
        if m["role"] != "assistant":
            raise DataError(f"{at}: only an assistant message carries tool_calls")
        message["tool_calls"] = check_tool_calls(m["tool_calls"], f"{at}.tool_calls")
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
            raise DataError(f'{at}: a tool message needs "tool_call_id", the call it answers')
        message["tool_call_id"] = m["tool_call_id"]
    elif m.get("tool_call_id") is not None:
        raise DataError(f"{at}: only a tool message carries tool_call_id")


def _rendered(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    where: str,
    kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    try:
        return chat_template_ids(tokenizer, messages, template_kwargs=kwargs, tools=tools)
    except ToolsIgnored as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # the template's own (e.g. roles that must alternate)
        raise DataError(f"{where}: the chat template rejected the messages: {exc}") from None


def chat_template_ids(
    tokenizer: Any,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (or ``template``), the
    assistant turn opened (``add_generation_prompt``) or the last (assistant) message left open to
    be continued (``continue_final_message``); ``template_kwargs`` are the template's own variables
    (``enable_thinking``, ...); ``tools``: the functions the conversation offers
    (``tooluse.check_tools``). Encoded as training and ``fluid eval`` encode a chat
    (``templates.rendered_ids``: the tokenizer's BOS first where it adds one and the template does
    not write it): what ``--chat``, ``messages`` lines and the server's chat route decode from."""
    from fluid_npu.data.templates import rendered_ids

    def render(offered: list[dict[str, Any]] | None) -> str:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            tools=offered,
            **(template_kwargs or {}),
        )

    text = render(tools)
    known = str(template if template is not None else tokenizer.chat_template)
    if tools and known not in _USES_TOOLS:  # (each template rendered a second time once)
        if text == _or_none(render):  # the model would never see them
            raise ToolsIgnored(
                "the chat template does not use tools (it renders the conversation the same "
                "with them and without): give a chat template that lists them "
                "(--chat-template), or leave tools out"
            )
        if len(_USES_TOOLS) >= 64:  # (requests' own templates: a bound, not a cache to keep)
            _USES_TOOLS.clear()
        _USES_TOOLS.add(known)
    return rendered_ids(tokenizer, text)


_USES_TOOLS: set[str] = set()  # chat templates seen to render the tools they are given


def _or_none(render: Any) -> str | None:
    """The conversation rendered without tools; None where the template refuses that (it needs
    them: they are used)."""
    try:
        return render(None)
    except Exception:  # the template's own refusal
        return None


class ToolsIgnored(DataError):
    """A conversation offers tools its chat template does not render."""


def reserved_template_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """The names in ``kwargs`` that are ``apply_chat_template``'s own arguments (``tokenize``,
    ``chat_template``, ``add_generation_prompt``, ...) or the conversation, not template
    variables: a chat-template keyword may not set them."""
    return sorted(set(kwargs) & _rendering_arguments()) if kwargs else []


@functools.cache
def _rendering_arguments() -> frozenset[str]:
    """``apply_chat_template``'s and ``render_jinja_template``'s (what it calls) parameters."""
    import inspect

    from transformers.utils import chat_template_utils

    own = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    render = getattr(chat_template_utils, "render_jinja_template", None)
    if render is not None:
        own |= set(inspect.signature(render).parameters)
    return frozenset((own - {"self", "kwargs"}) | {"messages"})


def read_chat_template(value: str, flag: str = "--chat-template") -> str:
    """The Jinja chat template ``value`` names: a file's text, or ``value`` itself when it is a
    template (it holds ``{``, ``}`` or a newline), as vLLM's ``--chat-template`` reads it. A path
    that does not exist, an empty template and one Jinja cannot compile are ``ConfigError``s
    naming ``flag`` (checked before any model is loaded)."""
    path = Path(value)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # (a template too long for a file name)
        is_file = is_dir = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{flag} {value}: cannot be read ({exc})") from None
        with contextlib.suppress(ValueError):  # (a template is not JSON)
            if isinstance(json.loads(text), dict):
                raise ConfigError(
                    f"{flag} {value} is a JSON file (a tokenizer's config?), not a Jinja "
                    "template: give a .jinja file or the template itself"
                )
    elif is_dir:
        raise ConfigError(f"{flag} {value} is a directory; give a template file or the template")
    elif any(c in value for c in "{}\n"):
        text = value
    else:
        raise ConfigError(
            f"{flag} {value!r}: no such file, and not a Jinja template; give a template file "
            "or the template itself"
        )
    if not text.strip():
        raise ConfigError(f"{flag}: the chat template is empty")
    check_template_syntax(text, flag)
    return text


def check_template_syntax(text: str, what: str) -> None:
    """A ``ConfigError`` naming ``what`` when Jinja cannot compile ``text`` as transformers does
    (its sandbox and extensions, ``{% generation %}`` included)."""
    import jinja2
    from transformers.utils import chat_template_utils

    try:
        chat_template_utils._compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"{what}: not a valid Jinja chat template ({exc.message}, line {exc.lineno})"
        ) from None


def parse_template_kwargs(
    value: str | None, flag: str = "--chat-template-kwargs"
) -> dict[str, Any]:
    """A JSON object of chat-template variables (``'{"enable_thinking": false}'``); not JSON,
    not an object, or a name of ``apply_chat_template``'s own arguments is a ``ConfigError``."""
    if value is None:
        return {}
    example = "'{\"enable_thinking\": false}'"
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag} is not JSON ({exc.msg}); give an object like {example}"
        ) from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{flag} must be a JSON object like {example}")
    reserved = reserved_template_kwargs(kwargs)
    if reserved:
        raise ConfigError(
            f"{flag} sets {', '.join(reserved)}: arguments of the rendering itself, not template "
            "variables; leave them out"
        )
    return kwargs


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a left-padded batch."""
    width = max(len(r) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL through a temporary file renamed into place."""
    from fluid_npu.io import write_text_atomic

    return write_text_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading progress bars: stderr keeps to our own lines (an error is one line)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
