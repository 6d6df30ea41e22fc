"""vLLM's ``allowed_token_ids``: only those tokens are generated, each the argmax (or the exact
draw) of the distribution restricted to them — drafts outside the set are simply rejected by the
verify — while the other requests in the batch decode as alone; and the server's checks."""

from __future__ import annotations

import httpx
import pytest
import torch
from test_grammar import model, tok  # noqa: F401  (the tiny Llama and its tokenizer)
from test_serve_http import ScriptedScheduler, serving

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Request, Scheduler

ALLOWED = tuple(ord(c) for c in "abc ")  # byte-level ids


def _engine(model, tok, batch: int) -> Scheduler:  # noqa: F811
    return Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=batch, eos_ids=[],
                     k_max=4)  # fmt: skip


def test_only_the_allowed_tokens_come_each_the_restricted_argmax(tok, model):  # noqa: F811
    prompt = tok("hello world")["input_ids"]
    drawn = SamplingParams(temperature=1.0, seed=5, allowed_token_ids=list(ALLOWED))
    reqs = [
        Request("greedy", prompt, 10, sampling=SamplingParams(allowed_token_ids=ALLOWED)),
        Request("drawn", prompt, 10, sampling=drawn),
        Request("free", prompt, 10),
    ]
    done = run_requests(_engine(model, tok, 3), reqs)
    greedy = done["greedy"].tokens
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + greedy])).logits[0, len(prompt) - 1 : -1]
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
    keep[list(ALLOWED)] = True
    assert greedy == logits.masked_fill(~keep, float("-inf")).argmax(-1).tolist()
    assert set(done["drawn"].tokens) <= set(ALLOWED) and len(done["drawn"].tokens) == 10
    alone = run_requests(_engine(model, tok, 1), [reqs[2]])["free"].tokens
    assert done["free"].tokens == alone and not set(alone) <= set(ALLOWED)  # (unrestricted)
    with pytest.raises(ConfigError, match="allowed_token_ids token 99999 is outside"):
        _engine(model, tok, 1).submit(
            Request("x", prompt, 2, sampling=SamplingParams(allowed_token_ids=(1, 99999)))
        )
    with pytest.raises(ConfigError, match="allowed_token_ids takes token ids >= 0"):
        SamplingParams(allowed_token_ids=(-1,))


def test_the_server_hands_them_to_the_engine_and_refuses_bad_ones():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json={**body, "allowed_token_ids": [98, 97]})
        assert r.status_code == 200
        assert sched.requests[-1].sampling.allowed_token_ids == (97, 98)
        for bad in ([], [-1], [10**6]):
            r = httpx.post(f"{url}/v1/completions", json={**body, "allowed_token_ids": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", bad
