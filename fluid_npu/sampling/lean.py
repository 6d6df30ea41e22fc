"""The engine's own forward for Llama-family decoders: the same arithmetic, without module dispatch.

A transformers decoder forward walks ~15 modules per layer through ``nn.Module.__call__`` and its
decorators (output capturing, kwargs checks, attention-interface lookup). On a small or host-bound
model that walk is a large share of a decode step: on this project's CPU the demo model's 33-token
step spends ~0.3 ms of its ~1.3 ms there, and an AR step ~0.25 ms of ~0.6 ms; on an Ascend NPU in
eager mode every launch is host work too. ``LeanDecoder`` runs the decoder of a Llama, Mistral,
Qwen2 or Qwen3 model as plain tensor calls over the engine's slot cache (``kv.py``): the layers'
own weights (no copy), the model's own rotary-embedding module's ``forward`` (so every RoPE
scaling is transformers'), its RMSNorms' arithmetic, and exactly the operations of the modeling
code in its order, so its hidden states are bit-identical to the module path (tested in fp32 and
bf16). Two restatements keep the bits with fewer ops: an RMSNorm whose forward is transformers'
own runs as ``_rms_norm`` (the same ops, in-place where the tensor is its own, no no-op casts),
and, eager, ``rotate_half(x) * sin`` runs as ``x.roll(half) * sin'`` with ``sin'`` the sine with
its first half negated (made once per forward; a negation is exact and a product rounds
symmetrically in sign, so every element is the same; compiled, inductor would fuse it otherwise
than the modules' form, so a compiled step keeps that form).

It applies only where that equivalence is known; ``LeanDecoder.of`` returns None otherwise and the
engine runs the model's modules as before. Every module it bypasses — the decoder, its layers,
their attention and MLP — must be exactly transformers' class for one of the architectures above
(openPangu loads as Llama; a same-named subclass or remote code does not count) with no ``forward``
set on the instance (tensor parallelism's projections, the NPU fused MLP of training); every
projection a plain ``nn.Linear`` (no PEFT wrapper, no quantised layer); each layer's cache index
its place; no forward hook, global or per module (accelerate's offload included; transformers'
output-capturing hooks, inert unless outputs are captured, are allowed); no ``torch.compile``-d
submodule; no hub kernels; and transformers' own ``apply_rotary_pos_emb`` in the modeling module
(the fused layers of training replace it process-wide). The rotary embedding, the activation, the
embedding and any norm whose forward is not transformers' own RMSNorm's are called through their
``forward``, so a replacement there (on the instance or the class, made before or after the
engine) is followed.
``Scheduler(lean=False)`` turns it off; under ``Scheduler(compile=True)`` it is also what the
decode step compiles.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from fluid_npu.sampling.kv import SlotKV, slot_attention

# architectures whose decoder layer is: norm → attention (q/k/v, Qwen3's per-head q/k norm, RoPE,
# cache, SDPA, o) → residual → norm → gated MLP → residual; name prefix → modeling module
_ARCHS = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3"}
_PARTS = ("Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
_CAPTURE_HOOK = "output_capturing_hook"  # transformers' output capture: inert unless asked for


@dataclass
class _Layer:
    norm1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    norm2: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    act: nn.Module
    attn: nn.Module  # the attention module (its scaling, handed to the attention)
    head_dim: int


def _classes(decoder: nn.Module) -> dict[str, type] | None:
    """transformers' own classes of ``decoder``'s architecture, or None for another one."""
    name = type(decoder).__name__
    prefix = name[: -len("Model")] if name.endswith("Model") else ""
    if prefix not in _ARCHS:
        return None
    try:
        modeling = importlib.import_module(
            f"transformers.models.{_ARCHS[prefix]}.modeling_{_ARCHS[prefix]}"
        )
    except ImportError:  # a transformers without this architecture
        return None
    return {part: getattr(modeling, prefix + part, None) for part in _PARTS}


def _hooked(module: nn.Module) -> bool:
    """Whether a hook would run in ``module``'s forward: its own or its submodules' (transformers'
    inert output-capturing hooks aside), a global one, accelerate's offload hook, a tensor-parallel
    forward, or a ``torch.compile``-d submodule (inductor does not round as eager does)."""
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return True
    for m in module.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if any(getattr(h, "__name__", None) != _CAPTURE_HOOK for h in hooks):
            return True
        own = vars(m)
        if "_hf_hook" in own or own.get("_is_hooked") or own.get("_compiled_call_impl"):
            return True
    return False


def _replaced(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has its own ``forward`` (set on the instance, not the class)."""
    return any("forward" in vars(m) for m in modules)


def _own_rotary(attention_class: type) -> bool:
    """Whether the attention's modeling module still has transformers' ``apply_rotary_pos_emb``
    (the NPU fused layers of training, or any wrapper, replace it for every model in the
    process)."""
    modeling = sys.modules[attention_class.__module__]
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    return fn is not None and fn.__module__ == modeling.__name__ and not hasattr(fn, "__wrapped__")


