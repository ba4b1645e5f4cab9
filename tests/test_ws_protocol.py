"""Websocket signalling (docs/protocol.md, "Websocket: GET /ws") against a real server,
with real aiortc peers publishing and watching through it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack

from server.http import ws as ws_module
from server.roles import Role

from .conftest import (
    Server,
    client_pc,
    live_peer_connections,
    make_config,
    offer_sdp,
    start_server,
    wait_for,
    whep_subscribe,
    whip_publish,
)

SESSION = "or1-live"
HOSTILE = "<img src=x onerror=alert(1)>"
WS = aiohttp.ClientWebSocketResponse


# -- helpers ----------------------------------------------------------------

async def connect(http: aiohttp.ClientSession, server: Server, sockets: list[WS]) -> WS:
    ws = await http.ws_connect(f"{server.base_url}/ws", autoping=True)
    sockets.append(ws)
    return ws


async def receive(ws: WS, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    message = json.loads(msg.data)
    assert isinstance(message, dict), message
    return message


async def receive_until(ws: WS, match: Callable[[dict[str, Any]], bool],
                        timeout: float = 10.0) -> dict[str, Any]:
    """The first message for which ``match`` is true; others (feed, roster) are skipped."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching message in {timeout}s; saw {seen}")
        try:
            message = await receive(ws, timeout=left)
        except TimeoutError:
            raise AssertionError(f"no matching message in {timeout}s; saw {seen}") from None
        if match(message):
            return message
        seen.append(message)


def of_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())


async def closed_with(ws: WS, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
    """Read to the end: the close code and the JSON messages sent before it."""
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"socket not closed within {timeout}s; got {messages}")
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            raise AssertionError(f"socket not closed within {timeout}s; got {messages}") from None
        if msg.type == WSMsgType.TEXT:
            messages.append(json.loads(msg.data))
            continue
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
        return ws.close_code, messages


