"""``fluid demo`` — the embedded CPU demo: the whole FLUID pipeline on a model it builds itself.

1. *Base model*: a small Llama with a byte-level tokenizer, pretrained for a few hundred plain
   next-token steps on the synthetic task (``fluid_npu.data.demo``) — the "pretrained GPT-style
   LM" that FLUID adapts. Nothing is downloaded.
2. *Stage I*: ``configs/demo_stage1.yaml`` (LoRA, strictly causal alignment).
3. *Stage II*: ``configs/demo_stage2.yaml`` (the K-head), on the Stage I adapter.
4. *Sampler*: held-out prompts decoded greedily by plain AR and by the elastic sampler, checked
   token for token, with tokens per forward (TPF) and speed reported.

Each step is skipped when its output already exists (``--fresh`` redoes everything).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("outputs/demo")
DEMO_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded CPU demo end to end")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the demo writes (outputs/demo)")
    p.add_argument("--fresh", action="store_true", help="redo every step")
    p.add_argument("--pretrain-steps", type=_positive, default=400)
    p.add_argument("--prompts", type=_positive, default=16, help="held-out prompts for the sampler")
    p.set_defaults(handler=run_demo)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def pretrain_base(out: Path, steps: int, seed: int = 0) -> Path:
    """Build the demo's base model and pretrain it with plain next-token prediction."""
    from fluid_npu.data.demo import demo_examples
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", tok, seed=seed, **DEMO_MODEL).train()
    rows = demo_examples(4000, seed=seed + 7)
    texts = [f"{r['instruction']}\n{r['output']}{tok.eos_token}" for r in rows]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    batch = 32
    t0 = time.time()
    for step in range(steps):
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
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretrain step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.eval().save_pretrained(staging)
    tok.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _train(config: str, overrides: list[str]) -> dict:
    from fluid_npu.config import load_config

    cfg = load_config(ROOT / "configs" / config, overrides)
    if cfg.fluid.stage == "fluid_stage1":
        from fluid_npu.train.stage1 import run_stage1

        return run_stage1(cfg)
    from fluid_npu.train.stage2 import run_stage2

    return run_stage2(cfg)


def run_demo(args: argparse.Namespace) -> int:
    from fluid_npu.data.demo import write_demo_dataset

    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = write_demo_dataset(out / "data", n_train=2000, seed=0)
    base, stage1, stage2 = out / "base", out / "stage1", out / "stage2"
    print(f"[1/4] base model -> {base}")
    if not (base / "config.json").is_file():
        pretrain_base(base, args.pretrain_steps)
    print(f"[2/4] Stage I (configs/demo_stage1.yaml) -> {stage1}")
    if not (stage1 / "run.json").is_file():
        shutil.rmtree(stage1, ignore_errors=True)
        rec = _train(
            "demo_stage1.yaml",
            [f"model_name_or_path={base}", f"dataset_dir={data_dir}", f"output_dir={stage1}"],
        )
        print(f"  loss_ar {rec.get('loss_ar')}  loss_diff {rec.get('loss_diff')}")
    print(f"[3/4] Stage II (configs/demo_stage2.yaml) -> {stage2}")
    if not (stage2 / "run.json").is_file():
        shutil.rmtree(stage2, ignore_errors=True)
        rec = _train(
            "demo_stage2.yaml",
            [
                f"model_name_or_path={base}",
                f"adapter_name_or_path={stage1}",
                f"dataset_dir={data_dir}",
                f"output_dir={stage2}",
            ],
        )
        figures = {k: v for k, v in rec.items() if k.startswith(("khead_", "const_"))}
        print(f"  K-head held-out: {json.dumps(figures)}")
    print("[4/4] elastic sampler vs plain greedy decoding (held-out prompts)")
    return sampler_demo(base, stage1, stage2, out, n_prompts=args.prompts)


def demo_prompt_ids(tokenizer: object, n: int) -> list[list[int]]:
    """Held-out demo prompts rendered with the template Stage I trained on (``empty``)."""
    from fluid_npu.data.demo import demo_prompts
    from fluid_npu.data.templates import Conversation, get_template

    template = get_template("empty", tokenizer)
    return [template.encode_prompt(tokenizer, Conversation([("user", p)])) for p in demo_prompts(n)]


def sampler_demo(base: Path, stage1: Path, stage2: Path, out: Path, n_prompts: int) -> int:
    """Decode held-out prompts with plain greedy AR and the elastic sampler; check and report."""
    from fluid_npu.sampling import FluidForCausalLM
    from fluid_npu.train.io import write_json_atomic

    fluid = FluidForCausalLM.from_pretrained(base, adapter=stage1, khead=stage2)
    prompts = demo_prompt_ids(fluid.tokenizer, n_prompts)
    n = len(prompts)
    runs = [("ar", "fused"), ("entropy", "fused"), ("khead", "fused"), ("khead", "reference")]
    results: dict[str, dict] = {}
    baseline: list[list[int]] | None = None
    for policy, loop in runs:
        tokens, forwards, wall = [], 0, 0.0
        for ids in prompts:
            fluid.generate(torch.tensor([ids]), max_new_tokens=96, policy=policy, loop=loop)
            stats = fluid.last_stats
            tokens.append(list(fluid.last_output.new_tokens[0]))
            forwards += sum(stats.row_forwards)
            wall += stats.wall_s
        new = sum(len(t) for t in tokens)
        baseline = tokens if baseline is None else baseline
        same = sum(a == b for a, b in zip(tokens, baseline))
        results[f"{policy}/{loop}"] = {
            "tpf": new / forwards,
            "tokens_per_s": new / wall,
            "identical_to_ar": f"{same}/{len(prompts)}",
        }
    ar_speed = results["ar/fused"]["tokens_per_s"]
    print(f"  {'policy/loop':<18}{'TPF':>6}{'tok/s':>9}{'speed vs AR':>13}  identical to AR")
    for name, r in results.items():
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar_speed
        print(
            f"  {name:<18}{r['tpf']:>6.2f}{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>12.2f}x"
            f"  {r['identical_to_ar']}"
        )
    prompt, answer = (fluid.tokenizer.decode(t) for t in (prompts[0], baseline[0]))
    print(f"  example: {prompt!r} -> {answer!r}")
    write_json_atomic(out / "sampler.json", {"prompts": len(prompts), "results": results})
    print(f"  written to {out / 'sampler.json'}")
    lossy = [name for name, r in results.items() if r["identical_to_ar"] != f"{n}/{n}"]
    if lossy:
        print(f"  NOT LOSSLESS: {', '.join(lossy)} differ from greedy AR decoding")
        return 1
    return 0
