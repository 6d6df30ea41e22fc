"""``fluid eval`` and ``run_eval``: the GSM8K extractor, accuracy on a model whose answers are
known, the AR baseline and ``identical_to_ar``, the report files, and one clear error per bad input.

The "bigram" model answers every plain prompt (which ends with ``Answer:``) with `` x=42`` and EOS:
its attention and MLP outputs are zeroed, so the last hidden state is the current token's
embedding, and the LM head maps each chain token's embedding to its successor.
"""

from __future__ import annotations

import json

import pytest
import torch

from fluid_npu.cli import main
from fluid_npu.data.gsm8k import prompt_text, reference_answer
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.eval import extract_answer, is_correct, run_eval, task_rows, write_eval_report
from fluid_npu.eval.report import markdown_table, plot_paths
from fluid_npu.eval.tasks import cut_at_stop, encode_question, read_rows, select_fewshot
from fluid_npu.model.adapters import load_fluid
from fluid_npu.model.khead import KHead, KHeadConfig, save_khead
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import FluidForCausalLM

CHAIN = {":": " ", "\n": " ", " ": "x", "x": "=", "=": "4", "4": "2", "2": None}  # None: EOS
ROWS = [
    {"question": "Tom has 40 apples and finds 2. How many?", "answer": "40 + 2 = 42\n#### 42"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
    {"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"},
]
PNG = b"\x89PNG\r\n\x1a\n"


def bigram_model(tok) -> torch.nn.Module:
    model = build_tiny_model("llama", tok, seed=3)
    ids = {ch: tok.encode(ch, add_special_tokens=False)[0] for ch in CHAIN}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, (src, dst) in enumerate(CHAIN.items()):
            emb[ids[src]] = torch.nn.functional.one_hot(torch.tensor(i), emb.shape[1]).float()
            head[ids[dst] if dst else tok.eos_token_id, i] = 1.0
    return model


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tok):
    """Saved models: the bigram one, and a random one with a K-head."""
    root = tmp_path_factory.mktemp("eval")
    for name, model in (("bigram", bigram_model(tok)), ("random", build_tiny_model("llama", tok))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    fp = load_fluid(root / "random").base_fingerprint
    torch.manual_seed(0)
    save_khead(KHead(64, 6), KHeadConfig(64, 6, base_fingerprint=fp), root / "khead")
    return {k: str(root / k) for k in ("bigram", "random", "khead")}


@pytest.fixture(scope="module")
def bigram(tok):
    return FluidForCausalLM(bigram_model(tok), tok, tok.mask_token_id)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
            "clips altogether in April and May.\n#### 72",
            "72",
        ),
        ("He pays 3 * $360 = $1,080 in total.\n#### 1,080", "1080"),
        ("She has 12 - 5 = 7 left. The answer is $1,080.", "1080"),
        ("So the total is 19.0 apples", "19"),
        ("The answer is 0.50", "0.5"),
        ("The temperature drops by 8 to #### -3", "-3"),
        ("The answer is 5.\n#### 6", "6"),  # #### wins over the phrase
        ("3 cats, then 4 dogs: 7.", "7"),  # else the last number
        ("no number at all", None),
        ("42 eggs\n\nQuestion: how many legs do 3 ducks have?", "42"),  # after cut_at_stop
        ("Half of one is .5", "0.5"),  # a decimal without its leading zero is not 5
    ],
)
def test_extractor_on_gsm8k_strings(text, expected):
    assert extract_answer(cut_at_stop(text)) == expected


def test_is_correct_normalises_numbers_and_cuts_the_next_question():
    assert is_correct("so it costs $18.00 per day", "18")
    assert is_correct("#### 1,000", "1000.0")
    assert not is_correct("The answer is 41.\n\nQuestion: What is 42?", "42")


