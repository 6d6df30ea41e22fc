"""torch_npu's fused layer kernels, tested on a CPU through their contract.

``fluid_ops.npu_layers`` (RMSNorm, rotary embedding, SwiGLU) is swapped into Llama / Qwen2 / Qwen3
/ Mistral by ``apply_npu_fused_layers``: a fake torch_npu implementing the documented semantics in
plain torch is injected through the one import hook (and the kernels' device type pointed at the
CPU); the swapped models give the original logits and gradients, every op is called with its
documented arguments, the rotary function is swapped once at set-up, and whatever the kernels do
not take (device, shape, dtype, layout) keeps transformers' path. The fake itself is checked
against transformers' modules.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from synthetic import write_short_dataset

import fluid_ops.npu_layers as npu_layers
from fluid_npu import device as devices
from fluid_npu.config import load_config
from fluid_npu.model.fused_layers import MARK, ROTARY_OFF, ROTARY_ORIGINAL, apply_npu_fused_layers
from fluid_npu.model.tiny import build_tiny_model
from fluid_ops import dispatch


class FakeTorchNpu:
    """torch_npu's three layer ops with their documented semantics in plain torch; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append(("npu_rms_norm", (x, gamma), {"epsilon": epsilon}))
        assert x.dtype == gamma.dtype, "gamma must have the dtype of self"
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd

    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half"):
        self.calls.append(("npu_rotary_mul", (x, r1, r2), {}))
        assert rotary_mode == "half"
        assert r1.abs().max() <= 1 and r2.abs().max() <= 1, "r1, r2 must lie in [-1, 1]"
        x1, x2 = torch.chunk(x, 2, -1)
        return r1 * x + r2 * torch.cat((-x2, x1), dim=-1)

    def npu_swiglu(self, x, dim=-1):
        self.calls.append(("npu_swiglu", (x,), {"dim": dim}))
        a, b = torch.chunk(x, 2, dim=dim)
        return a * torch.sigmoid(a) * b

    def named(self, op: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for name, a, k in self.calls if name == op]


ARCH_MODELING = {
    arch: f"transformers.models.{arch}.modeling_{arch}"
    for arch in ("llama", "qwen2", "qwen3", "mistral")
}


@pytest.fixture
def fake_npu(monkeypatch) -> FakeTorchNpu:
    """torch_npu's layer ops emulated on this CPU: the import hook returns the fake and the kernels'
    device type is "cpu". The modeling modules' rotary functions are restored afterwards."""
    fake = FakeTorchNpu()
    monkeypatch.setattr(dispatch, "load_torch_npu", lambda: fake)
    monkeypatch.setattr(npu_layers, "KERNEL_DEVICE_TYPE", "cpu")
    for name in ARCH_MODELING.values():
        modeling = importlib.import_module(name)
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
        monkeypatch.setattr(modeling, ROTARY_OFF, False, raising=False)
    return fake