async def join(http: aiohttp.ClientSession, server: Server, sockets: list[WS], role: Role,
               name: str = "", participant_id: str | None = None, token: str | None = None,
               ) -> tuple[WS, dict[str, Any]]:
    ws = await connect(http, server, sockets)
    token = token or server.token(role, name=name, participant_id=participant_id)
    await ws.send_json({"type": "hello", "token": token, "id": "hello-1"})
    welcome = await receive(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


def check_error(message: dict[str, Any], status: int, code: str | None = None,
                request_id: Any = None) -> dict[str, Any]:
    assert message["type"] == "error", message
    error = message["error"]
    assert set(error) >= {"code", "message", "fault", "status"}, error
    assert error["status"] == status, error
    assert error["fault"] == ("protocol" if status in (400, 413) else "user"), error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if request_id is not None:
        assert message.get("id") == request_id, message
    return error


async def video_offer(pc: RTCPeerConnection, direction: str) -> str:
    if direction == "sendonly":
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    else:
        pc.addTransceiver("video", direction="recvonly")
    return await offer_sdp(pc)


# -- joining ----------------------------------------------------------------------

async def test_hello_gets_welcome_with_session_roster_and_ice_servers(server, http, sockets,
                                                                      peers):
    pc, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    peers.append(pc)
    ws, welcome = await join(http, server, sockets, Role.EXPERT, name="Dr Grey",
                             participant_id="exp-1")
    assert welcome["id"] == "hello-1"
    assert welcome["participant"] == {"id": "exp-1", "role": "expert", "name": "Dr Grey"}
    session = welcome["session"]
    assert session["id"] == SESSION and session["state"] == "live"
    assert session["title"] == "Cholecystectomy"
    assert session["theatre"] == {"id": "or1", "name": "Theatre 1",
                                  "slots": ["room", "endoscope", "narration"]}
    (feed,) = session["feeds"]
    assert feed.pop("publisher")["via"] == "whip"
    assert feed == {"id": "room.video", "slot": "room", "kind": "video",
                    "codec": "video/VP8", "state": "live", "viewers": 0, "relays": 0,
                    "layers": ["full"]}
    assert welcome["participants"] == [{"id": "exp-1", "role": "expert", "name": "Dr Grey"}]
    assert welcome["viewers"] == 0
    assert welcome["ice_servers"] == []

    await ws.send_json({"type": "ping", "id": 41})
    assert await receive_until(ws, of_type("pong")) == {"type": "pong", "id": 41}


async def test_roster_names_for_experts_counts_for_trainees(server, http, sockets):
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")

    trainee, welcome = await join(http, server, sockets, Role.TRAINEE, name=HOSTILE,
                                  participant_id="tr-1")
    assert welcome["participants"] == []
    assert welcome["viewers"] == 1
    assert welcome["participant"]["name"] == HOSTILE

    # The expert sees who joined, names verbatim: data, not markup.
    msg = await expert.receive(timeout=5)
    assert msg.type == WSMsgType.TEXT
    assert json.dumps(HOSTILE) in msg.data and "&lt;" not in msg.data
    roster = json.loads(msg.data)
    assert roster["type"] == "roster"
    assert roster["viewers"] == 1
    names = {p["id"]: (p["role"], p["name"]) for p in roster["participants"]}
    assert names["tr-1"] == ("trainee", HOSTILE)
    assert ("expert", "Dr Grey") in names.values()

    other, _ = await join(http, server, sockets, Role.TRAINEE, name="Second",
                          participant_id="tr-2")
    seen_by_trainee = await receive_until(trainee, of_type("roster"))
    assert seen_by_trainee["participants"] == [] and seen_by_trainee["viewers"] == 2
    assert (await receive_until(expert, of_type("roster")))["viewers"] == 2

    await other.close()
    left = await receive_until(expert, of_type("roster"))
    assert left["viewers"] == 1
    assert "tr-2" not in {p["id"] for p in left["participants"]}
    assert (await receive_until(trainee, of_type("roster")))["participants"] == []


HELLO_REFUSALS: list[tuple[str, Callable[[Server], Any], int, str | None]] = [
    ("bad-json", lambda s: "{not json", 4400, None),
    ("not-hello", lambda s: {"type": "ping"}, 4400, None),
    ("array", lambda s: [{"type": "hello"}], 4400, None),
    ("binary", lambda s: b"\x00\x01", 4400, None),
    ("no-token", lambda s: {"type": "hello", "id": "h"}, 4401, "token_missing"),
    ("garbage-token", lambda s: {"type": "hello", "id": "h", "token": "x.y.z"}, 4401,
     "token_invalid"),
    ("expired", lambda s: {"type": "hello", "id": "h", "token": s.token(
        Role.TRAINEE, now=time.time() - 7200, ttl_s=60)}, 4401, "token_expired"),
    ("reviewer", lambda s: {"type": "hello", "id": "h", "token": s.token(Role.REVIEWER)}, 4403,
     "wrong_role"),
    ("unknown-session", lambda s: {"type": "hello", "id": "h",
                                   "token": s.token(Role.TRAINEE, "gone")},
     4403, "unknown_session"),
]


@pytest.mark.parametrize(("make_first", "close_code", "error_code"),
                         [c[1:] for c in HELLO_REFUSALS], ids=[c[0] for c in HELLO_REFUSALS])
async def test_hello_refusals_close_with_documented_codes(server, http, sockets, make_first,
                                                          close_code, error_code):
    ws = await connect(http, server, sockets)
    first = make_first(server)
    if isinstance(first, bytes):
        await ws.send_bytes(first)
    elif isinstance(first, str):
        await ws.send_str(first)
    else:
        await ws.send_json(first)
    code, messages = await closed_with(ws)
    assert code == close_code, (code, messages)
    if error_code is None:
        assert messages == []
    else:
        assert len(messages) == 1, messages
        check_error(messages[0], 401 if close_code == 4401 else messages[0]["error"]["status"],
                    error_code, request_id="h")
    assert not server.session().participants


async def test_hello_to_an_ended_session_is_refused(server, http, sockets):
    await server.session().end("test")
    ws = await connect(http, server, sockets)
    await ws.send_json({"type": "hello", "token": server.token(Role.TRAINEE)})
    code, messages = await closed_with(ws)
    assert code == 4403
    check_error(messages[0], 410, "session_ended")


async def test_no_hello_in_time_closes_4408(server, http, sockets, monkeypatch):
    monkeypatch.setattr(ws_module, "HELLO_TIMEOUT_S", 0.5)
    ws = await connect(http, server, sockets)
    started = time.monotonic()
    code, messages = await closed_with(ws, timeout=5)
    assert code == 4408 and messages == []
    assert 0.4 < time.monotonic() - started < 4


async def test_keepalives_go_to_sockets_that_ask_even_while_a_request_takes_long(
        http, sockets, monkeypatch):
    """A page takes complete silence for a Node that vanished (docs/protocol.md,
    "Failover"): a hello with ``keepalive`` gets one whenever the Node said
    nothing for ``liveness.ws_keepalive_s``, also while one of its requests is
    being answered slowly (requests are answered one after the other)."""
    original = ws_module.Connection.handle

    async def slow_sync(self: ws_module.Connection, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("type") == "interaction_sync":
            await asyncio.sleep(1.5)  # as a request forwarded to a busy holder may
        return await original(self, message)

    monkeypatch.setattr(ws_module.Connection, "handle", slow_sync)
    srv, runner = await start_server(make_config(liveness={"ws_keepalive_s": 0.3}))
    try:
        asked = await connect(http, srv, sockets)
        await asked.send_json({"type": "hello", "token": srv.token(Role.TRAINEE), "id": "h",
                               "keepalive": True})
        assert (await receive(asked))["type"] == "welcome"
        plain, _ = await join(http, srv, sockets, Role.TRAINEE)

        for ws in (asked, plain):
            await ws.send_json({"type": "interaction_sync", "id": "slow"})
        before_reply = []
        while (message := await receive(asked))["type"] != "interaction_state":
            before_reply.append(message["type"])
        assert before_reply.count("keepalive") >= 2, before_reply
        # Quiet afterwards: still one every 0.3 s or so.
        started = time.monotonic()
        await receive_until(asked, of_type("keepalive"), timeout=5)
        await receive_until(asked, of_type("keepalive"), timeout=5)
        print(f"keepalives while a 1.5 s request was answered: {before_reply.count('keepalive')}"
              f", then two in {time.monotonic() - started:.2f} s")

        # The socket that did not ask gets the reply and nothing else.
        got = []
        while (message := await receive(plain))["type"] != "interaction_state":
            got.append(message["type"])
        with pytest.raises(TimeoutError):
            got.append((await plain.receive(timeout=1.0)).data)
        assert "keepalive" not in got, got
    finally:
        await runner.cleanup()


# -- requests after welcome ---------------------------------------------------------

async def test_bad_requests_get_errors_and_the_socket_stays_open(server, http, sockets):
    ws, _ = await join(http, server, sockets, Role.TRAINEE)

    await ws.send_json({"type": "teleport", "id": "u1"})
    check_error(await receive(ws), 400, request_id="u1")
    await ws.send_json({"type": "teleport", "id": 7})
    check_error(await receive(ws), 400, request_id=7)
    await ws.send_str("[1, 2, 3]")
    check_error(await receive(ws), 400)
    await ws.send_str('"hello"')
    check_error(await receive(ws), 400)
    await ws.send_str("{nope")
    check_error(await receive(ws), 400, "bad_json")
    await ws.send_json({"type": "ping", "id": {"nested": True}})
    message = await receive(ws)
    check_error(message, 400)
    assert "id" not in message or not isinstance(message["id"], dict)
    await ws.send_bytes(b"\x00binary")
    check_error(await receive(ws), 400)
    await ws.send_json({"type": "subscribe", "id": "s1"})
    check_error(await receive(ws), 400, request_id="s1")
    await ws.send_json({"type": "subscribe", "feed": "room.video", "sdp": "v=0\r\n", "id": "s2"})
    check_error(await receive(ws), 404, "unknown_feed", request_id="s2")

    await ws.send_json({"type": "unsubscribe", "subscription": "no-such", "id": "us"})
    check_error(await receive(ws), 404, "unknown_resource", request_id="us")

    await ws.send_json({"type": "publish", "slot": "room", "sdp": "v=0", "id": "p1"})
    check_error(await receive(ws), 403, "wrong_role", request_id="p1")
    await ws.send_json({"type": "unpublish", "slot": "room", "id": "p2"})
    check_error(await receive(ws), 403, "wrong_role", request_id="p2")
    await ws.send_json({"type": "end_session", "id": "e1"})
    check_error(await receive(ws), 403, "wrong_role", request_id="e1")
    assert server.session().state == "live"

    await ws.send_json({"type": "ping", "id": "still-there"})
    assert await receive(ws) == {"type": "pong", "id": "still-there"}
    assert not ws.closed


async def test_oversized_message_closes_1009(server, http, sockets):
    ws, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="big")
    limit = server.config.limits.ws_max_message_bytes
    await ws.send_str(json.dumps({"type": "ping", "pad": "x" * (limit + 100)}))
    code, _ = await closed_with(ws)
    assert code == 1009
    await wait_for(lambda: "" if "big" not in server.session().participants
                   else "participant still listed")


# -- media through the websocket ----------------------------------------------------

async def test_publish_and_subscribe_over_ws_deliver_frames(server, http, sockets, peers):
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    publisher = client_pc()
    peers.append(publisher)
    await expert.send_json({"type": "publish", "slot": "room", "id": "pub",
                            "sdp": await video_offer(publisher, "sendonly")})
    answer = await receive_until(expert, of_type("answer"))
    assert answer["id"] == "pub" and answer["slot"] == "room"
    assert answer["feeds"] == ["room.video"]
    assert "a=setup:passive" in answer["sdp"]
    await publisher.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))

    trainee, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-1")
    viewer = client_pc()
    peers.append(viewer)
    track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    viewer.on("track", lambda t: track.done() or track.set_result(t))
    await trainee.send_json({"type": "subscribe", "feed": "room.video", "id": 3,
                             "sdp": await video_offer(viewer, "recvonly")})
    reply = await receive_until(trainee, of_type("answer"))
    assert reply["id"] == 3 and reply["feed"] == "room.video"
    assert reply["subscription"] in session.subscriptions
    await viewer.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))

    remote = await asyncio.wait_for(track, 10)
    frames = [await asyncio.wait_for(remote.recv(), 10) for _ in range(5)]
    assert all((f.width, f.height) == (640, 480) for f in frames)
    assert frames[-1].pts > frames[0].pts

    # Only its owner (or a moderator) may end a subscription.
    intruder, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-9")
    await intruder.send_json({"type": "unsubscribe", "subscription": reply["subscription"],
                              "id": "steal"})
    check_error(await receive_until(intruder, of_type("error")), 403, "not_owner",
                request_id="steal")
    assert reply["subscription"] in session.subscriptions

    # A second tab of the same trainee stays; closing the first closes its subscription.
    second, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-1")
    await trainee.close()

    def viewer_gone() -> str:
        if session.subscriptions:
            return f"subscriptions left: {list(session.subscriptions)}"
        if session.describe_feed(session.feeds["room.video"])["viewers"]:
            return "feed still counts a viewer"
        server_side = [pc for pc in live_peer_connections() if pc not in (publisher, viewer)]
        return "" if len(server_side) == 1 else f"{len(server_side)} server peers open"

    await wait_for(viewer_gone, timeout=5)
    assert "tr-1" in session.participants
    assert session.feeds["room.video"].state == "live"

    # Unpublish over the socket closes the Feed; the other tab hears about it.
    await expert.send_json({"type": "unpublish", "slot": "room", "id": "unpub"})
    assert await receive_until(expert, of_type("ok")) == {"type": "ok", "id": "unpub"}
    closed = await receive_until(second, lambda m: m.get("type") == "feed"
                                 and m["feed"]["state"] == "closed")
    assert closed["feed"]["id"] == "room.video"
    assert not session.feeds and not session.ingests


