"""``run.json`` says what a run really did: the parallelism observed after the Trainer's set-up,
the token rates (main stream and expanded layout) and the peak memory, also at every logging step.
The multi-process wrappers (DDP, FSDP) are checked in ``test_scale_sharded``."""

from __future__ import annotations

import json

import pytest
from conftest import as_overrides, tiny_stage1_recipe
from synthetic import write_short_dataset

from fluid_npu.config import load_config
from fluid_npu.data import build_sft_dataset
from fluid_npu.model.loading import load_tokenizer
from fluid_npu.train.stage1 import run_stage1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_short_dataset(tmp_path_factory.mktemp("data"), n_train=16, seed=0)


def test_a_single_process_run_reports_parallelism_tokens_and_memory(tiny_model_dir, data, tmp_path):
    values = dict(max_steps=4, logging_steps=1, per_device_train_batch_size=4, output_dir=tmp_path)
    cfg = load_config(None, as_overrides(tiny_stage1_recipe(tiny_model_dir, data, **values)))
    record = run_stage1(cfg)
    assert record["parallelism"] == {
        "world_size": 1,
        "wrapper": None,  # nothing wrapped the model
        "zero_stage": None,
        "local_param_fraction": 1.0,
        "requested": {},
    }
    # 4 steps × 4 = one epoch of the 16 examples: every token of every example is a main token
    tokens = build_sft_dataset(cfg.data, load_tokenizer(tiny_model_dir)).stats.tokens
    figures = record["throughput"]
    assert figures["tokens_main"] == tokens
    assert figures["tokens_expanded"] > figures["tokens_main"]  # plus the MASK slots
    assert figures["tokens_per_s_expanded"] > figures["tokens_per_s_main"] > 0
    assert figures["peak_memory_mib"] > 0 and figures["memory_kind"] in (
        "host_rss",
        "device_allocated",
    )
    steps = [h for h in record["log_history"] if "loss" in h]
    assert len(steps) == 4
    for h in steps:
        assert h["tokens_per_s_expanded"] > h["tokens_per_s_main"] > 0 and h["peak_memory_mib"] > 0
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk["parallelism"] == record["parallelism"]
