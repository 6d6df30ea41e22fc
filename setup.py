"""Packaging for fluid-npu: the ``fluid_npu`` package, the ``fluid_ops`` kernel library
(``ops/``) and the ``fluid`` console script.

torch is deliberately not pinned here: on an Ascend host torch and torch_npu are a preinstalled,
matched pair that must not be replaced; ``run_npu.sh`` installs the CPU wheel when torch is absent.
"""

from pathlib import Path

from setuptools import find_packages, setup

DEEPSPEED = ["deepspeed>=0.15"]  # ZeRO; the tests run ZeRO-2 / ZeRO-3 on two CPU processes
QLORA = ["bitsandbytes>=0.46"]  # quantization_bit (QLoRA); >= 0.46 also runs on a CPU
# custom_dataset task key; what CI tests. tenacity: the one package of lm-eval's "api" extra that
# nothing else brings (its local-completions model against `fluid serve`, tested)
EVAL = ["matplotlib>=3.7", "lm-eval>=0.4.13,<0.5", "tenacity>=8"]
REAL = ["gguf>=0.10", "matplotlib>=3.7"]  # `fluid real`: the GGUF model, the report's plots
# `fluid serve` / `fluid bench serve` (httptools and uvloop: uvicorn's fast HTTP parser and event
# loop, picked up when installed)
SERVE = [
    "fastapi>=0.110",
    "uvicorn>=0.30",
    "httptools>=0.6",
    "uvloop>=0.19; sys_platform != 'win32'",
    "prometheus-client>=0.20",
    "httpx>=0.27",
    "xgrammar>=0.2",  # structured outputs (JSON schema, regex, choice, grammar), as vLLM's
]

setup(
    name="fluid-npu",
    version="0.1.0",
    description=(
        "FLUID: adapt a pretrained causal LM into a lossless parallel-decoding diffusion LM "
        "(Strictly Causal Alignment + Elastic Horizons), native on Ascend NPUs, CUDA and CPU."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["fluid_npu", "fluid_npu.*"]), "fluid_ops"],
    package_dir={"fluid_ops": "ops"},
    # the demo's recipes travel with the package (configs/demo_*.yaml link to them in a checkout)
    package_data={"fluid_npu.demo": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<5.25",  # what CI tests: 5.24 renamed past_key_values to cache
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # torch_npu must match the preinstalled torch exactly; CANN comes from Ascend's installer.
        # (sentencepiece: openPangu's PanguTokenizer)
        "npu": [
            "torch_npu",
            "decorator",
            "attrs",
            "psutil",
            "cloudpickle",
            "tornado",
            "sentencepiece",
        ],
        "cuda": ["triton>=3.0"],
        "deepspeed": DEEPSPEED,
        "qlora": QLORA,
        "eval": EVAL,
        "real": REAL,
        "serve": SERVE,
        # everything the test suite exercises (triton is installed by run_npu.sh except on Ascend,
        # where triton-ascend provides it); the openai client drives the live server tests
        "dev": sorted(
            {
                "pytest>=8",
                "pytest-xdist>=3.5",  # run_npu.sh test: one worker per core, up to 4
                "ruff>=0.6",
                "openai>=1.40",
                *DEEPSPEED,
                *QLORA,
                *EVAL,
                *REAL,
                *SERVE,
            }
        ),
    },
    entry_points={"console_scripts": ["fluid=fluid_npu.cli:main"]},
)
