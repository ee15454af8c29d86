"""The HTTP server: SageMaker (``/ping``, ``/invocations``), OpenAI (``/v1/*``) and LMI routes over one model.

The engine loads in the background after the server starts listening, so ``/ping`` answers 503 while it
loads and 200 once it is ready. An engine that dies turns ``/ping`` to 503 and stops the process with a
non-zero exit code, so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from runtime.engines.base import EngineDeadError
from runtime.errors import APIError
from runtime.protocol import ChatCompletionRequest, CompletionRequest, LmiRequest
from runtime.service import ModelService

log = logging.getLogger("kiln.runtime")
HEALTH_INTERVAL_S = 2.0
SSE = "text/event-stream"
JSONLINES = "application/jsonlines"


@dataclass
class ServerState:
    status: str = "loading"  # loading | ready | failed | dead
    service: ModelService | None = None
    error: str | None = None
    exit_code: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def create_app(load: Callable[[], Awaitable[ModelService]], on_fatal: Callable[[int], None]) -> FastAPI:
    """Build the app. ``load`` starts the engine; ``on_fatal(code)`` stops the server after a failure."""
    state = ServerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.tasks.append(asyncio.create_task(_load(state, load, on_fatal)))
        yield
        for task in state.tasks:
            task.cancel()
        if state.service is not None:
            await state.service.engine.shutdown()

    app = FastAPI(title="kiln runtime", version="0.1.0", lifespan=lifespan)
    app.state.kiln = state
    _install_error_handlers(app)

    def service() -> ModelService:
        if state.status != "ready" or state.service is None:
            raise APIError(
                503, f"the model is not ready ({state.status})" + (f": {state.error}" if state.error else "")
            )
        return state.service

    @app.get("/ping", include_in_schema=True)
    async def ping() -> JSONResponse:
        if state.status == "ready":
            return JSONResponse({"status": "healthy"})
        return JSONResponse(
            {"status": state.status, **({"error": state.error} if state.error else {})}, status_code=503
        )

    app.add_api_route("/health", ping, methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        svc = service()
        return {
            "object": "list",
            "data": [
                {
                    "id": svc.served_name,
                    "object": "model",
                    "created": svc.created,
                    "owned_by": "kiln",
                    "max_model_len": svc.engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest) -> Any:
        svc = service()
        if req.stream:
            return StreamingResponse(await svc.chat_stream(req), media_type=SSE)
        return await svc.chat(req)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        svc = service()
        if req.stream:
            return StreamingResponse(await svc.completion_stream(req), media_type=SSE)
        return await svc.completion(req)

    @app.post("/invocations", response_model=None)
    async def invocations(request: Request) -> Any:
        return await _invoke(service(), request)

    @app.post("/predictions/{model_name}", response_model=None)
    async def predictions(model_name: str, request: Request) -> Any:
        svc = service()
        if model_name != svc.served_name:
            raise APIError(
                404,
                f"model {model_name!r} is not served here (this server serves {svc.served_name!r})",
                param="model_name",
            )
        return await _invoke(svc, request)

    return app


async def _invoke(svc: ModelService, request: Request) -> Any:
    """SageMaker's single route: the body's shape picks the schema (chat, completion or LMI)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    request.state.lmi = "inputs" in body and "messages" not in body and "prompt" not in body
    try:
        if "messages" in body:
            chat_req = ChatCompletionRequest.model_validate(body)
            if chat_req.stream:
                return StreamingResponse(await svc.chat_stream(chat_req), media_type=SSE)
            return await svc.chat(chat_req)
        if "prompt" in body:
            cmpl_req = CompletionRequest.model_validate(body)
            if cmpl_req.stream:
                return StreamingResponse(await svc.completion_stream(cmpl_req), media_type=SSE)
            return await svc.completion(cmpl_req)
        if "inputs" in body:
            lmi_req = LmiRequest.model_validate(body)
            if lmi_req.stream:
                return StreamingResponse(await svc.lmi_stream(lmi_req), media_type=JSONLINES)
            return await svc.lmi(lmi_req)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from exc
    raise APIError(
        400,
        "cannot tell the request schema: expected 'messages' (OpenAI chat), 'prompt' (OpenAI "
        "completion) or 'inputs' (LMI)",
    )


def _validation_error(errors: Any) -> APIError:
    parts, first = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return APIError(400, "invalid request: " + "; ".join(parts), param=first)


def _install_error_handlers(app: FastAPI) -> None:
    def render(request: Request, err: APIError) -> JSONResponse:
        lmi = getattr(request.state, "lmi", False)
        return JSONResponse(err.lmi_body() if lmi else err.openai_body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return render(request, _validation_error(exc.errors()))

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return render(request, APIError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        return render(
            request,
            APIError(405, f"{request.method} is not allowed on {request.url.path}", kind="MethodNotAllowedError"),
        )


async def _load(
    state: ServerState, load: Callable[[], Awaitable[ModelService]], on_fatal: Callable[[int], None]
) -> None:
    try:
        state.service = await load()
    except Exception as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("model failed to load: %s", state.error, exc_info=log.isEnabledFor(logging.DEBUG))
        on_fatal(1)
        return
    state.status = "ready"
    log.info("ready: serving %s", state.service.served_name)
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
            on_fatal(1)
            return
