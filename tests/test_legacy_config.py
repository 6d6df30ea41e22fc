"""A saved model's ``config.json`` carries RoPE and dtype in transformers 4.x's keys beside 5's:
transformers 5 reads the pair back unchanged, and the 4.x keys alone say the same."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from fluid_npu.model.legacy_config import add_legacy_keys, legacy_keys

SMALL = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    num_hidden_layers=2, vocab_size=100, max_position_embeddings=131072, dtype="bfloat16",
)  # fmt: skip
ROPES = [
    {"rope_type": "default", "rope_theta": 1e6},  # Qwen2.5
    {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},  # Llama 3.1
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
     "original_max_position_embeddings": 32768},  # Qwen3 past 32k
]  # fmt: skip


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
@pytest.mark.parametrize("cls", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
def test_legacy_keys_say_what_rope_parameters_say(tmp_path, cls, rope):
    cls(**SMALL, rope_parameters=dict(rope)).save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    add_legacy_keys(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    # the keys transformers 4.x reads: rope_theta, rope_scaling (None for plain RoPE), torch_dtype
    assert written["rope_theta"] == rope["rope_theta"] and written["torch_dtype"] == "bfloat16"
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert written.get("rope_scaling") == (None if rope["rope_type"] == "default" else scaling)
    # transformers 5 reads the pair back to the same config
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == before
    # and a config holding only the 4.x keys (as 4.x wrote them) is the same model
    old = {k: v for k, v in written.items() if k not in ("rope_parameters", "dtype")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == before["rope_parameters"]
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_is_added_where_nothing_is_missing(tmp_path):
    add_legacy_keys(tmp_path)  # no config.json (an adapter's directory): nothing written
    assert not list(tmp_path.iterdir())
    rope = {"rope_type": "default", "rope_theta": 1e4}
    both = {
        "rope_theta": 1e4,
        "rope_parameters": rope,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    assert legacy_keys(both) == {}
    # RoPE per attention kind has no model-independent 4.x spelling: left as transformers wrote it
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert legacy_keys({"rope_parameters": nested}) == {}
    # a factor 4.x reads at the top level, and default RoPE with more keys (Qwen2-VL's sections)
    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
            "mrope_section": [16, 24, 24]}  # fmt: skip
    extra = legacy_keys({"rope_parameters": rope})
    assert extra["partial_rotary_factor"] == 0.5
    assert extra["rope_scaling"] == {"rope_type": "default", "mrope_section": [16, 24, 24]}
    # a multimodal config's text part gets its keys too
    text = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert legacy_keys({"text_config": text})["text_config"]["rope_theta"] == 1e6
