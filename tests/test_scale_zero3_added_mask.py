"""Stage I with a MASK token Stage I *added* (its base's tokenizer has none) under DeepSpeed ZeRO-3,
against DDP, on two gloo processes: a new adapter, and the DDP one continued.

The added token resizes the embedding and head, and its embedding row trains as a peft
trainable-token delta saved with the adapter (``test_scale_sharded``'s base has a MASK token, so
no row trains there). Under ZeRO-3 that delta is set up from, and loaded into, partitioned weights:
each run must train as DDP does and save the same MASK row and LoRA weights (the same model once
loaded; DDP's adapter also holds the resized frozen embedding and head, which ZeRO-3 saves without
and loading rebuilds). Continued (``adapter_name_or_path``), the run starts where the parent ended —
its held-out loss before the first update is the parent's final one — and keeps its MASK token and
id. A full fine-tune with ``bf16`` trains there too, as one process: the resized embedding and head
(not partitioned by loading) are stored in the dtype of DeepSpeed's partitions, not precision.py's
fp32 (DeepSpeed keeps the fp32 master weights), as its stage-3 optimizer takes one dtype.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_scale_sharded as sharded
import torch
import yaml
from conftest import tiny_stage1_recipe
from safetensors.torch import load_file
from synthetic import write_short_dataset
from test_scale_sharded import (
    LOSS_RTOL,
    ROOT,
    WEIGHT_ATOL,
    ZERO3,
    _curve,
    _same_curve,
    _two_processes,
)
from transformers import AutoTokenizer

from fluid_npu.model.adapters import load_fluid
from fluid_npu.model.tiny import save_tiny

WEIGHTS = "adapter_model.safetensors"
MASK_ROW = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"

ddp = sharded.ddp  # (a module fixture, run on this file's setup: the new adapter under DDP)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("added-mask")
    base = save_tiny(root / "base")  # (no MASK token: Stage I adds one)
    data = write_short_dataset(root / "data", n_train=28, seed=0)
    recipe = tiny_stage1_recipe(
        base, data, max_steps=2, save_steps=100, logging_steps=1, per_device_train_batch_size=2,
        val_size=4, eval_steps=100,  # held out: evaluated at the end (and a continuation's start)
    )  # fmt: skip
    (root / "stage1.yaml").write_text(yaml.safe_dump(recipe))
    (root / "z3.json").write_text(json.dumps(ZERO3))
    return root


def _eval_losses(record: dict) -> list[float]:
    return [h["eval_loss"] for h in record["log_history"] if "eval_loss" in h]


def _same_trained(got: Path, want: Path, base: Path) -> None:
    """``got``'s adapter holds ``want``'s trained weights and loads as the same model."""
    a, b = load_file(str(got / WEIGHTS)), load_file(str(want / WEIGHTS))
    assert MASK_ROW in a and a.keys() <= b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    a, b = (load_fluid(base, out, merge=True) for out in (got, want))
    assert a.mask == b.mask
    weights = b.model.state_dict()
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


@pytest.mark.slow
def test_an_added_mask_trains_under_zero3_as_under_ddp(setup, ddp):
    assert ddp["mask_token"]["source"] == "added"
    record = _two_processes(setup, setup / "zero3", f"deepspeed={setup / 'z3.json'}")
    assert record["parallelism"]["zero_stage"] == 3
    assert record["parallelism"]["local_param_fraction"] == pytest.approx(0.5, abs=0.01)
    assert record["mask_token"] == ddp["mask_token"]
    _same_curve(record, ddp)
    assert _eval_losses(record) == pytest.approx(_eval_losses(ddp), rel=LOSS_RTOL)
    _same_trained(setup / "zero3", setup / "ddp", setup / "base")


@pytest.mark.slow
def test_an_added_mask_adapter_continues_under_zero3_as_under_ddp(setup, ddp):
    mask = ddp["mask_token"]
    plain, zero3 = sharded._continued_under_ddp_and_zero3(setup, eval_on_start=True)
    # each starts from the parent as it ended: the held-out loss before the first update
    for record in (plain, zero3):
        assert _eval_losses(record)[0] == pytest.approx(_eval_losses(ddp)[-1], rel=LOSS_RTOL)
    assert _curve(plain)[0][0] < _curve(ddp)[0][0]  # (the parent's first loss: a new adapter's)
    _same_curve(zero3, plain)
    assert _eval_losses(zero3) == pytest.approx(_eval_losses(plain), rel=LOSS_RTOL)
    _same_trained(setup / "c-zero3", setup / "c-ddp", setup / "base")
    moved = load_file(str(setup / "c-zero3" / WEIGHTS))[MASK_ROW]
    assert not torch.equal(moved, load_file(str(setup / "ddp" / WEIGHTS))[MASK_ROW])  # trained on
    # the parent's MASK token and id: in the run record, fluid_model.json and the tokenizer
    for record in (plain, zero3):
        assert record["mask_token"] == {**mask, "source": "adapter"}
    for out in ("c-ddp", "c-zero3"):
        meta = json.loads((setup / out / "fluid_model.json").read_text())
        assert (meta["mask_token"], meta["mask_id"]) == (mask["token"], mask["id"])
        tokenizer = AutoTokenizer.from_pretrained(setup / out)
        assert (tokenizer.mask_token, tokenizer.mask_token_id) == (mask["token"], mask["id"])


@pytest.mark.slow
def test_a_bf16_full_fine_tune_adds_the_mask_under_zero3_in_one_process(setup):
    recipe = yaml.safe_load((setup / "stage1.yaml").read_text())
    for key in ("lora_rank", "lora_alpha"):
        del recipe[key]
    recipe.update(finetuning_type="full", bf16=True, max_steps=1)
    (setup / "full.yaml").write_text(yaml.safe_dump(recipe))
    out = setup / "full-zero3"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}  # fmt: skip
    cmd = [sys.executable, "-m", "fluid_npu.cli", "train", str(setup / "full.yaml"),
           f"deepspeed={setup / 'z3.json'}", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert record["parallelism"]["zero_stage"] == 3
    assert all(math.isfinite(loss) for loss, _, _ in _curve(record))
    # every trainable weight as DeepSpeed stored it: bf16 (its optimizer holds the fp32 masters)
    precision = record["precision"]
    assert (precision["mode"], list(precision["trainable_params"])) == ("bf16", ["bfloat16"])
    mask = record["mask_token"]
    assert mask["source"] == "added"
    meta = json.loads((out / "fluid_model.json").read_text())
    assert (meta["mask_token"], meta["mask_id"]) == (mask["token"], mask["id"])
    loaded = load_fluid(out)
    assert (loaded.mask.token, loaded.mask.id) == (mask["token"], mask["id"])
    assert loaded.model.get_input_embeddings().num_embeddings == mask["id"] + 1
