"""The embedded CPU demo (``fluid demo``, ``bash run_npu.sh``): all of FLUID on a laptop.

``base`` builds the stand-in base model, ``pipeline`` runs and caches every stage, ``report`` writes
``report.md``, ``summary.json`` and the plots.
"""

from fluid_npu.demo.pipeline import add_demo_parser

__all__ = ["add_demo_parser"]
