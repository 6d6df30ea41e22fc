"""What a checkpoint trained with a named chat template carries of it, so that it decodes as it was
trained (LLaMA-Factory's ``fix_special_tokens`` / ``fix_jinja_template`` do the same):

* **the turn's end token as EOS.** A named template whose responses end with their own marker
  (``qwen``: ``<|im_end|>``, ``llama3``: ``<|eot_id|>``, ``openpangu``: ``[unused10]``) trains the
  model to end a response there; a base whose EOS is another token (Qwen2.5 base's
  ``<|endoftext|>``, Llama 3 base's ``<|end_of_text|>``) would then decode past it. The marker
  becomes the tokenizer's EOS token and the first of the generation config's EOS ids (the old
  ones kept), and both are saved with the run: ``fluid generate`` / ``fluid serve`` end on the
  tokenizer's EOS and the generation config's, ``FluidForCausalLM.generate`` on the config's
  (``model/adapters.py`` reads an adapter's own ``generation_config.json``);
* **the template as the tokenizer's chat template**, when the tokenizer has none: ``jinja``
  writes the named template as Jinja, so ``fluid generate --chat``, ``messages`` prompt lines,
  ``fluid serve``'s chat route (and vLLM, transformers' ``apply_chat_template``) render a
  conversation as training wrote it: the same text, BOS included where training had one. Its ids
  are training's wherever the tokenizer does not merge across a seam between pieces training
  encoded apart (in ``qwen``, ``llama3`` and ``openpangu`` most seams are special tokens;
  ``default`` / ``empty`` join plain text, which a merging BPE may cut otherwise — LLaMA-Factory's
  export has the same seams; ``tests/test_template_export.py`` checks the ids with a byte-level
  tokenizer). Training itself never goes through the Jinja: a later run with ``template: auto``
  on such a tokenizer (Stage II) finds the named template again (the Jinja opens with a comment
  naming it, which ``get_template`` reads). The Jinja renders ``system`` (or ``developer``)
  first, then ``user``, ``assistant`` and ``tool`` messages with string contents; the generation
  prompt (the assistant header) is part of a named template's user turn, so it follows every
  user turn, as in training; the tools are listed in the system turn, an assistant's tool calls
  written in the template's call format (``call_formats.py``) and consecutive tool results joined
  into one observation turn, as training writes them. What training never encodes (tool calls in
  ``default`` / ``empty``, a later system message, an assistant message first) is refused, not
  dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from fluid_npu.data.templates import _PLACEHOLDER, EXPORT_MARK, ChatTemplate, Template
from fluid_npu.data.templates import _tokenizer_adds_bos as adds_bos
from fluid_npu.data.tool_turns import RESULTS_JOIN
from fluid_npu.io import write_text_atomic

logger = logging.getLogger(__name__)


def turn_end(template: Template) -> str | None:
    """The marker a named template ends every response with (None: ``{eos}`` or no marker)."""
    if not isinstance(template, ChatTemplate):
        return None
    tail = template.assistant.split("{content}")[-1]
    return tail if tail and "{eos}" not in tail else None


def _literal(fmt: str, content: str) -> str:
    """A format string as Jinja: its text as string expressions (nothing in it is read as Jinja),
    ``{content}`` as the expression ``content``, ``{eos}`` as the tokenizer's EOS token."""
    out = []
    for part in _PLACEHOLDER.split(fmt):
        if part == "{content}":
            out.append("{{ " + content + " }}")
        elif part == "{eos}":
            out.append("{{ eos_token }}")
        elif part:
            out.append("{{ " + json.dumps(part) + " }}")
    return "".join(out)


def _refuse(why: str) -> str:
    return "{{ raise_exception(" + json.dumps(why) + ") }}"


