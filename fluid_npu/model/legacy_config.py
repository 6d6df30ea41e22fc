"""A saved ``config.json`` that transformers 4.x reads as transformers 5 does.

transformers 5 writes RoPE as one ``rope_parameters`` dict (``rope_theta`` and the scaling inside)
and the weights' dtype as ``dtype``. transformers 4.x — and the runtimes pinned to it (vLLM and
vllm-ascend releases, LLaMA-Factory) — read ``rope_theta`` / ``rope_scaling`` / ``torch_dtype``
at the top level and ignore the rest: a merged Qwen (θ = 10⁶) or Llama 3 (θ = 5·10⁵ with
``llama3`` scaling) would load there with θ = 10⁴ and no scaling, and decode garbage without an
error. ``add_legacy_keys`` writes those keys beside transformers 5's; transformers 5 reads the
pair back to the same ``rope_parameters`` (``tests/test_legacy_config.py``). Per-layer-type RoPE
(a dict per attention kind) has no model-independent 4.x spelling and is left as written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fluid_npu.io import write_json_atomic


def legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4.x keys for ``config`` (a ``config.json`` dict) that it lacks."""
    extra: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_type" in rope:  # (flat: one RoPE for every layer)
        if "rope_theta" in rope and "rope_theta" not in config:
            extra["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
            extra["partial_rotary_factor"] = rope["partial_rotary_factor"]
        inside = ("rope_theta", "partial_rotary_factor")  # (4.x: top-level keys)
        scaling = {k: v for k, v in rope.items() if k not in inside}
        # (default RoPE with more keys — Qwen2-VL's mrope_section — keeps them there too)
        if (rope["rope_type"] != "default" or set(scaling) - {"rope_type"}) and config.get(
            "rope_scaling"
        ) is None:
            extra["rope_scaling"] = scaling
    if "dtype" in config and "torch_dtype" not in config:
        extra["torch_dtype"] = config["dtype"]
    for name, sub in config.items():  # (a multimodal config's text part, if any)
        if name.endswith("_config") and isinstance(sub, dict):
            more = legacy_keys(sub)
            if more:
                extra[name] = {**sub, **more}
    return extra


def add_legacy_keys(directory: str | Path) -> None:
    """Add ``legacy_keys`` to ``directory/config.json`` in place (written atomically);
    nothing when the directory holds no config (an adapter) or it has them all."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    extra = legacy_keys(config)
    if not extra:
        return
    write_json_atomic(path, {**config, **extra})
