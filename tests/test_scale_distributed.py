"""Multi-process training on CPU and the launcher that starts it.

* ``bash run_npu.sh train`` with ``NPROC=2`` runs two gloo processes (torchrun) whose Stage I loss
  curve equals one process at the same global batch, and which write one set of checkpoints.
* The launcher turns the visible devices and NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT into
  torchrun's arguments, exports the HCCL defaults and refuses malformed values (dry run).
* The ``deepspeed`` and ``fsdp`` keys reach ``TrainingArguments``.

Why two tolerances in the first test: a step's loss is the mean of per-micro-batch means (each
process's batch, or each accumulation micro-batch) of token-averaged cross-entropies. Two processes
× batch 2 therefore compute *exactly* what one process × batch 2 × 2 accumulation steps computes
(same examples per step, same layout draws — they are seeded by the dataset index —, gradients
averaged over the two halves), so those curves agree to float rounding (rel 1e-5). One process ×
batch 4 weighs the four examples by their token counts instead of half-and-half, a different but
equally valid estimate of the same loss: its curve differs by that weighting only (measured: at
most 0.31 % over these four steps; allowed: 2 %).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_stage1_recipe
from safetensors.torch import load_file
from synthetic import write_short_dataset

from fluid_npu import device as devices
from fluid_npu.config import load_config
from fluid_npu.errors import ConfigError
from fluid_npu.train import common, deepspeed_setup
from fluid_npu.train.checkpoint import validate_checkpoint
from fluid_npu.train.run_shape import BATCH_FILE
from fluid_npu.train.stage1 import run_stage1

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "run_npu.sh"
LAUNCH_VARS = (
    "NPROC",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ASCEND_RT_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "HCCL_CONNECT_TIMEOUT",
    "HCCL_EXEC_TIMEOUT",
)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_short_dataset(tmp_path_factory.mktemp("data"), n_train=48, seed=0)


def _recipe(base: Path, data: Path) -> dict[str, object]:
    return tiny_stage1_recipe(
        base,
        data,
        lr_scheduler_type="cosine",
        warmup_ratio=0.25,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
    )


def _launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(FLUID_PYTHON=sys.executable, **extra)
    return env


def _curve(record: dict) -> list[tuple[float, float, float]]:
    return [(h["loss"], h["loss_ar"], h["loss_diff"]) for h in record["log_history"] if "loss" in h]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_save_once(tiny_model_dir, demo_data, tmp_path):
    recipe = tmp_path / "stage1.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model_dir, demo_data)))
    two = tmp_path / "two-procs"
    env = _launcher_env(NPROC="2", OMP_NUM_THREADS="1")  # (no MASTER_PORT: a free port)
    cmd = ["bash", str(LAUNCHER), "train", str(recipe), "per_device_train_batch_size=2"]
    proc = subprocess.run(
        [*cmd, f"output_dir={two}"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torchrun: 2 process(es) per node, 1 node(s), node rank 0" in proc.stderr
    for notice in ("gemm_4bit", "is_gradient_checkpointing"):  # (peft's imports, quietened)
        assert notice not in proc.stderr, proc.stderr[-4000:]

    one_ga = run_stage1(
        load_config(
            recipe,
            [
                "per_device_train_batch_size=2",
                "gradient_accumulation_steps=2",
                f"output_dir={tmp_path / 'one-ga2'}",
            ],
        )
    )
    one_b4 = run_stage1(
        load_config(recipe, ["per_device_train_batch_size=4", f"output_dir={tmp_path / 'one-b4'}"])
    )
    record = json.loads((two / "run.json").read_text())
    assert record["device"]["world_size"] == 2 and one_ga["device"]["world_size"] == 1

    curve, same_math, other_weighting = _curve(record), _curve(one_ga), _curve(one_b4)
    assert len(curve) == 4
    for got, want in zip(curve, same_math):  # loss, loss_ar, loss_diff (parts averaged over ranks)
        assert got == pytest.approx(want, rel=1e-5)
    a = load_file(str(two / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one-ga2" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)

    rel = [abs(x[0] - y[0]) / y[0] for x, y in zip(curve, other_weighting)]
    assert max(rel) < 2e-2, rel
    assert max(rel) > 1e-5, rel  # the weighting really differs: the tight check above is not moot

    # One set of checkpoints and final files, written once by rank 0, nothing staged left over.
    names = sorted(p.name for p in two.iterdir())
    assert [n for n in names if n.startswith(".")] == []
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint-2", "checkpoint-4"]
    for final in ("adapter_model.safetensors", "fluid_model.json", "run.json", "tokenizer.json"):
        assert final in names
    for step in (2, 4):
        ckpt = validate_checkpoint(two / f"checkpoint-{step}")
        files = sorted(p.name for p in ckpt.iterdir())
        assert [f for f in files if f.startswith("rng_state")] == [
            "rng_state_0.pth",
            "rng_state_1.pth",
        ]  # one RNG state per rank, everything else once
        assert files.count("adapter_model.safetensors") == 1 and "optimizer.pt" in files
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step

    # Resumed on one process: the same global batch (1 × 2 × 2) continues the two-process run;
    # another one (1 × 2 × 1) is refused before the model loads, naming the accumulation.
    saved = json.loads((two / "checkpoint-2" / BATCH_FILE).read_text())
    assert (saved["world_size"], saved["gradient_accumulation_steps"]) == (2, 1)
    resume = [f"resume_from_checkpoint={two / 'checkpoint-2'}", "per_device_train_batch_size=2"]
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 2 keeps it on 1 process"):
        run_stage1(load_config(recipe, [*resume, f"output_dir={tmp_path / 'refused'}"]))
    resumed = run_stage1(
        load_config(
            recipe,
            [*resume, "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'resumed'}"],
        )
    )
    for got, want in zip(_curve(resumed), curve):  # (the first two: the checkpoint's history)
        assert got == pytest.approx(want, rel=1e-5)
    c = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        (dict(ASCEND_RT_VISIBLE_DEVICES="0,1,2,3"), ["--nproc_per_node=4", "--nnodes=1"]),
        (dict(CUDA_VISIBLE_DEVICES="0,1"), ["--nproc_per_node=2", "--node_rank=0"]),
        (dict(NPROC="3", ASCEND_RT_VISIBLE_DEVICES="0,1"), ["--nproc_per_node=3"]),
        (
            dict(
                ASCEND_RT_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
                NNODES="2",
                NODE_RANK="1",
                MASTER_ADDR="10.1.2.3",
                MASTER_PORT="29999",
            ),
            [
                "--nproc_per_node=8",
                "--nnodes=2",
                "--node_rank=1",
                "--master_addr=10.1.2.3",
                "--master_port=29999",
            ],
        ),
        ({}, ["--nproc_per_node=1", "--nnodes=1", "--master_addr=127.0.0.1"]),
        (dict(MASTER_PORT="29611"), ["--master_addr=127.0.0.1", "--master_port=29611"]),
    ],
)
def test_launcher_maps_devices_and_nodes_to_torchrun(env, expect):
    proc = subprocess.run(
        ["bash", str(LAUNCHER), "train", "configs/demo_stage1.yaml", "k_masks=4"],
        env=_launcher_env(FLUID_DRY_RUN="1", **env),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert args[-5:] == ["-m", "fluid_npu.cli", "train", "configs/demo_stage1.yaml", "k_masks=4"]
    for flag in expect:
        assert flag in args
    assert "HCCL_CONNECT_TIMEOUT=1200 HCCL_EXEC_TIMEOUT=1800" in proc.stderr  # the defaults


@pytest.mark.parametrize(
    ("env", "port"),
    [
        (dict(ASCEND_RT_VISIBLE_DEVICES="0,1,2,3"), None),
        (dict(ASCEND_RT_VISIBLE_DEVICES="4,5,6,7", MASTER_ADDR="127.0.0.2"), None),
        (dict(NPROC="2", MASTER_PORT="29611"), "29611"),
        (dict(NPROC="8", NNODES="2", MASTER_ADDR="10.1.2.3"), "29500"),
    ],
)
def test_single_node_jobs_without_master_port_take_a_free_port(env, port):
    """Two jobs on one node's devices (the README's ASCEND_RT_VISIBLE_DEVICES subsets) must not
    both bind port 29500, the second failing with EADDRINUSE: on one node without MASTER_PORT
    the launcher takes a free port (and keeps MASTER_ADDR, 127.0.0.1 by default: torchrun
    --standalone would hand the workers the host's FQDN, which not every host resolves); a
    MASTER_PORT given, or several nodes (which must agree on one), name theirs."""
    proc = subprocess.run(
        ["bash", str(LAUNCHER), "train", "x.yaml"],
        env=_launcher_env(FLUID_DRY_RUN="1", **env),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    ports = [a.removeprefix("--master_port=") for a in args if a.startswith("--master_port")]
    assert "--standalone" not in args and len(ports) == 1, args
    assert f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}" in args
    if port is None:
        assert ports[0].isdigit() and ports[0] != "29500", args  # (the one taken first, free)
    else:
        assert ports == [port], args


def test_launcher_keeps_user_hccl_values_and_refuses_bad_ones():
    ok = subprocess.run(
        ["bash", str(LAUNCHER), "train", "x.yaml"],
        env=_launcher_env(
            FLUID_DRY_RUN="1", NPROC="1", HCCL_CONNECT_TIMEOUT="600", HCCL_EXEC_TIMEOUT="3600"
        ),
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "HCCL_CONNECT_TIMEOUT=600 HCCL_EXEC_TIMEOUT=3600" in ok.stderr
    one = {"NPROC": "1"}
    bad = [
        (
            one | dict(HCCL_CONNECT_TIMEOUT="60"),
            "HCCL_CONNECT_TIMEOUT=60 must be an integer in [120",
        ),
        (one | dict(HCCL_CONNECT_TIMEOUT="9000"), "HCCL_CONNECT_TIMEOUT=9000 must be"),
        (one | dict(NNODES="2"), "NNODES=2 needs MASTER_ADDR"),
        (
            one | dict(NNODES="2", NODE_RANK="2", MASTER_ADDR="h"),
            "NODE_RANK=2 must be an integer in [0, 1]",
        ),
        (dict(NPROC="two"), "NPROC or the visible devices)=two"),
        (dict(CUDA_VISIBLE_DEVICES=","), "NPROC or the visible devices)=0"),
    ]
    for env, message in bad:
        proc = subprocess.run(
            ["bash", str(LAUNCHER), "train", "x.yaml"],
            env=_launcher_env(FLUID_DRY_RUN="1", **env),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, (env, proc.stderr)
        assert message in proc.stderr, (env, proc.stderr)
        assert proc.stdout == ""


def _cpu() -> devices.DeviceChoice:
    return devices.choose(npu=False, cuda=False, bf16_supported=True, want_bf16=False)


def test_deepspeed_and_fsdp_keys_reach_training_arguments(tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    seen: dict[str, object] = {}

    class Spy:  # TrainingArguments as the Trainer would get it (without DeepSpeed starting)
        def __init__(self, **kwargs: object) -> None:
            seen.update(kwargs)

    monkeypatch.setattr(common, "TrainingArguments", Spy)
    monkeypatch.setattr(deepspeed_setup, "deepspeed_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "")  # (so that undo restores what was there, or none)
    monkeypatch.delenv("DS_ACCELERATOR")
    # DeepSpeed takes its NPU accelerator wherever torch_npu imports, NPU or not (a CANN host with
    # no NPU visible, stood in for here): a CPU run gets DeepSpeed's CPU accelerator, and leaves
    # no setting behind for later runs or the processes it starts
    from deepspeed.accelerator import get_accelerator, real_accelerator

    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # (none chosen yet)
    cfg = load_config(None, [f"output_dir={tmp_path / 'o'}", f"deepspeed={ds}"])
    common.training_arguments(cfg, _cpu())
    assert seen["deepspeed"] == str(ds)
    assert get_accelerator().device_name() == "cpu"
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.undo()

    wrap = tmp_path / "fsdp.json"
    wrap.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
    for fsdp in ("full_shard auto_wrap", "true"):
        cfg = load_config(
            None, [f"output_dir={tmp_path / 'o'}", f"fsdp={fsdp}", f"fsdp_config={wrap}"]
        )
        args = common.training_arguments(cfg, _cpu())  # the real TrainingArguments
        assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == [
            "LlamaDecoderLayer"
        ]


def test_deepspeed_config_problems_are_config_errors(tmp_path, monkeypatch):
    out = f"output_dir={tmp_path / 'o'}"
    with pytest.raises(ConfigError, match="does not exist; point it at a JSON file"):
        common.training_arguments(load_config(None, [out, "deepspeed=nope.json"]), _cpu())
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": ')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        common.training_arguments(load_config(None, [out, f"deepspeed={broken}"]), _cpu())
    sharded = tmp_path / "z3.json"  # (DeepSpeed's default: the weights stay sharded on save)
    sharded.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        common.training_arguments(load_config(None, [out, f"deepspeed={sharded}"]), _cpu())
    monkeypatch.setattr(deepspeed_setup, "deepspeed_available", lambda: False)
    ds = ROOT / "configs" / "ds_z2.json"
    with pytest.raises(ConfigError, match="deepspeed package is not installed"):
        common.training_arguments(load_config(None, [out, f"deepspeed={ds}"]), _cpu())


def test_the_dataset_index_survives_the_trainer_dataloader(tiny_model_dir, demo_data, tmp_path):
    """The layout draws are seeded by the ``index`` column: the Trainer must not drop it."""
    from fluid_npu.train.session import TrainingSession

    cfg = load_config(None, [f"{k}={v}" for k, v in _recipe(tiny_model_dir, demo_data).items()])
    cfg.train.output_dir = str(tmp_path / "o")
    session = TrainingSession(cfg, stage="fluid_stage1")
    seen: list[list[int]] = []
    trainer = common.FluidTrainer(
        model=session.model,
        args=session.args,
        train_dataset=session.data.train,
        data_collator=lambda feats: seen.append([f["index"] for f in feats]) or {},
    )
    next(iter(trainer.get_train_dataloader()))
    assert seen and all(len(batch) == cfg.train.per_device_train_batch_size for batch in seen)
    assert all(isinstance(i, int) and 0 <= i < len(session.data.train) for b in seen for i in b)


def test_one_process_environment_only_where_no_launcher_set_one():
    from fluid_npu.cli import one_process_environment

    env: dict[str, str] = {}
    assert one_process_environment(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("0", "0", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    launched = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert not one_process_environment(launched)
    assert launched == {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    for mpi_or_slurm in ({"OMPI_COMM_WORLD_SIZE": "4"}, {"SLURM_NTASKS": "8"}):
        assert not one_process_environment(dict(mpi_or_slurm))  # (their launch: theirs to set)


def test_fluid_train_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch):
    """The one-process environment ``fluid train`` sets for deepspeed / fsdp lasts for that run
    only: a later run in the same Python process is not made distributed by it."""
    import fluid_npu.train.stage1 as stage1
    from fluid_npu.cli import ONE_PROCESS, main

    seen = []

    def fake_run(cfg):
        seen.append(os.environ.get("WORLD_SIZE"))
        return {}

    monkeypatch.setattr(stage1, "run_stage1", fake_run)
    for key in ONE_PROCESS:
        monkeypatch.delenv(key, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: fluid_stage1\n")
    assert main(["train", str(recipe), "fsdp=full_shard", f"output_dir={tmp_path}"]) == 0
    assert main(["train", str(recipe), f"output_dir={tmp_path}"]) == 0
    assert seen == ["1", None] and not any(k in os.environ for k in ONE_PROCESS)


@pytest.mark.slow
def test_fsdp_without_a_launcher_trains_as_one_process(tiny_model_dir, demo_data, tmp_path):
    """``fluid train`` with ``fsdp`` (or ``deepspeed``) and no torchrun trains as one process,
    saying so, where the Trainer alone stops ("fsdp only works in distributed training")."""
    recipe = tmp_path / "stage1.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe(tiny_model_dir, demo_data), "max_steps": 1}))
    out = tmp_path / "fsdp-one"
    env = _launcher_env(OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "fluid_npu.cli", "train", str(recipe), "fsdp=full_shard",
           f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training as one process on one device" in proc.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["device"]["world_size"] == 1
    assert record["parallelism"]["wrapper"].startswith("FSDP")
