"""Dataset descriptions and row formats, compatible with LLaMA-Factory.

A ``dataset:`` entry is either a name described in ``<dataset_dir>/dataset_info.json``
(``file_name``, ``formatting`` alpaca | sharegpt | openai — sharegpt rows whose tool calls come as
OpenAI's ``tool_calls`` and ``tool`` messages —, ``columns``, ``tags``, ``num_samples``, with
LLaMA-Factory's key names and defaults — an alpaca ``columns`` mapping reads only the columns it
names, as LLaMA-Factory's does —; its hub keys ``split``, ``subset``, ``folder`` are refused,
the files being local) or a path to a file or directory whose format is inferred from its columns
(messages with ``role`` / ``content`` are read as ``openai``).
This module turns those into ``DatasetSpec`` objects and converts one row of either format into a
``Conversation``, raising ``RowError`` with the problem when the row is bad (missing column, wrong
type, empty response, roles that do not alternate). An empty system counts as unset (the
template's default system applies), as in LLaMA-Factory. Reading the files is ``files.py``'s job.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fluid_npu.data.templates import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    PROMPT_ROLES,
    RESPONSE_ROLES,
    USER,
    Conversation,
    RowError,
)
from fluid_npu.data.tool_turns import openai_turns
from fluid_npu.errors import DataError

logger = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
FORMATS = ("alpaca", "sharegpt", "openai")  # openai: sharegpt rows with OpenAI's tool calls
ALPACA_COLUMNS: dict[str, str | None] = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": None,
    "history": None,
    "tools": None,
}
SHAREGPT_COLUMNS: dict[str, str | None] = {
    "messages": "conversations",
    "system": None,
    "tools": None,
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# OpenAI-style messages, inferred when a sharegpt dataset gives no tags and uses role/content.
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}
# LLaMA-Factory columns for preference, KTO and multimodal data: not supervised text SFT.
UNSUPPORTED_COLUMNS = ("chosen", "rejected", "kto_tag", "images", "videos", "audios")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to load: where it is and how its rows map onto a conversation."""

    name: str
    path: Path
    formatting: str | None  # None: inferred from the columns once loaded
    columns: Mapping[str, str | None]
    tags: Mapping[str, str] | None  # sharegpt only; None: inferred from the first message
    explicit: frozenset[str] = frozenset()  # column roles the user mapped: they must exist
    json_columns: frozenset[str] = frozenset()  # columns holding JSON text (files.keep_raw_text)
    num_samples: int | None = None  # rows drawn with the run's seed (LLaMA-Factory's key)


def _names_hint(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    shown = ", ".join(sorted(names)[:30])
    if len(names) > 30:
        shown += f" (+{len(names) - 30} more)"
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}available: {shown}" if names else "it has no entries"


def _read_info(dataset_dir: Path) -> dict[str, Any] | None:
    path = dataset_dir / DATASET_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix the file") from e
    if not isinstance(info, dict):
        raise DataError(f"{path} must map dataset names to descriptions (a JSON object)")
    return info


# the keys of a dataset_info.json entry LLaMA-Factory reads (its data/parser.py): others are typos
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
ENTRY_KEYS = (
    "file_name", "formatting", "ranking", "columns", "tags", "num_samples", "split", "subset",
    "folder", *HUB_KEYS,
    "file_sha1",  # (older LLaMA-Factory's checksum, still in copies of its file: unread there too)
)  # fmt: skip


