"""Stage I end to end on a tiny model: losses fall, the run saves and reloads exactly, resume
continues the same run, the fused loss equals the reference loss, and `fluid merge` works."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import as_overrides, tiny_stage1_recipe
from synthetic import write_short_dataset
from transformers import AutoModelForCausalLM

from fluid_npu import device as devices
from fluid_npu.cli import main as cli_main
from fluid_npu.config import load_config
from fluid_npu.layout import LayoutConfig
from fluid_npu.model.adapters import FluidModelMeta, load_fluid
from fluid_npu.model.attention import configure_attention
from fluid_npu.model.merge import merge_adapter
from fluid_npu.train.stage1 import LayoutCollator, stage1_loss
from fluid_npu.train.stage1 import run_stage1 as run


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_short_dataset(tmp_path_factory.mktemp("data"), n_train=64, seed=0)


def _overrides(base, data, out, **extra) -> list[str]:
    values = dict(
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        max_steps=50,
        logging_steps=10,
        save_steps=1000,
        output_dir=str(out),
    )
    values.update(extra)
    return as_overrides(tiny_stage1_recipe(base, data, **values))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    record = run(load_config(None, _overrides(tiny_model_dir, demo_data, out)))
    return out, record


@pytest.fixture(scope="module")
def trained_full(tiny_model_dir, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1-full")
    extra = dict(finetuning_type="full", learning_rate=3e-3, save_steps=50)  # (checkpoint-50)
    record = run(load_config(None, _overrides(tiny_model_dir, demo_data, out, **extra)))
    return out, record


@pytest.mark.parametrize("which", ["trained", "trained_full"])
def test_stage1_lowers_both_losses(which, request):
    out, record = request.getfixturevalue(which)
    logs = [h for h in record["log_history"] if "loss_ar" in h]
    assert len(logs) == 5
    for key in ("loss_ar", "loss_diff"):  # LoRA on a random base plateaus early, but does learn
        assert min(h[key] for h in logs[1:]) < logs[0][key] - 0.05
    if (
        which == "trained_full"
    ):  # full fine-tuning of the tiny model learns the task's alphabet fast
        assert logs[-1]["loss_ar"] < 0.75 * logs[0]["loss_ar"]
        assert logs[-1]["loss_diff"] < 0.75 * logs[0]["loss_diff"]
    saved = json.loads((out / "run.json").read_text())
    for key in ("train_loss", "loss_ar", "loss_diff", "versions", "device", "config"):
        assert key in saved
    assert saved["config"]["k_masks"] == 4 and saved["device"]["type"] == devices.current().type
    weights = "adapter_model.safetensors" if which == "trained" else "model.safetensors"
    if which == "trained_full":  # (off while training; the saved model decodes with its cache)
        config = json.loads((out / "config.json").read_text())
        assert config["use_cache"] is True
        # RoPE and dtype as transformers 4.x runtimes read them too (model/legacy_config.py),
        # in the final model and in a checkpoint (a model directory as well)
        for saved in (config, json.loads((out / "checkpoint-50" / "config.json").read_text())):
            assert saved["rope_theta"] == saved["rope_parameters"]["rope_theta"]
            assert saved["torch_dtype"] == saved["dtype"]
    assert (out / weights).is_file() and (out / "fluid_model.json").is_file()
    assert not list(out.glob(".staging-*"))  # nothing half-written left behind


def test_a_relative_base_path_is_recorded_absolute(
    tiny_model_dir, demo_data, tmp_path, monkeypatch
):
    # peft's AutoPeftModelForCausalLM loads the base from adapter_config.json's path: it must not
    # depend on the directory the training ran in
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    out = tmp_path / "rel"
    run(load_config(None, _overrides(Path(tiny_model_dir).name, demo_data, out, max_steps=1)))
    where = str(Path(tiny_model_dir).resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == where
    assert json.loads((out / "fluid_model.json").read_text())["base_model"] == where


def test_saved_run_reloads_to_identical_logits(trained, tiny_model_dir):
    out, _ = trained
    first = load_fluid(tiny_model_dir, out)
    second = load_fluid(tiny_model_dir, out)
    assert first.mask.token == "<|mask|>" and first.mask.source == "tokenizer"
    ids = torch.randint(0, 250, (2, 12))
    ids[0, 5] = first.mask.id
    with torch.no_grad():
        a, b = first.model(ids).logits, second.model(ids).logits
    assert torch.equal(a, b)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(first.tokenizer))
    with torch.no_grad():  # the adapter really changed the model
        assert not torch.allclose(a[1], base(ids).logits[1], atol=1e-3)


def test_loading_an_adapter_prints_no_third_party_notices(trained, tiny_model_dir):
    # a fresh process: bitsandbytes logs its notice once, when peft first imports it
    out, _ = trained
    code = (
        "import sys; from fluid_npu.model.adapters import load_fluid; "
        "assert 'peft' not in sys.modules; load_fluid(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    run_ = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run_.returncode == 0, run_.stderr
    for notice in ("gemm_4bit", "is_gradient_checkpointing"):
        assert notice not in run_.stderr, run_.stderr


def test_merge_loads_with_plain_transformers(trained, tiny_model_dir, tmp_path, capsys):
    out, _ = trained
    merged_dir = tmp_path / "merged"
    argv = ["merge", "--base", str(tiny_model_dir), "--adapter", str(out)]
    # bad sizes and an --output under a file: refused before the weights load
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, message in (
        (["--max-shard-size", "5GiB"], "--max-shard-size '5GiB': give a size such as 5GB"),
        (["--output", str(afile / "sub")], "lies under"),
    ):
        assert cli_main([*argv, "--output", str(merged_dir), *extra]) == 2
        assert message in capsys.readouterr().err
    # shards of at most --max-shard-size (here in bytes), with their index, as LLaMA-Factory's
    # export_size
    argv_sharded = [*argv, "--output", str(merged_dir), "--max-shard-size", "200000"]
    assert cli_main(argv_sharded) == 0
    shards = sorted(merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ref = load_fluid(tiny_model_dir, out).model
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert cli_main([*argv, "--output", str(merged_dir)]) == 2  # never overwrites a model
    # RoPE and dtype as transformers 4.x runtimes read them too (model/legacy_config.py)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert config["torch_dtype"] == config["dtype"] == "float32"


def test_merge_keeps_what_stage1_recorded(trained, tiny_model_dir, tmp_path):
    """The merged model's fluid_model.json keeps Stage I's record (k_masks, template, MASK token,
    vocabulary); only where the weights came from is written anew."""
    out, _ = trained
    merged = merge_adapter(tiny_model_dir, out, tmp_path / "merged")
    source, saved = FluidModelMeta.load(out), FluidModelMeta.load(merged)
    assert source.k_masks == 4 and saved.k_masks == 4
    provenance = {"base_fingerprint", "base_model", "stage", "source_fingerprint",
                  "adapter_fingerprint"}  # fmt: skip
    for field in dataclasses.fields(FluidModelMeta):
        if field.name not in provenance:
            assert getattr(saved, field.name) == getattr(source, field.name), field.name
    assert (saved.stage, saved.source_fingerprint) == (
        "fluid_stage1_merged",
        source.base_fingerprint,
    )


def test_resume_from_checkpoint_continues_the_same_run(tiny_model_dir, demo_data, tmp_path):
    common = dict(max_steps=8, save_steps=4, logging_steps=1)
    full = run(
        load_config(None, _overrides(tiny_model_dir, demo_data, tmp_path / "full", **common))
    )
    part = tmp_path / "part"
    run(
        load_config(None, _overrides(tiny_model_dir, demo_data, part, **{**common, "max_steps": 4}))
    )
    resumed = run(
        load_config(
            None,
            _overrides(
                tiny_model_dir,
                demo_data,
                tmp_path / "resumed",
                **common,
                resume_from_checkpoint=str(part / "checkpoint-4"),
            ),
        )
    )
    losses = lambda r: [h["loss"] for h in r["log_history"] if "loss" in h]  # noqa: E731
    assert len(losses(full)) == 8
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)  # restored history + new steps
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_fused_and_pooled_losses_match_the_reference(make_model, tokenizer):
    model = make_model("qwen2", tokenizer)
    layout = LayoutConfig(
        mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id, k_max=4, seed=1
    )
    feats = []
    for i, n in enumerate([20, 14, 17]):
        ids = torch.randint(0, 250, (n,)).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:], "index": i})
    batch = LayoutCollator(layout)(feats)
    results = {}
    for backend in ("sdpa", "reference", "blocked"):
        configure_attention(model, backend)
        for fused in (False, True):
            model.zero_grad()
            loss, parts = stage1_loss(model, batch, fused=fused)
            loss.backward()
            grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
            results[(backend, fused)] = (loss.detach(), parts, grad)
    ref_loss, ref_parts, ref_grad = results[("sdpa", False)]
    assert torch.isclose(ref_loss, ref_parts["loss_ar"] + ref_parts["loss_diff"])
    for key, (loss, _, grad) in results.items():
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=str(key))
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4, msg=str(key))
    pooled, _ = stage1_loss(model, batch, reduction="pooled", fused=True)
    anchor, labels = batch["anchor"], batch["labels"]
    n_ar = ((anchor == -1) & (labels != -100)).sum()
    n_diff = ((anchor >= 0) & (labels != -100)).sum()
    expect = (ref_parts["loss_ar"] * n_ar + ref_parts["loss_diff"] * n_diff) / (n_ar + n_diff)
    torch.testing.assert_close(pooled.detach(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_gradient_checkpointing_trains_as_without_it(finetuning_type, tiny_model_dir, demo_data,
                                                     tmp_path):  # fmt: skip
    """``gradient_checkpointing: true`` (the openPangu recipe's, LLaMA-Factory's default) recomputes
    the forward in the backward: the same losses and weights, LoRA (its input gradients enabled
    for the frozen embedding) and full fine-tuning alike."""
    from safetensors.torch import load_file

    common = dict(max_steps=3, logging_steps=1, finetuning_type=finetuning_type)
    runs = {}
    for on in (False, True):
        out = tmp_path / f"gc-{on}"
        extra = {**common, "gradient_checkpointing": on}
        runs[on] = (
            run(load_config(None, _overrides(tiny_model_dir, demo_data, out, **extra))),
            out,
        )
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r, _ in runs.values()]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    name = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    a, b = (load_file(str(out / name)) for _, out in runs.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_the_trainers_import_without_third_party_notices():
    """Whatever starts a run (``fluid train`` with any recipe, ``fluid demo``, ``run_stage1`` from
    Python), importing the trainers shows no bitsandbytes notice about its optional 4-bit CPU
    kernels (transformers' Trainer imports peft, peft bitsandbytes): the demo's recipe, whose keys
    never made the config import them quietly, showed it."""
    code = (
        "import logging; logging.basicConfig(); from fluid_npu.config import load_config; "
        "load_config('fluid_npu/demo/configs/demo_stage1.yaml', []); "
        "import fluid_npu.train.stage1, fluid_npu.train.stage2"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    run_ = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert run_.returncode == 0, run_.stderr
    assert "gemm_4bit" not in run_.stderr, run_.stderr
