"""The admin API against a real server: Theatres, Sessions through their states,
the store behind the registry, the CLI, and (with Redis) two Nodes."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiortc.mediastreams import VideoStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server import cli
from server.http.common import STORE
from server.roles import Role

from .admin_helpers import admin_token, api, schedule
from .conftest import Server, make_config, start_server, wait_for, whip_publish
from .test_ws_protocol import closed_with, connect, receive, receive_until

WS = aiohttp.ClientWebSocketResponse


def _audit(server: Server) -> Any:
    from server.http.common import AUDIT

    return server.app[AUDIT]


async def hello(http: aiohttp.ClientSession, server: Server, token: str,
                sockets: list[WS]) -> WS:
    ws = await connect(http, server, sockets)
    await ws.send_json({"type": "hello", "token": token, "id": "h"})
    return ws


# -- theatres ---------------------------------------------------------------------------

async def test_theatres_create_list_update_delete(server: Server, http: aiohttp.ClientSession):
    admin = admin_token(server)
    _, body = await api(http, server, "GET", "/api/admin/theatres", admin, expect=200)
    assert [t["id"] for t in body["theatres"]] == ["or1"]

    new = {"id": "or2", "name": "Theatre 2", "slots": ["room", "overhead"]}
    _, body = await api(http, server, "POST", "/api/admin/theatres", admin, new, expect=201)
    assert body["theatre"] == new
    await api(http, server, "POST", "/api/admin/theatres", admin, new, expect=409)
    for bad in ({"id": "OR 2", "slots": ["room"]}, {"id": "or3", "slots": []},
                {"id": "or3", "slots": ["room", "room"]}, {"id": "or3", "slots": "room"},
                {"id": "or3", "slots": ["Room!"]}, {"id": "or3", "slots": ["room"], "x": 1},
                {"slots": ["room"]}, [1, 2], "text"):
        status, error = await api(http, server, "POST", "/api/admin/theatres", admin, bad)
        assert status == 400 and error["fault"] == "protocol", (bad, error)

    _, body = await api(http, server, "PUT", "/api/admin/theatres/or2", admin,
                        {"name": "Theatre Two", "slots": ["room", "endoscope"]}, expect=200)
    assert body["theatre"] == {"id": "or2", "name": "Theatre Two",
                               "slots": ["room", "endoscope"]}
    _, body = await api(http, server, "GET", "/api/admin/theatres/or2", admin, expect=200)
    assert body["theatre"]["name"] == "Theatre Two"
    await api(http, server, "GET", "/api/admin/theatres/nowhere", admin, expect=404)
    await api(http, server, "PUT", "/api/admin/theatres/nowhere", admin, {"name": "x"},
              expect=404)

    # A Theatre with a live Session (or1-live) stays.
    _, error = await api(http, server, "DELETE", "/api/admin/theatres/or1", admin, expect=409)
    assert error["code"] == "theatre_in_use"
    await api(http, server, "DELETE", "/api/admin/theatres/or2", admin, expect=204)
    await api(http, server, "GET", "/api/admin/theatres/or2", admin, expect=404)
    events = [e["event"] for e in _audit(server).read(limit=10000)]
    assert {"theatre_created", "theatre_updated", "theatre_deleted"} <= set(events)
    created = next(e for e in _audit(server).read() if e["event"] == "theatre_created")
    assert created["by_name"] == "Ada Admin" and created["address"] == "127.0.0.1"


# -- sessions ---------------------------------------------------------------------------

async def test_scheduled_session_goes_live_when_its_expert_joins(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]):
    admin = admin_token(server)
    created = await schedule(http, server, admin, expert="Dr Grey", procedure="Cholecystectomy",
                             starts_at=time.time() + 3600)
    assert created["state"] == "scheduled" and created["node"] is None
    assert created["expert"] == "Dr Grey"
    _, body = await api(http, server, "GET", "/api/admin/sessions?state=scheduled", admin,
                        expect=200)
    assert [s["id"] for s in body["sessions"]] == ["or1-sched"]
    assert "or1-sched" not in server.registry.sessions

    # A trainee who comes early is asked to come back (1013: try again later).
    trainee = server.token(Role.TRAINEE, "or1-sched", name="Early Bird")
    ws = await hello(http, server, trainee, sockets)
    code, messages = await closed_with(ws)
    assert code == 1013
    assert messages[0]["error"]["code"] == "session_not_started"
    assert messages[0]["error"]["status"] == 409
    # The page can still read what is coming.
    _, body = await api(http, server, "GET", "/api/sessions/or1-sched", trainee, expect=200)
    assert body["session"]["state"] == "scheduled" and body["session"]["feeds"] == []
    assert body["session"]["theatre"]["slots"] == ["room", "endoscope", "narration"]

    expert = await hello(http, server, server.token(Role.EXPERT, "or1-sched"), sockets)
    welcome = await receive(expert)
    assert welcome["type"] == "welcome" and welcome["session"]["state"] == "live"
    assert "or1-sched" in server.registry.sessions
    record = await server.app[STORE].sessions.get_session("or1-sched")
    assert record is not None and record.state == "live"
    assert record.node_id == server.registry.node_id
    viewer = await hello(http, server, trainee, sockets)
    assert (await receive(viewer))["type"] == "welcome"

    # Admin ends it: everyone is told, the store says ended, publishing is refused.
    _, body = await api(http, server, "POST", "/api/admin/sessions/or1-sched/end", admin,
                        expect=200)
    assert body["session"]["state"] == "ended" and body["session"]["ended_at"]
    for ws in (expert, viewer):
        assert (await receive_until(ws, lambda m: m["type"] == "session_ended"))["reason"]
    late = server.token(Role.EXPERT, "or1-sched")
    async with http.post(f"{server.base_url}/whip/or1-sched/room", data="v=0\r\n",
                         headers={"Authorization": f"Bearer {late}",
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 410
        assert (await response.json())["code"] == "session_ended"
    again = await hello(http, server, server.token(Role.EXPERT, "or1-sched"), sockets)
    code, messages = await closed_with(again)
    assert code == 4403 and messages[0]["error"]["code"] == "session_ended"
    # Ending again is not an error; changing an ended Session is.
    await api(http, server, "POST", "/api/admin/sessions/or1-sched/end", admin, expect=200)
    await api(http, server, "PATCH", "/api/admin/sessions/or1-sched", admin, {"title": "x"},
              expect=410)
    await api(http, server, "POST", "/api/admin/sessions/or1-sched/start", admin, expect=410)
    events = [e["event"] for e in _audit(server).read(session="or1-sched")]
    assert events.index("session_created") < events.index("session_live") \
        < events.index("session_ended")


async def test_admin_start_and_whip_publish_bring_scheduled_sessions_live(
        server: Server, http: aiohttp.ClientSession):
    admin = admin_token(server)
    await schedule(http, server, admin, "or1-a")
    _, body = await api(http, server, "POST", "/api/admin/sessions/or1-a/start", admin,
                        expect=200)
    assert body["session"]["state"] == "live"
    assert body["session"]["node"] == server.registry.node_id
    _, again = await api(http, server, "POST", "/api/admin/sessions/or1-a/start", admin,
                         expect=200)
    assert again["session"]["started_at"] == body["session"]["started_at"]

    await schedule(http, server, admin, "or1-b")
    trainee_whip = server.token(Role.TRAINEE, "or1-b")
    async with http.post(f"{server.base_url}/whip/or1-b/room", data="v=0\r\n",
                         headers={"Authorization": f"Bearer {trainee_whip}",
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 409
        assert (await response.json())["code"] == "session_not_started"
    pc, _ = await whip_publish(http, server, "room", [VideoStreamTrack()], session="or1-b")
    try:
        session = server.registry.sessions["or1-b"]
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        _, body = await api(http, server, "GET", "/api/admin/sessions/or1-b", admin, expect=200)
        assert body["session"]["state"] == "live"
        assert [f["id"] for f in body["session"]["feeds"]] == ["room.video"]
    finally:
        await pc.close()
    # Cancelling a scheduled Session.
    await schedule(http, server, admin, "or1-c")
    _, body = await api(http, server, "POST", "/api/admin/sessions/or1-c/end", admin,
                        expect=200)
    assert body["session"]["state"] == "ended" and body["session"]["started_at"] is None


async def test_session_create_and_update_validate_their_input(
        server: Server, http: aiohttp.ClientSession):
    admin = admin_token(server)
    generated = (await api(http, server, "POST", "/api/admin/sessions", admin,
                           {"theatre": "or1", "title": "  Whipple   procedure "},
                           expect=201))[1]["session"]
    assert generated["id"].startswith("s-") and generated["title"] == "Whipple procedure"
    refused = [
        ({"theatre": "or1"}, 400), ({"theatre": "or1", "title": ""}, 400),
        ({"theatre": "or1", "title": "x" * 201}, 400),
        ({"theatre": "or1", "title": "t", "starts_at": "tomorrow"}, 400),
        ({"theatre": "or1", "title": "t", "starts_at": 1e300}, 400),
        ({"theatre": "or1", "title": "t", "id": "Bad Id"}, 400),
        ({"theatre": "or1", "title": "t", "state": "live"}, 400),
        ({"theatre": "or1", "title": 7}, 400), ({"theatre": 7, "title": "t"}, 400),
        ({"theatre": "nowhere", "title": "t"}, 404),
        ({"theatre": "or1", "title": "t", "id": "or1-live"}, 409),
        ({"theatre": "or1", "title": "t", "id": generated["id"]}, 409),
    ]
    for body, status in refused:
        got, error = await api(http, server, "POST", "/api/admin/sessions", admin, body)
        assert got == status, (body, got, error)
        assert set(error) == {"code", "message", "fault", "status"}

    await schedule(http, server, admin, "or1-edit")
    _, body = await api(http, server, "PATCH", "/api/admin/sessions/or1-edit", admin,
                        {"title": "New title", "expert": "Dr <b>Yang</b>",
                         "starts_at": 2_000_000_000}, expect=200)
    assert body["session"]["title"] == "New title"
    # Names are data: stored and returned as they are, never interpreted.
    assert body["session"]["expert"] == "Dr <b>Yang</b>"
    assert body["session"]["starts_at"] == 2_000_000_000
    for bad in ({"title": ""}, {"theatre": "or2"}, {"starts_at": True}, {"expert": ["x"]}):
        await api(http, server, "PATCH", "/api/admin/sessions/or1-edit", admin, bad, expect=400)
    await api(http, server, "GET", "/api/admin/sessions/nope", admin, expect=404)
    await api(http, server, "GET", "/api/admin/sessions/NOPE!", admin, expect=400)
    await api(http, server, "GET", "/api/admin/sessions?state=paused", admin, expect=400)

    # Malformed and oversized bodies are the client's fault, never a 5xx.
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    for raw in (b"{", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"title": "\x00"}'):
        async with http.post(f"{server.base_url}/api/admin/sessions", data=raw,
                             headers=headers) as response:
            assert 400 <= response.status < 500, (raw[:20], response.status)
            assert (await response.json())["code"] in ("bad_json", "bad_request")
    big = json.dumps({"theatre": "or1", "title": "x" * (server.config.limits.max_body_bytes)})
    async with http.post(f"{server.base_url}/api/admin/sessions", data=big,
                         headers=headers) as response:
        assert response.status == 413
        assert (await response.json())["code"] == "too_large"


async def test_node_wide_admin_tokens(server: Server, http: aiohttp.ClientSession,
                                      sockets: list[WS]):
    admin = admin_token(server)
    with pytest.raises(ValueError):
        server.tokens.issue("*", Role.TRAINEE)
    session_admin = server.token(Role.ADMIN, "or1-live")
    _, error = await api(http, server, "GET", "/api/admin/theatres", session_admin, expect=403)
    assert error["code"] == "wrong_session"
    _, error = await api(http, server, "POST", "/api/admin/sessions", session_admin,
                         {"theatre": "or1", "title": "t"}, expect=403)
    # A Session's admin manages that Session (and no other).
    await api(http, server, "GET", "/api/admin/sessions/or1-live", session_admin, expect=200)
    await schedule(http, server, admin, "or1-other")
    await api(http, server, "GET", "/api/admin/sessions/or1-other", session_admin, expect=403)
    # Node-wide admins reach every Session's routes...
    await api(http, server, "GET", "/api/sessions/or1-live/audit", admin, expect=200)
    _, body = await api(http, server, "GET", "/api/sessions/or1-live/links", admin, expect=200)
    assert body["session"] == "or1-live"
    # ...but join none live.
    ws = await hello(http, server, admin, sockets)
    code, messages = await closed_with(ws)
    assert code == 4403 and messages[0]["error"]["code"] == "wrong_session"


async def test_configured_theatres_and_sessions_are_in_the_store(
        http: aiohttp.ClientSession, tmp_path):
    from server.config import load_config

    (tmp_path / "node.toml").write_text(
        '[[theatres]]\nid = "or9"\nname = "Theatre 9"\nslots = ["room"]\n'
        '[[sessions]]\nid = "or9-am"\ntheatre = "or9"\ntitle = "Morning list"\n')
    base = make_config()
    config = load_config(tmp_path / "node.toml", env={},
                         server={"host": "127.0.0.1", "port": base.server.port},
                         audit={"path": base.audit.path},
                         ice={"host_addresses": ["127.0.0.1"]})
    server, runner = await start_server(config)
    try:
        admin = admin_token(server)
        _, body = await api(http, server, "GET", "/api/admin/sessions", admin, expect=200)
        states = {s["id"]: s["state"] for s in body["sessions"]}
        assert states == {"or9-am": "live", "or1-live": "live"}
        _, body = await api(http, server, "GET", "/api/admin/theatres", admin, expect=200)
        assert {t["id"] for t in body["theatres"]} == {"or1", "or9"}
    finally:
        await runner.cleanup()


# -- the CLI ------------------------------------------------------------------------------

async def test_cli_manages_theatres_sessions_and_invites(
        server: Server, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SCRUBIN_ADMIN_TOKEN", admin_token(server))
    monkeypatch.setenv("SCRUBIN_SERVER", server.base_url)

    async def scrubin(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["--log-level", "WARNING", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await scrubin("theatre", "add", "or5", "--slots", "room, endoscope",
                                 "--name", "Theatre 5")
    assert code == 0 and "or5" in out and "room, endoscope" in out
    code, out, _ = await scrubin("theatre", "list")
    assert code == 0 and "or1" in out and "Theatre 5" in out
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    code, out, _ = await scrubin("session", "create", "--theatre", "or5", "--id", "or5-am",
                                 "--title", "Hernia repair", "--expert", "Dr Bailey",
                                 "--starts-at", f"{tomorrow}T08:30")
    assert code == 0 and "or5-am" in out and "scheduled" in out
    assert f"{tomorrow} 08:30" in out and f"ends {tomorrow} 12:30" in out
    code, out, _ = await scrubin("--log-level", "WARNING", "session", "list", "--json")
    assert code == 0
    assert {s["id"] for s in json.loads(out)["sessions"]} == {"or1-live", "or5-am"}
    # An invite that would expire before the Session starts is refused with a warning...
    code, _, err = await scrubin("invite", "create", "--session", "or5-am", "--role", "trainee",
                                 "--max-uses", "3", "--ttl", "3600")
    assert code == 2 and "before the Session starts" in err and "--anyway" in err
    # ...by default it lasts until the scheduled end plus the margin.
    code, out, _ = await scrubin("invite", "create", "--session", "or5-am", "--role", "trainee",
                                 "--max-uses", "3")
    assert code == 0 and "6 h 0 min after the start" in out, out
    code, out, _ = await scrubin("invite", "create", "--session", "or5-am", "--role", "trainee",
                                 "--max-uses", "3", "--ttl", "3600", "--anyway", "--json")
    assert code == 0
    created = json.loads(out)
    assert created["invite"]["expires_before_start"] is True
    assert created["link"].startswith(f"{server.config.base_url}/join.html#token=")
    assert created["invite"]["max_uses"] == 3
    code, out, _ = await scrubin("invite", "list", "--session", "or5-am")
    assert code == 0 and created["invite"]["id"] in out and "seats 0/3" in out
    assert "BEFORE the Session starts" in out
    code, out, _ = await scrubin("invite", "revoke", "--session", "or5-am", "--invite",
                                 created["invite"]["id"])
    assert code == 0 and "revoked" in out
    code, out, _ = await scrubin("invite", "revoke", "--session", "or5-am", "--all")
    assert code == 0 and "revoked" in out
    code, out, _ = await scrubin("session", "start", "or5-am")
    assert code == 0 and "live" in out
    code, out, _ = await scrubin("session", "end", "or5-am")
    assert code == 0 and "ended" in out
    # Refusals are printed, with a non-zero exit.
    code, _, err = await scrubin("session", "create", "--theatre", "nowhere", "--title", "x")
    assert code == 2 and "404" in err
    monkeypatch.setenv("SCRUBIN_ADMIN_TOKEN", server.token(Role.TRAINEE))
    code, _, err = await scrubin("theatre", "list")
    assert code == 2 and "403" in err


async def test_cli_mints_node_wide_admin_tokens(tmp_path, capsys: pytest.CaptureFixture[str]):
    from server.tokens import TokenAuthority

    key = "k1:" + "s" * 40
    (tmp_path / "node.toml").write_text(f'[auth]\nsigning_keys = ["{key}"]\n')
    assert cli.main(["admin-token", "--config", str(tmp_path / "node.toml"),
                     "--name", "Night admin"]) == 0
    grant = TokenAuthority([key]).verify(capsys.readouterr().out.strip())
    assert grant.node_wide and grant.role is Role.ADMIN and grant.name == "Night admin"
    assert cli.main(["token", "--config", str(tmp_path / "node.toml"), "--session", "*",
                     "--role", "admin"]) == 0
    assert TokenAuthority([key]).verify(capsys.readouterr().out.strip()).node_wide
    assert cli.main(["token", "--config", str(tmp_path / "node.toml"), "--session", "*",
                     "--role", "trainee"]) == 2


# -- two Nodes on one Redis --------------------------------------------------------------

admin_redis_proc = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)


@pytest.mark.slow
async def test_two_nodes_share_sessions_and_an_admin_ends_one_live_on_the_other(
        admin_redis_proc: RedisExecutor, http: aiohttp.ClientSession, sockets: list[WS]):
    url = f"redis://{admin_redis_proc.host}:{admin_redis_proc.port}/0"
    keys = ["k1:" + "k" * 40]
    a, runner_a = await start_server(make_config(
        store={"redis_url": url}, server={"node_id": "node-a"}, auth={"signing_keys": keys}))
    b, runner_b = await start_server(make_config(
        store={"redis_url": url}, server={"node_id": "node-b"}, auth={"signing_keys": keys}))
    try:
        admin = admin_token(a)
        await schedule(http, b, admin, "or1-shared")  # scheduled through node B
        expert = await hello(http, a, a.token(Role.EXPERT, "or1-shared"), sockets)
        assert (await receive(expert))["type"] == "welcome"  # live on node A
        _, created = await api(http, b, "POST", "/api/admin/sessions/or1-shared/invites",
                               admin, {"role": "trainee", "name": "Remote"}, expect=201)
        trainee = created["token"]
        viewer = await hello(http, a, trainee, sockets)
        assert (await receive(viewer))["type"] == "welcome"
        _, body = await api(http, b, "GET", "/api/admin/sessions/or1-shared", admin, expect=200)
        assert body["session"]["state"] == "live" and body["session"]["node"] == "node-a"
        # Node B does not hold it: it joins the trainee through node A and
        # tells the page which Node serves its media.
        elsewhere = await hello(http, b, trainee, sockets)
        welcome = await receive(elsewhere)
        assert welcome["type"] == "welcome" and welcome["session"]["id"] == "or1-shared"
        assert welcome["node"] == {"id": "node-b", "url": b.base_url}
        assert welcome["serving"] == {"id": "node-a", "url": a.base_url}

        # Revoking the invite on node B disconnects its trainee on node A.
        await api(http, b, "DELETE",
                  f"/api/admin/sessions/or1-shared/invites/{created['invite']['id']}",
                  admin, expect=200)
        for socket in (viewer, elsewhere):
            code, messages = await closed_with(socket)
            assert messages[-1]["error"]["code"] == "token_revoked"
            # 4401 as sent; aiohttp's client may report 1006 for a close that did
            # not wait for its reply (browsers report the frame's code).
            assert code in (4401, 1006)
        refused = await hello(http, a, trainee, sockets)
        code, messages = await closed_with(refused)
        assert code == 4401 and messages[0]["error"]["code"] == "token_revoked"

        # Ending on node B ends it on node A.
        _, body = await api(http, b, "POST", "/api/admin/sessions/or1-shared/end", admin,
                            expect=200)
        assert body["session"]["state"] == "ended"
        ended = await receive_until(expert, lambda m: m["type"] == "session_ended")
        assert ended["reason"] == "ended by Ada Admin"
        await wait_for(lambda: "" if "or1-shared" not in a.registry.sessions else "still live")
    finally:
        await runner_b.cleanup()
        await runner_a.cleanup()


async def test_a_session_ended_while_the_store_was_away_is_not_resumed(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS],
        monkeypatch: pytest.MonkeyPatch):
    from server.store import StoreUnavailable

    admin = admin_token(server)
    await schedule(http, server, admin, "or1-gap")
    await api(http, server, "POST", "/api/admin/sessions/or1-gap/start", admin, expect=200)
    sessions = server.app[STORE].sessions
    real = sessions.set_session_state

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("redis is away")

    monkeypatch.setattr(sessions, "set_session_state", unavailable)
    await server.registry.sessions["or1-gap"].end("ended by the expert")
    await server.registry.flush()
    record = await sessions.get_session("or1-gap")
    assert record is not None and record.state == "live"  # the store missed it
    monkeypatch.setattr(sessions, "set_session_state", real)

    expert = await hello(http, server, server.token(Role.EXPERT, "or1-gap"), sockets)
    code, messages = await closed_with(expert)
    assert code == 4403 and messages[0]["error"]["code"] == "session_ended"
    await server.registry.flush()
    record = await sessions.get_session("or1-gap")
    assert record is not None and record.state == "ended"
