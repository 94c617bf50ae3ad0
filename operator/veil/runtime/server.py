"""The inference server: onnxruntime behind the Open Inference Protocol v2 REST API (aiohttp).

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process serves HTTP
    GET  /v2/health/ready                      200 once the model is unsealed and loaded, else 503
    GET  /v2/models/{name}[/versions/{v}]      model metadata (404 unknown, 503 not ready)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    GET  /metrics                              Prometheus exposition of the registry given

Errors are JSON `{"error": "..."}`: 400 for requests that do not fit the protocol or the model,
404 for unknown models, 413 for bodies over the limit, 503 before the model is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from veil import __version__
from veil.runtime.loader import ModelLoader
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import InferenceError, OnnxModel
from veil.runtime.protocol import RequestError, parse_infer_request
from veil.runtime.state import ModelSlot
from veil.runtime.tensors import encode_tensor

log = logging.getLogger("veil.runtime.server")

JSON = dict[str, Any]


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may cost."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_tensor_elements: int = 16 * 1024 * 1024
    max_concurrent_inferences: int = 8


@dataclass(frozen=True)
class ServeOptions:
    """Where to listen and how to stop."""

    host: str = "0.0.0.0"  # a pod's server listens on all its interfaces
    port: int = 8080
    shutdown_timeout: float = 20.0
    drain_seconds: float = 0.0
    limits: ServerLimits = field(default_factory=ServerLimits)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _EarlyResponseError(Exception):
    """Carries a finished response and its metric outcome out of the infer path."""

    def __init__(self, outcome: str, response: web.Response) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.response = response


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    return response


class _Api:
    def __init__(self, slot: ModelSlot, metrics: RuntimeMetrics, limits: ServerLimits) -> None:
        self.slot = slot
        self.metrics = metrics
        self.limits = limits
        self.semaphore = asyncio.Semaphore(limits.max_concurrent_inferences)

    def _known(self, request: web.Request) -> bool:
        version = request.match_info.get("version")
        return request.match_info["name"] == self.slot.name and version in (None, self.slot.version)

    def _unknown(self, request: web.Request) -> web.Response:
        return _error(404, f"model {request.match_info['name']!r} is not served here")

    def _not_ready_message(self) -> str:
        return f"model {self.slot.name!r} is not ready ({self.slot.state.value})"

    async def server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response({"name": "veil", "version": __version__, "extensions": []})

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        if self.slot.model is None:
            return web.json_response({"ready": False, "state": self.slot.state.value}, status=503)
        return web.json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return self._unknown(request)
        model = self.slot.model
        if model is None:
            return _error(503, self._not_ready_message())
        return web.json_response(model.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return self._unknown(request)
        ready = self.slot.model is not None
        body = {"name": self.slot.name, "ready": ready}
        if not ready:
            body["state"] = self.slot.state.value
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_endpoint(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def infer(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return self._unknown(request)
        started = time.perf_counter()
        outcome = "error"
        try:
            response = await self._infer(request)
            outcome = "success"
            return response
        except _EarlyResponseError as done:
            outcome = done.outcome
            return done.response
        finally:
            self.metrics.inference_requests.labels(model=self.slot.name, outcome=outcome).inc()
            self.metrics.inference_duration.labels(model=self.slot.name).observe(
                time.perf_counter() - started
            )

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = _EarlyResponseError(
            "too_large", _error(413, f"the request body is larger than the limit of {limit} bytes")
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None

    async def _infer(self, request: web.Request) -> web.Response:
        model = self.slot.model
        if model is None:
            raise _EarlyResponseError("not_ready", _error(503, self._not_ready_message()))
        raw = await self._read_body(request)
        async with self.semaphore:
            try:
                body = await asyncio.to_thread(self._compute, model, raw)
            except RequestError as exc:
                raise _EarlyResponseError("bad_request", _error(400, str(exc))) from None
            except InferenceError as exc:
                if exc.client_error:
                    raise _EarlyResponseError(
                        "bad_request", _error(400, f"the model rejected the inputs: {exc}")
                    ) from None
                log.error("inference on model %r failed: %s", model.name, exc)
                raise _EarlyResponseError(
                    "error", _error(500, "inference failed inside the model")
                ) from None
        return web.Response(body=body, content_type="application/json")

    def _compute(self, model: OnnxModel, raw: bytes) -> bytes:
        """Parse, validate, run and encode; runs in a worker thread."""
        try:
            document = json.loads(raw)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        request = parse_infer_request(
            document, model.inputs, model.outputs, max_elements=self.limits.max_tensor_elements
        )
        results = model.run(request.inputs, request.outputs)
        payload: JSON = {
            "model_name": model.name,
            "model_version": model.version,
            "outputs": [
                encode_tensor(name, array)
                for name, array in zip(request.outputs, results, strict=True)
            ],
        }
        if request.id is not None:
            payload["id"] = request.id
        return json.dumps(payload).encode("utf-8")


def build_app(
    slot: ModelSlot,
    metrics: RuntimeMetrics,
    *,
    loader: ModelLoader | None = None,
    limits: ServerLimits | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> web.Application:
    """The aiohttp application; with a `loader`, a startup task loads the model, then readiness."""
    limits = limits or ServerLimits()
    api = _Api(slot, metrics, limits)
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[_json_errors])
    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    app.router.add_get("/v2", api.server_metadata)
    app.router.add_get("/v2/health/live", api.live)
    app.router.add_get("/v2/health/ready", api.ready)
    for base in model_paths:
        app.router.add_get(base, api.model_metadata)
        app.router.add_get(f"{base}/ready", api.model_ready)
        app.router.add_post(f"{base}/infer", api.infer)
    app.router.add_get("/metrics", api.metrics_endpoint)

    async def run_loader() -> None:
        assert loader is not None
        try:
            model = await loader()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            slot.set_failed(f"{type(exc).__name__}: {exc}")
            log.error("model %r could not be loaded: %s", slot.name, exc)
            if on_load_failure is not None:
                on_load_failure(exc)
            return
        slot.set_ready(model)
        log.info("model %r is ready", slot.name)

    async def loader_task(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run_loader()) if loader is not None else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drain(_: web.Application) -> None:
        slot.drain()

    async def release(_: web.Application) -> None:
        slot.release()

    app.cleanup_ctx.append(loader_task)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(release)
    return app


async def serve(
    slot: ModelSlot,
    loader: ModelLoader | None,
    options: ServeOptions | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (exit code 0) or until the model fails to load (exit code 1).

    On a signal the server stops reporting ready, waits `drain_seconds` for load balancers to
    notice, stops accepting connections, and gives in-flight requests `shutdown_timeout`.
    """
    options = options or ServeOptions()
    metrics = RuntimeMetrics(registry or CollectorRegistry())
    stop = asyncio.Event()
    exit_code = 0

    def load_failed(_: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    app = build_app(
        slot, metrics, loader=loader, limits=options.limits, on_load_failure=load_failed
    )
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    log.info("serving model %r on %s:%d", slot.name, options.host, options.port)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        slot.drain()
        if options.drain_seconds > 0 and exit_code == 0:
            log.info("draining for %.1fs before shutdown", options.drain_seconds)
            await asyncio.sleep(options.drain_seconds)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        await runner.cleanup()
    log.info("server stopped (exit code %d)", exit_code)
    return exit_code
