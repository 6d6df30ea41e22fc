"""The CPU demo: its task (splits, answers, GSM8K export), its tokenizer, and ``fluid demo`` end to
end at a toy budget — every stage's output, the summary and report, and a second run that reuses
every finished stage."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from fluid_npu.cli import main
from fluid_npu.data.demo import (
    demo_examples,
    demo_problems,
    demo_split,
    is_test_question,
    write_gsm8k,
)
from fluid_npu.demo.base import corpus, train_demo_tokenizer
from fluid_npu.eval import extract_answer, task_rows


def test_splits_are_deterministic_disjoint_and_correct():
    train, test = demo_problems("train", 400), demo_problems("test", 100)
    assert train == demo_problems("train", 400) and test == demo_problems("test", 100)
    assert not {q for q, _, _ in train} & {q for q, _, _ in test}
    assert all(is_test_question(q) for q, _, _ in test)
    assert not any(is_test_question(q) for q, _, _ in train)
    for question, solution, answer in train + test:
        assert solution.endswith(f"The answer is {answer}.")
        # every "a op b = c" step of the solution is right
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", solution):
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert answer >= 0 and set(re.findall(r"\d+", question)) <= set(
            re.findall(r"\d+", solution)
        )
    kinds = {"+": 0, "-": 0, "*": 0, "After buying": 0}  # add, subtract, multiply, two steps
    for _, solution, _ in train:
        for kind in kinds:
            kinds[kind] += kind in solution
    assert all(n > 40 for n in kinds.values()), kinds


def test_gsm8k_export_is_what_eval_reads(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", "test", 20)
    rows = task_rows("demo", data=path)
    assert rows == demo_split("test", 20)
    for row in rows:
        assert row["answer"].split("\n#### ")[1] == extract_answer(row["answer"])
    alpaca = demo_examples(3)
    assert alpaca[0]["instruction"].startswith("Question: ")
    assert alpaca[0]["instruction"].endswith("\nAnswer:")


def test_tokenizer_learns_the_task_words_and_has_a_mask():
    tok = train_demo_tokenizer(corpus(500))
    assert tok.mask_token == "<mask>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    text = "Question: Mia has 12 apples. She buys 7 more apples.\nAnswer: The answer is 19."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless round trip
    assert len(ids) < len(text) / 3  # words and small numbers are single tokens
    assert tok("ünïcode ✓", add_special_tokens=False)["input_ids"]  # anything still encodes


def _files(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_fluid_demo_runs_every_stage_then_reuses_them(tmp_path, capsys):
    out = tmp_path / "my #1: demo"  # every path reaches a YAML override or an lm-eval task
    argv = [
        "demo",
        "--out",
        str(out),
        "--pretrain-steps",
        "3",
        "--train-steps",
        "2",
        "--train-problems",
        "64",
        "--eval-problems",
        "4",
        "--bench-prompts",
        "2",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(": running") == 8
    summary = json.loads((out / "summary.json").read_text())
    for key in ("base_acc", "stage1_ar_acc", "scratch_acc", "best_tpf", "speedup_b1", "minutes"):
        assert key in summary
    assert summary["lossless"] is True and summary["eval_problems"] == 4
    assert set(summary["goals"]) == {
        "base_acc",
        "stage1_ar_acc",
        "best_tpf",
        "speedup_b1",
        "scratch_acc",
        "minutes",
    }
    stages = json.loads((out / "stages.json").read_text())["seconds"]
    assert len(stages) == 8 and summary["minutes"] == pytest.approx(
        sum(stages.values()) / 60, abs=0.01
    )
    report = (out / "report.md").read_text()
    for part in ("## Goals", "## Accuracy at a speed", "transformers generate", "loss_curves.png"):
        assert part in report
    for png in ("plots/loss_curves.png", "plots/accuracy_tpf.png", "eval/fluid_k_hist.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    fluid = json.loads((out / "eval" / "fluid.json").read_text())
    assert fluid["policies"][0] == "ar" and "khead" in fluid["policies"]
    base, scratch = (load_file(out / d / "model.safetensors") for d in ("base", "scratch/base"))
    assert base.keys() == scratch.keys()  # the control: the base's shape, its own random weights
    assert all(base[k].shape == scratch[k].shape for k in base)
    assert not torch.equal(base["model.embed_tokens.weight"], scratch["model.embed_tokens.weight"])
    assert task_rows("demo", data=out / "data" / "test.jsonl") == demo_split("test", 4)

    before = _files(out)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done, reused") == 8 and ": running" not in second
    after = _files(out)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed <= {
        p for p in before if str(p).startswith(("report.md", "summary.json", "plots/", "data/"))
    }

    # other settings on the same directory: one clear error, nothing touched
    assert main([*argv[:-1], "3"]) == 2
    assert "other settings (bench_prompts); pass --fresh" in capsys.readouterr().err
    assert _files(out) == after

    # a stage that is redone makes the stages after it run again, not the others
    (out / "stage2" / "run.json").unlink()
    assert main(argv) == 0
    third = capsys.readouterr().out
    assert third.count(": running") == 3  # Stage II, the FLUID evaluation and the bench
    assert "eval: FLUID model (ar, fixed, entropy, khead): running again (after Stage II" in third

    # the run directory survives a move: the files that point at others point inside, relatively
    moved = tmp_path / "elsewhere" / "moved demo"
    moved.parent.mkdir()
    out.rename(moved)
    for name in ("stages.json", "summary.json", "data/lm_eval/fluid_demo.yaml"):
        assert str(tmp_path) not in (moved / name).read_text(), name
    links = re.findall(r"\]\(([^)]+)\)", (moved / "report.md").read_text())
    assert links and all((moved / link).is_file() for link in links)
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(moved / "data" / "lm_eval"), include_defaults=False)
    docs = list(get_task_dict(["fluid_demo"], manager)["fluid_demo"].test_docs())
    assert [{k: v for k, v in d.items() if k != "target"} for d in docs] == demo_split("test", 4)
    assert all(d["answer"].endswith(f"#### {d['target']}") for d in docs)  # the reference number
    assert main([*argv[:2], str(moved), *argv[3:]]) == 0
    assert capsys.readouterr().out.count("done, reused") == 8


def test_fresh_deletes_only_a_demo_directory(tmp_path, capsys):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "thesis.txt").write_text("precious")
    assert main(["demo", "--out", str(keep), "--fresh"]) == 2
    assert "is not a demo output directory" in capsys.readouterr().err
    assert (keep / "thesis.txt").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--out", str(afile / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_the_recipes_run_by_hand_leave_the_demo_run_alone():
    """README: `fluid train configs/demo_stage1.yaml` then `... demo_stage2.yaml` after the demo.
    They read the demo's base and data but write elsewhere: overwriting runs/demo/stage1 would
    leave the demo reusing evaluations of a model that is gone."""
    from pathlib import Path

    from fluid_npu.config import load_config
    from fluid_npu.demo.pipeline import DEFAULT_OUT, recipe

    stage1, stage2 = (load_config(recipe(f"demo_stage{i}.yaml")) for i in (1, 2))
    for cfg in (stage1, stage2):
        out = Path(cfg.train.output_dir)
        assert out != DEFAULT_OUT and DEFAULT_OUT not in out.parents, out
    assert stage1.model.model_name_or_path == str(DEFAULT_OUT / "base")
    assert stage2.model.model_name_or_path == stage1.train.output_dir  # the chain by hand
