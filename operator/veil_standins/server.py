"""Serve an aiohttp application of the LOCAL STAND-INS in a background thread, and name its URL.

Not a security boundary: a convenience for tests and `python -m veil_standins`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import ssl
import threading

from aiohttp import web

_DEFAULT_PORTS = {"https": 443, "http": 80}


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) as (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def base_url(scheme: str, host: str, port: int) -> str:
    """The URL clients use for a server bound to host:port (the scheme's own port omitted, as
    Azure's URLs omit it, so that issuers and authorities compare equal as strings)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host
    else:
        # A wildcard bind is reached through loopback here.
        if address.is_unspecified:
            address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
        name = f"[{address}]" if address.version == 6 else str(address)
    if _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{name}"
    return f"{scheme}://{name}:{port}"


class ServerThread:
    """Serves `app` on host:port (default 127.0.0.1 and a free port), HTTPS when given an SSL
    context, until `stop()`."""

    def __init__(
        self,
        app: web.Application,
        ssl_context: ssl.SSLContext | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._app = app
        self._ssl = ssl_context
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="veil-standin", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return base_url("https" if self._ssl else "http", self.host, self.port)

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the stand-in did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the stand-in failed to start on {self.host}: {self._error}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app, access_log=None)
        try:
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl)
            self._loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.ident is not None:  # started at all
            self._thread.join(10)
