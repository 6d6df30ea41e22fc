"""What a newcomer trips on (issue 19): run directories that survive a move, one line per event in
multi-process runs, errors that name the real cause, and one losslessness rule for ``fluid eval``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fluid_npu.eval.lm_eval_task import write_lm_eval_task

ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 * 5?", "answer": "4 * 5 = 20\n#### 20"},
]


def _write_rows(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_lm_eval_task_loads_after_its_directory_moves(tmp_path):
    """The task YAML points at its JSONL relative to itself: move both, lm-eval still loads it."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    run = tmp_path / "run"
    _write_rows(run / "data" / "test.jsonl", ROWS)
    data, tasks = run / "data" / "test.jsonl", run / "data" / "lm_eval"
    yaml_path = write_lm_eval_task(tasks, "moved_task", data, cache_dir=tmp_path / "hf")
    assert str(run) not in yaml_path.read_text()  # the cache is the only absolute path
    moved = tmp_path / "elsewhere" / "run copy"
    moved.parent.mkdir()
    shutil.move(run, moved)
    manager = TaskManager(include_path=str(moved / "data" / "lm_eval"), include_defaults=False)
    task = get_task_dict(["moved_task"], manager)["moved_task"]
    assert [doc["question"] for doc in task.test_docs()] == [r["question"] for r in ROWS]
    # the target is the number fluid eval reads, however the "####" line is written
    assert [task.doc_to_target(doc) for doc in task.test_docs()] == ["5", "20"]


