"""The tokenizer's own Jinja chat template as a training template (``template: auto``), and the
choice of template (``get_template``: a named one, the tokenizer's, or ``default``).

A conversation reaches ``apply_chat_template`` as the messages ``fluid serve`` would hand it
(``tool_turns.py``: tool calls and results structured); the loss spans come from ``{% generation
%}`` markers where the template has them, else from rendering each response turn's prompt (with
the generation prompt, as the server does) against the whole conversation. A template that
renders a turn otherwise once later turns follow (Qwen3's empty ``<think>`` block on the last
assistant turn) gives one example per response turn (``encode_examples``); where even the turn's
own prompt renders otherwise inside it (Hermes 3, Mistral v0.3), that example is the served
prompt followed by the turn's own tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fluid_npu.data.templates import (
    AUTO,
    RESPONSE_ROLES,
    TEMPLATES,
    Conversation,
    Encoded,
    RowError,
    Template,
    _tokenizer_adds_bos,
    rendered_ids,
)
from fluid_npu.data.tool_turns import hf_messages, hf_tools
from fluid_npu.errors import ConfigError

logger = logging.getLogger(__name__)

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TokenizerChatTemplate:
    """The tokenizer's Jinja chat template, with response spans located robustly.

    With ``{% generation %}`` markers, ``return_assistant_tokens_mask`` gives the spans directly.
    Otherwise each response turn ``k`` is rendered twice — the conversation before it with the
    generation prompt, and up to and including it — and the span is the token difference; trailing
    whitespace-only tokens (the newline after ``<|im_end|>`` in ChatML) are left to the prompt.
    Where a partial rendering is not a token prefix of the full one, the conversation becomes one
    example per response turn (``encode_examples``); a turn whose text cannot be located even
    then is a ``RowError`` (the row is bad, ``skip_bad_rows`` skips it).

    BOS: when the tokenizer prepends BOS to plain text (openPangu) but the template does not write
    it, it is prepended, as ``tokenizer(apply_chat_template(..., tokenize=False))`` would at
    inference; a template that writes BOS itself (Llama 3) does not get a second one.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> None:
        source = tokenizer.chat_template
        if isinstance(source, dict):
            source = source.get("default") or next(iter(source.values()))
        self.has_generation_markers = bool(_GENERATION_MARKER.search(str(source)))
        self.add_bos = _tokenizer_adds_bos(tokenizer)
        self.template_kwargs = dict(template_kwargs or {})  # the template's variables
        self._calls_written: bool | None = None  # whether it writes tool_calls (_writes_calls)
        self._rendered: dict[str, bool] = {}  # what of a conversation it writes (_check_rendered)

    def __getstate__(self) -> dict[str, Any]:
        """Without what it learned while encoding (``_calls_written``, ``_rendered``): the
        ``datasets`` cache keys on the pickled template, which must not change during a run."""
        return {**self.__dict__, "_calls_written": None, "_rendered": {}}

    def _bos(self, tokenizer: Any, text: str) -> list[int]:
        if self.add_bos and not text.startswith(tokenizer.bos_token):
            return [tokenizer.bos_token_id]
        return []

    def _ids(self, tokenizer: Any, messages: list[dict], tools: Any, generation: bool) -> list[int]:
        text = _refused_as_row(
            tokenizer.apply_chat_template,
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation,
            **self.template_kwargs,
        )
        return rendered_ids(tokenizer, text, self.add_bos)

    def _prepared(self, tokenizer: Any, conversation: Conversation) -> tuple[list, list, Any]:
        """The template's messages for ``conversation`` (``tool_turns``), where each turn ended
        among them, and its tools."""
        (messages, places), tools = hf_messages(conversation), hf_tools(conversation.tools)
        if any("tool_calls" in m for m in messages) and not self._writes_calls(
            tokenizer, messages, tools
        ):  # the calls as text, as the template would otherwise drop them
            messages, places = hf_messages(conversation, structured=False)
        self._check_rendered(tokenizer, messages, tools)
        return messages, places, tools

    def _check_rendered(self, tokenizer: Any, messages: list[dict], tools: Any) -> None:
        """Refuse a conversation whose tools or tool results the template leaves out (Qwen2's
        plain ChatML writes no tools; a template of user and assistant turns only writes no tool
        messages): trained on it, the model learns calls and answers whose grounds it never saw.
        A system prompt it leaves out is named in a warning: the server leaves it out too, so the
        examples stay as served. Each asked once, of the first conversation that has it."""
        roles = {m["role"] for m in messages}
        for kind, role, here in (("the tools", None, bool(tools)),
                                 ("the tool results", "tool", "tool" in roles),
                                 ("the system prompt", "system", "system" in roles)):  # fmt: skip
            if not here:
                continue
            if kind not in self._rendered:  # (asked once: the stand-ins are built only then)
                if role is None:
                    one, two = (messages, tools), (messages, None)
                else:
                    one, two = (([{**m, "content": c} if m["role"] == role else m
                                  for m in messages], tools) for c in ("0", "1"))  # fmt: skip
                self._rendered[kind] = self._differ(tokenizer, one, two)
                if not self._rendered[kind] and kind == "the system prompt":
                    logger.warning(
                        "the tokenizer's chat template does not write a system message: the rows' "
                        "system prompts are left out of training (as the server leaves them out "
                        "of prompts); set `template:` to one of %s to train with them",
                        sorted(TEMPLATES),
                    )
            if not self._rendered[kind] and kind != "the system prompt":
                raise ConfigError(
                    f"the tokenizer's chat template does not write {kind} (a conversation "
                    "renders the same without them), so the model would learn calls and answers "
                    "whose grounds it never sees; set `template:` to one of "
                    f"{sorted(TEMPLATES)} (they write tools and results), or train on data "
                    "without them"
                )

    def _differ(
        self, tokenizer: Any, one: tuple[list[dict], Any], two: tuple[list[dict], Any]
    ) -> bool:
        """Whether two versions of a conversation (messages, tools) render otherwise: whole, or
        as the prompt of its last response (Mistral v0.3 writes the system prompt and the tools
        into the last user turn only when that turn ends what is rendered). A version the
        template refuses counts as written (it reads what changed)."""
        last = max((i for i, m in enumerate(one[0]) if m["role"] == "assistant"), default=None)
        try:
            for upto, generation in ((None, False), (last, True)):
                if generation and last is None:
                    continue
                a = self._ids(tokenizer, one[0][:upto], one[1], generation)
                if a != self._ids(tokenizer, two[0][:upto], two[1], generation):
                    return True
        except RowError:
            return True
        return False

    def encode(self, tokenizer: Any, conversation: Conversation) -> Encoded:
        messages, places, tools = self._prepared(tokenizer, conversation)
        if self.has_generation_markers:
            out = _refused_as_row(
                tokenizer.apply_chat_template,
                messages, tools=tools, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, **self.template_kwargs,
            )  # fmt: skip
            text = _refused_as_row(
                tokenizer.apply_chat_template,
                messages, tools=tools, tokenize=False, **self.template_kwargs,
            )  # fmt: skip
            bos = self._bos(tokenizer, text)
            spans = [(s + len(bos), e + len(bos)) for s, e in _runs(out["assistant_masks"])]
            return Encoded(bos + list(out["input_ids"]), spans)
        return self._by_prefixes(tokenizer, conversation, messages, places, tools, split=False)[0]

    def encode_examples(self, tokenizer: Any, conversation: Conversation) -> list[Encoded]:
        """The conversation as training examples: one (``encode``), or one per response turn —
        the conversation up to it, its loss on that turn alone — where the template renders a turn
        otherwise once later turns follow (Qwen3's writes an empty ``<think>`` block on the last
        assistant turn only), so each turn trains as the server renders its prompt."""
        if self.has_generation_markers:
            return [self.encode(tokenizer, conversation)]
        messages, places, tools = self._prepared(tokenizer, conversation)
        return self._by_prefixes(tokenizer, conversation, messages, places, tools, split=True)

    def _by_prefixes(
        self,
        tokenizer: Any,
        conversation: Conversation,
        messages: list[dict[str, Any]],
        places: list[int],
        tools: Any,
        split: bool,
    ) -> list[Encoded]:
        """The response spans by rendering each turn's prompt and the conversation up to it (the
        class docstring); one example, or one per turn (``split``) where a turn renders otherwise
        inside the whole conversation."""
        full = self._ids(tokenizer, messages, tools, generation=False)
        turns = []  # (the conversation up to the turn, the turn's span in it)
        whole = True  # every turn's rendering is a prefix of the whole conversation's
        for i, (role, _) in enumerate(conversation.messages):
            if role not in RESPONSE_ROLES:
                continue
            k = places[i]
            prompt = self._ids(tokenizer, messages[:k], tools, generation=True)
            upto = self._ids(tokenizer, messages[: k + 1], tools, generation=False)
            start = len(prompt)
            if upto[:start] != prompt:  # the turn's own prompt renders otherwise inside it
                upto = prompt + self._turn_alone(tokenizer, messages, k, tools, prompt, upto, i)
            previous_end = turns[-1][1][1] if turns else 0
            whole &= full[: len(upto)] == upto and start >= previous_end
            end = max(len(upto), start)
            while end > start and not tokenizer.decode(upto[end - 1 : end]).strip():
                end -= 1
            turns.append((upto, (start, end)))
        if whole:
            return [Encoded(full, [span for _, span in turns])]
        if not split:
            raise ConfigError(
                "the tokenizer's chat template does not render conversations turn by turn (a "
                "turn renders otherwise once later turns follow: Qwen3's last assistant turn "
                "gets an empty <think> block), so one sequence cannot hold every response as "
                "served; train through encode_examples (one example per response turn, as "
                "fluid train does), or set `template:` to one of "
                f"{sorted(TEMPLATES)} and serve with that format (--chat-template)"
            )
        return [Encoded(upto, [span]) for upto, span in turns]

    def _turn_alone(
        self,
        tokenizer: Any,
        messages: list[dict],
        k: int,
        tools: Any,
        prompt: list[int],
        upto: list[int],
        i: int,
    ) -> list[int]:
        """The tokens of turn ``messages[k]`` where the template renders its prompt otherwise
        once the turn follows (Hermes 3 ends a last tool result without the newline it writes
        inside a conversation; Mistral v0.3 writes the system prompt and the tools into the last
        user turn only), to follow the prompt the server renders for it (``prompt``).

        The turn's content starts where the conversation up to it (``upto``) first differs from
        the same conversation with stand-in contents (several: a first token may merge with what
        the template writes before the content, as ``" " + content`` does in SentencePiece); the
        turn itself starts where the tokens before that end as ``prompt`` ends (the longest
        common ending, at most ``_BACK`` tokens back: Mistral's ``[/INST]`` before the space it
        writes), less the header ``prompt`` ends with if the template wrote it there too. A
        ``RowError`` when the turn's own text (its content, its calls' names) is not in it."""
        starts = []
        for stand_in in _STAND_INS:
            try:
                other = [*messages[:k], {"role": messages[k]["role"], "content": stand_in}]
                starts.append(_common(upto, self._ids(tokenizer, other, tools, False)))
            except RowError:  # (a template that refuses such a turn)
                continue
        turn: list[int] = []
        if starts:
            at = min(starts)
            ends = [(_common(prompt[::-1], upto[: at - back][::-1]), -back)
                    for back in range(min(at, _BACK) + 1)]  # fmt: skip
            turn = upto[at + max(ends)[1] :]
        history = self._ids(tokenizer, messages[:k], tools, generation=False)
        header = prompt[_common(prompt, history) :]  # what add_generation_prompt writes
        if header and turn[: len(header)] == header:
            turn = turn[len(header) :]
        text = tokenizer.decode(turn)
        own = [(messages[k].get("content") or "").strip()] + [
            c["function"]["name"] for c in messages[k].get("tool_calls") or ()
        ]
        if not turn or any(part not in text for part in own):
            raise RowError(
                f"the tokenizer's chat template renders response turn {i} without the prompt it "
                "renders for that turn before it (add_generation_prompt), and the turn's text "
                "cannot be found in it either, so its response tokens cannot be located; set "
                f"`template:` to one of {sorted(TEMPLATES)} and serve with that format "
                "(--chat-template)"
            )
        return turn

    def _writes_calls(self, tokenizer: Any, messages: list[dict], tools: Any) -> bool:
        """Whether the template writes an assistant turn's ``tool_calls`` (ChatML-only templates,
        Qwen2's, do not: they render the turn as if it held nothing); asked once."""
        if self._calls_written is None:
            bare = [
                {"role": m["role"], "content": m["content"]} if "tool_calls" in m else m
                for m in messages
            ]
            with_calls = self._ids(tokenizer, messages, tools, generation=False)
            try:
                without: list[int] | None = self._ids(tokenizer, bare, tools, False)
            except RowError:  # (a template that needs the calls there writes them)
                without = None
            self._calls_written = with_calls != without
        return self._calls_written

    def encode_prompt(self, tokenizer: Any, conversation: Conversation) -> list[int]:
        """The ids of a conversation ending with a user turn, with the generation prompt."""
        messages, _, tools = self._prepared(tokenizer, conversation)
        return self._ids(tokenizer, messages, tools, generation=True)


