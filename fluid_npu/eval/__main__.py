"""``python -m fluid_npu.eval ARGS``: lm-evaluation-harness's command line with the ``fluid`` model.

The same arguments as ``lm-eval`` (``run --model fluid --model_args model=DIR,khead=DIR --tasks
...``); it needs the ``eval`` extra. ``fluid eval`` is the project's own evaluator.
"""

from fluid_npu.eval.harness import main

main()
