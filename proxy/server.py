"""The HTTP server `tollgate serve` (and the demo) runs: uvicorn, with its httptools protocol
writing through a `CoalescingTransport` (coalesce.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .coalesce import CoalescingTransport


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what `tollgate serve` ran before), writing through a
    `CoalescingTransport`: a plain answer's head and body leave in one write, and a stream's
    head with its first events."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))


def uvicorn_options(host: str, port: int, log_level: str, shutdown_grace: float) -> dict[str, Any]:
    """How Tollgate runs uvicorn: its own access log and protocol, no `server` header."""
    return dict(
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        http=CoalescingHttpProtocol,
        timeout_graceful_shutdown=shutdown_grace,
    )