class LeanDecoder:
    """``decoder(input_ids, position_ids, kv)`` → the last hidden states ``[B, W, H]``."""

    def __init__(self, decoder: nn.Module, layers: list[_Layer]) -> None:
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.layers = layers
        # norms whose forward is transformers' own RMSNorm run as ``_rms_norm`` (its arithmetic,
        # fewer dispatches) while their class keeps that forward; any other is called as is
        norms = [n for y in layers for n in (y.norm1, y.norm2, y.q_norm, y.k_norm) if n is not None]
        self._stock = {id(n): type(n).forward for n in [self.norm, *norms] if _stock_rms_norm(n)}

    @classmethod
    def of(cls, model: PreTrainedModel) -> LeanDecoder | None:
        """The lean forward of ``model``'s decoder, or None where it is not known to be exact.

        Every module it bypasses must be exactly transformers' class with the class's forward;
        the rotary embedding, the activation, the embedding and norms not restated are called
        through their own ``forward`` (an instance's replacement included). Checked once, when an
        engine is made (a norm's forward replaced later is followed: ``_norm``).
        """
        dec = model.get_decoder()
        kinds = _classes(dec)
        if (
            kinds is None
            or any(k is None for k in kinds.values())
            or type(dec) is not kinds["Model"]
        ):
            return None
        if getattr(model, "use_kernels", False) or _hooked(dec) or _replaced(dec):
            return None
        if not _own_rotary(kinds["Attention"]) or type(dec.embed_tokens) is not nn.Embedding:
            return None
        if (
            type(dec.norm) is not kinds["RMSNorm"]
            or type(dec.rotary_emb) is not kinds["RotaryEmbedding"]
        ):
            return None
        per_head_norm = kinds["Model"].__name__ == "Qwen3Model"
        layers = []
        for i, layer in enumerate(dec.layers[: dec.config.num_hidden_layers]):
            at, mlp = layer.self_attn, layer.mlp
            exact = (layer, kinds["DecoderLayer"]), (at, kinds["Attention"]), (mlp, kinds["MLP"])
            if any(type(m) is not kind for m, kind in exact) or getattr(at, "layer_idx", i) != i:
                return None  # (a layer's cache index must be its place, as the modules use it)
            linears = (at.q_proj, at.k_proj, at.v_proj, at.o_proj)
            linears += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if per_head_norm:
                norms += [at.q_norm, at.k_norm]
            if any(type(m) is not nn.Linear for m in linears) or _replaced(
                layer, at, mlp, *linears
            ):
                return None
            if any(type(n) is not kinds["RMSNorm"] for n in norms):
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
        norm = self._norm
        h = self.embed.forward(input_ids)
        cos, sin = self.rotary.forward(h, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        # rotate_half(x) * sin == x.roll(half) * [-sin_lo, sin_hi], bit for bit (a negation is
        # exact and a product's rounding is symmetric in sign): a roll, not slices, neg and cat.
        # Eager only: compiled, inductor fuses the two forms differently (bf16 bits move), so a
        # compiled step keeps the modeling code's form, as the compiled modules run it
        half = sin.shape[-1] // 2
        rolled = not torch.compiler.is_compiling()
        if rolled:
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        b, w = input_ids.shape
        for i, ly in enumerate(self.layers):
            x = norm(ly.norm1, h)
            shape = (b, w, -1, ly.head_dim)
            q = F.linear(x, ly.q.weight, ly.q.bias).view(shape)
            k = F.linear(x, ly.k.weight, ly.k.bias).view(shape)
            if ly.q_norm is not None:
                q, k = norm(ly.q_norm, q), norm(ly.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = F.linear(x, ly.v.weight, ly.v.bias).view(shape).transpose(1, 2)
            if rolled:
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
            else:
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            k, v = kv.update(k, v, i)
            out, _ = slot_attention(ly.attn, q, k, v, None, ly.attn.scaling, fluid_plan=plan)
            h = h + F.linear(out.reshape(b, w, -1), ly.o.weight, ly.o.bias)
            x = norm(ly.norm2, h)
            gate = ly.act.forward(F.linear(x, ly.gate.weight, ly.gate.bias))
            x = gate * F.linear(x, ly.up.weight, ly.up.bias)
            h = h + F.linear(x, ly.down.weight, ly.down.bias)
        return norm(self.norm, h)

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        stock = self._stock.get(id(module))
        if stock is None or type(module).forward is not stock or "forward" in vars(module):
            return module.forward(x)  # (a forward replaced since: followed)
        return _rms_norm(module, x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _stock_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' own RMSNorm forward of its architecture (the
    one ``_rms_norm`` restates), not one patched onto the class or the instance."""
    cls = type(module)
    fn = cls.__dict__.get("forward")
    return (
        fn is not None
        and "forward" not in vars(module)
        and cls.__name__.endswith("RMSNorm")
        and cls.__module__.startswith("transformers.models.")
        and getattr(fn, "__module__", None) == cls.__module__
        and getattr(fn, "__qualname__", None) == f"{cls.__name__}.forward"
        and not hasattr(fn, "__wrapped__")
        and fn.__code__.co_names == _RMS_NAMES
    )


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama-family RMSNorm (``_RMS_NAMES``' forward), op for op in its arithmetic
    — pow, mean, + eps, rsqrt, x * that, weight * x (a product commutes bit for bit) — with the
    casts that change nothing skipped and the in-place ops writing only tensors made here."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * var.add_(module.variance_epsilon).rsqrt_()
    if dtype != torch.float32:
        h = h.to(dtype)
    weight = module.weight
    return h.mul_(weight) if weight.dtype == h.dtype else weight * h


# the names Llama's RMSNorm forward reads (its code changing changes them: then no restating)
_RMS_NAMES = ("dtype", "to", "torch", "float32", "pow", "mean", "rsqrt",
              "variance_epsilon", "weight")  # fmt: skip
