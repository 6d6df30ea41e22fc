"""The engine's lean decoder forward (``sampling/lean.py``) is the module path's arithmetic exactly.

Every forward of a decode — chunked prefill, drafting steps with candidate blocks, AR steps — gives
bit-identical hidden states with and without it, for each architecture it takes (Llama with biases
as openPangu has, Qwen2, Qwen3, Mistral), in fp32 and bf16. Models it cannot reproduce exactly
(a PEFT-wrapped projection, a forward hook, a replaced MLP forward) keep the module path.
"""

from __future__ import annotations

import pytest
import torch

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import step as step_module
from fluid_npu.sampling.lean import LeanDecoder
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.scheduler import Request, Scheduler

TEXTS = ("hello world", "a", "the quick brown fox jumps", "xyz over the lazy dog" * 3)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _decode(
    model, tok, lean: bool, monkeypatch, compile: bool = False
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Every request's tokens and every forward's hidden states, with or without the lean path."""
    hidden: list[torch.Tensor] = []
    forward = step_module.StepMixin._forward

    def record(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        hidden.append(out.clone())
        return out

    monkeypatch.setattr(step_module.StepMixin, "_forward", record)
    sched = Scheduler(
        model,
        tok.mask_token_id,
        policy="fixed:3",
        max_batch=3,
        prefill_chunk=16,  # the long prompt takes several chunks
        eos_ids=[],
        k_max=4,
        adaptive=False,  # the same shapes in both runs (the budget follows measured time)
        lean=lean,
        compile=compile,
    )
    assert (sched._lean is not None) is lean
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    results = run_requests(sched, [Request(str(i), p, 8 + i) for i, p in enumerate(prompts)])
    sched.close()
    monkeypatch.setattr(step_module.StepMixin, "_forward", forward)
    return [results[str(i)][0] for i in range(len(prompts))], hidden


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 512}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("arch", "extra"),
    [("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}), ("qwen3", {}),
     ("mistral", {}),
     # what real checkpoints vary: head_dim apart from hidden / heads, another activation, the
     # RoPE scalings of Llama 3 and YaRN (its attention factor rides in cos / sin), tied heads
     ("llama", {"head_dim": 32, "hidden_act": "gelu_pytorch_tanh", "rope_parameters": LLAMA3_ROPE}),
     ("qwen3", {"rope_parameters": YARN_ROPE, "tie_word_embeddings": True})],
)  # fmt: skip
def test_lean_forward_is_bit_identical_to_the_modules(tok, arch, extra, dtype, monkeypatch):
    model = build_tiny_model(arch, tok, seed=11, **extra)
    with torch.no_grad():  # norms start at 1 and biases at 0: make every one of them count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.to(dtype)
    tokens, hidden = _decode(model, tok, True, monkeypatch)
    ref_tokens, ref_hidden = _decode(model, tok, False, monkeypatch)
    assert tokens == ref_tokens
    assert len(hidden) == len(ref_hidden) > len(TEXTS)
    for ours, theirs in zip(hidden, ref_hidden):
        assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_a_compiled_lean_step_is_bit_identical_to_the_compiled_modules_in_bf16(tok, monkeypatch):
    """Compiled, the lean forward keeps the modeling code's RoPE form: inductor fuses the eager
    restatement (a roll times a sign-folded sine) otherwise, and in bf16 the bits moved."""
    model = build_tiny_model("qwen2", tok, seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.to(torch.bfloat16)
    tokens, hidden = _decode(model, tok, True, monkeypatch, compile=True)
    ref_tokens, ref_hidden = _decode(model, tok, False, monkeypatch, compile=True)
    assert tokens == ref_tokens and len(hidden) == len(ref_hidden)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(hidden, ref_hidden))


def test_restated_norms_are_the_modules_and_follow_a_replaced_forward(tok):
    """transformers' RMSNorm runs restated (fewer ops, the same bits); a forward replaced on the
    instance or the class after the engine was made is followed."""
    model = build_tiny_model("qwen3", tok, seed=3)
    lean = LeanDecoder.of(model)
    norms = [model.model.norm, model.model.layers[0].self_attn.q_norm]
    assert all(id(n) in lean._stock for n in norms)
    with torch.no_grad():
        for n in norms:
            n.weight.add_(torch.randn_like(n.weight))
    for dtype in (torch.float32, torch.bfloat16):
        for n in norms:
            n.to(dtype)
            x = torch.randn(2, 3, n.weight.shape[0], dtype=dtype) * 5
            assert torch.equal(lean._norm(n, x), n.forward(x))
    norm = norms[0]
    x = torch.randn(2, 3, norm.weight.shape[0], dtype=norm.weight.dtype)
    norm.forward = lambda h: h * 2
    assert torch.equal(lean._norm(norm, x), x * 2)
    del norm.forward
    cls = type(norm)
    original = cls.forward
    try:
        cls.forward = lambda self, h: h * 3
        assert torch.equal(lean._norm(norm, x), x * 3)
    finally:
        cls.forward = original


def test_models_it_cannot_reproduce_keep_the_module_path(tok):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama", tok, seed=1)
    assert LeanDecoder.of(model) is not None

    hooked = build_tiny_model("llama", tok, seed=1)
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert LeanDecoder.of(hooked) is None
    handle.remove()
    assert LeanDecoder.of(hooked) is not None

    replaced = build_tiny_model("qwen3", tok, seed=1)
    mlp = replaced.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(x[..., : mlp.intermediate_size])  # as a fused MLP would
    assert LeanDecoder.of(replaced) is None

    lora = get_peft_model(
        build_tiny_model("mistral", tok, seed=1),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert LeanDecoder.of(lora) is None
    assert LeanDecoder.of(lora.merge_and_unload()) is not None


def _refused(model) -> bool:
    return LeanDecoder.of(model) is None


def test_what_would_change_the_modules_arithmetic_is_refused(tok, monkeypatch):
    """Each of these makes the module path compute something the lean forward would not."""
    import functools

    from torch.nn.modules import module as nn_module
    from transformers.models.llama import modeling_llama

    # a projection whose forward is replaced on the instance (what tensor parallelism installs)
    model = build_tiny_model("llama", tok, seed=1)
    proj = model.model.layers[1].self_attn.q_proj
    proj.forward = lambda x: torch.nn.functional.linear(x, proj.weight) * 2
    assert _refused(model)

    # a global forward hook
    handle = nn_module.register_module_forward_hook(lambda *a: None)
    try:
        assert _refused(build_tiny_model("llama", tok, seed=1))
    finally:
        handle.remove()
    assert not _refused(build_tiny_model("llama", tok, seed=1))

    # the modeling module's rotary replaced (as the NPU fused layers do, for every model)
    original = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(
        modeling_llama, "apply_rotary_pos_emb", functools.wraps(original)(lambda *a, **k: None)
    )
    assert _refused(build_tiny_model("llama", tok, seed=1))
    assert not _refused(build_tiny_model("qwen3", tok, seed=1))  # its modeling module keeps its own
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)

    # a compiled submodule (inductor does not round intermediates as eager does)
    model = build_tiny_model("llama", tok, seed=1)
    model.model.layers[0].mlp.compile()
    assert _refused(model)

    # a same-named subclass with its own forward (remote code reusing the name)
    class LlamaDecoderLayer(modeling_llama.LlamaDecoderLayer):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states * 2, *args, **kwargs)

    model = build_tiny_model("llama", tok, seed=1)
    model.model.layers[0].__class__ = LlamaDecoderLayer
    assert _refused(model)

    # a layer whose cache index is not its place (the modules index the cache by layer_idx)
    model = build_tiny_model("llama", tok, seed=1, num_hidden_layers=3)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[1], layers[1]])
    assert _refused(model)


def test_inert_output_capturing_hooks_do_not_refuse(tok):
    """transformers installs output-capturing hooks on the first ``output_hidden_states`` call;
    they do nothing unless outputs are captured, so the lean forward still applies."""
    model = build_tiny_model("qwen2", tok, seed=1)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules())  # the hooks are there
    assert not _refused(model)


def test_an_unmerged_adapter_decodes_through_the_modules(tok):
    """A PEFT model's LoRA must count: the engine falls back and matches the merged model."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model("llama", tok, seed=2)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the output
    lora.eval()
    prompt = tok("the quick brown fox")["input_ids"]

    def run(model):
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[])
        out = run_requests(sched, [Request("r", prompt, 12)])["r"][0]
        sched.close()
        return out

    with torch.no_grad():
        unmerged = run(lora)
        merged = run(lora.merge_and_unload())
    plain = run(build_tiny_model("llama", tok, seed=2))
    assert unmerged == merged != plain


