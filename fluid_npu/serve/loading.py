"""Loading what ``fluid serve`` runs: the model and its scheduler (``build_scheduler``) and the
request defaults read from the model (``engine_defaults``). In the server's process, or in the
engine's own (``engine_process.py``), which sends the rest of the server what it needs."""

from __future__ import annotations

from typing import Any

from fluid_npu.sampling.generation_defaults import check_override, generation_defaults
from fluid_npu.serve.protocol import SamplingDefaults
from fluid_npu.serve.settings import OVERRIDE_FLAG, SERVED_DEFAULTS, ServeSettings


def build_scheduler(settings: ServeSettings) -> tuple[Any, Any, int, dict[str, Any]]:
    """Load the model, build the scheduler: ``(scheduler, tokenizer, max_len, info)``; a
    ``max_batch`` left to ``gpu_memory_utilization`` is set in ``settings`` to what it sized."""
    import torch

    from fluid_npu import device as devices
    from fluid_npu.sampling.inputs import serving_eos
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.prompts import quiet_loading
    from fluid_npu.sampling.scheduler import Scheduler

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if settings.seed is not None:  # (a request without a seed draws one from torch's generator)
        torch.manual_seed(settings.seed)
    dev = devices.claim(force=settings.device)
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    with quiet_loading():
        fluid = FluidForCausalLM.from_pretrained(
            settings.model,
            settings.adapter,
            settings.khead,
            dtype=dtype,
            mask_token=settings.mask_token,
            device=dev,
            chat_template=settings.template_text(),
            trust_remote_code=settings.trust_remote_code,
        )
    policy = settings.policy or ("khead" if fluid.khead is not None else "entropy")
    scheduler = Scheduler(
        fluid.model,
        fluid.mask_id,
        policy=policy,
        khead=fluid.khead,
        eos_ids=serving_eos(fluid.model, fluid.tokenizer),  # the tokenizer's EOS too, as vLLM
        max_batch=settings.max_batch,
        max_len=settings.max_len,  # None: the scheduler's default (the context, at most 4096)
        tokenizer=fluid.tokenizer,  # the engine ends requests on their stop strings
        compile=settings.compile,
        adaptive=settings.adaptive,
        prefix_caching=settings.prefix_caching,
        prefix_slots=settings.prefix_cache_slots,
        scheduling_policy=settings.scheduling_policy,
        logprobs_mode=settings.logprobs_mode,
        memory_fraction=settings.gpu_memory_utilization,
        **({} if settings.prefill_chunk is None else {"prefill_chunk": settings.prefill_chunk}),
    )
    max_len = scheduler.max_len
    settings.max_batch = scheduler.slots_n  # (sized from gpu_memory_utilization when not given)
    info = {
        "policy": policy,
        "reasoning_parser": settings.reasoning_parser,
        "tool_call_parser": settings.tool_call_parser,
        "device": str(dev),
        "dtype": str(next(fluid.model.parameters()).dtype).removeprefix("torch."),
        "max_batch": settings.max_batch,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_len": max_len,
        "max_len_reason": scheduler.max_len_reason,
        "compile": settings.compile,
        "adaptive_drafting": settings.adaptive,
        "prefix_caching": settings.prefix_caching,
        "prefix_cache_slots": settings.prefix_cache_slots,
        "scheduling_policy": settings.scheduling_policy,
        "logprobs_mode": settings.logprobs_mode,
        "prefill_chunk": scheduler.prefill_chunk,
        "seed": settings.seed,
        "torch_threads": torch.get_num_threads(),
        "kv_cache_gib": round(scheduler.kv.nbytes / 2**30, 3),  # allocated once, at start
    }
    return scheduler, fluid.tokenizer, max_len, info


def engine_defaults(settings: ServeSettings, model: Any) -> tuple[SamplingDefaults, int]:
    """What a request that leaves a decoding setting out gets (the model's generation config,
    else OpenAI's, under ``--override-generation-config``) and the logits' width."""
    override = settings.override_generation_config
    defaults = generation_defaults(
        settings.generation_config,
        model,
        None if override is None else check_override(override, OVERRIDE_FLAG, SERVED_DEFAULTS),
    )
    return defaults, model.get_input_embeddings().weight.shape[0]