def _forward_and_grad(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral"])
def test_fused_layers_keep_logits_and_call_each_op_as_documented(arch, fake_npu, tokenizer):
    model = build_tiny_model(arch, tokenizer).train()
    cfg = model.config
    layers, heads, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    ids = torch.randint(0, 250, (2, 9))
    ref_logits, ref_grads = _forward_and_grad(model, ids)

    n_norms = 2 * layers + 1 + (2 * layers if arch == "qwen3" else 0)  # + q/k norms
    modeling = sys.modules[ARCH_MODELING[arch]]
    plain_rotary = modeling.apply_rotary_pos_emb
    assert apply_npu_fused_layers(model, enabled=True) == n_norms + 2 * layers
    fused_rotary = modeling.apply_rotary_pos_emb  # swapped once, at set-up
    assert getattr(fused_rotary, ROTARY_ORIGINAL) is plain_rotary
    assert apply_npu_fused_layers(model, enabled=True) == 0  # already swapped
    other = build_tiny_model(arch, tokenizer)  # a second model: the rotary is not wrapped twice
    assert apply_npu_fused_layers(other, enabled=True) == n_norms + 2 * layers
    assert modeling.apply_rotary_pos_emb is fused_rotary
    attentions = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    assert len(attentions) == layers and all(getattr(m, MARK) for m in attentions)
    assert not any("forward" in m.__dict__ for m in attentions)  # their own forward runs
    seen = []  # the rotary function each attention forward sees while it runs
    for m in attentions:
        m.o_proj.register_forward_pre_hook(lambda *_: seen.append(modeling.apply_rotary_pos_emb))
    fake_npu.calls.clear()
    logits, grads = _forward_and_grad(model, ids)
    assert len(seen) == layers and all(f is fused_rotary for f in seen)  # no per-call patching
    assert modeling.apply_rotary_pos_emb is fused_rotary
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    norms = {id(m.weight): m for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    rms = fake_npu.named("npu_rms_norm")
    assert len(rms) == n_norms
    for (x, gamma), kwargs in rms:
        assert id(gamma) in norms and kwargs == {"epsilon": norms[id(gamma)].variance_epsilon}
        assert x.shape[-1] == gamma.shape[0]

    rot = fake_npu.named("npu_rotary_mul")
    assert len(rot) == 2 * layers  # q and k of every layer
    for (x, r1, r2), kwargs in rot:
        assert kwargs == {} and x.dim() == 4 and x.shape[1] in (heads, kv)  # BNSD
        assert tuple(r1.shape) in {(1, 1, 9, head_dim), (2, 1, 9, head_dim)}  # 11SD or B1SD
        assert r1.shape == r2.shape
        assert r1.dtype == x.dtype

    swi = fake_npu.named("npu_swiglu")
    assert len(swi) == layers
    for (x,), kwargs in swi:
        assert kwargs == {"dim": -1} and x.is_contiguous()
        assert x.shape == (2, 9, 2 * cfg.intermediate_size)


def test_a_rotary_scaled_past_one_keeps_transformers_function(fake_npu, tokenizer):
    """YaRN multiplies cos / sin by its attention factor (> 1 here), outside the kernel's
    documented [-1, 1]: such a model keeps transformers' rotary (logits unchanged, no
    npu_rotary_mul call) while its norms and MLP are fused, and so does every later model of the
    architecture, since the swap is per modeling module."""
    modeling = sys.modules[ARCH_MODELING["llama"]]
    plain_rotary = modeling.apply_rotary_pos_emb
    yarn = build_tiny_model("llama", tokenizer, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 64})  # fmt: skip
    assert yarn.model.rotary_emb.attention_scaling > 1
    ids = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        ref = yarn(ids).logits
    first = build_tiny_model("llama", tokenizer)
    apply_npu_fused_layers(first, enabled=True)  # fused until a scaled model arrives
    assert getattr(modeling.apply_rotary_pos_emb, ROTARY_ORIGINAL) is plain_rotary
    layers = yarn.config.num_hidden_layers
    assert apply_npu_fused_layers(yarn, enabled=True) == 2 * layers + 1 + layers  # norms, MLPs
    assert modeling.apply_rotary_pos_emb is plain_rotary
    fake_npu.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(yarn(ids).logits, ref)
        first(ids)
    assert not fake_npu.named("npu_rotary_mul") and fake_npu.named("npu_swiglu")
    apply_npu_fused_layers(build_tiny_model("llama", tokenizer), enabled=True)
    assert modeling.apply_rotary_pos_emb is plain_rotary  # off for this architecture from now on


def test_fused_layers_are_a_noop_off_npu(fake_npu, tokenizer, monkeypatch):
    model = build_tiny_model("llama", tokenizer)
    monkeypatch.setattr(devices, "is_npu_available", lambda: False)  # a host without an NPU
    assert apply_npu_fused_layers(model) == 0
    assert apply_npu_fused_layers(model, enabled=False) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        model(torch.randint(0, 250, (1, 5)))
    assert fake_npu.calls == []


def test_shapes_and_dtypes_outside_the_contract_take_the_plain_path(fake_npu, tokenizer):
    assert not npu_layers.rms_norm_fits(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16))
    assert not npu_layers.rms_norm_fits(torch.randn(8), torch.ones(8))  # 1-D input
    x = torch.randn(2, 4, 3, 900)
    assert not npu_layers.rotary_fits(x, torch.ones(2, 1, 3, 900), torch.ones(2, 1, 3, 900))
    x = torch.randn(2, 4, 3, 16)
    assert npu_layers.rotary_fits(x, torch.ones(1, 1, 3, 16), torch.ones(1, 1, 3, 16))
    assert not npu_layers.rotary_fits(x, torch.ones(2, 3, 1, 16), torch.ones(2, 3, 1, 16))  # BSND
    assert not npu_layers.swiglu_fits(torch.randn(4, 6).t())  # not contiguous
    assert not npu_layers.swiglu_fits(torch.randn(4, 5))  # odd last dimension

    model = build_tiny_model("llama", tokenizer)  # fp32 norms fed bf16 activations: no fused call
    apply_npu_fused_layers(model, enabled=True)
    norm = model.model.norm
    fake_npu.calls.clear()
    h = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    out = norm(h)
    assert fake_npu.calls == []
    torch.testing.assert_close(out, type(norm).forward(norm, h))


