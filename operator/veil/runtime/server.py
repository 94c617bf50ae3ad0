"""The inference server: onnxruntime behind the Open Inference Protocol v2 REST API (aiohttp).

    GET  /v2                                   server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live                       200 while the process serves HTTP
    GET  /v2/health/ready                      200 once the model is unsealed and loaded, else 503
    POST /v2/repository/index                  the served model and its state
    GET  /v2/models/{name}[/versions/{v}]      model metadata (404 unknown, 503 not ready)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer  JSON, or the binary tensor data extension

With a channel (`build_app(channel=...)`, see channel.py and evidence.py):

    GET  /v2/evidence[?nonce=N]                the channel key and the token that attests it
    POST /v2/sessions                          open a channel session (an HPKE-sealed secret;
         201 with the sealed confirmation; see sessions.py)
    POST /v2/models/{name}[/versions/{v}]/infer/encrypted   an encrypted infer request, HPKE
         (one per request) or of a session, by its Content-Type; 200 with the encrypted answer
         (its inner status says how it went) once the request opens; 400 when it does not
         (altered, another key, an unknown session), before anything is decoded
    and, when encryption is required, POST .../infer answers 403 (no plaintext inference).

Prometheus metrics are served by a separate app (`build_metrics_app`) on its own port, so the
inference port serves only the protocol.

Errors are JSON `{"error": "..."}`: 400 for requests that do not fit the protocol or the model,
404 for unknown models, 408 for bodies that do not arrive within the read timeout, 413 for
bodies over the limit, 503 before the model is ready or while the body budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from veil import __version__
from veil.runtime import sessions
from veil.runtime.access_log import LOGGER_NAME as ACCESS_LOGGER
from veil.runtime.access_log import AccessLog
from veil.runtime.admission import BodyBudget
from veil.runtime.channel import (
    EVIDENCE_PATH,
    REQUEST_MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    ChannelError,
    Opened,
)
from veil.runtime.codec import HEADER_LENGTH, encode_response, load_json, split_body
from veil.runtime.evidence import EvidenceService, EvidenceUnavailableError
from veil.runtime.loader import ModelLoader
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import InferenceError, OnnxModel
from veil.runtime.offload import CostModel
from veil.runtime.protocol import InferRequest, RequestError, parse_infer_request
from veil.runtime.routes import Handler, add_routes, error, plain
from veil.runtime.state import ModelSlot, ModelState

log = logging.getLogger("veil.runtime.server")

# Which answer each encrypted request's Content-Type gets.
_ANSWER_MEDIA_TYPES = {
    REQUEST_MEDIA_TYPE: RESPONSE_MEDIA_TYPE,
    sessions.REQUEST_MEDIA_TYPE: sessions.RESPONSE_MEDIA_TYPE,
}
# An offer is a header, an encapsulated key and a sealed 32-byte secret: 90 bytes.
_MAX_SESSION_OFFER_BYTES = 1024

EXTENSIONS = ["binary_tensor_data"]
# Triton's names for model states, as its repository index reports them.
_INDEX_STATES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.DRAINING: "UNLOADING",
}
# Larger bodies are parsed in a worker thread: parsing holds the GIL, but the loop still gets
# a turn every switch interval instead of waiting for the whole parse.
_INLINE_DECODE_BYTES = 256 * 1024
# The app's body budget, for tests and diagnostics.
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
SESSION_TABLE = web.AppKey("session_table", sessions.SessionTable)
# How long a refused body may keep arriving (and be discarded) so its client sees the answer.
_LINGERING_SECONDS = 2.0


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request, and all requests together, may cost."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_tensor_elements: int = 16 * 1024 * 1024
    max_concurrent_inferences: int = 8
    # Bytes of bodies held at once (reserved before reading); None: twice max_body_bytes.
    max_body_bytes_in_flight: int | None = None
    # Seconds a body may take to arrive, and a request may wait for the body budget.
    read_timeout: float = 10.0
    # The model runs inline on the loop for requests of a size that recently ran (and had
    # their answer encoded) faster than this; others run in a worker thread.
    inline_compute_seconds: float = 0.001

    def __post_init__(self) -> None:
        if self.body_budget < self.max_body_bytes:
            raise ValueError("max_body_bytes_in_flight must be at least max_body_bytes")

    @property
    def body_budget(self) -> int:
        return self.max_body_bytes_in_flight or 2 * self.max_body_bytes


@dataclass(frozen=True)
class ServeOptions:
    """Where to listen and how to stop."""

    host: str = "0.0.0.0"  # a pod's server listens on all its interfaces
    port: int = 8080
    metrics_port: int | None = None  # None: no metrics endpoint
    shutdown_timeout: float = 20.0
    drain_seconds: float = 0.0
    # Idle keep-alive connections close after this; it also bounds a client trickling headers.
    keepalive_timeout: float = 15.0
    limits: ServerLimits = field(default_factory=ServerLimits)


class _RefusedError(Exception):
    """Carries a finished error response and its metric outcome out of the infer path."""

    def __init__(self, outcome: str, response: web.Response) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.response = response


class _Api:
    def __init__(
        self,
        slot: ModelSlot,
        metrics: RuntimeMetrics,
        limits: ServerLimits,
        access_log: AccessLog | None,
        channel: EvidenceService | None = None,
    ) -> None:
        self.slot = slot
        self.channel = channel
        self.limits = limits
        self.access_log = access_log
        self.semaphore = asyncio.Semaphore(limits.max_concurrent_inferences)
        self.budget = BodyBudget(limits.body_budget)
        self.costs = CostModel(limits.inline_compute_seconds)
        self.stats = metrics.inference.for_model(slot.name)
        self.sessions = None
        if channel is not None:
            self.sessions = sessions.SessionTable(lambda: channel.key)

    def _known(self, request: web.Request) -> bool:
        version = request.match_info.get("version")
        return request.match_info["name"] == self.slot.name and version in (None, self.slot.version)

    def _unknown(self, request: web.Request) -> web.Response:
        return error(404, f"model {request.match_info['name']!r} is not served here")

    def _not_ready_message(self) -> str:
        return f"model {self.slot.name!r} is not ready ({self.slot.state.value})"

    async def server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response({"name": "veil", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        if self.slot.model is None:
            return web.json_response({"ready": False, "state": self.slot.state.value}, status=503)
        if self.channel is not None and not self.channel.serving:
            body = {"ready": False, "state": "attesting", "reason": self.channel.last_failure}
            return web.json_response(body, status=503)
        return web.json_response({"ready": True})

    async def repository_index(self, _: web.Request) -> web.Response:
        # The body (Triton's optional {"ready": bool} filter) is not read: one model is served.
        entry = {
            "name": self.slot.name,
            "version": self.slot.version,
            "state": _INDEX_STATES[self.slot.state],
        }
        if self.slot.failure is not None:
            entry["reason"] = self.slot.failure
        return web.json_response([entry])

    async def model_metadata(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return self._unknown(request)
        model = self.slot.model
        if model is None:
            return error(503, self._not_ready_message())
        return web.json_response(model.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        if not self._known(request):
            return self._unknown(request)
        ready = self.slot.model is not None
        body = {"name": self.slot.name, "ready": ready}
        if not ready:
            body["state"] = self.slot.state.value
        return web.json_response(body, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        if self._known(request):
            return await self.infer_served(request)
        response = self._unknown(request)
        if self.access_log is not None:
            self.access_log.add(request, response, 0.0)
        return response

    async def infer_served(self, request: web.Request) -> web.Response:
        """POST infer for the served model (its own route: no name check, no regex match)."""
        started = time.perf_counter()
        outcome = "error"
        try:
            # The whole infer path is this one coroutine: each extra level costs about a
            # microsecond of a small model's request.
            model, reserved, admitted = self._admit(request)
            if not admitted and not await self.budget.reserve(reserved, self.limits.read_timeout):
                busy = error(503, "the server is busy receiving other requests; retry shortly")
                busy.headers[hdrs.RETRY_AFTER] = "1"
                raise _RefusedError("busy", busy)
            try:
                raw = await self._read(request)
                header_length = request.headers.get(HEADER_LENGTH)
                size = len(raw)
                if size > _INLINE_DECODE_BYTES:
                    async with self.semaphore:
                        body, binary_header = await asyncio.to_thread(
                            self._compute, model, raw, header_length
                        )
                else:
                    infer = self._decode(model, raw, header_length)
                    if self.costs.inline(size):
                        body, binary_header = self._run(model, infer, size)
                    else:
                        async with self.semaphore:
                            body, binary_header = await asyncio.to_thread(
                                self._run, model, infer, size
                            )
            finally:
                self.budget.release(reserved)
            response = _answer(body, binary_header)
            outcome = "success"
        except _RefusedError as refused:
            response, outcome = refused.response, refused.outcome
        except Exception:
            log.exception("inference request failed unexpectedly")
            response = error(500, "internal error while answering the request")
        finally:
            seconds = time.perf_counter() - started
            self.stats.record(outcome, seconds)
        if self.access_log is not None:
            self.access_log.add(request, response, seconds)
        return response

    # --- the encrypted channel (beside the plaintext path, which stays as it is) -------------

    async def evidence(self, request: web.Request) -> web.Response:
        assert self.channel is not None
        nonce = request.query.get("nonce")
        try:
            if nonce is None:
                document = self.channel.current()
            else:
                document = await self.channel.fresh(nonce)
        except ValueError as exc:
            return error(400, str(exc))
        except EvidenceUnavailableError as exc:
            response = error(exc.status, str(exc))
            response.headers[hdrs.RETRY_AFTER] = "5"
            return response
        response = web.json_response(document)
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        return response

    async def plaintext_refused(self, request: web.Request) -> web.Response:
        """POST infer when encryption is required: refused before the body is read."""
        path = request.match_info.get("name", self.slot.name)
        response = error(
            403,
            f"model {path!r} accepts only encrypted requests: fetch GET {EVIDENCE_PATH}, verify "
            "it, and POST an HPKE-encrypted request to .../infer/encrypted (veil infer does)",
        )
        response.force_close()  # the unread body is not waited for
        self.stats.record("bad_request", 0.0)
        if self.access_log is not None:
            self.access_log.add(request, response, 0.0)
        return response

    async def open_session(self, request: web.Request) -> web.Response:
        """POST a session offer: the sealed confirmation (201), or 400 when it does not open."""
        assert self.sessions is not None
        if request.content_type != sessions.OPEN_MEDIA_TYPE:
            message = f"a session offer has Content-Type {sessions.OPEN_MEDIA_TYPE}"
            return error(415, message)
        length = request.content_length
        if length is None or length > _MAX_SESSION_OFFER_BYTES:
            response = error(413, f"a session offer is at most {_MAX_SESSION_OFFER_BYTES} bytes")
            response.force_close()
            return response
        try:
            raw = await self._read(request)
            confirmation = self.sessions.open_session(raw)
        except _RefusedError as refused:
            return refused.response
        except ChannelError as exc:
            return error(400, str(exc))
        return web.Response(status=201, body=confirmation, content_type=sessions.OPENED_MEDIA_TYPE)

    async def infer_encrypted(self, request: web.Request) -> web.Response:
        if self._known(request):
            return await self.infer_encrypted_served(request)
        response = self._unknown(request)
        if self.access_log is not None:
            self.access_log.add(request, response, 0.0)
        return response

    async def infer_encrypted_served(self, request: web.Request) -> web.Response:
        """POST an encrypted infer request: open it, run it as `infer_served` would, and answer
        encrypted to the key it carries. Errors after it opens are answered inside the
        envelope (they may echo the caller's data); errors before, in plain JSON."""
        started = time.perf_counter()
        outcome = "error"
        try:
            media_type = _ANSWER_MEDIA_TYPES.get(request.content_type)
            if media_type is None:
                message = (
                    f"an encrypted request has Content-Type {sessions.REQUEST_MEDIA_TYPE} "
                    f"(a session's) or {REQUEST_MEDIA_TYPE} (HPKE)"
                )
                raise _RefusedError("bad_request", error(415, message))
            session = media_type is sessions.RESPONSE_MEDIA_TYPE
            model, reserved, admitted = self._admit(request)
            if not admitted and not await self.budget.reserve(reserved, self.limits.read_timeout):
                busy = error(503, "the server is busy receiving other requests; retry shortly")
                busy.headers[hdrs.RETRY_AFTER] = "1"
                raise _RefusedError("busy", busy)
            try:
                raw = await self._read(request)
                if len(raw) > _INLINE_DECODE_BYTES:
                    async with self.semaphore:
                        sealed, outcome = await asyncio.to_thread(
                            self._sealed_answer, model, raw, session
                        )
                else:
                    opened = self._open(raw, session)
                    infer = self._decode_opened(model, opened)
                    if isinstance(infer, bytes):  # refused inside the envelope
                        sealed, outcome = infer, "bad_request"
                    elif self.costs.inline(len(opened.body)):
                        sealed, outcome = self._run_sealed(model, opened, infer)
                    else:
                        async with self.semaphore:
                            sealed, outcome = await asyncio.to_thread(
                                self._run_sealed, model, opened, infer
                            )
            finally:
                self.budget.release(reserved)
            response = web.Response(body=sealed, content_type=media_type)
        except _RefusedError as refused:
            response, outcome = refused.response, refused.outcome
        except Exception:
            log.exception("encrypted inference request failed unexpectedly")
            response = error(500, "internal error while answering the request")
        finally:
            seconds = time.perf_counter() - started
            self.stats.record(outcome, seconds)
        if self.access_log is not None:
            self.access_log.add(request, response, seconds)
        return response

    def _open(self, raw: bytes, session: bool) -> Opened:
        """Decrypt a request; a plain 400 if it does not open (nothing of it is decoded)."""
        assert self.channel is not None
        assert self.sessions is not None
        try:
            if session:
                return self.sessions.open_request(raw)
            return self.channel.key.open_request(raw)
        except ChannelError as exc:
            raise _RefusedError("bad_request", error(400, str(exc))) from None

    def _decode_opened(self, model: OnnxModel, opened: Opened) -> InferRequest | bytes:
        """The decoded request, or the sealed refusal when it does not fit the model."""
        header = None if opened.header_length is None else str(opened.header_length)
        try:
            return self._decode(model, opened.body, header)
        except _RefusedError as refused:
            return _seal_refusal(opened, refused)

    def _run_sealed(
        self, model: OnnxModel, opened: Opened, infer: InferRequest
    ) -> tuple[bytes, str]:
        try:
            body, binary_header = self._run(model, infer, len(opened.body))
        except _RefusedError as refused:
            return _seal_refusal(opened, refused), refused.outcome
        return opened.seal_response(200, body, binary_header), "success"

    def _sealed_answer(self, model: OnnxModel, raw: bytes, session: bool) -> tuple[bytes, str]:
        """All of it, in a worker thread, for a body too large to open on the loop."""
        opened = self._open(raw, session)
        infer = self._decode_opened(model, opened)
        if isinstance(infer, bytes):
            return infer, "bad_request"
        return self._run_sealed(model, opened, infer)

    def _admit(self, request: web.Request) -> tuple[OnnxModel, int, bool]:
        """The model, the body bytes to reserve, and whether they were reserved at once;
        refuses a request when no model is ready or its declared length is over the limit."""
        model = self.slot.model
        if model is None:
            raise _RefusedError("not_ready", error(503, self._not_ready_message()))
        limit = self.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise self._too_large()
        # A compressed body may inflate to the limit whatever its declared length.
        reserved = limit if length is None or hdrs.CONTENT_ENCODING in request.headers else length
        return model, reserved, self.budget.try_reserve(reserved)

    def _too_large(self) -> _RefusedError:
        limit = self.limits.max_body_bytes
        message = f"the request body is larger than the limit of {limit} bytes"
        return _RefusedError("too_large", error(413, message))

    async def _read(self, request: web.Request) -> bytes:
        try:
            if request.content.is_eof():  # received whole already: nothing to wait for
                return await request.read()
            async with asyncio.timeout(self.limits.read_timeout):
                return await request.read()
        except TimeoutError:
            timeout = self.limits.read_timeout
            response = error(408, f"the request body did not arrive within {timeout:g} s")
            response.force_close()
            raise _RefusedError("timeout", response) from None
        except web.HTTPRequestEntityTooLarge:  # a chunked or compressed body grew too big
            raise self._too_large() from None
        except web.RequestPayloadError as exc:  # e.g. a corrupt compressed body
            message = f"the request body could not be read: {exc}".replace("\n", " ")
            refusal = error(400, message)
            refusal.force_close()  # the rest of the stream cannot be parsed either,
            request.content.feed_eof()  # and aiohttp need not read (and log) it again
            raise _RefusedError("bad_request", refusal) from None

    def _decode(self, model: OnnxModel, raw: bytes, header_length: str | None) -> InferRequest:
        """Parse and validate the body (holding the GIL: a thread would not free the loop)."""
        try:
            if header_length is None:  # plain JSON, the common case: one call fewer
                document, binary = load_json(raw), None
            else:
                document, binary = split_body(raw, header_length)
            return parse_infer_request(
                document,
                model.signature,
                max_elements=self.limits.max_tensor_elements,
                binary=binary,
            )
        except RequestError as exc:
            raise _RefusedError("bad_request", error(400, str(exc))) from None

    def _run(self, model: OnnxModel, request: InferRequest, size: int) -> tuple[bytes, int | None]:
        """Run the model and encode the answer, timed for the cost model under `size`."""
        started = time.perf_counter()
        try:
            results = model.run(request.inputs, request.outputs)
        except InferenceError as exc:
            if exc.client_error:
                message = f"the model rejected the inputs: {exc}"
                raise _RefusedError("bad_request", error(400, message)) from None
            log.error("inference on model %r failed: %s", model.name, exc)
            raise _RefusedError("error", error(500, "inference failed inside the model")) from None
        answer = encode_response(model.name, model.version, request, results)
        self.costs.record(size, time.perf_counter() - started)
        return answer

    def _compute(
        self, model: OnnxModel, raw: bytes, header_length: str | None
    ) -> tuple[bytes, int | None]:
        """All of it, in a worker thread, for a body too large to parse on the loop."""
        return self._run(model, self._decode(model, raw, header_length), len(raw))


def _seal_refusal(opened: Opened, refused: _RefusedError) -> bytes:
    inner = refused.response.body
    return opened.seal_response(refused.response.status, inner if isinstance(inner, bytes) else b"")


def _answer(body: bytes, binary_header: int | None) -> web.Response:
    if binary_header is None:
        return web.Response(body=body, content_type="application/json")
    headers = {HEADER_LENGTH: str(binary_header), hdrs.CONTENT_TYPE: "application/octet-stream"}
    return web.Response(body=body, headers=headers)


def build_metrics_app(registry: CollectorRegistry) -> web.Application:
    """The Prometheus endpoint, `GET /metrics`, for its own port."""

    async def metrics_endpoint(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    add_routes(app, [("/metrics", {hdrs.METH_GET: metrics_endpoint})], access_log=None)
    return app


def _channel_routes(
    api: _Api, served: list[str], model_paths: list[str]
) -> tuple[Handler, Handler, list[tuple[str, dict[str, Handler]]]]:
    """The plaintext infer handlers (refusals when encryption is required) and the channel's
    routes (none without a channel)."""
    infer_served: Handler = api.infer_served
    infer: Handler = api.infer
    channel = api.channel
    if channel is None:
        return infer_served, infer, []
    if channel.required:
        infer_served = infer = api.plaintext_refused
    sealed_served: Handler = api.infer_encrypted_served
    sealed_any: Handler = api.infer_encrypted
    post = hdrs.METH_POST
    return (
        infer_served,
        infer,
        [
            *[(f"{base}/infer/encrypted", {post: sealed_served}) for base in served if plain(base)],
            *[(f"{base}/infer/encrypted", {post: sealed_any}) for base in model_paths],
            (EVIDENCE_PATH, {hdrs.METH_GET: api.evidence}),
            (sessions.SESSIONS_PATH, {post: api.open_session}),
        ],
    )


def build_app(
    slot: ModelSlot,
    metrics: RuntimeMetrics,
    *,
    loader: ModelLoader | None = None,
    limits: ServerLimits | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    access_log: AccessLog | None = None,
    channel: EvidenceService | None = None,
) -> web.Application:
    """The aiohttp application; with a `loader`, a startup task loads the model, then readiness.
    With an `access_log`, every request it answers writes a line there. With a `channel`, the
    evidence and encrypted infer routes are served too, and plaintext infer is refused when
    the channel requires encryption."""
    limits = limits or ServerLimits()
    api = _Api(slot, metrics, limits, access_log, channel)
    app = web.Application(client_max_size=limits.max_body_bytes)
    app[BODY_BUDGET] = api.budget
    if api.sessions is not None:
        app[SESSION_TABLE] = api.sessions
    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    get, post = hdrs.METH_GET, hdrs.METH_POST
    served = [f"/v2/models/{slot.name}", f"/v2/models/{slot.name}/versions/{slot.version}"]
    infer_served, infer, encrypted = _channel_routes(api, served, model_paths)
    add_routes(
        app,
        [
            # Plain paths are found by a dict lookup, before any pattern is tried.
            *[(f"{base}/infer", {post: infer_served}) for base in served if plain(base)],
            *[(f"{base}/infer", {post: infer}) for base in model_paths],
            *encrypted,
            ("/v2", {get: api.server_metadata}),
            ("/v2/health/live", {get: api.live}),
            ("/v2/health/ready", {get: api.ready}),
            ("/v2/repository/index", {post: api.repository_index}),
            *[(base, {get: api.model_metadata}) for base in model_paths],
            *[(f"{base}/ready", {get: api.model_ready}) for base in model_paths],
        ],
        access_log,
        self_logging=(
            api.infer_served,
            api.infer,
            api.plaintext_refused,
            api.infer_encrypted_served,
            api.infer_encrypted,
        ),
    )

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
    if channel is not None:

        async def attesting(_: web.Application) -> AsyncIterator[None]:
            async with channel.lifespan():
                yield

        app.cleanup_ctx.append(attesting)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(release)
    return app


def runner_options(options: ServeOptions) -> dict[str, Any]:
    """AppRunner settings of the inference port: timeouts; aiohttp's access logger off (the
    handlers write the access log, see `build_app`)."""
    return {
        "shutdown_timeout": options.shutdown_timeout,
        "keepalive_timeout": options.keepalive_timeout,
        "lingering_time": _LINGERING_SECONDS,
        "access_log": None,
    }


async def _start(app: web.Application, host: str, port: int, **settings: Any) -> web.AppRunner:
    runner = web.AppRunner(app, **settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def run(main: Coroutine[Any, Any, int]) -> int:
    """`asyncio.run`, on uvloop's event loop when uvloop is installed: its loop is written in C,
    where asyncio's own spends about a fifth of a small model's request in Python."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    code: int = uvloop.run(main)
    return code


async def serve(
    slot: ModelSlot,
    loader: ModelLoader | None,
    options: ServeOptions | None = None,
    *,
    registry: CollectorRegistry | None = None,
    channel: EvidenceService | None = None,
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

    logged = logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
    access_log = AccessLog() if logged else None
    app = build_app(
        slot,
        metrics,
        loader=loader,
        limits=options.limits,
        on_load_failure=load_failed,
        access_log=access_log,
        channel=channel,
    )
    runners: list[web.AppRunner] = []
    loop = asyncio.get_running_loop()
    try:
        if options.metrics_port is not None:
            metrics_app = build_metrics_app(metrics.registry)
            runners.append(
                await _start(metrics_app, options.host, options.metrics_port, access_log=None)
            )
            log.info("serving metrics on %s:%d", options.host, options.metrics_port)
        runners.append(await _start(app, options.host, options.port, **runner_options(options)))
        log.info("serving model %r on %s:%d", slot.name, options.host, options.port)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        slot.drain()
        if options.drain_seconds > 0 and exit_code == 0:
            log.info("draining for %.1fs before shutdown", options.drain_seconds)
            await asyncio.sleep(options.drain_seconds)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        for runner in reversed(runners):
            await runner.cleanup()
        if access_log is not None:
            access_log.flush()
    log.info("server stopped (exit code %d)", exit_code)
    return exit_code
