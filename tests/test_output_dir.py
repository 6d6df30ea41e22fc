"""One run per output_dir: an earlier run's output is refused (before any model loads) unless the
run resumes it or ``overwrite_output_dir`` removes it; a resume from a checkpoint saved with other
settings is one error naming the difference; a ``checkpoint-N`` serves downstream like a final
output (Stage II on a Stage I checkpoint, a Stage II checkpoint as the K-head). Unit cases on
hand-made directories, then tiny ``fluid train`` runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import as_overrides, tiny_stage1_recipe
from synthetic import write_short_dataset

from fluid_npu.cli import main as cli_main
from fluid_npu.config import build_config, load_config
from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.model.adapters import FluidModelMeta, load_fluid
from fluid_npu.model.khead import attach_khead, read_khead_config
from fluid_npu.train import session
from fluid_npu.train.checkpoint import last_complete_checkpoint, validate_checkpoint
from fluid_npu.train.output_dir import (
    check_resume,
    claim_output_dir,
    clear_earlier_run,
    earlier_output,
    prepare_run_dir,
    recorded_settings,
)
from fluid_npu.train.run_shape import BATCH_FILE, check_run_shape, record_batch, saved_wrapper
from fluid_npu.train.stage2 import Stage2Run

# --------------------------------------------------------------------------------------------
# What counts, what is refused, what is removed (hand-made directories)
# --------------------------------------------------------------------------------------------


def _make(root: Path, entries: list[str]) -> Path:
    """Files, and directories for names ending in "/" (with a file inside)."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        path = root / entry.rstrip("/")
        if entry.endswith("/"):
            path.mkdir(parents=True)
            (path / "trainer_state.json").write_text("{}")
        else:
            path.write_text("x")
    return root


@pytest.mark.parametrize(
    ("entries", "earlier"),
    [
        ([], []),
        ([".hidden", ".tmp-checkpoint-4/", "notes.txt", "train.log", "README.md"], []),
        (["tokenizer.json", "config.json", "checkpoint-3"], []),  # a file named checkpoint-3
        (["run.json", "notes.txt"], ["run.json"]),
        (["checkpoint-10/", "checkpoint-2/", "run.json"],
         ["run.json", "checkpoint-2", "checkpoint-10"]),
        (["adapter_model.safetensors", "x.txt"], ["adapter_model.safetensors"]),
        (["model-00001-of-00002.safetensors"], ["model-00001-of-00002.safetensors"]),
        (["khead.safetensors", "khead_config.json"], ["khead.safetensors", "khead_config.json"]),
    ],
)  # fmt: skip
def test_what_counts_as_an_earlier_run(tmp_path, entries, earlier):
    root = _make(tmp_path / "out", entries)
    assert [p.name for p in earlier_output(root)] == earlier
    claim = dict(resume=None, overwrite=False, inputs={})
    if earlier:
        with pytest.raises(ConfigError, match="holds an earlier run's output"):
            claim_output_dir(root, **claim)
    else:
        claim_output_dir(root, **claim)  # nothing of a run: the run starts
    assert sorted(p.name for p in root.iterdir()) == sorted(e.rstrip("/") for e in entries)


def test_an_earlier_run_is_refused_with_the_three_ways_on(tmp_path):
    root = _make(tmp_path / "out", ["run.json", "adapter_config.json", "checkpoint-2/", "x.txt"])
    with pytest.raises(ConfigError) as err:
        claim_output_dir(root, resume=None, overwrite=False, inputs={})
    message = str(err.value)
    assert f"output_dir {str(root)!r}" in message
    assert "adapter_config.json, run.json, checkpoint-2" in message
    for fix in ("resume_from_checkpoint: true", "overwrite_output_dir: true", "another output_dir"):
        assert fix in message
    # continuing the run in the directory is what resume_from_checkpoint is for
    claim_output_dir(root, resume=True, overwrite=False, inputs={})
    claim_output_dir(root, resume=str(root / "checkpoint-2"), overwrite=False, inputs={})
    elsewhere = _make(tmp_path / "other", ["checkpoint-4/"]) / "checkpoint-4"
    with pytest.raises(ConfigError, match="names a checkpoint elsewhere"):
        claim_output_dir(root, resume=str(elsewhere), overwrite=False, inputs={})


