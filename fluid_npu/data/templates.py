"""Chat templates: a conversation becomes token ids plus the spans of tokens that carry loss.

Stage I / Stage II train on supervised examples exactly like LLaMA-Factory SFT: prompt tokens
(system, user turns, role headers) carry no loss, assistant responses do, including the turn-end /
EOS token the model must learn to emit so the sampler knows when to stop. This module owns that
split, for two kinds of template:

* named templates (``default``, ``empty``, ``qwen``, ``llama3``, ``openpangu``): a handful of
  format strings, rendered piece by piece so the response spans are known by construction; a
  function-call turn written as the template's model writes calls (``calls``: the format of the
  tool-call parser that reads them back, ``call_formats.py``);
* the tokenizer's own Jinja chat template (``template: auto`` or unset, when the tokenizer has one):
  rendered with ``apply_chat_template``; the spans come from ``{% generation %}`` markers when the
  template has them, otherwise from rendering each turn incrementally and diffing token prefixes
  (``auto_template.py``).

Both return an ``Encoded`` (ids + response spans) and can encode a bare prompt for inference.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from fluid_npu.data.call_formats import function_calls, tools_text, written_calls
from fluid_npu.errors import DataError

logger = logging.getLogger(__name__)

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
PROMPT_ROLES = (USER, OBSERVATION)  # roles at even positions: no loss
RESPONSE_ROLES = (ASSISTANT, FUNCTION)  # roles at odd positions: the loss-carrying turns
AUTO = "auto"


class RowError(Exception):
    """One bad row; the message says what is wrong with it."""


@dataclass
class Conversation:
    """A validated conversation: ``messages`` alternate prompt-side / response-side roles.

    ``messages`` is a list of ``(role, content)``; roles at even positions are ``user`` or
    ``observation`` (a tool result), at odd positions ``assistant`` or ``function`` (a tool call).
    A training conversation ends with a response-side message; an inference prompt ends with a
    prompt-side one. ``tools`` is a JSON text describing the available tools, or None.
    """

    messages: list[tuple[str, str]]
    system: str | None = None
    tools: str | None = None

    def __post_init__(self) -> None:
        for i, (role, _) in enumerate(self.messages):
            allowed = PROMPT_ROLES if i % 2 == 0 else RESPONSE_ROLES
            if role not in allowed:
                raise ValueError(f"message {i} has role {role!r}; expected one of {allowed}")


@dataclass
class Encoded:
    """Token ids of a rendered conversation and the ``[start, end)`` spans of each response."""

    input_ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)


class Template(Protocol):
    """What the tokenization step needs from a template."""

    name: str

    def encode(self, tokenizer: Any, conversation: Conversation) -> Encoded: ...

    def encode_prompt(self, tokenizer: Any, conversation: Conversation) -> list[int]: ...

    def encode_examples(self, tokenizer: Any, conversation: Conversation) -> list[Encoded]: ...


# ---------------------------------------------------------------------------------------------
# Named templates
# ---------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"(\{content\}|\{eos\})")


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` prepends its BOS token when encoding plain text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def rendered_ids(tokenizer: Any, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of a chat template's rendered ``text``, as the model's own inference reads it
    (``tokenizer(apply_chat_template(..., tokenize=False))``, openPangu's model card): BOS first
    when the tokenizer prepends it to plain text and the template did not write it (one BOS
    either way), the text itself without special tokens added. Training, ``fluid eval``,
    ``fluid generate`` and ``fluid serve`` all encode a chat this way. ``add_bos``: the
    tokenizer's ``_tokenizer_adds_bos`` when already known."""
    if add_bos is None:
        add_bos = _tokenizer_adds_bos(tokenizer)
    written = text.lstrip().startswith(tokenizer.bos_token) if add_bos else True
    bos = [] if written else [tokenizer.bos_token_id]
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format given by format strings with ``{content}`` and ``{eos}`` placeholders.

    ``user`` ends with the assistant header (the generation prompt); ``assistant`` is exactly the
    loss-carrying part (the content and its end marker); ``separator`` sits between a response and
    the next prompt turn and carries no loss. ``bos`` is ``always`` (prepend the tokenizer's BOS
    token when it has one) or ``tokenizer`` (prepend it only when the tokenizer itself would).
    ``special_tokens`` are the markers that must be single tokens of the tokenizer (warned if not).
    """

    name: str
    user: str
    assistant: str
    system: str = "{content}"
    observation: str | None = None
    separator: str = ""
    default_system: str = ""
    force_system: bool = False
    bos: str = "tokenizer"
    special_tokens: tuple[str, ...] = ()
    calls: str | None = None  # how a function-call turn is written (call_formats.WRITERS)

    def _pieces(self, tokenizer: Any, fmt: str, content: str) -> list[int]:
        ids: list[int] = []
        text = ""
        for part in _PLACEHOLDER.split(fmt):
            if part == "{eos}":
                if text:
                    ids += tokenizer.encode(text, add_special_tokens=False)
                    text = ""
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
            else:
                text += content if part == "{content}" else part
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _head(self, tokenizer: Any, conversation: Conversation) -> list[int]:
        ids: list[int] = []
        add_bos = self.bos == "always" or _tokenizer_adds_bos(tokenizer)
        if add_bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        system = conversation.system if conversation.system is not None else self.default_system
        try:
            listed = tools_text(conversation.tools) if conversation.tools else None
        except DataError as exc:
            raise RowError(str(exc)) from None
        if listed is not None:
            tools = f"You have access to the following tools:\n{listed}"
            system = f"{system}\n\n{tools}" if system else tools
        if system or self.force_system:
            ids += self._pieces(tokenizer, self.system, system)
        return ids

    def _turn(self, tokenizer: Any, index: int, role: str, content: str) -> list[int]:
        if role == FUNCTION and self.calls:  # as the model writes them for its tool-call parser
            try:
                calls = function_calls(content, f"function-call turn {index}")
            except DataError as exc:
                raise RowError(str(exc)) from None
            content = written_calls(self.calls, calls)
        if role in RESPONSE_ROLES:
            return self._pieces(tokenizer, self.assistant, content)
        fmt = self.observation if role == OBSERVATION and self.observation else self.user
        sep = self.separator if index > 0 else ""
        return self._pieces(tokenizer, sep + fmt, content)

    def encode(self, tokenizer: Any, conversation: Conversation) -> Encoded:
        ids = self._head(tokenizer, conversation)
        spans = []
        for i, (role, content) in enumerate(conversation.messages):
            piece = self._turn(tokenizer, i, role, content)
            if role in RESPONSE_ROLES:
                spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        return Encoded(ids, spans)

    def encode_prompt(self, tokenizer: Any, conversation: Conversation) -> list[int]:
        """The ids of a conversation ending with a user turn, up to the assistant header."""
        return self.encode(tokenizer, conversation).input_ids

    def encode_examples(self, tokenizer: Any, conversation: Conversation) -> list[Encoded]:
        """The training examples of a conversation: one (the pieces render turn by turn)."""
        return [self.encode(tokenizer, conversation)]

    def missing_tokens(self, tokenizer: Any) -> list[str]:
        """The markers of this template that ``tokenizer`` would split into several tokens."""
        return [
            t
            for t in self.special_tokens
            if len(tokenizer.encode(t, add_special_tokens=False)) != 1
        ]


# The ChatML layout of Qwen, with Qwen2's default system prompt (LLaMA-Factory's ``qwen`` template
# now has Qwen2.5's, "You are Qwen, created by Alibaba Cloud. ..."; to train on exactly the format
# a Qwen2.5 / Qwen3 checkpoint is served with, leave ``template`` out and train on the tokenizer's
# own chat template); calls written in <tool_call> blocks, as --tool-call-parser hermes reads them.
_QWEN = ChatTemplate(
    name="qwen",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    separator="\n",
    default_system="You are a helpful assistant.",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    calls="hermes",
)

# Llama 3 / 3.1 instruct: header tokens, <|eot_id|> ends every turn, BOS <|begin_of_text|> first.
_LLAMA3 = ChatTemplate(
    name="llama3",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant="{content}<|eot_id|>",
    observation=(
        "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    bos="always",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    calls="llama3_json",
)

# openPangu-Embedded (7B V1.1 / 1B). Based on the ``chat_template`` of its tokenizer_config.json
# (as mirrored in the public repository wujing215/OpenPangu7B-on-NVIDIA): every turn is
# "[unused9]<role>：<content>[unused10]" with the roles 系统 (system), 用户 (user),
# 助手 (assistant), 工具 (tool result) and 方法 (function); a system turn is always rendered, empty
# when the conversation has none ("[unused9]系统：[unused10]"); the generation prompt is
# "[unused9]助手：". The colon is the full-width "：" (U+FF1A). The same tokenizer_config sets
# eos_token "[unused10]" and add_bos_token true, so the sequence starts with <s>, as the
# vLLM-Ascend prompt examples show ("<s>[unused9]系统：[unused10][unused9]用户：...").
_OPENPANGU = ChatTemplate(
    name="openpangu",
    system="[unused9]系统：{content}[unused10]",
    user="[unused9]用户：{content}[unused10][unused9]助手：",
    assistant="{content}[unused10]",
    observation="[unused9]工具：{content}[unused10][unused9]助手：",
    force_system=True,
    bos="always",
    special_tokens=("[unused9]", "[unused10]"),
    calls="pangu",  # vllm-ascend's parser: [unused11][{"name", "arguments"}, ...][unused12]
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        # A plain-text dialogue for base models without a chat format.
        ChatTemplate(
            name="default",
            system="System: {content}\n",
            user="Human: {content}\nAssistant: ",
            assistant="{content}{eos}",
            separator="\n",
        ),
        # Raw concatenation: prompt and response texts joined, EOS after each response.
        ChatTemplate(name="empty", user="{content}", assistant="{content}{eos}"),
        _QWEN,
        _LLAMA3,
        _OPENPANGU,
    )
}


# how a chat template exported from a named one (``template_export.jinja``) starts
EXPORT_MARK = "{{# fluid-npu: the {name} template #}}"
