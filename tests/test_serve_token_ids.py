"""vLLM's token-level extensions on ``fluid serve``: ``return_token_ids`` (the prompt's and the
output's token ids come back; streamed: the prompt's once per choice, each chunk the ids it
delivered, adding up to the whole answer's), ``return_tokens_as_token_ids`` (log-probabilities
name tokens by id) — what an agent or RL loop needs so as not to tokenize a text again — and
``prompt_logprobs`` (a prompt scored token by token, as a reference model is) and
``truncate_prompt_tokens`` (a prompt's last K tokens). Driven by the
official ``openai`` client against the scripted scheduler of ``test_serve_http.py``."""

from __future__ import annotations

import httpx
from test_serve_http import EOS, TOK, ScriptedScheduler, client, script, serving

IDS = {"return_token_ids": True}
USER = [{"role": "user", "content": "Name a fox."}]


def _streamed(chunks) -> tuple[list[list[int]], list[int], str]:
    """The prompt ids each chunk carried (those that did), all output ids, and the text."""
    prompts, ids, text = [], [], ""
    for ch in chunks:
        extra = ch.model_extra or {}
        if "prompt_token_ids" in extra:
            prompts.append(extra["prompt_token_ids"])
        for choice in ch.choices:
            more = choice.model_extra or {}
            prompts += [more["prompt_token_ids"]] if "prompt_token_ids" in more else []
            ids += more.get("token_ids") or []
            delta = getattr(choice, "delta", None)  # (chat's; a completion's is its text)
            text += (choice.text if delta is None else delta.content) or ""
    return prompts, ids, text


def test_completions_return_the_prompt_and_output_ids_streamed_or_not():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        given = ["a fox", "over the lazy dog"]
        out = c.completions.create(model="tiny", prompt=given, max_tokens=30, extra_body=IDS)
        for choice, text in zip(out.choices, given):
            prompt = TOK(text)["input_ids"]
            extra = choice.model_extra
            assert extra["prompt_token_ids"] == prompt
            assert extra["token_ids"] == script(prompt, 30, eos=True)  # EOS included
            assert extra["token_ids"][-1] == EOS and choice.finish_reason == "stop"
            assert choice.text == TOK.decode(extra["token_ids"], skip_special_tokens=True)
        # a stop string: the ids up to the one that completed it
        prompt = TOK("a fox")["input_ids"]
        stopped = c.completions.create(model="tiny", prompt="a fox", max_tokens=30, stop=["brown"],
                                       extra_body=IDS).choices[0]  # fmt: skip
        ids = stopped.model_extra["token_ids"]
        assert ids == script(prompt, 30, eos=True)[: len(ids)]
        assert TOK.decode(ids).endswith("brown") and "brown" not in TOK.decode(ids[:-1])
        assert stopped.text == TOK.decode(ids).removesuffix("brown")
        # streamed: the prompt once, then the ids as they come, adding up to the whole
        chunks = list(c.completions.create(model="tiny", prompt="a fox", max_tokens=30,
                                           stream=True, extra_body=IDS))  # fmt: skip
        prompts, ids, text = _streamed(chunks)
        assert prompts == [prompt] and ids == script(prompt, 30, eos=True)
        assert text == TOK.decode(ids, skip_special_tokens=True)
        # not asked for: the answer is OpenAI's, without them
        plain = httpx.post(
            f"{url}/v1/completions",
            timeout=60,
            json={"model": "tiny", "prompt": "a fox", "max_tokens": 5},
        ).json()
        assert (
            "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]
        )


