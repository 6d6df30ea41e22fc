"""vLLM's ``gpu_memory_utilization`` on the engine (``sampling/memory.py``): the slots a share of
the device's memory holds beside the weights, through ``Scheduler(memory_fraction=...)``,
``fluid serve --gpu-memory-utilization`` and ``LLM(gpu_memory_utilization=...)`` — sized when no
batch is given, checked when one is, one ``ConfigError`` naming the sizes and the fix when the
share is too small. The device's total memory is set by the test (``device.total_memory``
patched) so that a known number of cache rows fits; everything else is measured on the tiny
model."""

from __future__ import annotations

import pytest
import torch
from test_serve_live import model_dir  # noqa: F401  (the constructed chain model, a fixture)

from fluid_npu import device as devices
from fluid_npu import host
from fluid_npu.cli import main
from fluid_npu.errors import ConfigError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.memory import MAX_SIZED_BATCH, module_bytes, sized_batch
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.requests import Request
from fluid_npu.sampling.scheduler import Scheduler

CPU = torch.device("cpu")


def _total(monkeypatch, total: float | None) -> None:
    known = None if total is None else int(total)
    monkeypatch.setattr(devices, "total_memory", lambda device: known)


def test_sized_batch_counts_rows_beside_the_weights(monkeypatch):
    _total(monkeypatch, 1000)  # half of it: 500 bytes; weights 200: three rows of 100
    size = dict(row_bytes=100, weight_bytes=200, device=CPU)
    assert sized_batch(fraction=0.5, max_batch=None, **size) == 3
    assert sized_batch(fraction=0.5, max_batch=None, prefix_rows=1, **size) == 2
    assert sized_batch(fraction=0.5, max_batch=None, power_of_two=True, **size) == 2
    assert sized_batch(fraction=0.5, max_batch=3, **size) == 3
    assert sized_batch(fraction=0.5, max_batch=2, **size) == 2  # (a cap, as vLLM's max_num_seqs)
    with pytest.warns(UserWarning, match="max_batch 4: .* holds 3 slots"):
        assert sized_batch(fraction=0.5, max_batch=4, **size) == 3
    with pytest.warns(UserWarning, match="holds 2 slots"):  # 3 slots would be a cache of 4
        assert sized_batch(fraction=0.5, max_batch=3, power_of_two=True, **size) == 2
    with pytest.raises(ConfigError, match="not one slot fits beside 3 prefix-cache rows") as err:
        sized_batch(fraction=0.5, max_batch=None, prefix_rows=3, **size)
    assert "raise gpu_memory_utilization" in str(err.value)
    with pytest.raises(ConfigError, match=r"weights take 0\.0 MiB"):  # (bytes here: MiB figures)
        sized_batch(fraction=0.5, max_batch=8, prefix_rows=3, **size)
    with pytest.raises(ConfigError, match="not one slot fits;"):  # the weights fill the share
        sized_batch(fraction=0.1, max_batch=None, **size)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="must be in \\(0, 1\\]"):
            sized_batch(fraction=bad, max_batch=None, **size)
    _total(monkeypatch, 10**15)
    assert sized_batch(fraction=0.9, max_batch=None, **size) == MAX_SIZED_BATCH
    _total(monkeypatch, None)
    with pytest.raises(ConfigError, match="not known here"):
        sized_batch(fraction=0.9, max_batch=None, **size)


def test_the_host_s_total_memory_is_read():
    total, free = devices.total_memory("cpu"), devices.free_memory("cpu")
    assert total is not None and free is not None and 0 < free <= total
    assert devices.total_memory("meta") is None


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer(mask_token=True)
    return build_tiny_model("llama", tok), tok.mask_token_id


def test_a_sized_engine_holds_what_fits_and_decodes(tiny, monkeypatch):
    model, mask = tiny
    kw = dict(max_len=48, policy="fixed:4")
    row = Scheduler(model, mask, max_batch=1, **kw).kv.nbytes  # one slot, no prefix rows
    weights = module_bytes((model,))
    _total(monkeypatch, weights + 3.5 * row)  # three rows fit in the whole memory
    sched = Scheduler(model, mask, max_batch=None, memory_fraction=1.0, **kw)
    assert sched.slots_n == 3 and sched.kv.nbytes == 3 * row
    pooled = Scheduler(model, mask, max_batch=None, memory_fraction=1.0, prefix_slots=1, **kw)
    assert pooled.slots_n == 2 and pooled.kv.nbytes == 3 * row
    alone = Scheduler(model, mask, max_batch=3, **kw)
    prompts = [[65 + i, 66, 67 + i] for i in range(5)]  # more requests than slots: they queue
    got = run_requests(sched, [Request(str(i), p, 6) for i, p in enumerate(prompts)])
    want = run_requests(alone, [Request(str(i), p, 6) for i, p in enumerate(prompts)])
    assert {k: v.tokens for k, v in got.items()} == {k: v.tokens for k, v in want.items()}
    assert Scheduler(model, mask, max_batch=3, memory_fraction=1.0, **kw).slots_n == 3
    with pytest.warns(UserWarning, match="so 3 requests run at once"):
        assert Scheduler(model, mask, max_batch=4, memory_fraction=1.0, **kw).slots_n == 3
    free = devices.free_memory  # a share the device has not got free: the fix names the share
    monkeypatch.setattr(devices, "free_memory", lambda device: row)
    with pytest.raises(ConfigError, match=r"utilization 1\.0 asks for more than is free"):
        Scheduler(model, mask, max_batch=None, memory_fraction=1.0, **kw)
    monkeypatch.setattr(devices, "free_memory", free)
    with pytest.raises(ConfigError, match="max_batch=None sizes the slots"):
        Scheduler(model, mask, max_batch=None, **kw)


