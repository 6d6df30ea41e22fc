"""The elastic sampler (DESIGN §1.3): lossless self-speculative decoding with MASK-slot drafts.

* ``generate(model, tokenizer_or_mask_id, input_ids, ...)`` → ``GenerateOutput`` (``api.py``);
* ``FluidForCausalLM.from_pretrained(model_dir, adapter, khead).generate(...)`` (``api.py``);
* loops: ``fused.py`` (verify + draft in one forward) and ``reference.py`` (draft, refine, verify);
* horizon policies ``ar`` / ``fixed:K`` / ``entropy[:T]`` / ``khead`` (``policies.py``);
* per-row KV cache bookkeeping (``cache.py``), shared engine (``engine.py``), statistics
  (``stats.py``), the check against transformers' greedy ``generate`` (``lossless.py``);
* ``fluid generate`` / ``fluid bench sampler`` (``cli.py``, ``bench.py``; prompt files and
  atomic JSONL output in ``prompts.py``).
"""

from fluid_npu.sampling.api import FluidForCausalLM, GenerateOutput, PromptError, generate
from fluid_npu.sampling.policies import HorizonError, Policy, parse_policy
from fluid_npu.sampling.stats import GenerateStats

__all__ = [
    "FluidForCausalLM",
    "GenerateOutput",
    "GenerateStats",
    "HorizonError",
    "Policy",
    "PromptError",
    "generate",
    "parse_policy",
]