def test_overwrite_removes_the_earlier_run_and_nothing_else(tmp_path):
    run = [
        "run.json", "fluid_model.json", "adapter_config.json", "adapter_model.safetensors",
        "README.md", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "generation_config.json", "training_args.bin", "checkpoint-2/", "checkpoint-4/",
        ".tmp-checkpoint-6/", ".staging-final/",
    ]  # fmt: skip
    root = _make(tmp_path / "out", [*run, "notes.txt", ".hidden", "mine/"])
    elsewhere = _make(tmp_path / "other", ["checkpoint-4/"]) / "checkpoint-4"
    claim_output_dir(root, resume=str(elsewhere), overwrite=True, inputs={})
    assert (root / "run.json").is_file()  # (the claim only checks: a refused run removes nothing)
    values = {"output_dir": str(root), "overwrite_output_dir": True}
    clear_earlier_run(build_config({**values, "resume_from_checkpoint": str(elsewhere)}))
    assert sorted(p.name for p in root.iterdir()) == [".hidden", "mine", "notes.txt"]


@pytest.mark.parametrize(
    ("inputs", "resume", "needle"),
    [
        ({"model_name_or_path": "{out}"}, None, "would remove model_name_or_path"),
        ({"adapter_name_or_path": "{out}/checkpoint-2"}, None, "would remove adapter_name_or_path"),
        ({}, "{out}/checkpoint-2", "would remove resume_from_checkpoint"),
        ({}, True, "resume_from_checkpoint: true continues the run in output_dir"),
    ],
)
def test_overwrite_never_removes_what_the_run_reads(tmp_path, inputs, resume, needle):
    root = _make(tmp_path / "out", ["run.json", "model.safetensors", "checkpoint-2/"])
    fill = lambda v: v.format(out=root) if isinstance(v, str) else v  # noqa: E731
    with pytest.raises(ConfigError, match=needle):
        claim_output_dir(
            root,
            resume=fill(resume),
            overwrite=True,
            inputs={k: fill(v) for k, v in inputs.items()},
        )
    assert sorted(p.name for p in root.iterdir()) == [
        "checkpoint-2",
        "model.safetensors",
        "run.json",
    ]


def test_a_checkpoint_saved_with_other_settings_is_named(tmp_path):
    lora = _make(tmp_path / "lora", ["trainer_state.json"])
    (lora / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["b", "a"]})
    )
    FluidModelMeta("f00d", "<|mask|>", 9, 9, "base").save(lora)
    assert recorded_settings(lora) == {
        "stage": "fluid_stage1", "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
        "lora_target": ["a", "b"], "base_fingerprint": "f00d",
    }  # fmt: skip
    check_resume(lora, {"stage": "fluid_stage1", "lora_rank": 8, "lora_target": ["a", "b"]})
    cases = [
        ({"lora_rank": 4}, "saved with lora_rank: 8, this run has lora_rank: 4"),
        # (the trained delta is scaled by alpha / rank: another alpha is another model)
        ({"lora_alpha": 64.0}, "saved with lora_alpha: 16, this run has lora_alpha: 64.0"),
        ({"finetuning_type": "full"}, "saved with finetuning_type: lora"),
        ({"stage": "fluid_stage2"}, "saved with stage: fluid_stage1"),
        ({"lora_target": ["a"]}, "saved with lora_target: ['a', 'b']"),
        ({"base_fingerprint": "beef"}, "base model (model_name_or_path) with fingerprint f00d"),
    ]
    for settings, needle in cases:
        with pytest.raises(ConfigError, match=r"cannot continue this run") as err:
            check_resume(lora, settings)
        assert needle in str(err.value) and "overwrite_output_dir: true" in str(err.value)
    torch.save({"base_lrs": [2e-4, 2e-4], "last_epoch": 2}, lora / "scheduler.pt")
    with pytest.raises(ConfigError, match=r"saved with learning_rate: 0\.0002, this run has "):
        check_resume(lora, {"learning_rate": 1e-4})
    check_resume(lora, {"learning_rate": 2e-4})
    torch.save({"base_lrs": [2e-4, 1e-3]}, lora / "scheduler.pt")  # (groups of other rates)
    (lora / "broken").mkdir()
    (lora / "broken" / "scheduler.pt").write_bytes(b"not a checkpoint")
    assert "learning_rate" not in recorded_settings(lora)
    assert "learning_rate" not in recorded_settings(lora / "broken")
    head = _make(tmp_path / "head", ["model.safetensors", "trainer_state.json"])
    assert recorded_settings(head) == {"stage": "fluid_stage2"}  # written before khead_config
    (head / "khead_config.json").write_text(json.dumps({"k_max": 4, "base_fingerprint": "f"}))
    with pytest.raises(ConfigError, match="saved with k_masks: 4, this run has k_masks: 8"):
        check_resume(head, {"stage": "fluid_stage2", "k_masks": 8})


