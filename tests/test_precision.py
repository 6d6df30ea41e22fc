"""Training precision on a checkpoint saved in bf16, per finetuning type × {bf16, pure_bf16}.

Under ``bf16: true`` the trainable parameters (full fine-tuning, LoRA, the K-head) are fp32 master
weights and the frozen ones stay bf16, so an update of 1e-6 — far below half a bf16 ulp of a weight
of typical size (|w| ≈ 0.01 → 3.9e-5) — still moves nearly every trained weight. Under
``pure_bf16: true`` everything is bf16 and the same update rounds away for nearly all of them: that
is why pure bf16 is an explicit choice and never what a bf16 checkpoint gets by default.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import as_overrides, tiny_stage1_recipe
from synthetic import write_short_dataset
from transformers import training_args

from fluid_npu import device as devices
from fluid_npu.config import load_config
from fluid_npu.errors import ConfigError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.train.common import training_arguments
from fluid_npu.train.precision import device_choice, resolve_precision
from fluid_npu.train.session import TrainingSession
from fluid_npu.train.stage1 import run_stage1, stage1_objective
from fluid_npu.train.stage2 import Stage2Run

BF16, FP32 = torch.bfloat16, torch.float32
TINY_LR = 1e-6
# Fraction of a trained weight's entries that one of these runs changes (measured: ≥ 0.994 with fp32
# master weights; ≤ 0.019 in pure bf16, the entries so close to 0 that 1e-6 is above half an ulp).
MOVED, STUCK = 0.9, 0.1


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16-base")
    tok = build_tiny_tokenizer()
    build_tiny_model("llama", tok).to(BF16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_short_dataset(tmp_path_factory.mktemp("data"), n_train=24, seed=0)


def _values(base, data, out, **extra) -> list[str]:
    values: dict[str, object] = dict(
        learning_rate=TINY_LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=100,
        output_dir=out,
    )
    return as_overrides(tiny_stage1_recipe(base, data, **{**values, **extra}))


def _moved(before: torch.Tensor, after: torch.Tensor) -> float:
    return (before.float() != after.detach().float()).float().mean().item()


def _param(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith(suffix))


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
@pytest.mark.parametrize("mode", ["bf16", "pure_bf16"])
def test_stage1_trainable_weights_are_fp32_unless_pure_bf16(
    bf16_base, data, tmp_path, finetuning_type, mode
):
    cfg = load_config(
        None,
        _values(bf16_base, data, tmp_path / "o", finetuning_type=finetuning_type, **{mode: True}),
    )
    session = TrainingSession(cfg, stage="fluid_stage1")
    params = dict(session.model.named_parameters())
    trainable = {p.dtype for p in params.values() if p.requires_grad}
    frozen = {p.dtype for p in params.values() if not p.requires_grad}
    assert trainable == ({BF16} if mode == "pure_bf16" else {FP32})
    if finetuning_type == "lora":
        assert frozen == {BF16}  # the base stays in the compute dtype
    else:
        assert frozen == set()
    # a weight that starts far from 0 (LoRA B starts at 0 and moves in any dtype)
    suffix = "lora_A.default.weight" if finetuning_type == "lora" else "q_proj.weight"
    watched = _param(session.model, suffix)
    before = watched.detach().clone()

    compute, collator, callbacks = stage1_objective(session)
    record = session.train(compute, collator, callbacks=callbacks)
    moved = _moved(before, _param(session.model, suffix))
    if mode == "pure_bf16":
        assert moved < STUCK, moved
    else:
        assert moved > MOVED, moved
    precision = record["precision"]
    assert precision["mode"] == mode and precision["autocast"] is (mode == "bf16")
    assert set(precision["trainable_params"]) == {"bfloat16" if mode == "pure_bf16" else "float32"}


@pytest.fixture(scope="module")
def stage1_bf16(bf16_base, data, tmp_path_factory):
    """A fully fine-tuned Stage I output saved in bf16 (one pure-bf16 step)."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    values = _values(bf16_base, data, out, finetuning_type="full", pure_bf16=True, max_steps=1)
    run_stage1(load_config(None, values))
    return out


