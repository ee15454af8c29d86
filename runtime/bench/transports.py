"""How a request reaches the server: HTTP to a URL, or SageMaker's runtime API for an endpoint.

Both yield the response as ``(arrival time, bytes)`` chunks as they arrive, and raise :class:`BenchError` with a short
kind ("http 503", "sagemaker ModelError", "timeout", "connection") for a request that failed. SageMaker requests are
signed with SigV4 by botocore from the usual AWS credential chain; botocore's retries are off, so a throttled or
failed request counts as one error rather than a slow success.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx


class BenchError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def _message(text: str) -> str:
    """The error message out of an error body (OpenAI, LMI or SageMaker), or the body's first line."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip().splitlines()[0][:200] if text.strip() else ""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err.get("Message") or err)[:200]
    return str(err)[:200]


class Transport:
    async def post(self, path: str, body: dict[str, Any], stream: bool) -> AsyncIterator[tuple[float, bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover  (makes this an async generator for type checkers)

    async def aclose(self) -> None:
        return None


class Http(Transport):
    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def post(self, path: str, body: dict[str, Any], stream: bool) -> AsyncIterator[tuple[float, bytes]]:
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise BenchError(f"http {response.status_code}", _message(text))
                async for chunk in response.aiter_bytes():
                    yield time.perf_counter(), chunk
        except httpx.TimeoutException as exc:
            raise BenchError("timeout", type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise BenchError("connection", f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self.client.aclose()


_END = object()


class SageMaker(Transport):
    """``InvokeEndpoint`` / ``InvokeEndpointWithResponseStream`` through boto3, each call in a worker thread."""

    def __init__(
        self,
        endpoint_name: str,
        *,
        region: str | None,
        endpoint_url: str | None,
        inference_component: str | None,
        target_variant: str | None,
        workers: int,
        timeout: float,
    ) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            max_pool_connections=workers,
            read_timeout=timeout,
            connect_timeout=min(timeout, 60),
            retries={"total_max_attempts": 1},
        )
        session = boto3.session.Session()  # its own: the default session caches credentials across runs
        self.client = session.client("sagemaker-runtime", region_name=region, endpoint_url=endpoint_url, config=config)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-bench")
        self.extra = {"EndpointName": endpoint_name, "ContentType": "application/json"}
        if inference_component:
            self.extra["InferenceComponentName"] = inference_component
        if target_variant:
            self.extra["TargetVariant"] = target_variant

    async def post(self, path: str, body: dict[str, Any], stream: bool) -> AsyncIterator[tuple[float, bytes]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                payload = json.dumps(body).encode()
                if stream:
                    response = self.client.invoke_endpoint_with_response_stream(Body=payload, **self.extra)
                    for event in response["Body"]:
                        if "PayloadPart" in event:
                            put((time.perf_counter(), event["PayloadPart"]["Bytes"]))
                else:
                    response = self.client.invoke_endpoint(Body=payload, **self.extra)
                    data = response["Body"].read()
                    put((time.perf_counter(), data))
            except BaseException as exc:  # handed to the event loop, which classifies it
                put(exc)
            finally:
                put(_END)

        loop.run_in_executor(self.pool, work)
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise _classify(item) from item
            yield item

    async def aclose(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _classify(exc: BaseException) -> BenchError:
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):  # EventStreamError (an error event mid-stream) is one too
        err = exc.response.get("Error", {})
        return BenchError(f"sagemaker {err.get('Code', 'error')}", str(err.get("Message", ""))[:200])
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectTimeoutError):
        return BenchError("timeout", type(exc).__name__)
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError):
        return BenchError("connection", type(exc).__name__)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return BenchError("no credentials", "set AWS credentials (env, profile or instance role) for SageMaker")
    return BenchError(type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