def _spec_from_info(name: str, entry: Any, dataset_dir: Path) -> DatasetSpec:
    where = f"dataset {name!r} in {dataset_dir / DATASET_INFO}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: the description must be a JSON object")
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:  # (LLaMA-Factory ignores it: a misspelt `columns` would map nothing)
        raise DataError(
            f"{where}: unknown key {unknown[0]!r}; {_names_hint(unknown[0], ENTRY_KEYS)}"
        )
    remote = [k for k in HUB_KEYS if k in entry]
    if remote:  # (LLaMA-Factory reads the hub's data over file_name's: refused, not ignored)
        raise DataError(
            f"{where}: it names {remote[0]}, but fluid-npu reads local files only; remove it and "
            f"set `file_name` to a file or directory in {dataset_dir}"
        )
    if "file_name" not in entry:
        raise DataError(f"{where}: set `file_name` to a file or directory in {dataset_dir}")
    if entry.get("ranking"):
        raise DataError(f"{where}: preference datasets (ranking: true) are not supervised SFT data")
    _check_local_keys(entry, where)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {FORMATS}")
    columns = entry.get("columns") or {}
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    bad = [k for k in columns if k not in defaults]
    if bad:
        why = "is not supported" if bad[0] in UNSUPPORTED_COLUMNS else "is not a column role"
        hint = ""
        if formatting == "alpaca" and bad[0] in SHAREGPT_COLUMNS:
            hint = ' (formatting defaults to alpaca: add "formatting": "sharegpt" for messages)'
        raise DataError(
            f"{where}: columns.{bad[0]} {why} for {formatting} SFT data{hint}; valid: "
            f"{sorted(defaults)}"
        )
    if "columns" in entry and formatting == "alpaca":
        # LLaMA-Factory reads only the alpaca columns a mapping names (parser.py: every role it
        # leaves out is None), so {"prompt": "input", ...} does not read "input" twice
        defaults = {role: None for role in defaults}
        if not columns.get("response"):
            raise DataError(
                f"{where}: `columns` names no response column, and with a mapping only the "
                'columns it names are read (as in LLaMA-Factory); add e.g. "response": "output"'
            )
        if not columns.get("prompt") and not columns.get("query"):
            raise DataError(
                f"{where}: `columns` names no prompt (or query) column, and with a mapping only "
                'the columns it names are read (as in LLaMA-Factory); add e.g. "prompt": '
                '"instruction"'
            )
    tags = entry.get("tags")
    if tags is not None:
        bad = [k for k in tags if k not in SHAREGPT_TAGS]
        if bad:
            raise DataError(f"{where}: unknown tag {bad[0]!r}; valid: {sorted(SHAREGPT_TAGS)}")
        tags = {**SHAREGPT_TAGS, **tags}
    return DatasetSpec(
        name=name,
        path=dataset_dir / entry["file_name"],
        formatting=formatting,
        columns={**defaults, **columns},
        tags=tags,
        explicit=frozenset(k for k, v in columns.items() if v),
        num_samples=_num_samples(entry.get("num_samples"), where),
    )


def _check_local_keys(entry: Mapping[str, Any], where: str) -> None:
    """Refuse LLaMA-Factory's hub keys ``split``, ``subset`` and ``folder``: it ignores ``subset``
    and ``folder`` for a local file, and a local file has no split but ``train``."""
    split = entry.get("split")
    if split is not None and split != "train":
        raise DataError(
            f"{where}: split {split!r}: the rows of a local file are its train split (as in "
            "LLaMA-Factory); remove `split` and point `file_name` at the file holding those rows "
            "(num_samples or max_samples take fewer rows)"
        )
    for key in ("subset", "folder"):
        if entry.get(key) is not None:
            raise DataError(
                f"{where}: `{key}` is for a dataset on a hub, and a local file has none; remove "
                f'`{key}` (a file in a subdirectory is `"file_name": "dir/file.jsonl"`)'
            )


