"""A GSM8K-format JSONL as an lm-evaluation-harness task: the YAML that ``--include_path`` reads.

``write_lm_eval_task(directory, name, data)`` writes ``<directory>/<name>.yaml``: a local ``json``
dataset (nothing is downloaded), the zero-shot prompt ``fluid eval`` uses, greedy generation cut
at "Question:", exact match under lm-eval's two gsm8k filters (``strict-match``: the number after
``####``; ``flexible-extract``: the last number). Used by ``fluid demo`` for its held-out problems
and by the harness tests. Writing it needs no lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

from fluid_npu.train.io import write_text_atomic

TEMPLATE = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
{cache}output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
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


def _scalar(path: str | Path) -> str:
    """An absolute path as a YAML scalar, whatever characters it holds ("#", ": ", "[")."""
    return json.dumps(str(Path(path).resolve()))


def write_lm_eval_task(
    directory: str | Path,
    name: str,
    data: str | Path,
    *,
    max_gen_toks: int = 256,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write the task YAML for the GSM8K-format JSONL ``data`` (absolute path); returns its path."""
    cache = "" if cache_dir is None else f"  cache_dir: {_scalar(cache_dir)}\n"
    text = TEMPLATE.format(name=name, data=_scalar(data), cache=cache, max_gen_toks=max_gen_toks)
    return write_text_atomic(Path(directory) / f"{name}.yaml", [text])
