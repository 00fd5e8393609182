"""Operations endpoints: liveness (the process answers), readiness (it can do
useful work) and the Prometheus metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .json_codec import JSONResponse
from .limiter import RateLimiter
from .errors import ApiError
from .metrics import CONTENT_TYPE, Metrics, MetricsUnavailable
from .store import Store, StoreUnavailable
from .upstream import TransportError, Upstream, UpstreamStatusError

CHECK_TIMEOUT = 2.0


class Health:
    def __init__(self, store: Store, upstream: Upstream, limiter: RateLimiter, metrics: Metrics) -> None:
        self._metrics = metrics
        self._store = store
        self._upstream = upstream
        self._limiter = limiter
        # The upstream check under way, which every readiness request arriving meanwhile shares:
        # /health/ready needs no key, and each one was a request to LiteLLM with Tollgate's key.
        self._upstream_check: asyncio.Future[str] | None = None

    def routes(self) -> list[Route]:
        return [Route("/health/live", self.live), Route("/health/ready", self.ready), Route("/metrics", self.metrics)]

    async def metrics(self, request: Request) -> Response:
        try:
            return Response(await self._metrics.render(self._store.team_balances), media_type=CONTENT_TYPE)
        except MetricsUnavailable as exc:
            raise ApiError(503, str(exc), code="metrics_unavailable") from None

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        store, upstream, redis = await asyncio.gather(
            self._check_store(), self._check_upstream(), self._limiter.check()
        )
        components = {"store": store, "upstream": upstream, "redis": redis}
        failing = [name for name in ("store", "upstream") if components[name] != "ok"]
        # Without Redis the limits still hold per process; only 'deny' makes that an outage.
        if redis.startswith("degraded") and self._limiter.policy == "deny":
            failing.append("redis")
        body = {"status": "unavailable" if failing else "ok", "components": components, "failing": failing}
        return JSONResponse(body, status_code=503 if failing else 200)

    async def _check_store(self) -> str:
        try:
            await asyncio.wait_for(self._store.ping(), CHECK_TIMEOUT)
            return "ok"
        except StoreUnavailable as exc:
            return f"failing: {exc}"  # why it takes no writes: the operator's first question
        except Exception as exc:
            return f"failing: {type(exc).__name__}"

    async def _check_upstream(self) -> str:
        check = self._upstream_check
        if check is None or check.done():
            check = self._upstream_check = asyncio.ensure_future(self._ask_upstream())
        return await asyncio.shield(check)

    async def _ask_upstream(self) -> str:
        # /v1/models needs Tollgate's key: one request checks LiteLLM is up and accepts us.
        try:
            await asyncio.wait_for(self._upstream.get_json("/v1/models", CHECK_TIMEOUT), CHECK_TIMEOUT)
        except UpstreamStatusError as exc:
            if exc.status_code in (400, 401, 403):
                return "failing: LiteLLM refuses Tollgate's upstream key"
            return f"failing: HTTP {exc.status_code}"
        except TransportError as exc:  # its own text says why ("Connection refused"), its class does not
            return f"failing: {exc}"
        except Exception as exc:
            return f"failing: {type(exc).__name__}"
        return "ok"