def _deepspeed_checkpoint(root: Path, world_size: int, prefix: str = "bf16_") -> Path:
    """A checkpoint as the Trainer saves one under DeepSpeed ZeRO on ``world_size`` processes: the
    optimizer state in one file per rank (DeepSpeedEngine._get_rank_zero_ckpt_name; ``bf16_``
    under bf16), the module's in mp_rank_00_model_states.pt."""
    step = root / "global_step2"
    step.mkdir(parents=True)
    for rank in range(world_size):
        torch.save({}, step / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    torch.save({}, step / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("global_step2")
    (root / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    return root


@pytest.mark.parametrize("prefix", ["bf16_", ""])
def test_a_deepspeed_checkpoint_of_another_device_count_is_refused_up_front(tmp_path, prefix):
    """DeepSpeed cannot load ZeRO optimizer state split over another number of processes (it said
    so once the model had loaded on every rank): the resume is refused before anything loads,
    naming both counts, the same device count and the keys that start a new run from the
    checkpoint's weights."""
    out = tmp_path / "run"
    ckpt = _deepspeed_checkpoint(out / "checkpoint-2", world_size=2, prefix=prefix)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))

    def prepare(world_size: int, *keys: str, deepspeed: bool = True) -> str | None:
        given = [f"output_dir={out}", "resume_from_checkpoint=true", "max_steps=4", *keys]
        cfg = load_config(
            None, given + ([f"deepspeed={tmp_path / 'ds.json'}"] if deepspeed else [])
        )
        args = SimpleNamespace(device="cpu", world_size=world_size)
        return prepare_run_dir(cfg, args, {})

    assert prepare(2) == str(ckpt)  # the same count resumes
    # without the deepspeed key the Trainer would silently start the optimizer and schedule over
    with pytest.raises(ConfigError, match="saved under DeepSpeed, and this run uses neither"):
        prepare(1, deepspeed=False)
    for keys, fix in [
        ((), f"adapter_name_or_path: {ckpt} without resume_from_checkpoint"),
        (("finetuning_type=full",), f"model_name_or_path: {ckpt} without resume_from_checkpoint"),
        (("stage=fluid_stage2",), "start Stage II over"),
    ]:
        with pytest.raises(ConfigError) as err:
            prepare(1, *keys)
        message = str(err.value)
        assert "split over 2 processes and this run has 1" in message, message
        assert "Resume on 2 devices" in message and fix in message, message
        assert "ds_to_universal" in message, message
    # DeepSpeed reshards a universal checkpoint itself: a config that loads one may resume anywhere
    universal = {"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}
    (tmp_path / "ds.json").write_text(json.dumps(universal))
    assert prepare(1) == str(ckpt)


# --------------------------------------------------------------------------------------------
# Through `fluid train`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    """A finished tiny Stage I run (LoRA r8) with checkpoint-1 and checkpoint-2."""
    data = write_short_dataset(tmp_path_factory.mktemp("data"), n_train=16, seed=0)
    out = tmp_path_factory.mktemp("first")
    assert cli_main(_train(tiny_model_dir, data, out, tmp_path_factory.mktemp("cfg"))) == 0
    return tiny_model_dir, data, out


def _train(base: Path, data: Path, out: Path, where: Path, **extra: object) -> list[str]:
    values = dict(
        per_device_train_batch_size=4, max_steps=2, save_steps=1, logging_steps=1, output_dir=out
    )
    values.update(extra)
    cfg = where / "empty.yaml"
    cfg.write_text("{}\n")
    return ["train", str(cfg), *as_overrides(tiny_stage1_recipe(base, data, **values))]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fluid: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({}, ("holds an earlier run's output", "resume_from_checkpoint: true")),
        ({"lora_rank": 4, "resume_from_checkpoint": True}, ("lora_rank: 8", "lora_rank: 4")),
        ({"lora_alpha": 64, "resume_from_checkpoint": True}, ("lora_alpha: 16", "lora_alpha: 64")),
        ({"finetuning_type": "full", "resume_from_checkpoint": True}, ("finetuning_type: lora",)),
        # (a resumed Trainer keeps the checkpoint's rate: its optimizer and scheduler state)
        ({"learning_rate": 1e-3, "resume_from_checkpoint": True}, ("learning_rate: 0.01",)),
        ({"k_masks": 8, "resume_from_checkpoint": True}, ("k_masks: 4", "k_masks: 8")),
        ({"template": "auto", "resume_from_checkpoint": True}, ("template: empty",)),
        # the run ended at its last checkpoint: transformers' Trainer would train a step past it
        ({"resume_from_checkpoint": True}, ("is at step 2, where the run ends", "raise max_steps")),
        # another global batch: the data and the schedule would go on counted in the old one
        (
            {"gradient_accumulation_steps": 2, "max_steps": 3, "resume_from_checkpoint": True},
            (
                "global batch of 4 (1 process × 4 per device × 1 accumulated)",
                "this run has 8",
                "gradient_accumulation_steps: 1 keeps it on 1 process",
            ),
        ),
        (
            {"per_device_train_batch_size": 3, "max_steps": 3, "resume_from_checkpoint": True},
            ("this run has 3", "per_device_train_batch_size × gradient_accumulation_steps = 4"),
        ),
    ],
)
def test_a_used_output_dir_fails_before_the_model_loads(
    first_run, tmp_path, monkeypatch, capsys, extra, needles
):
    base, data, out = first_run
    before = _listing(out)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output_dir check")

    monkeypatch.setattr(session, "load_model", no_loading)
    assert cli_main(_train(base, data, out, tmp_path, **extra)) == 2
    line = _one_error(capsys)
    assert all(n in line for n in needles), line
    assert _listing(out) == before  # nothing touched


