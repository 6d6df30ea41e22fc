"""Config loading: the reference FLUID recipe, LLaMA-Factory extras, overrides and clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from fluid_npu.cli import main as cli_main
from fluid_npu.config import build_config, load_config, parse_overrides
from fluid_npu.errors import ConfigError

REFERENCE = textwrap.dedent(
    """\
    stage: fluid_stage1
    model_name_or_path: /models/openPangu-Embedded-7B
    finetuning_type: lora
    lora_rank: 16
    lora_alpha: 32
    lora_target: all
    cutoff_len: 1024
    k_masks: 16
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 8
    learning_rate: 2.0e-4
    lr_scheduler_type: cosine
    warmup_ratio: 0.1
    num_train_epochs: 3.0
    bf16: true
    deepspeed: configs/ds_z2.json
    template: openpangu
    dataset: alpaca_en,sharegpt_zh
    dataset_dir: data
    output_dir: outputs/stage1
    save_steps: 500
    logging_steps: 10
    max_steps: -1
    """
)

LLAMA_FACTORY_EXTRAS = textwrap.dedent(
    """\
    do_train: true
    overwrite_cache: true
    preprocessing_num_workers: 16
    overwrite_output_dir: true
    plot_loss: true
    ddp_timeout: 180000000
    seed: 7
    report_to: none
    resume_from_checkpoint: null
    save_total_limit: 3
    eval_strategy: "no"
    """
)


def test_reference_recipe_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(REFERENCE)
    cfg = load_config(path)
    assert cfg.fluid.stage == "fluid_stage1"
    assert (cfg.fluid.lora_rank, cfg.fluid.lora_alpha, cfg.fluid.lora_target) == (16, 32.0, "all")
    assert cfg.fluid.k_masks == 16 and cfg.data.cutoff_len == 1024
    assert cfg.train.learning_rate == pytest.approx(2e-4) and cfg.train.bf16 is True
    assert (
        cfg.data.dataset == "alpaca_en,sharegpt_zh" and cfg.train.deepspeed == "configs/ds_z2.json"
    )


def test_llama_factory_keys_warn_or_pass_through(tmp_path, caplog):
    path = tmp_path / "recipe.yaml"
    path.write_text(REFERENCE + LLAMA_FACTORY_EXTRAS)
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in ("do_train", "overwrite_cache", "plot_loss"):
        assert key in warned
    # overwrite_output_dir is a real key (fluid_npu.train.output_dir): no warning, a typed bool
    assert "overwrite_output_dir" not in warned and cfg.train.overwrite_output_dir is True
    assert cfg.train.seed == 7 and cfg.data.seed == 7
    assert cfg.train.save_total_limit == 3
    assert cfg.data.preprocessing_num_workers == 16
    # keys that take effect now: ddp_timeout reaches the Trainer (test_scale_keys checks it)
    assert "ddp_timeout" not in warned
    assert cfg.extra_training_args == {"eval_strategy": "no", "ddp_timeout": 180000000}


def test_overrides_apply_and_parse_yaml_scalars(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(REFERENCE)
    cfg = load_config(
        path, ["lora_rank=8", "bf16=false", "learning_rate=1e-4", "lora_target=q_proj,v_proj"]
    )
    assert cfg.fluid.lora_rank == 8 and cfg.train.bf16 is False
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.fluid.lora_target == ["q_proj", "v_proj"]
    assert parse_overrides(["max_slots_ratio=null"]) == {"max_slots_ratio": None}
    assert load_config(path, ["overwrite_output_dir=true"]).train.overwrite_output_dir is True
    assert load_config(path).train.overwrite_output_dir is False


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"lora_rnak": 8}, "did you mean 'lora_rank'"),
        ({"cutof_len": 8}, "did you mean 'cutoff_len'"),
        ({"lora_rank": "big"}, "lora_rank: expected int"),
        ({"bf16": "yes please"}, "bf16: expected bool"),
        ({"k_masks": 0}, "k_masks must be > 0"),
        ({"anchor_prob": 1.5}, "anchor_prob must be in [0, 1]"),
        ({"stage": "sft"}, "fluid_stage1"),
        ({"loss_reduction": "pooles"}, "did you mean 'pooled'"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in [0, 1)"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1)"),
        ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be > 0"),
        ({"seed": -1}, "seed must be in [0, 2**32)"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers must be >= 0"),
        ({"max_steps": 0}, "trains no step: give max_steps > 0"),
        ({"num_train_epochs": 0}, "num_train_epochs 0.0 trains no step"),
        ({"max_steps": 5, "num_train_epochs": 0}, None),  # (max_steps decides)
        ({"ar_loss_weight": -1}, "a negative weight ascends its loss"),
        ({"ar_loss_weight": 0, "diff_loss_weight": 0}, "both 0 train nothing"),
        ({"ar_loss_weight": 0}, None),  # (the slots' loss alone)
        # TrainingArguments' own keys, passed through, are checked against their plain types
        ({"adam_beta1": "abc"}, "adam_beta1: expected float, got 'abc'"),
        ({"eval_steps": "often"}, "eval_steps: expected float | None, got 'often'"),
        ({"save_only_model": "yes please"}, "save_only_model: expected bool"),
        ({"adam_beta1": 0.8, "adam_epsilon": "1e-6", "optim": "adamw_torch"}, None),
        ({"adapter_name_or_path": "prev", "finetuning_type": "full"}, "continues a Stage I LoRA"),
        ({"adapter_name_or_path": "a,b"}, "lists several adapters; Stage I continues one"),
        ({"overwrite_output_dir": "maybe"}, "overwrite_output_dir: expected bool"),
        ({"device": "npu:1"}, "'npu:1' gives a card index; a run takes its cards from the"),
        ({"device": "gpu"}, "device: 'gpu' is not valid"),
    ],
)
def test_bad_values_name_the_key(values, needle):
    if needle is None:  # (a neighbour of a refused value that stays valid)
        build_config(values)
        return
    with pytest.raises(ConfigError) as info:
        build_config(values)
    assert needle in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("lora_rnak: 8\n", "did you mean 'lora_rank'"),
        ("lora_rank: big\n", "lora_rank: expected int"),
        ("model_name_or_path: /does/not/exist\ndataset: x\noutput_dir: OUT\n", "does not exist"),
    ],
)
def test_cli_reports_one_clear_line(tmp_path, yaml_text, needle, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text.replace("OUT", str(tmp_path / "out")))
    assert cli_main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fluid: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: fluid_stage9\n")  # (an error in a key of ours: no transformers needed)
    proc = subprocess.run(
        [sys.executable, "-m", "fluid_npu.cli", "--debug", "train", str(cfg)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_lora_alpha_defaults_to_twice_the_rank_as_in_llama_factory():
    assert build_config({"lora_rank": 64}).fluid.lora_alpha == 128
    assert build_config({"lora_rank": 8, "lora_alpha": 32}).fluid.lora_alpha == 32


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("use_dora", True, "a LoRA variant"),
        ("image_max_pixels", 589824, "text-only"),
        ("mix_strategy", "interleave_under", "joined in the order"),
        ("pref_beta", 0.1, "other stages"),
        ("vllm_maxlen", 4096, "fluid serve"),
        ("use_galore", True, "optimizer"),
        ("master_port", 29500, "MASTER_PORT"),
        ("new_special_tokens", "<think>,</think>", "only the MASK token is added"),
    ],
)
def test_llama_factory_features_missing_here_are_refused_by_name(key, value, why):
    """A LLaMA-Factory key of a feature this project lacks names itself and the reason — not a
    typo of some unrelated key (``use_dora`` is not ``use_cache``)."""
    with pytest.raises(ConfigError) as err:
        build_config({"stage": "fluid_stage1", key: value})
    message = str(err.value)
    assert f"{key!r} is LLaMA-Factory's" in message and why in message
    assert "did you mean" not in message


def test_llama_factory_spellings_read_as_ours(tmp_path):
    """``disable_gradient_checkpointing`` is the negation of ``gradient_checkpointing``;
    ``quantization_method: bnb`` is the only one here (another is refused by value); an unquoted
    ``no`` (YAML 1.1's false) is the strategy "no"; Trainer keys only its own loss would apply
    are refused when set."""
    base = {"stage": "fluid_stage1"}
    assert not build_config(
        {**base, "disable_gradient_checkpointing": True}
    ).train.gradient_checkpointing
    assert build_config(
        {**base, "disable_gradient_checkpointing": False}
    ).train.gradient_checkpointing
    with pytest.raises(ConfigError, match="contradict"):
        build_config(
            {**base, "disable_gradient_checkpointing": True, "gradient_checkpointing": True}
        )
    recipe = tmp_path / "lf.yaml"  # (an override beats the recipe's other spelling)
    recipe.write_text("stage: fluid_stage1\ndisable_gradient_checkpointing: false\n")
    assert load_config(recipe).train.gradient_checkpointing
    assert not load_config(recipe, ["gradient_checkpointing=false"]).train.gradient_checkpointing
    cfg = build_config({**base, "quantization_bit": 4, "quantization_method": "bnb"})
    assert cfg.model.quantization_bit == 4 and "quantization_method" not in cfg.extra_training_args
    with pytest.raises(ConfigError, match="bitsandbytes only"):
        build_config({**base, "quantization_bit": 4, "quantization_method": "gptq"})
    values = yaml.safe_load("eval_strategy: no\nsave_strategy: no\n")  # (YAML 1.1: false)
    assert values == {"eval_strategy": False, "save_strategy": False}
    cfg = build_config({**base, **values})
    assert cfg.extra_training_args == {"eval_strategy": "no", "save_strategy": "no"}
    assert build_config({**base, "label_smoothing_factor": 0.0}).extra_training_args
    with pytest.raises(ConfigError, match=r"label_smoothing_factor: 0\.3 would not apply"):
        build_config({**base, "label_smoothing_factor": 0.3})
    with pytest.raises(ConfigError, match="use_liger_kernel"):
        build_config({**base, "use_liger_kernel": True})
    assert build_config({**base, "label_smoothing_factor": None})  # (null: left out)


def test_llama_factory_keys_that_ask_for_nothing_are_accepted():
    """A LLaMA-Factory recipe carries its data keys at their defaults (``mix_strategy: concat``,
    ``streaming: false``, nulls): they ask for what fluid-npu does, so they pass; a value that
    asks for the feature is still refused; ``dataset`` may be a YAML list, as LLaMA-Factory's."""
    base = {"stage": "fluid_stage1"}
    neutral = {
        "mix_strategy": "concat", "streaming": False, "interleave_probs": None,
        "eval_on_each_dataset": False, "tool_format": None, "default_system": None,
        "use_dora": False, "buffer_size": 16384, "preprocessing_batch_size": 500,
        "data_shared_file_system": True,
    }  # fmt: skip
    cfg = build_config({**base, **neutral})
    assert not set(neutral) & set(cfg.extra_training_args)
    assert build_config({**base, "ignore_pad_token_for_loss": True, "low_cpu_mem_usage": True})
    for key, value in [("streaming", True), ("default_system", "Be brief."), ("buffer_size", 8),
                       ("ignore_pad_token_for_loss", False)]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"'{key}' is LLaMA-Factory's"):
            build_config({**base, key: value})
    cfg = build_config({**base, "dataset": ["a", "b"], "eval_dataset": ["c"]})
    assert (cfg.data.dataset, cfg.data.eval_dataset) == ("a,b", "c")
    with pytest.raises(ConfigError, match="dataset"):
        build_config({**base, "dataset": ["a", 3]})


def test_mask_history_with_train_on_prompt_is_refused():
    """LLaMA-Factory refuses the pair too: one masks the history, the other trains it."""
    with pytest.raises(ConfigError, match=r"mask_history .* train_on_prompt .* contradict"):
        build_config({"stage": "fluid_stage1", "mask_history": True, "train_on_prompt": True})
