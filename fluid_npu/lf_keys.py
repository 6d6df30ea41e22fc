"""LLaMA-Factory's recipe keys that fluid-npu does not take, each with the reason (``config.py``).

A LLaMA-Factory recipe brought here carries keys of features this project does not have (other
stages, multimodal inputs, other optimizers and adapter variants, inference and export settings).
Such a key is refused by name — "LLaMA-Factory's X: <why>; remove it" — rather than read as a typo
of some unrelated key; keys that do mean something here are ``config.py``'s own (or the Trainer's)
and keys that change nothing are warned about there (``IGNORED_KEYS``). ``lf_spellings`` reads
LLaMA-Factory's other ways of saying what a key here says. A refused key whose value asks for
nothing (null, false, or LLaMA-Factory's default where fluid-npu does just that) is accepted. The
names are those of LLaMA-Factory's ``hparams`` dataclasses (model, data, finetuning and training
arguments).
"""

from __future__ import annotations

from typing import Any

from fluid_npu.errors import ConfigError

TEXT_ONLY = "fluid-npu trains text-only language models (no image, video or audio inputs)"
OPTIMIZER = "an alternative optimizer of LLaMA-Factory's; here the Trainer's `optim` chooses one"
ADAPTER = (
    "a LoRA variant or freeze tuning fluid-npu does not build: Stage I trains plain LoRA "
    "(lora_rank, lora_alpha, lora_dropout, lora_target) or the full model (finetuning_type: full)"
)
OTHER_STAGE = (
    "an objective of LLaMA-Factory's other stages (DPO / KTO / PPO / reward model / other SFT "
    "losses); FLUID's Stage I and II have their own losses"
)
SERVING = "inference and export here are `fluid generate`, `fluid serve` and `fluid merge`"
DATA_MIX = (
    "datasets are read whole from local files and joined in the order `dataset` lists them "
    "(no streaming or interleaving)"
)
TOKENS = "the tokenizer is the base model's; only the MASK token is added (mask_token)"
MODEL = "a model-loading option fluid-npu does not take: the model loads from its folder as saved"
LOGGING = "a profiler / logger of LLaMA-Factory's; `report_to` takes the Trainer's loggers"
PARALLEL = "parallelism here is DDP, DeepSpeed ZeRO (`deepspeed`) or FSDP (`fsdp`)"

_FAMILIES: dict[str, tuple[str, ...]] = {
    TEXT_ONLY: (
        "media_dir", "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan",
        "crop_to_patches", "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen",
        "use_audio_in_video", "audio_sampling_rate", "freeze_vision_tower",
        "freeze_multi_modal_projector", "freeze_language_model",
    ),
    OPTIMIZER: (
        "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
        "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise",
        "apollo_scale_front", "use_badam", "badam_mode", "badam_start_block",
        "badam_switch_mode", "badam_switch_interval", "badam_update_ratio", "badam_mask_mode",
        "badam_verbose", "use_galore", "galore_target", "galore_rank", "galore_update_interval",
        "galore_scale", "galore_proj_type", "galore_layerwise", "use_adam_mini", "use_muon",
    ),
    ADAPTER: (
        "use_dora", "use_rslora", "pissa_init", "pissa_iter", "pissa_convert", "oft_rank",
        "oft_block_size", "oft_target", "module_dropout", "loraplus_lr_ratio",
        "loraplus_lr_embedding", "create_new_adapter", "additional_target", "use_llama_pro",
        "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
        "adapter_folder",
    ),
    OTHER_STAGE: (
        "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing",
        "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size",
        "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "ref_model",
        "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
        "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha",
        "use_dft_loss", "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha",
    ),
    SERVING: (
        "infer_backend", "infer_dtype", "use_kv_cache", "use_v1_kernels", "vllm_maxlen",
        "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config",
        "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config",
        "sglang_lora_backend", "export_dir", "export_size", "export_device",
        "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
        "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id",
        "eval_num_beams",
    ),
    DATA_MIX: (
        "streaming", "buffer_size", "mix_strategy", "interleave_probs", "eval_on_each_dataset",
    ),
    TOKENS: (
        "resize_vocab", "split_special_tokens", "add_tokens", "add_special_tokens",
        "new_special_tokens",
        "new_special_tokens_config", "init_special_tokens",
    ),
    MODEL: (
        "model_revision", "low_cpu_mem_usage", "rope_scaling", "shift_attn", "mixture_of_depths",
        "use_unsloth_gc", "enable_liger_kernel", "moe_aux_loss_coef", "use_reentrant_gc",
        "upcast_lmhead_output", "train_from_scratch", "offload_folder", "hf_hub_token",
        "ms_hub_token", "om_hub_token", "compute_dtype", "device_map", "model_max_length",
        "block_diag_attn", "quantization_device_map", "use_kt", "kt_cpu_activation",
        "kt_weight_path", "kt_non_expert_weight_path", "kt_expert_checkpoint_path",
        "kt_use_lora_experts", "kt_lora_expert_num", "kt_lora_expert_intermediate_size",
        "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather",
    ),
    LOGGING: (
        "enable_torch_profiler", "profiler_output_dir", "profiler_wait_steps",
        "profiler_warmup_steps", "profiler_active_steps", "profiler_repeat",
        "profiler_record_shapes", "profiler_profile_memory", "profiler_with_stack",
        "profile_modules", "use_swanlab", "swanlab_project", "swanlab_workspace",
        "swanlab_run_name", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
        "swanlab_lark_webhook_url", "swanlab_lark_secret", "include_effective_tokens_per_second",
    ),
    PARALLEL: (
        "use_mca", "use_megatron_bridge", "megatron_bridge_args", "use_hyper_parallel",
        "hyper_parallel_args", "hyper_parallel_cp_size", "ray_num_workers", "ray_init_kwargs",
    ),
}  # fmt: skip

