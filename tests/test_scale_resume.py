"""Crash safety: a run killed with SIGKILL mid-save resumes to the same losses and weights as an
uninterrupted run; half-written checkpoints are never picked; a truncated checkpoint given to
``resume_from_checkpoint`` is a CheckpointError naming the file; a NaN loss stops the run and keeps
the last good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import as_overrides, tiny_stage1_recipe
from safetensors.torch import load_file
from synthetic import write_short_dataset
from transformers.trainer_utils import get_last_checkpoint

from fluid_npu.cli import main as cli_main
from fluid_npu.config import load_config
from fluid_npu.errors import CheckpointError
from fluid_npu.train import stage1
from fluid_npu.train.checkpoint import (
    last_complete_checkpoint,
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume,
    staging_root,
    validate_checkpoint,
)
from fluid_npu.train.stage1 import run_stage1

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a subprocess that blocks inside the save of checkpoint STEP, after the adapter and
# optimizer are written and before the RNG state and trainer_state.json: the test kills it there.
HANG_IN_SAVE = """
import pathlib, sys, time
from transformers import Trainer
signal_file, step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
original = Trainer._save_rng_state
def save_rng_state(self, output_dir):
    if self.state.global_step == step:
        signal_file.write_text(output_dir)
        while True:
            time.sleep(0.5)
    return original(self, output_dir)
Trainer._save_rng_state = save_rng_state
from fluid_npu.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_short_dataset(tmp_path_factory.mktemp("data"), n_train=48, seed=0)


