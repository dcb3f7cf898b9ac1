"""Connection hygiene uvicorn leaves out: header size and read timeouts, a body read timeout, a cap on
open connections.

uvicorn times out only idle keep-alive connections: a client that opens a connection and never finishes
its headers (or its body) holds it forever, so two slow clients could exhaust the file descriptors and
take /healthz down with them, and headers of any size were read. `GuardedHttpToolsProtocol` is
uvicorn's httptools protocol with:

- headers over `max_header_bytes` -> 431, connection closed;
- headers not complete `header_timeout_s` after the request began -> 408, closed;
- a body not complete `body_timeout_s` after its headers -> 408 (or a plain close once the app has
  answered), closed;
- more than `max_connections` open: the connection idle longest (reading headers or between requests)
  is closed to make room, so a flood of slow connections cannot starve the probes; with none idle the
  new one is closed.

Built on uvicorn's protocol internals (pinned in pyproject.toml); tests/integration/server/
test_connections.py drives each limit over raw sockets.
"""

from __future__ import annotations

import json
import time
from asyncio import TimerHandle, Transport
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32_768
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
        """A subclass bound to `limits`: uvicorn takes a protocol class, not an instance."""
        return type("GuardedHttpToolsProtocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_timer: TimerHandle | None = None
        self._reading_headers = True
        self._raw_header_bytes = 0
        self._header_bytes = 0
        self._headers_too_large = False
        self._rejected = False
        self._reading_body = False
        self._idle_since = time.monotonic()

    # --- connection lifecycle ------------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_idlest():
            self._rejected = True
            self.transport.close()
            return
        self._arm(self.limits.header_timeout_s, "the request headers did not arrive in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _evict_idlest(self) -> bool:
        """Close the connection idle longest; failing that, the oldest still sending its body (a slow
        upload can be retried; a full house of them must not keep the probes out)."""
        others = [c for c in self.connections if isinstance(c, GuardedHttpToolsProtocol) and c is not self]
        for candidates in ([c for c in others if c.idle], [c for c in others if c._reading_body]):
            if candidates:
                min(candidates, key=lambda c: c._idle_since).transport.close()
                return True
        return False

    @property
    def idle(self) -> bool:
        """No request of this connection is being read or answered: waiting for its first request, or
        between requests (a pipelined request waiting for its turn counts as work)."""
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    # --- reading ----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._reading_headers:
            self._raw_header_bytes += len(data)
        super().data_received(data)
        if self._guard_timer is None and self.idle and not self._rejected:
            # uvicorn's keep-alive timer stops at any byte, and bare CRLFs between requests start no
            # request: without this a trickle of them would hold the connection forever.
            self._arm(self.limits.header_timeout_s, "the request headers did not arrive in time")
        # Bytes of a header line the parser has not finished yet never reach a callback: count them raw.
        if not self._rejected and self._reading_headers and self._raw_header_bytes > self.limits.max_header_bytes:
            self._reject(431, f"the request headers are over {self.limits.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error 400; a header-size overflow raised from a callback is a 431.
        if self._headers_too_large:
            self._reject(431, f"the request headers are over {self.limits.max_header_bytes} bytes")
            return
        super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._raw_header_bytes = self._header_bytes = 0
        if self._guard_timer is None:
            self._arm(self.limits.header_timeout_s, "the request headers did not arrive in time")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large = True
            raise _HeadersTooLarge  # stops the parser; uvicorn sees an HttpParserError

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()
        # Armed for every request, not only those whose headers announce a body (the parser accepts
        # forms such as "Content-Length: 10 " that a header check would miss); a request without a body
        # completes in the same parse and disarms it at once.
        self._reading_body = True
        self._arm(self.limits.body_timeout_s, "the request body did not arrive in time")

    def on_message_complete(self) -> None:
        self._reading_body = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        super().on_response_complete()

    # --- timers and refusals -----------------------------------------------------------------------------

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._guard_timer = self.loop.call_later(seconds, self._timed_out, reason)

    def _disarm(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _timed_out(self, reason: str) -> None:
        self._guard_timer = None
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and not self._reading_headers and self.cycle.response_started
        if answered:
            self.transport.close()
            return
        self._reject(408, reason)

    def _reject(self, status: int, message: str) -> None:
        """Answer in JSON like every other error of the server, then close: the request stream is unusable."""
        self._rejected = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app, if it runs, sees the client gone
            self.cycle.message_event.set()
        kind = {408: "timeout", 431: "headers_too_large"}.get(status, "unavailable")
        body = json.dumps({"error": {"type": kind, "message": message}}).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()


class _HeadersTooLarge(Exception):
    pass