def test_a_resume_on_another_split_of_the_same_global_batch_goes_on(first_run, tmp_path):
    """4 per device × 1 saved, 2 per device × 2 accumulated resumed (as 2 processes → 1 needs):
    the same global batch, so the run goes on; every checkpoint records its batch."""
    base, data, first = first_run
    assert json.loads((first / "checkpoint-2" / BATCH_FILE).read_text()) == {
        "world_size": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "wrapper": "plain",
    }
    out = shutil.copytree(first, tmp_path / "out")
    argv = _train(base, data, out, tmp_path, max_steps=3, resume_from_checkpoint=True)
    assert cli_main([*argv, "per_device_train_batch_size=2", "gradient_accumulation_steps=2"]) == 0
    assert json.loads((out / "run.json").read_text())["global_step"] == 3


def test_optimizer_state_of_another_wrapper_is_refused_before_loading(tmp_path, caplog):
    """DeepSpeed's state resumed without the deepspeed key would restart the optimizer and the
    schedule silently; FSDP's or the plain Trainer's under another wrapper fail after loading."""
    args = SimpleNamespace(
        world_size=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        deepspeed=None, fsdp=[],
    )  # fmt: skip
    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    with pytest.raises(ConfigError, match="saved under DeepSpeed, and this run uses neither"):
        check_run_shape(str(ckpt), args, args, "start afresh")
    ds = SimpleNamespace(**{**vars(args), "deepspeed": "ds.json"})
    with caplog.at_level("WARNING", logger="fluid_npu.train.run_shape"):
        check_run_shape(str(ckpt), ds, ds, "")  # (an earlier build's checkpoint: no batch record)
    assert "records no global batch" in caplog.text
    fsdp = tmp_path / "checkpoint-6"
    fsdp.mkdir()
    (fsdp / "optimizer.bin").write_bytes(b"")
    assert saved_wrapper(fsdp) == "fsdp"
    with pytest.raises(ConfigError, match=r"Resume with the fsdp key \(and fsdp_config\)"):
        check_run_shape(str(fsdp), args, args, "start afresh")
    # saved on 2 processes × 2, resumed on 1: the accumulation that keeps the batch is named
    record_batch(fsdp, args)
    one = SimpleNamespace(**{**vars(args), "world_size": 1, "fsdp": ["full_shard"]})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 2 keeps it on 1 process;"):
        check_run_shape(str(fsdp), one, one, "start afresh")
    kept = SimpleNamespace(**{**vars(one), "gradient_accumulation_steps": 2})
    check_run_shape(str(fsdp), kept, kept, "")


def test_a_run_folder_or_a_weights_only_checkpoint_is_no_checkpoint_to_resume(first_run, tmp_path):
    """A run's output_dir given as the checkpoint names its last complete one; a checkpoint
    saved without the optimizer's state (save_only_model) would restart the schedule and the
    optimizer, so it is refused, and ``true`` skips it."""
    _, _, out = first_run
    with pytest.raises(CheckpointError, match=r"is a run's output_dir .*/checkpoint-2\)"):
        validate_checkpoint(out)
    bare = shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("optimizer*"))
    with pytest.raises(CheckpointError, match="no optimizer state: saved with save_only_model"):
        validate_checkpoint(bare / "checkpoint-2")
    assert last_complete_checkpoint(bare) is None


