"""``fluid merge``: fold a Stage I LoRA adapter into its base and write a plain HF directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` alone (no peft, no fluid-npu); its
tokenizer carries the MASK token and ``fluid_model.json`` keeps the provenance. Written to a
staging directory and renamed, so a failed merge leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fluid_npu.errors import CheckpointError
from fluid_npu.model.adapters import FluidModelMeta, load_fluid
from fluid_npu.model.loading import fingerprint


def merge_adapter(
    base: str | Path, adapter: str | Path, output: str | Path, *, allow_pickle: bool = False
) -> Path:
    """Merge ``adapter`` into ``base`` and save to ``output``; returns the output path."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {str(out)!r} is a file; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --output directory")
    loaded = load_fluid(base, adapter, allow_pickle=allow_pickle, merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        loaded.model.save_pretrained(staging, safe_serialization=True)
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
        ).save(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
