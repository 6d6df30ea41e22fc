"""``fluid bench serve --check-lossless``: every served output that differs from ``ar``'s, judged.

Greedy FLUID decoding commits only the model's AR argmax, so a policy's output may differ from
``ar``'s on the same server build only where a lower precision (bf16, fp16) rounded a near-tie
the other way — a step of another width sums in another order. With the flag the load asks every
request for its token ids (vLLM's ``return_token_ids``: the prompt's and the output's), and after
the servers have stopped each FLUID output that differs from ``ar``'s is judged at its first
differing token as ``sampling/lossless.py`` judges the engine against transformers: the model,
loaded here in float32, scores the shared prefix, and the two tokens are a tie only when their
logits are within two units of the served dtype's resolution of each other and of the maximum.
Anything else is a real mismatch, and the run fails.
"""

from __future__ import annotations

from typing import Any

from fluid_npu.errors import ConfigError

SHOWN = 20  # divergences listed per policy in the report (all are counted)


def served_ids(records: list[dict[str, Any]]) -> list[tuple[list[int], list[int]] | None]:
    """Each request's ``(prompt ids, output ids)``, None where it failed or sent none."""
    return [
        (r["prompt_ids"], r["ids"]) if r["error"] is None and r.get("prompt_ids") else None
        for r in records
    ]


def differing(
    ours: list[tuple[list[int], list[int]] | None], ar: list[tuple[list[int], list[int]] | None]
) -> tuple[int, list[tuple[int, list[int], list[int], list[int]]]]:
    """How many requests both sides answered with ids, and those whose outputs differ:
    ``(request index, prompt ids, ours, ar's)``."""
    checked, rows = 0, []
    for i, (a, b) in enumerate(zip(ours, ar)):
        if a is None or b is None:
            continue
        if a[0] != b[0]:
            raise ConfigError(
                f"request {i} was encoded differently by the two servers; --check-lossless "
                "compares servers of the same model and template"
            )
        checked += 1
        if a[1] != b[1]:
            rows.append((i, a[0], a[1], b[1]))
    return checked, rows


def judge(
    results: dict[str, dict[str, Any]],
    ids: dict[str, list[tuple[list[int], list[int]] | None]],
    load_scorer: Any,
) -> dict[str, dict[str, Any]]:
    """Per FLUID policy: requests checked, outputs that differ from ``ar``'s, near-ties and
    mismatches among them, the first ``SHOWN`` with their request index. ``load_scorer()``:
    the float32 model (called only when some output differs)."""
    import torch

    from fluid_npu.sampling.lossless import compare

    out: dict[str, dict[str, Any]] = {}
    model = None
    for name in results:
        if name == "ar":
            continue
        checked, rows = differing(ids[name], ids["ar"])
        diffs = []
        if rows:
            model = model if model is not None else load_scorer()
            served = str((results[name].get("machine") or {}).get("server", {}).get("dtype"))
            dtype = getattr(torch, served, torch.float32)  # (a tie within its resolution)
            found = compare(model, [r[1] for r in rows], [r[2] for r in rows],
                            [r[3] for r in rows], compute_dtype=dtype)  # fmt: skip
            diffs = [{"request": r[0], **d.to_dict()} for r, d in zip(rows, found)]
        ties = sum(d["tie"] for d in diffs)
        out[name] = {
            "checked": checked,
            "differ": len(diffs),
            "near_ties": ties,
            "mismatches": len(diffs) - ties,
            "divergences": diffs[:SHOWN],
        }
    return out


def describe(name: str, verdict: dict[str, Any]) -> str:
    """One line for the console."""
    head = f"bench serve: {name}: {verdict['checked']} outputs checked against ar's"
    if not verdict["differ"]:
        return f"{head}, all identical"
    return (
        f"{head}: {verdict['differ']} differ, {verdict['near_ties']} a near-tie in fp32, "
        f"{verdict['mismatches']} a real mismatch"
    )
