"""Loading any HF causal-LM directory, openPangu-Embedded included, without remote code.

* A model directory must hold safetensors weights; a pickle ``.bin`` checkpoint is refused unless
  ``allow_pickle`` is set (a pickle can run arbitrary code when loaded).
* openPangu-Embedded (``model_type: PanguEmbedded``) is a Llama with biases on q/k/v/o. Its remote
  code imports torch_npu unconditionally, so we map its config onto ``LlamaConfig`` with
  ``attention_bias=True`` and load the (Llama-named) weights into ``LlamaForCausalLM``.
* ``fingerprint`` identifies a base model's weights cheaply, so an adapter or K-head trained on one
  base can refuse to load onto another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.io import safetensors_problem

PANGU_TYPES = ("pangu_embedded", "panguembedded")
# openPangu config keys that are Llama keys under another name.
PANGU_RENAMES = {"bias": "attention_bias"}
PANGU_DROP = ("auto_map", "architectures", "model_type", "_name_or_path", "transformers_version")


def check_model_dir(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """Return the directory when it holds a loadable checkpoint, else raise a CheckpointError."""
    p = Path(path)
    if p.is_file():
        raise CheckpointError(
            f"{str(p)!r} is a file; give the model's directory (the one holding config.json and "
            f"the weights{': ' + repr(str(p.parent)) + '?' if p.name == 'config.json' else ''})"
        )
    if not p.is_dir():
        raise CheckpointError(
            f"model directory {str(p)!r} does not exist; give a local HF model directory "
            "(--model / model=DIR, or model_name_or_path in a training config; nothing is "
            "downloaded)"
        )
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json; it is not a HF model directory")
    safetensors = list(p.glob("*.safetensors"))
    pickles = list(p.glob("*.bin")) + list(p.glob("*.pt")) + list(p.glob("*.pth"))
    if not safetensors:
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{p} holds only pickle weights ({pickles[0].name}); convert them to safetensors, "
                "or set allow_pickle: true (allow_pickle=True) if you trust the file"
            )
        if not pickles:
            raise CheckpointError(f"{p} holds no weights (*.safetensors)")
    check_weights(safetensors, "copy or download the model again")
    return p


def check_weights(files: list[Path], fix: str) -> None:
    """A CheckpointError naming the first of the safetensors ``files`` that is not whole (an
    interrupted copy or download), and ``fix``."""
    for file in sorted(files):
        why = safetensors_problem(file)
        if why is not None:
            raise CheckpointError(f"{file} {why}; {fix}")


def check_adapter_dir(path: Path, what: str) -> None:
    """A CheckpointError unless ``path`` holds a LoRA adapter's config and whole weights
    (``what``: what the directory should have been)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {what}")
    if not (path / "adapter_config.json").is_file():
        saved = sorted(
            (int(c.name.split("-")[1]), c) for c in path.glob("checkpoint-*")
            if c.name.split("-")[1].isdigit() and (c / "adapter_config.json").is_file()
        )  # fmt: skip
        stopped = (
            f" — a run stopped before its final save? its last checkpoint is {saved[-1][1]}"
            if saved else ""
        )  # fmt: skip
        raise CheckpointError(
            f"{path} is not a LoRA adapter directory (no adapter_config.json{stopped}); {what}"
        )
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() and not (path / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{path} has adapter_config.json but no adapter_model.safetensors: copy the adapter's "
            "weights beside it"
        )
    check_weights([weights] if weights.is_file() else [], "copy the adapter again")


def is_pangu_config(raw: dict[str, Any]) -> bool:
    model_type = str(raw.get("model_type", "")).lower()
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return model_type in PANGU_TYPES or any(a.startswith("panguembedded") for a in archs)


def pangu_to_llama_config(raw: dict[str, Any]) -> LlamaConfig:
    """Map an openPangu-Embedded config dict onto an equivalent ``LlamaConfig`` (q/k/v/o biases)."""
    values = {PANGU_RENAMES.get(k, k): v for k, v in raw.items() if k not in PANGU_DROP}
    values.setdefault("attention_bias", True)
    values["mlp_bias"] = False
    if "torch_dtype" in values and "dtype" not in values:
        values["dtype"] = values.pop("torch_dtype")
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    return config


def load_config(path: str | Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is unreadable JSON ({exc}); copy the model again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object; copy the model again")
    if is_pangu_config(raw):
        return pangu_to_llama_config(raw)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: transformers does not know model_type {raw.get('model_type')!r} ({exc}); "
            "set trust_remote_code: true (trust_remote_code=True) only if you trust the model's "
            "code"
        ) from None


