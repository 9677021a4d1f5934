"""The FastAPI application: OpenAI-style chat completions, model list, health, the web page.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health`` (with the batching counters), ``GET /`` (the routing page, from
``static/``). Every error is OpenAI's error JSON with a 4xx/5xx status; nothing a client sends
stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_mole.eval.decoding import DecodeParams, Generation, StreamEvent

from .engine import BatchEngine, Job, QueueFullError
from .inputs import InputBuilder, Prepared
from .schema import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    error_body,
    finish_reason,
    new_id,
    parse_request,
    routing_json,
    token_json,
    usage_json,
)

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("llava_mole.serve")
STATIC = resources.files("llava_mole.serve") / "static"


@dataclass
class ServeSettings:
    """Served name and request limits.

    Attributes:
        model_id: The model name clients use (``GET /v1/models``).
        api_key: Required bearer token of ``/v1/*`` (None: open).
        max_tokens: Largest ``max_tokens`` a request may ask (also the default).
        max_request_bytes: Larger request bodies get 413.
        context_length: The model's context (None: unchecked); answers are cut to fit.
    """

    model_id: str
    api_key: str | None = None
    max_tokens: int = 256
    max_request_bytes: int = 20_000_000
    context_length: int | None = None


def create_app(engine: BatchEngine, inputs: InputBuilder, settings: ServeSettings) -> FastAPI:
    """The application serving `engine` (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="llava-mole", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request, settings)
        return {"object": "list", "data": [_model_card(settings, engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        _check_key(request, settings)
        _check_model(model_id, settings)
        return _model_card(settings, engine)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _check_key(request, settings)
        body = await _read_json(request, settings.max_request_bytes)
        chat_request = parse_request(body)
        _check_model(chat_request.model, settings)
        job = await _make_job(chat_request, inputs, engine, settings)
        try:
            engine.submit(job)
        except QueueFullError as err:
            raise APIError(
                503, f"the server is busy: {err}; retry later", "server_error", code="queue_full"
            ) from None
        if chat_request.stream:
            return await _stream(job, chat_request, settings, engine)
        kind, payload = await job.events.get()
        if kind == "error":
            raise _server_error(payload)
        routing = _routing(job, payload, engine)
        return completion_body(settings.model_id, payload, len(job.inputs.prompt), routing)

    return app


# ---------------------------------------------------------------------------
# Request handling
# ---------------------------------------------------------------------------


def _check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")


def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_id:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.model_id!r}",
            param="model",
            code="model_not_found",
        )


def _model_card(settings: ServeSettings, engine: BatchEngine) -> dict[str, Any]:
    return {
        "id": settings.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "llava-mole",
        "mole_layers": engine.num_blocks,
        "num_experts": engine.num_experts,
        "context_length": settings.context_length,
    }


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, read at most `limit` bytes far (413 beyond)."""
    declared = request.headers.get("content-length")
    too_large = APIError(
        413,
        f"the request body is larger than {limit} bytes (--max-request-bytes)",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None


async def _make_job(
    request: ChatRequest, inputs: InputBuilder, engine: BatchEngine, settings: ServeSettings
) -> Job:
    """Validates the settings, builds the model inputs (in a thread) and the job."""
    stop = request.stop_strings()
    if (request.return_routing or request.return_prompt_routing) and not engine.has_routing:
        raise APIError(
            400, "routing was asked but the model has no MoLE layers", param="return_routing"
        )
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > settings.max_tokens:
        raise APIError(
            400,
            f"max_tokens is {asked}, the server allows at most {settings.max_tokens} "
            "(--max-tokens)",
            param="max_tokens",
        )
    prepared: Prepared = await run_in_threadpool(inputs.prepare, request)
    budget = asked or settings.max_tokens
    if settings.context_length is not None:
        budget = min(budget, settings.context_length - len(prepared.prompt))
    params = DecodeParams(
        max_new_tokens=budget, temperature=request.temperature, top_p=request.top_p, stop=stop
    )
    return Job(
        inputs=prepared,
        params=params,
        loop=asyncio.get_running_loop(),
        stream=request.stream,
        routing=request.return_routing or request.return_prompt_routing,
        prompt_routing=request.return_prompt_routing,
        seed=request.seed,
    )


def _server_error(err: Exception) -> APIError:
    return APIError(500, f"generation failed: {err}", "server_error", code="generation_failed")


def _routing(job: Job, result: Generation, engine: BatchEngine) -> dict[str, Any] | None:
    if not job.routing:
        return None
    return routing_json(result, engine.num_blocks, engine.num_experts, job.prompt_routing)


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    job: Job, request: ChatRequest, settings: ServeSettings, engine: BatchEngine
) -> Any:
    """Waits for the first step (a failure before it is a plain 500), then streams."""
    first = await job.events.get()
    if first[0] == "error":
        raise _server_error(first[1])
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return StreamingResponse(
        _chunks(job, first, settings, engine, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _chunks(
    job: Job,
    first: tuple[str, Any],
    settings: ServeSettings,
    engine: BatchEngine,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The server-sent events of one answer: role, one chunk per token, finish, [DONE]."""
    chunk_id, created, model = new_id(), int(time.time()), settings.model_id
    opening: dict[str, Any] = {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": None,
    }
    if job.routing:
        event = first[1] if first[0] == "event" else None
        opening["routing"] = {"layers": list(range(engine.num_blocks))}
        opening["routing"]["num_experts"] = engine.num_experts
        if job.prompt_routing and event is not None and event.prompt is not None:
            opening["routing"]["prompt"] = [token_json(t, kind=True) for t in event.prompt]
    try:
        yield _sse(chunk_body(chunk_id, model, created, opening))
        kind, payload = first
        while True:
            if kind == "event":
                yield _sse(chunk_body(chunk_id, model, created, _event_choice(payload, job)))
            elif kind == "error":
                yield _sse(_server_error(payload).body())
                break
            else:
                if include_usage:
                    usage = usage_json(len(job.inputs.prompt), payload.completion_tokens)
                    yield _sse(chunk_body(chunk_id, model, created, None, usage))
                break
            kind, payload = await job.events.get()
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            job.cancelled = True  # the client left: the row ends at the next step


def _event_choice(event: StreamEvent, job: Job) -> dict[str, Any]:
    delta = {"content": event.delta} if event.delta else {}
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta,
        "finish_reason": None
        if event.finish_reason is None
        else finish_reason(event.finish_reason),
    }
    if job.routing:
        tokens = [] if event.token is None else [token_json(event.token)]
        choice["routing"] = {"tokens": tokens}
    return choice


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error in %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {err}", "server_error"), status_code=500)