def test_chat_returns_the_rendered_prompt_ids_beside_the_choices():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, max_tokens=30, n=2,
                                        extra_body=IDS)  # fmt: skip
        prompt = sched.requests[-1].prompt  # (the chat template's rendering)
        assert out.model_extra["prompt_token_ids"] == prompt
        for choice in out.choices:
            assert "prompt_token_ids" not in choice.model_extra
            assert choice.model_extra["token_ids"] == script(prompt, 30, eos=True)
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, max_tokens=30,
                                                stream=True, extra_body=IDS))  # fmt: skip
        prompts, ids, text = _streamed(chunks)
        assert prompts == [prompt] and "prompt_token_ids" in (chunks[0].model_extra or {})
        assert ids == script(prompt, 30, eos=True) and text == out.choices[0].message.content


def test_logprobs_name_tokens_by_id_where_asked():
    sched = ScriptedScheduler()
    with serving(sched, tokens_as_ids=True) as (url, _, _):  # --return-tokens-as-token-ids
        c = client(url)
        out = c.completions.create(model="tiny", prompt="a fox", max_tokens=6, logprobs=1,
                                   extra_body=IDS).choices[0]  # fmt: skip
        ids = out.model_extra["token_ids"]
        assert out.logprobs.tokens == [f"token_id:{t}" for t in ids]
        assert [list(top) for top in out.logprobs.top_logprobs] == [
            [f"token_id:{t}"] for t in ids]  # fmt: skip
        assert out.logprobs.text_offset[1] == len(TOK.decode(ids[:1]))  # offsets: the text's
        chat = c.chat.completions.create(model="tiny", messages=USER, max_tokens=6, logprobs=True,
                                         top_logprobs=2, extra_body=IDS).choices[0]  # fmt: skip
        ids = chat.model_extra["token_ids"]
        content = chat.logprobs.content
        assert [e.token for e in content] == [f"token_id:{t}" for t in ids]
        assert [e.bytes for e in content] == [list(TOK.decode([t]).encode()) for t in ids]
        assert [e.token for e in content[0].top_logprobs] == [f"token_id:{ids[0]}",
                                                              f"token_id:{EOS}"]  # fmt: skip
        # a request may turn the server's setting off
        off = c.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=6,
            logprobs=True,
            extra_body={"return_tokens_as_token_ids": False},
        )
        assert off.choices[0].logprobs.content[0].token == TOK.decode(ids[:1])


def test_prompt_logprobs_come_with_ranks_and_their_own_count_of_alternatives():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        prompt = TOK("a fox")["input_ids"]
        one = c.completions.create(model="tiny", prompt="a fox", max_tokens=3,
                                   extra_body={"prompt_logprobs": 2}).choices[0]  # fmt: skip
        scored = one.model_extra["prompt_logprobs"]  # scripted: token j + 1 at -0.5 (j + 1)
        assert scored[0] is None and len(scored) == len(prompt)
        for j, (tok, entry) in enumerate(zip(prompt[1:], scored[1:])):
            own = {"logprob": -0.5 * (j + 1), "rank": 1, "decoded_token": TOK.decode([tok])}
            eos = {"logprob": -9.0, "rank": 2, "decoded_token": "</s>"}
            assert entry == {str(tok): own, str(EOS): eos}
        # with echo + logprobs 1 as well: the echoed entries keep their one alternative
        both = c.completions.create(
            model="tiny",
            prompt="a fox",
            max_tokens=3,
            echo=True,
            logprobs=1,
            extra_body={"prompt_logprobs": 2},
        ).choices[0]
        assert sched.requests[-1].sampling.prompt_logprobs == 2
        assert both.model_extra["prompt_logprobs"] == scored
        assert all(len(t) == 1 for t in both.logprobs.top_logprobs[1 : len(prompt)])
        chat = c.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                         extra_body={"prompt_logprobs": 0})  # fmt: skip
        rendered = sched.requests[-1].prompt
        scored = chat.model_extra["prompt_logprobs"]
        assert scored[0] is None
        assert [list(e) for e in scored[1:]] == [[str(t)] for t in rendered[1:]]
        assert "prompt_logprobs" not in chat.choices[0].model_extra
        for body in ({"prompt": "a fox"}, {"messages": USER}):  # not in a stream, as vLLM
            route = "completions" if "prompt" in body else "chat/completions"
            r = httpx.post(f"{url}/v1/{route}", timeout=60, json={
                "model": "tiny", **body, "stream": True, "prompt_logprobs": 1})  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_max_logprobs_caps_what_a_request_may_ask_for():
    """vLLM's ``--max-logprobs``: 20 by default (OpenAI's), -1 every token of the vocabulary."""
    with serving(ScriptedScheduler()) as (url, _, _):
        for route, body, name in (
            ("completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
            ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21},
             "top_logprobs"),
            ("completions", {"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
            ("responses", {"input": "a", "top_logprobs": 21}, "top_logprobs"),
        ):  # fmt: skip
            r = httpx.post(f"{url}/v1/{route}", json={"model": "tiny", **body}, timeout=60)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == name, error
            assert f"{name}=21" in error["message"] and "--max-logprobs" in error["message"]
    sched = ScriptedScheduler()
    with serving(sched, max_logprobs=-1) as (url, _, _):
        c = client(url)
        c.completions.create(model="tiny", prompt="a", max_tokens=2, logprobs=50,
                             extra_body={"prompt_logprobs": len(TOK)})  # fmt: skip
        assert sched.requests[-1].sampling.top_logprobs == 50
        assert sched.requests[-1].sampling.prompt_logprobs == len(TOK)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "a", "prompt_logprobs": len(TOK) + 1})  # fmt: skip
        assert r.status_code == 400
        assert f"({len(TOK)}; the vocabulary" in r.json()["error"]["message"]


