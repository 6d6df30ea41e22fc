"""``fluid_ops::fluid_attention``, the custom op behind ``fluid_attention``, on CPU.

The op must pass torch's own registration checks (schema, fake implementation, autograd), give
the same output and gradients as the back end it runs, and let ``torch.compile`` trace a tiny
model with the FLUID attention through it — forward and training step — with the eager numbers.
"""

from __future__ import annotations

import pytest
import torch
from test_ops_attention import _qkv, cached_meta, naive_attention, stage1_meta

from fluid_npu.model.attention import configure_attention, forward_hidden, lm_head
from fluid_npu.model.tiny import build_tiny_model
from fluid_ops.attention import _meta_args, fluid_attention, plan_blocks
from fluid_ops.meta import AttnMeta

OP = torch.ops.fluid_ops.fluid_attention.default
METAS = {
    "stage1": lambda: stage1_meta([9, 6], seed=2),
    "cached": lambda: cached_meta([7, 4], [3, 2], seed=1),
}


def test_opcheck():
    """Schema, fake implementation and autograd registration; its AOT checks run the backward."""
    meta = stage1_meta([9, 6], seed=2)
    q, k, v = (t.requires_grad_() for t in _qkv(meta, 4, 2))
    torch.library.opcheck(OP, (q, k, v, *_meta_args(meta), 0.25, "blocked"))


@pytest.mark.parametrize("backend", ["blocked", "reference"])
@pytest.mark.parametrize("layout", METAS)
def test_op_matches_the_back_end_and_its_autograd(backend, layout):
    """The op's output and its (recomputing) backward equal the back end run under autograd."""
    meta = METAS[layout]()
    leaves = [t.requires_grad_() for t in _qkv(meta, 4, 2)]
    grad = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(3))
    direct = fluid_attention(*leaves, meta, 0.3, backend=backend)  # eager autograd path
    want = (direct, *torch.autograd.grad(direct, leaves, grad))
    through_op = OP(*leaves, *_meta_args(meta), 0.3, backend)
    got = (through_op, *torch.autograd.grad(through_op, leaves, grad))
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=name)
    naive = naive_attention(*leaves, meta, 0.3).float()
    torch.testing.assert_close(through_op, naive, atol=2e-5, rtol=1e-4)


def test_inference_mode_metadata_runs_and_reuses_its_plan():
    """Inference tensors carry no version counter; the plan cache still works with them."""
    with torch.inference_mode():
        meta = stage1_meta([12, 8], seed=4)
        q, k, v = _qkv(meta, 4, 2)
        out = fluid_attention(q, k, v, meta, 0.25, backend="blocked")
        length = meta.q_pos.shape[1]
        plan = plan_blocks(meta, length, length, 256)  # the chunk the CPU forward used
        assert plan_blocks(meta, length, length, 256) is plan
    torch.testing.assert_close(out, naive_attention(q, k, v, meta, 0.25).float(), atol=2e-5, rtol=0)


def _tiny_batch(model) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
    meta = stage1_meta([14, 9], k_max=4, seed=6)
    ids = torch.randint(0, model.config.vocab_size, meta.q_pos.shape, generator=torch.Generator())
    return ids, meta.q_pos, meta


def _capture(graphs: list):
    """A torch.compile back end that records each FX graph and runs it as traced."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _op_calls(graphs: list) -> int:
    return sum(n.target is OP for gm in graphs for n in gm.graph.nodes)


def test_torch_compile_traces_a_tiny_model_through_the_op():
    model = build_tiny_model("llama")
    configure_attention(model, "blocked")
    ids, pos, meta = _tiny_batch(model)

    def logits(ids: torch.Tensor, pos: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        return lm_head(model)(forward_hidden(model, ids, pos, meta)[0])

    graphs: list = []
    with torch.no_grad():
        eager = logits(ids, pos, meta)
        compiled = torch.compile(logits, backend=_capture(graphs), fullgraph=False)(ids, pos, meta)
    assert _op_calls(graphs) == model.config.num_hidden_layers  # one opaque call per layer
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_torch_compile_trains_through_the_op():
    """AOT autograd traces the op's backward: a compiled loss has the eager gradients."""
    model = build_tiny_model("llama")
    configure_attention(model, "blocked")
    ids, pos, meta = _tiny_batch(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(ids: torch.Tensor, pos: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        return lm_head(model)(forward_hidden(model, ids, pos, meta)[0]).square().mean()

    eager = torch.autograd.grad(loss(ids, pos, meta), params)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=False)
    got = torch.autograd.grad(compiled(ids, pos, meta), params)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
