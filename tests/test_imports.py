"""The package's import structure (DESIGN §2): no cycle, and the arrows point one way.

The modules of ``fluid_npu`` are parsed with ``ast`` (nothing is imported). Two rules:

* the import graph has no cycle — counting the imports inside functions too (a lazy import only
  hides a cycle: the two modules still need each other), and the package ``__init__`` that
  importing a submodule runs first;
* the lower layers — ``layout``, ``data/``, ``model/``, ``device`` (and ``host``), ``io``,
  ``config`` (and its ``lf_keys``), ``errors`` — import none of the upper ones (``train/``,
  ``sampling/``, ``eval/``, ``serve/``, ``demo/``, ``real/``, ``cli``), not even inside a function;
  and ``fluid_ops`` imports nothing of ``fluid_npu``.

And one run: ``fluid``'s command line answers ``--help`` and a bad flag without importing torch,
transformers or the serving stack (seconds on a small machine; the package ``__init__`` files
export their names lazily, ``fluid_npu.lazy_exports``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fluid_npu
import fluid_ops

PACKAGE = Path(fluid_npu.__file__).parent
OPS = Path(fluid_ops.__file__).parent
LOWER = (
    "layout",
    "data",
    "model",
    "device",
    "host",
    "io",
    "config",
    "config_values",
    "lf_keys",
    "errors",
)
UPPER = ("train", "sampling", "eval", "serve", "demo", "real", "cli")


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def _imported(path: Path, name: str) -> set[str]:
    """Names ``path`` imports anywhere, functions included (``from a import b`` gives ``a`` and
    ``a.b``), made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[: len(here) - node.level + 1]
            base = ".".join(here + ([base] if base else []))
        out.add(base)
        out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {
        name: {m for m in _imported(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def _with_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: add those edges."""
    out = {}
    for name, deps in graph.items():
        full = set(deps)
        for dep in deps:
            parts = dep.split(".")
            full.update(
                ".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in graph
            )
        full.discard(name)
        out[name] = {d for d in full if not name.startswith(d + ".")}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle():
    graph = _with_parents(_graph(_modules(PACKAGE, "fluid_npu")))
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_upper_ones():
    graph = _graph(_modules(PACKAGE, "fluid_npu"))
    wrong = sorted(
        f"{name} imports {dep}"
        for name, deps in graph.items()
        if _layer(name) in LOWER
        for dep in deps
        if _layer(dep) in UPPER
    )
    assert not wrong, "a lower layer imports an upper one:\n" + "\n".join(wrong)


def test_kernels_import_nothing_of_the_package():
    for name, path in _modules(OPS, "fluid_ops").items():
        deps = _imported(path, name)
        assert not any(d == "fluid_npu" or d.startswith("fluid_npu.") for d in deps), name


def test_every_layer_is_classified():
    """A new top-level module must be placed in a layer (else the rules above miss it)."""
    layers = {_layer(m) for m in _modules(PACKAGE, "fluid_npu")} - {""}
    assert layers <= set(LOWER) | set(UPPER), sorted(layers - set(LOWER) - set(UPPER))


def test_the_check_sees_a_cycle():
    """The cycle finder itself: a cycle is found, a chain is not."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


HEAVY = ["torch", "transformers", "peft", "datasets", "numpy", "yaml", "fastapi", "uvicorn"]
HELP_RUN = """
import contextlib, io, json, sys
from fluid_npu.cli import main
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    assert code == (2 if "--bogus" in argv else 0), (argv, code)
print(json.dumps(sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)))
"""


def test_help_and_a_bad_flag_import_no_heavy_dependency():
    argvs = [["--help"], *([c, "--help"] for c in ("train", "merge", "generate", "eval", "demo",
             "real", "serve", "run-batch")), ["bench", "sampler", "--help"],
             ["bench", "serve", "--help"], ["generate", "--model", "m", "--bogus"]]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", HELP_RUN, json.dumps(argvs), json.dumps(HEAVY)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(run.stdout) == [], run.stdout
    # the lazily exported names import as before; an unknown one is an AttributeError
    import fluid_npu.sampling
    from fluid_npu.data import get_template
    from fluid_npu.eval import run_eval
    from fluid_npu.sampling import FluidForCausalLM, generate

    assert callable(get_template) and callable(run_eval) and callable(generate)
    assert FluidForCausalLM.__name__ == "FluidForCausalLM"
    with pytest.raises(AttributeError, match="no_such_name"):
        fluid_npu.sampling.no_such_name  # noqa: B018
    assert fluid_npu.sampling.scheduler.__name__ == "fluid_npu.sampling.scheduler"  # a submodule
    assert {"generate", "FluidForCausalLM"} <= set(dir(fluid_npu.sampling))