def test_tensors_off_the_kernel_device_and_other_rotary_layouts_take_the_plain_path(
    fake_npu, tokenizer, monkeypatch
):
    """The rotary swap is per modeling module, so every caller of it must still get transformers'
    result where the kernel does not apply: a model left on the CPU of an NPU host, a layout other
    than BNSD (``unsqueeze_dim=2``)."""
    from transformers.models.llama import modeling_llama

    model = build_tiny_model("llama", tokenizer)
    ids = torch.randint(0, 250, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    plain_rotary = modeling_llama.apply_rotary_pos_emb
    apply_npu_fused_layers(model, enabled=True)
    fused_rotary = modeling_llama.apply_rotary_pos_emb
    assert fused_rotary is not plain_rotary

    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)  # BSND: cos / sin unsqueeze at 2
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for got, want in zip(fused_rotary(q, k, cos, sin, 2), plain_rotary(q, k, cos, sin, 2)):
        torch.testing.assert_close(got, want)
    assert fake_npu.calls == []

    monkeypatch.setattr(npu_layers, "KERNEL_DEVICE_TYPE", "npu")  # the model stays on the CPU
    c, s = torch.ones(1, 1, 3, 16), torch.ones(1, 1, 3, 16)
    assert not npu_layers.rotary_fits(torch.randn(2, 4, 3, 16), c, s)
    assert not npu_layers.rms_norm_fits(torch.randn(2, 8), torch.ones(8))
    assert not npu_layers.swiglu_fits(torch.randn(4, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)
    assert fake_npu.calls == []


def test_the_training_session_swaps_the_kernels_on_npu_unless_opted_out(
    fake_npu, tiny_model_dir, tmp_path, monkeypatch
):
    from fluid_npu.train import session as session_mod

    data = write_short_dataset(tmp_path / "data", n_train=8)
    npu = devices.DeviceChoice("npu", 0, "hccl", None)
    monkeypatch.setattr(session_mod.devices, "current", lambda **kwargs: npu)
    counts = {}
    for flag in ("true", "false"):
        cfg = load_config(
            None,
            [
                f"model_name_or_path={tiny_model_dir}",
                "dataset=fluid_demo",
                f"dataset_dir={data}",
                "template=empty",
                "cutoff_len=32",
                f"output_dir={tmp_path / flag}",
                f"npu_fused_kernels={flag}",
            ],
        )
        session = session_mod.TrainingSession(cfg, stage="fluid_stage1")
        counts[flag] = session.fused_modules
        swapped = [m for m in session.model.modules() if getattr(m, MARK, False)]
        assert len(swapped) == counts[flag]
    assert counts == {"true": 9, "false": 0}  # 5 norms + 2 MLPs + 2 attentions of the tiny Llama


def test_stage2_swaps_the_kernels_into_its_frozen_backbone_on_npu(
    fake_npu, tiny_model_dir, tmp_path, monkeypatch
):
    """``npu_fused_kernels`` reaches Stage II too: its frozen backbone runs Stage I's forward."""
    from fluid_npu.train import precision
    from fluid_npu.train.stage1 import run_stage1
    from fluid_npu.train.stage2 import Stage2Run

    data = write_short_dataset(tmp_path / "data", n_train=8)
    common = [f"dataset_dir={data}", "dataset=fluid_demo", "template=empty", "cutoff_len=32"]
    stage1 = tmp_path / "stage1"
    run_stage1(
        load_config(
            None,
            [
                f"model_name_or_path={tiny_model_dir}",
                *common,
                f"output_dir={stage1}",
                "max_steps=1",
            ],
        )
    )
    npu = devices.DeviceChoice("npu", 0, "hccl", None)
    monkeypatch.setattr(precision.devices, "current", lambda **kwargs: npu)
    counts = {}
    for flag in ("true", "false"):
        values = [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={stage1}", *common]
        values += ["stage=fluid_stage2", "k_masks=4"]
        run = Stage2Run(
            load_config(
                None, [*values, f"output_dir={tmp_path / flag}", f"npu_fused_kernels={flag}"]
            )
        )
        counts[flag] = run.fused_modules
        swapped = [m for m in run.backbone.model.modules() if getattr(m, MARK, False)]
        assert len(swapped) == counts[flag]
    assert counts == {"true": 9, "false": 0}


def test_fake_npu_semantics_match_the_plain_modules():
    """The fake itself is checked against transformers' own code paths, so it cannot drift."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    fake = FakeTorchNpu()
    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(fake.npu_rms_norm(x, norm.weight, epsilon=1e-5)[0], norm(x))
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angle = torch.randn(2, 5, 8)
    cos, sin = angle.cos(), angle.sin()  # (the kernel's documented range: [-1, 1])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos[:, None], sin[:, None]
    torch.testing.assert_close(fake.npu_rotary_mul(q, c, s), q_ref)
    torch.testing.assert_close(fake.npu_rotary_mul(k, c, s), k_ref)
    g, u = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(fake.npu_swiglu(torch.cat([g, u], -1)), F.silu(g) * u)
