"""vLLM's probe routes and model card, shared by a server (``app.py``) and the data-parallel front
(``router.py``): ``/ping`` (GET or POST: the ``/health`` answer, as SageMaker-style probes ask
it) and ``/load`` (``{"server_load": N}``, the requests in flight, which load-aware routers
read); ``model_card`` is one ``/v1/models`` entry with vLLM's fields."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

STARTED = int(time.time())  # (the cards' "created": when the server started, as vLLM's)


def model_card(name: str, root: str | None, max_len: int) -> dict[str, Any]:
    """A ``/v1/models`` entry: OpenAI's fields, and vLLM's ``root`` / ``parent`` /
    ``max_model_len`` / ``permission`` (nothing is restricted here)."""
    return {
        "id": name,
        "object": "model",
        "created": STARTED,
        "owned_by": "fluid-npu",
        "root": root or name,
        "parent": None,
        "max_model_len": max_len,
        "permission": [{
            "id": f"modelperm-{name}", "object": "model_permission", "created": STARTED,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }  # fmt: skip


def probe_routes(
    app: FastAPI,
    health: Callable[[], Awaitable[Response]],
    load: Callable[[], int | Awaitable[int]],
) -> None:
    """``/ping`` answering as ``health`` does, and ``/load`` reporting ``load()``."""

    async def ping() -> Response:
        return await health()

    app.api_route("/ping", methods=["GET", "POST"])(ping)

    @app.get("/load")
    async def server_load() -> dict[str, int]:
        value = load()
        return {"server_load": value if isinstance(value, int) else await value}
