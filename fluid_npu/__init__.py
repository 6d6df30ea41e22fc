"""fluid-npu: adapt a pretrained causal LM into a lossless parallel-decoding diffusion LM (FLUID).

Stage I (strictly causal alignment), Stage II (the K-head for elastic horizons) and the elastic
sampler, on Ascend NPUs, CUDA and CPU with one code path. See DESIGN.md in the team's shared notes
and the README for the tour.
"""

from collections.abc import Callable

__version__ = "0.1.0"


def lazy_exports(
    package: str, names: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's module ``__getattr__`` and ``__dir__`` (PEP 562): ``names`` maps each submodule
    to the public names it defines, imported on first use; any other name that is a
    submodule is imported as one (``fluid_npu.sampling.api`` after ``import fluid_npu.sampling``).
    So ``fluid --help`` and a mistyped flag answer without importing torch and transformers
    (seconds), while ``from fluid_npu.sampling import generate`` works as before."""
    import importlib
    import importlib.util

    exports = {name: f"{package}.{module}" for module, own in names.items() for name in own}

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif (
            name.isidentifier()
            and not name.startswith("__")
            and (importlib.util.find_spec(f"{package}.{name}"))
        ):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(importlib.import_module(package), name, value)  # (found directly from now on)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
