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
copy of the backbone on its device. Each checkpoint also gets ``khead_config.json``, so a
``checkpoint-N`` loads as a K-head (``fluid generate --khead DIR/checkpoint-N``). The backbone
never gets a gradient and stays in eval mode. Nothing is cached: anchors are redrawn each epoch
exactly as in Stage I, and memory does not grow with the dataset.

At the end (main process) the head is saved with ``save_khead`` (``khead.safetensors`` +
``khead_config.json`` with the fingerprints), the held-out report of ``khead_report`` is measured
and plotted, and ``run.json`` records config, versions, device, losses and the figures. The
held-out examples are the ``val_size`` split; with ``val_size: 0`` a seeded 10 % of the examples
(at most 1000) is held out of Stage II training instead; either is also evaluated during training
when ``do_eval`` / ``eval_steps`` / ``eval_strategy`` ask. Held-out anchors are every anchor the
slot budget allows (``anchor_prob`` 1), with the same label rule as training.
``run_stage2(cfg)`` is what ``fluid train`` calls for ``stage: fluid_stage2``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluid_npu import device as devices
from fluid_npu.config import FluidConfig
from fluid_npu.errors import CheckpointError, ConfigError, DataError
from fluid_npu.io import first_missing, prepare_output_dir, remove_if_empty, write_run_json
from fluid_npu.layout import LayoutConfig
from fluid_npu.model.adapters import FluidModelMeta, LoadedFluid, load_fluid
from fluid_npu.model.attention import check_backend, configure_attention
from fluid_npu.model.fused_layers import apply_npu_fused_layers, enable_mindspeed
from fluid_npu.model.khead import HEAD_PREFIX, KHead, KHeadConfig, save_khead
from fluid_npu.train.checkpoint import last_complete_checkpoint
from fluid_npu.train.common import FluidTrainer, requested_parallelism, training_arguments
from fluid_npu.train.data import EVAL_EPOCH, load_run_data
from fluid_npu.train.deepspeed_setup import fill_hidden_size_autos
from fluid_npu.train.khead_objective import (
    COUNTS,
    FrozenBackbone,
    KHeadObjective,
    predict_heldout,
)
from fluid_npu.train.khead_report import (
    PLOT_FILE,
    heldout_figures,
    mode_k,
    plot_khead_report,
    split_heldout,
)
from fluid_npu.train.output_dir import check_resume, clear_earlier_run, prepare_run_dir
from fluid_npu.train.precision import device_choice, observe_trained, resolve_precision
from fluid_npu.train.sharded import unpartitioned_loading
from fluid_npu.train.stage1 import EpochCallback, LayoutCollator

