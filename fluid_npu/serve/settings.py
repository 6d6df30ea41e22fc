"""``fluid serve``'s settings (``ServeSettings``: every flag of ``fluid serve`` / ``fluid
run-batch``, checked before anything loads), the model ids it answers to (``served_names``,
``model_aliases``) and what the application reads of them (``ServeConfig``, ``app.py``'s)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.generation_defaults import check_override
from fluid_npu.sampling.inputs import DTYPE_ALIASES
from fluid_npu.sampling.requests import LOGPROBS_MODES, SCHEDULING_POLICIES
from fluid_npu.serve.network import Network
from fluid_npu.serve.protocol import MAX_TOP_LOGPROBS, SamplingDefaults

DTYPES = ("auto", "float32", "bfloat16", "float16")


OVERRIDE_FLAG = "--override-generation-config"
# what it may set: the defaults the server reads (not max_new_tokens, which it does not read)
SERVED_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServeSettings:
    model: str
    adapter: str | None = None
    khead: str | None = None
    policy: str | None = None  # None: khead with a K-head, else entropy
    dtype: str = "auto"
    device: str = "auto"
    mask_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = 8  # None: as many as gpu_memory_utilization holds (set at load)
    gpu_memory_utilization: float | None = None  # vLLM's: weights + KV cache within this share
    max_queue: int | None = None
    max_len: int | None = None
    api_key: str | None = None
    served_model_name: tuple[str, ...] | None = None  # the first: the default id
    generation_config: str = "auto"  # the defaults' source: auto | vllm | a folder (vLLM's flag)
    override_generation_config: str | None = None  # JSON: defaults set over those (vLLM's flag)
    enable_log_requests: bool = False  # a line per request on stderr (generation.request_log)
    enable_request_id_headers: bool = False  # X-Request-Id on every response (http.py)
    drain_timeout: float = 30.0
    compile: bool = False
    adaptive: bool = True  # the engine's cost-driven drafting choices (False: fixed blocks)
    prefix_caching: bool = True  # a prompt reuses what a free slot's cache holds (reuse.py)
    prefix_cache_slots: int = 0  # cache rows that only keep prefixes for later requests
    threads: int | None = None  # torch's intra-op threads for the engine (None: torch's default)
    chat_template: str | None = None  # a template file, or the template (vLLM's --chat-template)
    default_chat_template_kwargs: str | None = None  # JSON: the template's variables by default
    trust_request_chat_template: bool = False  # a request may bring its own chat_template
    reasoning_parser: str | None = None  # chat reasoning apart from the answer (reasoning.py)
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the answer's calls parsed out
    tool_call_parser: str | None = None  # how (tools.py)
    data_parallel_size: int = 1  # engine ranks behind one address (dp.py)
    engine_process: bool = True  # the engine in a process of its own (False: a thread)
    scheduling_policy: str = "fcfs"  # which waiting request starts next: fcfs | priority
    logprobs_mode: str = "raw_logprobs"  # what logprobs hold (vLLM's --logprobs-mode)
    return_tokens_as_token_ids: bool = False  # logprobs' tokens "token_id:N" by default
    max_logprobs: int = MAX_TOP_LOGPROBS  # alternatives a request may ask for (-1: every token)
    prefill_chunk: int | None = None  # prompt tokens a slot encodes per step (None: the engine's)
    seed: int | None = None  # torch's global seed at start: unseeded draws repeat across restarts
    network: Network = field(default_factory=Network)  # CORS and TLS (network.py)
    trust_remote_code: bool = False  # the model directory's own code (openPangu's tokenizer)
    root_path: str = ""  # the prefix a proxy in front strips (FastAPI's root_path)
    uvicorn_log_level: str = "warning"

    def check(self) -> None:
        """What needs no model, checked before anything is loaded; one ``ConfigError`` each."""
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)  # (vLLM's half, ...)
        names = self.served_model_name
        if names is not None and not all(n.strip() for n in names):
            raise ConfigError(
                "--served-model-name takes non-empty names (an empty model in a request already "
                "means the default one)"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_batch is None and self.gpu_memory_utilization is None:
            raise ConfigError("give --max-batch, or --gpu-memory-utilization to size it")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        fraction = self.gpu_memory_utilization
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {fraction}: the share of the "
                "device's memory the weights and the KV cache may take"
            )
        if self.max_queue is not None and self.max_queue < 0:
            raise ConfigError(f"--max-queue must be at least 0, got {self.max_queue}")
        if self.prefix_cache_slots < 0:
            raise ConfigError(
                f"--prefix-cache-slots must be at least 0, got {self.prefix_cache_slots}"
            )
        if self.prefix_cache_slots and not self.prefix_caching:
            raise ConfigError(
                "--prefix-cache-slots keeps prefixes for reuse, which --no-enable-prefix-caching "
                "turns off; give one or the other"
            )
        if self.data_parallel_size < 1:
            raise ConfigError(
                f"--data-parallel-size must be at least 1, got {self.data_parallel_size}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"--scheduling-policy {self.scheduling_policy!r} is not one of "
                f"{', '.join(SCHEDULING_POLICIES)}"
            )
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ConfigError(
                f"--logprobs-mode {self.logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}"
            )
        if self.max_logprobs < -1:
            raise ConfigError(
                f"--max-logprobs must be -1 (every token) or more, got {self.max_logprobs}"
            )
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"--max-len must be at least 2, got {self.max_len}")
        if not self.drain_timeout >= 0:  # (NaN too)
            raise ConfigError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        given = self.generation_config
        if given not in ("auto", "vllm"):
            path = os.path.join(given, "generation_config.json")
            try:
                with open(path, encoding="utf-8") as fh:
                    if not isinstance(json.load(fh), dict):
                        raise ValueError("not a JSON object")
            except OSError:
                raise ConfigError(
                    f"--generation-config {given!r} is not auto, vllm or a folder holding a "
                    "generation_config.json"
                ) from None
            except ValueError as exc:  # (json's errors too)
                raise ConfigError(f"--generation-config: {path} is not valid ({exc})") from None
        if self.override_generation_config is not None:
            check_override(self.override_generation_config, OVERRIDE_FLAG, SERVED_DEFAULTS)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError(
                "--api-key (or $FLUID_API_KEY) is empty (an unset shell variable?); give a key, "
                "or leave the flag out and unset FLUID_API_KEY"
            )
        self.network.check()
        self.template_text()
        self.template_kwargs()
        if self.reasoning_parser is not None:
            from fluid_npu.serve.reasoning import check_parser_name

            check_parser_name(self.reasoning_parser)
        if self.enable_auto_tool_choice != (self.tool_call_parser is not None):
            raise ConfigError(
                "--enable-auto-tool-choice and --tool-call-parser go together (the first lets "
                "the model call tools, the second says how its calls are written): give both"
            )
        if self.tool_call_parser is not None:
            from fluid_npu.serve.tools import check_tool_parser_name

            check_tool_parser_name(self.tool_call_parser)

    def template_text(self) -> str | None:
        """The ``--chat-template`` text (None: the tokenizer's), read and compiled."""
        from fluid_npu.sampling.prompts import read_chat_template

        return None if self.chat_template is None else read_chat_template(self.chat_template)

    def template_kwargs(self) -> dict[str, Any]:
        """``--default-chat-template-kwargs`` as a dict of template variables."""
        from fluid_npu.sampling.prompts import parse_template_kwargs

        return parse_template_kwargs(
            self.default_chat_template_kwargs, "--default-chat-template-kwargs"
        )


def served_names(settings: ServeSettings) -> tuple[str, ...]:
    """The model ids listed and accepted, the default first: ``--served-model-name``'s, else the
    model folder's name."""
    return settings.served_model_name or (settings.model.rstrip("/").split("/")[-1],)


def served_name(settings: ServeSettings) -> str:
    """The default model id (the one answers carry)."""
    return served_names(settings)[0]


def model_aliases(settings: ServeSettings) -> tuple[str, ...]:
    """Ids accepted but not listed: without ``--served-model-name``, the ``--model`` string as
    given (vLLM's default id, which clients written for it send)."""
    return () if settings.served_model_name else (settings.model,)


@dataclass
class ServeConfig:
    """What ``app.create_app`` reads: the served names, the context, the room and each
    request-facing setting (``server.py`` fills it from ``ServeSettings``)."""

    model_name: str  # the default id (answers carry it)
    max_len: int  # prompt + new tokens, per request
    max_batch: int
    max_queue: int | None = None  # waiting places beyond the batch; None: unbounded
    api_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # shown by /health: policy, device, ...
    # what a request that leaves temperature / top_p / top_k / min_p out gets
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    vocab_size: int | None = None  # the model's (logit_bias ids); None: the tokenizer's length
    # the chat template's variables a request's chat_template_kwargs go over
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_request_chat_template: bool = False  # whether a request may bring its own template
    reasoning_parser: str | None = None  # --reasoning-parser: chat reasoning apart (reasoning.py)
    tool_call_parser: str | None = None  # --enable-auto-tool-choice's parser (tools.py)
    request_id_headers: bool = False  # X-Request-Id on every response (http.RequestIdHeader)
    tokens_as_ids: bool = False  # --return-tokens-as-token-ids: logprobs' tokens "token_id:N"
    max_logprobs: int = MAX_TOP_LOGPROBS  # alternatives a request may ask (-1: all)
    other_names: tuple[str, ...] = ()  # more --served-model-name ids (listed and accepted)
    aliases: tuple[str, ...] = ()  # accepted, not listed (the --model string as given)
    root: str | None = None  # the model's directory (its cards' root, as vLLM's)