def jinja(template: ChatTemplate, add_bos: bool | None = None) -> str:
    """``template`` as a Jinja chat template rendering the text ``template.encode`` encodes
    (``rendered_ids`` reads it as inference does). ``add_bos``: whether the text starts with the
    BOS token (default: the template's ``bos: always``; a tokenizer that adds one to plain text
    wants it too, so that consumers tokenizing with ``add_special_tokens=False`` get it). The
    tools are listed in the system turn, an assistant's tool calls written as the template writes
    a function-call turn (``call_formats``), consecutive tool results as one observation turn,
    joined as ``formatting: openai`` joins them. What training never encodes — tool calls in a
    template without a call format, a system message that is not the first, an assistant message
    before any user one — is refused by ``raise_exception``, not dropped."""
    add_bos = template.bos == "always" if add_bos is None else add_bos
    bos = "{% if bos_token %}{{ bos_token }}{% endif %}" if add_bos else ""
    name = template.name
    first = "messages and messages[0]['role'] in ('system', 'developer')"
    head = (
        f"{{% if {first} %}}{{% set system = messages[0]['content'] %}}"
        "{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = {json.dumps(template.default_system)} %}}"
        "{% set turns = messages %}{% endif %}"
        "{% if turns and turns[0]['role'] == 'assistant' %}"
        + _refuse(f"the {name} template's conversations start with a user message")
        + "{% endif %}{% set ns = namespace(fns=[], calls='', results='') %}"
    )
    tools = (  # (the functions of OpenAI's {"type": "function", "function": ...} entries)
        "{% if tools %}{% for t in tools %}{% set ns.fns = ns.fns + [t['function'] if "
        "t['type'] == 'function' and t['function'] is defined else t] %}{% endfor %}"
        "{% set listed = 'You have access to the following tools:\\n' + ns.fns | tojson %}"
        "{% set system = system + '\\n\\n' + listed if system else listed %}{% endif %}"
    )
    force = " or true" if template.force_system else ""
    system = f"{{% if system{force} %}}{_literal(template.system, 'system')}{{% endif %}}"
    sep = f"{{% if not loop.first %}}{_literal(template.separator, '')}{{% endif %}}"
    observation = template.observation or template.user
    join = json.dumps(RESULTS_JOIN)
    turns = (
        "{% for m in turns %}{% if m['role'] in ('system', 'developer') %}"
        + _refuse(f"the {name} template takes one system message, the first")
        + "{% elif m['role'] == 'assistant' %}{% if m['tool_calls'] %}"
        + _calls(template)
        + "{% else %}"
        + _literal(template.assistant, "m['content']")
        + "{% endif %}{% elif m['role'] == 'tool' %}"
        + "{% if loop.previtem and loop.previtem['role'] == 'tool' %}"
        + f"{{% set ns.results = ns.results + {join} + m['content'] %}}"
        + "{% else %}{% set ns.results = m['content'] %}{% endif %}"
        + "{% if not (loop.nextitem and loop.nextitem['role'] == 'tool') %}"
        + sep
        + _literal(observation, "ns.results")
        + "{% endif %}{% else %}"
        + sep
        + _literal(template.user, "m['content']")
        + "{% endif %}{% endfor %}"
    )
    mark = EXPORT_MARK.format(name=name)  # (get_template reads the named template from it)
    return mark + bos + head + tools + system + turns


# how each call format writes an assistant's tool calls (call_formats.WRITERS), as Jinja adding
# to ns.calls: the OpenAI call's name and arguments, as json.dumps writes them (tojson)
_CALL = "{'name': c['function']['name'], %s: c['function']['arguments']} | tojson"
_WRITE = {
    "pangu": (
        "{% set ns.calls = '[unused11]' %}{% set ns.fns = [] %}{% for c in m['tool_calls'] %}"
        "{% set ns.fns = ns.fns + [{'name': c['function']['name'], 'arguments': "
        "c['function']['arguments']}] %}{% endfor %}"
        "{% set ns.calls = ns.calls + ns.fns | tojson + '[unused12]' %}"
    ),
    "hermes": (
        "{% set ns.calls = '' %}{% for c in m['tool_calls'] %}{% set ns.calls = ns.calls + "
        "('\\n' if not loop.first else '') + '<tool_call>\\n' + "
        + _CALL % "'arguments'"
        + " + '\\n</tool_call>' %}{% endfor %}"
    ),
    "llama3_json": (
        "{% set ns.calls = '' %}{% for c in m['tool_calls'] %}{% set ns.calls = ns.calls + "
        "('; ' if not loop.first else '') + " + _CALL % "'parameters'" + " %}{% endfor %}"
    ),
}