def _overrides(base: Path, data: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = dict(
        per_device_train_batch_size=4,
        lr_scheduler_type="cosine",
        max_steps=6,
        save_steps=2,
        logging_steps=1,
        output_dir=out,
    )
    values.update(extra)
    return as_overrides(tiny_stage1_recipe(base, data, **values))


def _losses(record: dict) -> list[float]:
    return [h["loss"] for h in record["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, demo_data, tmp_path_factory):
    """Two steps with a checkpoint after the second: checkpoints for the corruption tests."""
    out = tmp_path_factory.mktemp("short")
    run_stage1(load_config(None, _overrides(tiny_model_dir, demo_data, out, max_steps=2)))
    return out


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir, demo_data, tmp_path
):
    full_dir = tmp_path / "full"
    full = run_stage1(
        load_config(None, _overrides(tiny_model_dir, demo_data, full_dir, save_total_limit=2))
    )
    kept = sorted(p.name for p in full_dir.iterdir() if p.name.startswith(("checkpoint", ".")))
    assert kept == ["checkpoint-4", "checkpoint-6"]  # rotation still works on published saves

    out = tmp_path / "killed"
    signal_file = tmp_path / "hanging"
    empty_yaml = tmp_path / "empty.yaml"
    empty_yaml.write_text("{}\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-c", HANG_IN_SAVE, str(signal_file), "4", "train", str(empty_yaml)]
    proc = subprocess.Popen(
        [*cmd, *_overrides(tiny_model_dir, demo_data, out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not signal_file.exists():  # the run is inside the save of checkpoint-4
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before checkpoint-4:\n"
                    f"{proc.stderr.read()[-3000:]}"
                )
            time.sleep(0.2)
        staged = Path(signal_file.read_text())
        assert staged == out / ".tmp-checkpoint-4" / "checkpoint-4"
        assert (staged / "adapter_model.safetensors").is_file()  # half-written: no trainer state
        assert not (staged / "trainer_state.json").exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    names = sorted(p.name for p in out.iterdir())
    assert names == [".tmp-checkpoint-4", "checkpoint-2"]  # no final files, no checkpoint-4
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # transformers agrees

    resumed = run_stage1(
        load_config(
            None,
            _overrides(tiny_model_dir, demo_data, out, resume_from_checkpoint=True),
        )
    )
    assert len(_losses(full)) == 6
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-5)
    a = load_file(str(full_dir / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left == []  # the interrupted save was cleaned up
    for step in (2, 4, 6):
        validate_checkpoint(out / f"checkpoint-{step}")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "adapter-cut-short": (lambda c: _truncate(c / "adapter_model.safetensors", -100), "adapter"),
    "adapter-header-only": (lambda c: _truncate(c / "adapter_model.safetensors", 5), "adapter"),
    "adapter-missing": (lambda c: (c / "adapter_model.safetensors").unlink(), "adapter"),
    "state-cut-short": (lambda c: _truncate(c / "trainer_state.json", 40), "trainer_state"),
    "state-missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state"),
    "optimizer-cut-short": (lambda c: _truncate(c / "optimizer.pt", -10), "optimizer.pt"),
    "rng-cut-short": (lambda c: _truncate(c / "rng_state.pth", 100), "rng_state.pth"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(short_run, tmp_path, case):
    damage, named = DAMAGE[case]
    good = short_run / "checkpoint-2"
    assert validate_checkpoint(good) == good
    bad = _copy(good, tmp_path / "checkpoint-2")
    damage(bad)
    with pytest.raises(CheckpointError, match=named):
        resolve_resume(str(bad), None)


def test_resume_true_picks_the_last_complete_checkpoint(short_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_resume(True, run)
    _copy(short_run / "checkpoint-2", run / "checkpoint-2")
    newer = _copy(short_run / "checkpoint-2", run / "checkpoint-10")
    _truncate(newer / "adapter_model.safetensors", -1)
    _copy(short_run / "checkpoint-2", run / ".tmp-checkpoint-12")  # a killed save: never read
    assert resolve_resume(True, run) == str(run / "checkpoint-2")
    assert resolve_resume(False, run) is None and resolve_resume(None, run) is None


def test_publishing_a_checkpoint_replaces_one_of_the_same_step(short_run, tmp_path):
    run = tmp_path / "run"
    old = _copy(short_run / "checkpoint-2", run / "checkpoint-2")
    (old / "marker").write_text("old")
    staged = _copy(short_run / "checkpoint-2", staging_root(run, 2) / "checkpoint-2")
    assert publish_checkpoint(staged, run / "checkpoint-2") == run / "checkpoint-2"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]  # staging and old copy gone
    assert not (run / "checkpoint-2" / "marker").exists()
    validate_checkpoint(run / "checkpoint-2")
    (run / ".tmp-old-checkpoint-4").mkdir()  # what a kill between the two renames leaves
    (run / ".tmp-checkpoint-6").mkdir()
    assert len(remove_stale_staging(run)) == 2
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]


def test_a_published_checkpoint_names_the_best_checkpoint_by_its_final_path(short_run, tmp_path):
    """The Trainer writes trainer_state.json while the checkpoint is staged: its
    best_model_checkpoint (what load_best_model_at_end and a resume read) must not keep the
    staging path, which is gone once the checkpoint is published."""
    run = tmp_path / "run"
    staged = _copy(short_run / "checkpoint-2", staging_root(run, 2) / "checkpoint-2")
    state = json.loads((staged / "trainer_state.json").read_text())
    state["best_model_checkpoint"] = str(staged)
    (staged / "trainer_state.json").write_text(json.dumps(state))
    publish_checkpoint(staged, run / "checkpoint-2")
    saved = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(run / "checkpoint-2")
    assert {k: v for k, v in saved.items() if k != "best_model_checkpoint"} == {
        k: v for k, v in state.items() if k != "best_model_checkpoint"
    }
    validate_checkpoint(run / "checkpoint-2")


def test_a_truncated_checkpoint_fails_through_the_cli_before_training(
    short_run, tiny_model_dir, demo_data, tmp_path, capsys
):
    bad = _copy(short_run / "checkpoint-2", tmp_path / "checkpoint-2")
    _truncate(bad / "adapter_model.safetensors", -100)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = _overrides(tiny_model_dir, demo_data, out, resume_from_checkpoint=bad)
    assert cli_main(["train", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fluid: error:")]
    assert len(lines) == 1 and "adapter_model.safetensors is truncated" in lines[0]
    assert str(bad) in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, demo_data, tmp_path, capsys, monkeypatch
):
    calls = {"n": 0}
    original = stage1.stage1_loss

    def nan_on_third_step(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # after checkpoint-2 was saved
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(stage1, "stage1_loss", nan_on_third_step)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert cli_main(["train", str(cfg), *_overrides(tiny_model_dir, demo_data, out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fluid: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "the loss became nan at step 2" in lines[0]
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in lines[0]
    validate_checkpoint(out / "checkpoint-2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no final model, no run.json
