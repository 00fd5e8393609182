"""The one HTTP client to the LiteLLM Proxy, shared by the whole process."""

from __future__ import annotations

from typing import Any

import httpx

from .config import Secret, UpstreamConfig

CHAT_PATH = "/v1/chat/completions"


class Upstream:
    def __init__(
        self, config: UpstreamConfig, key: Secret | None, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        timeouts = config.timeouts
        self.timeouts = timeouts
        self.url = config.url.rstrip("/")
        headers = {
            "Content-Type": "application/json",
            # Bytes are relayed as they come: never let the upstream compress them.
            "Accept-Encoding": "identity",
        }
        if key is not None:
            headers["Authorization"] = f"Bearer {key.value}"
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=timeouts.connect, read=timeouts.first_byte, write=timeouts.connect, pool=timeouts.connect
            ),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open_chat(self, body: bytes) -> httpx.Response:
        """Send a chat request; return as soon as the response headers are in."""
        request = self._client.build_request("POST", CHAT_PATH, content=body)
        return await self._client.send(request, stream=True)

    async def get_json(self, path: str, timeout: float) -> Any:
        response = await self._client.get(path, timeout=timeout)
        response.raise_for_status()
        return response.json()
