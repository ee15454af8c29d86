"""The HTTP server: SageMaker (``/ping``, ``/invocations``), OpenAI (``/v1/*``), LMI routes and ``/metrics``.

The engine loads in the background after the server starts listening, so ``/ping`` answers 503 while it
loads and 200 once it is ready. An engine that dies turns ``/ping`` to 503 and stops the process with a
non-zero exit code, so an orchestrator restarts it. Generation requests pass an admission gate: beyond
``job_queue_size`` in flight, a request is refused at once with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.api import adapters, embeddings, lmi, openai, tokenize
from runtime.api.openapi import TOKENIZE_KEYS, body_doc, install_openapi, union_body
from runtime.api.protocol import ChatCompletionRequest, CompletionRequest, LmiRequest
from runtime.api.responses import not_served
from runtime.api.wire import loads_body
from runtime.engines.base import EngineDeadError, EngineStats
from runtime.errors import APIError
from runtime.metrics import CONTENT_TYPE, Metrics
from runtime.service import ModelService

log = logging.getLogger("kiln.runtime")
HEALTH_INTERVAL_S = 2.0
DEAD_GRACE_S = 2.0  # after an engine death, answer /ping 503 this long before exiting (probes see "unhealthy")
SSE = "text/event-stream"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ServerOptions:
    """The serving settings the HTTP layer needs (from the resolved configuration, whose defaults hold)."""

    job_queue_size: int
    model_loading_timeout: float
    enable_lora: bool = False  # the adapter management routes (runtime/api/adapters.py)
    api_key: str | None = None  # None: no authentication (loopback by default; SageMaker signs in front)
    max_request_size: int | None = None  # bytes a request body may hold (None: no limit)


@dataclass
class ServerState:
    status: str = "loading"  # loading | ready | failed | dead
    service: ModelService | None = None
    error: str | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def create_app(
    load: Callable[[Metrics], Awaitable[ModelService]],
    on_fatal: Callable[[int], None],
    opts: ServerOptions,
) -> FastAPI:
    """Build the app. ``load`` starts the engine; ``on_fatal(code)`` stops the server after a failure."""
    state = ServerState()
    metrics = Metrics(lambda: _engine_stats(state))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.tasks.append(asyncio.create_task(_load(state, lambda: load(metrics), on_fatal, opts)))
        yield
        for task in state.tasks:
            task.cancel()
        if state.service is not None:
            await state.service.engine.shutdown()

    app = FastAPI(
        title="kiln runtime",
        version="0.1.0",
        lifespan=lifespan,
        description="SageMaker, LMI and OpenAI-compatible serving of one kiln artifact.",
    )
    app.state.kiln = state
    app.add_middleware(Admission, limit=opts.job_queue_size, metrics=metrics)
    if opts.max_request_size:
        app.add_middleware(BodyLimit, limit=opts.max_request_size)
    if opts.api_key:  # added last, so it runs first: a refused request never reaches admission or the routes
        app.add_middleware(BearerAuth, key=opts.api_key)
    _install_error_handlers(app)
    # The responses, both error shapes and the model-dependent limits are declared there (runtime/api/openapi.py).
    install_openapi(app, lambda: state.service if state.status == "ready" else None)

    def service() -> ModelService:
        if state.status != "ready" or state.service is None:
            raise APIError(
                503, f"the model is not ready ({state.status})" + (f": {state.error}" if state.error else "")
            )
        return state.service

    @app.get("/ping", summary="Health: 200 when the engine is loaded and healthy, else 503")
    async def ping() -> JSONResponse:
        if state.status == "ready":
            return JSONResponse({"status": "healthy"})
        return JSONResponse(
            {"status": state.status, **({"error": state.error} if state.error else {})}, status_code=503
        )

    app.add_api_route("/health", ping, methods=["GET"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics (kiln_* and the engine's own)")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        svc = service()
        card = {
            "id": svc.served_name,
            "object": "model",
            "created": svc.created,
            "owned_by": "kiln",
            "root": svc.root,  # clients (vllm bench serve) load the tokenizer from here
            "parent": None,
            "max_model_len": svc.engine.max_model_len,
            "permission": [_permission(svc.created)],
        }
        # Adapters as vLLM lists them: their own id, the adapter's source as root, the base as parent.
        loras = [
            card | {"id": r.ref.name, "root": r.src, "parent": svc.served_name}
            for r in (svc.adapters.all() if svc.adapters else [])
        ]
        return {"object": "list", "data": [card, *loras]}

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=body_doc("ChatCompletionRequest"))
    async def chat(request: Request) -> Any:
        req = _parse(ChatCompletionRequest, _with_adapter(request, await _json_body(request)))
        svc = service()
        if req.stream:
            return EventStream(await openai.chat_stream(svc, req), media_type=SSE)
        return await _until_disconnect(request, openai.chat(svc, req))

    @app.post("/v1/completions", response_model=None, openapi_extra=body_doc("CompletionRequest"))
    async def completions(request: Request) -> Any:
        req = _parse(CompletionRequest, _with_adapter(request, await _json_body(request)))
        svc = service()
        if req.stream:
            return EventStream(await openai.completion_stream(svc, req), media_type=SSE)
        return await _until_disconnect(request, openai.completion(svc, req))

    @app.post("/v1/embeddings", response_model=None, openapi_extra=body_doc("EmbeddingRequest"))
    async def embeddings_route(request: Request) -> Any:
        req = _parse(embeddings.EmbeddingRequest, _with_adapter(request, await _json_body(request)))
        return await _until_disconnect(request, embeddings.embeddings(service(), req))

    invoke_doc = {"requestBody": union_body()}

    @app.post("/invocations", response_model=None, openapi_extra=invoke_doc, summary="SageMaker: any schema")
    async def invocations(request: Request) -> Any:
        return await _invoke(service(), request)

    @app.post("/predictions/{model_name}", response_model=None, openapi_extra=invoke_doc, summary="LMI")
    async def predictions(model_name: str, request: Request) -> Any:
        svc = service()
        if model_name != svc.served_name:
            raise APIError(
                404,
                f"model {model_name!r} is not served here (this server serves {svc.served_name!r})",
                param="model_name",
            )
        return await _invoke(svc, request)

    # -- vLLM's tokenizer routes (runtime/api/tokenize.py) --
    @app.post(
        "/tokenize",
        response_model=None,
        openapi_extra={"requestBody": union_body(TOKENIZE_KEYS)},
        summary="vLLM: a prompt's (or chat messages') token ids",
    )
    async def tokenize_route(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        svc = service()
        if isinstance(body, dict) and "messages" in body:
            return tokenize.tokenize(svc, _parse(tokenize.TokenizeChatRequest, body))
        return tokenize.tokenize(svc, _parse(tokenize.TokenizeCompletionRequest, body))

    @app.post(
        "/detokenize",
        response_model=None,
        openapi_extra=body_doc("DetokenizeRequest"),
        summary="vLLM: token ids to text",
    )
    async def detokenize_route(request: Request) -> dict[str, Any]:
        req = _parse(tokenize.DetokenizeRequest, await _json_body(request))
        return tokenize.detokenize(service(), req)

    @app.get("/tokenizer_info", response_model=None, summary="vLLM: the tokenizer's configuration")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenize.tokenizer_info(service())

    if opts.enable_lora:
        adapters.install(app, service)
    return app


ADAPTER_HEADER = "x-amzn-sagemaker-adapter-identifier"


def _with_adapter(request: Request, body: Any) -> Any:
    """SageMaker names an inference component's adapter in a header; like SageMaker's container standards, put it
    into the body: the OpenAI ``model``, or LMI's ``adapters`` for an LMI body."""
    name = request.headers.get(ADAPTER_HEADER)
    if not name or not isinstance(body, dict):
        return body
    if "inputs" in body and "messages" not in body and "prompt" not in body:
        return body | {"adapters": name}
    return body | {"model": name}


