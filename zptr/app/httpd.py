"""uvicorn as ``zptr serve`` runs it: a deadline on request headers, and a shutdown that ends
the generations in flight before it waits for their responses.

    uvicorn.Config(app, http=header_timeout_protocol(20.0), ...)
    GracefulServer(config, app.state.stop_generations).run(sockets=[sock])
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, from the connection's
    start or the previous response's end. uvicorn's own keep-alive timer starts only after a
    response and stops at the next byte, so a client that sends half a request line and waits
    holds its connection (and a file descriptor) for ever."""

    timeout: float  # seconds; set by header_timeout_protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._headers_due: Optional[asyncio.TimerHandle] = None
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn starts on a pipelined next request
        super().on_response_complete()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        self._headers_due = self.loop.call_later(self.timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._headers_due = None
        # No request under way (none yet, or the last one answered): its headers are late.
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn's ``http`` setting, with ``timeout`` seconds for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"timeout": timeout})


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGINT, SIGTERM) stops listening, then ends every
    generation with its final event (``stop_generations``), then lets uvicorn wait for those
    responses. uvicorn itself waits for open responses before the application's lifespan shutdown,
    so a running stream would hold it ``timeout_graceful_shutdown`` seconds and then be cancelled
    mid-answer."""

    def __init__(self, config: uvicorn.Config, stop_generations: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.stop_generations = stop_generations

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        await self.stop_generations()
        await super().shutdown(sockets)