def _calls(template: ChatTemplate) -> str:
    """The Jinja of an assistant message's tool calls in ``template``: written as its function-call
    turn writes them, after the message's text if it has one, or refused where it has no call
    format."""
    name = template.name
    if template.calls is None:
        return _refuse(f"the chat template exported from the {name} template does not render "
                       "tool calls")  # fmt: skip
    # (text before the calls, which the server's parser returns as the message's content: the
    # answer the model wrote, given back in the next request; training's call turns have none)
    return _WRITE[template.calls] + _literal(template.assistant, "(m['content'] or '') + ns.calls")


SAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "How are you?"}]  # fmt: skip
# ... and one with a tool, a call and its result: a template that ignores tools (openPangu's own)
_CALL = {"id": "call00001", "type": "function",
         "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}  # fmt: skip
TOOL_SAMPLE = (
    [{"role": "user", "content": "1+2?"},
     {"role": "assistant", "content": "", "tool_calls": [_CALL]},
     {"role": "tool", "content": "3", "tool_call_id": "call00001"}],
    [{"type": "function", "function": {"name": "add", "description": "Adds two numbers",
                                       "parameters": {"type": "object"}}}],
)  # fmt: skip
_CONVERSATIONS = (("a plain chat", SAMPLE, None), ("a chat with a tool call", *TOOL_SAMPLE))
TRAINED_TEMPLATE = "trained_chat_template.jinja"  # what a run saves when it is served otherwise


class Difference(NamedTuple):
    """Where a conversation served with the tokenizer's own chat template first differs from the
    text training writes (``served_otherwise``)."""

    conversation: str  # which one: "a plain chat" or "a chat with a tool call"
    at: int  # the character of the served text (a BOS the tokenizer adds when encoding aside)
    before: str  # the text both share just before it (up to 24 characters)
    trained: str  # up to 60 characters from there, as trained
    served: str  # ... and as served


def served_otherwise(template: ChatTemplate, tokenizer: Any) -> Difference | None:
    """Where the tokenizer's own chat template — the one the checkpoint is served with (``fluid
    serve``, ``generate --chat``, vLLM), which a named template does not replace — renders a
    conversation otherwise than ``template`` trains it (Qwen2.5's default system prompt against
    ``qwen``'s, Llama 3.1's dated preamble against ``llama3``'s, openPangu's that drops tools and
    calls), over a plain chat and one with a tool call; None when both render alike. A BOS the
    served template leaves to the tokenizer, which prepends it when encoding, is the BOS training
    writes: the texts are compared after it. A conversation either refuses is no verdict."""
    add_bos = template.bos == "always" or adds_bos(tokenizer)
    bos = tokenizer.bos_token or ""
    encoded_bos = bool(bos) and adds_bos(tokenizer)
    for name, messages, tools in _CONVERSATIONS:
        try:
            trained = tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=jinja(template, add_bos), tokenize=False,
                add_generation_prompt=True,
            )  # fmt: skip
            served = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # (a template that raises on this conversation says nothing here)
            continue
        if encoded_bos and trained.startswith(bos) and not served.startswith(bos):
            trained = trained[len(bos) :]
        if trained == served:
            continue
        pairs = enumerate(zip(trained, served))
        at = next((i for i, (a, b) in pairs if a != b), min(len(trained), len(served)))
        return Difference(
            name, at, served[max(0, at - 24) : at], trained[at : at + 60], served[at : at + 60]
        )
    return None


