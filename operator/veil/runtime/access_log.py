"""A cheap access log: one line per request, written in batches.

aiohttp's default access logger builds a LogRecord, formats a timestamp with strftime and
writes (and flushes) the stream for every request: about a sixth of a small model's request
time. Here the server's handlers add the line themselves (aiohttp's logger hook costs two loop
clock reads and two calls more), a line is one f-string (the timestamp prefix is formatted once
a second) appended to a buffer, and the buffer is written out a few times a second and at
shutdown. Requests aiohttp refuses itself (malformed HTTP) write no line. Lines start like the
rest of the process's log (`2025-01-31 12:00:00,123 INFO veil.runtime.access: `), then:

    10.0.0.7 "POST /v2/models/m/infer HTTP/1.1" 200 187 0.412ms
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from aiohttp.web_request import BaseRequest
from aiohttp.web_response import Response, StreamResponse

LOGGER_NAME = "veil.runtime.access"
_FLUSH_SECONDS = 0.25
_FLUSH_LINES = 2048


class AccessLog:
    """The buffer every request's line goes to."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream  # None: sys.stderr at the time of writing
        self._lines: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def add(self, request: BaseRequest, response: StreamResponse, seconds: float) -> None:
        """One line for an answered request (called before the response is sent: the length
        is that of the body given, not of bytes written)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        version = request.version
        body = response.body if isinstance(response, Response) else None
        self._lines.append(
            f"{self._stamp},{int((now - second) * 1000):03d} INFO {LOGGER_NAME}: "
            f'{request.remote} "{request.method} {request.raw_path} '
            f'HTTP/{version.major}.{version.minor}" {response.status} '
            f"{len(body) if isinstance(body, bytes) else 0} {seconds * 1000:.3f}ms\n"
        )
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        stream = self._stream or sys.stderr
        stream.write(text)
        stream.flush()
