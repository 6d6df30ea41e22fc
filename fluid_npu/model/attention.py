"""The FLUID attention wired into transformers models from outside, and the forward that uses it.

Two ways to run the §1.1 visibility through a stock transformers model:

* the model's own ``eager`` / ``sdpa`` attention with a dense 4D mask built from the metadata
  (``dense_mask``: additive float for eager, bool True = attend for sdpa) — the reference path;
* the registered ``"fluid"`` attention function, which hands q/k/v and the ``AttnMeta`` to
  ``fluid_ops.fluid_attention`` (reference, blocked, npu or triton back end) — no dense mask exists.

``forward_hidden`` is the one entry point trainers and the sampler call: it takes the layout (ids,
positions, metadata, optional KV cache) and returns the final post-norm hidden states, so the
vocabulary projection can be fused with the loss (``fluid_ops.linear_cross_entropy``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

import fluid_ops
from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_ops.meta import AttnMeta, visibility

FLUID = "fluid"
DENSE_IMPLS = ("eager", "sdpa")
KERNEL_BACKENDS = ("auto", "reference", "blocked", "npu", "triton")


def _fluid_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    fluid_meta: AttnMeta | None = None,
    fluid_backend: str | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    if fluid_meta is None:
        raise ValueError(
            "the 'fluid' attention needs fluid_meta=AttnMeta(...) in the forward call; "
            "use fluid_npu.model.attention.forward_hidden"
        )
    out = fluid_ops.fluid_attention(
        query, key, value, fluid_meta, scale=scaling, backend=fluid_backend
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The fluid attention reads metadata, not a mask: transformers builds none."""
    return None


def register() -> None:
    """Register ``"fluid"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(FLUID, _fluid_attention)
    AttentionMaskInterface.register(FLUID, _no_mask)


def configure_attention(
    model: PreTrainedModel, backend: str, device_type: str | None = None
) -> None:
    """Make ``model`` run the FLUID layout with ``backend`` (config key ``attn_backend``).

    ``eager`` / ``sdpa`` keep the model's own attention (a dense mask is passed); every other
    value selects the registered ``"fluid"`` attention and the named ``fluid_ops`` back end.
    With ``device_type`` (``DeviceChoice.type``: where the model will run), a named back end that
    cannot run there is a ``ConfigError`` now (``check_backend``), not a failure at the first
    forward.
    """
    if device_type is not None:
        check_backend(backend, device_type)
    if backend in DENSE_IMPLS:
        model.set_attn_implementation(backend)
    elif backend in KERNEL_BACKENDS:
        register()
        model.set_attn_implementation(FLUID)
    else:
        raise ValueError(f"unknown attention back end {backend!r}")
    model.config.fluid_attn_backend = backend


def check_backend(backend: str, device_type: str, *, flags: bool = False) -> None:
    """A ``ConfigError`` when attention back end ``backend`` (config key ``attn_backend``; with
    ``flags``, the CLI's ``--attn-backend`` and ``--device``) cannot run on ``device_type``
    (``DeviceChoice.type``), for a run to raise before anything loads. ``npu`` off an NPU says why
    no NPU is usable and what to check, rather than only offering ``auto``, which would run on the
    device the run fell back to."""
    if backend not in KERNEL_BACKENDS or backend == "auto":
        return
    from types import SimpleNamespace

    from fluid_ops.dispatch import why_unavailable

    # The availability checks read only ``.type`` ("npu" is no torch device type before
    # torch_npu is imported).
    reason = why_unavailable("attention", backend, SimpleNamespace(type=device_type))
    if reason is None:
        return
    key, dev = ("--attn-backend", "--device") if flags else ("attn_backend:", "device:")
    if backend == "npu" and device_type != "npu":
        unusable = devices.npu_import_error()
        if unusable is None:  # (an NPU is there: the device key chose another)
            where = "the --device flag" if flags else "the device key"
            raise ConfigError(
                f"{key} 'npu' runs on an NPU and this run is on {device_type} ({where}): set "
                f"{dev} npu (or auto), or choose another {key.rstrip(':')}"
            )
        raise ConfigError(
            f"{key} 'npu' needs an NPU, and none is usable here ({unusable}), so this "
            f"run would be on {device_type}. On an Ascend host check that CANN's set_env.sh is "
            "sourced (run_npu.sh sources it) and that ASCEND_RT_VISIBLE_DEVICES lists this "
            f"node's NPUs; {key} auto would run the model on {device_type} instead"
        )
    raise ConfigError(f"{key} {backend!r} cannot run on {device_type} ({reason}); use {key} auto")


def dense_mask(meta: AttnMeta, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``[B, 1, Lq, Lk]`` mask for a model's own attention: bool for sdpa, additive for eager.

    Rows with no visible key (padding) attend their first key, so no softmax sees an empty row;
    their outputs are never read.
    """
    vis = visibility(meta)
    empty = ~vis.any(dim=-1)
    if empty.any():
        vis = vis.clone()
        vis[..., 0] |= empty
    vis = vis[:, None]
    if impl == "sdpa":
        return vis
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=vis.device)
        return torch.where(vis, zero, torch.finfo(dtype).min)
    raise ValueError(f"dense masks exist for eager and sdpa, not {impl!r}")


def attention_kind(model: PreTrainedModel) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return FLUID if impl == FLUID else impl


def forward_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    meta: AttnMeta,
    cache: Any = None,
    use_cache: bool = False,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """Final post-norm hidden states ``[B, L, H]`` of the layout, and the updated cache."""
    decoder = model.get_decoder()
    kind = attention_kind(model)
    kwargs: dict[str, Any] = {}
    if kind == FLUID:
        backend = getattr(model.config, "fluid_attn_backend", "auto")
        kwargs.update(fluid_meta=meta, fluid_backend=None if backend == "auto" else backend)
        mask = None
    else:
        dtype = next(model.parameters()).dtype
        mask = dense_mask(meta, kind, dtype)
    out = decoder(
        input_ids=None if inputs_embeds is not None else input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        **kwargs,
    )
    return out.last_hidden_state, out.cache if use_cache else None


def lm_head(model: PreTrainedModel) -> torch.nn.Module:
    """The output projection (weight ``[V, H]``, optional bias)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head