def warn_if_served_differently(template: ChatTemplate, tokenizer: Any) -> bool:
    """Warn (and return True) when the tokenizer's own chat template serves a conversation
    otherwise than ``template`` trains it (``served_otherwise``): the model would be served a
    format it was not trained on. The run then saves the format it trained as
    ``TRAINED_TEMPLATE`` (``TrainedTemplate``), which the warning names."""
    found = served_otherwise(template, tokenizer)
    if found is None:
        return False
    logger.warning(
        "template %s: the tokenizer's own chat template, which serving renders with, writes %s "
        "otherwise than this template trains it, from character %d of the served text (after "
        "%r): trained %r, served %r; train with template: auto to learn the format it is served "
        "with, or serve with --chat-template OUTPUT_DIR/%s, the format training used, which this "
        "run saves",
        template.name, found.conversation, found.at, found.before, found.trained, found.served,
        TRAINED_TEMPLATE,
    )  # fmt: skip
    return True


class TrainedTemplate:
    """A named template's Jinja, saved beside a checkpoint as ``TRAINED_TEMPLATE`` (a checkpoint
    file: ``save(directory)``) for serving with ``--chat-template``; loading, ``fluid merge`` and
    ``save_pretrained`` read it back (``read``) and carry it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save(self, directory: str | Path) -> None:
        write_text_atomic(Path(directory) / TRAINED_TEMPLATE, [self.text])

    @classmethod
    def read(cls, directory: str | Path, warn: bool = False) -> TrainedTemplate | None:
        """The file a checkpoint in ``directory`` holds (None: none); ``warn``: say so, as the
        checkpoint is about to be prompted with its tokenizer's own chat template."""
        path = Path(directory) / TRAINED_TEMPLATE
        if not path.is_file():
            return None
        if warn:
            logger.warning(
                "%s was trained on another chat format than its tokenizer's own chat template "
                "renders (the run saved it as %s): give chat_template (--chat-template) that file "
                "to prompt it as it was trained",
                directory, path,
            )  # fmt: skip
        return cls(path.read_text(encoding="utf-8"))


def trained_template(template: Template, tokenizer: Any) -> TrainedTemplate | None:
    """What a run with ``template`` saves where the tokenizer's own chat template serves its
    conversations otherwise, which it warns of (``warn_if_served_differently``); None: the same
    format, no template of its own (``fit_tokenizer`` gives it this one), or not a named one."""
    if not isinstance(template, ChatTemplate) or not getattr(tokenizer, "chat_template", None):
        return None
    if not warn_if_served_differently(template, tokenizer):
        return None
    return TrainedTemplate(jinja(template, template.bos == "always" or adds_bos(tokenizer)))


def fit_tokenizer(template: Template, tokenizer: Any, model: Any) -> list[str]:
    """Give ``tokenizer`` (and ``model``'s generation config) what a checkpoint trained with
    ``template`` needs (module docstring); returns what changed, one line each (logged)."""
    changes = []
    end = turn_end(template)
    if end is not None and end != tokenizer.eos_token:
        ids = tokenizer.encode(end, add_special_tokens=False)
        if len(ids) == 1:
            old = tokenizer.eos_token
            tokenizer.eos_token = end
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                given = gen.eos_token_id
                kept = [] if given is None else [given] if isinstance(given, int) else list(given)
                gen.eos_token_id = [ids[0], *(i for i in kept if i != ids[0])]
            changes.append(
                f"EOS token {old!r} -> {end!r} (the {template.name} template ends responses with "
                "it), saved with the tokenizer and generation config"
            )
    if isinstance(template, ChatTemplate) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = jinja(template, template.bos == "always" or adds_bos(tokenizer))
        changes.append(f"chat template: the {template.name} template, saved with the tokenizer")
    for line in changes:
        logger.info("template %s: %s", getattr(template, "name", "?"), line)
    return changes
