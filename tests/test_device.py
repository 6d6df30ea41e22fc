"""The device layer's contract: given what is available, which device, back end and dtype."""

from __future__ import annotations

import pytest
import torch

from fluid_npu import device
from fluid_npu.errors import ConfigError


@pytest.mark.parametrize(
    ("npu", "cuda", "bf16", "want", "expect"),
    [
        (True, True, True, "auto", ("npu", "hccl", torch.bfloat16)),
        (True, False, False, "auto", ("npu", "hccl", torch.float16)),
        (False, True, True, "auto", ("cuda", "nccl", torch.bfloat16)),
        (False, True, False, "auto", ("cuda", "nccl", torch.float16)),
        (False, False, True, "auto", ("cpu", "gloo", torch.bfloat16)),
        (True, True, True, "cpu", ("cpu", "gloo", torch.bfloat16)),
        (True, True, True, "cuda", ("cuda", "nccl", torch.bfloat16)),
    ],
)
def test_choose_order_backend_dtype(npu, cuda, bf16, want, expect):
    choice = device.choose(npu=npu, cuda=cuda, bf16_supported=bf16, want_bf16=True, force=want)
    assert (choice.type, choice.backend, choice.autocast_dtype) == expect


def test_local_rank_selects_the_accelerator_index():
    choice = device.choose(npu=True, cuda=False, bf16_supported=True, local_rank=5)
    assert (choice.type, choice.index, choice.backend) == ("npu", 5, "hccl")
    assert device.choose(npu=False, cuda=False, bf16_supported=True, local_rank=5).index is None


def test_one_card_of_several_is_forced_by_its_index(monkeypatch):
    """``--device npu:1`` / ``cuda:1`` runs on that card (a user's pick on a multi-card host); an
    index past what the host shows, a bad index or one given to the CPU is one clear error."""
    pick = device.choose(npu=True, cuda=False, bf16_supported=True, force="npu:1", count=2)
    assert (pick.type, pick.index, pick.backend) == ("npu", 1, "hccl")
    assert device.choose(npu=True, cuda=True, bf16_supported=True, force="cuda:0").index == 0
    with pytest.raises(ConfigError, match=r"'npu:2': this host shows 2 devices, npu:0 to npu:1"):
        device.choose(npu=True, cuda=False, bf16_supported=True, force="npu:2", count=2)
    with pytest.raises(ConfigError, match=r"'cuda:1': this host shows cuda:0;.*CUDA_VISIBLE"):
        device.choose(npu=False, cuda=True, bf16_supported=True, force="cuda:1", count=1)
    for bad, says in [
        ("npu:x", "the index after npu: is a number"),
        ("cpu:0", "the CPU takes no index; give cpu"),
        ("tpu:0", "unknown device 'tpu:0'"),
        ("gpu:x", "unknown device 'gpu:x'"),  # (the name first: gpu:0 is no fix)
        ("cuda:²", "the index after cuda: is a number"),  # (a digit int() refuses)
    ]:
        with pytest.raises(ConfigError, match=says):
            device.choose(npu=True, cuda=True, bf16_supported=True, force=bad)
    with pytest.raises(ConfigError, match="'npu:1' was requested but is not available") as err:
        device.choose(npu=False, cuda=True, bf16_supported=True, force="npu:1", count=0)
    assert "set_env.sh" in str(err.value)  # (the Ascend hint, as for a bare npu)
    # the probes count the host's cards when an index is given
    monkeypatch.setattr(device, "is_npu_available", lambda: False)
    monkeypatch.setattr(device, "is_cuda_available", lambda: True)
    monkeypatch.setattr(device, "visible_device_count", lambda: 2)
    assert device.kind(force="cuda:1") == "cuda"
    device.check_device("cuda:1")
    with pytest.raises(ConfigError, match="this host shows 2 devices"):
        device.check_device("cuda:2")