# single keys with a reason of their own
_OWN = {
    "default_system": "the template's own default system prompt is used (a row's `system` "
    "column sets one per example)",
    "tool_format": "tool calls are written as the template writes them",
    "preserve_thinking": "the template decides thinking markers",
    "ignore_pad_token_for_loss": "padding never counts in FLUID's losses",
    "early_stopping_steps": "not supported: give max_steps or num_train_epochs",
    "disable_shuffling": "the Trainer shuffles the training data by `seed`",
    "compute_accuracy": "evaluation reports FLUID's own figures (eval_loss, eval_loss_ar, "
    "eval_loss_diff; Stage II its K-head accuracy)",
    "master_addr": "the launcher's: set MASTER_ADDR in the environment (bash run_npu.sh train)",
    "master_port": "the launcher's: set MASTER_PORT in the environment (bash run_npu.sh train)",
}

UNSUPPORTED: dict[str, str] = {key: why for why, keys in _FAMILIES.items() for key in keys}
UNSUPPORTED.update(_OWN)

# Trainer keys whose effect lives in ``Trainer.compute_loss``, which FLUID's trainers replace:
# refused when set to anything but the value that changes nothing
LOSS_ONLY: dict[str, tuple[object, str]] = {
    "label_smoothing_factor": (0.0, "FLUID's losses are its own (Trainer.compute_loss is "
                               "replaced), so label smoothing would not be applied"),
    "use_liger_kernel": (False, "FLUID's losses are its own fused kernels (loss_impl)"),
}  # fmt: skip


# LLaMA-Factory's defaults of refused keys that are not false, where fluid-npu does just that
# (for these, false asks for something: loss on padding, a model loaded at full CPU memory)
NEUTRAL: dict[str, object] = {
    "mix_strategy": "concat",
    "buffer_size": 16384,
    "ignore_pad_token_for_loss": True,
    "low_cpu_mem_usage": True,
}


def refusal(key: str, value: Any) -> str | None:
    """The error for LLaMA-Factory's ``key`` set to ``value`` if fluid-npu does not take it,
    else None — also for a value that asks for nothing (null, false, or LLaMA-Factory's default
    where that is what fluid-npu does: ``mix_strategy: concat``), which ``config.py`` accepts."""
    why = UNSUPPORTED.get(key)
    if why is None or neutral(key, value):
        return None
    return f"{key!r} is LLaMA-Factory's, not fluid-npu's: {why}; remove it from the recipe"


def neutral(key: str, value: Any) -> bool:
    """Whether LLaMA-Factory's ``key`` at ``value`` asks for nothing fluid-npu does not do."""
    if key in NEUTRAL:
        return value is None or value == NEUTRAL[key]
    return value is None or value is False


def lf_spellings(values: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's ways of saying what a key here says: ``dataset`` / ``eval_dataset`` as a
    list of names, ``disable_gradient_checkpointing``
    (the negation of ``gradient_checkpointing``), ``quantization_method: bnb`` (the only one
    here), ``*_strategy: no`` read by YAML 1.1 as false; and the Trainer keys whose effect FLUID's
    own losses would drop (``lf_keys.LOSS_ONLY``), refused unless neutral."""
    out = dict(values)
    for key in ("dataset", "eval_dataset"):  # (a YAML list, as LLaMA-Factory's split_arg takes)
        names = out.get(key)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            out[key] = ",".join(names)
    if "disable_gradient_checkpointing" in out:
        off = out.pop("disable_gradient_checkpointing")
        if not isinstance(off, bool):
            raise ConfigError(f"disable_gradient_checkpointing: expected a bool, got {off!r}")
        if out.get("gradient_checkpointing", not off) == off:
            raise ConfigError(
                "gradient_checkpointing and LLaMA-Factory's disable_gradient_checkpointing "
                "contradict each other; keep one"
            )
        out["gradient_checkpointing"] = not off
    method = out.pop("quantization_method", None)
    if method is not None and str(method).lower() not in ("bnb", "bitsandbytes"):
        raise ConfigError(
            f"quantization_method {method!r}: QLoRA here quantizes the base with bitsandbytes "
            "only (quantization_method: bnb, with quantization_bit 4 or 8)"
        )
    for key, value in out.items():
        if key.endswith("_strategy") and value is False:  # (YAML 1.1 reads an unquoted no)
            out[key] = "no"
    for key, (neutral, why) in LOSS_ONLY.items():
        if out.get(key) not in (None, neutral):  # (null: left out)
            raise ConfigError(f"{key}: {out[key]!r} would not apply: {why}; remove it")
    return out