def test_lm_eval_targets_are_the_numbers_fluid_eval_reads(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    answers = ("so 72\n####72", "so\n#### 72\n", "so\n#### 72 apples")
    rows = [{"question": f"q{i}?", "answer": a} for i, a in enumerate(answers)]
    _write_rows(tmp_path / "test.jsonl", rows)
    write_lm_eval_task(tmp_path / "tasks", "targets", tmp_path / "test.jsonl", cache_dir=tmp_path)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = get_task_dict(["targets"], manager)["targets"]
    assert [task.doc_to_target(doc) for doc in task.test_docs()] == ["72", "72", "72"]


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_training_reports_finished_once_not_per_rank(
    rank, lines, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """torchrun starts one process per device: only rank 0 prints ``fluid: … finished``."""
    import yaml
    from conftest import tiny_stage1_recipe
    from synthetic import write_short_dataset

    import fluid_npu.train.stage1 as stage1
    from fluid_npu.cli import main

    data = write_short_dataset(tmp_path / "data", n_train=8)
    recipe = tmp_path / "stage1.yaml"
    values = tiny_stage1_recipe(tiny_model_dir, data, output_dir=str(tmp_path / "out"))
    recipe.write_text(yaml.safe_dump(values))
    monkeypatch.setattr(stage1, "run_stage1", lambda cfg: {"train_loss": 1.5})
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count("fluid: fluid_stage1 finished") == lines


def _qwen2_with_a_word_level_tokenizer(directory) -> None:
    """A qwen2 checkpoint whose tokenizer is word-level, not BPE: transformers 5 loads it as
    ``Qwen2Tokenizer`` (BPE without merges), which turns every word into no ids at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fluid_npu.model.tiny import build_tiny_model

    specials = {f"{n}_token": f"<{n}>" for n in ("bos", "eos", "pad", "unk", "mask")}
    words = [*specials.values(), "count", "to", "letters"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    build_tiny_model("qwen2", tok).save_pretrained(directory)
    tok.save_pretrained(directory)


def test_a_tokenizer_that_encodes_text_to_nothing_is_named(tmp_path, capsys):
    import yaml
    from conftest import tiny_stage1_recipe
    from synthetic import write_short_dataset

    from fluid_npu.cli import main

    model = tmp_path / "qwen2-wordlevel"
    _qwen2_with_a_word_level_tokenizer(model)
    capsys.readouterr()
    data = write_short_dataset(tmp_path / "data", n_train=8)
    recipe = tmp_path / "stage1.yaml"
    values = tiny_stage1_recipe(model, data, output_dir=str(tmp_path / "out"), max_steps=1)
    recipe.write_text(yaml.safe_dump(values))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]  # after the progress bars of loading
    assert line.startswith("fluid: error: ") and "fluid: error" not in "".join(err[:-1])
    assert "no response tokens" not in line
    assert "the tokenizer (Qwen2Tokenizer" in line and "into no token ids" in line
    assert "model_type 'qwen2'" in line and "TokenizersBackend" in line


def _one_error(capsys, argv: list[str]) -> str:
    from fluid_npu.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: "), err
    return err[0]


def test_policy_and_flag_errors_name_real_bounds_and_flags(tmp_path, capsys):
    """Checked before any model loads (the model directory does not exist): the bound is the
    sampler's real k_max (the K-head's, else --k-max, else 16), never a sentinel."""
    from fluid_npu.model.khead import KHead, KHeadConfig, save_khead

    data = tmp_path / "d.jsonl"
    _write_rows(data, ROWS)
    missing = str(tmp_path / "missing")
    common = ["--model", missing, "--task", "gsm8k", "--data", str(data)]
    out = ["--json", str(tmp_path / "o.json")]
    line = _one_error(capsys, ["eval", *common, "--policy", "fixed:0", *out])
    assert "K must lie in [1, k_max=16], got 0" in line and "1073741824" not in line
    line = _one_error(capsys, ["eval", *common, "--k-max", "8", "--policy", "fixed:9", *out])
    assert "K must lie in [1, k_max=8], got 9" in line
    save_khead(KHead(64, 6), KHeadConfig(64, 6), tmp_path / "khead")
    khead = ["--khead", str(tmp_path / "khead")]
    line = _one_error(capsys, ["eval", *common, *khead, "--policy", "fixed:7", *out])
    assert "K must lie in [1, k_max=6], got 7" in line
    for argv in (
        ["eval", *common, "--policy", "fixed:2", *out],
        ["generate", "--model", missing, "--prompt", "hi"],
        ["bench", "sampler", "--model", missing, "--prompts", str(data), *out],
    ):
        line = _one_error(capsys, [*argv, "--anchors", "-1"])
        assert "--anchors must be at least 1 (the most draft blocks per step), got -1" in line, line
        line = _one_error(capsys, [*argv, "--k-max", "0"])
        assert "--k-max must be at least 1, got 0" in line, line


def test_fluid_eval_fails_when_a_policy_is_not_identical_to_ar(tmp_path, monkeypatch, capsys):
    """Like ``fluid bench`` and the demo: the JSON is written, then exit status 1."""
    from fluid_npu.cli import main
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import bench

    tok = build_tiny_tokenizer(mask_token=True)
    build_tiny_model("llama", tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    _write_rows(data, ROWS)
    argv = ["eval", "--model", str(tmp_path / "model"), "--task", "gsm8k", "--data", str(data)]
    argv += ["--policy", "fixed:2", "fixed:3", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*argv, "--json", str(tmp_path / "same.json")]) == 0  # lossless: status 0

    real = bench.decode_batches

    def decode(fluid, batches, policy, *args):  # fixed:3 answers the first prompt differently
        new, stats = real(fluid, batches, policy, *args)
        if policy == "fixed:3" and len(new) == len(ROWS):
            new[0] = [tok.eos_token_id]
        return new, stats

    monkeypatch.setattr(bench, "decode_batches", decode)
    capsys.readouterr()
    assert main([*argv, "--json", str(tmp_path / "differs.json")]) == 1
    report = json.loads((tmp_path / "differs.json").read_text())
    assert report["results"]["fixed:3"]["identical_to_ar"] == 0.5
    err = capsys.readouterr().err
    assert "fluid: not lossless: fixed:3 (identical to ar 0.500)" in err


@pytest.mark.slow
def test_demo_recipes_ship_with_the_package(tmp_path):
    """A pip-installed fluid-npu has no checkout (no configs/): the demo's recipes are package
    data. Build the wheel from a copy of the sources, unpack it, and load the recipes from there."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("fluid_npu", "ops"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=src)
    (wheel,) = (tmp_path / "dist").glob("fluid_npu-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert not (site / "configs").exists()
    code = (
        "from fluid_npu.config import load_config\n"
        "from fluid_npu.demo.pipeline import recipe\n"
        "for name in ('demo_stage1.yaml', 'demo_stage2.yaml'):\n"
        "    path = recipe(name)\n"
        "    print(path, load_config(path, ['model_name_or_path=m']).fluid.stage)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    assert lines[0] == f"{site}/fluid_npu/demo/configs/demo_stage1.yaml fluid_stage1"
    assert lines[1] == f"{site}/fluid_npu/demo/configs/demo_stage2.yaml fluid_stage2"


def test_eval_names_a_tokenizer_that_encodes_questions_to_nothing(tmp_path):
    from fluid_npu.errors import DataError
    from fluid_npu.eval import run_eval
    from fluid_npu.sampling import FluidForCausalLM

    _qwen2_with_a_word_level_tokenizer(tmp_path / "qwen2")
    fluid = FluidForCausalLM.from_pretrained(tmp_path / "qwen2")
    with pytest.raises(DataError, match=r"the tokenizer \(Qwen2Tokenizer.*into no token ids"):
        run_eval(fluid, "gsm8k", ROWS, ["fixed:2"], max_new_tokens=4, warmup=False)


def _refuse(name: str) -> None:
    raise ValueError(f"not JSON: {name}")


def test_files_written_atomically_get_the_usual_mode(tmp_path):
    """Outputs (generations, reports, run records) go through a temporary file and a rename; they
    end with the mode any new file gets under the umask, not the temporary file's 0600."""
    from fluid_npu.io import write_json_atomic

    plain = tmp_path / "plain"
    plain.write_text("x")
    write_json_atomic(tmp_path / "report.json", {"a": 1, "rate": float("inf"), "x": [float("nan")]})
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    # JSON has no Infinity / NaN (strict readers refuse them): a number that is not finite is null
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text, parse_constant=_refuse) == {"a": 1, "rate": None, "x": [None]}


def test_a_failed_run_removes_the_folders_it_made_and_nothing_else(tmp_path):
    """``first_missing`` / ``remove_if_empty(up_to=)``: the folders a failed run created go again,
    parents included; a folder the user had — empty or not, reached through ``..`` — stays."""
    from fluid_npu.io import first_missing, remove_if_empty

    out = tmp_path / "outputs" / "pangu7b" / "stage2"
    made = first_missing(out)
    assert made == tmp_path / "outputs"
    out.mkdir(parents=True)
    remove_if_empty(out, up_to=made)
    assert sorted(tmp_path.iterdir()) == [] and tmp_path.is_dir()
    # a user's empty folder inside the path is not the run's: only what it made goes
    (tmp_path / "mine").mkdir()
    out = tmp_path / "mine" / "run"
    made = first_missing(out)
    out.mkdir()
    remove_if_empty(out, up_to=made)
    assert (tmp_path / "mine").is_dir() and not out.exists()
    # "new/../victim/run": `new` is never made (.. is collapsed), `victim` is the user's
    (tmp_path / "victim").mkdir()
    dotted = tmp_path / "new" / ".." / "victim" / "run"
    made = first_missing(dotted)
    assert made == tmp_path / "victim" / "run"
    (tmp_path / "victim" / "run").mkdir()
    remove_if_empty(dotted, up_to=made)
    assert (tmp_path / "victim").is_dir() and not (tmp_path / "new").exists()
    assert first_missing(tmp_path) is None
