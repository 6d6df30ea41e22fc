"""``fluid serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

The pieces, each one concept:

* ``protocol``: the request bodies of ``/v1/completions`` and ``/v1/chat/completions``, checked
  field by field (an unsupported field or value is an ``APIError`` naming it: HTTP 400), and the
  OpenAI-style error body;
* ``text``: prompt encoding, chat-template rendering and the incremental detokenizer that applies
  ``stop`` strings;
* ``worker``: the engine thread that owns the scheduler (the model) and talks to the asyncio side
  through queues: submit, abort, drain; ``engine_process``: the same calls with the engine in a
  process of its own (the default), across two pipes; ``loading``: the model and scheduler built;
* ``metrics``: the Prometheus metrics of one server;
* ``app``: the FastAPI routes — they only translate requests into scheduler requests and events
  into responses (JSON or server-sent events); ``responses``: those OpenAI bodies;
  ``responses_request`` / ``responses_output``: the Responses API (``/v1/responses``), read as a
  chat request and answered as response items and their events; ``tokenizing``: vLLM's
  tokenizer routes;
* ``server``: loading the model, building the scheduler, running uvicorn with a SIGTERM drain;
  ``network``: browser origins (CORS) and TLS;
* ``router`` / ``routing`` / ``dp``: ``--data-parallel-size``: the front, which rank takes a
  request, the ranks' processes;
* ``batch``: ``fluid run-batch``, a file of OpenAI batch requests answered by the same app in
  this process;
* ``launch``: starting and stopping a ``fluid serve`` process (the benchmark and the tests);
* ``bench``: ``fluid bench serve``, the load generator; ``cli``: the commands' flags.

FastAPI, uvicorn and prometheus-client are the ``serve`` extra; of this package only ``serve.cli``
(the flags, which import none of the extras) is imported by ``fluid_npu.cli``.
"""
