"""The Ascend path, tested on a CPU through its contracts.

* The device layer: on an NPU host a process binds ``npu:<LOCAL_RANK>``, joins ``hccl`` and
  autocasts to bf16 (``torch.autocast("npu", dtype=torch.bfloat16)``); the FLUID attention runs the
  ``npu`` back end when asked for.
* torch_npu's fused layer kernels (``fluid_ops.npu_layers``), swapped into Llama / Qwen2 / Qwen3 /
  Mistral by ``apply_npu_fused_layers``: a fake torch_npu implementing the documented semantics in
  plain torch is injected through the one import hook; the swapped models give the original logits
  and gradients, and every op is called with its documented arguments.
* MindSpeed is optional and imported lazily; its absence is a clear ConfigError.
* The openPangu-7B recipes load and ship valid ZeRO-2 JSON.
* torch_npu's renamed arguments: ``test_npu_versions``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from synthetic import write_short_dataset

import fluid_ops
import fluid_ops.npu_layers as npu_layers
from fluid_npu import device as devices
from fluid_npu.cli import main as cli_main
from fluid_npu.config import load_config
from fluid_npu.errors import ConfigError
from fluid_npu.model.attention import configure_attention
from fluid_npu.model.fused_layers import (
    MARK,
    ROTARY_ORIGINAL,
    apply_npu_fused_layers,
    enable_mindspeed,
)
from fluid_npu.model.tiny import build_tiny_model
from fluid_ops import dispatch
from fluid_ops.meta import AttnMeta

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Device layer
# ---------------------------------------------------------------------------------------------


class FakeNpuDeviceModule:
    """``torch.npu`` as torch_npu installs it, reduced to what the device layer calls."""

    def __init__(self, bf16: bool = True) -> None:
        self.bf16, self.bound = bf16, []

    def is_available(self) -> bool:
        return True

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def set_device(self, index: int) -> None:
        self.bound.append(index)

    def device_count(self) -> int:
        return 8


@pytest.fixture
def npu_host(monkeypatch):
    """This process as one rank of an NPU host: torch_npu usable, ``torch.npu`` present."""
    module = FakeNpuDeviceModule()
    monkeypatch.setattr(devices, "npu_import_error", lambda: None)
    monkeypatch.setattr(torch, "npu", module, raising=False)
    return module


def test_an_npu_rank_binds_its_local_rank_joins_hccl_and_autocasts_bf16(npu_host, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    choice = devices.current(want_bf16=True)
    assert (choice.type, choice.index, choice.backend) == ("npu", 5, "hccl")
    assert choice.autocast_dtype == torch.bfloat16
    devices.set_device(choice)
    assert npu_host.bound == [5]
    assert devices.visible_device_count() == 8

    seen = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append((a, k)) or "ctx")
    assert devices.autocast(choice) == "ctx"
    assert seen == [(("npu",), {"dtype": torch.bfloat16})]

    npu_host.bf16 = False  # an NPU without bf16 falls back to fp16, never to fp32 silently
    assert devices.current(want_bf16=True).autocast_dtype == torch.float16
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert devices.current(want_bf16=False, force="cpu").backend == "gloo"  # device: cpu wins


def test_the_npu_attention_backend_is_selected_and_says_why_it_cannot_run_here(make_model):
    model = make_model("llama")
    configure_attention(model, "npu")
    assert model.config._attn_implementation == "fluid"
    assert model.config.fluid_attn_backend == "npu"
    q = k = v = torch.randn(1, 2, 4, 8)
    pos = torch.arange(4)[None]
    meta = AttnMeta.self_attention(pos, torch.full_like(pos, -1), n_main=4)
    with pytest.raises(fluid_ops.BackendUnavailable, match="need NPU tensors"):
        fluid_ops.fluid_attention(q, k, v, meta, backend="npu")


# ---------------------------------------------------------------------------------------------
# Fused layer kernels
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# MindSpeed
# ---------------------------------------------------------------------------------------------


def test_use_mindspeed_without_it_installed_says_how_to_install(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mindspeed", None)  # importlib finds no such package
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    argv = ["train", str(cfg), f"model_name_or_path={tiny_model_dir}", "dataset=x"]
    assert cli_main([*argv, f"output_dir={out}", "use_mindspeed=true"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("fluid: error:")]
    assert "use_mindspeed: true, but MindSpeed is not installed" in line
    assert "git clone https://gitcode.com/Ascend/MindSpeed.git" in line
    assert "pip install -e MindSpeed" in line and "placeholder" in line
    assert not out.exists()


@pytest.fixture
def fake_mindspeed(tmp_path, monkeypatch):
    """A stand-in ``mindspeed`` package on sys.path whose adaptor records that it was imported."""
    pkg = tmp_path / "site" / "mindspeed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "megatron_adaptor.py").write_text("PATCHED = True\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    for name in ("mindspeed", "mindspeed.megatron_adaptor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield pkg
    for name in ("mindspeed", "mindspeed.megatron_adaptor"):
        sys.modules.pop(name, None)


def test_mindspeed_is_imported_only_when_asked(fake_mindspeed):
    import fluid_npu.train.session  # noqa: F401  (importing the trainer never imports it)

    assert "mindspeed.megatron_adaptor" not in sys.modules
    enable_mindspeed()
    assert sys.modules["mindspeed.megatron_adaptor"].PATCHED is True


def test_a_broken_mindspeed_is_a_config_error(fake_mindspeed):
    (fake_mindspeed / "megatron_adaptor.py").write_text("import megatron_core_that_is_missing\n")
    with pytest.raises(ConfigError, match=r"mindspeed.megatron_adaptor cannot be imported"):
        enable_mindspeed()


# ---------------------------------------------------------------------------------------------
# The openPangu-7B recipes
# ---------------------------------------------------------------------------------------------


def _hf_filled_deepspeed_keys() -> set[str]:
    """The config paths transformers' DeepSpeed integration fills when they say "auto"."""
    from transformers.integrations import deepspeed as hf_ds

    source = inspect.getsource(hf_ds.HfTrainerDeepSpeedConfig)
    keys = set(re.findall(r'fill_(?:match|only)\(\s*"([^"]+)"', source))
    keys |= set(re.findall(r'"(zero_optimization\.[a-z0-9_]+)"', source))  # hidden-size keys
    assert {"train_micro_batch_size_per_gpu", "bf16.enabled"} <= keys  # the parse found them
    return keys


