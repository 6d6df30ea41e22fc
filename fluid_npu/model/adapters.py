"""LoRA adapters through peft, their FLUID metadata, and loading a FLUID model for use.

* ``apply_lora`` wraps a base model for Stage I: all linear layers but the LM head by default
  (peft's ``all-linear``), an explicit ``lora_target`` list honoured, and the MASK embedding row
  trainable (peft trainable tokens) when ``train_mask_embedding`` is set or the MASK token is new.
* Every FLUID output directory carries ``fluid_model.json``: the base model's fingerprint, the MASK
  token and the vocabulary size, so an adapter (or K-head) refuses to load onto another base.
* ``load_fluid`` is how Stage II, the sampler and ``fluid merge`` get a model: base (+ adapter,
  resized for an added MASK token), tokenizer and MASK id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu.errors import CheckpointError
from fluid_npu.model.loading import check_adapter_dir, fingerprint, load_model, load_tokenizer
from fluid_npu.model.mask_token import MaskToken, init_new_rows, resolve_mask_token

META_FILE = "fluid_model.json"


def apply_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target: str | list[str],
    trainable_token_ids: list[int] | None = None,
) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    modules = "all-linear" if target == "all" else list(target)
    if isinstance(modules, list):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        unknown = [m for m in modules if m not in names]
        if unknown:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)
                }
            )
            raise CheckpointError(
                f"lora_target names modules this model does not have: {unknown}; "
                f"its linear layers are {linear} (or use lora_target: all)"
            )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_token_ids or None,
    )
    with quiet_peft(), trainable_tokens_on_any_device():
        return get_peft_model(model, config)


@dataclass(frozen=True)
class FluidModelMeta:
    base_fingerprint: str
    mask_token: str
    mask_id: int
    vocab_size: int  # rows of the base vocabulary, before a MASK token was added
    base_model: str | None = None
    stage: str = "fluid_stage1"
    template: str | None = None  # what Stage I formatted with: a name, or "auto" (None: unrecorded)
    k_masks: int | None = None  # Stage I's MASK slots per anchor (None: unrecorded)
    # a merged model (``fluid merge``): the base and adapter it was merged from, so a K-head
    # trained on that base + adapter loads on it (and a head trained on it, on them)
    source_fingerprint: str | None = None
    adapter_fingerprint: str | None = None

    def save(self, directory: str | Path) -> None:
        from fluid_npu.io import write_json_atomic

        write_json_atomic(Path(directory) / META_FILE, self.__dict__)

    @classmethod
    def load(cls, directory: str | Path) -> FluidModelMeta | None:
        path = Path(directory) / META_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}  # (a later version's keys: skipped)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}); re-run the stage that wrote it"
            ) from None


@dataclass
class LoadedFluid:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    mask: MaskToken
    base_fingerprint: str
    adapter_fingerprint: str | None


def load_fluid(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    merge: bool = False,
    mask_token: str | None = None,
) -> LoadedFluid:
    """A FLUID model ready for inference or Stage II: base (+ Stage I adapter), tokenizer, MASK."""
    model = load_model(
        model_dir,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    base_fp = fingerprint(model, checkpoint=model_dir)  # (saved rows: any dtype it loads in)
    tok_dir = model_dir
    adapter_fp = None
    if adapter_dir is not None:
        adir = Path(adapter_dir)
        check_adapter_dir(adir, "give a Stage I output_dir (LoRA) or one of its checkpoints")
        meta = FluidModelMeta.load(adir)
        if meta is not None and meta.base_fingerprint != base_fp:
            raise CheckpointError(
                f"the adapter in {adir} was trained on another base model (fingerprint "
                f"{meta.base_fingerprint}, this base is {base_fp}); pass the base it was trained on"
            )
        if (adir / "tokenizer_config.json").is_file():
            tok_dir = adir
        if (adir / "generation_config.json").is_file():  # (what the adapter was trained for)
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(adir))
        tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
        if tok_dir == model_dir and meta is not None and meta.mask_id >= len(tokenizer):
            raise CheckpointError(
                f"{adir} has no tokenizer, and its MASK token {meta.mask_token!r} (id "
                f"{meta.mask_id}) was added to the base's vocabulary: copy the tokenizer files "
                "saved with the adapter (tokenizer.json, tokenizer_config.json, ...) beside it"
            )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            n_old = model.get_input_embeddings().weight.shape[0]
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            init_new_rows(model, n_old)
        try:
            with quiet_peft():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adir), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"the adapter in {adir} does not fit this base model: {exc}"
            ) from None
        adapter_fp = (meta.base_fingerprint if meta else "") + ":" + _file_digest(adir)
        if merge:
            model = model.merge_and_unload()
    else:
        tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
        merged = FluidModelMeta.load(model_dir)
        if merged is not None and merged.source_fingerprint and merged.base_fingerprint == base_fp:
            # the weights are base + adapter merged: the network they were merged from
            base_fp, adapter_fp = merged.source_fingerprint, merged.adapter_fingerprint
    mask = resolve_mask_token(tokenizer, configured=mask_token, allow_new=False)
    model.eval()
    return LoadedFluid(model, tokenizer, mask, base_fp, adapter_fp)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Loading an adapter for use without two third-party notices on every load: importing peft
    imports bitsandbytes (when installed), which logs that its optional 4-bit CPU kernels are
    missing (only QLoRA training, ``quantization_bit``, uses them), and peft reads transformers'
    deprecated ``is_gradient_checkpointing`` (a FutureWarning). Anything else still shows. Also
    around the first import of ``TrainingArguments`` (``config``), which imports peft."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            yield
    finally:
        log.setLevel(level)


@contextmanager
def trainable_tokens_on_any_device() -> Iterator[None]:
    """Inside: peft's trainable tokens (an added MASK token's row) set up under DeepSpeed ZeRO-3 on
    any device. peft copies the rows out of the gathered embedding on rank 0 and broadcasts them
    into a buffer it places on an NVIDIA device, which fails on CPU and NPU processes; here every
    process copies them out of the gathered embedding itself (no broadcast)."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        from peft.utils.integrations import gather_params_ctx
    except ImportError:  # a peft without trainable tokens, or with other internals: as it is
        yield
        return
    saved = TrainableTokensLayer.__dict__.get("_collect_token_weights")
    if saved is None:  # (a peft without the method this replaces: as it is)
        yield
        return

    def collect(self: Any, weight: torch.Tensor, rows: Any, embed_dim: int) -> torch.Tensor:
        with gather_params_ctx([weight], modifier_rank=None):
            return weight[rows].clone()

    TrainableTokensLayer._collect_token_weights = collect
    try:
        yield
    finally:
        TrainableTokensLayer._collect_token_weights = saved


def _file_digest(directory: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(directory.glob("adapter_model.safetensors")):
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