async def test_feed_events_follow_feeds_and_viewers(server, http, sockets, peers):
    ws, _ = await join(http, server, sockets, Role.TRAINEE)
    publisher, url = await whip_publish(http, server, "room", [VideoStreamTrack()])
    peers.append(publisher)
    live = await receive_until(ws, of_type("feed"))
    assert live["feed"]["id"] == "room.video" and live["feed"]["state"] == "live"
    assert live["feed"]["codec"] == "video/VP8"

    viewer, _, _ = await whep_subscribe(http, server, "room.video", "video")
    peers.append(viewer)
    watched = await receive_until(ws, lambda m: m.get("type") == "feed"
                                  and m["feed"]["viewers"] == 1)
    assert watched["feed"]["state"] == "live"

    token = server.token(Role.EXPERT)
    async with http.delete(url, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    closed = await receive_until(ws, lambda m: m.get("type") == "feed"
                                 and m["feed"]["state"] == "closed")
    assert closed["feed"]["id"] == "room.video"


# -- the end -------------------------------------------------------------------------

async def test_end_session_over_ws(server, http, sockets, peers):
    publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    peers.append(publisher)
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, name="T")
    admin, _ = await join(http, server, sockets, Role.ADMIN, name="A")

    await trainee.send_json({"type": "end_session", "id": "nope"})
    check_error(await receive_until(trainee, of_type("error")), 403, "wrong_role",
                request_id="nope")

    await expert.send_json({"type": "end_session", "id": 99})
    code, messages = await closed_with(expert)
    types = [m["type"] for m in messages]
    assert {"type": "ok", "id": 99} in messages, messages
    assert "session_ended" in types and types.index("ok") < types.index("session_ended")
    assert code == 1000

    for ws in (trainee, admin):
        code, messages = await closed_with(ws)
        ended = [m for m in messages if m["type"] == "session_ended"]
        assert len(ended) == 1 and isinstance(ended[0]["reason"], str), messages
        assert code == 1000, (code, messages)

    assert session.state == "ended"
    assert not session.ingests and not session.feeds and not session.subscriptions
    await wait_for(lambda: "" if not [pc for pc in live_peer_connections() if pc is not publisher]
                   else "server peer connections still open")


async def test_server_shutdown_sends_going_away_and_1001(http):
    srv, runner = await start_server(make_config())
    opened: list[WS] = []
    created: list[RTCPeerConnection] = []
    try:
        publisher, _ = await whip_publish(http, srv, "room", [VideoStreamTrack()])
        created.append(publisher)
        expert, _ = await join(http, srv, opened, Role.EXPERT)
        trainee, _ = await join(http, srv, opened, Role.TRAINEE)
        session = srv.session()
        cleanup = asyncio.ensure_future(runner.cleanup())
        try:
            for ws in (expert, trainee):
                code, messages = await closed_with(ws, timeout=10)
                assert [m for m in messages if m["type"] == "going_away"], messages
                assert code == 1001, (code, messages)
        finally:
            await cleanup
        assert session.state == "ended"
        assert not [pc for pc in live_peer_connections() if pc is not publisher]
    finally:
        for ws in opened:
            await ws.close()
        for pc in created:
            await pc.close()
