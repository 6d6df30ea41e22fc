"""``fluid merge``: fold a Stage I LoRA adapter into its base and write a plain HF directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` alone (no peft, no fluid-npu), in
transformers 5 and, through the legacy RoPE / dtype keys ``legacy_config`` adds, in the 4.x
releases serving runtimes pin; its tokenizer carries the MASK token and ``fluid_model.json``
keeps the provenance. Written to a staging directory and renamed, so a failed merge leaves
nothing behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.model.adapters import FluidModelMeta, load_fluid
from fluid_npu.model.legacy_config import add_legacy_keys
from fluid_npu.model.loading import fingerprint

DEFAULT_SHARD_SIZE = "5GB"  # LLaMA-Factory's export_size (5, in GB): a 7B model in bf16 in 3 files


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    allow_pickle: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Merge ``adapter`` into ``base`` and save to ``output`` (safetensors in shards of at most
    ``max_shard_size``, with their index, as transformers writes them); returns the output path.
    Everything that needs no model is checked before the weights load."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {str(out)!r} is a file; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --output directory")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CheckpointError(f"--output {str(out)!r} lies under {str(above)!r}, a file")
    max_shard_size = _shard_size(max_shard_size)
    loaded = load_fluid(base, adapter, allow_pickle=allow_pickle, merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        loaded.model.save_pretrained(
            staging, safe_serialization=True, max_shard_size=max_shard_size
        )
        add_legacy_keys(staging)  # (read right by transformers 4.x runtimes too)
        loaded.tokenizer.save_pretrained(staging)
        meta = FluidModelMeta.load(adapter)
        FluidModelMeta(
            base_fingerprint=fingerprint(loaded.model),
            mask_token=loaded.mask.token,
            mask_id=loaded.mask.id,
            vocab_size=meta.vocab_size if meta else len(loaded.tokenizer),
            base_model=str(base),
            stage="fluid_stage1_merged",
            template=meta.template if meta else None,
            source_fingerprint=loaded.base_fingerprint,
            adapter_fingerprint=loaded.adapter_fingerprint,
        ).save(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _shard_size(size: str | int) -> str | int:
    """``size`` as ``save_pretrained`` takes it (``5GB``, ``500MB``; plain bytes as an int: it
    reads a string by its unit); a size it cannot read is a ``ConfigError`` now, before loading."""
    text = str(size).strip().upper()
    if (
        not re.fullmatch(r"[0-9]+(\.[0-9]+)?(TB|GB|MB|KB)|[0-9]+", text)
        or float(re.sub("[A-Z]", "", text)) <= 0
    ):
        raise ConfigError(f"--max-shard-size {size!r}: give a size such as 5GB or 500MB")
    return int(text) if text.isdigit() else text
