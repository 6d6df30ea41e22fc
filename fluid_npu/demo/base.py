"""The demo's stand-in for openPangu: a tokenizer trained on the task and a tiny pretrained Llama.

``train_demo_tokenizer`` trains a byte-level BPE with ``tokenizers`` on the demo task's training
text (so words and small numbers are single tokens) and adds ``<s> </s> <pad> <mask>``;
``pretrain_base`` trains a small Llama from random weights with plain next-token prediction on the
same text (prompt and solution, as a pretrained LM would have seen such text) and saves both in
HF format. ``random_like`` builds the control of the demo: a randomly initialised model of the
same shape, saved the same way, to receive the same Stage I budget.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from fluid_npu.data.demo import demo_examples
from fluid_npu.model.tiny import build_tiny_model

DEMO_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SPECIAL = ("<s>", "</s>", "<pad>", "<mask>")


def train_demo_tokenizer(texts: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (any text still encodes), with the demo's specials."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def corpus(n: int, seed: int = 0) -> list[str]:
    """The pretraining text: prompt + solution of ``n`` training problems."""
    return [row["instruction"] + row["output"] for row in demo_examples(n, seed)]


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out: Path) -> Path:
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.eval().save_pretrained(staging)
    tok.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def pretrain_base(
    out: Path,
    steps: int,
    *,
    n_problems: int = 8000,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the tokenizer and the base model, save both to ``out``; returns the loss curve."""
    from tqdm.auto import tqdm

    texts = corpus(n_problems, seed)
    tok = train_demo_tokenizer(texts)
    model = build_tiny_model("llama", tok, seed=seed, **DEMO_MODEL).train()
    enc = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    curve: dict[str, list[float]] = {"step": [], "loss": []}
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(enc), (batch,), generator=g).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            labels[row, : len(enc[i])] = torch.tensor(enc[i])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    _save(model, tok, out)
    return curve


def random_like(base: Path, out: Path, seed: int = 1) -> Path:
    """Save a randomly initialised model with ``base``'s shape and tokenizer (the control)."""
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    model = build_tiny_model("llama", tok, seed=seed, **DEMO_MODEL)
    return _save(model, tok, out)
