"""The one dispatch rule of fluid_ops: automatic order, forcing, and reasons for refusals."""

from __future__ import annotations

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