def test_generate_takes_the_lean_forward_and_leaves_the_attention_alone(tok, monkeypatch):
    """``generate`` (and so every CLI and the server) runs the lean forward by default, and the
    model keeps its attention implementation: nothing is swapped in for the call."""
    from fluid_npu.sampling import generate

    calls = []
    lean_call = LeanDecoder.__call__

    def counted(self, *args):
        calls.append(args[0].shape)
        return lean_call(self, *args)

    monkeypatch.setattr(LeanDecoder, "__call__", counted)
    model = build_tiny_model("qwen3", tok, seed=4)
    swaps = []
    set_attn = type(model).set_attn_implementation
    monkeypatch.setattr(
        type(model),
        "set_attn_implementation",
        lambda self, impl: (swaps.append(impl), set_attn(self, impl))[1],
    )
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    out = generate(model, tok, ids, policy="fixed:3", max_new_tokens=10, eos_token_id=[])
    assert len(out.new_tokens[0]) == 10
    assert calls and all(len(shape) == 2 for shape in calls)  # prefill and every decode step
    assert out.stats.prefill_forwards + out.stats.decode_forwards == len(calls)
    assert swaps == [] and model.config._attn_implementation == "sdpa"


def test_lean_and_module_engines_keep_separate_draft_budgets(tok):
    """A budget holds measured step times, which differ between the two forwards: engines share
    one only when they run the same forward."""
    model = build_tiny_model("llama", tok, seed=1)
    budgets: dict = {}

    def budget(lean: bool):
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", budgets=budgets, lean=lean)
        sched.close()
        return sched.budget

    assert budget(True) is budget(True)
    assert budget(False) is budget(False)
    assert budget(True) is not budget(False) and len(budgets) == 2
