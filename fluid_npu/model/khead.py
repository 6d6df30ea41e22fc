"""The K-head (DESIGN §1.2): a small MLP that predicts the horizon K from an anchor's hidden state.

``Linear(H, H/4) → GELU → Linear(H/4, k_max)`` on the final post-norm hidden state of the anchor's
main token; class ``i`` means ``K = i + 1``. It is saved alone — ``khead.safetensors`` plus
``khead_config.json`` carrying the fingerprint of the backbone it was trained on (base model and
Stage I adapter) — and refuses to load onto another backbone. ``attach_khead`` loads a head for a
model from ``fluid_npu.model.adapters.load_fluid`` with every check (hidden size, base, adapter),
in fp32 on the model's device.

A Stage II ``checkpoint-N`` is a K-head directory too: it holds ``khead_config.json`` and the
Trainer's ``model.safetensors``, whose ``head.`` tensors are the head (``load_khead`` reads them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fluid_npu.errors import CheckpointError

if TYPE_CHECKING:
    from fluid_npu.model.adapters import LoadedFluid

WEIGHTS = "khead.safetensors"
CONFIG = "khead_config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"  # a Stage II checkpoint-N: the Trainer's whole objective
HEAD_PREFIX = "head."  # the K-head's tensors in it (the objective's ``head`` submodule)


@dataclass(frozen=True)
class KHeadConfig:
    hidden_size: int
    k_max: int
    label_rule: str = "ce_threshold"
    tau: float = 2.8
    sigma: float = 1.5
    base_fingerprint: str = ""
    adapter_fingerprint: str | None = None

    def save(self, directory: str | Path) -> None:
        """Write ``khead_config.json`` into ``directory`` (atomically)."""
        from fluid_npu.io import write_json_atomic

        write_json_atomic(Path(directory) / CONFIG, asdict(self))


class KHead(nn.Module):
    """Horizon predictor: logits over ``K ∈ {1…k_max}``."""

    def __init__(self, hidden_size: int, k_max: int) -> None:
        super().__init__()
        inner = max(1, hidden_size // 4)
        self.k_max = k_max
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, k_max))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely horizon ``K`` (1-based) for each hidden state."""
        return self.forward(hidden).argmax(dim=-1) + 1


def save_khead(head: KHead, config: KHeadConfig, directory: str | Path) -> Path:
    """Write the head's weights and config (temp files renamed into place)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS)
    config.save(out)
    return out


def _weights(d: Path) -> Path | None:
    """The head's weights in ``d``: a Stage II output_dir's, else a Stage II checkpoint's."""
    for name in (WEIGHTS, CHECKPOINT_WEIGHTS):
        if (d / name).is_file():
            return d / name
    return None


SAVED_SUBDIR = "khead"  # FluidForCausalLM.save_pretrained's K-head, beside the model's weights


def saved_khead(model_dir: str | Path, adapter: str | Path | None = None) -> Path | None:
    """The K-head ``FluidForCausalLM.save_pretrained`` wrote with a model (``model_dir/khead``:
    a subfolder, so runtimes that load every ``*.safetensors`` of a model directory never read
    it), or None — also when an adapter is given: the head was saved for the model alone."""
    found = Path(model_dir) / SAVED_SUBDIR
    return found if adapter is None and (found / CONFIG).is_file() else None


def read_khead_config(directory: str | Path) -> KHeadConfig:
    """A K-head directory's config (its weights checked present); a CheckpointError says why not."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or _weights(d) is None:
        if (d / "fluid_model.json").is_file():
            what = "it is a Stage I output (pass it as the model or adapter)"
        elif (d / CONFIG).is_file() and (d / "trainer_state.json").is_file():
            what = (
                f"a checkpoint whose weights were saved sharded (no {CHECKPOINT_WEIGHTS}: "
                "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save, or FSDP's "
                "SHARDED_STATE_DICT); consolidate it (DeepSpeed's zero_to_fp32.py) or train with "
                "the gathered / FULL_STATE_DICT save"
            )
        elif (d / CONFIG).is_file():
            what = f"it has {CONFIG} but no {WEIGHTS}"
        elif (d / CHECKPOINT_WEIGHTS).is_file() and (d / "trainer_state.json").is_file():
            what = f"a checkpoint saved without {CONFIG} (by an older fluid-npu)"
        else:
            what = f"no {CONFIG}"
        raise CheckpointError(
            f"{d} is not a K-head directory: {what}. Pass a Stage II output_dir (with {WEIGHTS} "
            f"and {CONFIG}) or one of its checkpoint-N directories"
        )
    try:
        return KHeadConfig(**json.loads((d / CONFIG).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{d / CONFIG} is unreadable ({exc}); re-run Stage II") from None


def load_khead(
    directory: str | Path,
    *,
    base_fingerprint: str | None = None,
    adapter_fingerprint: str | None = None,
    hidden_size: int | None = None,
) -> tuple[KHead, KHeadConfig]:
    """Load a K-head; a head trained on another backbone is a CheckpointError naming both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    config = read_khead_config(d)
    if hidden_size is not None and config.hidden_size != hidden_size:
        raise CheckpointError(
            f"the K-head in {d} expects hidden size {config.hidden_size}, the model has "
            f"{hidden_size}: it was trained for another base model"
        )
    if base_fingerprint is not None and config.base_fingerprint != base_fingerprint:
        raise CheckpointError(
            f"the K-head in {d} was trained on another base model (fingerprint "
            f"{config.base_fingerprint}, this one is {base_fingerprint}); pass the matching --model"
        )
    if adapter_fingerprint is not None and config.adapter_fingerprint not in (
        None,
        adapter_fingerprint,
    ):
        raise CheckpointError(
            f"the K-head in {d} was trained with another Stage I adapter; pass the adapter it "
            "was trained with"
        )
    head = KHead(config.hidden_size, config.k_max)
    weights = _weights(d)
    try:
        state = load_file(str(weights))
        if weights.name == CHECKPOINT_WEIGHTS:
            state = {
                k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)
            }
        head.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"{weights} is truncated or corrupt ({exc}); re-run Stage II"
        ) from None
    return head.eval(), config


def attach_khead(loaded: LoadedFluid, directory: str | Path) -> tuple[KHead, KHeadConfig]:
    """The K-head in ``directory`` for ``loaded`` (a ``load_fluid`` result), fp32, on its device.

    Stricter than ``load_khead``: the Stage I adapter must be the one the head was trained with,
    and a head trained on base + adapter does not load onto the bare base (or the reverse).
    """
    hidden = int(loaded.model.config.get_text_config().hidden_size)
    head, config = load_khead(
        directory,
        base_fingerprint=loaded.base_fingerprint,
        adapter_fingerprint=loaded.adapter_fingerprint,
        hidden_size=hidden,
    )
    if (config.adapter_fingerprint or None) != (loaded.adapter_fingerprint or None):
        trained = "a Stage I adapter" if config.adapter_fingerprint else "no adapter (merged)"
        given = "an adapter" if loaded.adapter_fingerprint else "no adapter"
        raise CheckpointError(
            f"the K-head in {directory} was trained on this base with {trained}, but the model was "
            f"loaded with {given}; load the same Stage I model the head was trained on"
        )
    device = next(loaded.model.parameters()).device
    return head.to(device=device, dtype=torch.float32), config
