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
  writes the named template as Jinja, so ``fluid generate --chat``, ``messages`` prompt lines and
  ``fluid serve``'s chat route render a conversation exactly as training encoded it
  (``tests/test_template_export.py`` compares the ids). The Jinja renders ``system``, ``user``,
  ``assistant`` and ``tool`` messages with string contents; the generation prompt (the assistant
  header) is part of a named template's user turn, so it follows every user turn, as in training.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fluid_npu.data.templates import _PLACEHOLDER, ChatTemplate, Template

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


def jinja(template: ChatTemplate) -> str:
    """``template`` as a Jinja chat template rendering what ``template.encode`` encodes (with
    ``rendered_ids``, as inference encodes a rendered chat)."""
    bos = "{% if bos_token %}{{ bos_token }}{% endif %}" if template.bos == "always" else ""
    first = "messages and messages[0]['role'] == 'system'"
    head = (
        f"{{% if {first} %}}{{% set system = messages[0]['content'] %}}"
        "{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = {json.dumps(template.default_system)} %}}"
        "{% set turns = messages %}{% endif %}"
    )
    force = " or true" if template.force_system else ""
    system = f"{{% if system{force} %}}{_literal(template.system, 'system')}{{% endif %}}"
    sep = f"{{% if not loop.first %}}{_literal(template.separator, '')}{{% endif %}}"
    observation = template.observation or template.user
    turns = (
        "{% for m in turns %}{% if m['role'] == 'assistant' %}"
        + _literal(template.assistant, "m['content']")
        + "{% else %}"
        + sep
        + "{% if m['role'] == 'tool' %}"
        + _literal(observation, "m['content']")
        + "{% else %}"
        + _literal(template.user, "m['content']")
        + "{% endif %}{% endif %}{% endfor %}"
    )
    return bos + head + system + turns


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
        tokenizer.chat_template = jinja(template)
        changes.append(f"chat template: the {template.name} template, saved with the tokenizer")
    for line in changes:
        logger.info("template %s: %s", getattr(template, "name", "?"), line)
    return changes