def test_overwrite_output_dir_starts_over_and_resume_continues_the_new_run(
    first_run, tmp_path, capsys
):
    base, data, first = first_run
    out = shutil.copytree(first, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    argv = _train(base, data, out, tmp_path, lora_rank=4, max_steps=1)
    # a run refused on the way (here: a resume path that does not exist) leaves the earlier one
    before = _listing(out)
    missing = f"resume_from_checkpoint={tmp_path / 'nope' / 'checkpoint-9'}"
    assert cli_main([*argv, "overwrite_output_dir=true", missing]) == 2
    assert "resume_from_checkpoint" in _one_error(capsys) and _listing(out) == before
    assert cli_main([*argv, "overwrite_output_dir=true"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # no 2 of run 1
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((out / "run.json").read_text())["global_step"] == 1
    # the checkpoint carries fluid_model.json: it loads like the final adapter
    meta = FluidModelMeta.load(out / "checkpoint-1")
    assert meta == FluidModelMeta.load(out)
    assert load_fluid(base, out / "checkpoint-1").mask.id == meta.mask_id
    # resuming now continues the new run (rank 4), not the removed one
    assert cli_main([*argv, "max_steps=2", "resume_from_checkpoint=true"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["global_step"] == 2 and record["config"]["lora_rank"] == 4
    assert [h["step"] for h in record["log_history"] if "loss" in h] == [1, 2]


def test_checkpoints_serve_downstream_as_stage1_and_khead_outputs(first_run, tmp_path):
    """Stage II on a Stage I checkpoint-N, and a Stage II checkpoint-N as the K-head."""
    base, data, first = first_run
    stage1 = first / "checkpoint-1"
    out = tmp_path / "s2"
    values = dict(
        stage="fluid_stage2", model_name_or_path=base, adapter_name_or_path=stage1,
        dataset="fluid_demo", dataset_dir=data, template="empty", cutoff_len=64, k_masks=4,
        khead_tau=0.5, val_size=4, per_device_train_batch_size=4, max_steps=2, save_steps=1,
        output_dir=out, report_to="none", seed=0, disable_tqdm=True,
    )  # fmt: skip
    Stage2Run(load_config(None, as_overrides(values))).train()
    loaded = load_fluid(base, stage1)
    final, config = attach_khead(loaded, out)
    head, checkpoint_config = attach_khead(loaded, out / "checkpoint-2")  # the last step's head
    assert checkpoint_config == config and config.adapter_fingerprint == loaded.adapter_fingerprint
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in final.state_dict().items())
    attach_khead(loaded, out / "checkpoint-1")
    with pytest.raises(CheckpointError, match="another Stage I adapter"):  # the final adapter
        attach_khead(load_fluid(base, first), out / "checkpoint-2")
    with pytest.raises(CheckpointError, match="is not a K-head directory: it is a Stage I output"):
        read_khead_config(stage1)
    with pytest.raises(CheckpointError, match=r"is not a K-head directory: no khead_config\.json"):
        read_khead_config(data)
    # a checkpoint saved sharded (ZeRO-3 without gathering, FSDP's sharded state dict) holds no
    # model.safetensors: the error says so and how to get the weights
    sharded = shutil.copytree(out / "checkpoint-2", tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"saved sharded .* zero_to_fp32"):
        read_khead_config(sharded)


def test_run_json_reports_the_loaded_best_checkpoints_eval_loss(tiny_model_dir, tmp_path):
    """With load_best_model_at_end the saved weights are the best checkpoint's: run.json's
    eval_loss is theirs (evaluated again once loaded), not the last step's."""
    data = write_short_dataset(tmp_path / "data", n_train=24, seed=0)
    out = tmp_path / "best"
    argv = _train(tiny_model_dir, data, out, tmp_path, max_steps=4, save_steps=2, eval_steps=2,
                  eval_strategy="steps", val_size=4, load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=True)  # fmt: skip
    assert cli_main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in record["log_history"] if "eval_loss" in h}
    best = max(evals[2], evals[4])  # (greater is better here: the worse weights win)
    assert record["eval_loss"] == pytest.approx(best)