_STAND_INS = ("", "a", "0")  # contents a turn is rendered with to find where its own starts
_BACK = 8  # how far before that the turn may start (text the template writes before a content)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _refused_as_row(render: Any, *args: Any, **kwargs: Any) -> Any:
    """``render(*args, **kwargs)``; the template's own exception (Llama 3.1's one call per turn,
    Mistral's alternating roles, a template that needs tools iterating over none) becomes a
    ``RowError`` naming it: the row cannot be rendered."""
    try:
        return render(*args, **kwargs)
    except Exception as exc:  # (whatever the template's code raised)
        raise RowError(
            f"the tokenizer's chat template refused this conversation: {exc} ({type(exc).__name__})"
        ) from None


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of ones in a 0/1 mask."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


_EXPORTED = re.compile(r"\{# fluid-npu: the (\w+) template #\}")


def exported_template(tokenizer: Any) -> str | None:
    """The named template a run exported as ``tokenizer``'s chat template, or None."""
    saved = getattr(tokenizer, "chat_template", None)
    named = _EXPORTED.match(saved) if isinstance(saved, str) else None
    return named.group(1) if named is not None else None


def get_template(
    name: str | None, tokenizer: Any, template_kwargs: dict[str, Any] | None = None
) -> Template:
    """The template called ``name``; None or ``auto`` picks the tokenizer's chat template if any
    (one a run exported from a named template: that named template, as the run trained on it),
    rendered with ``template_kwargs`` as its variables (``enable_thinking``).

    Raises ``ConfigError`` for an unknown name, listing the valid ones. Warns when a named
    template's markers are not single tokens of ``tokenizer`` (the wrong template for the model),
    and when ``template_kwargs`` are given to a template that has no variables.
    """
    template = _chosen(name, tokenizer, template_kwargs)
    if template_kwargs and not isinstance(template, TokenizerChatTemplate):
        logger.warning(
            "%s apply to the tokenizer's own chat template only; the %r template has no such "
            "variables, so they change nothing",
            ", ".join(sorted(template_kwargs)),
            template.name,
        )
    return template


def _chosen(name: str | None, tokenizer: Any, template_kwargs: dict[str, Any] | None) -> Template:
    if name is None or name == AUTO:
        saved = getattr(tokenizer, "chat_template", None)
        named = exported_template(tokenizer)
        if named is not None and named in TEMPLATES:  # a run saved it: train as it did
            return TEMPLATES[named]
        if saved:
            return TokenizerChatTemplate(tokenizer, template_kwargs)
        logger.warning(
            "the tokenizer has no chat template and the recipe names none: using the `default` "
            "template (Human: / Assistant: turns); set template (e.g. empty) to choose"
        )
        return TEMPLATES["default"]
    if name not in TEMPLATES:
        valid = ", ".join([AUTO, *sorted(TEMPLATES)])
        raise ConfigError(
            f"unknown template {name!r}; valid templates: {valid} — or leave template out to "
            "train on the tokenizer's own chat template"
        )
    template = TEMPLATES[name]
    missing = template.missing_tokens(tokenizer)
    if missing:
        logger.warning(
            "template %r: %s are not single tokens of this tokenizer; is it the model's template?",
            name,
            ", ".join(missing),
        )
    return template
