"""The one dispatch rule of fluid_ops: automatic order, forcing, and reasons for refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import triton.backends

from fluid_ops import dispatch


def test_triton_on_npu_needs_an_ascend_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton.backends, "backends", {"nvidia": object()})
    fake = type("NpuDevice", (), {"type": "npu"})()  # "npu" is not a device type without torch_npu
    assert "triton-ascend" in dispatch.triton_unavailable(fake)
    monkeypatch.setattr(triton.backends, "backends", {"cann": object()})
    assert dispatch.triton_unavailable(fake) is None


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in dispatch.triton_unavailable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_unavailable(torch.device("cpu")) is None


def test_unknown_backend_names_the_choices():
    with pytest.raises(dispatch.BackendUnavailable, match="choose one of"):
        dispatch.select("attention", torch.device("cpu"), "flash9")


@pytest.mark.parametrize(
    "op",
    [
        "step_mask",
        "choose_anchors",
        "logit_stats",
        "step_inputs",
        "verify_drafts",
        "draft_gate",
        "block_hits",
    ],
)
def test_the_decode_step_s_kernels_run_where_an_eager_step_costs_its_launches(op, monkeypatch):
    """The engine's step ops (its forwards' mask, the next blocks' lengths, the drafts' statistics,
    its inputs, its verify, the block it hit, the draft budget's gate): CUDA runs the Triton kernel
    (one launch for the torch rule's 5-31); a CPU the torch rule; an NPU the torch rule unless asked
    (not yet run on triton-ascend); a back end that cannot run is an error naming why, never a
    silent fallback; ``FLUID_<OP>_BACKEND`` forces."""
    import fluid_ops.anchors
    import fluid_ops.gate
    import fluid_ops.hits
    import fluid_ops.logit_stats
    import fluid_ops.step_inputs
    import fluid_ops.step_mask
    import fluid_ops.verify  # noqa: F401  (each registers its op)

    env = f"FLUID_{op.upper()}_BACKEND"
    monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.select(op, torch.device("cuda")) == "triton"
    assert dispatch.select(op, torch.device("cpu")) == "torch"
    npu = SimpleNamespace(type="npu")  # (torch knows the type only once torch_npu is imported)
    assert dispatch.select(op, npu) == "torch"  # type: ignore[arg-type]
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        dispatch.select(op, torch.device("cpu"), "triton")
    monkeypatch.setenv(env, "torch")
    assert dispatch.select(op, torch.device("cuda")) == "torch"
