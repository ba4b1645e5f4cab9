"""Who may call what, generated from the OpenAPI document the server serves.

The document names every route of the router and nothing else; every
operation that takes a token refuses no token, an expired, a tampered and a
revoked one with 401, and a token of another Session or of a Role it does not
allow with 403, as its ``x-scrubin-auth`` says; and each of those statuses is
one the operation documents.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiortc.mediastreams import VideoStreamTrack

from server.http.admin import openapi_document
from server.http.common import STORE
from server.roles import Role
from server.tokens import NODE_WIDE

from .conftest import Server, make_config, start_server, wait_for, whep_subscribe, whip_publish

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: Path parameters of the matrix's requests.
PARAMS = {"session": "or1-live", "theatre": "or1", "slot": "room", "feed": "room.video",
          "resource": "nope", "invite": "nope", "recording": "nope", "part": "nope",
          "token": "nope", "export": "nope", "file": "nope",
          "certificate": "nope"}
OTHER_SESSION = "or2-other"
#: x-scrubin-auth scopes: who may call an operation (docs/openapi.yaml, info).
#: "resource": a bearer token, the Session follows from the resource (e.g. a
#: recording); "signed": a signed URL, no bearer token.
BEARER_SCOPES = ("session", "node", "invite", "resource")
SCOPES = ("none", "metrics", "signed", *BEARER_SCOPES)


@pytest.fixture
async def matrix_server() -> AsyncIterator[Server]:
    # Hundreds of refusals from one address: raise the failed-auth limit.
    srv, runner = await start_server(make_config(limits={"auth_failures_per_minute": 100_000}))
    try:
        yield srv
    finally:
        await runner.cleanup()


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    document = openapi_document()
    return [(method.upper(), path, op) for path, item in document["paths"].items()
            for method, op in item.items() if method in METHODS]


def router_routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or isinstance(resource, web.StaticResource):
            continue
        if route.method in ("HEAD", "*") or resource.canonical == "/ws":
            continue
        found.add((route.method, resource.canonical))
    return found


async def test_the_document_names_every_route_and_only_those(server: Server,
                                                             http: aiohttp.ClientSession):
    documented = {(method, path) for method, path, _ in operations()}
    served = router_routes(server.app)
    assert not served - documented, (
        f"routes missing from docs/openapi.yaml (add them, with x-scrubin-auth): "
        f"{sorted(served - documented)}")
    assert not documented - served, f"documented but not served: {sorted(documented - served)}"
    async with http.get(f"{server.base_url}/api/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")
    for method, path, op in operations():
        auth = op.get("x-scrubin-auth")
        assert auth and auth["scope"] in SCOPES, (method, path, auth)
        assert op.get("operationId"), (method, path)
        for role in auth.get("roles", []):
            Role(role)
        if auth["scope"] in BEARER_SCOPES:
            assert op.get("security") == [{"bearer": []}], (method, path)
            assert {"401", "403", "429", "503"} <= set(op["responses"]), (method, path)


@dataclass
class Case:
    name: str
    status: int
    code: str


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload[:-3]}{'AAA' if payload[-3:] != 'AAA' else 'BBB'}.{signature}"


async def test_every_route_refuses_missing_bad_and_misplaced_tokens(
        matrix_server: Server, http: aiohttp.ClientSession):
    server = matrix_server
    tokens = server.tokens
    store = server.app[STORE]
    checked = 0
    for method, path, op in operations():
        auth = op["x-scrubin-auth"]
        scope = auth["scope"]
        if scope not in BEARER_SCOPES:
            continue
        allowed = [Role(r) for r in auth.get("roles", [r.value for r in Role])]
        # A token the route accepts, issued for the right place.
        good_role = allowed[0] if scope != "node" else Role.ADMIN
        good_sid = NODE_WIDE if scope == "node" else "or1-live"

        def token(role: Role = good_role, sid: str = good_sid, **kwargs: Any) -> str:
            return tokens.issue(sid, role, **kwargs)

        revoked = token(token_id=f"revoked-{checked}")
        await store.invites.revoke_invite(f"revoked-{checked}", expires_at=time.time() + 600)
        cases: list[tuple[Case, str | None]] = [
            (Case("no token", 401, "token_missing"), None),
            (Case("expired", 401, "token_expired"),
             token(now=time.time() - 7200, ttl_s=60)),
            (Case("tampered", 401, "token_invalid"), tampered(token())),
            (Case("revoked", 401, "token_revoked"), revoked),
        ]
        if scope == "session":
            cases.append((Case("wrong session", 403, "wrong_session"),
                          token(sid=OTHER_SESSION)))
        elif scope == "node":
            cases.append((Case("session-scoped admin", 403, "wrong_session"),
                          token(sid="or1-live")))
        elif scope == "invite":
            cases.append((Case("node-wide admin", 403, "wrong_session"),
                          token(Role.ADMIN, NODE_WIDE)))
        if "roles" in auth:
            wrong = next(r for r in (Role.TRAINEE, Role.REVIEWER, Role.RECORDER, Role.EXPERT)
                         if r not in allowed)
            cases.append((Case(f"wrong role ({wrong.value})", 403, "wrong_role"),
                          token(wrong, "or1-live")))

        url = server.base_url + path.format(**PARAMS)
        body = op.get("requestBody", {}).get("content", {})
        for case, bearer in cases:
            headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
            kwargs: dict[str, Any] = {"headers": headers}
            if "application/sdp" in body:
                headers["Content-Type"] = "application/sdp"
                kwargs["data"] = "v=0\r\n"
            elif "application/json" in body:
                kwargs["json"] = {}
            async with http.request(method, url, **kwargs) as response:
                error = await response.json()
                where = f"{method} {path}: {case.name}"
                assert response.status == case.status, (where, error)
                assert error["code"] == case.code, (where, error)
                assert error["status"] == case.status and error["fault"] == "user", where
                assert str(case.status) in op["responses"], f"{where}: status not documented"
            checked += 1
    assert checked >= 150
    # Nothing was created or changed by any refused request.
    assert list(server.registry.sessions) == ["or1-live"]
    assert [t.id for t in await store.theatres.list_theatres()] == ["or1"]


async def test_publications_and_subscriptions_belong_to_their_owner(
        server: Server, http: aiohttp.ClientSession):
    publisher, whip_url = await whip_publish(http, server, "room", [VideoStreamTrack()])
    viewer = None
    try:
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        viewer, whep_url, _ = await whep_subscribe(
            http, server, "room.video", "video",
            token=server.token(Role.TRAINEE, participant_id="owner"))
        # Anyone but the owner or a moderator (expert, admin) is refused.
        intruders = [server.token(Role.TRAINEE, participant_id="t-x"),
                     server.token(Role.RECORDER)]
        for url in (whip_url, whep_url):
            for token in intruders:
                async with http.delete(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 403, (url, await r.text())
                    assert (await r.json())["code"] == "not_owner"
        # Moderators may; the owner may.
        async with http.delete(whep_url, headers={
                "Authorization": f"Bearer {server.token(Role.TRAINEE, participant_id='owner')}"}
        ) as r:
            assert r.status == 200
        async with http.delete(whip_url, headers={
                "Authorization": f"Bearer {server.token(Role.ADMIN)}"}) as r:
            assert r.status == 200
    finally:
        await publisher.close()
        if viewer is not None:
            await viewer.close()
