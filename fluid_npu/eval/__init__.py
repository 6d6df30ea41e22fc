"""Evaluation (DESIGN §2 ``eval/``): accuracy at a speed, beside AR on the same prompts.

* ``run_eval(fluid, task, rows, policies, ...)`` → a report dict (``runner.py``): per policy
  accuracy, TPF, tokens/s, speedup and ``identical_to_ar``, with ``ar`` always run first;
* ``write_eval_report(result, json_path, markdown_path, plot_dir)`` (``report.py``): JSON, a
  markdown table, accuracy-vs-TPF and K-histogram PNGs;
* GSM8K-format tasks ``gsm8k`` and ``demo``: rows, prompts, the final-number extractor
  (``tasks.py``); ``fluid eval`` (``cli.py``);
* the lm-evaluation-harness model type ``fluid`` (``harness.py``, the ``eval`` extra; imported
  only when asked for).
"""

from typing import TYPE_CHECKING

from fluid_npu import lazy_exports

if TYPE_CHECKING:
    from fluid_npu.eval.report import markdown_table, write_eval_report
    from fluid_npu.eval.runner import run_eval
    from fluid_npu.eval.tasks import TASKS, extract_answer, is_correct, read_rows, task_rows

__all__ = [
    "TASKS",
    "extract_answer",
    "is_correct",
    "markdown_table",
    "read_rows",
    "run_eval",
    "task_rows",
    "write_eval_report",
]

if not TYPE_CHECKING:  # (a checker reads the imports above, and knows every name)
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "report": ("markdown_table", "write_eval_report"),
            "runner": ("run_eval",),
            "tasks": ("TASKS", "extract_answer", "is_correct", "read_rows", "task_rows"),
        },
    )