def test_an_answer_holds_a_bounded_number_of_log_probabilities(monkeypatch):
    """Tokens x (1 + alternatives) over a request's outputs and echoed prompts, times n: past
    MAX_LOGPROB_VALUES a 400 naming the field (a 256-prompt echo with 20 alternatives took
    2.7 GB and stalled every stream while its answer was built); --max-logprobs -1 takes any."""
    import fluid_npu.serve.admission as admission

    monkeypatch.setattr(admission, "MAX_LOGPROB_VALUES", 200)
    ids = list(range(40, 60))  # 20 prompt tokens
    cases = (  # (body, param): 21 x 20 x 2 = 840 / 6 x 20 x 2 = 240 / 21 x 10 = 210 values
        ("completions", {"prompt": [ids, ids], "echo": True, "logprobs": 20, "max_tokens": 0},
         "logprobs"),
        ("completions", {"prompt": [ids, ids], "max_tokens": 1, "prompt_logprobs": 5},
         "prompt_logprobs"),
        ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 20,
                              "max_tokens": 10}, "top_logprobs"),
    )  # fmt: skip
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        for route, body, param in cases:
            r = httpx.post(f"{url}/v1/{route}", json={"model": "tiny", **body}, timeout=60)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param, (body, error)
            assert "an answer holds at most 200 here" in error["message"], error
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": USER, "logprobs": True, "max_tokens": 201})  # fmt: skip
        assert r.json()["error"]["param"] == "logprobs"  # (no top_logprobs was sent)
        assert not sched.requests  # nothing reached the engine
        # a stream holds no whole answer, and without max_tokens the model ends the output:
        # neither counts the outputs (the same chat request as above, streamed; without it)
        chat = {"model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": 20}
        for extra in ({"max_tokens": 10, "stream": True}, {}):
            r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra}, timeout=60)
            assert r.status_code == 200, (extra, r.text[:300])
        ok = {"prompt": ids, "echo": True, "logprobs": 8, "max_tokens": 0}  # 9 x 20 = 180
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", **ok}, timeout=60)
        assert r.status_code == 200, r.json()
    with serving(ScriptedScheduler(), max_logprobs=-1) as (url, _, _):
        route, body, _ = cases[0]
        r = httpx.post(f"{url}/v1/{route}", json={"model": "tiny", **body}, timeout=60)
        assert r.status_code == 200, r.json()