def _num_samples(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{where}: num_samples={value!r} must be a whole number of rows, >= 1")
    return value


def resolve_datasets(dataset: str, dataset_dir: str | Path) -> list[DatasetSpec]:
    """The specs of a comma-separated ``dataset`` value: names in dataset_info.json or paths."""
    names = [n.strip() for n in str(dataset or "").split(",") if n.strip()]
    if not names:
        raise DataError("no dataset given: set `dataset:` to a dataset_info.json name or a path")
    root = Path(dataset_dir)
    info = _read_info(root)
    specs = []
    for name in names:
        if info is not None and name in info:
            specs.append(_spec_from_info(name, info[name], root))
            continue
        for candidate in (Path(name), root / name):
            if candidate.exists():
                specs.append(DatasetSpec(name, candidate, None, {}, None))
                break
        else:
            if info is None:
                where = f"there is no {DATASET_INFO} in dataset_dir {str(root)!r}"
            else:
                where = f"it is not in {root / DATASET_INFO} ({_names_hint(name, list(info))})"
            raise DataError(
                f"unknown dataset {name!r}: {where}, and it is not a file or directory; "
                "register it in dataset_info.json or give a path"
            )
    return specs


def _infer_tags(first_rows: Sequence[Any]) -> dict[str, str]:
    for messages in first_rows:
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            keys = {k for k, v in messages[0].items() if v is not None}
            return OPENAI_TAGS if "role" in keys and "from" not in keys else SHAREGPT_TAGS
    return SHAREGPT_TAGS


def finalize_spec(
    spec: DatasetSpec, column_names: Sequence[str], head: Sequence[Any]
) -> DatasetSpec:
    """Infer what the spec leaves open from the loaded columns; check required columns exist.

    ``head`` is the first few rows (mappings), used to tell sharegpt from OpenAI-style messages.
    """
    cols = set(column_names)
    found = ", ".join(sorted(cols))
    if spec.formatting is None:
        unsupported = sorted(cols & set(UNSUPPORTED_COLUMNS))
        if unsupported:  # (LLaMA-Factory's multimodal / preference data, given as a path)
            raise DataError(
                f"dataset {spec.name!r} has a {unsupported[0]!r} column: preference and "
                "multimodal data are not supervised text SFT, and fluid-npu trains text-only "
                "models; give a dataset without it"
            )
        if "conversations" in cols or "messages" in cols:
            key = "conversations" if "conversations" in cols else "messages"
            columns = {"messages": key, "system": None, "tools": None}
            columns |= {k: k for k in ("system", "tools") if k in cols}
            spec = replace(spec, formatting="sharegpt", columns=columns)
        elif "instruction" in cols and "output" in cols:
            columns = dict(ALPACA_COLUMNS)
            columns |= {k: k for k in ("system", "history", "tools") if k in cols}
            spec = replace(spec, formatting="alpaca", columns=columns)
        else:
            raise DataError(
                f"dataset {spec.name!r}: cannot tell its format from its columns ({found}); "
                "expected instruction/output (alpaca) or conversations/messages (sharegpt), or "
                "describe it in dataset_info.json with a `columns` mapping"
            )
    required = ("prompt", "response") if spec.formatting == "alpaca" else ("messages",)
    columns = dict(spec.columns)
    for role, column in spec.columns.items():
        if column is None or column in cols:
            continue
        if role in required or role in spec.explicit:
            raise DataError(
                f"dataset {spec.name!r} has no column {column!r} (the {role} column); "
                f"its columns are: {found}. Fix `columns` in dataset_info.json"
            )
        columns[role] = None  # an optional default column that this dataset does not have
    spec = replace(spec, columns=columns)
    if spec.formatting != "alpaca" and spec.tags is None:
        tags = _infer_tags([row.get(columns["messages"]) for row in head])
        # OpenAI's messages are read as `formatting: openai` reads them (their tool_calls and
        # tool results too): rows without calls come out the same as sharegpt's
        formatting = "openai" if tags is OPENAI_TAGS else spec.formatting
        spec = replace(spec, tags=tags, formatting=formatting)
    return spec


def _text(value: Any, what: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise RowError(f"{what} is missing")
        return None
    if not isinstance(value, str):
        raise RowError(f"{what} has type {type(value).__name__} ({value!r:.40}), expected text")
    return value


def _alpaca(row: Mapping[str, Any], cols: Mapping[str, str | None]) -> Conversation:
    def get(role: str, required: bool = False) -> str | None:
        column = cols[role]
        value = row.get(column) if column else None
        return _text(value, f"column {column!r}", required)

    prompt, query = get("prompt"), get("query")  # (either may be empty, as in LLaMA-Factory)
    response = get("response", required=True)
    messages: list[tuple[str, str]] = []
    history = row.get(cols["history"]) if cols["history"] else None
    if history is not None:
        if not isinstance(history, list):
            raise RowError(f"column {cols['history']!r} must be a list of [prompt, response] pairs")
        for i, pair in enumerate(history):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise RowError(f"history entry {i} is not a [prompt, response] pair")
            messages.append((USER, _text(pair[0], f"history entry {i} prompt")))
            messages.append((ASSISTANT, _text(pair[1], f"history entry {i} response")))
    messages.append((USER, "\n".join(t for t in (prompt, query) if t)))
    messages.append((ASSISTANT, response))
    # "" is unset, as for sharegpt
    return Conversation(messages, system=get("system") or None, tools=_tools(row, cols))


def _sharegpt(
    row: Mapping[str, Any],
    cols: Mapping[str, str | None],
    tags: Mapping[str, str],
    openai: bool = False,
) -> Conversation:
    column = cols["messages"]
    messages = row.get(column)
    if messages is None:
        raise RowError(f"column {column!r} is missing")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RowError(f"column {column!r} must be a list of message objects")
    if openai:
        messages = openai_turns(messages, tags)
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    system = _text(row.get(cols["system"]) if cols["system"] else None, "the system", False)
    start = 0
    if messages and messages[0].get(role_tag) == tags["system_tag"]:
        system = _text(messages[0].get(content_tag), f"message 0 {content_tag!r}")
        start = 1
    roles = {
        tags["user_tag"]: USER,
        tags["observation_tag"]: OBSERVATION,
        tags["assistant_tag"]: ASSISTANT,
        tags["function_tag"]: FUNCTION,
    }
    if not openai and any(m.get("tool_calls") for m in messages):
        raise RowError(
            "a message has OpenAI's tool_calls, which sharegpt formatting does not read (the "
            'calls would be lost); set "formatting": "openai" in the dataset_info.json entry'
        )
    prompt_tags = [t for t, r in roles.items() if r in PROMPT_ROLES]
    response_tags = [t for t, r in roles.items() if r in RESPONSE_ROLES]
    out: list[tuple[str, str]] = []
    for pos, message in enumerate(messages[start:], start):
        tag = message.get(role_tag)
        if tag not in roles:
            raise RowError(
                f"message {pos} has {role_tag}={tag!r}; expected one of {list(roles)} (the `tags` "
                "of a dataset_info.json entry name the roles: user_tag, assistant_tag, "
                "observation_tag, function_tag, system_tag)"
            )
        expected = prompt_tags if len(out) % 2 == 0 else response_tags
        if tag not in expected:
            raise RowError(
                f"roles do not alternate: message {pos} is {tag!r} where one of {expected} "
                "is expected"
            )
        out.append((roles[tag], _text(message.get(content_tag), f"message {pos} {content_tag!r}")))
    if not out:
        raise RowError("the conversation has no messages")
    if len(out) % 2:
        raise RowError("the conversation ends with a prompt turn; it must end with a response")
    # an empty system is unset, as in LLaMA-Factory: the template's default system applies
    return Conversation(out, system=system or None, tools=_tools(row, cols))


def _tools(row: Mapping[str, Any], cols: Mapping[str, str | None]) -> str | None:
    """The row's tools column as JSON text (None: no tools)."""
    tools = row.get(cols["tools"]) if cols.get("tools") else None
    if tools is not None and not isinstance(tools, str):
        if not isinstance(tools, list | dict):
            raise RowError(f"column {cols['tools']!r} must be JSON text or a list of tools")
        tools = json.dumps(tools, ensure_ascii=False)
    return tools or None


def to_conversation(row: Mapping[str, Any], spec: DatasetSpec) -> Conversation:
    """Convert one row of a finalized spec; raises ``RowError`` when the row is bad."""
    if spec.json_columns:
        row = {**row, **{c: json.loads(row[c]) for c in spec.json_columns}}
    if spec.formatting == "alpaca":
        conversation = _alpaca(row, spec.columns)
    else:
        assert spec.tags is not None, "finalize_spec() first"
        conversation = _sharegpt(row, spec.columns, spec.tags, spec.formatting == "openai")
    for i, (role, content) in enumerate(conversation.messages):
        if role in RESPONSE_ROLES and not content.strip():
            last = i == len(conversation.messages) - 1
            raise RowError("the response is empty" if last else f"response turn {i // 2} is empty")
    return conversation
