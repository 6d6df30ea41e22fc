"""Text of outputs under SentencePiece tokenizers, fast (Llama 2 / Mistral's decoder) and slow
(openPangu's ``PanguTokenizer``): Chinese and emoji split into byte tokens, runs of spaces, and
the log-probabilities' token bytes — what ``fluid serve``, ``fluid generate`` and ``LLM`` return."""

from __future__ import annotations

import pytest
from sentencepiece_like import SlowPieces, SpacedSpecials, byte_fallback_tokenizer

from fluid_npu.sampling.detok import Detokenizer, output_text
from fluid_npu.sampling.stops import stop_cut
from fluid_npu.serve.text import TokenText


def _bytes_of(tk, text: str) -> list[int]:
    return tk.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])


def _streamed(tk, prompt: list[int], out: list[int], step: int = 1, stop=None) -> str:
    d = Detokenizer(tk, stop, prompt=prompt)
    return "".join(d.add(out[i : i + step]) for i in range(0, len(out), step)) + d.flush()


@pytest.fixture(params=["fast", "slow"])
def tk(request):
    return byte_fallback_tokenizer() if request.param == "fast" else SlowPieces()


def test_an_output_after_a_prompt_cut_inside_a_character_is_its_own_text(tk):
    """The prompt's last four tokens begin inside "😀" (bytes of a run that continues into the
    output's): decoded as context from there, a byte-fallback decoder spells the whole run —
    the answer's emoji too — as U+FFFDs, and a stop string in it is never found."""
    prompt = tk("你好😀！")["input_ids"]
    assert tk.decode(prompt[-4:]).startswith("\ufffd")  # the case: four tokens cut "😀"
    out = _bytes_of(tk, "🎉🎉中")
    assert output_text(tk, prompt, out) == "🎉🎉中"
    for step in (1, 3):
        assert _streamed(tk, prompt, out, step) == "🎉🎉中"
        assert _streamed(tk, prompt, out, step, stop=["中"]) == "🎉🎉"
    from fluid_npu.sampling.detok import context_ids  # (what the engine's stop search reads too)

    assert not tk.decode(context_ids(tk, prompt)).startswith("\ufffd")


def test_a_run_of_spaces_streamed_a_token_at_a_time_keeps_every_space(tk):
    """``a▁▁Ching`` is "a  Ching": a chunk spelling only spaces is no context alone (the slow
    decoder drops a text's leading spaces), streamed or not."""
    prompt = tk("北京")["input_ids"]
    out = tk.convert_tokens_to_ids(["a", "▁", "▁", "C", "h", "i", "n", "g"])
    whole = tk.decode([*prompt, *out], skip_special_tokens=True)
    assert whole.endswith("北京a  Ching")
    for step in (1, 2):
        assert _streamed(tk, prompt, out, step) == "a  Ching", step
    # a prompt whose last tokens are spaces: the output's first word keeps them
    prompt = tk("北京 ")["input_ids"] + tk.convert_tokens_to_ids(["▁", "▁", "▁"])
    assert output_text(tk, prompt, tk.convert_tokens_to_ids(["C", "h"])) == "Ch"
    out = tk.convert_tokens_to_ids(["▁", "C", "h"])
    assert _streamed(tk, tk("北京")["input_ids"], out) == " Ch"


def test_the_engines_stop_window_never_begins_inside_a_character():
    """After three or more byte-fallback emoji the stop window's first token was a character's
    continuation byte: the run decoded as U+FFFDs and "中" in it was missed."""
    tk = byte_fallback_tokenizer()
    special = frozenset(tk.all_special_ids)
    for n in (1, 2, 3, 5, 9):
        earlier = _bytes_of(tk, "🎉" * n)
        assert stop_cut(tk, special, earlier, _bytes_of(tk, "中"), ["中"]) == 3, n


def test_logprob_tokens_of_a_slow_sentencepiece_tokenizer_carry_their_bytes():
    """openPangu's slow tokenizer has no fast decoder to read: its ``<0xNN>`` pieces are bytes
    (not U+FFFD) and ``▁`` a space, as the fast conversion of the same model spells them."""
    slow, fast = SlowPieces(), byte_fallback_tokenizer()
    words, fast_words = TokenText(slow), TokenText(fast)
    assert words.byte_fallback and words.strip_start == fast_words.strip_start == 1
    ids = slow("好😀 café 北京", add_special_tokens=False)["input_ids"]
    assert ids == fast("好😀 café 北京", add_special_tokens=False)["input_ids"]
    assert [words.text(t) for t in ids] == [fast_words.text(t) for t in ids]
    assert words.bytes(slow.convert_tokens_to_ids("<0xF0>")) == b"\xf0"
    assert words.text(slow.convert_tokens_to_ids("<0xF0>")) == "bytes:\\xf0"
    assert b"".join(words.bytes(t) for t in ids).decode() == " 好😀 café 北京"


def test_the_engine_and_the_reasoning_split_read_the_output_after_the_same_context(make_model):
    """The engine's stop search and a reasoning parser's answer part take the prompt's context as
    the text does: after a prompt whose last four tokens begin inside "😀" (and so does every
    shorter tail), "中" in the output ends it, and the answer after a closing marker is its own
    text."""
    from fluid_npu.sampling.requests import Request, Slot
    from fluid_npu.sampling.scheduler import Scheduler
    from fluid_npu.serve.reasoning import ReasoningText, reasoning_parser

    tk = byte_fallback_tokenizer()
    tk.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    prompt = tk("你好😀é")["input_ids"]  # (é: two byte tokens, after two of 😀's four)
    assert tk.decode(prompt[-4:]).startswith("\ufffd")
    engine = Scheduler(make_model("llama", tk), tk.unk_token_id, max_batch=1, tokenizer=tk)
    slot = Slot(Request("r", prompt, 16, stop=["中"]), prompt)
    slot.new = _bytes_of(tk, "🎉")
    assert engine._stop_cut(slot, _bytes_of(tk, "中")) == 3

    opened, closed = tk.convert_tokens_to_ids(["<think>", "</think>"])
    split = ReasoningText(tk, reasoning_parser("qwen3", tk), None, prompt=prompt, eos_ids=())
    out = [opened, *_bytes_of(tk, "想"), closed, *_bytes_of(tk, "🎉🎉")]
    answer = "".join(split.add([t]) for t in out) + split.flush()
    assert answer == "🎉🎉"


def test_special_tokens_written_out_by_a_slow_tokenizer_read_the_same_in_any_piece():
    """``skip_special_tokens: false`` with a slow tokenizer that puts a space before the text of
    special tokens (Llama / InternLM-style remote code, as openPangu's): decoded in pieces, a
    piece ending in a special token began otherwise than the whole, and characters came out twice
    ("thingg", a tool call's JSON broken). Each special token is now written as itself between
    runs decoded alone, as vLLM does for slow tokenizers: the same text in any piece."""
    tk = SpacedSpecials()
    tk.add_special_tokens({"additional_special_tokens": ["[u11]"]})
    out = tk.convert_tokens_to_ids([*"Sure", "▁", *"thing", "[u11]", *"ok", "▁", *"now"])
    assert tk.decode(out[:10]) + "[u11]" != tk.decode(out[:11])  # (the case: the space before)
    for prompt in (tk("hello")["input_ids"], tk("hello", add_special_tokens=False)["input_ids"]):
        for step in (1, 2, 3, len(out)):
            d = Detokenizer(tk, prompt=prompt, skip_special=False)
            text = "".join(d.add(out[i : i + step]) for i in range(0, len(out), step)) + d.flush()
            assert text == "Sure thing[u11]ok now", (prompt, step)
