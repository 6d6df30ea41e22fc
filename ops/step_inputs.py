"""Op ``"step_inputs"`` of ``fluid_ops.dispatch``: the decode engine's inputs per step.

Its torch rule lives with the engine, ``fluid_npu.sampling.step_inputs`` — it places the draft
blocks with ``fluid_npu.layout.slot_block``, the one placement rule, which ``fluid_ops`` does not
import — and its Triton launch in ``fluid_ops.step_inputs_triton``. This module holds what is
hardware: the back ends' availability and the devices' preference (CUDA runs the kernel first,
where an eager step costs what it launches; an NPU only when asked for with
``FLUID_STEP_INPUTS_BACKEND=triton`` — not yet run on triton-ascend; a CPU only under
``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch

OP = "step_inputs"
dispatch.register_step_op(OP)


def backend(device: torch.device, requested: str | None = None) -> str:
    """The back end that builds a step's inputs on ``device`` (``dispatch.select``'s rule)."""
    return dispatch.select(OP, device, requested)