def test_minus_one_asks_for_the_whole_vocabulary_where_the_server_allows_it():
    """vLLM's -1 in ``top_logprobs`` / ``prompt_logprobs``: every token (only on a server
    started with ``--max-logprobs -1``); a one-token prompt's prompt_logprobs are ``[null]``."""
    with serving(ScriptedScheduler()) as (url, _, _):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": -1})  # fmt: skip
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "top_logprobs"
        assert "(20; --max-logprobs sets it)" in error["message"]
    sched = ScriptedScheduler()
    with serving(sched, max_logprobs=-1) as (url, _, _):
        c = client(url)
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, logprobs=True,
                                  top_logprobs=-1, extra_body={"prompt_logprobs": -1})  # fmt: skip
        assert sched.requests[-1].sampling.top_logprobs == len(TOK)
        assert sched.requests[-1].sampling.prompt_logprobs == len(TOK)
        one = c.completions.create(model="tiny", prompt=[64], max_tokens=2,
                                   extra_body={"prompt_logprobs": 1}).choices[0]  # fmt: skip
        assert one.model_extra["prompt_logprobs"] == [None]
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "a", "prompt_logprobs": len(TOK) + 1})  # fmt: skip
        assert "the vocabulary's size" in r.json()["error"]["message"]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens():
    """vLLM's ``truncate_prompt_tokens``: K keeps a prompt's last K tokens (a text's, a token-id
    list's, a rendered chat's), counted so in the usage and echoed as the text left; -1 keeps as
    many as the context holds; 0, below -1 or more than the context is a 400 naming it."""
    sched = ScriptedScheduler(max_len=64)
    with serving(sched) as (url, _, _):
        c = client(url)
        text = "the quick brown fox"
        ids = TOK(text)["input_ids"]
        cut = {"truncate_prompt_tokens": 5}
        out = c.completions.create(model="tiny", prompt=text, max_tokens=4, echo=True,
                                   extra_body=cut)  # fmt: skip
        assert sched.requests[-1].prompt == ids[-5:] and out.usage.prompt_tokens == 5
        assert out.choices[0].text.startswith(TOK.decode(ids[-5:], skip_special_tokens=True))
        assert not out.choices[0].text.startswith(text)
        out = c.completions.create(model="tiny", prompt=[ids[:3], ids], max_tokens=4,
                                   echo=True, extra_body=cut)  # fmt: skip
        assert [r.prompt for r in sched.requests[-2:]] == [ids[:3], ids[-5:]]
        assert out.usage.prompt_tokens == 3 + 5
        assert out.choices[0].text.startswith(TOK.decode(ids[:3], skip_special_tokens=True))
        chat = c.chat.completions.create(model="tiny", messages=USER, max_tokens=4,
                                         extra_body=cut)  # fmt: skip
        whole = c.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
        assert chat.usage.prompt_tokens == 5 < whole.usage.prompt_tokens
        assert sched.requests[-2].prompt == sched.requests[-1].prompt[-5:]
        long = list(range(40, 40 + 80))  # more than the context: -1 cuts it to the context,
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": long,
                                                      "truncate_prompt_tokens": -1})  # fmt: skip
        assert r.status_code == 400 and "context holds 64" in r.json()["error"]["message"]
        c.completions.create(model="tiny", prompt=long[:20], max_tokens=2,
                             extra_body={"truncate_prompt_tokens": -1})  # fmt: skip
        assert sched.requests[-1].prompt == long[:20]  # (which leaves no room: as vLLM's)
        for extra, words in (
            ({}, "max_tokens was not given, and the completions default of 16"),
            ({"max_tokens": 10}, "max_tokens=10 with a 60-token prompt"),
        ):
            r = httpx.post(f"{url}/v1/completions",
                           json={"model": "tiny", "prompt": long[:60], **extra})  # fmt: skip
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "max_tokens", error
            assert words in error["message"] and "ask for at most 4" in error["message"], error
        for bad in (0, -2, 65, "5"):
            body = {"model": "tiny", "prompt": "a", "truncate_prompt_tokens": bad}
            r = httpx.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == "truncate_prompt_tokens", (bad, r.json())