def _permission(created: int) -> dict[str, Any]:
    """vLLM's model permission object (OpenAI's legacy card field; some clients still read it)."""
    return {
        "id": f"modelperm-{created:x}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


def _engine_stats(state: ServerState) -> EngineStats | None:
    return state.service.engine.stats() if state.service is not None else None


class EventStream(StreamingResponse):
    """A streaming response that always closes its body iterator, so that a client disconnect or a shutdown ends
    the request in the engine at once instead of whenever the generator is garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())


async def _until_disconnect(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """Run a non-streaming generation, cancelling it (and so aborting it in the engine) if the client leaves."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)  # nobody reads it: the client closed the connection
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request) -> Any:
    return loads_body(await request.body())


def _parse(model: type[M], body: Any) -> M:
    """Validate a request body strictly, as OpenAI does: a JSON type other than the field's is refused (no 0 for
    false, no "5" for 5), so the server accepts exactly what /openapi.json declares."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(_integral(body), strict=True)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from exc


def _integral(value: Any) -> Any:
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 0.5 stays a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


async def _invoke(svc: ModelService, request: Request) -> Any:
    """SageMaker's single route: the body's shape picks the schema (chat, completion or LMI)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    request.state.lmi = "inputs" in body and "messages" not in body and "prompt" not in body
    body = _with_adapter(request, body)
    if svc.task == "embed" and "messages" not in body and "prompt" not in body:
        if "input" in body:  # OpenAI's embeddings body, sent to SageMaker's one route
            emb = _parse(embeddings.EmbeddingRequest, body)
            return await _until_disconnect(request, embeddings.embeddings(svc, emb))
        if "inputs" in body:
            lmi_emb = _parse(embeddings.LmiEmbeddingRequest, body)
            return await _until_disconnect(request, embeddings.lmi_embeddings(svc, lmi_emb))
    if "messages" in body:
        chat_req = _parse(ChatCompletionRequest, body)
        if chat_req.stream:
            return EventStream(await openai.chat_stream(svc, chat_req), media_type=SSE)
        return await _until_disconnect(request, openai.chat(svc, chat_req))
    if "prompt" in body:
        cmpl_req = _parse(CompletionRequest, body)
        if cmpl_req.stream:
            return EventStream(await openai.completion_stream(svc, cmpl_req), media_type=SSE)
        return await _until_disconnect(request, openai.completion(svc, cmpl_req))
    if "inputs" in body:
        lmi_req = _parse(LmiRequest, body)
        if lmi_req.stream:
            return EventStream(await lmi.stream(svc, lmi_req), media_type=lmi.stream_media_type(svc))
        return await _until_disconnect(request, lmi.generate(svc, lmi_req))
    if svc.task == "embed":
        raise APIError(400, "cannot tell the request schema: expected 'inputs' (LMI) or 'input' (OpenAI embeddings)")
    raise APIError(
        400,
        "cannot tell the request schema: expected 'messages' (OpenAI chat), 'prompt' (OpenAI "
        "completion) or 'inputs' (LMI)",
    )


