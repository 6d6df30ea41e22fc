"""Stage II — elastic horizons (DESIGN §1.2): train the K-head on a frozen Stage I model.

The backbone is a Stage I output: a merged or fully fine-tuned model in ``model_name_or_path``, or
a base plus the Stage I LoRA adapter in ``adapter_name_or_path`` (loaded frozen, not merged). Per
batch, each example is expanded with ``fixed_k`` (every sampled anchor gets ``k_max`` slots) and no
reveal noise; the backbone runs under ``torch.no_grad()``; ``fluid_ops.token_stats`` gives each
slot's CE and argmax without logits; ``khead_labels`` turns them into K* per anchor; the head reads
the anchor's final hidden state and is trained with ``KL(Q ‖ P_φ)`` against the Gaussian target.

Why transformers' Trainer: the trainable module handed to it (``KHeadObjective``) owns only the
head as a submodule and calls the backbone through a plain attribute, so the optimizer, DDP /
FSDP / DeepSpeed wrapping, gradient sync and ``checkpoint-N`` directories all see the head alone
(a checkpoint is a few MB; resume works as in Stage I), while every process keeps its own frozen
copy of the backbone on its device. The backbone never gets a gradient and stays in eval mode.
Nothing is cached: anchors are redrawn each epoch exactly as in Stage I, and memory does not grow
with the dataset.

At the end (main process) the head is saved with ``save_khead`` (``khead.safetensors`` +
``khead_config.json`` with the fingerprints), the held-out report of ``khead_report`` is measured
and plotted, and ``run.json`` records config, versions, device, losses and the figures. The
held-out examples are the ``val_size`` split; with ``val_size: 0`` a seeded 10 % of the examples
(at most 1000) is held out of Stage II training instead. Held-out anchors are every anchor the
slot budget allows (``anchor_prob`` 1), with the same label rule as training.
``run_stage2(cfg)`` is what ``fluid train`` calls for ``stage: fluid_stage2``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluid_npu import device as devices
from fluid_npu.config import FluidConfig
from fluid_npu.errors import CheckpointError, ConfigError, DataError
from fluid_npu.layout import IGNORE, LayoutConfig
from fluid_npu.model.adapters import FluidModelMeta, LoadedFluid, load_fluid
from fluid_npu.model.attention import configure_attention, forward_hidden, lm_head
from fluid_npu.model.khead import KHead, KHeadConfig, save_khead
from fluid_npu.train.common import (
    CHECKPOINTING,
    FluidTrainer,
    requested_parallelism,
    training_arguments,
)
from fluid_npu.train.data import load_run_data
from fluid_npu.train.io import prepare_output_dir, remove_if_empty, write_run_json
from fluid_npu.train.khead_labels import (
    anchor_tables,
    gaussian_target,
    horizon_labels,
    khead_kl_loss,
)
from fluid_npu.train.khead_report import (
    PLOT_FILE,
    heldout_figures,
    mode_k,
    plot_khead_report,
    split_heldout,
)
from fluid_npu.train.precision import resolve_precision
from fluid_npu.train.sharded import unpartitioned_loading
from fluid_npu.train.stage1 import EpochCallback, LayoutCollator
from fluid_ops.meta import AttnMeta

logger = logging.getLogger(__name__)

HEAD_PREFIX = "head."
COUNTS = "label_counts"


@dataclass
class AnchorBatch:
    """What the head trains on: one row per anchor with at least one supervised slot."""

    hidden: torch.Tensor  # [A, H] final hidden state of the anchor's main token
    k_star: torch.Tensor  # [A] int64 label in 1…k_max
    n_valid: torch.Tensor  # [A] supervised slots of the anchor


class FrozenBackbone:
    """The Stage I model, frozen: runs a fixed-k layout batch and labels its anchors.

    Deliberately not an ``nn.Module``: whoever holds it (``KHeadObjective``) does not register it,
    so optimizers, distributed wrappers and checkpoints never see its parameters.
    """

    def __init__(self, model: nn.Module, *, rule: str, tau: float, k_max: int) -> None:
        self.model = model
        self.rule, self.tau, self.k_max = rule, tau, k_max
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def to(self, device: torch.device | str) -> FrozenBackbone:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def anchors(self, inputs: dict[str, Any]) -> AnchorBatch:
        """Backbone forward (no gradient), per-slot CE / argmax, per-anchor labels K*."""
        self.model.eval()
        anchor, labels = inputs["anchor"], inputs["labels"]
        n_main = int(inputs["n_main"])
        meta = AttnMeta.self_attention(inputs["position_ids"], anchor, n_main=n_main)
        hidden, _ = forward_hidden(self.model, inputs["input_ids"], inputs["position_ids"], meta)
        is_slot = anchor >= 0
        ce_slots, argmax_slots = slot_stats(hidden[is_slot], lm_head(self.model), labels[is_slot])
        ce = torch.zeros(anchor.shape, dtype=torch.float32, device=anchor.device)
        argmax = torch.full_like(anchor, -1)
        ce[is_slot] = ce_slots
        argmax[is_slot] = argmax_slots
        table = anchor_tables(
            anchor, inputs["slot_index"], labels, ce, argmax, n_main=n_main, k_max=self.k_max
        )
        table = table.select(table.n_valid > 0)
        return AnchorBatch(
            hidden=hidden[table.row, table.col],
            k_star=horizon_labels(self.rule, table, self.tau),
            n_valid=table.n_valid,
        )


def slot_stats(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE (0 where the label is ignored) and argmax of ``head(hidden)``.

    A plain ``nn.Linear`` LM head goes through ``fluid_ops.token_stats`` (no ``[T, V]`` logits);
    an adapted head (LoRA on ``lm_head``) is called as a module, ``chunk`` tokens at a time.
    """
    if type(head) is nn.Linear:
        import fluid_ops

        stats = fluid_ops.token_stats(hidden, head.weight, labels, bias=head.bias)
        return stats.ce, stats.argmax
    ces, argmaxes = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        lab = labels[start : start + chunk]
        ces.append(F.cross_entropy(logits, lab, ignore_index=IGNORE, reduction="none"))
        argmaxes.append(logits.argmax(dim=-1))
    if not ces:
        return hidden.new_zeros(0, dtype=torch.float32), labels.new_zeros(0)
    return torch.cat(ces), torch.cat(argmaxes)


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head in its own dtype (fp32, or bf16 under pure_bf16) whatever the autocast."""
    dtype = next(head.parameters()).dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(hidden.to(dtype)).float()


class KHeadObjective(nn.Module):
    """What the Trainer trains: the K-head (the only submodule) and the Stage II loss.

    ``forward(**batch)`` returns ``{"loss", "khead_acc", "khead_label_mean"}``; it also counts the
    training labels in the buffer ``label_counts``, whose mode is the report's constant-K
    baseline. Being a buffer, the histogram is saved in every ``checkpoint-N`` and restored on
    resume, so a resumed run reports the same baseline as an uninterrupted one (under DDP the
    buffer is rank 0's, broadcast each step: the histogram of rank 0's share of the batches).
    """

    def __init__(self, head: KHead, backbone: FrozenBackbone, sigma: float) -> None:
        super().__init__()
        self.head = head
        self.backbone = backbone  # a plain object: not registered, not trained, not saved
        self.sigma = sigma
        self.register_buffer(COUNTS, torch.zeros(head.k_max, dtype=torch.long))

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        batch = self.backbone.anchors(inputs)
        logits = head_logits(self.head, batch.hidden)
        if batch.k_star.numel() == 0:  # no supervised anchor in this batch: a zero with a graph
            zero = logits.sum() * 0.0
            nan = torch.tensor(float("nan"))
            return {"loss": zero, "khead_acc": nan, "khead_label_mean": nan}
        target = gaussian_target(batch.k_star, self.head.k_max, self.sigma)
        loss = khead_kl_loss(logits, target)
        if self.training:  # the training labels only, not a held-out evaluation's
            counts = torch.bincount(batch.k_star - 1, minlength=self.head.k_max)
            self.label_counts += counts.to(self.label_counts.device)
        with torch.no_grad():
            acc = ((logits.argmax(dim=-1) + 1) == batch.k_star).float().mean()
        return {
            "loss": loss,
            "khead_acc": acc,
            "khead_label_mean": batch.k_star.float().mean(),
        }


@torch.no_grad()
def predict_heldout(
    head: KHead,
    backbone: FrozenBackbone,
    dataset: Any,
    collator: LayoutCollator,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K̂, K*)`` for every supervised anchor of ``dataset`` (CPU int64 tensors)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = backbone.device
    head = head.to(device).eval()
    preds, labels = [], []
    for batch in tqdm(loader, desc="Stage II held-out", disable=not progress):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        anchors = backbone.anchors(inputs)
        preds.append((head_logits(head, anchors.hidden).argmax(dim=-1) + 1).cpu())
        labels.append(anchors.k_star.cpu())
    return torch.cat(preds), torch.cat(labels)


def load_stage1(cfg: FluidConfig, dtype: torch.dtype | None) -> LoadedFluid:
    """The frozen Stage I model named by ``model_name_or_path`` (+ ``adapter_name_or_path``)."""
    model_dir = cfg.model.model_name_or_path
    adapter = cfg.model.adapter_name_or_path
    if adapter is not None and "," in adapter:
        raise ConfigError(
            f"adapter_name_or_path {adapter!r} lists several adapters; Stage II takes the one "
            "Stage I adapter (merge others into the base first)"
        )
    meta_dir = Path(adapter if adapter else model_dir)
    meta = FluidModelMeta.load(meta_dir)
    if meta is None:
        raise CheckpointError(
            f"{meta_dir} is not a Stage I output (no fluid_model.json). Train Stage I first and "
            "pass its output_dir as adapter_name_or_path (LoRA, with the base as "
            "model_name_or_path) or as model_name_or_path (full fine-tuning or `fluid merge`)"
        )
    loaded = load_fluid(
        model_dir,
        adapter,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        mask_token=cfg.model.mask_token,
    )
    if loaded.mask.id != meta.mask_id:
        raise CheckpointError(
            f"the MASK token resolves to id {loaded.mask.id} but Stage I trained with "
            f"{meta.mask_token!r} (id {meta.mask_id}); remove mask_token or set it to "
            f"{meta.mask_token!r}"
        )
    return loaded


class Stage2Run:
    """Set-up (inputs checked before any work), training, save and report of one Stage II run.

    Attributes a test may inspect: ``loaded`` (the Stage I model), ``backbone``, ``head``,
    ``train_set`` / ``heldout``.
    """

    def __init__(self, cfg: FluidConfig) -> None:
        cfg.require("model_name_or_path", "dataset", "output_dir")
        f = cfg.fluid
        if f.stage != "fluid_stage2":
            raise ConfigError(f"run_stage2 needs stage: fluid_stage2, got {f.stage!r}")
        if f.anchor_prob <= 0:
            raise ConfigError("anchor_prob must be > 0 for Stage II: anchors are what it labels")
        self.cfg = cfg
        out = Path(cfg.train.output_dir).resolve()
        stage1_dirs = (cfg.model.model_name_or_path, cfg.model.adapter_name_or_path)
        if any(d and Path(d).resolve() == out for d in stage1_dirs):
            raise ConfigError(
                f"output_dir {cfg.train.output_dir!r} is the Stage I model directory; Stage II "
                "would overwrite its run.json: choose another output_dir"
            )
        created = not out.exists()
        self.output_dir = prepare_output_dir(cfg.train.output_dir)
        try:
            self._set_up()
        except BaseException:
            if created:  # a directory this run made and left empty goes again
                remove_if_empty(self.output_dir)
            raise

    def _set_up(self) -> None:
        cfg, f = self.cfg, self.cfg.fluid
        self.choice = devices.current(
            want_bf16=cfg.train.bf16, want_fp16=cfg.train.fp16, force=cfg.model.device
        )
        # bf16 / fp16 apply to the frozen backbone (loaded in that dtype, run as at inference);
        # the head trains in fp32 (bf16 under pure_bf16), so the Trainer itself runs without mixed
        # precision (DeepSpeed's and FSDP's "auto" precision then keep the head as it is).
        self.precision = resolve_precision(
            bf16=cfg.train.bf16,
            fp16=cfg.train.fp16,
            pure_bf16=cfg.train.pure_bf16,
            choice=self.choice,
            deepspeed=cfg.train.deepspeed,
        )
        self.backbone_dtype = self.precision.compute_dtype
        plain = dataclasses.replace(cfg.train, bf16=False, fp16=False)
        # the held-out split always feeds the final report; it is also evaluated during training
        # (KL loss, head accuracy every eval_steps) when eval_steps / eval_strategy / do_eval ask
        asked = {"eval_steps", "eval_strategy", "do_eval"} & set(cfg.extra_training_args)
        self.args = training_arguments(
            dataclasses.replace(cfg, train=plain), self.choice, evaluate=bool(asked)
        )
        if getattr(self.args, CHECKPOINTING):
            logger.warning("gradient_checkpointing is ignored in Stage II: the backbone is frozen")
            setattr(self.args, CHECKPOINTING, False)
        devices.seed_everything(cfg.train.seed)
        with unpartitioned_loading():  # every process keeps the whole frozen backbone
            self.loaded = load_stage1(cfg, self.backbone_dtype)
        self._load_data()

        tok = self.loaded.tokenizer
        self.layout = LayoutConfig(
            mask_id=self.loaded.mask.id,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            k_max=f.k_masks,
            anchor_prob=f.anchor_prob,
            noise_ratio=0.0,
            max_slots_ratio=f.max_slots_ratio,
            reveal=False,
            fixed_k=True,
            seed=cfg.train.seed,
        )
        model = self.loaded.model
        run_module = model.get_base_model() if hasattr(model, "get_base_model") else model
        configure_attention(run_module, cfg.model.attn_backend, self.choice.type)
        run_module.config.use_cache = False
        self.backbone = FrozenBackbone(
            run_module, rule=f.khead_label, tau=f.khead_tau, k_max=f.k_masks
        ).to(self.args.device)
        self.hidden_size = int(run_module.config.get_text_config().hidden_size)
        self.head = KHead(self.hidden_size, f.k_masks).to(self.precision.trainable_dtype)
        self.objective = KHeadObjective(self.head, self.backbone, f.khead_sigma)
        self.precision_record = self.precision.observe(nn.ModuleList([self.head, run_module]))

    def _load_data(self) -> None:
        self.args.device  # noqa: B018 - sets up torch.distributed: the data is built on rank 0
        data = load_run_data(self.cfg, self.loaded.tokenizer, self.loaded.mask)
        train, heldout, source = split_heldout(data.train, data.eval, self.cfg.train.seed)
        self.train_set = _reindex(train)
        self.heldout = _reindex(heldout)
        self.heldout_source = source
        self.data_stats = dataclasses.asdict(data.stats)

    def train(self) -> dict[str, Any]:
        """Train the head, save it, measure the held-out report; returns the ``run.json`` record."""
        collator = LayoutCollator(self.layout)

        class _Trainer(FluidTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = model(**inputs)
                loss = out["loss"]
                self.record_parts(loss, {k: v for k, v in out.items() if k != "loss"})
                return (loss, out) if return_outputs else loss

        trainer = _Trainer(
            model=self.objective,
            args=self.args,
            train_dataset=self.train_set,
            eval_dataset=self.heldout if self.args.eval_strategy != "no" else None,
            data_collator=collator,
            callbacks=[EpochCallback(collator)],
        )
        result = trainer.train(resume_from_checkpoint=self.cfg.train.resume_from_checkpoint)
        self.trainer = trainer
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers ZeRO-3 / FSDP
        self.figures = trainer.run_figures(requested_parallelism(self.cfg))  # collective
        if not trainer.is_world_process_zero():  # only the main process saves and reports
            return {"stage": "fluid_stage2", "train_loss": float(result.training_loss)}
        # a fresh module: the trained one may carry a wrapper's hooks (ZeRO-3 gathers in every
        # forward, a collective that only this process would now join)
        self.head = KHead(self.hidden_size, self.cfg.fluid.k_masks)
        self.head.load_state_dict(
            {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        )
        return self._finish(result, state[COUNTS].cpu())

    def _finish(self, result: Any, counts: torch.Tensor) -> dict[str, Any]:
        f = self.cfg.fluid
        if int(counts.sum()) == 0:
            raise DataError(
                "Stage II saw no anchor with a supervised slot: responses are too short for the "
                "layout, or anchor_prob is too low"
            )
        config = KHeadConfig(
            hidden_size=self.hidden_size,
            k_max=f.k_masks,
            label_rule=f.khead_label,
            tau=f.khead_tau,
            sigma=f.khead_sigma,
            base_fingerprint=self.loaded.base_fingerprint,
            adapter_fingerprint=self.loaded.adapter_fingerprint,
        )
        head = self.head.float().cpu()
        save_khead(head, config, self.output_dir)

        const_k = mode_k(counts)
        eval_layout = dataclasses.replace(self.layout, anchor_prob=1.0)
        pred, label = predict_heldout(
            head,
            self.backbone,
            self.heldout,
            LayoutCollator(eval_layout),
            self.cfg.train.per_device_eval_batch_size,
            progress=not self.args.disable_tqdm,
        )
        figures = heldout_figures(pred, label, const_k, f.k_masks)
        plot = plot_khead_report(pred, label, const_k, f.k_masks, self.output_dir / PLOT_FILE)
        self.head = head
        trainer = self.trainer
        record = {
            "stage": "fluid_stage2",
            "config": self.cfg.to_dict(),
            "device": {
                "type": self.choice.type,
                "backend": self.choice.backend,
                "backbone_dtype": str(next(self.backbone.model.parameters()).dtype),
                "head_dtype": str(self.precision.trainable_dtype),
                "world_size": self.args.world_size,
            },
            **self.figures,
            "precision": self.precision_record,
            "stage1": {
                "model_name_or_path": str(self.cfg.model.model_name_or_path),
                "adapter_name_or_path": self.cfg.model.adapter_name_or_path,
            },
            "base_fingerprint": self.loaded.base_fingerprint,
            "adapter_fingerprint": self.loaded.adapter_fingerprint,
            "mask_token": {"token": self.loaded.mask.token, "id": self.loaded.mask.id},
            "khead": dataclasses.asdict(config),
            "data": self.data_stats,
            "heldout": {"source": self.heldout_source, "examples": len(self.heldout)},
            "train_examples": len(self.train_set),
            "train_loss": float(result.training_loss),
            "global_step": int(result.global_step),
            **trainer.last_parts,
            **trainer.last_eval,
            "train_label_hist": counts.tolist(),
            **figures,
            "plot": None if plot is None else plot.name,
            "log_history": trainer.state.log_history,
        }
        write_run_json(self.output_dir, record)
        return record


def _reindex(dataset: Any) -> Any:
    """``dataset`` with its ``index`` column renumbered 0…n-1 (after a split)."""
    return dataset.remove_columns("index").add_column("index", list(range(len(dataset))))


def run_stage2(cfg: FluidConfig) -> dict[str, Any]:
    """Train Stage II from a config; returns the ``run.json`` record (also written to disk)."""
    return Stage2Run(cfg).train()
