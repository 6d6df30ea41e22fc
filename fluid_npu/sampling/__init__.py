"""The elastic sampler (DESIGN §1.3): lossless self-speculative decoding with MASK-slot drafts.

* ``generate(model, tokenizer_or_mask_id, input_ids, ...)`` → ``GenerateOutput`` (``api.py``);
  ``FluidForCausalLM.from_pretrained(model_dir, adapter, khead).generate(...)``
  (``pretrained.py``, transformers' conventions); ``LLM(model_dir, khead=...).generate(prompts,
  SamplingParams(...))`` (``llm.py``, vLLM's offline API);
* the decode engine the fused loop runs on: ``scheduler.py`` (request slots, queue, ``step()``),
  ``prefill.py`` (admission, chunked prefill, first drafts), ``step.py`` (the fixed-shape fused
  step, one host read), ``kv.py`` (the static slot KV cache), ``drafting.py`` (measured costs →
  block length, second block, AR fallback), ``requests.py``, ``head.py``;
* the method's pieces: ``fused.py`` (candidate blocks), ``policies.py`` (horizons ``ar`` /
  ``fixed:K`` / ``entropy[:T]`` / ``khead``), ``rules.py`` (exact sampling: filters, seeds, the
  rejection rule), ``inputs.py`` (prompt / EOS / dtype checks);
* the published reference loop on the first engine: ``reference.py``, ``engine.py``, ``cache.py``;
* ``stats.py`` (TPF and friends), ``lossless.py`` (the check against transformers' ``generate``),
  ``fluid generate`` (``cli.py``), ``fluid bench sampler`` (``bench_cli.py``, ``bench.py``),
  prompt files and atomic JSONL output (``prompts.py``).
"""

from typing import TYPE_CHECKING

from fluid_npu import lazy_exports

if TYPE_CHECKING:
    from fluid_npu.sampling.api import GenerateOutput, PromptError, generate
    from fluid_npu.sampling.llm import LLM
    from fluid_npu.sampling.policies import HorizonError, Policy, parse_policy
    from fluid_npu.sampling.pretrained import FluidForCausalLM
    from fluid_npu.sampling.stats import GenerateStats

__all__ = [
    "LLM",
    "FluidForCausalLM",
    "GenerateOutput",
    "GenerateStats",
    "HorizonError",
    "Policy",
    "PromptError",
    "generate",
    "parse_policy",
]

if not TYPE_CHECKING:  # (a checker reads the imports above, and knows every name)
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "api": ("GenerateOutput", "PromptError", "generate"),
            "llm": ("LLM",),
            "policies": ("HorizonError", "Policy", "parse_policy"),
            "pretrained": ("FluidForCausalLM",),
            "stats": ("GenerateStats",),
        },
    )
