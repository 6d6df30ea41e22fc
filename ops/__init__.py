"""fluid_ops: the FLUID kernel library — causal-masked attention and vocabulary reductions.

Depends on torch only (never on ``fluid_npu``). Each op has a torch reference, back ends for NPU
(torch_npu), CUDA and Ascend (Triton / triton-ascend) and CPU, and one dispatch rule
(``fluid_ops.dispatch``): npu > cuda > cpu, ``FLUID_<OP>_BACKEND`` to force one, and
``force_backend`` for tests.
"""

from fluid_ops.attention import fluid_attention
from fluid_ops.dispatch import BackendUnavailable, force_backend, select
from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility
from fluid_ops.vocab import TokenStats, linear_cross_entropy, token_stats

__all__ = [
    "MAIN",
    "PAD",
    "AttnMeta",
    "BackendUnavailable",
    "TokenStats",
    "fluid_attention",
    "force_backend",
    "linear_cross_entropy",
    "select",
    "token_stats",
    "visibility",
]
