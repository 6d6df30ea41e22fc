"""Sharded training for real: two gloo processes under FSDP (``fsdp`` key) and DeepSpeed ZeRO-2 /
ZeRO-3 (``deepspeed`` key) against the same two processes under DDP.

Each sharded run must (1) really shard — ``run.json`` shows the wrapper, the ZeRO stage and the
fraction of the parameters a process holds, observed after the Trainer's set-up —, (2) give the DDP
loss curve (the same global batch, gradients averaged the same way: only the order of float
reductions differs, so the tolerance is rel 1e-4 on the loss and 1e-5 on the adapter; measured:
equal to the printed digits), and (3) leave checkpoints that resume to the uninterrupted result.
Every fused LM-head path runs here with the head sharded (ZeRO-3 partitions it, FSDP2 shards it):
``fluid_npu.train.sharded.through_forward`` is what makes that work.

The base has a tokenizer MASK token, so no embedding row is trainable (an added MASK token's row
under ZeRO-3: ``test_scale_zero3_added_mask``).
DeepSpeed's CPU shared-memory collective (inference only) is not built for these runs
(``train.deepspeed_setup.deepspeed_on_cpu``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_stage1_recipe
from safetensors.torch import load_file
from synthetic import write_short_dataset

from fluid_npu.model.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
# Adam's first updates are nearly lr · sign(g) (lr 1e-2 here): an element whose gradient nearly
# cancels (|g| near Adam's eps) moves by an amount the reduction order decides — measured up to
# 1.0e-5 between DDP's all-reduce and ZeRO-3's reduce-scatter — where a wrong reduction moves
# elements by about lr.
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4
ZERO3 = {
    "train_batch_size": "auto",  # (as LLaMA-Factory's ZeRO configs and configs/ds_z2.json have)
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    base = save_tiny(root / "base", mask_token=True)
    data = write_short_dataset(root / "data", n_train=48, seed=0)
    recipe = tiny_stage1_recipe(
        base, data, max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=2
    )
    (root / "stage1.yaml").write_text(yaml.safe_dump(recipe))
    (root / "fsdp.json").write_text(
        json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    )
    (root / "z3.json").write_text(json.dumps(ZERO3))
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(
    root: Path, out: Path, *overrides: str, recipe_name: str = "stage1.yaml"
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "MASTER_PORT")}
    env.update(
        FLUID_PYTHON=sys.executable,
        NPROC="2",
        MASTER_PORT=str(_port()),
        OMP_NUM_THREADS="1",
        PYTHONFAULTHANDLER="1",  # a rank that aborts prints where it was
    )
    cmd = [
        "bash",
        str(ROOT / "run_npu.sh"),
        "train",
        str(root / recipe_name),
        f"output_dir={out}",
    ]
    proc = subprocess.run([*cmd, *overrides], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    # DeepSpeed's CPU inference collective is never built for training (train.common)
    assert "shm_comm_op built" not in proc.stdout + proc.stderr
    return json.loads((out / "run.json").read_text())


def _continued_under_ddp_and_zero3(setup: Path, **recipe_keys: object) -> tuple[dict, dict]:
    """The DDP run's adapter (``setup / "ddp"``) continued by Stage I under DDP and under ZeRO-3
    (``c-ddp``, ``c-zero3``), the stage1 recipe without its own LoRA sizes (the adapter's)."""
    recipe = yaml.safe_load((setup / "stage1.yaml").read_text())
    for key in ("lora_rank", "lora_alpha"):
        del recipe[key]
    recipe.update(adapter_name_or_path=str(setup / "ddp"), **recipe_keys)
    (setup / "continue.yaml").write_text(yaml.safe_dump(recipe))
    plain = _two_processes(setup, setup / "c-ddp", recipe_name="continue.yaml")
    zero3 = _two_processes(
        setup, setup / "c-zero3", f"deepspeed={setup / 'z3.json'}", recipe_name="continue.yaml"
    )
    assert zero3["parallelism"]["zero_stage"] == 3
    assert zero3["parallelism"]["local_param_fraction"] == pytest.approx(0.5, abs=0.01)
    return plain, zero3


def _curve(record: dict) -> list[tuple[float, float, float]]:
    return [(h["loss"], h["loss_ar"], h["loss_diff"]) for h in record["log_history"] if "loss" in h]


def _same_curve(got: dict, want: dict, steps: slice = slice(None)) -> None:
    a, b = _curve(got)[steps], _curve(want)[steps]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=LOSS_RTOL), (x, y)


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.fixture(scope="module")
def ddp(setup):
    record = _two_processes(setup, setup / "ddp")
    assert record["parallelism"]["wrapper"] == "DistributedDataParallel"
    assert record["parallelism"]["local_param_fraction"] == 1.0  # replicated
    return record


def _resume_matches(setup: Path, name: str, record: dict, *keys: str) -> None:
    """Resuming ``checkpoint-2`` of run ``name`` in a fresh directory gives its final result."""
    resumed = setup / f"{name}-resumed"
    resumed.mkdir()
    ckpt = resumed / "checkpoint-2"
    subprocess.run(["cp", "-r", str(setup / name / "checkpoint-2"), str(ckpt)], check=True)
    again = _two_processes(setup, resumed, *keys, f"resume_from_checkpoint={ckpt}")
    assert again["global_step"] == record["global_step"] == 4
    _same_curve(again, record, slice(2, None))  # steps 3 and 4
    _same_adapter(resumed, setup / name)


@pytest.mark.slow
def test_fsdp_full_shard_on_two_cpu_processes(setup, ddp):
    keys = ("fsdp=full_shard auto_wrap", f"fsdp_config={setup / 'fsdp.json'}")
    record = _two_processes(setup, setup / "fsdp", *keys)
    par = record["parallelism"]
    assert par["wrapper"].startswith("FSDPModule") and par["zero_stage"] is None
    assert par["local_param_fraction"] == pytest.approx(0.5, abs=0.01)  # really sharded
    assert par["requested"]["fsdp"] == "full_shard auto_wrap"
    _same_curve(record, ddp)
    _same_adapter(setup / "fsdp", setup / "ddp")
    _resume_matches(setup, "fsdp", record, *keys)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_processes(setup, ddp, stage):
    config = ROOT / "configs" / "ds_z2.json" if stage == 2 else setup / "z3.json"
    keys = (f"deepspeed={config}",)
    record = _two_processes(setup, setup / f"zero{stage}", *keys)
    par = record["parallelism"]
    assert (par["wrapper"], par["zero_stage"]) == ("DeepSpeedEngine", stage)
    # ZeRO-2 shards the optimizer state and gradients, ZeRO-3 the parameters too
    assert par["local_param_fraction"] == (1.0 if stage == 2 else pytest.approx(0.5, abs=0.01))
    _same_curve(record, ddp)
    _same_adapter(setup / f"zero{stage}", setup / "ddp")
    _resume_matches(setup, f"zero{stage}", record, *keys)
