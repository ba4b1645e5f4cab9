"""Calling the admin API of a test server."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from server.roles import Role
from server.tokens import NODE_WIDE

from .conftest import CANARY_KEY, CANARY_TOKEN, Server


def admin_token(server: Server, **kwargs: Any) -> str:
    """A node-wide admin token (``sid="*"``): the canary (conftest) when the
    server knows its key, so it travels through the suite and its logs."""
    if not kwargs and CANARY_KEY in server.config.auth.signing_keys:
        return CANARY_TOKEN
    kwargs.setdefault("name", "Ada Admin")
    return server.tokens.issue(NODE_WIDE, Role.ADMIN, **kwargs)


async def api(http: aiohttp.ClientSession, server: Server, method: str, path: str,
              token: str | None = None, body: Any = None, *, expect: int | None = None,
              ) -> tuple[int, Any]:
    """(status, JSON body or text); asserts ``expect`` if given."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    async with http.request(method, f"{server.base_url}{path}", **kwargs) as response:
        text = await response.text()
        data: Any = text
        if response.content_type == "application/json" and text:
            data = json.loads(text)
        if expect is not None:
            assert response.status == expect, (method, path, response.status, data)
        return response.status, data


async def schedule(http: aiohttp.ClientSession, server: Server, token: str,
                   session_id: str = "or1-sched", **fields: Any) -> dict[str, Any]:
    body = {"id": session_id, "theatre": "or1", "title": "Laparoscopic cholecystectomy",
            **fields}
    _, data = await api(http, server, "POST", "/api/admin/sessions", token, body, expect=201)
    return dict(data["session"])
