"""The HTTP server `tollgate serve` runs: uvicorn, with its httptools protocol writing through
a `CoalescingTransport` (coalesce.py)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .coalesce import CoalescingTransport


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (what `tollgate serve` ran before), writing through a
    `CoalescingTransport`: a plain answer's head and body leave in one write, and a stream's
    head with its first events."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
