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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluid_npu.data.template_export import TrainedTemplate
from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.io import publish_dir
from fluid_npu.model.adapters import META_FILE, FluidModelMeta, LoadedFluid, load_fluid
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
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``adapter`` into ``base`` and save to ``output`` (safetensors in shards of at most
    ``max_shard_size``, with their index, as transformers writes them); returns the output path.
    Everything that needs no model is checked before the weights load."""
    out = check_output(output, "--output")
    max_shard_size = shard_size(max_shard_size)
    loaded = load_fluid(
        base, adapter, allow_pickle=allow_pickle, merge=True, trust_remote_code=trust_remote_code
    )
    meta = FluidModelMeta.load(adapter)
    trained = TrainedTemplate.read(adapter)  # (the format a named template trained: kept)
    return save_fluid(
        loaded.model,
        loaded.tokenizer,
        out,
        merged_meta(loaded, meta, base=str(base)),
        max_shard_size=max_shard_size,
        extra=None if trained is None else trained.save,
    )


def check_output(output: str | Path, name: str) -> Path:
    """``output`` as a new (or empty) directory to save a model into, else a ``CheckpointError``
    naming ``name`` (the flag or argument that gave it)."""
    out = Path(output).absolute()  # (".": a staging folder beside it, then renamed into it)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{name} {str(out)!r} is a file; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new {name} directory")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CheckpointError(f"{name} {str(out)!r} lies under {str(above)!r}, a file")
    return out


def merged_meta(
    loaded: LoadedFluid, meta: FluidModelMeta | None, *, base: str | None
) -> FluidModelMeta:
    """``fluid_model.json`` for ``loaded.model`` saved whole: its MASK token, and the network it
    was loaded as (``loaded``'s base and adapter fingerprints), so a K-head trained on that base
    + adapter loads on the saved model. ``meta``: the source's own record, if any, whose account
    of Stage I (vocabulary, ``template``, ``k_masks``) the saved model keeps."""
    merged = loaded.adapter_fingerprint is not None
    return FluidModelMeta(
        base_fingerprint=fingerprint(loaded.model),
        mask_token=loaded.mask.token,
        mask_id=loaded.mask.id,
        vocab_size=meta.vocab_size if meta else len(loaded.tokenizer),
        base_model=base,
        stage="fluid_stage1_merged" if merged or meta is None else meta.stage,
        template=meta.template if meta else None,
        k_masks=meta.k_masks if meta else None,
        source_fingerprint=loaded.base_fingerprint,
        adapter_fingerprint=loaded.adapter_fingerprint,
    )


def save_fluid(
    model: Any,
    tokenizer: Any,
    out: Path,
    meta: FluidModelMeta,
    *,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` (safetensors shards, with the legacy config keys), ``tokenizer``, ``meta``
    and whatever ``extra(staging)`` adds into a staging directory beside ``out``, then rename it
    to ``out`` (new or empty): a failed save leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        add_legacy_keys(staging)  # (read right by transformers 4.x runtimes too)
        tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
        meta.save(staging)
        if out.exists():  # (an empty folder, perhaps a process's working directory: kept, and
            publish_dir(staging, out, last=[META_FILE])  # filled, fluid_model.json last)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def shard_size(size: str | int, name: str = "--max-shard-size") -> str | int:
    """``size`` as ``save_pretrained`` takes it (``5GB``, ``500MB``; plain bytes as an int: it
    reads a string by its unit); a size it cannot read is a ``ConfigError`` now, before loading."""
    text = str(size).strip().upper()
    if (
        not re.fullmatch(r"[0-9]+(\.[0-9]+)?(TB|GB|MB|KB)|[0-9]+", text)
        or float(re.sub("[A-Z]", "", text)) <= 0
    ):
        raise ConfigError(f"{name} {size!r}: give a size such as 5GB or 500MB")
    return int(text) if text.isdigit() else text
