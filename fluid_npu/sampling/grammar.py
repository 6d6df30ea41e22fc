"""Structured output in the decode engine: requests whose tokens must follow a grammar — a JSON
schema, any JSON object, a regular expression, one of a list of texts, or an EBNF grammar —
matched token by token with xgrammar (the grammar library vLLM and SGLang use).

``GrammarCompiler`` (one per tokenizer and vocabulary) turns a spec into a ``Grammar``; a
``Request(grammar=...)`` carries it into the engine, which keeps one matcher per request (its
state after the tokens committed so far). Each step, a constrained row's logits have every token
the grammar forbids at that point set to ``-inf`` before the argmax (or the sample): the committed
tokens are exactly those of AR decoding under the grammar, as transformers' ``generate`` with a
grammar logits processor decodes them — lossless against that. The grammar ends with the request's
EOS token (the only token allowed once the text is complete), so a constrained request needs one.

A greedy constrained row drafts as any row does, but the mask at a draft's successor depends on
the draft, so its drafts are read back with the step that made them and the host checks them
before the step that verifies them (``constrained.py``): cut at the first token the grammar
refuses (``valid_prefix``), or replaced by the tokens spelling the text the grammar forces next
where those are more (``jump_forward``), with the masks of every position they lead to
(``bitmasks``). The verify accepts a draft only where it is the masked argmax, so a forced or
predicted run commits in one step and the output is still the model's. A sampling row keeps its
drafts up to and with the first one the grammar refuses: the rejection rule then turns that one
down (its probability under the masked distribution is 0) and draws from the residual, so the
draws are exactly sampling under the grammar; forced text is not drafted for it (the rule's
residual needs drafts drawn from the model). The rows around a constrained one draft as before.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fluid_npu.errors import ConfigError

CACHE_BYTES = 512 << 20  # compiled grammars kept for reuse
KINDS = ("json", "json_object", "regex", "choice", "grammar")  # vLLM's structured_outputs keys
WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
        "choice": "choice", "grammar": "grammar"}  # fmt: skip


class GrammarError(ConfigError):
    """A grammar spec that cannot be compiled (its message says what is wrong)."""


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ConfigError(
            "structured output (a JSON schema, regex, choice or grammar) needs the xgrammar "
            "package: pip install 'fluid-npu[serve]' (or pip install xgrammar)"
        ) from None
    return xgrammar


def _reason(exc: BaseException) -> str:
    """xgrammar's error message without its timestamp and source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar for one tokenizer and vocabulary (``vocab_size``: the logits' width);
    ``kind`` is one of ``KINDS``."""

    compiled: Any
    vocab_size: int
    kind: str

    def matcher(self, stop_ids: Sequence[int]) -> Any:
        """A fresh matcher at the start of the text; ``stop_ids`` end it once the text is
        complete (the request's EOS ids)."""
        return _xgrammar().GrammarMatcher(self.compiled, override_stop_tokens=list(stop_ids))

    def __reduce__(self) -> tuple[Any, tuple[str, int, str]]:
        """Pickled as xgrammar's serialised form, for an engine in another process
        (``receive_into`` there); the compiled object itself does not pickle."""
        return _received, (self.compiled.serialize_json(), self.vocab_size, self.kind)


_RECEIVER: dict[str, Any] = {}  # this process's tokenizer tables for grammars sent to it
_RECEIVER_LOCK = threading.Lock()


def receive_into(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
    """Let this process (an engine's own) rebuild grammars pickled elsewhere for ``tokenizer``
    (the tables, as ``GrammarCompiler`` makes them: ``receiver_tables``, else at the first
    grammar)."""
    with _RECEIVER_LOCK:
        _RECEIVER.clear()
        _RECEIVER.update(tokenizer=tokenizer, vocab_size=vocab_size, stop_ids=list(stop_ids))


def receiver_tables() -> Any:
    """This process's tokenizer tables for received grammars, built at the first call (seconds
    for a large vocabulary: an engine builds them on a thread of its own as it starts)."""
    with _RECEIVER_LOCK:
        r = _RECEIVER
        if "tokenizer" not in r:
            raise GrammarError("a grammar is rebuilt from its pickle only in an engine's process")
        if "info" not in r:
            r["info"] = _xgrammar().TokenizerInfo.from_huggingface(
                r["tokenizer"], vocab_size=r["vocab_size"], stop_token_ids=r["stop_ids"] or None
            )
        return r["info"]


def _received(serialized: str, vocab_size: int, kind: str) -> Grammar:
    tables = receiver_tables()
    return Grammar(_xgrammar().CompiledGrammar.deserialize_json(serialized, tables), vocab_size,
                   kind)  # fmt: skip


class GrammarCompiler:
    """Compiles grammar specs for ``tokenizer`` (a transformers tokenizer) over logits of
    ``vocab_size`` entries (a model's vocabulary may be padded past the tokenizer's); compiled
    grammars are cached, so a schema sent again costs nothing."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int] = ()) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids) or None
        )
        self.vocab_size = vocab_size
        self.stop_ids = list(info.stop_token_ids)
        # compiled grammars are kept up to a bound (vLLM's default), not for every schema ever sent
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)

    def compile(self, kind: str, spec: Any, *, any_whitespace: bool = True) -> Grammar:
        """``spec`` under ``kind``: ``json`` (a JSON schema, as a dict or its text),
        ``json_object`` (any JSON object; ``spec`` ignored), ``regex`` (a pattern), ``choice`` (a
        list of texts, one of which is the whole output) or ``grammar`` (EBNF, GBNF-style, with
        a ``root`` rule). ``any_whitespace`` False: JSON without free whitespace (vLLM's
        ``disable_any_whitespace``). A spec that does not compile is a ``GrammarError``."""
        c = self._compiler
        try:
            if kind == "json":
                schema = spec if isinstance(spec, str) else json.dumps(spec)
                dropped = unsupported_schema_keyword(json.loads(schema))
                if dropped:
                    raise GrammarError(
                        f"the JSON schema uses {dropped}, which the grammar library would drop "
                        "silently (the output could break it); leave it out"
                    )
                compiled = c.compile_json_schema(schema, any_whitespace=any_whitespace)
            elif kind == "json_object":
                compiled = c.compile_json_schema(
                    '{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False
                )
            elif kind == "regex":
                if "\x00" in spec:  # (no grammar reads one; xgrammar's converter would not cope)
                    raise GrammarError("the regular expression holds a NUL character")
                compiled = c.compile_regex(spec)
            elif kind == "choice":
                if not spec or any(not isinstance(x, str) or not x for x in spec):
                    raise GrammarError("choice takes a list of non-empty texts")
                alternatives = " | ".join(json.dumps(x, ensure_ascii=False) for x in spec)
                compiled = c.compile_grammar(f"root ::= {alternatives}")
            elif kind == "grammar":
                compiled = c.compile_grammar(spec)
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}; use one of {', '.join(KINDS)}")
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"the {WHAT[kind]} does not compile: {_reason(exc)}") from None
        grammar = Grammar(compiled, self.vocab_size, kind)
        if not allowed_tokens([grammar.matcher(self.stop_ids)], self.vocab_size).any():
            raise GrammarError(f"the {WHAT[kind]} accepts no text (not even an empty one)")
        return grammar


# string formats xgrammar's JSON schema converter writes a grammar for (others it ignores)
FORMATS = frozenset(("email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname",
                     "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
                     "relative-json-pointer"))  # fmt: skip


DATA_KEYS = frozenset(("default", "examples", "const", "enum", "title", "description", "$comment"))
# keywords whose value maps names to schemas (the names are not keywords)
NAMED = frozenset(("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"))


def unsupported_schema_keyword(schema: Any) -> str | None:
    """The first keyword of ``schema`` (at any depth; values such as ``default`` are data, and
    property names are names) that xgrammar compiles without honouring — ``multipleOf`` on a
    number (an integer's it keeps), ``uniqueItems`` / ``contains`` / ``minContains`` /
    ``maxContains``, ``not``, a string ``format`` it does not know, ``pattern`` or ``format`` with
    ``minLength`` / ``maxLength`` (vLLM refuses these too). None: every keyword holds."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    kinds = {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()
    if "number" in kinds and "multipleOf" in schema:
        return "multipleOf"
    for key in ("uniqueItems", "contains", "minContains", "maxContains", "not"):
        if schema.get(key, False) is not False:
            return key
    if "string" in kinds and schema.get("format", next(iter(FORMATS))) not in FORMATS:
        return f"format {schema['format']!r}"
    bounded = "minLength" in schema or "maxLength" in schema
    if "string" in kinds and bounded and ("pattern" in schema or "format" in schema):
        return "pattern / format with minLength / maxLength"
    for key, value in schema.items():
        if key in DATA_KEYS:
            continue
        named = key in NAMED and isinstance(value, dict)
        subs = value.values() if named else value if isinstance(value, list) else [value]
        found = next((f for sub in subs if (f := unsupported_schema_keyword(sub))), None)
        if found:
            return found
    return None


def jump_forward(matcher: Any, limit: int) -> list[int]:
    """Up to ``limit`` tokens of the text the grammar forces next (xgrammar's jump-forward tokens:
    the longest vocabulary tokens spelling it, which may not be how the model would split it).
    The engine makes them a row's drafts: each is verified against the argmax of the masked
    logits like any draft, so what is committed stays the model's own choice."""
    return [] if limit <= 0 else [int(t) for t in matcher.find_jump_forward_tokens()[:limit]]


def valid_prefix(matcher: Any, tokens: Sequence[int]) -> int:
    """How many of ``tokens`` the grammar takes from the matcher's state (which is kept)."""
    n = 0
    while n < len(tokens) and not matcher.is_terminated() and matcher.accept_token(tokens[n]):
        n += 1  # (nothing follows a stop token)
    if n:
        matcher.rollback(n)
    return n


def bitmasks(
    matchers: Sequence[Any], drafts: Sequence[Sequence[int]], width: int, vocab: int
) -> tuple[Any, list[int]]:
    """int32 bitmasks ``[len(matchers), width, ceil(vocab / 32)]`` — at position ``j`` of row
    ``g``, the tokens its grammar allows after the row's first ``j`` drafts (``drafts[g]``);
    everything past a draft the grammar refuses, or past a stop token — and how many of each
    row's drafts the grammar takes. The matchers end where they began."""
    out = _xgrammar().allocate_token_bitmask(len(matchers) * width, vocab)  # all allowed
    taken = []
    for g, (m, ds) in enumerate(zip(matchers, drafts)):
        n = 0
        for j in range(len(ds) + 1):
            if m.is_terminated():  # a stop token ended the drafts: nothing follows it
                break
            m.fill_next_token_bitmask(out, g * width + j)
            if j == len(ds) or not m.accept_token(ds[j]):
                break
            n += 1
        if n:
            m.rollback(n)
        taken.append(n)
    return out.view(len(matchers), width, -1), taken


# byte -> its 8 bits, lowest first: unpacking by a table lookup (indexing), not bit shifts, so
# every backend runs it (CPU, CUDA, torch_npu)
_BYTE_BITS = torch.tensor([[(b >> i) & 1 for i in range(8)] for b in range(256)], dtype=torch.bool)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmasks ``[..., words]`` as bool ``[..., vocab]`` (True: allowed), on their device:
    token ``32 w + i`` is bit ``i`` of word ``w``, byte ``i // 8`` of it in memory (little-endian,
    as every device this runs on)."""
    table = _BYTE_BITS.to(bitmask.device)
    return table[bitmask.contiguous().view(torch.uint8).long()].flatten(-2)[..., :vocab]


def allowed_tokens(matchers: Sequence[Any], vocab_size: int) -> torch.Tensor:
    """``[len(matchers), vocab_size]`` bool on the CPU: the tokens each matcher allows next."""
    return unpack(bitmasks(matchers, [[] for _ in matchers], 1, vocab_size)[0][:, 0], vocab_size)


def follow(matcher: Any, tokens: Sequence[int]) -> int | None:
    """Feed a constrained row's committed ``tokens`` to its matcher; the index of the first one
    the grammar refuses, else None. Only a row whose every allowed token was ``-inf`` commits
    one: ``min_tokens`` holding back the EOS that alone completes the text (the text is then
    complete: ``matcher.is_completed()``), or numbers that broke."""
    for n, t in enumerate(tokens):
        if not matcher.accept_token(t):
            return n
    return None
