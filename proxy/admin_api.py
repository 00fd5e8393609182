"""The admin API under /admin, behind the master key."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .admin import AdminService, created_key_json
from .auth import MasterKeyGuard
from .bodies import read_json_object
from .config import Config
from .json_codec import JSONResponse
from .validation import parse_page, parse_paging
from .views import jobs_page_json, team_json

Handler = Callable[[Request], Awaitable[Response]]


class AdminApi:
    def __init__(self, admin: AdminService, guard: MasterKeyGuard, config: Config) -> None:
        self._admin = admin
        self._guard = guard
        self._config = config
        self._max_body = config.server.max_body_bytes

    def routes(self) -> list[Route]:
        table = [
            ("/admin/organizations", "POST", self.create_organization),
            ("/admin/organizations", "GET", self.list_organizations),
            ("/admin/teams", "POST", self.create_team),
            ("/admin/teams", "GET", self.list_teams),
            ("/admin/teams/{team_id}", "GET", self.get_team),
            ("/admin/teams/{team_id}", "PATCH", self.update_team),
            ("/admin/teams/{team_id}/credits", "POST", self.add_credits),
            ("/admin/teams/{team_id}/ledger", "GET", self.ledger),
            ("/admin/teams/{team_id}/keys", "POST", self.create_key),
            ("/admin/teams/{team_id}/keys", "GET", self.list_keys),
            ("/admin/teams/{team_id}/jobs", "GET", self.list_jobs),
            ("/admin/keys/{key_id}", "DELETE", self.revoke_key),
            ("/admin/model-groups", "POST", self.create_model_group),
            ("/admin/model-groups", "GET", self.list_model_groups),
            ("/admin/model-groups/{name}", "GET", self.get_model_group),
            ("/admin/model-groups/{name}", "PUT", self.put_model_group),
            ("/admin/model-groups/{name}", "DELETE", self.delete_model_group),
        ]
        # One route per path with all its methods: Starlette's 405 allows the methods of the first
        # route whose path matches, and a route per method told a PUT to a team GET alone.
        by_path: dict[str, dict[str, Handler]] = {}
        for path, method, handler in table:
            by_path.setdefault(path, {})[method] = handler
        return [
            Route(path, self._guarded(_by_method(handlers)), methods=list(handlers))
            for path, handlers in by_path.items()
        ]

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            self._guard.check(request.headers.get("authorization"))
            return await handler(request)

        guarded.__name__ = handler.__name__
        return guarded

    async def _body(self, request: Request) -> dict[str, Any]:
        return await read_json_object(request, self._max_body)

    def _team(self, team: Any, status: int = 200) -> Response:
        return JSONResponse(team_json(team, self._config), status_code=status)

    async def create_organization(self, request: Request) -> Response:
        organization = await self._admin.create_organization(await self._body(request))
        return JSONResponse(organization.to_json(), status_code=201)

    async def list_organizations(self, request: Request) -> Response:
        return JSONResponse([o.to_json() for o in await self._admin.list_organizations()])

    async def create_team(self, request: Request) -> Response:
        return self._team(await self._admin.create_team(await self._body(request)), 201)

    async def list_teams(self, request: Request) -> Response:
        return JSONResponse([team_json(t, self._config) for t in await self._admin.list_teams()])

    async def get_team(self, request: Request) -> Response:
        return self._team(await self._admin.get_team(request.path_params["team_id"]))

    async def update_team(self, request: Request) -> Response:
        return self._team(await self._admin.update_team(request.path_params["team_id"], await self._body(request)))

    async def add_credits(self, request: Request) -> Response:
        return self._team(await self._admin.add_credits(request.path_params["team_id"], await self._body(request)))

    async def ledger(self, request: Request) -> Response:
        limit, offset = parse_page(request.query_params, max_limit=1000)  # the ledger has no status
        entries = await self._admin.ledger(request.path_params["team_id"], limit, offset)
        return JSONResponse([entry.to_json() for entry in entries])

    async def create_key(self, request: Request) -> Response:
        key, plaintext = await self._admin.create_key(request.path_params["team_id"], await self._body(request))
        return JSONResponse(created_key_json(key, plaintext), status_code=201, headers={"cache-control": "no-store"})

    async def list_keys(self, request: Request) -> Response:
        return JSONResponse([k.to_json() for k in await self._admin.list_keys(request.path_params["team_id"])])

    async def list_jobs(self, request: Request) -> Response:
        team_id = request.path_params["team_id"]
        status, limit, offset = parse_paging(request.query_params)
        jobs, total, remaining = await self._admin.list_jobs(team_id, status, limit, offset)
        return JSONResponse(jobs_page_json(team_id, jobs, total, limit, offset, remaining))

    async def revoke_key(self, request: Request) -> Response:
        return JSONResponse((await self._admin.revoke_key(request.path_params["key_id"])).to_json())

    async def create_model_group(self, request: Request) -> Response:
        group = await self._admin.create_model_group(await self._body(request))
        return JSONResponse(group.to_json(), status_code=201)

    async def list_model_groups(self, request: Request) -> Response:
        return JSONResponse([g.to_json() for g in await self._admin.list_model_groups()])

    async def get_model_group(self, request: Request) -> Response:
        return JSONResponse((await self._admin.get_model_group(request.path_params["name"])).to_json())

    async def put_model_group(self, request: Request) -> Response:
        group = await self._admin.put_model_group(request.path_params["name"], await self._body(request))
        # The write stamps both times alike only when it inserted the row: 201, as HTTP's PUT.
        return JSONResponse(group.to_json(), status_code=201 if group.created_at == group.updated_at else 200)

    async def delete_model_group(self, request: Request) -> Response:
        await self._admin.delete_model_group(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"]})


def _by_method(handlers: dict[str, Handler]) -> Handler:
    """The handler of a path that runs the handler of the request's method (GET's for HEAD)."""
    if len(handlers) == 1:
        return next(iter(handlers.values()))

    async def by_method(request: Request) -> Response:
        method = request.method
        return await handlers["GET" if method == "HEAD" else method](request)

    by_method.__name__ = "_or_".join(handler.__name__ for handler in handlers.values())
    return by_method
