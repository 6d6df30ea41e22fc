"""LLaMA-Factory keys that used to be ignored: held-out evaluation (``val_size``, ``eval_dataset``,
``do_eval``, ``eval_steps``), ``ddp_timeout``, and the datasets built once on the main process."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from conftest import as_overrides, tiny_stage1_recipe
from synthetic import short_examples, write_short_dataset

from fluid_npu import device as devices
from fluid_npu.config import load_config
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.model.mask_token import MaskToken
from fluid_npu.train.common import training_arguments
from fluid_npu.train.data import load_run_data, main_process_builds
from fluid_npu.train.stage1 import run_stage1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = write_short_dataset(tmp_path_factory.mktemp("data"), n_train=32, seed=0)
    rows = short_examples(7, seed=1)
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = json.loads((out / "dataset_info.json").read_text())
    info["fluid_heldout"] = {"file_name": "heldout.jsonl"}
    (out / "dataset_info.json").write_text(json.dumps(info))
    return out


def _overrides(base: Path, data: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = dict(
        max_steps=4, logging_steps=1, save_steps=100, per_device_train_batch_size=4, output_dir=out
    )
    return as_overrides(tiny_stage1_recipe(base, data, **{**values, **extra}))


def _run(base: Path, data: Path, out: Path, **extra: object) -> dict:
    return run_stage1(load_config(None, _overrides(base, data, out, **extra)))


def _evals(record: dict) -> list[dict]:
    return [h for h in record["log_history"] if "eval_loss" in h]


def test_val_size_is_evaluated_every_eval_steps(tiny_model_dir, data, tmp_path):
    record = _run(tiny_model_dir, data, tmp_path / "o", val_size=6, eval_steps=2)
    evals = _evals(record)
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:  # sum_of_means with unit weights: the loss is the sum of its parts
        assert h["eval_loss"] == pytest.approx(h["eval_loss_ar"] + h["eval_loss_diff"], abs=1e-5)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # training helps the held-out examples
    assert record["data"]["eval_examples"] == 6 and record["data"]["train_examples"] == 26
    for key in ("eval_loss", "eval_loss_ar", "eval_loss_diff"):
        assert record[key] == evals[-1][key]
    on_disk = json.loads((tmp_path / "o" / "run.json").read_text())
    assert on_disk["eval_loss_diff"] == record["eval_loss_diff"]


def test_eval_dataset_is_held_out_and_the_final_weights_are_evaluated(
    tiny_model_dir, data, tmp_path
):
    values = dict(eval_dataset="fluid_heldout", eval_steps=3)
    record = _run(tiny_model_dir, data, tmp_path / "o", **values)
    assert record["data"]["eval_examples"] == 7 and record["data"]["train_examples"] == 32
    assert [h["step"] for h in _evals(record)] == [3, 4]  # step 4: the final evaluation
    assert record["eval_loss"] == _evals(record)[-1]["eval_loss"]


def test_do_eval_false_keeps_the_split_but_skips_evaluation(tiny_model_dir, data, tmp_path):
    values = dict(val_size=6, do_eval=False, max_steps=2)
    record = _run(tiny_model_dir, data, tmp_path / "o", **values)
    assert _evals(record) == [] and "eval_loss" not in record
    assert record["data"]["train_examples"] == 26


def _cpu() -> devices.DeviceChoice:
    return devices.choose(npu=False, cuda=False, bf16_supported=True, want_bf16=False)


def test_eval_and_ddp_timeout_keys_reach_training_arguments(tmp_path):
    out = f"output_dir={tmp_path / 'o'}"
    args = training_arguments(load_config(None, [out, "ddp_timeout=7200", "val_size=0.1"]), _cpu())
    assert args.ddp_timeout == 7200
    assert args.eval_strategy == "steps" and args.eval_steps == 10  # logging_steps by default
    args = training_arguments(load_config(None, [out, "val_size=0.1", "eval_steps=5"]), _cpu())
    assert args.eval_steps == 5 and args.prediction_loss_only
    args = training_arguments(load_config(None, [out, "val_size=0.1"]), _cpu(), evaluate=False)
    assert args.eval_strategy == "no"
    for asks in ("do_eval=true", "eval_steps=5", "eval_strategy=steps"):
        with pytest.raises(ConfigError, match="nothing is held out: set val_size"):
            training_arguments(load_config(None, [out, asks]), _cpu())
    # eval_steps beside do_eval: false asks for nothing
    args = training_arguments(load_config(None, [out, "eval_steps=5", "do_eval=false"]), _cpu())
    assert args.eval_strategy == "no"
    with pytest.raises(ConfigError, match="val_size and eval_dataset both hold out data"):
        load_config(None, [out, "val_size=0.1", "eval_dataset=x"])


def test_gradient_checkpointing_key_reaches_training_arguments(tmp_path):
    """Our key keeps its LLaMA-Factory name; transformers 5.24 calls it activation_checkpointing."""
    out = f"output_dir={tmp_path / 'o'}"
    args = training_arguments(load_config(None, [out, "gradient_checkpointing=true"]), _cpu())
    assert args.activation_checkpointing is True
    assert training_arguments(load_config(None, [out]), _cpu()).activation_checkpointing is False


# -- the datasets are built once, on rank 0 ---------------------------------------------------


def _build_on_two_ranks(rank: int, port: int, marks: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for fail in (False, True):
            out = Path(marks) / ("fails" if fail else "works")

            def build(out: Path = out, fail: bool = fail) -> dict[str, int]:
                (out / f"built-on-{rank}").touch()
                if fail:
                    raise DataError("row 3 has no response")
                return {"rows": 32, "rank": rank}

            try:
                got = main_process_builds(build)
                (out / f"got-{rank}.json").write_text(json.dumps(got))
            except DataError as exc:
                (out / f"error-{rank}.txt").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_the_main_process_builds_and_every_rank_gets_the_result(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("works", "fails"):
        (tmp_path / name).mkdir()
    torch.set_num_threads(1)
    mp.spawn(_build_on_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    works = sorted(p.name for p in (tmp_path / "works").iterdir())
    assert works == ["built-on-0", "got-0.json", "got-1.json"]
    assert json.loads((tmp_path / "works" / "got-1.json").read_text()) == {"rows": 32, "rank": 0}
    # a failure: the same error on both ranks, no rank left waiting in the collective
    fails = sorted(p.name for p in (tmp_path / "fails").iterdir())
    assert fails == ["built-on-0", "error-0.txt", "error-1.txt"]
    assert (tmp_path / "fails" / "error-1.txt").read_text().startswith("row 3 has no response")


def _sent_by_rank_0(
    monkeypatch, cfg, tokenizer, local_world_size: int
) -> tuple[object, bytes, object]:
    """Rank 0 of a two-process hccl run (torch.distributed stood in for) with ``local_world_size``
    processes on its node: the data it keeps, what it broadcasts, pickled as the collective
    pickles it, and the backend of the group it goes through (None: the run's own)."""
    import torch.distributed as dist

    sent: list[tuple[bytes, object]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "hccl")
    monkeypatch.setattr(dist, "new_group", lambda backend=None: f"group:{backend}")
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)
    monkeypatch.setattr(
        dist,
        "broadcast_object_list",
        lambda box, src=0, group=None: sent.append((pickle.dumps(box), group)),
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    mask = MaskToken(tokenizer.mask_token, tokenizer.mask_token_id, "tokenizer")
    kept = load_run_data(cfg, tokenizer, mask)
    return kept, *sent[0]


def test_the_datasets_sent_to_another_node_carry_their_rows(
    tiny_model_dir, data, tokenizer, tmp_path, monkeypatch
):
    """A rank on another node cannot read rank 0's datasets cache (node-local): what rank 0 sends
    it unpickles once that cache is gone, with every row of both splits. The ranks of one node
    read rank 0's cache file, so nothing is copied for them. The rows go through a gloo group
    (host memory), not hccl's, which would stage the pickle on every device."""
    cache = tmp_path / "datasets-cache"  # (rank 0's node-local cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    cfg = load_config(None, _overrides(tiny_model_dir, data, tmp_path / "o", val_size=6))
    kept, blob, group = _sent_by_rank_0(monkeypatch, cfg, tokenizer, local_world_size=2)
    assert kept.train.cache_files and str(cache).encode() in blob  # one node: the file's path
    assert group is None
    kept, blob, group = _sent_by_rank_0(monkeypatch, cfg, tokenizer, local_world_size=1)
    assert group == "group:gloo"
    assert kept.train.cache_files and str(cache) in kept.train.cache_files[0]["filename"]
    rows = {name: split[:] for name, split in (("train", kept.train), ("eval", kept.eval))}
    shutil.rmtree(cache)
    [(kind, got)] = pickle.loads(blob)
    assert kind == "ok" and (len(got.train), len(got.eval)) == (26, 6)
    assert got.train[:] == rows["train"] and got.eval[:] == rows["eval"]
    assert got.train.column_names == kept.train.column_names  # (index, epoch: as rank 0's)


# -- quantization_bit: QLoRA through bitsandbytes, or one clear error -------------------------

WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_bit_trains_qlora_on_a_quantized_base(tiny_model_dir, data, tmp_path, bits):
    from safetensors.torch import load_file

    from fluid_npu.model.adapters import load_fluid
    from fluid_npu.model.loading import fingerprint, load_model
    from fluid_npu.train.session import TrainingSession
    from fluid_npu.train.stage1 import stage1_objective

    values = _overrides(tiny_model_dir, data, tmp_path / "o", quantization_bit=bits, max_steps=2)
    try:
        session = TrainingSession(load_config(None, values), stage="fluid_stage1")
    except ConfigError as exc:  # a device bitsandbytes does not support: the one clear error
        assert f"quantization_bit: {bits}" in str(exc)
        pytest.skip(f"bitsandbytes cannot quantize here: {exc}")
    q_proj = session.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    w = q_proj.weight  # really quantized, not full precision (4-bit: two values a byte)
    assert w.dtype == torch.int8 if bits == 8 else w.numel() * w.element_size() == 64 * 64 // 2
    objective, collator, callbacks = stage1_objective(session)
    record = session.train(objective, collator, callbacks=callbacks)
    assert record["quantization_bit"] == bits and torch.isfinite(torch.tensor(record["train_loss"]))
    # same fingerprint as the unquantized base: the adapter loads onto it (Stage II, sampler)
    assert session.base_fingerprint == fingerprint(load_model(tiny_model_dir))
    load_fluid(tiny_model_dir, tmp_path / "o")
    # continued on the quantized base (adapter_name_or_path): it starts from the adapter as saved
    values = _overrides(tiny_model_dir, data, tmp_path / "c", quantization_bit=bits,
                        adapter_name_or_path=tmp_path / "o")  # fmt: skip
    values = [v for v in values if not v.startswith(("lora_rank=", "lora_alpha="))]
    again = TrainingSession(load_config(None, values), stage="fluid_stage1")
    again.model.save_pretrained(str(tmp_path / "as-loaded"))
    saved, loaded = (load_file(str(tmp_path / d / WEIGHTS)) for d in ("o", "as-loaded"))
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_quantization_bit_problems_are_one_config_error(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    import sys

    from fluid_npu.train.session import TrainingSession

    def session(**extra: object) -> None:
        TrainingSession(
            load_config(None, _overrides(tiny_model_dir, data, tmp_path / "o", **extra)),
            "fluid_stage1",
        )

    with pytest.raises(
        ConfigError, match="quantization_bit: 4 quantizes the frozen base for QLoRA"
    ):
        session(quantization_bit=4, finetuning_type="full")
    with pytest.raises(ConfigError, match="quantization_bit: 4 is QLoRA for Stage I"):
        from fluid_npu.train.stage2 import Stage2Run

        Stage2Run(
            load_config(
                None,
                [
                    *_overrides(tiny_model_dir, data, tmp_path / "s2"),
                    "stage=fluid_stage2",
                    "quantization_bit=4",
                ],
            )
        )
    with pytest.raises(ConfigError, match="quantization_bit: '3' is not valid"):
        load_config(None, ["quantization_bit=3"])
    bnb = pytest.importorskip("bitsandbytes")

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_kernel)
    with pytest.raises(
        ConfigError, match=r"quantization_bit: 4: bitsandbytes .* cannot run a 4-bit"
    ):
        session(quantization_bit=4)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        session(quantization_bit=8)
    assert not (tmp_path / "o").exists()  # nothing half-made is left


def test_llama_factory_fsdp_strings_become_fsdp_config(tmp_path):
    """transformers 5 deprecates ``fsdp="full_shard auto_wrap"``: we pass fsdp=True + options."""
    from fluid_npu.train.common import fsdp_arguments

    wrap = tmp_path / "fsdp.json"
    wrap.write_text(json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
    got = fsdp_arguments("full_shard auto_wrap offload", str(wrap))
    assert got == {
        "fsdp": True,
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "cpu_offload": True,
        },
    }
    assert fsdp_arguments("shard_grad_op", None)["fsdp_config"] == {"reshard_after_forward": False}
    assert fsdp_arguments(True, None) == {"fsdp": True, "fsdp_config": {}}
    assert fsdp_arguments("", None) == {"fsdp": False, "fsdp_config": None}
    with pytest.raises(ConfigError, match="fsdp: 'hybrid_shard' is not an FSDP2 option"):
        fsdp_arguments("hybrid_shard", None)
    args = training_arguments(
        load_config(None, [f"output_dir={tmp_path / 'o'}", "fsdp=full_shard auto_wrap"]), _cpu()
    )
    assert args.fsdp and args.fsdp_config["reshard_after_forward"] is True


def test_report_to_and_torch_compile_fail_before_the_model_loads(tmp_path):
    # transformers would only find these out when the Trainer is built, after loading and
    # tokenizing (minutes on a 7B model)
    out = f"output_dir={tmp_path / 'o'}"
    with pytest.raises(ConfigError, match="'tensorbord' is not an integration transformers knows"):
        training_arguments(load_config(None, [out, "report_to=tensorbord"]), _cpu())
    missing = [n for n in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(n) is None]
    if missing:  # (an integration this host lacks)
        with pytest.raises(ConfigError, match="its package is not installed"):
            training_arguments(load_config(None, [out, f"report_to={missing[0]}"]), _cpu())
    with pytest.raises(ConfigError, match="set loss_impl: reference"):
        training_arguments(load_config(None, [out, "torch_compile=true"]), _cpu())
    args = training_arguments(
        load_config(None, [out, "torch_compile=true", "loss_impl=reference"]), _cpu()
    )
    assert args.torch_compile and args.report_to == []
