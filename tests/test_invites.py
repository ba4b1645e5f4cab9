"""Invites and tokens: creating, redeeming per device, max uses, revoking one or
all; display names as data; failed-auth and websocket message limits."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import jwt
import pytest

from server.errors import TooManyRequests
from server.http.common import AUDIT, AUTH_GUARD, AuthGuard, MessageRate
from server.roles import Role
from server.store import open_store
from server.tokens import NODE_WIDE, TokenAuthority

from .admin_helpers import admin_token, api
from .conftest import Server, make_config, start_server
from .test_ws_protocol import closed_with, connect, receive, receive_until

WS = aiohttp.ClientWebSocketResponse
HOSTILE = '<img src=x onerror="alert(1)">&amp;'
KEY = "k1:" + "q" * 40


async def hello(http: aiohttp.ClientSession, server: Server, token: str,
                sockets: list[WS]) -> WS:
    ws = await connect(http, server, sockets)
    await ws.send_json({"type": "hello", "token": token, "id": "h"})
    return ws


async def invite(http: aiohttp.ClientSession, server: Server, **fields: Any) -> dict[str, Any]:
    fields.setdefault("role", "trainee")
    _, body = await api(http, server, "POST", "/api/admin/sessions/or1-live/invites",
                        admin_token(server), fields, expect=201)
    return dict(body)


async def redeem(http: aiohttp.ClientSession, server: Server, token: str, device: str,
                 name: str = "", *, expect: int = 200) -> dict[str, Any]:
    _, body = await api(http, server, "POST", "/api/invites/redeem", token,
                        {"device": device, "name": name}, expect=expect)
    return dict(body)


# -- tokens -------------------------------------------------------------------------------

def test_invite_claims_round_trip_with_fractional_issue_time():
    authority = TokenAuthority([KEY])
    before = time.time()
    token = authority.issue("or1-live", Role.TRAINEE, token_id="inv-1", max_uses=3,
                            expires_at=before + 600, kind="invite")
    grant = authority.verify(token)
    assert (grant.token_id, grant.max_uses, grant.kind) == ("inv-1", 3, "invite")
    assert grant.lineage == ("inv-1",) and grant.person_id == "inv-1"
    assert before <= grant.issued_at <= time.time() and grant.issued_at != int(grant.issued_at)
    assert grant.expires_at == int(before + 600)
    assert not grant.node_wide and grant.covers("or1-live") and not grant.covers("or2")

    admin = authority.verify(authority.issue(NODE_WIDE, Role.ADMIN))
    assert admin.node_wide and admin.covers("or1-live") and admin.covers("anything")
    assert admin.kind == "root" and admin.parents == () and admin.person_id == admin.token_id
    with pytest.raises(ValueError):
        authority.issue(NODE_WIDE, Role.EXPERT)
    with pytest.raises(ValueError):
        authority.issue("or1-live", Role.TRAINEE, max_uses=0, kind="invite")
    with pytest.raises(ValueError):  # longer than any token lives
        authority.issue("or1-live", Role.TRAINEE, ttl_s=31 * 86400)

    secret = KEY.split(":", 1)[1]

    def forged(**claims: Any) -> str:
        base = {"iss": "scrubin", "sid": "or1-live", "role": "trainee", "sub": "p",
                "iat": time.time(), "exp": time.time() + 60, "jti": "j", **claims}
        return jwt.encode({k: v for k, v in base.items() if v is not None}, secret,
                          algorithm="HS256", headers={"kid": "k1"})

    refusals = (
        {"sid": NODE_WIDE, "role": "expert"}, {"max_uses": 0}, {"max_uses": "3"},
        {"max_uses": True},
        # max_uses on anything but an invite; an unknown kind; a device or
        # derived token without parents, or a root with some.
        {"max_uses": 3}, {"knd": "superuser"}, {"knd": "device"}, {"knd": "derived"},
        {"par": ["x"]}, {"knd": "derived", "par": "x"}, {"knd": "derived", "par": [7]},
        {"knd": "derived", "par": ["a", "b", "c", "d", "e"]}, {"per": "x" * 65},
        {"jti": 7}, {"jti": ""},
        # No iat (the lifetime bound and per-Session revocation need it), or a
        # life longer than any token has.
        {"iat": None}, {"iat": "yesterday"}, {"exp": time.time() + 31 * 86400},
    )
    for bad in refusals:
        with pytest.raises(Exception) as refused:
            authority.verify(forged(**bad))
        assert getattr(refused.value, "code", "") == "token_invalid", bad
    device = authority.verify(forged(knd="device", par=["inv-1"], per="inv-1"))
    assert device.lineage == ("j", "inv-1") and device.person_id == "inv-1"


# -- redeeming ----------------------------------------------------------------------------

async def test_invite_is_redeemed_once_per_device_up_to_max_uses(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]):
    created = await invite(http, server, max_uses=2, ttl_s=3600)
    assert created["link"] == f"{server.config.base_url}/join.html#token={created['token']}"
    assert created["page"] == f"{server.config.base_url}/watch.html#token={created['token']}"
    assert created["invite"]["uses"] == 0 and created["invite"]["name"] == ""
    token = created["token"]

    first = await redeem(http, server, token, "device-a" * 3, HOSTILE)
    # Names are data: returned exactly, for pages to render as text.
    assert first["participant"]["name"] == HOSTILE
    assert first["participant"]["role"] == "trainee" and first["session"] == "or1-live"
    assert first["page"] == f"/watch.html#token={first['token']}"
    assert first["expires_at"] == created["invite"]["expires_at"]
    again = await redeem(http, server, token, "device-a" * 3, "Someone Else")
    assert again["participant"]["id"] == first["participant"]["id"]
    second = await redeem(http, server, token, "device-b" * 3, "Bea")
    assert second["participant"]["id"] != first["participant"]["id"]
    _, error = await api(http, server, "POST", "/api/invites/redeem", token,
                         {"device": "device-c" * 3, "name": "Cy"}, expect=403)
    assert error["code"] == "invite_used_up"
    _, listed = await api(http, server, "GET", "/api/admin/sessions/or1-live/invites",
                          admin_token(server), expect=200)
    assert [i["uses"] for i in listed["invites"]] == [2]

    # The personal token joins as its own Participant, name as data.
    ws = await hello(http, server, first["token"], sockets)
    welcome = await receive(ws)
    assert welcome["participant"] == first["participant"]
    expert = await hello(http, server, server.token(Role.EXPERT, name="Dr Grey"), sockets)
    roster = (await receive(expert))["participants"]
    assert {"id": first["participant"]["id"], "role": "trainee", "name": HOSTILE} in roster

    # Bad redemptions are the caller's fault.
    for body in ({}, {"device": "short"}, {"device": "x" * 200}, {"device": 7},
                 {"device": "device-d" * 3, "extra": 1}, {"device": "\u00e9" * 20}):
        status, error = await api(http, server, "POST", "/api/invites/redeem", token, body)
        assert status == 400, (body, error)
    await api(http, server, "POST", "/api/invites/redeem", admin_token(server),
              {"device": "device-e" * 3}, expect=403)


async def test_a_named_invite_keeps_its_name(server: Server, http: aiohttp.ClientSession):
    created = await invite(http, server, name="  Dr\u0000 Karev \n", role="expert")
    assert created["invite"]["name"] == "Dr Karev"
    assert created["page"].startswith(f"{server.config.base_url}/broadcast.html#token=")
    redeemed = await redeem(http, server, created["token"], "device-a" * 3, "Other Name")
    assert redeemed["participant"]["name"] == "Dr Karev"
    assert redeemed["participant"]["role"] == "expert"
    reviewer = await invite(http, server, role="reviewer")
    assert reviewer["page"].startswith(f"{server.config.base_url}/library.html#token=")
    redeemed = await redeem(http, server, reviewer["token"], "device-a" * 3)
    assert redeemed["page"].startswith("/library.html#token=")  # relative: same origin


async def test_a_single_use_invite_used_directly_is_one_participant(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]):
    created = await invite(http, server, max_uses=1)
    for _ in range(2):  # a reload is the same Participant, not a second use
        ws = await hello(http, server, created["token"], sockets)
        assert (await receive(ws))["type"] == "welcome"
    _, error = await api(http, server, "POST", "/api/invites/redeem", created["token"],
                         {"device": "device-z" * 3}, expect=403)
    assert error["code"] == "invite_used_up"


# -- revoking -----------------------------------------------------------------------------

async def test_revoking_an_invite_revokes_its_tokens_and_closes_their_sockets(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]):
    admin = admin_token(server)
    created = await invite(http, server)
    other = await invite(http, server)
    personal = (await redeem(http, server, created["token"], "device-a" * 3, "Ann"))["token"]
    watching = await hello(http, server, personal, sockets)
    assert (await receive(watching))["type"] == "welcome"
    bystander = await hello(http, server, other["token"], sockets)
    assert (await receive(bystander))["type"] == "welcome"

    invite_id = created["invite"]["id"]
    _, body = await api(http, server, "DELETE",
                        f"/api/admin/sessions/or1-live/invites/{invite_id}", admin, expect=200)
    assert body["invite"]["revoked"] and body["invite"]["token"] is None
    code, messages = await closed_with(watching)
    assert messages[-1]["error"]["code"] == "token_revoked"
    assert code in (4401, 1006)
    for token in (created["token"], personal):
        _, error = await api(http, server, "GET", "/api/sessions/or1-live", token, expect=401)
        assert error["code"] == "token_revoked"
        ws = await hello(http, server, token, sockets)
        code, messages = await closed_with(ws)
        assert code == 4401 and messages[0]["error"]["code"] == "token_revoked"
    await api(http, server, "POST", "/api/invites/redeem", created["token"],
              {"device": "device-b" * 3}, expect=401)
    # Others are untouched.
    await api(http, server, "GET", "/api/sessions/or1-live", other["token"], expect=200)
    await bystander.send_json({"type": "ping", "id": "p"})
    assert (await receive_until(bystander, lambda m: m.get("id") == "p"))["type"] == "pong"
    # Revoking twice, or an unknown invite.
    await api(http, server, "DELETE", f"/api/admin/sessions/or1-live/invites/{invite_id}",
              admin, expect=200)
    await api(http, server, "DELETE", "/api/admin/sessions/or1-live/invites/nope", admin,
              expect=404)
    events = [e["event"] for e in server.app[AUDIT].read(session="or1-live")]
    assert events.count("invite_revoked") == 1 and events.count("invite_created") == 2
    assert "invite_redeemed" in events


async def test_revoking_every_token_of_a_session(server: Server, http: aiohttp.ClientSession,
                                                 sockets: list[WS]):
    admin = admin_token(server)
    created = await invite(http, server)
    expert = server.token(Role.EXPERT)
    live = await hello(http, server, expert, sockets)
    assert (await receive(live))["type"] == "welcome"
    _, body = await api(http, server, "DELETE", "/api/admin/sessions/or1-live/invites", admin,
                        expect=200)
    assert body["revoked_before"] <= time.time()
    _, messages = await closed_with(live)
    assert messages[-1]["error"]["code"] == "token_revoked"
    for token in (created["token"], expert):
        _, error = await api(http, server, "GET", "/api/sessions/or1-live", token, expect=401)
        assert error["code"] == "token_revoked"
    # Tokens issued afterwards work, the node-wide admin token too.
    await api(http, server, "GET", "/api/sessions/or1-live", server.token(Role.EXPERT),
              expect=200)
    fresh = await invite(http, server)
    await api(http, server, "GET", "/api/sessions/or1-live", fresh["token"], expect=200)
    _, listed = await api(http, server, "GET", "/api/admin/sessions/or1-live/invites", admin,
                          expect=200)
    assert [(i["id"], i["revoked"]) for i in listed["invites"]] == [
        (created["invite"]["id"], True), (fresh["invite"]["id"], False)]


async def test_expired_and_tampered_invites_are_refused(server: Server,
                                                        http: aiohttp.ClientSession):
    expired = server.tokens.issue("or1-live", Role.TRAINEE, now=time.time() - 7200, ttl_s=60,
                                  max_uses=1)
    _, error = await api(http, server, "POST", "/api/invites/redeem", expired,
                         {"device": "device-a" * 3}, expect=401)
    assert error["code"] == "token_expired"
    token = (await invite(http, server, max_uses=1))["token"]
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload[:-2]}xx.{signature}"
    _, error = await api(http, server, "POST", "/api/invites/redeem", tampered,
                         {"device": "device-a" * 3}, expect=401)
    assert error["code"] == "token_invalid"


# -- limits --------------------------------------------------------------------------------

async def test_failed_authentications_are_limited_per_address(http: aiohttp.ClientSession,
                                                              sockets: list[WS]):
    server, runner = await start_server(make_config(limits={"auth_failures_per_minute": 5}))
    try:
        url = f"{server.base_url}/api/sessions/or1-live"
        for _ in range(5):
            async with http.get(url, headers={"Authorization": "Bearer nope"}) as response:
                assert response.status == 401
        async with http.get(url, headers={"Authorization": "Bearer nope"}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "60"
            assert (await response.json())["code"] == "rate_limited"
        # For a minute every bad token from the address is a 429, without a
        # store lookup; a valid one still gets in (others behind the same NAT).
        expired = server.token(Role.TRAINEE, now=time.time() - 7200, ttl_s=60)
        for bad in ("nope", expired):
            async with http.get(url, headers={"Authorization": f"Bearer {bad}"}) as response:
                assert response.status == 429
        ws = await hello(http, server, expired, sockets)
        code, messages = await closed_with(ws)
        assert code == 1013 and messages[0]["error"]["code"] == "rate_limited"
        valid = server.token(Role.TRAINEE)
        async with http.get(url, headers={"Authorization": f"Bearer {valid}"}) as response:
            assert response.status == 200
        async with http.get(f"{server.base_url}/healthz") as response:
            assert response.status == 200
        # The minute passes.
        guard = server.app[AUTH_GUARD]
        assert guard.blocked("127.0.0.1")
        guard._clock = lambda: time.monotonic() + 61  # type: ignore[method-assign]
        assert not guard.blocked("127.0.0.1")
    finally:
        await runner.cleanup()


async def test_auth_guard_counts_failures_across_nodes_and_forgets_after_a_minute():
    now = [1000.0]
    store_a = open_store(None, node_id="a")
    try:
        guard = AuthGuard(store_a.rates, 3, clock=lambda: now[0])
        for _ in range(3):
            guard.check("10.0.0.1")
            assert not await guard.failed("10.0.0.1")
        assert await guard.failed("10.0.0.1")
        with pytest.raises(TooManyRequests):
            guard.check("10.0.0.1")
        guard.check("10.0.0.2")  # another address is not affected
        now[0] += 61
        guard.check("10.0.0.1")
    finally:
        await store_a.close()


def test_message_rate_allows_bursts_refuses_floods_and_forgives_backing_off():
    now = [0.0]
    rate = MessageRate(10.0, 20, clock=lambda: now[0])
    assert [rate.take() for _ in range(20)] == ["ok"] * 20
    assert rate.take() == "refuse"
    now[0] += 1.0  # backing off refills the bucket
    assert [rate.take() for _ in range(10)] == ["ok"] * 10
    verdicts = []
    for _ in range(200):  # a flood at 100/s
        now[0] += 0.01
        verdicts.append(rate.take())
    assert "close" in verdicts
    assert verdicts.count("ok") < 40


async def test_websocket_messages_over_the_rate_get_429_then_a_close(
        http: aiohttp.ClientSession, sockets: list[WS]):
    server, runner = await start_server(make_config(
        limits={"ws_messages_per_second": 2, "ws_message_burst": 10}))
    try:
        ws = await hello(http, server, server.token(Role.TRAINEE, participant_id="flood"),
                         sockets)
        assert (await receive(ws))["type"] == "welcome"
        calm = await hello(http, server, server.token(Role.TRAINEE, participant_id="calm"),
                           sockets)
        assert (await receive(calm))["type"] == "welcome"
        for i in range(10):
            await ws.send_json({"type": "ping", "id": i})
        for i in range(10):
            assert (await receive_until(ws, lambda m, i=i: m.get("id") == i))["type"] == "pong"
        await ws.send_json({"type": "ping", "id": "over"})
        refused = await receive_until(ws, lambda m: m.get("id") == "over")
        assert refused["type"] == "error" and refused["error"]["status"] == 429
        assert refused["error"]["code"] == "rate_limited"
        for i in range(40):
            await ws.send_str(json.dumps({"type": "ping", "id": f"f{i}"}))
        code, _ = await closed_with(ws)
        assert code == 1008
        await calm.send_json({"type": "ping", "id": "still"})
        assert (await receive_until(calm, lambda m: m.get("id") == "still"))["type"] == "pong"
    finally:
        await runner.cleanup()


async def test_revocation_stops_whip_and_whep_media_too(server: Server,
                                                        http: aiohttp.ClientSession):
    import asyncio

    from aiortc.mediastreams import VideoStreamTrack

    from .conftest import wait_for, whep_subscribe, whip_publish

    expert = server.token(Role.EXPERT)
    publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()], token=expert)
    session = server.session()
    viewer = None
    try:
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        viewer_invite = await invite(http, server)
        viewer, _, track = await whep_subscribe(http, server, "room.video", "video",
                                                token=viewer_invite["token"])
        await asyncio.wait_for(track, 10)
        sub = next(iter(session.subscriptions.values()))
        await wait_for(lambda: "" if sub.frames_forwarded > 0 else "no media yet")
        # Revoking the viewer's invite ends its WHEP media; the expert keeps publishing.
        await api(http, server, "DELETE",
                  f"/api/admin/sessions/or1-live/invites/{viewer_invite['invite']['id']}",
                  admin_token(server), expect=200)
        await wait_for(lambda: "" if not session.subscriptions else "viewer still served")
        assert "room.video" in session.feeds and session.feeds["room.video"].state == "live"
        # Revoking every token of the Session ends the expert's WHIP publication too.
        await api(http, server, "DELETE", "/api/admin/sessions/or1-live/invites",
                  admin_token(server), expect=200)
        await wait_for(lambda: "" if not session.ingests and not session.feeds
                       else f"still publishing: {list(session.feeds)}")
    finally:
        await publisher.close()
        if viewer is not None:
            await viewer.close()
