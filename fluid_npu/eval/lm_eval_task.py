"""A GSM8K-format JSONL as an lm-evaluation-harness task: the YAML that ``--include_path`` reads.

``write_lm_eval_task(directory, name, data)`` writes ``<directory>/<name>.yaml``: a local JSONL
(nothing is downloaded), the zero-shot prompt ``fluid eval`` uses, greedy generation cut at
"Question:", exact match under lm-eval's two gsm8k filters (``strict-match``: the number after
``####``; ``flexible-extract``: the last number). Used by ``fluid demo`` for its held-out problems
and by the harness tests. Writing it needs no lm-eval.

The YAML names the JSONL by its path *relative to the YAML's folder*, so a run directory holding
both can be moved or copied. lm-eval itself would resolve a relative ``data_files`` against the
working directory, so the task loads its rows through ``custom_dataset``: a small loader written
beside the YAML (``fluid_local_data.py``, lm-eval's ``!function`` convention) that resolves the
paths against its own folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fluid_npu.io import write_text_atomic

LOADER = "fluid_local_data"
LOADER_TEXT = '''\
"""Rows of the lm-eval tasks in this folder (written by fluid-npu): ``data_files`` relative to
this folder, so the folder and its data can be moved together."""

import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
# the number after "####", as fluid eval reads it ("####72", a trailing newline or words)
FINAL = re.compile(r"####\\s*(-?\\$?(?:\\d[\\d,]*(?:\\.\\d+)?|\\.\\d+))")


def _target(row):
    match = FINAL.search(row["answer"])
    return {"target": match.group(1) if match else row["answer"].split("####")[-1].strip()}


def load(data_files, cache_dir=None, **_metadata):
    files = {split: str(HERE / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=files, cache_dir=cache_dir).map(_target)
'''

TEMPLATE = """\
task: {name}
dataset_path: json
custom_dataset: !function {loader}.load
dataset_kwargs:
  data_files:
    test: {data}
{cache}output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "\\\\.$"]
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
"""


def _scalar(text: str | Path) -> str:
    """A path as a YAML scalar, whatever characters it holds ("#", ": ", "[")."""
    return json.dumps(str(text))


def write_lm_eval_task(
    directory: str | Path,
    name: str,
    data: str | Path,
    *,
    max_gen_toks: int = 256,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write the task YAML for the GSM8K-format JSONL ``data`` and its loader; returns the YAML.

    ``data`` is stored relative to ``directory`` (move the two together); ``cache_dir``, the
    ``datasets`` cache, is stored absolute.
    """
    directory = Path(directory)
    relative = os.path.relpath(Path(data).resolve(), directory.resolve())
    cache = "" if cache_dir is None else f"  cache_dir: {_scalar(Path(cache_dir).resolve())}\n"
    text = TEMPLATE.format(
        name=name, loader=LOADER, data=_scalar(relative), cache=cache, max_gen_toks=max_gen_toks
    )
    write_text_atomic(directory / f"{LOADER}.py", [LOADER_TEXT])
    return write_text_atomic(directory / f"{name}.yaml", [text])
