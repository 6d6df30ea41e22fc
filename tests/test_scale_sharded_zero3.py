"""Runs built on a finished two-process Stage I run (``test_scale_sharded``'s DDP baseline), under
DeepSpeed ZeRO-3 against DDP: Stage II (the K-head partitioned, the frozen backbone whole on every
process) and Stage I continued from the finished adapter (``adapter_name_or_path``, its weights
loaded into partitioned parameters). A file of their own so that the test runner's workers run them
beside the other sharded runs (each file builds its own baseline).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import test_scale_sharded as sharded
import torch
import yaml
from test_scale_sharded import LOSS_RTOL, _curve, _same_adapter, _same_curve, _two_processes

setup, ddp = sharded.setup, sharded.ddp  # (module fixtures: this file builds its own)


@pytest.mark.slow
def test_stage2_trains_the_khead_under_zero3_as_under_ddp(setup, ddp):
    """The K-head is partitioned by ZeRO-3; the frozen backbone stays whole on every process."""
    recipe = yaml.safe_load((setup / "stage1.yaml").read_text())
    recipe.update(stage="fluid_stage2", adapter_name_or_path=str(setup / "ddp"), khead_tau=5.5)
    (setup / "stage2.yaml").write_text(yaml.safe_dump(recipe))

    def run(out: str, *keys: str) -> dict:
        return _two_processes(setup, setup / out, *keys, recipe_name="stage2.yaml")

    plain = run("s2-ddp")
    zero3 = run("s2-zero3", f"deepspeed={setup / 'z3.json'}")
    # the shipped ZeRO-2 file (the openPangu recipe's): its "auto" reduce_bucket_size is filled
    # from the backbone's hidden size (the Trainer reads model.config, which the head lacks)
    zero2 = run("s2-zero2", f"deepspeed={sharded.ROOT / 'configs' / 'ds_z2.json'}")
    assert plain["parallelism"]["wrapper"] == "DistributedDataParallel"
    par = zero3["parallelism"]
    assert (par["wrapper"], par["zero_stage"]) == ("DeepSpeedEngine", 3)
    assert par["local_param_fraction"] == pytest.approx(0.5, abs=0.01)  # the head is partitioned
    assert (zero2["parallelism"]["wrapper"], zero2["parallelism"]["zero_stage"]) == (
        "DeepSpeedEngine", 2)  # fmt: skip
    for sharded_run in (zero3, zero2):
        losses = [
            [h["loss"] for h in r["log_history"] if "loss" in h] for r in (sharded_run, plain)
        ]
        assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL)
        assert sharded_run["khead_exact_acc"] == pytest.approx(plain["khead_exact_acc"], abs=1e-6)


@pytest.mark.slow
def test_a_finished_adapter_continues_under_zero3_as_under_ddp(setup, ddp):
    """Stage I continued from the DDP run's adapter: ZeRO-3 partitions the parameters it loads
    into, and still starts from the adapter and trains as DDP does."""
    plain, zero3 = sharded._continued_under_ddp_and_zero3(setup, max_steps=2)
    _same_curve(zero3, plain)
    # it starts where the adapter got to, not where a new one starts (measured: 10.35 vs 11.15)
    assert _curve(plain)[0][0] < _curve(ddp)[0][0] - 0.5
    _same_adapter(setup / "c-zero3", setup / "c-ddp")


@pytest.mark.slow
def test_bf16_under_zero2_is_recorded_as_deepspeed_ran_it(setup):
    """The openPangu recipe's bf16 + configs/ds_z2.json: DeepSpeed holds the module in bf16 (the
    float32 masters in its optimizer) and the Trainer runs without autocast — run.json says so,
    and the adapter it saved is the module's bf16."""
    ds_z2 = sharded.ROOT / "configs" / "ds_z2.json"
    out = setup / "bf16-zero2"
    record = _two_processes(setup, out, f"deepspeed={ds_z2}", "bf16=true")
    precision = record["precision"]
    assert precision["autocast"] is False
    assert precision["deepspeed_mixed_precision"] == "bfloat16"
    assert set(precision["trainable_params"]) == {"bfloat16"}
    assert precision["master_weights"].startswith("float32")
    saved = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