@pytest.mark.parametrize("mode", ["bf16", "pure_bf16"])
def test_khead_is_fp32_over_a_bf16_backbone_unless_pure_bf16(stage1_bf16, data, tmp_path, mode):
    values = _values(stage1_bf16, data, tmp_path / "o", stage="fluid_stage2", **{mode: True})
    run = Stage2Run(load_config(None, [*values, "val_size=4"]))
    assert {p.dtype for p in run.backbone.model.parameters()} == {BF16}
    assert {p.dtype for p in run.head.parameters()} == ({BF16} if mode == "pure_bf16" else {FP32})
    before = run.head.net[0].weight.detach().clone()

    record = run.train()
    moved = _moved(before, run.head.net[0].weight)
    if mode == "pure_bf16":
        assert moved < STUCK, moved
    else:
        assert moved > MOVED, moved
    assert list(record["precision"]["frozen_params"]) == ["bfloat16"]  # the backbone


def test_pure_bf16_conflicts_are_config_errors(bf16_base, data, tmp_path):
    with pytest.raises(ConfigError, match="pure_bf16 and fp16 are both true"):
        load_config(None, _values(bf16_base, data, tmp_path / "o", pure_bf16=True, fp16=True))


@pytest.mark.parametrize("keys", [{"pure_bf16": True}, {"bf16": True}])
def test_a_bf16_accelerator_is_chosen_for_pure_bf16_alone(
    bf16_base, data, tmp_path, monkeypatch, keys
):
    """On a GPU / NPU with bf16, ``pure_bf16: true`` without ``bf16: true`` must get the bf16 device
    it needs (it once got none, and every accelerator was refused as lacking bf16)."""
    monkeypatch.setattr(devices, "is_npu_available", lambda: False)
    monkeypatch.setattr(devices, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(None, _values(bf16_base, data, tmp_path / "o", **keys))
    choice = device_choice(cfg.train)
    assert (choice.type, choice.autocast_dtype) == ("cuda", BF16)
    expected = "pure_bf16" if keys.get("pure_bf16") else "bf16"
    assert resolve_precision(cfg.train, choice).mode == expected


@pytest.mark.parametrize(
    ("keys", "cuda_bf16", "expected", "said"),
    [
        (
            {"fp16": True},
            None,
            "fp32",
            "fp16: true, but this cpu device trains in fp32 (no float16 "
            "autocast on a CPU: bf16: true there)",
        ),
        ({"bf16": True}, False, "fp16", "bf16: true, but this cuda device trains in fp16"),
        ({"bf16": True}, True, "bf16", None),
        ({"bf16": True}, None, "bf16", None),  # (CPU autocast has bf16)
    ],
)
def test_a_precision_the_device_cannot_run_is_said_not_silent(
    bf16_base, data, tmp_path, monkeypatch, caplog, keys, cuda_bf16, expected, said
):
    """``fp16: true`` on a CPU trains in fp32 (no float16 autocast there), ``bf16: true`` on a GPU
    without bf16 in fp16: a warning says so (run.json's precision records what ran), and the
    Trainer's arguments ask for what runs (``bf16=True`` there made transformers refuse the run,
    so the fallback never happened)."""
    monkeypatch.setattr(devices, "is_npu_available", lambda: False)
    monkeypatch.setattr(devices, "is_cuda_available", lambda: cuda_bf16 is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda_bf16))
    # (transformers' own check of a bf16 GPU, answered as this stand-in device would)
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: bool(cuda_bf16))
    cfg = load_config(None, _values(bf16_base, data, tmp_path / "o", **keys))
    choice = device_choice(cfg.train)
    with caplog.at_level(logging.WARNING, logger="fluid_npu"):
        assert resolve_precision(cfg.train, choice).mode == expected
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ([said] if said else [])
    args = training_arguments(cfg, choice)
    assert (args.bf16, args.fp16) == (expected == "bf16", expected == "fp16")
