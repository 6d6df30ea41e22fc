"""The engine's own forward for Llama-family decoders: the same arithmetic, without module dispatch.

A transformers decoder forward walks ~15 modules per layer through ``nn.Module.__call__`` and its
decorators (output capturing, kwargs checks, attention-interface lookup). On a small or host-bound
model that walk is a large share of a decode step: on this project's CPU the demo model's 33-token
step spends ~0.3 ms of its ~1.3 ms there, and an AR step ~0.25 ms of ~0.6 ms; on an Ascend NPU in
eager mode every launch is host work too. ``LeanDecoder`` runs the decoder of a Llama, Mistral,
Qwen2 or Qwen3 model as plain tensor calls over the engine's slot cache (``kv.py``): the layers'
own weights (no copy), the model's own rotary-embedding and RMSNorm modules' ``forward`` (so every
RoPE scaling and norm detail is transformers'), and exactly the operations of the modeling code
in its order, so its hidden states are bit-identical to the module path (tested in fp32 and bf16).

It applies only where that equivalence is known; ``LeanDecoder.of`` returns None otherwise and
the engine runs the model's modules as before: the decoder and its layers of one of the classes
above (openPangu loads as Llama), every projection a plain ``nn.Linear`` (no PEFT wrapper, no
quantised layer), no forward hooks (accelerate offload, user hooks) and no ``forward`` replaced on
an attention, MLP or layer instance (the NPU fused layers of ``model/fused_layers.py`` replace the
MLP's: the module path keeps them; replaced norm forwards are called as they are). Any other
architecture keeps the module path. ``Scheduler(lean=False)`` turns it off. Under
``Scheduler(compile=True)`` it is also what the decode step compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from fluid_npu.sampling.kv import SlotKV, slot_attention

# decoder-layer classes whose forward is: norm → attention (q/k/v, optional per-head q/k norm,
# RoPE, cache, SDPA, o) → residual → norm → gated MLP → residual
_LAYERS = {
    "LlamaDecoderLayer": False,
    "MistralDecoderLayer": False,
    "Qwen2DecoderLayer": False,
    "Qwen3DecoderLayer": True,  # q_norm / k_norm over each head
}
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MODELS = {"LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model"}


@dataclass
class _Layer:
    norm1: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    norm2: torch.nn.Module
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear
    act: torch.nn.Module
    attn: torch.nn.Module  # the attention module (its scaling, handed to the attention)
    head_dim: int


def _hooked(module: torch.nn.Module) -> bool:
    """Whether a hook (or accelerate's offload hook) would run in ``module``'s forward."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in vars(m) for m in module.modules()
    )


def _replaced(*modules: torch.nn.Module) -> bool:
    """Whether any of ``modules`` has its own ``forward`` (set on the instance, not the class)."""
    return any("forward" in vars(m) for m in modules)


class LeanDecoder:
    """``decoder(input_ids, position_ids, kv)`` → the last hidden states ``[B, W, H]``."""

    def __init__(self, decoder: torch.nn.Module, layers: list[_Layer]) -> None:
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.layers = layers

    @classmethod
    def of(cls, model: PreTrainedModel) -> LeanDecoder | None:
        """The lean forward of ``model``'s decoder, or None where it is not known to be exact."""
        dec = model.get_decoder()
        if type(dec).__name__ not in _MODELS or _hooked(dec) or _replaced(dec):
            return None
        if type(dec.norm).__name__ not in _NORMS or type(dec.embed_tokens) is not nn.Embedding:
            return None
        layers = []
        for layer in dec.layers[: dec.config.num_hidden_layers]:
            per_head_norm = _LAYERS.get(type(layer).__name__)
            if per_head_norm is None or _replaced(layer, layer.self_attn, layer.mlp):
                return None
            at, mlp = layer.self_attn, layer.mlp
            linears = (at.q_proj, at.k_proj, at.v_proj, at.o_proj)
            linears += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if per_head_norm:
                norms += [at.q_norm, at.k_norm]
            if any(type(m) is not nn.Linear for m in linears):
                return None
            if any(type(n).__name__ not in _NORMS for n in norms):
                return None
            layers.append(
                _Layer(
                    layer.input_layernorm,
                    *linears[:4],
                    at.q_norm if per_head_norm else None,
                    at.k_norm if per_head_norm else None,
                    layer.post_attention_layernorm,
                    *linears[4:],
                    mlp.act_fn,
                    at,
                    int(at.head_dim),
                )
            )
        return cls(dec, layers)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv: SlotKV
    ) -> torch.Tensor:
        plan = kv.plan
        h = self.embed.forward(input_ids)
        cos, sin = self.rotary.forward(h, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        b, w = input_ids.shape
        for i, ly in enumerate(self.layers):
            x = ly.norm1.forward(h)
            shape = (b, w, -1, ly.head_dim)
            q = F.linear(x, ly.q.weight, ly.q.bias).view(shape)
            k = F.linear(x, ly.k.weight, ly.k.bias).view(shape)
            if ly.q_norm is not None:
                q, k = ly.q_norm.forward(q), ly.k_norm.forward(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = F.linear(x, ly.v.weight, ly.v.bias).view(shape).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = kv.update(k, v, i)
            out, _ = slot_attention(ly.attn, q, k, v, None, ly.attn.scaling, fluid_plan=plan)
            h = h + F.linear(out.reshape(b, w, -1), ly.o.weight, ly.o.bias)
            x = ly.norm2.forward(h)
            gate = ly.act.forward(F.linear(x, ly.gate.weight, ly.gate.bias))
            x = gate * F.linear(x, ly.up.weight, ly.up.bias)
            h = h + F.linear(x, ly.down.weight, ly.down.bias)
        return self.norm.forward(h)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