# pydantic names the member of a union it tried in the error's location ("input.list[str]"): not a field.
_UNION_TAG = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\])")


def _allowed(app: FastAPI, request: Request) -> str:
    """Every method of the routes matching the path (RFC 9110's Allow). Starlette's 405 names only the first
    matching route's, and a path can have several: GET and POST /adapters are two routes."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _validation_error(errors: Any) -> APIError:
    parts, first = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _UNION_TAG.fullmatch(str(x)))
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return APIError(400, "invalid request: " + "; ".join(parts), param=first)


def _install_error_handlers(app: FastAPI) -> None:
    def render(request: Request, err: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
        lmi_route = getattr(request.state, "lmi", False)
        body = err.lmi_body() if lmi_route else err.openai_body()
        return JSONResponse(body, status_code=err.status, headers=dict(headers or {}))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return render(request, _validation_error(exc.errors()))

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        path = request.url.path
        return render(request, APIError(404, not_served(path) or f"no route {request.method} {path}"))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        return render(
            request,
            APIError(405, f"{request.method} is not allowed on {request.url.path}", kind="MethodNotAllowedError"),
            headers={"Allow": _allowed(app, request)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return render(request, APIError(exc.status_code, str(exc.detail)), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.error("request failed: %s", exc, exc_info=True)
        return render(request, APIError(500, f"internal error: {type(exc).__name__}"))


# -- admission, request metrics -----------------------------------------------------------------------------------

GENERATION_PATHS = ("/invocations", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _is_generation(scope: Scope) -> bool:
    path = scope.get("path", "")
    return scope.get("method") == "POST" and (path in GENERATION_PATHS or path.startswith("/predictions/"))


class Admission:
    """Pure ASGI middleware: counts every request by route and status, and bounds generation requests in flight
    (``job_queue_size``): one more is refused at once with 503, before its body is read."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        gated = _is_generation(scope)
        try:
            if gated and self.in_flight >= self.limit:
                await self._refuse(scope, send_status)
                return
            if gated:
                self.in_flight += 1
                self.metrics.in_flight.set(self.in_flight)
            try:
                await self.app(scope, receive, send_status)
            finally:
                if gated:
                    self.in_flight -= 1
                    self.metrics.in_flight.set(self.in_flight)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (scope["path"] if gated else "other")
            self.metrics.requests.labels(route=label, status=str(status[0])).inc()

    async def _refuse(self, scope: Scope, send: Send) -> None:
        err = APIError(
            503,
            f"the server is at capacity: {self.limit} requests in flight (job_queue_size); retry later",
        )
        await _refuse(scope, send, err, {"retry-after": "1"})