def test_an_inference_command_binds_the_card_it_names(monkeypatch):
    """``claim`` (behind ``--device`` of generate / bench / eval / serve) makes the card the
    process's current one, so that work created without an index lands beside the model."""
    bound = []
    monkeypatch.setattr(device, "is_npu_available", lambda: False)
    monkeypatch.setattr(device, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    assert device.claim("cuda:3") == torch.device("cuda", 3) and bound == [3]
    assert device.claim("auto") == torch.device("cuda", 0) and bound == [3, 0]
    with pytest.raises(ConfigError, match="this host shows 4 devices, cuda:0 to cuda:3"):
        device.claim("cuda:4")
    assert device.claim("cpu") == torch.device("cpu") and bound == [3, 0]


def test_no_mixed_precision_unless_asked():
    assert (
        device.choose(npu=False, cuda=True, bf16_supported=True, want_bf16=False).autocast_dtype
        is None
    )
    assert (
        device.choose(npu=False, cuda=False, bf16_supported=True, want_bf16=False).autocast_dtype
        is None
    )


def test_forcing_an_absent_device_fails_clearly(monkeypatch):
    with pytest.raises(ConfigError, match="'npu' was requested but is not available"):
        device.choose(npu=False, cuda=False, bf16_supported=True, force="npu")
    # what the probe found and what to check, wherever the device is forced (--device, device:)
    seen = "torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
    monkeypatch.setattr(device, "npu_import_error", lambda: seen)
    monkeypatch.setattr(device, "is_cuda_available", lambda: False)
    for probe in (device.current, device.kind):
        with pytest.raises(ConfigError) as err:
            probe(force="npu")
        assert seen in str(err.value) and "set_env.sh" in str(err.value)
    with pytest.raises(ConfigError, match=r"cuda.is_available\(\) is False"):
        device.kind(force="cuda")


def test_this_host_is_detected_as_what_it_has():
    """Whatever this host is (CPU box, CUDA box, Ascend box), the probes agree with torch."""
    npu = device.is_npu_available()
    cuda = torch.cuda.is_available()
    choice = device.current()
    assert choice.type == ("npu" if npu else "cuda" if cuda else "cpu")
    assert choice.backend == {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[choice.type]
    if npu:
        assert device.npu_import_error() is None and device.device_module("npu") is torch.npu
        assert device.visible_device_count() == torch.npu.device_count() >= 1
    else:  # the reason is kept for whoever asks for an NPU
        assert device.npu_import_error().startswith("torch_npu ")
        assert device.device_module("npu") is None
    if choice.type == "cpu":
        assert device.visible_device_count() == 0
        assert device.memory_stats("cpu")["rss_peak_mib"] > 0
    else:
        x = torch.ones(1024, device=choice.device)
        stats = device.memory_stats(choice.device)
        assert stats["allocated_mib"] > 0 and stats["peak_allocated_mib"] >= stats["allocated_mib"]
        del x


def test_seed_everything_is_reproducible():
    device.seed_everything(123)
    a = torch.rand(4)
    device.seed_everything(123)
    assert torch.equal(a, torch.rand(4))


def test_free_memory_counts_the_caching_allocators_unused_blocks(monkeypatch):
    # an accelerator's free memory is mem_get_info's plus what torch's allocator holds unused
    # (the KV cache can be carved from those blocks); the CPU's is the host's available memory
    class FakeModule:
        @staticmethod
        def mem_get_info(dev):
            return (100, 1000)

        @staticmethod
        def memory_reserved(dev):
            return 50

        @staticmethod
        def memory_allocated(dev):
            return 20

    fake = lambda kind: FakeModule if kind == "cuda" else None  # noqa: E731
    monkeypatch.setattr(device, "device_module", fake)
    assert device.free_memory("cuda:0") == 130
    assert device.free_memory("meta") is None  # a device it knows nothing of: not the host's
    cpu = device.free_memory("cpu")
    assert cpu is None or cpu > 0


def _sdpa_backends() -> tuple[bool, bool, bool, bool]:
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled())  # fmt: skip


def test_an_engine_forward_on_cuda_never_takes_cudnn_attention():
    """cuDNN's SDPA builds a plan per new shape (tens of ms; an engine's steps change shape all the
    time): on CUDA the engine's forwards may take every back end but it, elsewhere torch's choice
    stands, and the process's own setting is back afterwards."""
    before = _sdpa_backends()
    with device.engine_attention(torch.device("cuda", 0)):
        assert _sdpa_backends() == (False, True, True, True)
    assert _sdpa_backends() == before
    for other in ("cpu", "meta"):
        with device.engine_attention(other):
            assert _sdpa_backends() == before


def test_fluid_sdpa_cudnn_gives_torch_its_choice_back(monkeypatch):
    before = _sdpa_backends()
    monkeypatch.setenv("FLUID_SDPA_CUDNN", "1")  # (to measure what leaving cuDNN out changes)
    with device.engine_attention("cuda"):
        assert _sdpa_backends() == before


def test_every_engine_forward_runs_under_the_engines_attention_choice(monkeypatch):
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=0)
    entered = []

    class Seen:
        def __init__(self, dev):
            self.dev = torch.device(dev)

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(device, "engine_attention", Seen)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[])
    forwards = []
    real = sched._forward
    sched._forward = lambda *a, **kw: forwards.append(1) or real(*a, **kw)
    prompts = [tok(t)["input_ids"] for t in ("hello world", "the quick brown fox")]
    run_requests(sched, [Request(str(i), p, 5) for i, p in enumerate(prompts)])
    assert forwards and len(entered) == len(forwards)  # (prefills and decode steps alike)
    assert set(entered) == {torch.device("cpu")}


def test_the_profiler_records_a_cuda_devices_kernels_and_the_host_always():
    from torch.profiler import ProfilerActivity

    cpu, cuda = ProfilerActivity.CPU, ProfilerActivity.CUDA
    assert device.profiler_activities("cpu") == [cpu]
    assert device.profiler_activities(torch.device("cuda", 1)) == [cpu, cuda]
    assert device.profiler_activities("meta") == [cpu]
