"""``FluidForCausalLM`` called as a transformers user calls a model: the checkpoint's own
generation config, transformers' argument order and spellings, settings at their "off" values,
``from_pretrained``'s transformers-style options, and errors that name the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.model.khead import KHead, KHeadConfig
from fluid_npu.model.loading import fingerprint
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny
from fluid_npu.sampling import generate, pretrained
from fluid_npu.sampling.inputs import PromptError
from fluid_npu.sampling.pretrained import FluidForCausalLM


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture
def fluid(tok):
    return FluidForCausalLM(build_tiny_model("llama", tok, seed=3), tok, tok.mask_token_id)


def _ids(tok, text: str = "hello world") -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def test_the_checkpoints_generation_config_applies_where_a_call_is_silent(tok, fluid):
    # transformers' generate starts from model.generation_config: an instruct checkpoint that
    # samples and sets max_length does so through FluidForCausalLM too; keywords still win
    ids = _ids(tok)
    with torch.inference_mode():
        greedy = fluid.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
            eos_token_id=None, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    gc = fluid.generation_config
    gc.do_sample, gc.temperature, gc.top_k = True, 50.0, 0
    gc.max_length, gc.eos_token_id = ids.shape[1] + 8, None
    outs = {tuple(fluid.generate(ids, seed=s, policy="ar")[0].tolist()) for s in range(6)}
    assert {len(o) for o in outs} == {ids.shape[1] + 8}  # the checkpoint's max_length
    assert len(outs) > 1  # it samples, as the checkpoint asks
    assert fluid.generate(ids, do_sample=False, eos_token_id=[]).tolist() == greedy.tolist()
    # a config passed to the call fills in what the call leaves out, and the checkpoint's what
    # that config leaves unset, as transformers merges them: the checkpoint still samples
    passed = GenerationConfig(max_new_tokens=8)
    outs = {tuple(fluid.generate(ids, passed, seed=s, policy="ar")[0].tolist()) for s in range(6)}
    assert {len(o) for o in outs} == {ids.shape[1] + 8} and len(outs) > 1
    plain = fluid.generate(ids, GenerationConfig(max_new_tokens=8, do_sample=False))
    assert plain.tolist() == greedy.tolist()
    # min_length counts the prompt, as in transformers: EOS (the third greedy token) held back
    eos = int(greedy[0, ids.shape[1] + 2])
    least = GenerationConfig(
        do_sample=False, min_length=ids.shape[1] + 5, max_new_tokens=8, eos_token_id=eos
    )
    with torch.inference_mode():
        want = fluid.model.generate(ids, least, attention_mask=torch.ones_like(ids))
    assert fluid.generate(ids, least).tolist() == want.tolist()
    stopped = fluid.generate(ids, do_sample=False, eos_token_id=eos)  # (EOS as its third token)
    assert stopped.shape[1] == ids.shape[1] + 3 < want.shape[1]
    gc.max_length = ids.shape[1] + 8
    # a setting the checkpoint's config holds that FLUID does not do is named in a warning (the
    # call did not choose it) and not applied; in a config the call passes it is refused; a call
    # that gives the setting itself (its "off" value) or a config of its own hears nothing
    gc.no_repeat_ngram_size = 3
    with pytest.warns(UserWarning, match="the checkpoint's generation_config sets no_repeat"):
        assert fluid.generate(ids, do_sample=False, eos_token_id=[]).tolist() == greedy.tolist()
    with pytest.raises(ConfigError, match="generation_config sets no_repeat_ngram_size"):
        fluid.generate(ids, GenerationConfig(no_repeat_ngram_size=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fluid.generate(ids, no_repeat_ngram_size=0, max_new_tokens=2)
        fluid.generate(ids, GenerationConfig(no_repeat_ngram_size=0), max_new_tokens=2)
    with pytest.warns(UserWarning, match="the checkpoint's generation_config sets no_repeat"):
        fluid.generate(ids, GenerationConfig(), max_new_tokens=2)  # (it leaves the setting unset)


def test_transformers_argument_order_spellings_and_none(tok, fluid):
    ids = _ids(tok)
    kw = dict(policy="ar", eos_token_id=[])
    want = fluid.generate(ids, max_new_tokens=3, **kw)
    assert want.shape[1] == ids.shape[1] + 3
    # (inputs, generation_config) as transformers orders them; inputs= and input_ids= by name;
    # a tokenizer's output unpacked
    assert fluid.generate(ids, GenerationConfig(max_new_tokens=3), **kw).tolist() == want.tolist()
    assert fluid.generate(inputs=ids, max_new_tokens=3, **kw).tolist() == want.tolist()
    mask = torch.ones_like(ids)
    for call in (
        lambda: fluid.generate(ids, GenerationConfig(max_new_tokens=3), attention_mask=mask, **kw),
        lambda: fluid.generate(ids, mask, 3, **kw),  # (inputs, mask, max_new_tokens): this class's
    ):
        assert call().tolist() == want.tolist()
    enc = tok(["hello world"], return_tensors="pt")
    assert fluid.generate(**enc, max_new_tokens=3, **kw).tolist() == want.tolist()
    with pytest.raises(ConfigError, match="inputs or input_ids, not both"):
        fluid.generate(ids, input_ids=ids, max_new_tokens=3)
    # a sampling keyword given as None is transformers' "off" (its generate applies the call's
    # keywords last, None included): not the checkpoint's setting, not top-k 50
    seen: dict = {}
    real = pretrained.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    fluid.model.generation_config.update(do_sample=True, temperature=0.05, top_k=7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrained, "generate", spy)
        out = fluid.generate(
            ids, max_new_tokens=3, do_sample=True, temperature=None, top_p=None, min_p=None,
            top_k=None, repetition_penalty=None, seed=1, **kw,
        )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + 3
        assert (seen["temperature"], seen["top_k"], seen["top_p"], seen["min_p"]) == (1, 0, 1, 0)
        greedy = fluid.generate(ids, max_new_tokens=3, do_sample=None, **kw)  # (transformers':
        assert greedy.tolist() == want.tolist()  # greedy, whatever the checkpoint says)
    fluid.model.generation_config.update(do_sample=False, temperature=None, top_k=None)
    with pytest.raises(ConfigError, match=r"inputs_embeds is not supported.*pass input_ids"):
        fluid.generate(inputs_embeds=torch.zeros(1, 2, 8), max_new_tokens=2)
    # a whole number of tokens may come as a float, as transformers takes it; a fraction may not
    assert fluid.generate(ids, max_new_tokens=3.0, **kw).tolist() == want.tolist()
    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number"):
        fluid.generate(ids, max_new_tokens=2.5, **kw)


def test_settings_at_their_off_value_pass_and_others_are_refused_by_name(tok, fluid):
    ids = _ids(tok)
    kw = dict(max_new_tokens=2, policy="ar", eos_token_id=[])
    want = fluid.generate(ids, **kw)
    off = dict(
        use_cache=True, num_beams=1, num_return_sequences=1, return_dict_in_generate=False,
        output_scores=False, bos_token_id=tok.bos_token_id, streamer=None, synced_gpus=False,
        num_assistant_tokens=20, num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.4, guidance_scale=1.0,  # (transformers' defaults)
    )  # fmt: skip
    assert fluid.generate(ids, **off, **kw).tolist() == want.tolist()
    for name, value, hint in (
        ("num_beams", 2, "num_beams=2"),
        ("output_scores", True, "logprobs=True"),
        ("num_return_sequences", 2, "repeat the prompt"),
        ("no_repeat_ngram_size", 3, "no_repeat_ngram_size=3"),
    ):
        with pytest.raises(ConfigError, match=hint):
            fluid.generate(ids, **{name: value}, **kw)
    with pytest.raises(TypeError, match="max_new_token"):  # a misspelling is Python's TypeError
        fluid.generate(ids, max_new_token=2)


def test_input_errors_name_the_prompt_and_the_room_left(tok):
    model = build_tiny_model("llama", tok, seed=3, max_position_embeddings=32)
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    ids = _ids(tok, "a" * 20)
    with pytest.raises(PromptError, match="prompt 0 has 20 tokens and max_new_tokens is 64") as e:
        fluid.generate(ids, max_new_tokens=64)
    assert "room for at most 12 new tokens" in str(e.value)
    # with no length anywhere, transformers' 20 new tokens, at most the context's room
    for prompt in (_ids(tok, "ab"), ids):
        with torch.inference_mode():
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
        got = fluid.generate(prompt, do_sample=False)
        assert got.tolist() == want.tolist()
        assert got.shape[1] == min(prompt.shape[1] + 20, 32)
    with pytest.raises(ConfigError, match=r"max_length 40 is past the model.s context \(32"):
        fluid.generate(ids, max_length=40)
    # a length the checkpoint's config gives (the whole context) decodes: capped at the room
    for length in ("max_new_tokens", "max_length"):
        model.generation_config = GenerationConfig(**{length: 32})
        assert fluid.generate(ids, do_sample=False, eos_token_id=[]).shape[1] == 32
    model.generation_config = GenerationConfig()
    with pytest.raises(PromptError, match=r"prompt 1: token ids must lie in \[0, "):
        fluid.generate([[5, 6], [7, len(tok) + 3]], max_new_tokens=2)
    with pytest.raises(PromptError, match=r"unpack it: generate\(\*\*tokenizer"):
        fluid.generate(tok(["ab"], return_tensors="pt"), max_new_tokens=2)
    with pytest.raises(PromptError, match="tokenize it first"):
        fluid.generate("ab", max_new_tokens=2)


def test_numbers_come_in_any_numeric_type_as_transformers_takes_them(tok, fluid):
    # a whole temperature / top_p (a checkpoint's generation_config.json holds "temperature": 1),
    # numpy scalars, a whole float top_k: the same output as the floats and ints
    ids = _ids(tok)
    kw = dict(max_new_tokens=6, do_sample=True, policy="ar", eos_token_id=[])
    want = fluid.generate(ids, temperature=1.0, top_p=1.0, min_p=0.0, top_k=2, seed=1, **kw)
    got = fluid.generate(
        ids, temperature=1, top_p=1, min_p=np.float64(0), top_k=2.0, seed=np.int64(1), **kw
    )
    assert got.tolist() == want.tolist()
    fluid.generation_config.temperature, fluid.generation_config.top_p = 1, 1
    assert fluid.generate(ids, top_k=2, seed=1, **kw).tolist() == want.tolist()
    for name, value, message in (
        ("top_k", 2.5, "top_k must be a whole number, got 2.5"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("min_new_tokens", 2.5, "min_tokens must be a whole number"),
    ):
        with pytest.raises(ConfigError, match=message):
            fluid.generate(ids, **{**kw, name: value})


def test_prompts_ids_and_arguments_in_the_shapes_users_pass_them(tok, fluid):
    ids = _ids(tok)
    kw = dict(max_new_tokens=3, policy="ar")
    want = fluid.generate(ids, **kw)
    # one prompt as a flat list (a tokenizer's output without return_tensors) or a numpy row
    assert fluid.generate(ids[0].tolist(), **kw).tolist() == want.tolist()
    assert fluid.generate(np.array(ids[0]), **kw).tolist() == want.tolist()
    assert fluid.generate(**tok("hello world"), **kw).tolist() == want.tolist()
    assert fluid.generate(ids[0].tolist(), max_length=ids.shape[1] + 3).tolist() == want.tolist()
    # EOS / pad / MASK ids as tensors and numpy integers, as transformers takes them
    eos = int(want[0, -2])
    stop = fluid.generate(ids, max_new_tokens=3, policy="ar", eos_token_id=eos)
    for given in (torch.tensor(eos), np.int64(eos), torch.tensor([eos])):
        assert fluid.generate(ids, eos_token_id=given, **kw).tolist() == stop.tolist()
    out = generate(fluid.model, np.int64(tok.mask_token_id), ids, policy="ar", max_new_tokens=3)
    assert out.sequences.tolist() == want.tolist()
    # api.generate takes None for transformers 5's unset settings
    none = dict(temperature=None, top_p=None, min_p=None, repetition_penalty=None)
    out = generate(fluid.model, tok, ids, policy="ar", max_new_tokens=3, **none)
    assert out.sequences.tolist() == want.tolist()
    for call, message in (
        (lambda: fluid.generate(ids, eos_token_id="</s>", **kw), "eos_token_id takes a token id"),
        (lambda: fluid.generate(ids, pad_token_id=1.5, **kw), "pad_token_id takes a token id"),
        (lambda: fluid.generate(ids, stop_strings=5, **kw), "stop_strings takes a string"),
        (lambda: fluid.generate(ids, tokenizer="gpt2", **kw), "must be a loaded tokenizer"),
        (lambda: fluid.generate(ids, generation_config={"top_k": 2}), "takes a transformers Gen"),
        (lambda: generate(fluid, tok, ids), "for a FluidForCausalLM call its own .generate"),
    ):
        with pytest.raises(ConfigError, match=message):
            call()


def test_padding_that_cannot_be_told_from_the_prompt_warns(tok, fluid):
    # the usual recipe pad = EOS, a left-padded batch, no attention mask: transformers warns that
    # the mask cannot be inferred; so does FLUID, and it reads the padding as prompt as it does
    eos = tok.eos_token_id
    ids = torch.tensor([[eos, eos, 104, 105], [104, 105, 106, 107]])
    kw = dict(max_new_tokens=2, policy="ar", eos_token_id=eos, pad_token_id=eos)
    with pytest.warns(UserWarning, match="pass the attention_mask"):
        fluid.generate(ids, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fluid.generate(ids, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), **kw)


def test_from_pretrained_takes_transformers_spellings(tmp_path, tok, monkeypatch):
    base = save_tiny(tmp_path / "model", "llama", mask_token=True)
    fluid = FluidForCausalLM.from_pretrained(base, torch_dtype="bfloat16", device_map="cpu")
    assert fluid.dtype == torch.bfloat16 and fluid.device == torch.device("cpu")
    assert fluid.config is fluid.model.config and fluid.to("cpu") is fluid
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    fluid = FluidForCausalLM.from_pretrained(base, chat_template=template)
    assert fluid.tokenizer.chat_template == template.read_text()
    for kwargs, message in (
        (dict(chat_template=tmp_path / "missing.jinja"), "chat_template"),
        (dict(dtype="float64"), "^dtype 'float64' is not a compute dtype"),
        (dict(dtype="bfloat16", torch_dtype="bfloat16"), "not both"),
        (dict(device_map={"": 0}), "pass device="),
        (dict(device="bogus"), "'bogus' is not a device; give cpu, cuda"),
        (dict(device="cuda:x"), "the index after cuda: is a number"),
    ):
        with pytest.raises(ConfigError, match=message):
            FluidForCausalLM.from_pretrained(base, **kwargs)
    from fluid_npu import device

    monkeypatch.setattr(device, "is_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda:0' was requested but is not available"):
        FluidForCausalLM.from_pretrained(tmp_path / "not_loaded", device="cuda:0")
    with pytest.raises(CheckpointError, match="is a file; give the model's directory"):
        FluidForCausalLM.from_pretrained(base / "config.json")
    # a checkpoint with pickle weights only loads once the caller says it trusts them
    weights = base / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), base / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"allow_pickle=True"):
        FluidForCausalLM.from_pretrained(base)
    assert FluidForCausalLM.from_pretrained(base, allow_pickle=True).mask_id == tok.mask_token_id


def test_it_is_a_module_whose_call_is_the_decoders_forward(tok, fluid):
    """What a transformers user does with a model works on the FLUID one: its mode, parameters,
    dtype and device moves reach the decoder (and a K-head), and calling it gives the AR
    logits; ``logprobs_mode`` reaches ``generate`` (``output_logits``' counterpart)."""
    head = KHead(fluid.model.config.hidden_size, 4)
    fluid.khead = head
    assert isinstance(fluid, torch.nn.Module) and not fluid.training  # (the decoder's mode)
    assert fluid.train() is fluid and fluid.model.training and head.training
    fluid.eval()
    assert not fluid.model.training and not head.training
    names = {n for n, _ in fluid.named_parameters()}
    assert any(n.startswith("model.") for n in names) and any(n.startswith("khead.") for n in names)
    ids = _ids(tok)
    with torch.inference_mode():
        torch.testing.assert_close(fluid(ids).logits, fluid.model(ids).logits, rtol=0, atol=0)
        raw = fluid.generate(ids, max_new_tokens=3, logprobs=True, logprobs_mode="raw_logits")
        logits = fluid(raw).logits[0, ids.shape[1] - 1 : -1]
    new = raw[0, ids.shape[1] :].tolist()
    want = [float(logits[i, t]) for i, t in enumerate(new)]
    assert fluid.last_output.logprobs[0] == pytest.approx(want, abs=1e-4)
    assert fluid.to(torch.float64) is fluid and fluid.dtype == torch.float64
    assert next(head.parameters()).dtype == torch.float64


def test_a_model_in_train_mode_decodes_as_in_eval(tok):
    """Dropout never reaches decoding: ``generate`` runs the decoder (and K-head) in eval mode
    on both loops and gives the mode back, so ``fluid.train()`` between calls changes nothing."""
    fluid = FluidForCausalLM(
        build_tiny_model("llama", tok, seed=3, attention_dropout=0.5), tok, tok.mask_token_id
    )
    ids = _ids(tok, "the quick brown fox")
    for loop in ("fused", "reference"):
        fluid.eval()
        want = fluid.generate(ids, max_new_tokens=12, loop=loop, eos_token_id=None)
        fluid.train()
        for _ in range(2):
            got = fluid.generate(ids, max_new_tokens=12, loop=loop, eos_token_id=None)
            assert torch.equal(got, want), loop
        assert fluid.training and all(m.training for m in fluid.model.modules())


class _Recorder:
    """A transformers streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.puts: list[list[list[int]]] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.view(1, -1).tolist())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("loop", ["fused", "reference"])
def test_a_streamer_gets_what_transformers_streams(tok, fluid, loop):
    # the prompt first, then the committed tokens step by step, then end(): concatenated, the same
    # stream transformers' greedy generate hands it, EOS included
    from transformers import TextIteratorStreamer

    ids = _ids(tok)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        greedy = fluid.model.generate(
            ids, attention_mask=torch.ones_like(ids), eos_token_id=None, **kw
        )
    eos = int(greedy[0, ids.shape[1] + 6])  # (EOS as its seventh new token)
    theirs, ours = _Recorder(), _Recorder()
    with torch.inference_mode():
        want = fluid.model.generate(
            ids, attention_mask=torch.ones_like(ids), eos_token_id=eos, streamer=theirs, **kw
        )
    got = fluid.generate(ids, eos_token_id=eos, streamer=ours, loop=loop, **kw)
    assert got.tolist() == want.tolist() and got[0, -1] == eos
    flat = [[t for put in rec.puts[1:] for t in put[0]] for rec in (theirs, ours)]
    assert ours.puts[0] == theirs.puts[0] == ids.tolist()
    assert flat[0] == flat[1] == got[0, ids.shape[1] :].tolist()
    assert len(ours.puts) > 2  # (as tokens commit, not once at the end)
    assert ours.ends == theirs.ends == 1
    # a TextIteratorStreamer read from another thread: the text of the new tokens
    text = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = fluid.generate(ids, streamer=text, loop=loop, eos_token_id=[], **kw)
    assert "".join(text) == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_streamer_errors_name_the_fix_and_the_streamer_still_ends(tok, fluid):
    ids = _ids(tok)
    with pytest.raises(ConfigError, match=r"streamer reads one sequence.*2 prompts.*stream="):
        fluid.generate(ids.repeat(2, 1), max_new_tokens=2, streamer=_Recorder())
    with pytest.raises(ConfigError, match=r"put / end.*got object"):
        fluid.generate(ids, max_new_tokens=2, streamer=object())
    with pytest.raises(ConfigError, match="a streamer or stream="):
        fluid.generate(ids, max_new_tokens=2, streamer=_Recorder(), stream=lambda r, t: None)
    rec = _Recorder()  # decoding refused after the prompt went out: end() all the same
    with pytest.raises(PromptError, match="max_new_tokens"):
        fluid.generate(ids, max_new_tokens=10**6, streamer=rec)
    assert rec.ends == 1
    rec = _Recorder()  # refused before anything went out (a reader waits all the same)
    with pytest.raises(ConfigError, match="max_length 1000000 is past"):
        fluid.generate(ids, max_length=10**6, streamer=rec)
    assert rec.ends == 1 and rec.puts == []


def test_transformers_pipeline_and_model_methods_take_it(tok, fluid):
    # pipeline("text-generation") over FluidForCausalLM gives what it gives over the bare decoder
    # (greedy: the AR argmax), one prompt or a batch
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # (its "not supported for text-generation" class-name list)
    try:
        ours = pipeline("text-generation", model=fluid, tokenizer=tok)
        theirs = pipeline("text-generation", model=fluid.model, tokenizer=tok)
    finally:
        hf_logging.set_verbosity_warning()
    assert "'model': 'FluidForCausalLM'" in repr(ours)
    kw = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    chat = [{"role": "user", "content": "hello"}]
    for prompt, extra in (
        ("hello world", {}), (["hello world", "lo"], {"batch_size": 2}), (chat, {})
    ):  # fmt: skip
        assert ours(prompt, **kw, **extra) == theirs(prompt, **kw, **extra)
    # transformers' model methods a user reaches for
    assert FluidForCausalLM.can_generate()
    assert fluid.num_parameters() == fluid.model.num_parameters()  # (no K-head attached)
    assert fluid.get_input_embeddings() is fluid.model.get_input_embeddings()
    assert fluid.get_output_embeddings() is fluid.model.get_output_embeddings()
    fluid.generation_config = GenerationConfig(max_new_tokens=3, do_sample=False)
    assert fluid.model.generation_config.max_new_tokens == 3
    assert fluid.generate(_ids(tok), eos_token_id=[]).shape[1] == _ids(tok).shape[1] + 3
    head = KHead(fluid.model.config.hidden_size, 4)
    with_head = FluidForCausalLM(fluid.model, tok, tok.mask_token_id, head)
    counted = sum(p.numel() for p in head.parameters())
    assert with_head.num_parameters() == fluid.model.num_parameters() + counted


def test_save_pretrained_of_a_model_built_in_memory_reloads_the_same(tmp_path, tok, fluid):
    ids = _ids(tok)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=[])
    want = fluid.generate(ids, **kw)
    fluid.save_pretrained(tmp_path / "saved")
    again = FluidForCausalLM.from_pretrained(tmp_path / "saved")
    assert again.mask_id == fluid.mask_id and again.khead is None
    assert again.generate(ids, **kw).tolist() == want.tolist()
    assert not list(tmp_path.glob(".*"))  # (the staging directory renamed away)
    for call, words in (
        (lambda: fluid.save_pretrained(tmp_path / "saved"), "exists and is not empty"),
        (lambda: fluid.save_pretrained(tmp_path / "b", push_to_hub=True), "upload_folder"),
        (lambda: fluid.save_pretrained(tmp_path / "c", max_shard_size="5GiB"), "max_shard_size"),
    ):
        with pytest.raises((CheckpointError, ConfigError), match=words):
            call()
    head = KHead(fluid.model.config.hidden_size, 4)  # (a head without its config: no provenance)
    with_head = FluidForCausalLM(fluid.model, tok, tok.mask_token_id, head)
    with pytest.raises(ConfigError, match="KHeadConfig"):
        with_head.save_pretrained(tmp_path / "d")
    # a head recorded as trained on another network would not load on the saved weights
    hidden, fp = fluid.model.config.hidden_size, fingerprint(fluid.model)
    with_head.khead_config = KHeadConfig(hidden, 4, base_fingerprint="another")
    with pytest.raises(ConfigError, match="another network"):
        with_head.save_pretrained(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    with_head.khead_config = KHeadConfig(hidden, 4, base_fingerprint=fp)  # (its own: saved)
    with_head.save_pretrained(tmp_path / "headed")
    assert FluidForCausalLM.from_pretrained(tmp_path / "headed").khead is not None


def test_save_pretrained_into_the_working_directory(tmp_path, tok, fluid, monkeypatch):
    # "." (an empty folder the process works in) is filled in place, and stays the process's
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    fluid.save_pretrained(".")
    assert Path.cwd().is_dir() and (Path.cwd() / "fluid_model.json").is_file()
    ids = _ids(tok)
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=[])
    assert FluidForCausalLM.from_pretrained(".").generate(ids, **kw).tolist() == (
        fluid.generate(ids, **kw).tolist()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # (no staging folder left)