def _bos_tokenizer(single: str = "<s> $A"):
    """The test tokenizer, adding what ``single`` says to every text (a BOS, or a BOS and EOS)."""
    from tokenizers import processors

    from fluid_npu.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(mask_token=True)
    marks = [(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>") if t in single]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=marks
    )
    return tok


def test_a_truncated_text_keeps_the_special_tokens_its_tokenizer_adds():
    """As vLLM cuts a text prompt (the tokenizer's own left truncation to K tokens): a BOS the
    tokenizer adds stays first, and the text's last K - 1 tokens follow it (a BOS and an EOS:
    both kept, K - 2 of the text between). A token-id prompt and a chat are cut plainly; a K that
    leaves no room for text beside the special tokens is a 400 naming it."""
    from fluid_npu.sampling.inputs import special_ends, text_specials, truncated_prompt

    tok = _bos_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    sched = ScriptedScheduler(max_len=64)
    with serving(sched, tokenizer=tok) as (url, _, _):
        c = client(url)
        text = "the quick brown fox"
        ids = tok(text)["input_ids"]
        assert ids[0] == bos and bos not in ids[1:]
        out = c.completions.create(model="tiny", prompt=text, max_tokens=2,
                                   extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
        assert sched.requests[-1].prompt == [bos, *ids[-4:]] and out.usage.prompt_tokens == 5
        c.completions.create(model="tiny", prompt=ids, max_tokens=2,
                             extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
        assert sched.requests[-1].prompt == ids[-5:]  # (ids are the client's: cut as given)
        c.completions.create(model="tiny", prompt=text, max_tokens=2, extra_body={
            "truncate_prompt_tokens": 5, "add_special_tokens": False})  # fmt: skip
        assert sched.requests[-1].prompt == ids[-5:]
        short = c.completions.create(model="tiny", prompt="fox", max_tokens=2,
                                     extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
        assert short.usage.prompt_tokens == 4
        assert sched.requests[-1].prompt == tok("fox")["input_ids"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": text,
                                                      "truncate_prompt_tokens": 1})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
        assert "add_special_tokens" in r.json()["error"]["message"]
    both = _bos_tokenizer("<s> $A </s>")
    ids = both(text)["input_ids"]
    eos = both.convert_tokens_to_ids("</s>")
    added = text_specials(both)
    assert added == ([bos], [eos]) and special_ends(added, ids) == (1, 1)
    assert truncated_prompt(ids, 4, 64, special_ends(added, ids)) == [ids[0], *ids[-3:-1], ids[-1]]
    assert text_specials(_bos_tokenizer("$A </s>")) == ([], [eos])
    assert text_specials(TOK) == ([], []) and special_ends(([], []), ids) == (0, 0)
    assert special_ends(([bos], []), [5, 6]) == (0, 0)  # (not there: cut plainly)
    # a text that itself starts with the EOS's text: the template's ends, not the text's, are kept
    odd = both("</s>abcdefgh")["input_ids"]
    assert odd[:2] == [bos, eos] and special_ends(added, odd) == (1, 1)
    for single in ("<s> $A", "<s> $A </s>", "$A </s>"):  # against the tokenizer's own cut
        hf = _bos_tokenizer(single)
        hf.truncation_side = "left"  # (vLLM's: the tokenizer's left truncation to K tokens)
        ends = text_specials(hf)
        for given in (text, "</s>abcdefgh", "<s>xy</s>z"):
            whole = hf(given)["input_ids"]
            for k in range(len(ends[0]) + len(ends[1]) + 1, len(whole) + 2):
                want = hf(given, truncation=True, max_length=k)["input_ids"]
                got = truncated_prompt(whole, k, 64, special_ends(ends, whole))
                assert got == want, (single, given, k)
