"""The flags of ``fluid serve`` and ``fluid run-batch`` (``fluid bench serve``'s: ``bench_cli.py``);
they register with ``fluid_npu.cli``.

``fluid serve [MODEL_DIR | --model DIR] [--adapter DIR] [--khead DIR] [--policy P] [--dtype D]
[--host H] [--port N] [--max-batch N] [--max-queue N] [--api-key KEY] [--threads N] ...`` runs the
OpenAI-compatible server (``fluid_npu.serve.server``); ``--api-key`` falls back to
``$FLUID_API_KEY``. ``fluid run-batch -i IN.jsonl -o OUT.jsonl --model DIR ...`` answers a file
of OpenAI batch requests with the same routes, offline (``fluid_npu.serve.batch``).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from fluid_npu.demo.pipeline import _positive  # the same integers as the demo's --threads
from fluid_npu.errors import ConfigError
from fluid_npu.serve.vllm_flags import add_vllm_flags, check_vllm_flags, model_given

if TYPE_CHECKING:
    from fluid_npu.serve.server import ServeSettings

# the model flags a spawned server gets (``fluid bench serve`` passes them on)
SERVER_KEYS = (
    "adapter", "khead", "mask_token", "dtype", "device", "max_batch", "gpu_memory_utilization",
    "max_len", "threads",
    "chat_template", "default_chat_template_kwargs", "prefix_cache_slots", "data_parallel_size",
)  # fmt: skip
SERVER_SWITCHES = ("compile", "no_engine_process", "no_adaptive_drafting",
                   "no_enable_prefix_caching", "trust_remote_code")  # fmt: skip


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base (or merged) HF model directory")
    p.add_argument("--adapter", default=None, help="Stage I LoRA adapter directory")
    p.add_argument("--khead", default=None, help="Stage II K-head directory")
    p.add_argument("--mask-token", default=None, help="MASK token (default: the tokenizer's)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model directory's own code where it needs it (openPangu's tokenizer, "
        "PanguTokenizer; vLLM's flag)",
    )
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (best accelerator, else CPU), a type (npu, cuda, cpu) or one card (npu:1)",
    )
    p.add_argument(  # (vLLM's names too)
        "--max-batch",
        "--max-num-seqs",
        type=int,
        default=None,
        help="requests decoded together (default 8; with --gpu-memory-utilization: as many as "
        "fit, at most 256)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        metavar="F",
        help="size the KV cache as vLLM does: the weights and the cache take at most this share "
        "of the device's memory (the host's on a CPU); without --max-batch the slots are as many "
        "as fit",
    )
    p.add_argument(
        "--max-len",
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + completion tokens per request (default: the model's context, at most "
        "4096; a sliding-window model's window less the policy's draft slots)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: inductor on a CPU, with CUDA graphs on CUDA, "
        "TorchAir's reduce-overhead graph mode on an Ascend NPU (needs torchair; not yet run on "
        "a 910B)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads for the engine (default: torch's, one per core); on a CPU shared "
        "with the clients or other servers, fewer is faster",
    )
    p.add_argument(
        "--no-adaptive-drafting",
        action="store_true",
        help="every step drafts the policy's blocks (no choices from measured step costs): the "
        "same TPF on any machine, not the fastest",
    )
    p.add_argument(
        "--no-enable-prefix-caching",
        action="store_true",
        help="encode every prompt whole (by default a prompt that starts with what a free slot's "
        "cache still holds — the conversation so far, a shared system prompt — encodes only the "
        "rest)",
    )
    p.add_argument(
        "--prefix-cache-slots",
        type=int,
        default=None,
        help="extra KV-cache rows (each the size of a request slot) that keep prompts' prefixes "
        "for later requests, so more conversations keep their history than --max-batch "
        "(default 0)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (a file, or the template itself) instead of the tokenizer's",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=None,
        help="engine ranks behind one address, each a server on its own device (on a CPU: its "
        "share of the cores); requests go to the rank holding their start, else the least busy "
        "(default 1)",
    )
    p.add_argument(
        "--no-engine-process",
        action="store_true",
        help="the engine (model, scheduler) in a thread of the HTTP server's process (default: a "
        "process of its own, as vLLM's engine core: the server's Python never holds up a step)",
    )
    p.add_argument(
        "--default-chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="the chat template's variables when a request sets none, e.g. "
        "'{\"enable_thinking\": false}' (a request's chat_template_kwargs go over them)",
    )


def _add_answer_flags(p: argparse.ArgumentParser) -> None:
    """How requests are answered: the flags ``fluid serve`` and ``fluid run-batch`` share."""
    _add_model_flags(p)
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="1 only: each engine holds the whole model on one device (more devices: "
        "--data-parallel-size)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vLLM's: no graphs — what the engine does unless --compile (so the two conflict)",
    )
    p.add_argument("--policy", default=None, help="ar | fixed:K | entropy[:T] | khead")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model ids clients send, the first the default (vLLM's: several are all listed "
        "and accepted); default: the model folder's name, and the --model string as given",
    )
    p.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="one line on stderr per request (per choice: n, several prompts) that ends (id, "
        "route, finish reason, token counts, TPF, TTFT, latency; no text) and per refused "
        "request (status, field, id); with --data-parallel-size the front writes each "
        "request's id, rank and status, the ranks nothing",
    )
    p.add_argument(
        "--generation-config",
        default="auto",
        help="where the decoding settings a request leaves out come from (vLLM's flag): auto "
        "(the model's generation_config.json), vllm (OpenAI's: temperature 1, top_p 1) or a "
        "folder holding a generation_config.json",
    )
    p.add_argument(
        "--override-generation-config",
        default=None,
        help="JSON: decoding defaults set over --generation-config's (vLLM's flag), some of "
        "temperature, top_p, top_k, min_p, repetition_penalty, e.g. '{\"temperature\": 0.6}'",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        help="deepseek_r1 | qwen3 | openpangu: a chat answer's reasoning in the message's "
        "reasoning (and reasoning_content), apart from its content",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let the model call the tools a chat request offers (tool_choice 'auto'): its "
        "calls come back as the message's tool_calls (needs --tool-call-parser)",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="how the model writes its tool calls: hermes (Qwen2.5, Qwen3, Hermes: <tool_call> "
        "JSON blocks) | pangu (openPangu: a JSON list between [unused11] and [unused12]) | "
        "llama3_json (Llama 3.x: an answer of JSON calls, ';'-separated) | mistral (a JSON "
        "list, or name[ARGS]{...}, after [TOOL_CALLS]) | qwen3_coder (Qwen3-Coder, Qwen3.5: "
        "<tool_call><function=NAME><parameter=ARG>value</parameter>..., typed by the tools' "
        "schemas; also named qwen3_xml)",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let a request bring its own chat_template (rendered in transformers' sandbox)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens a request encodes per step (default 512): larger starts long prompts "
        "sooner, smaller keeps the running requests' steps short (vLLM bounds a whole step's "
        "tokens with --max-num-batched-tokens instead)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="torch's seed at start, so requests without a seed draw the same numbers after a "
        "restart (given the same requests in the same order)",
    )
    p.add_argument(
        "--scheduling-policy",
        default="fcfs",
        help="which waiting request gets the next free slot: fcfs (arrival order) | priority "
        "(a request's priority field, lower first, then arrival; running requests are not "
        "preempted)",
    )
    p.add_argument(
        "--logprobs-mode",
        default="raw_logprobs",
        help="what logprobs hold (vLLM's modes): raw_logprobs (the model's own distribution; "
        "the default, as vLLM) | processed_logprobs (the one the token was drawn from: logit "
        "bias, penalties, grammar, temperature, top-k/top-p/min-p) | raw_logits | "
        "processed_logits; prompt logprobs (echo) are the model's own in every mode",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="the most alternatives a request's logprobs / top_logprobs / prompt_logprobs may ask "
        "for (default 20, OpenAI's; -1: every token of the vocabulary, which a request asks for "
        "with -1 and which slows every step of its batch and may take gigabytes), as vLLM's flag",
    )
    p.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprobs name each token 'token_id:N' (its bytes still the token's own), unless a "
        "request's return_tokens_as_token_ids says otherwise (vLLM's flag)",
    )


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model directory, as `vllm serve MODEL` takes it (or --model)",
    )
    _add_answer_flags(p)
    add_vllm_flags(p, http=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--max-queue", type=int, default=None, help="waiting places beyond the batch (429 past it)"
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="SIGTERM: seconds to finish requests"
    )
    p.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="an X-Request-Id header on every response (a client's own X-Request-Id names its "
        "answer either way)",
    )
    p.add_argument(
        "--allowed-origins",
        default=None,
        metavar="JSON",
        help="browser page origins that may call the server, a JSON list ('[\"*\"]': any); "
        "default none (vLLM allows any: here opt-in, as the server needs no key by default)",
    )
    p.add_argument("--allowed-methods", default=None, metavar="JSON", help="with --allowed-origins")
    p.add_argument("--allowed-headers", default=None, metavar="JSON", help="with --allowed-origins")
    p.add_argument(
        "--allow-credentials", action="store_true", help="with --allowed-origins: cookies too"
    )
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS: the PEM private key")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS: the PEM certificate")
    p.add_argument("--ssl-ca-certs", default=None, help="who signs the clients' certificates")
    p.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        help="client certificates: 0 not asked (default), 1 optional, 2 required",
    )
    p.set_defaults(handler=serve_command)


def add_run_batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run-batch",
        help="answer a file of OpenAI batch requests (JSONL) offline, as the server would",
    )
    p.add_argument(
        "-i", "--input-file", required=True, help="JSONL: one {custom_id, method, url, body} a line"
    )
    p.add_argument(
        "-o", "--output-file", required=True, help="JSONL: one answer a line, in the input's order"
    )
    _add_answer_flags(p)
    add_vllm_flags(p, http=False)
    p.set_defaults(handler=run_batch_command)


def need_serve_extra() -> None:
    """FastAPI, uvicorn, prometheus-client and httpx, or one error naming the extra."""
    import importlib.util

    missing = [
        name
        for name in ("fastapi", "uvicorn", "prometheus_client", "httpx")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ConfigError(
            f"fluid serve needs {', '.join(missing)}: pip install -e '.[serve]' (or '.[dev]')"
        )


def _settings(args: argparse.Namespace, **serving: object) -> ServeSettings:
    """The settings of the flags ``_add_answer_flags`` adds, and ``serving``'s (host, port, ...)."""
    from fluid_npu.serve.server import ServeSettings

    args.model = model_given(args)
    check_vllm_flags(args)
    if args.tensor_parallel_size != 1:
        raise ConfigError(
            f"--tensor-parallel-size {args.tensor_parallel_size}: an engine holds the whole model "
            "on one device here; serve on more devices with --data-parallel-size N (a copy each)"
        )
    if args.enforce_eager and args.compile:
        raise ConfigError(
            "--enforce-eager and --compile contradict each other: the engine runs eager unless "
            "--compile; give one"
        )
    from fluid_npu import device as devices

    one_card = devices.card_type(args.device)
    if one_card is not None and (args.data_parallel_size or 1) > 1:
        raise ConfigError(
            f"--device {args.device} names one card, and --data-parallel-size "
            f"{args.data_parallel_size} gives each rank its own: give the type alone "
            f"(--device {one_card}), and pick the cards with {devices.VISIBLE_DEVICES[one_card]}"
        )
    batch = args.max_batch  # (None with --gpu-memory-utilization: as many as fit)
    if batch is None and args.gpu_memory_utilization is None:
        batch = 8
    return ServeSettings(
        model=args.model,
        adapter=args.adapter,
        khead=args.khead,
        policy=args.policy,
        dtype=args.dtype,
        device=args.device,
        mask_token=args.mask_token,
        max_batch=batch,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_len=args.max_len,
        served_model_name=None if args.served_model_name is None else tuple(args.served_model_name),
        trust_remote_code=args.trust_remote_code,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        enable_log_requests=args.enable_log_requests,
        compile=args.compile,
        adaptive=not args.no_adaptive_drafting,
        prefix_caching=not args.no_enable_prefix_caching,
        prefix_cache_slots=args.prefix_cache_slots or 0,
        threads=args.threads,
        chat_template=args.chat_template,
        default_chat_template_kwargs=args.default_chat_template_kwargs,
        trust_request_chat_template=args.trust_request_chat_template,
        reasoning_parser=args.reasoning_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        data_parallel_size=1 if args.data_parallel_size is None else args.data_parallel_size,
        engine_process=not args.no_engine_process,
        scheduling_policy=args.scheduling_policy,
        logprobs_mode=args.logprobs_mode,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        max_logprobs=args.max_logprobs,
        prefill_chunk=args.prefill_chunk,
        seed=args.seed,
        **serving,  # type: ignore[arg-type]
    )


