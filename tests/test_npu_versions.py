"""torch_npu across releases, tested through the contract: the inference attention's scale is
``scale_value`` in torch_npu 6.0.x and ``scale`` from 7.0. The spelling is read from the installed
op — its signature, its docstring, or only by trying — and both give the same attention. On an
Ascend host the real kernels are checked against the float64 reference as well."""

from __future__ import annotations

import pytest
import torch

from fluid_npu import device as devices

# ---------------------------------------------------------------------------------------------
# torch_npu argument names across versions
# ---------------------------------------------------------------------------------------------

PROTOTYPE = (  # the op's documented prototype, abridged, in each release's spelling
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? "
    "pse_shift=None, Tensor? atten_mask=None, Tensor? dequant_scale1=None, Tensor? "
    "antiquant_scale=None, int num_heads=1, float {}=1.0, int pre_tokens=2147483647, str "
    'input_layout="BSH", int num_key_value_heads=0, int sparse_mode=0) -> (Tensor, Tensor)'
)


def _torch_npu_release(spelling: str, exposes: str):
    """A CPU torch_npu whose inference op takes ``scale`` (7.x) or ``scale_value`` (6.0.x) and
    tells it through its Python ``signature``, only its ``docstring`` (a builtin), or ``nothing``.
    """
    from test_ops_attention import FakeTorchNpu as FakeAttentionNpu

    class Release6(FakeAttentionNpu):
        def npu_fused_infer_attention_score(
            self, query, key, value, *, atten_mask=None, num_heads=1, scale_value=1.0,
            input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        ):  # fmt: skip
            return super().npu_fused_infer_attention_score(
                query, key, value, atten_mask=atten_mask, num_heads=num_heads, scale=scale_value,
                input_layout=input_layout, num_key_value_heads=num_key_value_heads,
                sparse_mode=sparse_mode,
            )  # fmt: skip

    fake = Release6() if spelling == "scale_value" else FakeAttentionNpu()
    op = fake.npu_fused_infer_attention_score
    if exposes != "signature":

        class Builtin:  # no usable signature, like an op bound from C++
            __name__ = "npu_fused_infer_attention_score"
            __doc__ = PROTOTYPE.format(spelling) if exposes == "docstring" else None

            def __call__(self, *args, **kwargs):
                return op(*args, **kwargs)

        wrapper = Builtin()
        fake.__dict__["npu_fused_infer_attention_score"] = wrapper
    return fake


@pytest.mark.parametrize("exposes", ["signature", "docstring", "nothing"])
@pytest.mark.parametrize("spelling", ["scale", "scale_value"])
def test_the_inference_scale_keyword_follows_the_installed_torch_npu(
    monkeypatch, spelling, exposes
):
    import math

    from test_ops_attention import _qkv, cached_meta, naive_attention

    from fluid_ops import attention_npu, dispatch

    fake = _torch_npu_release(spelling, exposes)
    monkeypatch.setattr(dispatch, "load_torch_npu", lambda: fake)
    monkeypatch.setattr(attention_npu, "_KEYWORDS", {})
    op = fake.npu_fused_infer_attention_score
    told = attention_npu.keyword_for(op, attention_npu.INFER_SCALE)
    assert told == (None if exposes == "nothing" else spelling)
    meta = cached_meta([12, 7, 3], [4, 2, 4], seed=3)
    q, k, v = _qkv(meta, 4, 2, d=32, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(32)
    for _ in range(2):  # the second call reuses the resolved spelling
        fake.calls.clear()
        with torch.no_grad():
            out = attention_npu.npu_attention(q, k, v, meta, scale)
        torch.testing.assert_close(
            out.double(), naive_attention(q, k, v, meta, scale), atol=2e-2, rtol=2e-2
        )
        (call,) = fake.calls  # one successful launch: a refused spelling never reaches the kernel
        assert call[0] == "npu_fused_infer_attention_score"
        assert call[2]["scale"] == pytest.approx(scale)  # not the op's default of 1.0
    assert list(attention_npu._KEYWORDS.values()) == [spelling]


def test_an_op_that_takes_no_known_spelling_says_so():
    from fluid_ops import attention_npu

    def op(query, *, softmax_scale=1.0):
        return query

    assert attention_npu.keyword_for(op, attention_npu.INFER_SCALE) is None
    with pytest.raises(TypeError, match="takes none of"):
        attention_npu.call_renamed(
            lambda x, **kw: op(x, **kw), ("scale", "scale_value"), 1, (0,), {}
        )


@pytest.mark.skipif(
    not devices.is_npu_available(), reason="real-op check: this host has no NPU (the contract "
    "tests above cover the arguments)"
)  # fmt: skip
def test_the_installed_torch_npu_attention_matches_the_reference():
    """On an Ascend host: the real kernels (training and cached inference) against float64."""
    import math

    from test_ops_attention import _qkv, cached_meta, naive_attention, stage1_meta

    from fluid_ops import attention_npu

    device = devices.current().device
    for meta, grad in (
        (stage1_meta([30, 22, 9], seed=2), True),
        (cached_meta([12, 7], [4, 2]), False),
    ):
        q, k, v = _qkv(meta, 4, 2, d=64, dtype=torch.bfloat16)
        scale = 1 / math.sqrt(64)
        want = naive_attention(q, k, v, meta, scale)
        moved = type(meta)(
            *(getattr(meta, f).to(device) for f in ("q_pos", "q_anchor", "k_pos", "k_anchor")),
            meta.n_main,
        )
        with torch.set_grad_enabled(grad):
            got = attention_npu.npu_attention(
                q.to(device), k.to(device), v.to(device), moved, scale
            )
        torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)
