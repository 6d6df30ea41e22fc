"""Trainers: Stage I (strictly causal alignment) and Stage II (the K-head) on the HF Trainer.

Importing the package imports transformers' Trainer once, quietly: it imports peft, which imports
bitsandbytes (when installed), whose notice that its optional 4-bit CPU kernels are missing would
otherwise open every training run, whichever entry point starts it (``fluid train``, ``fluid
demo``, ``fluid real``, ``run_stage1`` called from Python)."""

from fluid_npu.model.adapters import quiet_peft

with quiet_peft():
    import transformers.trainer  # noqa: F401