def quantization_config(
    bits: int,
    *,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> Any:
    """bitsandbytes' ``BitsAndBytesConfig`` for QLoRA, after a small quantized layer ran there.

    bitsandbytes supports some devices and not others (and its support grows by version), so the
    answer comes from trying it: a 64×64 layer quantized to ``bits`` and run forward there. Any
    failure is one ``ConfigError`` naming ``quantization_bit``: never a warning and a run in
    full precision.
    """
    key = f"quantization_bit: {bits}"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # not installed, or its native library does not load
        raise ConfigError(
            f"{key} (QLoRA) needs the bitsandbytes package, which cannot be imported ({exc}); "
            "install it (pip install -e '.[qlora]') or remove quantization_bit"
        ) from None
    try:
        with torch.no_grad():
            if bits == 4:
                layer = bnb.nn.Linear4bit(
                    64, 64, compute_dtype=compute_dtype, quant_type=quant_type
                ).to(device)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
            layer(torch.ones(2, 64, dtype=compute_dtype, device=device))
    except Exception as exc:
        raise ConfigError(
            f"{key}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run a {bits}-bit "
            f"layer on this {device.type} device ({type(exc).__name__}: {exc}); remove "
            "quantization_bit (LoRA on unquantized weights) or train on a device it supports"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_quant_storage=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization: Any = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local directory (openPangu as Llama); eval mode, on CPU.

    ``quantization`` (a ``BitsAndBytesConfig`` from ``quantization_config``) loads the linear
    layers quantized, straight onto ``device``.
    """
    p = check_model_dir(path, allow_pickle=allow_pickle)
    config = load_config(p, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = dict(
        config=config,
        attn_implementation=attn_implementation,
        use_safetensors=not allow_pickle or bool(list(p.glob("*.safetensors"))),
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": str(device or "cpu")}
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else AutoModelForCausalLM
    if cls is AutoModelForCausalLM:
        kwargs["trust_remote_code"] = trust_remote_code
    try:
        model = cls.from_pretrained(p, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the model in {p}: {exc}") from None
    return model.eval()


@contextmanager
def _quiet_pangu_config(path: str | Path) -> Iterator[None]:
    """Around the tokenizer's load from an openPangu directory: transformers reads its config as a
    bare ``PretrainedConfig`` and warns that the ``PanguEmbedded`` type "can yield errors" — which
    is about a model, and the model loads as a Llama (``pangu_to_llama_config``)."""
    file = Path(path) / "config.json"
    try:
        pangu = file.is_file() and is_pangu_config(json.loads(file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pangu = False
    log = logging.getLogger("transformers.configuration_utils")
    level = log.level
    if pangu:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model (a pad token is set to EOS when it has none)."""
    try:
        with _quiet_pangu_config(path):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as exc:  # (a tokenizer's own dependency: openPangu's needs sentencepiece)
        raise CheckpointError(
            f"the tokenizer in {path} needs a package that is not installed ({exc}); install it "
            "(openPangu's PanguTokenizer: pip install sentencepiece, in the npu extra)"
        ) from None
    except (OSError, ValueError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]  # (the CLI shows one line)
        raise CheckpointError(
            f"cannot load a tokenizer from {path} ({lines[0].strip()}): copy the tokenizer files "
            "saved with the model (tokenizer.json, tokenizer_config.json, ...) beside it; "
            "openPangu's PanguTokenizer is remote code: save it once as a fast tokenizer, or set "
            "trust_remote_code: true (trust_remote_code=True)"
        ) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def fingerprint(model: PreTrainedModel, checkpoint: str | Path | None = None) -> str:
    """A short hash of a base model's shape and a few weight rows (cheap, stable across saves).

    The input embedding rows of the original vocabulary and the first decoder weight identify the
    base; rows appended for a new MASK token are excluded, so the base and its FLUID descendant
    with a resized vocabulary share the fingerprint. A quantized (QLoRA) or ZeRO-3-partitioned
    model reads those weights from its ``checkpoint`` directory: same fingerprint as the base.
    """
    config = model.config
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        h.update(f"{key}={getattr(config, key, None)};".encode())
    emb = _first_rows(model, model.get_input_embeddings().weight, 8, checkpoint)
    h.update(_dtype_free(emb))
    first = next(
        (p for n, p in model.named_parameters() if "layers.0." in n and "lora_" not in n),
        None,
    )
    if first is not None:
        h.update(_dtype_free(_first_rows(model, first, 4, checkpoint)))
    return h.hexdigest()[:16]


def _first_rows(
    model: PreTrainedModel, param: torch.Tensor, rows: int, checkpoint: str | Path | None
) -> torch.Tensor:
    """The first ``rows`` rows of ``param``; read from ``checkpoint`` (those rows only, not the
    tensor) when the model is quantized (its weights, the unquantized ones too, may be held in
    another precision than saved), ``param`` is a ZeRO-3 partition (``ds_numel``), or it is held
    in float16 (whose rounding of small values is not bf16's: the fingerprint's bf16 view of a
    float16 copy differs from the saved weights')."""
    quantized = getattr(model, "is_quantized", False) or hasattr(param, "ds_numel")
    lossy = param.dtype == torch.float16
    if not (quantized or lossy) or checkpoint is None:
        return param.detach()[:rows]
    name = next(n for n, p in model.named_parameters() if p is param)
    try:
        return _checkpoint_rows(Path(checkpoint), name, rows)
    except CheckpointError:
        if quantized:
            raise
        return param.detach()[:rows]  # (a float16 model from a non-safetensors checkpoint)


def _dtype_free(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes()


def _checkpoint_rows(directory: Path, name: str, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of tensor ``name`` in a (possibly sharded) safetensors checkpoint,
    read without loading the rest of it."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / weight_map[name]] if name in weight_map else []
    else:
        files = sorted(directory.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                return f.get_slice(name)[:rows]
    raise CheckpointError(
        f"{directory} has no safetensors tensor {name!r}; is it the model that was loaded (a "
        "quantized or ZeRO-3 base must be a safetensors checkpoint)?"
    )