# Routes an API key does not guard: probes (SageMaker's /ping, load balancers' /health) and Prometheus' scrape.
OPEN_PATHS = frozenset({"/ping", "/health", "/metrics"})


class BearerAuth:
    """Pure ASGI middleware: with ``api_key`` set, every request but OPEN_PATHS (and CORS preflights) must carry
    ``Authorization: Bearer <key>``, else 401 before its body is read. vLLM guards only /v1/*; kiln also guards
    /invocations, the adapter routes and the tokenizer routes, which generate or change what is served. The key is
    compared in constant time and never logged or echoed."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        what = "a wrong API key" if given else "no API key"
        err = APIError(401, f"{what}: send 'Authorization: Bearer <key>' with the server's api_key")
        await _refuse(scope, send, err, {"www-authenticate": "Bearer"})


class BodyLimit:
    """Pure ASGI middleware: a request body above ``max_request_size`` bytes gets 413 naming the setting. A declared
    Content-Length is refused before anything is read; a chunked body is read up to the limit and refused on the
    first byte past it (what was read is kept in memory, at most the limit, and replayed to the route)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._refuse(scope, send, int(declared))
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, send, None)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, size: int | None) -> None:
        got = f"{size} bytes" if size is not None else f"more than {self.limit} bytes"
        err = APIError(413, f"the request body has {got}, over max_request_size={self.limit}: send less, or raise it")
        await _refuse(scope, send, err, {"connection": "close"})


async def _refuse(scope: Scope, send: Send, err: APIError, headers: dict[str, str]) -> None:
    """Answer ``err`` from a middleware, before the route runs: the OpenAI error shape under /v1/, LMI's elsewhere."""
    body = err.openai_body() if scope["path"].startswith("/v1/") else err.lmi_body()
    await JSONResponse(body, status_code=err.status, headers=headers)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# -- loading and health -----------------------------------------------------------------------------------------


async def _load(
    state: ServerState,
    load: Callable[[], Awaitable[ModelService]],
    on_fatal: Callable[[int], None],
    opts: ServerOptions,
) -> None:
    started = time.monotonic()
    try:
        state.service = await asyncio.wait_for(load(), timeout=opts.model_loading_timeout)
    except TimeoutError:
        state.status = "failed"
        state.error = f"the engine did not load within model_loading_timeout={opts.model_loading_timeout:g}s"
        log.error("model failed to load: %s", state.error)
        on_fatal(1)
        return
    except Exception as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("model failed to load: %s", state.error, exc_info=log.isEnabledFor(logging.DEBUG))
        on_fatal(1)
        return
    # The startup heap (torch, the engine, the tokenizer: millions of objects) is static from here on; freezing it
    # keeps full garbage collections, and so latency spikes while serving, short (vLLM's server does the same).
    gc.collect()
    gc.freeze()
    state.status = "ready"
    log.info("ready: serving %s (loaded in %.1fs)", state.service.served_name, time.monotonic() - started)
    await _watch(state, on_fatal)


async def _watch(state: ServerState, on_fatal: Callable[[int], None]) -> None:
    """Poll engine health; on death, go unhealthy and stop the process with a non-zero code."""
    assert state.service is not None
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        try:
            await state.service.engine.check_health()
        except EngineDeadError as exc:
            state.status, state.error = "dead", str(exc)
            log.error("engine died: %s; exiting so the orchestrator restarts this server", exc)
            await asyncio.sleep(DEAD_GRACE_S)
            on_fatal(1)
            return
