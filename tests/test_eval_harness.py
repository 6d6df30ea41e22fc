"""The lm-evaluation-harness model type ``fluid``: log-likelihoods equal a direct AR computation,
``generate_until`` equals the sampler, and ``simple_evaluate`` on a local task file (no hub) gives
the accuracy ``run_eval`` computes on the same rows."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.tasks import TaskManager
from test_eval import ROWS, bigram_model, write_jsonl

from fluid_npu.errors import ConfigError
from fluid_npu.eval import run_eval
from fluid_npu.eval.harness import FluidLM
from fluid_npu.eval.lm_eval_task import write_lm_eval_task
from fluid_npu.eval.tasks import cut_at_stop, encode_text
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import FluidForCausalLM, generate


def request(kind: str, *args, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture(scope="module")
def random_lm(tok):
    fluid = FluidForCausalLM(build_tiny_model("llama", tok, seed=5), tok, tok.mask_token_id)
    return FluidLM(fluid=fluid, policy="fixed:3", batch_size=2)


@torch.no_grad()
def _direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(context) - 1
    return float(sum(logp[start + j, t] for j, t in enumerate(continuation)))


def test_loglikelihood_equals_direct_ar(random_lm, tok):
    pairs = [
        ("Question: 2+2?\nAnswer:", " 4"),
        ("a much longer context than the others, to pad the batch", " x"),
        ("trailing space ", "moves"),
        ("", "empty context"),
    ]
    got = random_lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    model = random_lm.fluid.model
    for (context, cont), (score, greedy) in zip(pairs, got):
        stripped = context.rstrip()
        ctx = encode_text(tok, stripped) if stripped else [tok.bos_token_id]
        whole = encode_text(tok, context + cont)
        expected = _direct_logprob(model, ctx, whole[len(ctx) :] if stripped else whole)
        assert score == pytest.approx(expected, abs=1e-4), (context, cont)
        assert greedy is False  # a random model does not favour these texts


def test_loglikelihood_is_greedy_on_the_bigram_model(tok):
    lm = FluidLM(fluid=FluidForCausalLM(bigram_model(tok), tok, tok.mask_token_id))
    (_, yes), (_, no) = lm.loglikelihood(
        [request("loglikelihood", "Answer:", " x=42"), request("loglikelihood", "Answer:", " y")]
    )
    assert yes and not no


def test_loglikelihood_rolling_equals_direct_ar(random_lm, tok):
    text = "The quick brown fox jumps over the lazy dog."
    (got,) = random_lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    expected = _direct_logprob(random_lm.fluid.model, [random_lm.prefix_token_id], tokens)
    assert got == pytest.approx(expected, abs=1e-4)


def test_generate_until_equals_the_sampler(random_lm, tok):
    contexts = ["Question: What is 2+2?\nAnswer:", "Hello", "Question: a\nAnswer:"]
    kwargs = {"until": ["\n\n", "e"], "max_gen_toks": 10, "do_sample": False}
    got = random_lm.generate_until([request("generate_until", c, kwargs) for c in contexts])
    for context, text in zip(contexts, got):
        ids = torch.tensor([encode_text(tok, context)])
        out = generate(random_lm.fluid.model, tok, ids, policy="fixed:3", max_new_tokens=10)
        full = tok.decode(out.new_tokens[0], skip_special_tokens=True)
        assert text == postprocess_generated_text(full, ["\n\n", "e"], None)
    assert random_lm.generation_stats.total_new_tokens > 0
    for kwargs, words in [({"num_beams": 4}, "num_beams=4"), ({"max_length": 9}, "max_gen_toks"),
                          ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size=2"),
                          ({"do_sample": True, "typical_p": 0.5}, "typical_p=0.5"),
                          ({"do_sample": True, "temperature": 0}, "temperature > 0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            random_lm.generate_until([request("generate_until", "a", kwargs)])


def test_generate_until_samples_as_lm_evals_hf_model_asks(random_lm, tok):
    """A temperature above 0 samples (``do_sample`` unset: lm-eval's ``hf`` reading), as does
    ``do_sample: true``; temperature, top_k, top_p, min_p and seed reach the sampler."""
    context = "Question: What is 2+2?\nAnswer:"
    ids = torch.tensor([encode_text(tok, context)])
    filters = {"temperature": 0.7, "top_k": 7, "top_p": 0.9, "min_p": 0.01}
    cases = [({"temperature": 5.0, "seed": 3}, {"temperature": 5.0}),
             ({"do_sample": True, "seed": 3, **filters}, filters)]  # fmt: skip
    greedy = random_lm.generate_until([request("generate_until", context, {"max_gen_toks": 12})])
    texts = []
    for kwargs, sampler in cases:
        kwargs = {"until": [], "max_gen_toks": 12, **kwargs}
        (text,) = random_lm.generate_until([request("generate_until", context, kwargs)])
        out = generate(random_lm.fluid.model, tok, ids, policy="fixed:3", max_new_tokens=12,
                       do_sample=True, seed=3, **sampler)  # fmt: skip
        assert text == tok.decode(out.new_tokens[0], skip_special_tokens=True)
        texts.append(text)
    assert texts[0] != greedy[0]  # (at temperature 5 a random model's text is not the greedy one)


def test_generation_ends_at_the_tokenizers_eos(tok):
    """A checkpoint whose generation config lists another EOS id still ends at the tokenizer's
    EOS token, as lm-eval's ``hf`` model ends there (it adds that token's text to ``until``)."""
    model = bigram_model(tok).eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    lm = FluidLM(fluid=FluidForCausalLM(model, tok, tok.mask_token_id), policy="fixed:3")
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    reqs = [request("generate_until", "Question: 2+2?\nAnswer:", {"until": [], "max_gen_toks": 12})]
    assert lm.generate_until(reqs) == hf.generate_until(reqs) == [" x=42"]


def test_reasoning_model_options_are_lm_evals_hf_models(random_lm, tok):
    """``think_end_token`` (a text, or a token id) removes a generation's text up to its last
    occurrence before the ``until`` cut, as ``hf`` does; ``enable_thinking`` and
    ``chat_template_args`` reach the chat template, and ``enable_thinking`` needs the former and
    refuses log-likelihoods."""
    model = bigram_model(tok).eval()  # it answers " x=42"
    reqs = [
        request("generate_until", "Question: 2+2?\nAnswer:", {"until": ["2"], "max_gen_toks": 9})
    ]
    equals = str(tok.convert_tokens_to_ids("="))  # (a digit string is a token id, as hf reads it)
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    for marker, text in (("x", "=4"), (equals, "4")):
        lm = FluidLM(fluid=fluid, policy="fixed:3", think_end_token=marker)
        hf = HFLM(pretrained=model, tokenizer=tok, device="cpu", think_end_token=marker)
        assert lm.generate_until(reqs) == hf.generate_until(reqs) == [text]
    own = build_tiny_tokenizer(mask_token=True)
    own.chat_template = "{{ 'T' if enable_thinking else 'F' }}{{ messages[0]['content'] }}"
    fluid = FluidForCausalLM(random_lm.fluid.model, own, own.mask_token_id)
    hi = [{"role": "user", "content": "hi"}]
    for args, text in [({"enable_thinking": True, "think_end_token": "</think>"}, "Thi"),
                       ({"chat_template_args": '{"enable_thinking": false}'}, "Fhi"),
                       ({"chat_template_args": {"enable_thinking": True}}, "Thi")]:  # fmt: skip
        assert FluidLM(fluid=fluid, **args).apply_chat_template(hi) == text
    with pytest.raises(ConfigError, match="enable_thinking=True needs think_end_token"):
        FluidLM(fluid=fluid, enable_thinking="True")
    with pytest.raises(ConfigError, match="chat_template_args='x' must be a JSON object"):
        FluidLM(fluid=fluid, chat_template_args="x")
    lm = FluidLM(fluid=fluid, enable_thinking=True, think_end_token="</think>")
    with pytest.raises(ConfigError, match="enable_thinking=True is for generative tasks"):
        lm.loglikelihood([request("loglikelihood", "a", " b")])


def test_generate_until_is_lm_evals_hf_model(random_lm, tok):
    """The same texts as lm-eval's own ``hf`` model on the same weights: its reading of the
    generation kwargs (aliases, ``do_sample: false`` with a temperature, repetition_penalty,
    min_new_tokens) and its cut at ``until`` strings in the order given (overlapping ones included,
    where cutting at the earliest would keep less)."""
    hf = HFLM(pretrained=random_lm.fluid.model, tokenizer=tok, batch_size=1, device="cpu")
    contexts = ["Question: What is 2+2?\nAnswer:", "Hello", "Question: a\nAnswer:"]
    free = {"until": [], "max_gen_toks": 12}
    texts = random_lm.generate_until([request("generate_until", c, free) for c in contexts])
    # two strings ending at the same character, the second starting first (as "2" and " 2"): at
    # each text's first place where both occur first (found on the text itself)
    at = [next(i for i in range(len(t) - 1) if t.find(t[i + 1]) == i + 1
               and t.find(t[i : i + 2]) == i) for t in texts]  # fmt: skip
    reqs = [request("generate_until", c, {"until": [t[i + 1], t[i : i + 2]], "max_gen_toks": 12})
            for c, t, i in zip(contexts, texts, at)]  # fmt: skip
    for kwargs in ({"max_new_tokens": 5}, {"do_sample": False, "temperature": 0.7},
                   {"repetition_penalty": 1.5, "max_gen_toks": 12, "top_p": 0.9},
                   {"min_new_tokens": 8, "max_gen_toks": 12}):  # fmt: skip
        reqs += [request("generate_until", c, kwargs) for c in contexts]
    ours = random_lm.generate_until(reqs)
    assert ours == hf.generate_until(reqs)
    # lm-eval cuts at the first string, after which the second no longer occurs: one character
    # more than a cut at the earliest string keeps
    assert ours[:3] == [t[: i + 1] for t, i in zip(texts, at)]
    assert all(cut_at_stop(t, r.args[1]["until"]) == t[:i] for t, r, i in zip(texts, reqs, at))


def test_prompts_and_scores_are_lm_evals_hf_models(random_lm, tok):
    """As lm-eval's ``hf`` model: an empty context before a continuation that starts with the
    prefix token takes that token as its context; a chat without a generation prompt leaves the
    last turn open (a task's ``gen_prefix``); a template that refuses system turns gets the chat
    without them; ``max_gen_toks`` must leave room for a prompt."""
    hf = HFLM(pretrained=random_lm.fluid.model, tokenizer=tok, batch_size=1, device="cpu")
    reqs = [request("loglikelihood", "", f"{tok.bos_token}x y"), request("loglikelihood", "", "x")]
    ours, theirs = random_lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-4)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital?"},
            {"role": "assistant", "content": "It is"}]  # fmt: skip
    for prompt in (True, False):
        assert random_lm.apply_chat_template(chat, prompt) == hf.apply_chat_template(chat, prompt)
    assert random_lm.apply_chat_template(chat, False).endswith("It is")
    strict = build_tiny_tokenizer(mask_token=True)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    lm = FluidLM(fluid=FluidForCausalLM(random_lm.fluid.model, strict, tok.mask_token_id))
    assert lm.apply_chat_template(chat) == "user: capital?\nassistant: It is\n"
    lm.max_length = 12
    with pytest.raises(ConfigError, match="max_gen_toks 12 leaves no room"):
        lm.generate_until([request("generate_until", "a", {"max_gen_toks": 12})])


def test_a_chat_rendering_that_writes_its_bos_is_read_with_one():
    """lm-eval's ``--apply_chat_template`` hands the model the template's text: a template that
    writes BOS (Llama 3) beside a tokenizer that adds it gets one BOS, not two; plain text still
    gets the tokenizer's."""
    adds = build_tiny_tokenizer(mask_token=True)
    adds.add_bos_token = True
    adds.chat_template = "{{ bos_token }}" + adds.chat_template
    rendered = adds.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = encode_text(adds, rendered)
    assert ids.count(adds.bos_token_id) == 1 and ids[0] == adds.bos_token_id
    assert encode_text(adds, "hi") == [adds.bos_token_id, *adds("hi", add_special_tokens=False)[
        "input_ids"]]  # fmt: skip


def test_model_args_set_the_engine_switches(random_lm, tok):
    """``prefix_caching=False`` (and ``adaptive_drafting`` / ``compile``) reach the decode engine
    as ``fluid eval``'s flags do: few-shot prompts sharing their start reuse it by default and
    encode it whole without, to the same text."""
    shared = "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+3?\nAnswer: 5\n\nQuestion: "
    reqs = [request("generate_until", shared + q, {"until": ["\n"], "max_gen_toks": 6})
            for q in ("4+4?\nAnswer:", "7+1?\nAnswer:", "9+9?\nAnswer:")]  # fmt: skip
    texts, cached = [], []
    for switches in ({}, {"prefix_caching": False, "adaptive_drafting": False}):
        lm = FluidLM(fluid=random_lm.fluid, policy="fixed:3", batch_size=1, **switches)
        texts.append(lm.generate_until(reqs))
        cached.append(lm.generation_stats.cached_tokens)
    assert texts[0] == texts[1] and cached[0] >= 2 * 16 and cached[1] == 0
    with pytest.raises(ConfigError, match="prefix_caching='no' must be True or False"):
        FluidLM(fluid=random_lm.fluid, prefix_caching="no")


def test_model_args_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model_args for the fluid model: pretrained"):
        FluidLM.create_from_arg_string("pretrained=gpt2")
    with pytest.raises(ConfigError, match="needs model_args model=DIR"):
        FluidLM.create_from_arg_string("policy=ar")
    with pytest.raises(ConfigError, match="batch_size"):
        FluidLM(fluid=object(), batch_size="many")


def test_model_args_choose_the_dtype(tmp_path, tok):
    model = build_tiny_model("llama", tok, seed=5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = FluidLM.create_from_arg_string(f"model={tmp_path / 'm'},dtype=bfloat16,policy=ar")
    assert next(lm.fluid.model.parameters()).dtype == torch.bfloat16


def test_model_args_take_the_loaders_options_and_lm_evals_own(tmp_path, tok, monkeypatch):
    """``trust_remote_code`` (what lm-eval's ``--trust_remote_code`` adds), ``allow_pickle`` and
    ``chat_template`` reach the loader; lm-eval's ``--batch_size`` / ``--device``, which its
    command line always passes, combine with ``model_args``, whose own value wins."""
    build_tiny_model("llama", tok, seed=5).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    seen = {}
    real = FluidForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(FluidForCausalLM, "from_pretrained", classmethod(spy))
    args = f"model={tmp_path / 'm'},policy=ar,chat_template={tmp_path / 't.jinja'},batch_size=3,"
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}  # as lm-eval passes them
    lm = FluidLM.create_from_arg_string(args + "trust_remote_code=True,allow_pickle=true", cli)
    assert seen["trust_remote_code"] is True and seen["allow_pickle"] is True
    assert lm.batch_size == 3 and lm.fluid.device.type == "cpu"
    assert lm.tokenizer.chat_template == "{{ messages[0]['content'] }}"
    lm = FluidLM.create_from_arg_obj({"model": str(tmp_path / "m"), "policy": "ar"}, cli)
    assert lm.batch_size == 1 and seen["trust_remote_code"] is False
    with pytest.raises(ConfigError, match="allow_pickle='maybe' must be True or False"):
        FluidLM(fluid=lm.fluid, allow_pickle="maybe")


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task(tmp_path, tok):
    """lm-eval's gsm8k filters on a local JSONL, through model_args: the same accuracy as ours.
    The task and its data are moved after being written, as a copied run directory is."""
    model_dir = tmp_path / "bigram"
    bigram_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "run").mkdir()
    data = write_jsonl(tmp_path / "run" / "test.jsonl", ROWS)
    write_lm_eval_task(
        tmp_path / "run" / "tasks", "tiny_gsm8k", data, max_gen_toks=12, cache_dir=tmp_path / "hf"
    )
    (tmp_path / "run").rename(tmp_path / "moved run")
    tasks = tmp_path / "moved run" / "tasks"
    result = simple_evaluate(
        model="fluid",
        model_args=f"model={model_dir},policy=fixed:3,batch_size=2,device=cpu",
        tasks=["tiny_gsm8k"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
    )
    metrics = result["results"]["tiny_gsm8k"]
    ours = run_eval(
        FluidForCausalLM.from_pretrained(model_dir), "gsm8k", ROWS, ["fixed:3"], max_new_tokens=12
    )
    assert metrics["exact_match,flexible-extract"] == ours["results"]["fixed:3"]["accuracy"]
    assert ours["results"]["fixed:3"]["accuracy"] == pytest.approx(2 / 3)
    assert metrics["exact_match,strict-match"] == 0.0  # the answers carry no "#### n"
    samples = result["samples"]["tiny_gsm8k"]
    by_question = {s["doc"]["question"]: s["resps"][0][0] for s in samples}
    for row, sample in zip(ROWS, ours["samples"]):
        assert by_question[row["question"]] == cut_at_stop(sample["outputs"]["ar"]["text"])
    assert json.dumps(metrics, default=str)  # the harness result is plain data


def test_without_lm_eval_the_harness_says_how_to_install_it(monkeypatch):
    for name in ("lm_eval", "lm_eval.api.model", "lm_eval.api.registry"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it imports
    monkeypatch.delitem(sys.modules, "fluid_npu.eval.harness")
    with pytest.raises(ConfigError, match=r"pip install 'fluid-npu\[eval\]'"):
        importlib.import_module("fluid_npu.eval.harness")
    assert run_eval is importlib.import_module("fluid_npu.eval").run_eval  # fluid eval needs none


@pytest.mark.slow
def test_lm_eval_command_line_knows_the_fluid_model():
    """``python -m fluid_npu.eval`` is lm-eval's own command line with ``fluid`` registered."""
    code = (
        "import sys; sys.argv = ['lm-eval', '--help']\n"
        "from lm_eval.api.registry import get_model\n"
        "try:\n    import fluid_npu.eval.__main__\nexcept SystemExit:\n    pass\n"
        "print(get_model('hf').__name__, get_model('fluid').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # lm-eval's own models stay known beside it (its registry fills itself only while empty)
    assert "run" in out.stdout and out.stdout.strip().endswith("HFLM FluidLM")
