"""Stage I continued from a finished Stage I adapter (``adapter_name_or_path``), as LLaMA-Factory
continues a LoRA adapter: training starts from the adapter's weights (its MASK row included) with
its LoRA settings, and every disagreement with the recipe or the base is one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import as_overrides, tiny_stage1_recipe
from safetensors.torch import load_file
from synthetic import write_short_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_npu.config import load_config
from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.model.adapters import load_fluid
from fluid_npu.model.mask_token import MaskToken
from fluid_npu.model.tiny import save_tiny
from fluid_npu.train.session import TrainingSession
from fluid_npu.train.stage1 import run_stage1 as run

WEIGHTS = "adapter_model.safetensors"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(base, data, out, **extra):
    values = dict(per_device_train_batch_size=4, lr_scheduler_type="constant", save_steps=1000,
                  logging_steps=1, output_dir=str(out), **extra)  # fmt: skip
    recipe = tiny_stage1_recipe(base, data, **values)
    if "adapter_name_or_path" in extra:  # (the shared recipe sets rank 8, alpha 16, empty)
        for key in ("lora_rank", "lora_alpha", "template"):
            if key not in extra:
                del recipe[key]
    return load_config(None, as_overrides(recipe))


def _run(base, data, out, **extra) -> dict:
    return run(_config(base, data, out, **extra))


@pytest.fixture(scope="module")
def parent(tiny_model_dir, tmp_path_factory):
    """A finished Stage I adapter (rank 4, alpha 8) on a base that had no MASK token."""
    data = write_short_dataset(tmp_path_factory.mktemp("data"), n_train=32, seed=0)
    out = tmp_path_factory.mktemp("parent")
    record = _run(tiny_model_dir, data, out, max_steps=30, lora_rank=4, lora_alpha=8)
    assert record["mask_token"]["source"] == "added"
    return data, out, record


def _first_loss(record: dict) -> float:
    return next(h["loss"] for h in record["log_history"] if "loss" in h)


def test_a_continued_adapter_trains_on_from_its_weights(parent, tiny_model_dir, tmp_path):
    data, out, record = parent
    # what the run starts from is the adapter as saved, bit for bit (its MASK row too)
    session = TrainingSession(_config(tiny_model_dir, data, tmp_path / "s",
                                      adapter_name_or_path=str(out)), "fluid_stage1")  # fmt: skip
    session.model.save_pretrained(str(tmp_path / "as-loaded"))
    before = load_file(str(out / WEIGHTS))
    loaded = load_file(str(tmp_path / "as-loaded" / WEIGHTS))
    assert before.keys() == loaded.keys()
    for key in before:
        assert torch.equal(before[key], loaded[key]), key
    assert sum(p.requires_grad for p in session.model.parameters()) > 0
    assert session.mask == MaskToken(record["mask_token"]["token"], record["mask_token"]["id"],
                                     "adapter")  # fmt: skip
    # an adapter directory without the tokenizer: the base's, its MASK token added again
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", WEIGHTS, "fluid_model.json"):
        shutil.copy(out / name, bare / name)
    again = TrainingSession(_config(tiny_model_dir, data, tmp_path / "s2",
                                    adapter_name_or_path=str(bare)), "fluid_stage1")  # fmt: skip
    assert again.mask == session.mask
    # ... also on a base whose embedding has more rows than its tokenizer has tokens (Qwen-style)
    padded = tmp_path / "padded-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(padded)
    _run(padded, data, tmp_path / "p", max_steps=1, lora_rank=4)
    for name in ("adapter_config.json", WEIGHTS, "fluid_model.json"):
        shutil.copy(tmp_path / "p" / name, bare / name)
    meta = json.loads((bare / "fluid_model.json").read_text())
    assert meta["mask_id"] < meta["vocab_size"]  # (the added MASK took a padding row)
    again = TrainingSession(_config(padded, data, tmp_path / "s3",
                                    adapter_name_or_path=str(bare)), "fluid_stage1")  # fmt: skip
    assert (again.mask.token, again.mask.id) == (meta["mask_token"], meta["mask_id"])
    # its first loss (taken before the first update) is the trained adapter's, not a new one's
    kept = _run(tiny_model_dir, data, tmp_path / "kept", max_steps=1, adapter_name_or_path=str(out),
                lora_alpha="null")  # (null: left out)  # fmt: skip
    fresh = _run(tiny_model_dir, data, tmp_path / "fresh", max_steps=1, lora_rank=4, lora_alpha=8)
    assert _first_loss(kept) < _first_loss(fresh) - 0.5  # (measured: 10.05 against 11.03)
    assert (kept["config"]["lora_rank"], kept["config"]["lora_alpha"]) == (4, 8)  # the adapter's
    assert kept["config"]["template"] == "empty"  # (its base has a chat template of its own)
    assert kept["config"]["lora_target"] == sorted(LINEAR)  # ("all": every linear but the head)
    assert kept["mask_token"]["id"] == record["mask_token"]["id"]
    # trained on: the weights move, and the result loads as any Stage I output
    _run(tiny_model_dir, data, tmp_path / "more", max_steps=3, adapter_name_or_path=str(out))
    moved = load_file(str(tmp_path / "more" / WEIGHTS))
    assert any(not torch.equal(before[key], moved[key]) for key in before)
    loaded = load_fluid(tiny_model_dir, tmp_path / "more")
    assert loaded.mask.id == record["mask_token"]["id"]


def test_continuing_refuses_what_does_not_match(parent, tiny_model_dir, tmp_path):
    data, out, _ = parent
    with pytest.raises(ConfigError, match=r"lora_rank: 8 \(the adapter's: 4\)"):
        _run(tiny_model_dir, data, tmp_path / "a", max_steps=1, lora_rank=8,
             adapter_name_or_path=str(out))  # fmt: skip
    with pytest.raises(ConfigError, match=r"lora_target: \['q_proj'\]"):
        _run(tiny_model_dir, data, tmp_path / "a", max_steps=1, lora_target="[q_proj]",
             adapter_name_or_path=str(out))  # fmt: skip
    for target in ("all", "[" + ", ".join(LINEAR) + "]"):  # its targets, named either way
        _run(tiny_model_dir, data, tmp_path / "t", max_steps=1, lora_target=target,
             adapter_name_or_path=str(out), overwrite_output_dir=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"template: 'default' \(the adapter's: 'empty'\)"):
        _run(tiny_model_dir, data, tmp_path / "a", max_steps=1, template="default",
             adapter_name_or_path=str(out))  # fmt: skip
    with pytest.raises(ConfigError, match="is the adapter being continued"):
        _run(tiny_model_dir, data, out, max_steps=1, adapter_name_or_path=str(out))
    with pytest.raises(CheckpointError, match="not a LoRA adapter directory"):
        _run(tiny_model_dir, data, tmp_path / "b", max_steps=1,
             adapter_name_or_path=str(tiny_model_dir))  # fmt: skip
    with pytest.raises(CheckpointError, match="no-such-run does not exist"):  # (misspelt)
        _run(tiny_model_dir, data, tmp_path / "b", max_steps=1,
             adapter_name_or_path=str(tmp_path / "no-such-run"))  # fmt: skip
    stopped = tmp_path / "stopped"  # (a run stopped before its final save: checkpoints only)
    shutil.copytree(out, stopped / "checkpoint-3", ignore=shutil.ignore_patterns("checkpoint-*"))
    with pytest.raises(CheckpointError, match=r"its last checkpoint is .*stopped/checkpoint-3"):
        _run(tiny_model_dir, data, tmp_path / "b", max_steps=1,
             adapter_name_or_path=str(stopped))  # fmt: skip
    other = save_tiny(tmp_path / "other-base", "llama", seed=1)
    with pytest.raises(CheckpointError, match="trained on another base model"):
        _run(other, data, tmp_path / "c", max_steps=1, adapter_name_or_path=str(out))
    for name in "abc":  # nothing is left behind
        assert not (tmp_path / name).exists()
    # an adapter on two layers of a base whose tokenizer has a MASK token (no MASK row trained)
    narrow = tmp_path / "narrow"
    masked = save_tiny(tmp_path / "masked-base", "llama", mask_token=True, chat_template=False)
    _run(masked, data, narrow, max_steps=1, lora_target="[q_proj, v_proj]")
    with pytest.raises(ConfigError, match=r"lora_target: 'all' .* the adapter targets \['q_proj'"):
        _run(masked, data, tmp_path / "d", max_steps=1, lora_target="all",
             adapter_name_or_path=str(narrow))  # fmt: skip
    with pytest.raises(ConfigError, match=r"train_mask_embedding: True \(the adapter's: False\)"):
        _run(masked, data, tmp_path / "e", max_steps=1, train_mask_embedding=True,
             adapter_name_or_path=str(narrow))  # fmt: skip
    # its base had no chat template: the run exported its template (empty) with the tokenizer,
    # which is what an adapter from before fluid_model.json recorded the template is checked by
    meta = json.loads((narrow / "fluid_model.json").read_text())
    assert meta.pop("template") == "empty"
    (narrow / "fluid_model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="trained with template 'empty', but the recipe sets"):
        _run(masked, data, tmp_path / "f", max_steps=1, template="default",
             adapter_name_or_path=str(narrow))  # fmt: skip
    assert not any((tmp_path / name).exists() for name in "def")


def test_the_adapter_loads_with_plain_peft_as_the_readme_says(parent, tiny_model_dir):
    # README's recipe for an adapter whose Stage I added the MASK token: resize the base to the
    # adapter's tokenizer, then peft's own loader gives fluid's logits (embedding and head saved)
    from peft import PeftModel

    _, out, record = parent
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(0, 250, (2, 9))
    ids[0, 4] = record["mask_token"]["id"]
    with torch.no_grad():
        want = load_fluid(tiny_model_dir, out).model(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