logger = logging.getLogger(__name__)


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
    if meta is None and not meta_dir.exists():
        raise CheckpointError(
            f"{meta_dir} does not exist; give the Stage I run's output_dir (or one of its "
            "checkpoint-N directories)"
        )
    last = last_complete_checkpoint(meta_dir) if meta is None else None
    if last is not None:  # (a run that was stopped before its final save)
        raise CheckpointError(
            f"{meta_dir} holds no final Stage I output (the run did not finish its final save); "
            f"give its last complete checkpoint, {last}, or resume the run to its end first"
        )
    if meta is None:
        older = (meta_dir / "trainer_state.json").is_file()  # a checkpoint-N of an older fluid-npu
        raise CheckpointError(
            f"{meta_dir} is not a Stage I output (no fluid_model.json"
            f"{': a checkpoint saved before checkpoints carried it' if older else ''}). Pass a "
            "Stage I output_dir, or one of its checkpoint-N directories, as adapter_name_or_path "
            "(LoRA, with the base as model_name_or_path) or as model_name_or_path (full "
            "fine-tuning or `fluid merge`)"
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
            raise ConfigError(
                "anchor_prob must be > 0 for Stage II: the anchors it labels are drawn with it "
                "(at 0 only the column before each response would be one)"
            )
        if cfg.model.quantization_bit is not None:
            raise ConfigError(
                f"quantization_bit: {cfg.model.quantization_bit} is QLoRA for Stage I; Stage II "
                "runs its frozen backbone in the compute dtype (bf16: true halves it): drop the key"
            )
        self.cfg = cfg
        out = Path(cfg.train.output_dir).resolve()
        stage1_dirs = (cfg.model.model_name_or_path, cfg.model.adapter_name_or_path)
        if any(d and Path(d).resolve() == out for d in stage1_dirs):
            raise ConfigError(
                f"output_dir {cfg.train.output_dir!r} is the Stage I model directory; Stage II "
                "would overwrite its run.json: choose another output_dir"
            )
        created = first_missing(out)  # (what this run makes: a failure removes it again)
        self.output_dir = prepare_output_dir(cfg.train.output_dir)
        try:
            self._set_up()
        except BaseException:
            if created is not None:  # the directories this run made, left empty, go again
                remove_if_empty(self.output_dir, up_to=created)
            raise

    def _set_up(self) -> None:
        cfg, f = self.cfg, self.cfg.fluid
        self.mindspeed = enable_mindspeed() if cfg.model.use_mindspeed else None  # (as Stage I)
        self.choice = device_choice(cfg.train, cfg.model.device)
        check_backend(cfg.model.attn_backend, self.choice.type)  # (before anything loads)
        # bf16 / fp16 apply to the frozen backbone (loaded in that dtype, run as at inference);
        # the head trains in fp32 (bf16 under pure_bf16), so the Trainer itself runs without mixed
        # precision (DeepSpeed's and FSDP's "auto" precision then keep the head as it is).
        self.precision = resolve_precision(cfg.train, self.choice)
        self.backbone_dtype = self.precision.compute_dtype
        plain = dataclasses.replace(cfg.train, bf16=False, fp16=False)
        # the held-out split (val_size / eval_dataset, else split_heldout's seeded part) always
        # feeds the final report; it is also evaluated during training (KL loss, head accuracy
        # every eval_steps) when eval_steps / eval_strategy / do_eval ask
        asked = {"eval_steps", "eval_strategy", "do_eval"} & set(cfg.extra_training_args)
        self.args = training_arguments(
            dataclasses.replace(cfg, train=plain), self.choice, evaluate=bool(asked), held_out=True
        )
        if self.args.activation_checkpointing:
            logger.warning("gradient_checkpointing is ignored in Stage II: the backbone is frozen")
            self.args.activation_checkpointing = False
        settings = {
            "stage": f.stage,
            "k_masks": f.k_masks,
            "learning_rate": cfg.train.learning_rate,
        }
        self.resume = prepare_run_dir(cfg, self.args, settings)
        devices.seed_everything(cfg.train.seed)
        with unpartitioned_loading():  # every process keeps the whole frozen backbone
            self.loaded = load_stage1(cfg, self.backbone_dtype)
        check_resume(
            self.resume,
            {
                "base_fingerprint": self.loaded.base_fingerprint,
                "adapter_fingerprint": self.loaded.adapter_fingerprint or "",
            },
        )
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
        # the frozen backbone's forward is Stage I's: torch_npu's fused kernels serve it too
        self.fused_modules = apply_npu_fused_layers(
            run_module, enabled=self.choice.type == "npu" and cfg.model.npu_fused_kernels
        )
        run_module.config.use_cache = False
        self.backbone = FrozenBackbone(
            run_module, rule=f.khead_label, tau=f.khead_tau, k_max=f.k_masks
        ).to(self.args.device)
        self.hidden_size = int(run_module.config.get_text_config().hidden_size)
        fill_hidden_size_autos(self.args, self.hidden_size)  # (the Trainer reads model.config)
        self.head = KHead(self.hidden_size, f.k_masks).to(self.precision.trainable_dtype)
        self.khead_config = KHeadConfig(  # saved with the head, and into every checkpoint
            hidden_size=self.hidden_size,
            k_max=f.k_masks,
            label_rule=f.khead_label,
            tau=f.khead_tau,
            sigma=f.khead_sigma,
            base_fingerprint=self.loaded.base_fingerprint,
            adapter_fingerprint=self.loaded.adapter_fingerprint,
        )
        self.objective = KHeadObjective(self.head, self.backbone, f.khead_sigma)
        self.trained = nn.ModuleList([self.head, run_module])  # (what run.json's precision reads)

    def _load_data(self) -> None:
        self.args.device  # noqa: B018 - sets up torch.distributed: the data is built on rank 0
        data = load_run_data(self.cfg, self.loaded.tokenizer, self.loaded.mask)
        # load_run_data numbered both splits; after split_heldout's split the numbers stay unique
        given = "eval_dataset" if self.cfg.data.eval_dataset else "val_size"
        train, heldout, source = split_heldout(
            data.train, data.eval, self.cfg.train.seed, given, data.train_groups
        )
        if "epoch" not in heldout.column_names:  # a part of train: one layout per evaluation too
            heldout = heldout.add_column("epoch", [EVAL_EPOCH] * len(heldout))
        self.train_set = train
        self.heldout = heldout
        self.heldout_source = source
        self.data_stats = dataclasses.asdict(data.stats)

    def train(self) -> dict[str, Any]:
        """Train the head, save it, measure the held-out report; returns the ``run.json`` record."""
        collator = LayoutCollator(self.layout)

        class _Trainer(FluidTrainer):
            def compute_loss(
                self,
                model: torch.nn.Module,
                inputs: dict[str, Any],
                return_outputs: bool = False,
                num_items_in_batch: Any = None,
            ) -> Any:
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
        trainer.checkpoint_files = [self.khead_config]
        clear_earlier_run(self.cfg)  # overwrite_output_dir: only now that every check passed
        result = trainer.train(resume_from_checkpoint=self.resume)
        self.trainer = trainer
        self.precision_record = observe_trained(self.precision, self.trained, trainer)
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
        config = self.khead_config
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
                "npu_fused_modules": self.fused_modules,
                "mindspeed": self.mindspeed,
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


def run_stage2(cfg: FluidConfig) -> dict[str, Any]:
    """Train Stage II from a config; returns the ``run.json`` record (also written to disk)."""
    return Stage2Run(cfg).train()
