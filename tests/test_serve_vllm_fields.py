"""vLLM's request fields beside the sampling ones on ``fluid serve`` (``serve/vllm_fields.py``):
``add_special_tokens`` (a completion's text prompt without the tokenizer's BOS), ``request_id``
(the id where no header gives one), ``cache_salt`` (handed to the engine), ``include_reasoning:
false`` (a reasoning parser's part left out) and beam search at its neutral value only — driven
over HTTP against the scripted scheduler of ``test_serve_http.py``."""

from __future__ import annotations

import httpx
from test_serve_http import ReasoningScheduler, ScriptedScheduler, client, serving

from fluid_npu.model.tiny import build_tiny_tokenizer

USER = [{"role": "user", "content": "2+2?"}]


def test_add_special_tokens_false_encodes_a_text_prompt_without_bos():
    adds = build_tiny_tokenizer(mask_token=True)
    adds.add_bos_token = True  # (openPangu's and Llama's tokenizers prepend BOS to a text)
    bos = adds.bos_token_id
    sched = ScriptedScheduler()
    with serving(sched, tokenizer=adds) as (url, _, _):
        c = client(url)
        c.completions.create(model="tiny", prompt="hi there", max_tokens=2)
        assert sched.requests[-1].prompt[0] == bos
        off = {"add_special_tokens": False}
        out = c.completions.create(model="tiny", prompt=["<s>hi there", "hi"], max_tokens=2,
                                   extra_body=off)  # fmt: skip
        own = adds("<s>hi there", add_special_tokens=False)["input_ids"]
        hi = adds("hi", add_special_tokens=False)["input_ids"]
        assert [r.prompt for r in sched.requests[-2:]] == [own, hi]
        assert own.count(bos) == 1  # the prompt's own BOS, no second one
        assert out.usage.prompt_tokens == len(own) + len(hi)
        c.completions.create(model="tiny", prompt=[bos, 104, 105], max_tokens=2, extra_body=off)
        assert sched.requests[-1].prompt == [bos, 104, 105]  # token ids: taken as given
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=off)
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"messages": USER, "add_special_tokens": True})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "add_special_tokens"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "", "add_special_tokens": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # no tokens left


def test_a_body_request_id_names_the_request_unless_a_header_does():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "request_id": "job-17"}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["id"] == "cmpl-job-17"
        assert sched.requests[-1].request_id == "cmpl-job-17"
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": "hdr-1"})
        assert r.json()["id"] == "cmpl-hdr-1"  # the header wins, as in vLLM
        chat = {"messages": USER, "max_tokens": 2, "request_id": "chat-9"}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).json()["id"] == "chatcmpl-chat-9"
        for bad in ("", "has space", "x" * 300, 5):
            r = httpx.post(f"{url}/v1/completions", json={**body, "request_id": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", bad
        answer = {"input": "hi", "max_output_tokens": 2, "request_id": "r-1", "cache_salt": "s"}
        r = httpx.post(f"{url}/v1/responses", json=answer)
        assert r.status_code == 200 and r.json()["id"] == "resp_r-1"
        assert sched.requests[-1].cache_salt == "s"
        # one running request per id: the refusal names where the id came from
        sched.gate.clear()  # (the first request waits on the engine's step)
        with httpx.Client() as http:
            import threading

            first = threading.Thread(target=http.post, args=(f"{url}/v1/completions",),
                                     kwargs={"json": {**body, "request_id": "dup"}})  # fmt: skip
            first.start()
            try:
                for _ in range(500):
                    if any(r.request_id == "cmpl-dup" for r in sched.requests):
                        break
                    threading.Event().wait(0.01)
                r = httpx.post(f"{url}/v1/completions", json={**body, "request_id": "dup"})
                assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"
                assert "send another request_id" in r.json()["error"]["message"]
            finally:
                sched.gate.set()
                first.join(30)


def test_a_cache_salt_reaches_the_engine():
    """(what it keys: tests/test_prefix_reuse.py)"""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        for route, body in (("completions", {"prompt": "a"}), ("chat/completions",
                                                              {"messages": USER})):  # fmt: skip
            r = httpx.post(f"{url}/v1/{route}", json={**body, "cache_salt": "tenant-7"})
            assert r.status_code == 200 and sched.requests[-1].cache_salt == "tenant-7"
            httpx.post(f"{url}/v1/{route}", json=body)
            assert sched.requests[-1].cache_salt is None
            for bad in ("", 7):
                r = httpx.post(f"{url}/v1/{route}", json={**body, "cache_salt": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_beam_search_is_accepted_at_its_neutral_value_only():
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        for ok in ({"use_beam_search": False}, {"length_penalty": 1.0}):
            assert httpx.post(f"{url}/v1/completions", json={**body, **ok}).status_code == 200
        for name, bad in (("use_beam_search", True), ("length_penalty", 0.5)):
            r = httpx.post(f"{url}/v1/completions", json={**body, name: bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == name


def test_include_reasoning_false_leaves_the_reasoning_out():
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    thought, reply = "Two and two: 4.", " The answer is 4."
    sched = ReasoningScheduler()
    sched.output = [start, *ids(thought), end, *ids(reply)]
    hide = {"include_reasoning": False}
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3") as (url, _, _):
        c = client(url)
        shown = c.chat.completions.create(model="tiny", messages=USER, max_tokens=60)
        assert shown.choices[0].message.model_extra["reasoning"] == thought
        out = c.chat.completions.create(model="tiny", messages=USER, max_tokens=60,
                                        extra_body=hide)  # fmt: skip
        message = out.choices[0].message
        assert message.content == reply and message.model_extra["reasoning"] is None
        assert message.model_extra["reasoning_content"] is None
        assert out.usage.completion_tokens == shown.usage.completion_tokens  # (still generated)
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, max_tokens=60,
                                                stream=True, extra_body=hide))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.content or "" for d in deltas) == reply
        assert not any(d.model_extra.get("reasoning") for d in deltas)
        blank = [d for d in deltas if d.content == "" and not d.role]
        assert not blank  # (a hidden reasoning delta sends no chunk of nothing)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", **hide})
        assert r.status_code == 400 and r.json()["error"]["param"] == "include_reasoning"


def test_ignore_eos_still_holds_eos_back_before_min_tokens():
    """(the engine's side: tests/test_stops_min_tokens.py)"""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        body = {"prompt": "a", "max_tokens": 8}
        for extra, hold in (({"ignore_eos": True, "min_tokens": 4}, tuple(sched.eos_ids)),
                            ({"min_tokens": 4}, ()), ({"ignore_eos": True}, ())):  # fmt: skip
            assert httpx.post(f"{url}/v1/completions", json={**body, **extra}).status_code == 200
            assert tuple(sched.requests[-1].min_tokens_hold) == hold, extra
