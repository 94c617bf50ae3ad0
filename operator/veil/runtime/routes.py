"""Routing for the runtime's aiohttp apps: JSON errors everywhere, the access log written by the
handlers, no middleware."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import hdrs, web

from veil.runtime.access_log import AccessLog


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _not_found(_: web.Request) -> web.Response:
    return error(404, "not found")


def _method_not_allowed(allowed: list[str]) -> Handler:
    allow = ", ".join(allowed)

    async def refuse(request: web.Request) -> web.Response:
        response = error(405, f"method {request.method} is not allowed here (allowed: {allow})")
        response.headers[hdrs.ALLOW] = allow
        return response

    return refuse


def plain(path: str) -> bool:
    """Whether aiohttp takes `path` literally (a model name could hold braces or escapes)."""
    return not any(char in path for char in "{}%")


def _logged(handler: Handler, access_log: AccessLog) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        access_log.add(request, response, time.perf_counter() - started)
        return response

    return handle


def add_routes(
    app: web.Application,
    routes: Sequence[tuple[str, Mapping[str, Handler]]],
    access_log: AccessLog | None,
    self_logging: Sequence[Handler] = (),
) -> None:
    """Routes whose errors are JSON too, without a middleware (it would wrap every request in
    two more coroutines): each path answers other methods with 405, unknown paths get 404.
    Dynamic paths sharing a prefix are tried in order, so the hot one goes first. With an
    access log, every handler is wrapped to write its line, except those that write their own
    (the infer handlers: one coroutine fewer)."""

    def wrap(handler: Handler) -> Handler:
        if access_log is None or handler in self_logging:
            return handler
        return _logged(handler, access_log)

    for path, handlers in routes:
        resource = app.router.add_resource(path)
        methods = dict(handlers)
        if hdrs.METH_GET in methods:
            methods[hdrs.METH_HEAD] = methods[hdrs.METH_GET]
        for method, handler in methods.items():
            resource.add_route(method, wrap(handler))
        resource.add_route(hdrs.METH_ANY, wrap(_method_not_allowed(sorted(methods))))
    app.router.add_route(hdrs.METH_ANY, "/{path:.*}", wrap(_not_found))
