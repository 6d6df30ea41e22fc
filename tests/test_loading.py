"""Model loading (openPangu-Embedded as a Llama with biases, no remote code) and MASK resolution."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from test_remote_code import remote_tokenizer
from transformers import AddedToken, LlamaConfig, LlamaForCausalLM

from fluid_npu.errors import CheckpointError, ConfigError, DataError, FluidError
from fluid_npu.model.loading import check_model_dir, fingerprint, load_model, load_tokenizer
from fluid_npu.model.mask_token import check_unused, resolve_mask_token
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer

PANGU_CONFIG = {
    "architectures": ["PanguEmbeddedForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig",
        "AutoModelForCausalLM": "modeling_openpangu_dense.PanguEmbeddedForCausalLM",
    },
    "model_type": "PanguEmbedded",
    "bias": True,
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 16000000.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def _pangu_reference() -> LlamaForCausalLM:
    values = {
        k: v
        for k, v in PANGU_CONFIG.items()
        if k not in ("architectures", "auto_map", "model_type", "bias", "torch_dtype")
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **values)).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def test_openpangu_checkpoint_loads_as_llama_with_biases(tmp_path):
    ref = _pangu_reference()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(
        k.endswith("self_attn.o_proj.bias") for k in state
    )  # openPangu: bias on q, k, v and o
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(PANGU_CONFIG))
    model = load_model(tmp_path, attn_implementation="eager")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.attention_bias is True and model.config.mlp_bias is False
    rope = getattr(model.config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(model.config, "rope_theta", None)) == pytest.approx(1.6e7)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref.set_attn_implementation("eager")
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[name]), name
    # its tokenizer loads without transformers' warning about the PanguEmbedded model type (the
    # model is a Llama here)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("transformers.configuration_utils")
    log.addHandler(handler)
    try:
        assert len(load_tokenizer(tmp_path)) > 0
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "PanguEmbedded" in m]


def test_missing_and_pickle_only_dirs_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="allow_pickle: true"):
        check_model_dir(tmp_path)
    assert check_model_dir(tmp_path, allow_pickle=True) == tmp_path


def test_fingerprint_ignores_added_rows_but_not_other_weights():
    tok = build_tiny_tokenizer()
    a = build_tiny_model("llama", tok, seed=0)
    fp = fingerprint(a)
    resolve_mask_token(tok, a, allow_new=True)  # adds <|mask|>, resizes
    assert fingerprint(a) == fp
    assert fingerprint(build_tiny_model("llama", build_tiny_tokenizer(), seed=1)) != fp
    assert fingerprint(a.to(torch.bfloat16)) == fp  # one fingerprint whatever the load dtype


def test_mask_from_tokenizer_mask_token():
    tok = build_tiny_tokenizer(mask_token=True)
    mask = resolve_mask_token(tok)
    assert (mask.token, mask.source) == ("<mask>", "tokenizer")
    assert mask.id == tok.convert_tokens_to_ids("<mask>")


def test_mask_from_reserved_tokens_prefers_unused32_and_skips_template_tokens():
    tok = build_tiny_tokenizer(reserved=40)
    mask = resolve_mask_token(tok)
    assert (mask.token, mask.source) == ("[unused32]", "reserved")
    assert tok.mask_token == "[unused32]"  # recorded, so the saved tokenizer carries it
    tok = build_tiny_tokenizer(reserved=12)
    tok.chat_template = "{{ '[unused11]' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    mask = resolve_mask_token(tok)
    assert (
        mask.token == "[unused8]"
    )  # 11 is used by the template; 9, 10 are openPangu's turn markers
    tok = build_tiny_tokenizer(reserved=14)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # 13 is free; 11 and 12 open and close openPangu's tool calls (--tool-call-parser pangu)
    assert resolve_mask_token(tok).token == "[unused13]"
    tok = build_tiny_tokenizer(reserved=13)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_mask_token(tok).token == "[unused8]"


def test_mask_added_as_new_token_resizes_embeddings():
    tok = build_tiny_tokenizer()
    model = build_tiny_model("qwen2", tok)
    n = model.get_input_embeddings().weight.shape[0]
    mask = resolve_mask_token(tok, model, allow_new=True)
    assert mask.source == "added" and mask.id == n
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 1 == len(tok)
    assert torch.allclose(emb[n], emb[:n].mean(0))
    assert model.get_output_embeddings().weight.shape[0] == n + 1


def test_no_mask_candidate_without_permission_to_add():
    with pytest.raises(FluidError, match="no MASK token"):
        resolve_mask_token(build_tiny_tokenizer())


def test_configured_mask_must_exist_and_must_not_occur_in_data():
    tok = build_tiny_tokenizer(reserved=4)
    with pytest.raises(ConfigError, match="not a token"):
        resolve_mask_token(tok, configured="<nope>")
    mask = resolve_mask_token(tok, configured="[unused2]")
    assert mask.source == "config"
    with pytest.raises(DataError, match="occurs in the training data"):
        check_unused(mask, lambda tid: tid == mask.id)
    check_unused(mask, lambda tid: False)


def _with_unused_specials(tokens: list[str], **kwargs: bool):
    """The tiny tokenizer plus special tokens nothing uses (SmolLM2 has 14, from code data)."""
    tok = build_tiny_tokenizer(**kwargs)
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True
    )
    return tok


def test_mask_from_unused_special_tokens_highest_id_not_in_the_template():
    tok = _with_unused_specials(["<repo_name>", "<file_sep>", "<empty_output>"])
    mask = resolve_mask_token(tok)
    assert (mask.token, mask.source) == ("<empty_output>", "unused special")
    assert mask.id == max(tok.convert_tokens_to_ids(["<repo_name>", "<empty_output>"]))
    assert tok.mask_token == "<empty_output>"  # recorded: a saved tokenizer resolves the same id
    # a special token the chat template writes is never the MASK, nor BOS / EOS / PAD
    tok = _with_unused_specials(["<repo_name>"])
    tok.chat_template += "{{ '<repo_name>' }}"
    with pytest.raises(FluidError, match="no MASK token"):
        resolve_mask_token(tok)
    # reserved [unusedN] tokens keep precedence (openPangu's rule is unchanged)
    tok = _with_unused_specials(["<empty_output>"], reserved=2)
    assert resolve_mask_token(tok).token == "[unused1]"


def test_unused_special_tokens_need_a_chat_template():
    tok = _with_unused_specials(["<empty_output>"], chat_template=False)
    with pytest.raises(FluidError, match="no MASK token"):
        resolve_mask_token(tok)


def test_unused_special_mask_survives_save_and_reload(tmp_path):
    from fluid_npu.model.loading import load_tokenizer

    tok = _with_unused_specials(["<repo_name>", "<empty_output>"])
    first = resolve_mask_token(tok)
    tok.save_pretrained(tmp_path)
    again = resolve_mask_token(load_tokenizer(tmp_path))
    assert (again.token, again.id) == (first.token, first.id)
    fresh = _with_unused_specials(["<repo_name>", "<empty_output>"])  # without the saved record
    assert resolve_mask_token(fresh).id == first.id


def test_a_tokenizer_needing_a_missing_package_names_it(tmp_path):
    # openPangu's PanguTokenizer is remote code importing sentencepiece: a missing dependency is
    # one CheckpointError naming the package, not a traceback
    build_tiny_tokenizer().save_pretrained(tmp_path)
    remote_tokenizer(tmp_path, imports="import fluid_test_missing_package  # noqa: F401\n")
    with pytest.raises(CheckpointError, match=r"needs a package.*fluid_test_missing_package"):
        load_tokenizer(tmp_path, trust_remote_code=True)
