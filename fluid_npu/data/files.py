"""Reading the files of a dataset with ``datasets``, and naming the place of a row in them.

``load_raw`` reads json / jsonl / parquet files (a file or a directory of them, never the network)
and turns a missing, empty or malformed file into one ``DataError`` naming the file and line (a
line that is no JSON object included). ``row_places`` names where rows are, for the messages about
bad rows: a row's place is its 1-based line in a JSON lines file (blank lines counted, as an editor
shows them), its index in a file holding one JSON array, its 0-based row in a parquet file.
``keep_raw_text`` gives the row checks a JSON file's own values where ``datasets`` typed a used
column as something other than text (one mistyped row types the whole column ``Json``).
"""

from __future__ import annotations

import codecs
import collections
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets

from fluid_npu.data.formats import DatasetSpec
from fluid_npu.errors import DataError
from fluid_npu.io import utf8_lines

logger = logging.getLogger(__name__)

SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _data_files(spec: DatasetSpec) -> tuple[str, list[Path]]:
    """The ``datasets`` builder name and the files of ``spec`` (a file or a directory)."""
    path, where = spec.path, f"dataset {spec.name!r}"
    if not path.exists():
        raise DataError(f"{where}: {path} does not exist; check `file_name` / the path")
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in SUFFIX_BUILDERS
        )
        if not files:
            raise DataError(f"{where}: directory {path} has no {'/'.join(SUFFIX_BUILDERS)} files")
    elif path.suffix not in SUFFIX_BUILDERS:
        raise DataError(
            f"{where}: {path} is not a {'/'.join(SUFFIX_BUILDERS)} file (csv, arrow and text files "
            'are not read here); convert it to JSON lines, e.g. for a csv: python -c "import '
            "pandas as p, sys; p.read_csv(sys.argv[1]).to_json(sys.argv[2], orient='records', "
            f'lines=True, force_ascii=False)" {path.name} {path.stem}.jsonl'
        )
    else:
        files = [path]
    builders = {SUFFIX_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise DataError(f"{where}: directory {path} mixes json and parquet files; keep one kind")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{where}: {f} is empty")
    return builders.pop(), files


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _json_problem(file: Path) -> str | None:
    """Why ``file`` is not JSON / JSON lines of objects (with the line number), or None."""
    text = file.read_text(encoding="utf-8-sig")  # (load_raw checked it is UTF-8)
    lines = text.split("\n")  # as datasets (pyarrow) splits JSON lines
    if not text.strip():
        return f"{file} is empty"
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return f"{file} line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
    else:
        rows = whole if isinstance(whole, list) else [whole]
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is None:
            return None
        where = f"array index {bad}" if isinstance(whole, list) else "line 1"
        return f"{file} {where}: {_kind(rows[bad])}, not an object (one example per row)"
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{file} line {lineno}: malformed JSON ({e.msg}, column {e.colno})"
        if not isinstance(row, dict):
            return f"{file} line {lineno}: {_kind(row)}, not an object (one example per line)"
    return None


def _records(file: Path, builder: str) -> Iterator[tuple[str, Any]]:
    """``(place, record)`` for each row of ``file``, in the order ``datasets`` reads them (see the
    docstring): the record is the row of a JSON array, a JSON line's bytes, None for parquet."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(file).metadata.num_rows
        yield from ((f"row {i} (0-based)", None) for i in range(rows))
        return
    with file.open("rb") as fh:
        head = fh.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    if head.startswith("["):  # one JSON array (a JSON-lines file whose first row is one fails)
        try:
            whole = json.loads(file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            yield from ((f"array index {i}", row) for i, row in enumerate(whole))
            return
    # JSON lines, read a line at a time (a large file is never held whole): one row per line that
    # is not blank, lines split at "\n" only, as datasets (pyarrow) splits them
    with file.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.decode("utf-8", errors="replace").strip():
                yield f"line {n}", raw


def row_places(spec: DatasetSpec, indices: list[int]) -> dict[int, str]:
    """``"FILE line N"`` (or ``array index`` / parquet ``row``) for the rows ``indices`` (0-based
    over the files of ``spec`` in order), read in one pass that stops after the last (JSON lines
    a line at a time)."""
    builder, files = _data_files(spec)
    wanted, found, row = set(indices), {}, 0
    for file in files:
        for place, _ in _records(file, builder):
            if row in wanted:
                found[row] = f"{file} {place}"
                if len(found) == len(wanted):
                    return found
            row += 1
    return {**{i: f"row {i} (0-based)" for i in wanted}, **found}  # (a file changed meanwhile)


def load_raw(spec: DatasetSpec, cache_dir: str | None = None) -> datasets.Dataset:
    """Read the rows of ``spec`` with ``datasets`` (offline); clear errors for bad files."""
    builder, files = _data_files(spec)
    # datasets logs its own ERROR line for a parse failure; ours below names the line and the fix
    if builder == "json":  # (pyarrow reads bytes that are not UTF-8 without a word)
        try:
            for file in files:
                collections.deque(utf8_lines(file), maxlen=0)
        except DataError as e:
            raise DataError(f"dataset {spec.name!r}: {e}") from None
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    json_log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    except Exception as e:  # datasets wraps parse errors in several types: diagnose them here
        problems = [_json_problem(f) for f in files] if builder == "json" else []
        problem = next((p for p in problems if p), None)
        cause = e.__cause__ or e
        names = ", ".join(map(str, files))
        detail = problem or f"cannot read {names} ({type(cause).__name__}: {cause})"
        raise DataError(f"dataset {spec.name!r}: {detail}; fix the file") from e
    finally:
        json_log.setLevel(level)
    if len(ds) == 0:
        raise DataError(f"dataset {spec.name!r}: {spec.path} has no rows")
    return ds


def _is_text(feature: Any) -> bool:
    """Whether ``feature`` holds text only: string (or all-null) values, in lists and structs."""
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string", "null")
    if isinstance(feature, dict):
        return all(map(_is_text, feature.values()))
    if isinstance(feature, list):  # (the old spelling of a list feature)
        return all(map(_is_text, feature))
    inner = getattr(feature, "feature", None)  # List, LargeList
    return inner is not None and _is_text(inner)


def keep_raw_text(spec: DatasetSpec, raw: datasets.Dataset) -> tuple[DatasetSpec, datasets.Dataset]:
    """The used columns of a JSON dataset that ``datasets`` did not type as text, replaced by each
    row's value as the file holds it (read with ``json``, kept as JSON text: ``spec.json_columns``
    tells ``to_conversation`` to decode them). ``spec`` is finalized (its columns known).

    One mistyped row (``"output": 7``) makes ``datasets`` type its whole column ``Json``, which
    decodes every string that is valid JSON (``"2"``, ``"true"``, ``"null"``) into a number, a
    boolean or null; a column of dates becomes timestamps. Either would blame good rows, or drop
    them with ``skip_bad_rows``. With the file's values a good row's text stays text, and the row
    check names the row that is not.
    """
    builder, files = _data_files(spec)
    used = dict.fromkeys(c for c in spec.columns.values() if c)
    columns = [c for c in used if builder == "json" and not _is_text(raw.features[c])]
    if not columns:
        return spec, raw
    logger.info(
        "dataset %r: column(s) %s are not all text; reading their values from the files",
        spec.name,
        ", ".join(columns),
    )
    values: dict[str, list[str]] = {c: [] for c in columns}
    for file in files:
        for place, record in _records(file, builder):
            try:
                row = json.loads(record) if isinstance(record, bytes) else record
            except json.JSONDecodeError as e:  # (datasets read it: the file changed meanwhile)
                raise DataError(f"dataset {spec.name!r}: {file} {place}: malformed JSON") from e
            for c in columns:
                value = row.get(c) if isinstance(row, dict) else None
                values[c].append(json.dumps(value, ensure_ascii=False))
    if len(values[columns[0]]) != len(raw):
        raise DataError(
            f"dataset {spec.name!r}: its files changed while being read ({len(raw)} rows, then "
            f"{len(values[columns[0]])}); run again"
        )
    for c in columns:  # (added first: a table with no column left would have no rows either)
        raw = raw.add_column(f"{c}\ttext", values[c], feature=datasets.Value("string"))
    raw = raw.remove_columns(columns).rename_columns({f"{c}\ttext": c for c in columns})
    return replace(spec, json_columns=frozenset(columns)), raw