def _autos(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def test_the_zero2_json_is_valid_and_auto_only_where_transformers_fills_it():
    ds = json.loads((ROOT / "configs" / "ds_z2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("stage3") for k in ds["zero_optimization"])
    autos = set(_autos(ds))
    required = {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16.enabled",
    }
    assert required <= autos
    assert autos <= _hf_filled_deepspeed_keys(), autos - _hf_filled_deepspeed_keys()


@pytest.mark.parametrize("stage", [1, 2])
def test_the_pangu_recipes_load_with_the_8x910b_settings(stage):
    path = ROOT / "configs" / f"pangu7b_stage{stage}.yaml"
    cfg = load_config(path)
    assert cfg.fluid.stage == f"fluid_stage{stage}"
    assert (cfg.train.bf16, cfg.fluid.k_masks, cfg.data.cutoff_len) == (True, 16, 1024)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.lr_scheduler_type == "cosine"
    assert cfg.train.warmup_ratio == 0.1
    assert cfg.data.template == "openpangu" and cfg.model.attn_backend == "npu"
    assert cfg.train.deepspeed == "configs/ds_z2.json" and (ROOT / cfg.train.deepspeed).is_file()
    if stage == 1:
        f = cfg.fluid
        assert (f.finetuning_type, f.lora_rank, f.lora_alpha, f.lora_target) == (
            "lora",
            16,
            32.0,
            "all",
        )
        assert cfg.model.npu_fused_kernels is True
    else:
        assert cfg.model.adapter_name_or_path == "outputs/pangu7b/stage1"
    for key, value in cfg.to_dict().items():  # placeholders a user edits, nothing private
        if isinstance(value, str):
            assert not value.startswith(("/", "~")), (key, value)
    from fluid_npu.data.templates import TEMPLATES

    assert "openpangu" in TEMPLATES


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
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos[:, None], sin[:, None]
    torch.testing.assert_close(fake.npu_rotary_mul(q, c, s), q_ref)
    torch.testing.assert_close(fake.npu_rotary_mul(k, c, s), k_ref)
    g, u = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(fake.npu_swiglu(torch.cat([g, u], -1)), F.silu(g) * u)