def serve_command(args: argparse.Namespace) -> int:
    need_serve_extra()
    from fluid_npu.serve.network import Network, json_list
    from fluid_npu.serve.server import serve

    def listed(flag: str, text: str | None, default: list[str] | None) -> list[str] | None:
        return default if text is None else json_list(flag, text)

    network = Network(
        allowed_origins=listed("--allowed-origins", args.allowed_origins, None),
        allowed_methods=listed("--allowed-methods", args.allowed_methods, ["*"]),
        allowed_headers=listed("--allowed-headers", args.allowed_headers, ["*"]),
        allow_credentials=args.allow_credentials,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
    )
    settings = _settings(
        args,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        # (an empty --api-key or $FLUID_API_KEY, say "$KEY" unset, is refused by the settings:
        # never no key)
        api_key=os.environ.get("FLUID_API_KEY") if args.api_key is None else args.api_key,
        drain_timeout=args.drain_timeout,
        enable_request_id_headers=args.enable_request_id_headers,
        network=network,
        root_path=args.root_path,
        uvicorn_log_level=args.uvicorn_log_level,
    )
    if settings.data_parallel_size > 1:
        from fluid_npu.serve.dp import serve_data_parallel

        return serve_data_parallel(settings)
    return serve(settings)


def run_batch_command(args: argparse.Namespace) -> int:
    need_serve_extra()
    from fluid_npu.serve.batch import run_batch

    return run_batch(_settings(args), args.input_file, args.output_file)
