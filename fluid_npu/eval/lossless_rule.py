"""The one rule for "lossless" in an evaluation: which policies pass, and ``fluid eval``'s status.

Every FLUID policy must decode exactly what greedy AR decodes. ``fluid eval`` (exit status 1 after
writing its JSON) and the demo (``summary.json``'s ``lossless``, ``best_tpf``) judge an evaluation
report through these functions only, as ``fluid bench sampler`` judges its rows: a tolerance for
numerical near-ties belongs here, once, for all of them.
"""

from __future__ import annotations

from typing import Any

from fluid_npu.eval.report import fraction
from fluid_npu.eval.runner import BASELINE

EXIT_NOT_LOSSLESS = 1


def is_lossless(figures: dict[str, Any]) -> bool:
    """Whether one policy's figures (an entry of ``run_eval``'s ``results``) are lossless: every
    output identical to ar's, or every divergence a numerical near-tie judged in fp32 (its
    ``mismatches`` is 0; the bench's rule, ``sampling.lossless.compare``)."""
    return figures["identical_to_ar"] == 1.0 or figures.get("mismatches") == 0


def not_lossless(result: dict[str, Any]) -> dict[str, float]:
    """The policies of a ``run_eval`` report that are not lossless, with their identical_to_ar."""
    return {
        name: figures["identical_to_ar"]
        for name, figures in result["results"].items()
        if name != BASELINE and not is_lossless(figures)
    }


def lossless_status(result: dict[str, Any], where: str) -> tuple[int, str | None]:
    """``(exit status, message)`` of an evaluation: ``(0, None)`` when every policy is lossless,
    else status 1 and one line naming the policies; ``where`` is the report to look in."""
    bad = not_lossless(result)
    if not bad:
        return 0, None
    names = ", ".join(f"{name} (identical to ar {fraction(value)})" for name, value in bad.items())
    return EXIT_NOT_LOSSLESS, (
        f"fluid: not lossless: {names}; the outputs that differ from ar are under 'samples' "
        f"in {where}"
    )
