"""The FastAPI application: OpenAI routes that check requests and submit them to the engine
(one scheduler request per prompt); ``generation.py`` turns their events into responses. No model
code lives here; the ``Worker`` owns the model.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses`` (the
Responses API, stateless: ``responses_request.py`` / ``responses_output.py``; all with ``stream``),
``POST /v1/responses/input_tokens`` (a response's prompt length; the routes that would read,
cancel or delete a stored response answer 404: none is kept),
``GET /v1/models``, vLLM's ``POST /tokenize`` / ``POST /detokenize`` / ``GET /tokenizer_info``,
``GET /health`` (503 after an engine failure; a drain closes the socket), ``GET /metrics``
(Prometheus text) and ``GET /version``. A request's id is its client's ``X-Request-Id``
(``http.request_id``; one running request per id) or a random one. With an API key every ``/v1``
route and the tokenizer routes need ``Authorization: Bearer KEY`` (401 otherwise: they spend the
server's CPU and show its chat template); ``/health`` and ``/metrics`` stay open, as in vLLM.

A request is checked before it touches the engine (``admission.py``): body size and JSON, fields
(``protocol``), model name (404), prompt + ``max_tokens`` against the context (400), then capacity
— when the requests in flight already fill the batch and ``max_queue`` waiting places, the answer
is 429 with ``Retry-After``. A client that disconnects (streaming or not) has its request aborted,
which frees its slot before the scheduler's next step; one that leaves while its structured
output's grammar waits for a compile thread never has it compiled.

Prompts are tokenized (and chat templates rendered) on one thread beside the event loop, as vLLM
does: a long text (a 4 MiB body tokenizes for seconds) never stalls the other requests' streams,
and one thread keeps a flood of them to one core, away from the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fluid_npu import __version__
from fluid_npu.sampling.detok import end_tokens
from fluid_npu.sampling.grammar import Grammar
from fluid_npu.sampling.inputs import special_ends, text_specials
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.serve import protocol
from fluid_npu.serve.admission import Admission
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.generation import (
    Echo,
    Generation,
    Parent,
    encode_prompts,
    events,
    logged_param,
    prompt_texts,
    request_log,
    text_reader,
    usage,
)
from fluid_npu.serve.http import (
    ClientGone,
    ClosingStream,
    RequestIdHeader,
    answered,
    body_request_id,
    check_key,
    openai_errors,
    read_parsed,
    request_id,
    route_path,
    while_connected,
)
from fluid_npu.serve.metrics import ServerMetrics
from fluid_npu.serve.probes import model_card, probe_routes
from fluid_npu.serve.reasoning import reasoning_parser
from fluid_npu.serve.responses import Shape
from fluid_npu.serve.responses_output import ResponseOutput, not_kept_routes
from fluid_npu.serve.responses_output import answer as respond_with
from fluid_npu.serve.responses_request import parse_responses
from fluid_npu.serve.settings import ServeConfig
from fluid_npu.serve.structured import COMPILE_THREADS, Grammars, grammar_after
from fluid_npu.serve.text import TokenText, chat_ids
from fluid_npu.serve.token_fields import bad_word_ids
from fluid_npu.serve.tokenizing import tokenizer_routes
from fluid_npu.serve.tools import ToolSetting, tool_parser
from fluid_npu.serve.worker import Worker


def create_app(worker: Worker, tokenizer: Any, config: ServeConfig) -> FastAPI:
    """The server's ASGI application around a (not yet started) ``Worker``."""
    metrics = ServerMetrics(
        config.model_name, getattr(worker.scheduler, "k", 0), config.max_len, config.max_batch
    )
    worker.on_step, worker.on_failure = metrics.on_step, metrics.on_failure
    words = TokenText(tokenizer)  # log-probability tokens' text and bytes
    reasoning = None
    if config.reasoning_parser is not None:
        reasoning = reasoning_parser(config.reasoning_parser, tokenizer)
    calling = None if config.tool_call_parser is None else tool_parser(
        config.tool_call_parser, tokenizer)  # fmt: skip
    # prompts are tokenized here, off the event loop (the module docstring); the thread starts
    # with the first request
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluid-tokenize")
    # structured outputs: compiled on threads of their own (a slow schema holds up no prompt),
    # by a compiler made at the first one; several at once (COMPILE_THREADS), so that one slow
    # schema holds up no other request's (xgrammar's compiler is thread-safe, its work C++)
    grammars = Grammars(tokenizer, config.vocab_size or len(tokenizer), worker.scheduler.eos_ids)
    compiling = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="fluid-grammar")
    gate = Admission(config, worker)  # the checks a request passes before the engine
    specials = text_specials(tokenizer)  # what it adds to a text (kept when one is truncated)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # (/health: uvicorn's "auto" runs on uvloop when it is installed, else asyncio's own loop)
        config.info["event_loop"] = type(loop).__module__.split(".")[0]
        worker.start(loop)
        banner = getattr(app.state, "banner", None)
        if banner:
            print(banner, file=sys.stderr, flush=True)
        try:
            yield
        finally:  # (an in-process run that is cancelled stops its engine thread too: batch.py)
            worker.stop()
            for pool in (tokenizing, compiling):
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fluid serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    def refused(request: Request, exc: APIError) -> None:
        route = route_path(request)
        if route in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
            metrics.refused(route, exc.status)
            rid = getattr(request.state, "request_id", "-")
            request_log.info("refused %s %d %s %s", route, exc.status,
                             logged_param(exc), rid)  # fmt: skip

    openai_errors(app, refused)
    if config.request_id_headers:  # (after openai_errors: outside its catch-all, so on 500s too)
        app.add_middleware(RequestIdHeader)

    def authorize(request: Request) -> None:
        check_key(request.headers.get("authorization", ""), config.api_key)

    async def checked(
        request: Request, prompts: list[list[int]], s: protocol.Sampling, chat: bool, rid: str,
        id_param: str,
    ) -> tuple[list[int], SamplingParams, Grammar | None]:  # fmt: skip
        """Every check of a request's prompts and settings — each prompt against the context,
        the sampling settings, the size of its log-probabilities, the server's room, its id
        (``rid``) not running — then its grammar (``s.constraint`` compiled on the grammar
        pool), so that a refused request costs no compile (a chat's tools forced by
        ``tool_choice`` take seconds and gigabytes): each prompt's token limit, the engine's
        settings and the grammar, for ``admit``. A client that leaves while its grammar waits
        for a compile thread (or compiles) is ``ClientGone``: a compile not started never runs
        (one that started ends on its thread, its result dropped)."""
        limits = [gate.length(ids, s, "messages" if chat else "prompt") for ids in prompts]
        loop = asyncio.get_running_loop()
        if s.bad_words:  # (on the tokenizing thread: a long list takes a while)
            s.params["bad_words"] = await loop.run_in_executor(tokenizing, bad_word_ids, tokenizer,
                                                               s.bad_words)  # fmt: skip
        params = gate.sampling(s, min(limits), chat, config.vocab_size or len(tokenizer))
        gate.answer_size(prompts, limits, s, chat)
        gate.capacity(len(prompts) * s.n, s.n)
        gate.id_free(rid, id_param)
        if s.constraint is None:
            return limits, params, None
        compiled = loop.run_in_executor(compiling, grammars.compile, s.constraint)
        if not await while_connected(request, compiled):  # (cancelled: a queued one never runs)
            raise ClientGone
        return limits, params, compiled.result()

    async def admit(
        shapes: list[Shape],
        prompts: list[list[int]],
        s: protocol.Sampling,
        arrived: float,
        settled: tuple[list[int], SamplingParams, Grammar | None],
        texts: list[str] | None = None,
        tools: ToolSetting | None = None,
        continuing: bool = False,
        *,
        rid: str,
        id_param: str = "X-Request-Id",
    ) -> list[Generation]:
        """Submit a request's prompts, ``s.n`` choices each (``shapes``: one per choice, prompt
        by prompt), checked by ``checked`` (``settled``: what it returned): one ``Generation``
        per choice. ``texts``: the prompts' text, which ``echo`` returns; ``tools``: a chat's
        (its calls parsed out); ``continuing``: a chat that continues its final message;
        ``rid``: the request's id (``http.request_id``), one running request per id on every
        route."""
        limits, params, grammar = settled
        stops = s.stop_token_ids
        # (the room again: a grammar's compile let others in; counted at once by submit_many)
        gate.capacity(len(shapes), s.n)
        # the tokens that end it (EOS unless ignored, stop_token_ids) and those never spelled
        eos, ends, unspelled = end_tokens(worker.scheduler.eos_ids, stops, bool(s.ignore_eos),
                                          s.include_stop, s.skip_special)  # fmt: skip
        # vLLM's stop_reason names these: stop_token_ids and a generation config's further EOS
        # ids, not the tokenizer's own EOS (which vLLM checks first) unless EOS is ignored
        own = None if s.ignore_eos else tokenizer.eos_token_id
        named = {*(t for t in stops if t != own), *(t for t in eos if t != own)}
        # a chat's reasoning apart from its answer; a grammar holds the answer (structured.py)
        split = reasoning if shapes[0].chat else None
        requests = [
            (
                # (a choice's own: vLLM's "K_ID", which no client's X-Request-Id can be)
                shape.id if len(shapes) == 1 else f"{shape.index}_{shape.id}",
                prompts[shape.index // s.n],
                {
                    "max_new_tokens": max(limits[shape.index // s.n], 1),  # (0: one, dropped)
                    "sampling": params.seeded_for(shape.index % s.n),
                    "grammar_after": grammar_after(
                        split, grammar, prompts[shape.index // s.n], continuing
                    ),
                    "priority": s.priority,
                    "cache_salt": s.cache_salt,
                },
            )
            for shape in shapes
        ]
        gate.take_id(rid, len(shapes), id_param)  # (free once every choice's Generation closed)
        try:
            streams = await submit(requests, s, split, grammar, arrived, ends)
        except BaseException:
            gate.release_id(rid, len(shapes))
            raise
        gens: list[Generation] = []
        parents = [Parent(metrics, s.n) for _ in prompts]
        for shape, stream in zip(shapes, streams):
            k = shape.index // s.n  # the choice's prompt
            spelled = {} if tools is None else tools.spelled  # tool-call markers written out
            detok = text_reader(tokenizer, split, s, prompts[k], unspelled, spelled)
            shape.reasoning, shape.show_reasoning = split is not None, s.include_reasoning
            if detok.spelled_context:  # the output's leading space is kept: offsets count it
                shape.strip = 0
            echo = None
            if s.echo and texts is not None:
                echo = Echo(texts[k], prompts[k], limits[k] > 0, s.params["top_logprobs"])
                shape.echoing(len(prompts[k]), texts[k])
            reader = None if tools is None else tools.reader()  # a chat's tool calls parsed out
            gens.append(Generation(worker, metrics, stream, detok, s.params["logprobs"], echo,
                                   reader, named))  # fmt: skip
            stream.when_released(lambda: gate.release_id(rid))  # (once its engine request ends)
            gens[-1].parent, gens[-1].max_tokens = parents[k], limits[k]
        return gens

    async def submit(
        requests: list[tuple[str, list[int], dict[str, Any]]], s: protocol.Sampling,
        split: Any, grammar: Grammar | None, arrived: float, ends: list[int],
    ) -> list[Any]:  # fmt: skip
        """A request's choices into the engine, admitted together (one step prefills them);
        ``ends``: the tokens that end them (EOS unless ignored, stop_token_ids)."""
        return await worker.submit_many(
            requests,
            arrived,
            eos_ids=None if ends == worker.scheduler.eos_ids else ends,  # (None: the engine's)
            # ignore_eos: EOS ends nothing, but min_tokens still holds it back (vLLM's rule)
            min_tokens_hold=(
                tuple(worker.scheduler.eos_ids) if s.ignore_eos and s.params["min_tokens"] else ()
            ),
            stop=tuple(s.stop),
            # reasoning apart: no stop string spans the closing marker, as the split text reads
            stop_reset=None if split is None else split.end,
            skip_special=s.skip_special,
            grammar=grammar,
        )

    async def reply(
        request: Request, endpoint: str, shapes: list[Shape], s: protocol.Sampling,
        gens: list[Generation],
    ) -> Response:  # fmt: skip
        """The answer to a request whose choices run (``admit``): streamed, or whole once every
        choice has ended."""
        if s.stream:
            return ClosingStream(
                events(gens, shapes, s), lambda: [gen.close(endpoint) for gen in gens]
            )
        pieces: list[list[str]] = [[] for _ in gens]
        thoughts: list[list[str]] = [[] for _ in gens]
        calls: list[list[dict[str, Any]]] = [[] for _ in gens]

        async def collect(n: int) -> None:
            async for text, _, reasoning, called in gens[n].deltas():
                pieces[n].append(text)
                thoughts[n].append(reasoning)
                calls[n] += called

        work = asyncio.ensure_future(asyncio.gather(*(collect(n) for n in range(len(gens)))))
        try:
            finished = await while_connected(request, work)
        finally:
            for gen in gens:
                gen.close(endpoint)
        if not finished:  # the client is gone: nobody reads an answer
            return Response(status_code=499)
        try:
            work.result()  # an engine failure raises its APIError here
        except APIError as exc:  # counted once, by close (finish_reason "error"), not as a refusal
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        def build() -> JSONResponse:
            choices = [shape.choice("".join(text), gen.finish_reason, gen.logprobs,
                                    "".join(thought), call, gen.token_ids, gen.prompt_lps,
                                    gen.stop_reason)
                       for shape, gen, text, thought, call in zip(shapes, gens, pieces, thoughts,
                                                                  calls)]  # fmt: skip
            return JSONResponse(shapes[0].answer(choices, usage(gens, s.n), gens[0].prompt_lps))

        return await answered(
            build, s.params["logprobs"] or s.params["prompt_logprobs"] is not None
        )

    async def conversation_ids(req: protocol.ChatRequest) -> list[int]:
        """A chat request's prompt (checked and rendered on the tokenizing thread)."""
        gate.model(req.sampling.model)
        gate.template(req.render)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(tokenizing, chat_ids, tokenizer, req.messages,
                                          req.render, config.template_kwargs,
                                          req.tools.tools)  # fmt: skip

    async def answer(request: Request, chat: bool) -> Response:
        arrived = time.monotonic()
        authorize(request)
        base = request_id(request)  # (the client's X-Request-Id, else a random one)
        req = await (read_parsed(request, protocol.parse_chat, calling) if chat
                     else read_parsed(request, protocol.parse_completion))  # fmt: skip
        base = body_request_id(request, req.sampling.request_id)
        gate.model(req.sampling.model)
        loop = asyncio.get_running_loop()
        texts = None
        if isinstance(req, protocol.ChatRequest):
            prompts = gate.truncated([await conversation_ids(req)], req.sampling.truncate)
            cid = f"chatcmpl-{base}"
        else:
            whole = await loop.run_in_executor(tokenizing, encode_prompts, tokenizer, req.prompts,
                                               req.sampling.add_special)  # fmt: skip
            cut_text = req.sampling.truncate is not None and req.sampling.add_special
            ends = [special_ends(specials, ids) if cut_text and isinstance(p, str) else (0, 0)
                    for p, ids in zip(req.prompts, whole)]  # fmt: skip
            prompts = gate.truncated(whole, req.sampling.truncate, ends)
            if req.sampling.echo:  # the text as given; token ids decoded (as vLLM echoes them)
                given = [g if len(ids) == len(cut) else cut  # (a cut text: what is left of it)
                         for g, ids, cut in zip(req.prompts, whole, prompts)]  # fmt: skip
                texts = await loop.run_in_executor(tokenizing, prompt_texts, tokenizer, given,
                                                   prompts, req.sampling.skip_special)  # fmt: skip
            cid = f"cmpl-{base}"
        created = int(time.time())
        s = req.sampling
        as_ids = config.tokens_as_ids if s.tokens_as_ids is None else s.tokens_as_ids
        shapes = [Shape(chat, cid, config.model_name, words, index=k, created=created,
                        skip_special=s.skip_special, return_ids=s.return_token_ids, as_ids=as_ids)
                  for k in range(len(prompts) * s.n)]  # fmt: skip
        for shape in shapes:
            shape.prompt_ids, shape.prompt_top = prompts[shape.index // s.n], s.prompt_logprobs
        tools = req.tools if isinstance(req, protocol.ChatRequest) else None
        settled = await checked(request, prompts, req.sampling, chat, base,
                                request.state.id_param)  # fmt: skip
        chat_req = isinstance(req, protocol.ChatRequest)
        continuing = chat_req and req.render.continue_final_message  # type: ignore[union-attr]
        gens = await admit(shapes, prompts, req.sampling, arrived, settled, texts, tools,
                           continuing, rid=base, id_param=request.state.id_param)  # fmt: skip
        return await reply(request, route_path(request), shapes, req.sampling, gens)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, chat=True)

    @app.post("/v1/responses")  # the Responses API, answered as a chat (responses_request.py)
    async def respond(request: Request) -> Response:
        arrived = time.monotonic()
        authorize(request)
        request_id(request)
        req = await read_parsed(request, parse_responses, calling)
        base = body_request_id(request, req.chat.sampling.request_id)
        rid = f"resp_{base}"
        shape = Shape(True, rid, config.model_name, words, as_ids=config.tokens_as_ids)
        try:  # (the later checks name the chat fields: renamed as the request gave them)
            prompt = await conversation_ids(req.chat)
            settled = await checked(request, [prompt], req.chat.sampling, True, base,
                                    request.state.id_param)  # fmt: skip
            gen, = await admit([shape], [prompt], req.chat.sampling, arrived, settled, None,
                               req.chat.tools, rid=base,
                               id_param=request.state.id_param)  # fmt: skip
        except APIError as exc:
            raise req.came.renamed(exc) from None
        settings = dict(req.settings)
        for k in ("temperature", "top_p"):  # as decoded: the server's default when left out
            settings[k] = getattr(config.defaults, k) if settings[k] is None else settings[k]
        out = ResponseOutput(rid, config.model_name, settings, shape)
        return await respond_with(request, out, gen, bool(req.chat.sampling.stream),
                                  route_path(request))  # fmt: skip

    @app.post("/v1/responses/input_tokens")  # the client's responses.input_tokens.count
    async def input_tokens(request: Request) -> dict[str, Any]:
        """The tokens a response's input takes: its prompt, rendered as the route renders it."""
        authorize(request)
        req = await read_parsed(request, parse_responses, calling)
        try:
            prompt = await conversation_ids(req.chat)
        except APIError as exc:
            raise req.came.renamed(exc) from None
        return {"object": "response.input_tokens", "input_tokens": len(prompt)}

    not_kept_routes(app, authorize)

    names = (config.model_name, *config.other_names)
    cards = {name: model_card(name, config.root, config.max_len) for name in names}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        authorize(request)
        gate.model(model)
        return cards.get(model, cards[config.model_name])

    # vLLM's tokenizer routes (lm-evaluation-harness finds them and needs no local tokenizer)
    tokenizer_routes(app, tokenizer, config.max_len, config.template_kwargs, tokenizing,
                     authorize, gate.model, gate.template)  # fmt: skip

    @app.get("/version")  # (vLLM's)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/health")
    async def health() -> JSONResponse:
        if not worker.alive:
            return JSONResponse({"status": "engine failed", "error": str(worker.error)}, 503)
        if worker.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok", "model": config.model_name, "info": config.info})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    probe_routes(app, health, lambda: len(gate.running))  # (requests, as vLLM counts them)
    return app
