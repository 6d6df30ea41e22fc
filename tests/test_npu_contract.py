"""The Ascend path, tested on a CPU through its contracts.

* The device layer: on an NPU host a process binds ``npu:<LOCAL_RANK>``, joins ``hccl`` and
  autocasts to bf16 (``torch.autocast("npu", dtype=torch.bfloat16)``); the FLUID attention runs the
  ``npu`` back end when asked for.
* ``--compile`` on an NPU is TorchAir's ``reduce-overhead`` graph mode (aclgraph), imported lazily;
  its absence is a clear ConfigError.
* MindSpeed is optional and imported lazily; its absence is a clear ConfigError.
* The openPangu-7B recipes load and ship valid ZeRO-2 JSON.
* torch_npu's fused layer kernels: ``test_npu_fused_layers``; the attention ops' argument names
  in every release's schema: ``test_npu_real_ops``.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import fluid_ops
from fluid_npu import device as devices
from fluid_npu.cli import main as cli_main
from fluid_npu.config import load_config
from fluid_npu.errors import ConfigError
from fluid_npu.model.attention import configure_attention
from fluid_npu.model.fused_layers import enable_mindspeed
from fluid_npu.model.tiny import build_tiny_model
from fluid_npu.sampling.scheduler import Scheduler
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
# Graph mode: --compile on an NPU
# ---------------------------------------------------------------------------------------------


class FakeCompilerConfig:
    """``torchair.CompilerConfig`` reduced to its graph mode (Ascend IR graphs by default)."""

    def __init__(self) -> None:
        self.mode = "max-autotune"


@pytest.fixture
def torchair(monkeypatch):
    """torch_npu and TorchAir as an NPU host imports them: ``get_npu_backend`` records the config
    it is given and returns a backend that runs the traced graph as it is."""
    module = types.ModuleType("torchair")
    module.configs = []

    def get_npu_backend(*, compiler_config=None, custom_decompositions=None):
        module.configs.append(compiler_config)
        return lambda gm, example_inputs: gm.forward

    module.CompilerConfig = FakeCompilerConfig
    module.get_npu_backend = get_npu_backend
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setitem(sys.modules, "torchair", module)
    devices.npu_graph_backend.cache_clear()  # (a backend cached earlier, real or not, is not this)
    yield module
    devices.npu_graph_backend.cache_clear()


def test_the_npu_graph_backend_is_torchairs_in_reduce_overhead_mode(torchair):
    backend = devices.npu_graph_backend()
    (config,) = torchair.configs
    assert isinstance(config, FakeCompilerConfig) and config.mode == "reduce-overhead"
    assert devices.npu_graph_backend() is backend and len(torchair.configs) == 1  # one a process
    assert devices.compile_kwargs("npu") == {"backend": backend}  # no inductor mode beside it
    # backend=None is torch.compile's own default: no backend named, TorchAir still runs
    assert devices.compile_kwargs("npu", {"backend": None}) == {"backend": backend}


@pytest.mark.parametrize(
    ("device_type", "given", "expected"),
    [
        ("cpu", None, {"mode": None}),  # inductor
        ("cuda", None, {"mode": "reduce-overhead"}),  # inductor's CUDA graphs
        ("cuda", {"backend": "eager"}, {"backend": "eager"}),
        ("npu", {"backend": "eager", "dynamic": None}, {"backend": "eager", "dynamic": None}),
        ("npu", {"mode": "max-autotune"}, {"mode": "max-autotune"}),  # inductor, as asked
    ],
)
def test_compile_settings_per_device_and_what_a_caller_gives_wins(
    device_type, given, expected, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torchair", None)  # none of these imports it
    assert devices.compile_kwargs(device_type, given) == expected


def test_a_compiled_engine_on_an_npu_hands_torch_compile_torchairs_backend(
    torchair, tokenizer, monkeypatch
):
    seen, asked = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    real = devices.compile_kwargs

    def on_npu(device_type, given=None):  # the engine's device is this CPU: ask as an NPU's
        asked.append(device_type)
        return real("npu", given)

    monkeypatch.setattr(devices, "compile_kwargs", on_npu)
    model = build_tiny_model("llama", tokenizer, seed=3)
    store: dict = {}

    def engine(**kw):
        return Scheduler(
            model, tokenizer.mask_token_id, policy="ar", compile=True, budgets=store, **kw
        )

    npu = engine()
    backend = devices.npu_graph_backend()
    assert asked == ["cpu"]  # the engine asks for its own device type
    assert seen == [{"backend": backend, "dynamic": False}]  # no inductor mode, static shapes
    assert torchair.configs[0].mode == "reduce-overhead"
    assert npu._compiled is npu._lean
    assert ("backend", repr(backend)) in npu._compile_key
    assert engine().budget is npu.budget  # one backend a process: engines share what they measure
    inductor = engine(compile_options={"mode": "reduce-overhead"})
    assert seen[-1] == {"mode": "reduce-overhead", "dynamic": False}
    assert inductor.budget is not npu.budget and inductor._compile_key != npu._compile_key


def test_compile_on_an_npu_without_torchair_says_what_to_install(torchair, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)  # importlib finds no such package
    with pytest.raises(ConfigError) as err:
        devices.npu_graph_backend()
    message = str(err.value)
    assert "--compile on an Ascend NPU runs TorchAir's graph mode" in message
    assert "cannot be imported" in message and "torchair" in message
    assert "install the torchair that matches your torch_npu" in message
    assert "or leave out --compile" in message

    real = devices.compile_kwargs
    monkeypatch.setattr(devices, "compile_kwargs", lambda _, given=None: real("npu", given))
    model = build_tiny_model("llama", tokenizer, seed=3)
    with pytest.raises(ConfigError, match="TorchAir"):
        Scheduler(model, tokenizer.mask_token_id, policy="ar", lean=False, compile=True)
    assert model.config._attn_implementation == "sdpa"  # the failed engine gave it back


def test_a_torchair_without_graph_modes_is_a_config_error(torchair):
    torchair.CompilerConfig = type("CompilerConfig", (), {})  # torchair 6.0.x: no ``mode``
    with pytest.raises(ConfigError, match=r"has no mode .*7\.0 or later has reduce-overhead"):
        devices.npu_graph_backend()


# ---------------------------------------------------------------------------------------------
# MindSpeed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["fluid_stage1", "fluid_stage2"])
def test_use_mindspeed_without_it_installed_says_how_to_install(
    tiny_model_dir, tmp_path, capsys, monkeypatch, stage
):
    monkeypatch.setitem(sys.modules, "mindspeed", None)  # importlib finds no such package
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    argv = [
        "train",
        str(cfg),
        f"model_name_or_path={tiny_model_dir}",
        "dataset=x",
        f"stage={stage}",
    ]
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
    assert cfg.model.trust_remote_code is True  # (PanguTokenizer is remote code)
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