def test_prompts_plain_fewshot_and_chat(tok):
    shot = ROWS[0]
    assert prompt_text("Q?") == "Question: Q?\nAnswer:"
    assert prompt_text("Q?", [shot]) == (
        f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\nQuestion: Q?\nAnswer:"
    )
    plain = encode_question(tok, "Q?", [shot])
    assert plain == tok.encode(prompt_text("Q?", [shot]), add_special_tokens=False)
    chat = encode_question(tok, "Q?", [shot], chat=True)
    messages = [
        {"role": "user", "content": shot["question"]},
        {"role": "assistant", "content": shot["answer"]},
        {"role": "user", "content": "Q?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == tok.encode(text, add_special_tokens=False)


def test_accuracy_on_a_model_with_known_answers(bigram):
    out = run_eval(bigram, "gsm8k", ROWS, ["fixed:3", "entropy"], batch_size=2, max_new_tokens=12)
    assert out["policies"] == ["ar", "fixed:3", "entropy:2"]  # ar first, canonical names
    for name in out["policies"]:
        r = out["results"][name]
        assert r["correct"] == 2 and r["accuracy"] == pytest.approx(2 / 3), name
        assert r["identical_to_ar"] == 1.0
        assert r["new_tokens"] == 3 * 6  # " x=42" + EOS per row
    ar = out["results"]["ar"]
    assert ar["tpf"] == 1.0 and ar["speedup"] == 1.0 and ar["k_hist"] == {"0": 18}
    assert set(out["results"]["fixed:3"]["k_hist"]) <= {"0", "3"}
    sample = out["samples"][2]
    assert sample["reference"] == "7" and sample["outputs"]["ar"]["text"] == " x=42"
    assert sample["outputs"]["ar"] == {"answer": "42", "correct": False, "text": " x=42"}
    expected = {"answer": "42", "correct": False, "identical_to_ar": True}  # the same text as ar
    assert sample["outputs"]["fixed:3"] == expected


def test_chat_prompts(bigram):
    """The chat prompt ends with the assistant header's newline, which the bigram model answers."""
    out = run_eval(bigram, "gsm8k", ROWS, ["fixed:2"], chat=True, max_new_tokens=12, warmup=False)
    assert out["chat"] and out["results"]["fixed:2"]["accuracy"] == pytest.approx(2 / 3)


def test_outputs_that_differ_from_ar_are_counted(bigram, tok, monkeypatch):
    """A policy whose first output differs: identical_to_ar 2/3, its accuracy from its own text."""
    from fluid_npu.sampling import bench

    real = bench.decode_batches

    def decode(fluid, batches, policy, *args):
        new, stats = real(fluid, batches, policy, *args)
        if policy == "fixed:2" and len(new) == len(ROWS):
            new[2] = [*tok.encode(" so 7", add_special_tokens=False), tok.eos_token_id]
        return new, stats

    monkeypatch.setattr(bench, "decode_batches", decode)
    out = run_eval(bigram, "gsm8k", ROWS, ["fixed:2"], max_new_tokens=12)
    r = out["results"]["fixed:2"]
    assert r["identical_to_ar"] == pytest.approx(2 / 3) and r["accuracy"] == 1.0
    row = out["samples"][2]["outputs"]["fixed:2"]
    assert row == {"answer": "7", "correct": True, "identical_to_ar": False, "text": " so 7"}


def test_lossless_policies_on_a_random_model(dirs):
    fluid = FluidForCausalLM.from_pretrained(dirs["random"], khead=dirs["khead"])
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(5)]
    out = run_eval(
        fluid, "gsm8k", rows, ["fixed:3", "entropy:4", "khead"], batch_size=3, max_new_tokens=10
    )
    accuracies = {out["results"][n]["accuracy"] for n in out["policies"]}
    assert len(accuracies) == 1  # the same outputs, so the same accuracy as ar
    for name in ("fixed:3", "entropy:4", "khead"):
        assert out["results"][name]["identical_to_ar"] == 1.0, name
    assert sum(out["results"]["khead"]["k_hist"].values()) > 0


def test_report_files(bigram, tmp_path):
    out = run_eval(bigram, "gsm8k", ROWS, ["fixed:3"], max_new_tokens=12, warmup=False)
    paths = write_eval_report(out, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots")
    assert json.loads(paths["json"].read_text())["results"]["fixed:3"]["accuracy"] == 2 / 3
    table = paths["markdown"].read_text()
    assert table == markdown_table(out)
    assert "| ar | 0.667 | 1.00 |" in table and "| fixed:3 | 0.667 |" in table
    for path in plot_paths(tmp_path / "r.json", tmp_path / "plots"):
        assert path.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "r.json", "r.md"]


def test_fluid_eval_command(dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    fewshot = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    out = tmp_path / "out" / "gsm8k.json"
    argv = ["eval", "--model", dirs["bigram"], "--task", "gsm8k", "--data", data]
    argv += ["--fewshot", fewshot, "--num-fewshot", "2", "--policy", "fixed:3", "entropy"]
    argv += ["--policy", "fixed:3", "--max-new-tokens", "12", "--batch-size", "2"]
    assert main([*argv, "--device", "cpu", "--dtype", "float32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and "--dtype float32" in report["command"]
    assert report["policies"] == ["ar", "fixed:3", "entropy:2"] and report["num_fewshot"] == 2
    assert report["results"]["entropy:2"]["accuracy"] == pytest.approx(2 / 3)
    assert (
        report["command"].startswith("fluid eval --model")
        and "--policy fixed:3 entropy" in (report["command"])
    )
    assert (out.parent / "gsm8k.md").read_text() in capsys.readouterr().out
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["gsm8k.json", "gsm8k.md", "gsm8k_accuracy_tpf.png", "gsm8k_k_hist.png"]
    # output paths that cannot be written fail before the model loads, naming their flag
    (tmp_path / "afile").write_text("x")
    for extra, words in (
        (["--json", str(tmp_path / "out")], "--json"),  # (a directory named like a report)
        (["--json", str(out), "--plot-dir", str(tmp_path / "afile")], "--plot-dir"),
    ):
        bad = ["eval", "--model", str(tmp_path / "no_model"), "--task", "gsm8k", "--data", data]
        capsys.readouterr()
        assert main([*bad, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_identical_to_ar_never_rounds_up_to_one():
    from fluid_npu.eval.report import fraction

    assert fraction(2499 / 2500) == "0.999" and fraction(1.0) == "1.000"
    assert fraction(2 / 3) == "0.666"


def test_demo_task(monkeypatch):
    import fluid_npu.data.demo as demo

    calls = []

    def fake(split, n):
        calls.append((split, n))
        return [{"question": f"q{i}", "answer": f"so {i}.\n#### {i}"} for i in range(n)]

    monkeypatch.setattr(demo, "demo_split", fake)
    assert len(task_rows("demo")) == 100 and calls[-1] == ("test", 100)
    assert [r["question"] for r in task_rows("demo", limit=3)] == ["q0", "q1", "q2"]


def test_demo_task_rows_are_the_demo_problems():
    from fluid_npu.data.demo import demo_problems

    rows = task_rows("demo", limit=5)
    for i, (row, (question, solution, answer)) in enumerate(zip(rows, demo_problems("test", 5))):
        assert row["question"] == question and row["answer"].startswith(solution)
        assert reference_answer(row, f"demo row {i}") == str(answer)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluid: error: ")
    return err[0]


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"question": "q", "solution": "#### 1"}], [], 'has no text field "answer"'),
        ([{"question": "q", "answer": "it is 4"}], [], 'no final "#### n" line'),
        (ROWS, ["--num-fewshot", "5"], "--num-fewshot 5 asks for more examples than"),
        (ROWS, ["--num-fewshot", "1"], "needs few-shot examples: pass --fewshot"),
        (ROWS, ["--policy", "fixed:4", "fast"], "unknown horizon policy 'fast'"),
        (ROWS, ["--policy", "khead"], "the khead policy needs a K-head"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path, capsys, rows, extra, message):
    """Checked before the model is loaded: the model directory does not even exist."""
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    if "5" in extra:
        extra = [*extra, "--fewshot", write_jsonl(tmp_path / "shots.jsonl", ROWS)]
    argv = ["eval", "--model", str(tmp_path / "missing"), "--task", "gsm8k", "--data", data]
    line = _error(capsys, [*argv, *extra, "--json", str(tmp_path / "o.json")])
    assert message in line
    if "d.jsonl" in line:
        assert f"{data}:1:" in line  # the file and line


def test_bad_inputs_api(bigram):
    with pytest.raises(DataError, match="answer has no final"):
        run_eval(bigram, "gsm8k", [{"question": "q", "answer": "4"}])
    with pytest.raises(DataError, match="more examples than the few-shot file holds"):
        select_fewshot(ROWS[:1], 2)
    with pytest.raises(ConfigError, match="needs --data"):
        task_rows("gsm8k")
    with pytest.raises(ConfigError, match="unknown task"):
        run_eval(bigram, "mmlu", ROWS)
    with pytest.raises(ConfigError, match="unknown horizon policy"):
        run_eval(bigram, "gsm8k", ROWS, ["fast"])
    with pytest.raises(DataError, match="does not exist"):
        read_rows("/nonexistent/data.jsonl")


def test_a_policy_whose_divergences_are_near_ties_is_lossless():
    from fluid_npu.eval.lossless_rule import is_lossless

    assert is_lossless({"identical_to_ar": 1.0})
    assert is_lossless({"identical_to_ar": 0.9, "mismatches": 0, "ties": [{"gap": 0.01}]})
    assert not is_lossless({"identical_to_ar": 0.9, "mismatches": 1})
    assert not is_lossless({"identical_to_ar": 0.9})  # not judged: not excused


def test_decoding_ends_at_the_stop_strings(bigram, monkeypatch):
    """fluid eval hands its stop strings to the sampler, so no policy decodes past them."""
    from fluid_npu.eval.tasks import STOP_STRINGS
    from fluid_npu.sampling import bench

    seen = []
    real = bench.decode_batches

    def spy(fluid, batches, policy, loop, max_new, pad, kwargs):
        seen.append(kwargs.get("stop_strings"))
        return real(fluid, batches, policy, loop, max_new, pad, kwargs)

    monkeypatch.setattr(bench, "decode_batches", spy)
    run_eval(bigram, "gsm8k", ROWS, ["fixed:2"], max_new_tokens=12, warmup=False)
    assert seen and all(s == list(STOP_STRINGS) for s in seen)


def test_decoding_ends_at_the_tokenizers_eos(tok):
    """fluid eval ends an output at the tokenizer's EOS token where the generation config lists
    another, as fluid serve does, for the AR baseline and every policy alike."""
    model = bigram_model(tok).eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    report = run_eval(fluid, "gsm8k", ROWS[:1], ["fixed:2"], max_new_tokens=12, warmup=False)
    (sample,) = report["samples"]
    assert sample["outputs"]["ar"]["text"] == " x=42"
    assert report["results"]["ar"]["new_tokens"] <= 6  # " x=42" and the EOS token at most
    assert report["results"]["fixed:2"]["identical_to_ar"] == 1.0
