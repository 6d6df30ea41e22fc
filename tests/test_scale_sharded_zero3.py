"""Runs built on a finished two-process Stage I run (``test_scale_sharded``'s DDP baseline), under
DeepSpeed ZeRO-3 against DDP: Stage II (the K-head partitioned, the frozen backbone whole on every
process) and Stage I continued from the finished adapter (``adapter_name_or_path``, its weights
loaded into partitioned parameters). A file of their own so that the test runner's workers run them
beside the other sharded runs (each file builds its own baseline).
"""

from __future__ import annotations

import pytest
import test_scale_sharded as sharded
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
    assert plain["parallelism"]["wrapper"] == "DistributedDataParallel"
    par = zero3["parallelism"]
    assert (par["wrapper"], par["zero_stage"]) == ("DeepSpeedEngine", 3)
    assert par["local_param_fraction"] == pytest.approx(0.5, abs=0.01)  # the head is partitioned
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in (zero3, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL)
    assert zero3["khead_exact_acc"] == pytest.approx(plain["khead_exact_acc"], abs=1e-6)


@pytest.mark.slow
def test_a_finished_adapter_continues_under_zero3_as_under_ddp(setup, ddp):
    """Stage I continued from the DDP run's adapter: ZeRO-3 partitions the parameters it loads
    into, and still starts from the adapter and trains as DDP does."""
    plain, zero3 = sharded._continued_under_ddp_and_zero3(setup, max_steps=2)
    _same_curve(zero3, plain)
    # it starts where the adapter got to, not where a new one starts (measured: 10.35 vs 11.15)
    assert _curve(plain)[0][0] < _curve(ddp)[0][0] - 0.5
    _same_adapter(setup / "c-zero3", setup / "c-ddp")
