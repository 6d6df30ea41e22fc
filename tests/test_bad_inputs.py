"""The bad-input matrix: every input a user can get wrong fails through the ``fluid`` CLI with one
``fluid: error:`` line on stderr (no traceback), a non-zero exit, and nothing partial on disk.

Each case is a row of ``CASES``: the command line (built from the fixtures), the text the error must
contain, and what may exist at ``output_dir`` afterwards (Stage I and Stage II remove a directory
they created when they fail during set-up; ``merge`` writes nothing)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from synthetic import write_short_dataset

from fluid_npu import device as devices
from fluid_npu.cli import main as cli_main
from fluid_npu.config import ModelArgs
from fluid_npu.errors import ConfigError
from fluid_npu.model.adapters import FluidModelMeta, apply_lora
from fluid_npu.model.attention import check_backend
from fluid_npu.model.khead import KHead, KHeadConfig, save_khead
from fluid_npu.model.loading import fingerprint, load_model, load_tokenizer
from fluid_npu.model.mask_token import resolve_mask_token
from fluid_npu.model.tiny import build_tiny_tokenizer, save_tiny
from fluid_npu.train import session, stage2


@dataclass(frozen=True)
class World:
    """Everything the cases point at, built once per module."""

    root: Path
    base: Path  # tiny Llama, no MASK token
    base_mask: Path  # tiny Llama whose tokenizer has a mask token
    other: Path  # another tiny Llama (different weights)
    data: Path  # the demo dataset plus the bad files, registered in dataset_info.json
    adapter: Path  # a Stage I LoRA adapter of ``base``
    khead: Path  # a K-head trained on some other backbone
    pickle_only: Path  # a model directory with pytorch_model.bin only
    remote_code: Path  # a model directory whose config needs remote code


BAD_FILES = {
    "malformed": '{"instruction": "a", "output": "b"}\n{"instruction": \n',
    "empty": "",
    "no_output": '{"instruction": "a", "output": "bcd"}\n{"instruction": "a"}\n',
    "prompt_only": '{"instruction": "abc", "output": ""}\n',
    "too_long": json.dumps({"instruction": "x" * 200, "output": "abc"}) + "\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    base = save_tiny(root / "base", "llama")
    base_mask = save_tiny(root / "base-mask", "llama", mask_token=True)
    other = save_tiny(root / "other", "llama", seed=1)

    data = write_short_dataset(root / "data", n_train=16, seed=0)
    info = json.loads((data / "dataset_info.json").read_text())
    for name, text in BAD_FILES.items():
        (data / f"{name}.jsonl").write_text(text)
        info[name] = {"file_name": f"{name}.jsonl"}
    info["missing_file"] = {"file_name": "not_there.jsonl"}
    latin1 = (data / "demo.jsonl").read_bytes().splitlines(keepends=True)[:3]
    latin1.append(
        json.dumps({"instruction": "caf_", "output": "ok"}).encode().replace(b"_", b"\xe9")
    )
    (data / "latin1.jsonl").write_bytes(b"".join(latin1) + b"\n")  # (a Latin-1 export's byte)
    info["latin1"] = {"file_name": "latin1.jsonl"}
    (root / "latin1-prompts.jsonl").write_bytes(b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n')
    (data / "dataset_info.json").write_text(json.dumps(info))

    model, tok = load_model(base), load_tokenizer(base)  # a Stage I output, without training
    base_fp = fingerprint(model)
    mask = resolve_mask_token(tok, model, allow_new=True)
    adapter = root / "adapter"
    lora = apply_lora(model, rank=4, alpha=8, dropout=0.0, target="all")
    lora.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    FluidModelMeta(base_fp, mask.token, mask.id, 261, str(base)).save(adapter)

    khead = root / "khead"
    config = KHeadConfig(hidden_size=64, k_max=4, base_fingerprint="0123456789abcdef")
    save_khead(KHead(64, 4), config, khead)

    pickle_only = save_tiny(root / "pickle", "llama")
    weights = pickle_only / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), pickle_only / "pytorch_model.bin")
    weights.unlink()

    remote = root / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps(
            {
                "model_type": "my_remote_lm",
                "auto_map": {"AutoModelForCausalLM": "modeling_my_remote.MyRemoteLM"},
            }
        )
    )
    shutil.copy(base / "model.safetensors", remote)  # (whole weights: the config needs code)
    load_tokenizer(base).save_pretrained(remote)  # its tokenizer is fine; the model needs code
    # an interrupted copy: the base's and the adapter's weights cut short; a corrupt config.json
    cut = shutil.copytree(base, root / "base-cut")
    _truncate(cut / "model.safetensors")
    cut_adapter = shutil.copytree(adapter, root / "adapter-cut")
    _truncate(cut_adapter / "adapter_model.safetensors")
    no_weights = shutil.copytree(adapter, root / "adapter-no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    no_tokenizer = shutil.copytree(adapter, root / "adapter-no-tokenizer")  # (shared bare)
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    big = shutil.copytree(base, root / "base-bigger-tokenizer")  # another checkpoint's tokenizer
    build_tiny_tokenizer(reserved=20).save_pretrained(big)  # (its [unusedN] past the rows)
    bare = shutil.copytree(base, root / "base-no-tokenizer")
    for file in [*bare.glob("tokenizer*"), *bare.glob("*.jinja"), *bare.glob("special_tokens*")]:
        file.unlink()
    bad_config = shutil.copytree(base, root / "base-bad-config")
    (bad_config / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    return World(root, base, base_mask, other, data, adapter, khead, pickle_only, remote)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) * 2 // 3])


def _stage1(w: World, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = dict(
        stage="fluid_stage1",
        model_name_or_path=w.base,
        dataset="fluid_demo",
        dataset_dir=w.data,
        template="empty",
        cutoff_len=64,
        k_masks=4,
        lora_rank=4,
        max_steps=1,
        output_dir=out,
        report_to="none",
        disable_tqdm=True,
    )
    values.update(extra)
    cfg = w.root / "empty.yaml"
    cfg.write_text("{}\n")
    return ["train", str(cfg), *(f"{k}={v}" for k, v in values.items())]


def _stage2(w: World, out: Path, **extra: object) -> list[str]:
    argv = _stage1(w, out, stage="fluid_stage2", **extra)
    return [a for a in argv if not a.startswith("lora_rank=")]


@dataclass(frozen=True)
class Case:
    argv: Callable[[World, Path], list[str]]
    message: str


CASES: dict[str, Case] = {
    "unknown-key": Case(
        lambda w, o: _stage1(w, o, lerning_rate=1e-4),
        "unknown config key 'lerning_rate'; did you mean 'learning_rate'?",
    ),
    "wrong-type": Case(lambda w, o: _stage1(w, o, lora_rank="abc"), "lora_rank: expected int"),
    "missing-model-dir": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.root / "nope"), "does not exist"
    ),
    "pickle-weights": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.pickle_only),
        "holds only pickle weights (pytorch_model.bin)",
    ),
    "remote-code-model": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.remote_code),
        "set trust_remote_code: true (trust_remote_code=True) only if you trust the model's code",
    ),
    "dataset-unknown": Case(
        lambda w, o: _stage1(w, o, dataset=w.root / "nope.jsonl"), "unknown dataset"
    ),
    "dataset-file-missing": Case(
        lambda w, o: _stage1(w, o, dataset="missing_file"), "not_there.jsonl does not exist"
    ),
    "dataset-empty": Case(lambda w, o: _stage1(w, o, dataset="empty"), "empty.jsonl is empty"),
    "dataset-not-utf8": Case(
        lambda w, o: _stage1(w, o, dataset="latin1"),
        "latin1.jsonl line 4: not UTF-8 text (byte 0xe9 at column 21); save the file as UTF-8",
    ),
    "base-weights-truncated": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.root / "base-cut"),
        "model.safetensors is truncated",
    ),
    "base-config-corrupt": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.root / "base-bad-config"),
        "config.json is unreadable JSON",
    ),
    "continued-adapter-truncated": Case(
        lambda w, o: _stage1(w, o, adapter_name_or_path=w.root / "adapter-cut", lora_rank=4),
        "adapter_model.safetensors is truncated",
    ),
    "stage2-adapter-truncated": Case(
        lambda w, o: _stage2(w, o, adapter_name_or_path=w.root / "adapter-cut"),
        "adapter_model.safetensors is truncated",
    ),
    "stage2-adapter-without-weights": Case(
        lambda w, o: _stage2(w, o, adapter_name_or_path=w.root / "adapter-no-weights"),
        "has adapter_config.json but no adapter_model.safetensors",
    ),
    "stage2-adapter-without-tokenizer": Case(
        lambda w, o: _stage2(w, o, adapter_name_or_path=w.root / "adapter-no-tokenizer"),
        "has no tokenizer, and its MASK token",
    ),
    "generate-adapter-without-tokenizer": Case(
        lambda w, o: [
            *(
                "generate",
                "--model",
                str(w.base),
                "--adapter",
                str(w.root / "adapter-no-tokenizer"),
            ),
            *("--prompt", "hi", "--max-new-tokens", "2"),
        ],
        "copy the tokenizer files saved with the adapter",
    ),
    "prompts-not-utf8": Case(
        lambda w, o: [
            *("generate", "--model", str(w.base_mask), "--prompts"),
            *(str(w.root / "latin1-prompts.jsonl"), "--max-new-tokens", "2"),
            *("--output", str(o / "rows.jsonl")),
        ],
        "latin1-prompts.jsonl line 2: not UTF-8 text (byte 0xe9 at column 16)",
    ),
    "base-with-another-checkpoints-tokenizer": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.root / "base-bigger-tokenizer"),
        "past the model's 261 embedding rows",
    ),
    "base-without-tokenizer": Case(
        lambda w, o: _stage1(w, o, model_name_or_path=w.root / "base-no-tokenizer"),
        "copy the tokenizer files saved with the model",
    ),
    "pass-through-key-of-the-wrong-type": Case(
        lambda w, o: _stage1(w, o, adam_beta1="abc"), "adam_beta1: expected float"
    ),
    "merge-output-is-a-file": Case(
        lambda w, o: [
            *("merge", "--base", str(w.base), "--adapter", str(w.adapter)),
            *("--output", str(w.data / "demo.jsonl")),
        ],
        "is a file; give a new directory",
    ),
    "dataset-malformed-line": Case(
        lambda w, o: _stage1(w, o, dataset="malformed"), "line 2: malformed JSON"
    ),
    "dataset-missing-column": Case(
        lambda w, o: _stage1(w, o, dataset="no_output"), "no_output.jsonl line 2: column 'output'"
    ),
    "dataset-prompt-only": Case(
        lambda w, o: _stage1(w, o, dataset="prompt_only"), "the response is empty"
    ),
    "dataset-over-length": Case(
        lambda w, o: _stage1(w, o, dataset="too_long"), "no response token fits in cutoff_len=64"
    ),
    "mask-token-unknown": Case(
        lambda w, o: _stage1(w, o, mask_token="<|nope|>"), "is not a token of this tokenizer"
    ),
    "mask-token-in-data": Case(
        lambda w, o: _stage1(w, o, mask_token="a"), "occurs in the training data"
    ),
    "k-masks-zero": Case(lambda w, o: _stage1(w, o, k_masks=0), "k_masks must be > 0, got 0"),
    "k-masks-negative": Case(lambda w, o: _stage1(w, o, k_masks=-3), "k_masks must be > 0"),
    "attn-backend-unavailable": Case(
        lambda w, o: _stage1(w, o, attn_backend="npu"), "attn_backend: 'npu' needs an NPU"
    ),
    "device-unavailable": Case(
        lambda w, o: _stage1(w, o, device="npu"), "device 'npu' was requested but is not available"
    ),
    "anchor-prob-negative": Case(
        lambda w, o: _stage1(w, o, anchor_prob=-0.1), "anchor_prob must be in [0, 1]"
    ),
    "anchor-prob-above-one": Case(
        lambda w, o: _stage1(w, o, anchor_prob=1.5), "anchor_prob must be in [0, 1]"
    ),
    "output-dir-under-a-file": Case(
        lambda w, o: _stage1(w, o, output_dir=w.data / "demo.jsonl" / "run"), "is not writable"
    ),
    "output-dir-is-a-file": Case(
        lambda w, o: _stage1(w, o, output_dir=w.data / "demo.jsonl"), "is a file, not a folder"
    ),
    "deepspeed-json-missing": Case(
        lambda w, o: _stage1(w, o, deepspeed=w.root / "ds.json"), "does not exist"
    ),
    "resume-missing-checkpoint": Case(
        lambda w, o: _stage1(w, o, resume_from_checkpoint=w.root / "checkpoint-9"),
        "is not a directory",
    ),
    "stage2-on-a-plain-base": Case(lambda w, o: _stage2(w, o), "is not a Stage I output"),
    "stage2-adapter-base-mismatch": Case(
        lambda w, o: _stage2(w, o, model_name_or_path=w.other, adapter_name_or_path=w.adapter),
        "was trained on another base model",
    ),
    "merge-adapter-base-mismatch": Case(
        lambda w, o: [
            *("merge", "--base", str(w.other), "--adapter", str(w.adapter)),
            *("--output", str(o)),
        ],
        "was trained on another base model",
    ),
    "generate-without-a-mask-token": Case(
        lambda w, o: ["generate", "--model", str(w.base), "--prompt", "hi"],
        "has no MASK token",
    ),
    "khead-base-mismatch": Case(
        lambda w, o: [
            *("generate", "--model", str(w.base_mask), "--khead", str(w.khead)),
            *("--policy", "khead", "--prompt", "hi", "--max-new-tokens", "2"),
        ],
        "the K-head in",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_clear_line(name, world, tmp_path, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    code = cli_main(case.argv(world, out))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("fluid: error:")]
    assert len(errors) == 1, err[-2000:]
    assert case.message in errors[0], errors[0]
    assert "Traceback" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing left behind
    if name == "output-dir-under-a-file":
        assert (world.data / "demo.jsonl").is_file()  # untouched


@pytest.mark.parametrize("stage", [_stage1, _stage2])
def test_an_npu_attention_without_a_usable_npu_is_refused_before_loading(
    world, tmp_path, monkeypatch, capsys, stage
):
    """attn_backend: npu (the openPangu recipes') where no NPU is usable: refused before any model
    loads (on every rank), with the reason and what to check; attn_backend: auto is named as what
    would run the model on the CPU, not offered as the fix."""
    why = "torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
    monkeypatch.setattr(devices, "npu_import_error", lambda: why)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the attn_backend check")

    monkeypatch.setattr(session, "load_model", no_loading)
    monkeypatch.setattr(stage2, "load_stage1", no_loading)
    out = tmp_path / "outputs" / "pangu7b" / "stage"  # (the recipes' nested output_dir)
    assert cli_main(stage(world, out, attn_backend="npu")) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("fluid: error:")]
    assert f"none is usable here ({why})" in line, line
    assert "set_env.sh" in line and "attn_backend: auto would run the model on" in line, line
    assert not (tmp_path / "outputs").exists()  # nor the parents the run would have made
    assert tmp_path.is_dir()  # (and nothing above them)


def test_an_npu_attention_on_a_device_key_off_the_npu_names_that_key(monkeypatch):
    monkeypatch.setattr(devices, "npu_import_error", lambda: None)  # (an NPU is usable)
    with pytest.raises(ConfigError, match="this run is on cpu \\(the device key\\): set device"):
        check_backend("npu", "cpu")
    with pytest.raises(ConfigError, match="on cpu \\(the --device flag\\): set --device npu"):
        check_backend("npu", "cpu", flags=True)  # (fluid generate / eval / bench's words)


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match="k_masks must be > 0"):
        cli_main(["--debug", *_stage1(world, tmp_path / "out", k_masks=0)])


def test_safety_defaults_and_the_pickle_opt_in(world, tmp_path, capsys):
    assert ModelArgs().trust_remote_code is False and ModelArgs().allow_pickle is False
    # allow_pickle: true lets the pickle-only model load; the run then stops at the next bad input
    out = tmp_path / "out"
    argv = _stage1(world, out, model_name_or_path=world.pickle_only, allow_pickle=True)
    assert cli_main([*argv, "dataset=empty"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fluid: error:")]
    assert len(errors) == 1 and "empty.jsonl is empty" in errors[0]
    assert not out.exists()