def test_serve_sizes_its_slots_and_says_so(model_dir, monkeypatch, capsys):  # noqa: F811
    from fluid_npu.serve.server import ServeSettings, build_scheduler

    sched, *_ = build_scheduler(ServeSettings(model=model_dir, max_batch=1, max_len=64))
    row, weights = sched.kv.nbytes, module_bytes((sched.model,))
    _total(monkeypatch, (weights + 5.5 * row) / 0.5)
    settings = ServeSettings(model=model_dir, max_batch=None, max_len=64,
                             gpu_memory_utilization=0.5)  # fmt: skip
    settings.check()
    sched, _, _, info = build_scheduler(settings)
    assert sched.slots_n == settings.max_batch == info["max_batch"] == 5
    assert info["gpu_memory_utilization"] == 0.5
    assert info["kv_cache_gib"] == round(5 * row / 2**30, 3)
    from fluid_npu.serve.dp import rank_args

    ranked = rank_args(ServeSettings(model="m", max_batch=None, gpu_memory_utilization=0.5), 1)
    assert "--max-batch" not in ranked  # (each rank sizes its own; the front reads their sizes)
    assert ranked[ranked.index("--gpu-memory-utilization") + 1] == "0.5"
    for flags, said in (
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--tensor-parallel-size", "2"], "--data-parallel-size"),
        (["-tp", "4"], "--tensor-parallel-size 4"),
    ):
        assert main(["serve", "--model", model_dir, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_llm_takes_vllms_memory_and_parallel_arguments(model_dir, monkeypatch):  # noqa: F811
    from fluid_npu.sampling.llm import LLM, SamplingParams

    one = LLM(model_dir, max_num_seqs=1, max_model_len=64)
    assert one.engine.slots_n == 1
    row, weights = one.engine.kv.nbytes, module_bytes((one.fluid.model, one.fluid.khead))
    _total(monkeypatch, (weights + 4.5 * row) / 0.8)
    sized = LLM(model_dir, gpu_memory_utilization=0.8, max_model_len=64, tensor_parallel_size=1)
    assert sized.engine.slots_n == 4
    out = sized.generate(["abc", "def"], SamplingParams(temperature=0, max_tokens=4),
                         use_tqdm=False)  # fmt: skip
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert LLM(model_dir, max_model_len=64).engine.slots_n == 8  # (no share given: 8, as before)
    assert sized.engine._compiled is None  # (eager unless told: vLLM's enforce_eager=True here)
    graphs = LLM(model_dir, max_num_seqs=1, max_model_len=64, enforce_eager=False)
    assert graphs.engine._compiled is not None  # (its tokens: test_scheduler's compiled test)
    with pytest.raises(ConfigError, match="contradict"):
        LLM(model_dir, enforce_eager=True, engine_kwargs={"compile": True})
    with pytest.raises(ConfigError, match="must be in"):  # (refused before the model loads)
        LLM("no/such/model", gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2"):
        LLM(model_dir, tensor_parallel_size=2)
    with pytest.warns(UserWarning, match="max_batch 9: .* holds 4 slots"):
        capped = LLM(model_dir, max_num_seqs=9, gpu_memory_utilization=0.8, max_model_len=64)
    assert capped.engine.slots_n == 4


def test_a_containers_memory_limit_bounds_the_host_s(tmp_path, monkeypatch):
    """A memory cgroup (a container's limit, v1 or v2, in the process's own group or at the
    mount's root as a namespace shows it) bounds what the host's /proc/meminfo says."""
    proc, mount = tmp_path / "cgroup", tmp_path / "fs"

    def group(where: str, files: dict[str, str]) -> None:
        (mount / where).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (mount / where / name).write_text(text + "\n")

    proc.write_text("0::/pod/x\n")
    group("pod/x", {"memory.max": str(2**30), "memory.current": "4096"})
    assert host.cgroup_memory(str(proc), str(mount)) == (2**30, 4096)
    group("pod/x", {"memory.max": "max", "memory.current": "4096"})
    assert host.cgroup_memory(str(proc), str(mount)) == (None, 4096)
    proc.write_text("5:cpu,cpuacct:/\n4:memory:/job\n")
    group("memory", {"memory.limit_in_bytes": str(3 << 30), "memory.usage_in_bytes": "77"})
    assert host.cgroup_memory(str(proc), str(mount)) == (3 << 30, 77)  # (the root's view)
    group("memory/job", {"memory.limit_in_bytes": "9223372036854771712",
                         "memory.usage_in_bytes": "5"})  # fmt: skip
    assert host.cgroup_memory(str(proc), str(mount)) == (None, 5)  # (v1's "no limit")
    assert host.cgroup_memory(str(tmp_path / "none"), str(mount)) == (None, None)
    host_total, host_free = devices.total_memory("cpu"), devices.free_memory("cpu")
    monkeypatch.setattr(host, "cgroup_memory", lambda: (2**20, 2**18))
    assert devices.total_memory("cpu") == min(host_total, 2**20)
    assert devices.free_memory("cpu") <= min(host_free, 2**20 - 2**18)


def test_cpu_ranks_share_the_share(model_dir):  # noqa: F811
    """``--data-parallel-size N`` on a CPU: the ranks share one memory, so each sizes its cache
    from F / N (on accelerators each rank has its device, and F)."""
    from fluid_npu.serve.dp import Ranks
    from fluid_npu.serve.server import ServeSettings

    settings = ServeSettings(model=model_dir, max_batch=None, gpu_memory_utilization=0.5,
                             data_parallel_size=2, device="cpu")  # fmt: skip
    args = Ranks(settings)._args(1)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.25"
    assert settings.gpu_memory_utilization == 0.5  # (the front's own settings keep what was given)
