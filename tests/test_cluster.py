"""Three Nodes, one configuration, one Redis (in one process: quick to read
when it fails; tests/test_multinode.py runs them as separate processes).

Real parts: a redis-server of the test's own (pytest-redis, free port), real
servers, websockets and aiortc peers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiortc.mediastreams import VideoStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server.app import create_app
from server.config import Config, SessionConfig, TheatreConfig
from server.http.common import CSP, REGISTRY
from server.http.guard import NodeRunner
from server.roles import Role

from .admin_helpers import admin_token, api
from .conftest import Server, client_pc, make_config, offer_sdp, wait_for
from .test_interaction import CIRCLE, request
from .test_ws_protocol import WS, closed_with, of_type, receive, receive_until

pytestmark = pytest.mark.slow

cluster_redis = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)

KEYS = ["k1:" + "m" * 40]
CONSENT = {"recorded_by": "Dr Grey", "recorded_at": "2026-12-04T09:00:00Z",
           "scope": "internal_review"}


def node_config(redis: RedisExecutor, node_id: str, prefix: str, **cluster: Any) -> Config:
    base = make_config(store={"redis_url": f"redis://{redis.host}:{redis.port}/0",
                              "prefix": prefix, "presence_interval_s": 1.0},
                       server={"node_id": node_id}, auth={"signing_keys": KEYS},
                       cluster={"lease_ttl_s": 3.0, **cluster})
    return dataclasses.replace(
        base, theatres=[TheatreConfig("or1", "Theatre 1", ["room", "endoscope"])],
        sessions=[SessionConfig("or1-live", "or1", "Cholecystectomy", "cholecystectomy")])


async def start_node(config: Config) -> tuple[Server, web.AppRunner]:
    app = create_app(config)
    runner = NodeRunner(app, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    return Server(app, config, f"http://127.0.0.1:{config.server.port}"), runner


RUNNERS: dict[int, web.AppRunner] = {}


@contextlib.asynccontextmanager
async def running_nodes(configs: list[Config]) -> AsyncIterator[list[Server]]:
    """In-process Nodes started at the same moment, stopped after (those a
    test has not stopped itself)."""
    started = await asyncio.gather(*(start_node(c) for c in configs))
    for server, runner in started:
        RUNNERS[id(server)] = runner
    try:
        yield [server for server, _ in started]
    finally:
        for server, _ in started:
            await stop(server)


@pytest.fixture
async def nodes(cluster_redis: RedisExecutor) -> AsyncIterator[list[Server]]:
    assert cluster_redis.port != 6379
    prefix = f"cluster-{time.monotonic_ns()}:"
    async with running_nodes([node_config(cluster_redis, n, prefix)
                              for n in ("node-a", "node-b", "node-c")]) as servers:
        yield servers


async def stop(server: Server) -> None:
    runner = RUNNERS.pop(id(server), None)
    if runner is not None:
        await runner.cleanup()


def holders(servers: list[Server], session: str = "or1-live") -> list[Server]:
    return [s for s in servers if session in s.app[REGISTRY].sessions
            and s.app[REGISTRY].holds(session)]


class HasBaseUrl(Protocol):
    @property
    def base_url(self) -> str: ...


async def hello(http: aiohttp.ClientSession, server: HasBaseUrl, token: str,
                sockets: list[WS]) -> tuple[WS, dict[str, Any]]:
    """A websocket to ``server`` and its first answer to ``hello``."""
    ws = await http.ws_connect(f"{server.base_url}/ws")
    sockets.append(ws)
    await ws.send_json({"type": "hello", "token": token, "id": "hello"})
    return ws, await receive(ws)


async def whip_through(http: aiohttp.ClientSession, entry: Server, token: str,
                       slot: str) -> tuple[Any, str, str]:
    """Publish ``slot`` asking ``entry``: a 307 to the Node that holds the
    Session, followed with the same token, as RFC 9725 clients do."""
    pc = client_pc()
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    sdp = await offer_sdp(pc)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    url = f"{entry.base_url}/whip/or1-live/{slot}"
    async with http.post(url, data=sdp, headers=headers, allow_redirects=False) as response:
        first = response.status
        target = response.headers.get("Location", url)
    async with http.post(target, data=sdp, headers=headers, allow_redirects=False) as response:
        assert response.status == 201, await response.text()
        answer = await response.text()
        resource = response.headers["Location"]
    from aiortc import RTCSessionDescription

    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, target if first == 307 else "", resource


async def test_one_config_three_nodes_and_the_teaching_state_crosses_them(
        nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    # The configured Session is created once and held by exactly one Node.
    await wait_for(lambda: "" if len(holders(nodes)) == 1 else f"{len(holders(nodes))} hold")
    holder = holders(nodes)[0]
    a, c = (s for s in nodes if s is not holder)
    admin = admin_token(holder)
    for node in nodes:
        _, body = await api(http, node, "GET", "/api/admin/sessions/or1-live", admin,
                            expect=200)
        assert body["session"]["node"] == holder.config.server.node_id
        _, listed = await api(http, node, "GET", "/api/admin/nodes", admin, expect=200)
        assert [n["id"] for n in listed["nodes"]] == ["node-a", "node-b", "node-c"]
        assert {n["url"] for n in listed["nodes"]} == {s.base_url for s in nodes}
        assert set(listed["holds"]) == ({"or1-live"} if node is holder else set())

    # Pages may connect to every Node of the registry; so may their WHIP/WHEP calls.
    await wait_for(lambda: "" if all(
        f"ws://127.0.0.1:{other.config.server.port}" in node.app[CSP].csp
        for node in nodes for other in nodes) else "registry origins not in the CSP yet")
    async with http.get(f"{a.base_url}/watch.html") as page:
        policy = page.headers["Content-Security-Policy"]
        assert f"{holder.base_url} ws://127.0.0.1:{holder.config.server.port}" in policy
    async with http.options(f"{a.base_url}/whep/or1-live/room.video",
                            headers={"Origin": holder.base_url}) as preflight:
        assert preflight.headers["Access-Control-Allow-Origin"] == holder.base_url
    async with http.options(f"{a.base_url}/whep/or1-live/room.video",
                            headers={"Origin": "http://elsewhere.example"}) as preflight:
        assert "Access-Control-Allow-Origin" not in preflight.headers

    # An encoder asking node A is sent to the holder (307), and publishes there.
    expert_token = holder.tokens.issue("or1-live", Role.EXPERT, name="Dr Grey")
    pc, redirected, resource = await whip_through(http, a, expert_token, "room")
    try:
        assert redirected == f"{holder.base_url}/whip/or1-live/room"
        assert resource.startswith(f"{holder.base_url}/whip/or1-live/room/")  # its own URL
        session = holder.app[REGISTRY].sessions["or1-live"]
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed yet")

        # Links asked of A: pages on A, WHIP and WHEP on the holder.
        _, links = await api(http, a, "GET", "/api/sessions/or1-live/links", expert_token,
                             expect=200)
        assert links["trainee_page"].startswith(f"{a.base_url}/watch.html#token=")
        assert [w["url"] for w in links["whip"]] == [
            f"{holder.base_url}/whip/or1-live/{slot}" for slot in ("room", "endoscope")]
        assert [w["url"] for w in links["whep"]] == [
            f"{holder.base_url}/whep/or1-live/room.video"]

        # The expert on A, trainees on the holder and on C: one Session.
        expert, welcome = await hello(http, a, expert_token, sockets)
        assert welcome["type"] == "welcome"
        assert welcome["node"] == {"id": a.config.server.node_id, "url": a.base_url}
        assert welcome["serving"] == {"id": holder.config.server.node_id,
                                      "url": holder.base_url}
        assert [f["id"] for f in welcome["session"]["feeds"]] == ["room.video"]
        on_c, welcome_c = await hello(http, c, holder.tokens.issue(
            "or1-live", Role.TRAINEE, name="Tom on C"), sockets)
        assert welcome_c["serving"]["id"] == holder.config.server.node_id
        on_holder, _ = await hello(http, holder, holder.tokens.issue(
            "or1-live", Role.TRAINEE, name="Tess on the holder"), sockets)
        roster = await receive_until(expert, lambda m: m.get("type") == "roster"
                                     and len(m["participants"]) == 3)
        assert sorted(p["name"] for p in roster["participants"]) == [
            "Dr Grey", "Tess on the holder", "Tom on C"]
        assert roster["viewers"] == 2
        await receive_until(on_c, lambda m: m.get("type") == "roster" and m["viewers"] == 2)

        # A drawing made on A reaches the holder's and C's trainees.
        reply = await request(expert, {"type": "annotate", "feed": "room.video",
                                       "shape": CIRCLE})
        assert reply["type"] == "ok", reply
        for ws in (on_c, on_holder):
            drawn = await receive_until(ws, of_type("annotation"))
            assert drawn["annotation"] == reply["annotation"]
        # A question asked on C reaches the expert on A and the holder's trainee.
        asked = await request(on_c, {"type": "ask", "text": "Is that the cystic duct?"})
        assert asked["type"] == "ok", asked
        for ws in (expert, on_holder):
            question = await receive_until(ws, of_type("question"))
            assert question["question"]["text"] == "Is that the cystic duct?"
            assert question["question"]["author"]["name"] == "Tom on C"
        # Interaction state, rates and refusals are the holder's.
        state = await request(on_c, {"type": "interaction_sync"})
        assert [q["id"] for q in state["questions"]] == [asked["question"]["id"]]
        refused = await request(on_c, {"type": "annotate", "feed": "room.video",
                                       "shape": CIRCLE})
        assert refused["error"]["code"] == "wrong_role"
        # Media stays on the holder: a member is told where.
        moved = await request(on_c, {"type": "subscribe", "feed": "room.video", "sdp": "v=0"})
        assert moved["error"]["code"] == "session_elsewhere"
        assert moved["error"]["node"] == {"id": holder.config.server.node_id,
                                          "url": holder.base_url}

        # The recording state crosses too.
        started = await request(expert, {"type": "start_recording", "consent": CONSENT})
        assert started["recording"]["state"] == "on", started
        for ws in (on_c, on_holder):
            assert (await receive_until(ws, of_type("recording")))["state"] == "on"
        late, late_welcome = await hello(http, c, holder.tokens.issue(
            "or1-live", Role.TRAINEE, name="Late"), sockets)
        assert late_welcome["recording"]["state"] == "on"
        await request(expert, {"type": "stop_recording"})
        assert (await receive_until(on_c, of_type("recording")))["state"] == "off"

        # One Session, one audit trail, from every Node.
        async def trail_nodes() -> set[str]:
            _, body = await api(http, c, "GET", "/api/sessions/or1-live/audit", admin,
                                expect=200)
            return {e["node"] for e in body["entries"] if e["event"] == "join"}

        deadline = time.monotonic() + 5
        while await trail_nodes() != {"node-a", "node-b", "node-c"}:
            assert time.monotonic() < deadline, await trail_nodes()
            await asyncio.sleep(0.2)

        # A trainee leaving C leaves the roster on every Node.
        await late.close()
        await on_c.close()
        await receive_until(expert, lambda m: m.get("type") == "roster" and m["viewers"] == 1)

        # The expert ends the Session from A: it ends everywhere.
        ended = await request(expert, {"type": "end_session"})
        assert ended["type"] == "ok", ended
        for ws in (expert, on_holder):
            code, messages = await closed_with(ws)
            assert messages[-1]["type"] == "session_ended", messages
            # 1000 as sent; aiohttp's client may report 1006 for a close that
            # did not wait for its reply (browsers report the frame's code).
            assert code in (1000, 1006), (code, messages)
        await wait_for(lambda: "" if not holders(nodes) else "still held")
        await holder.app[REGISTRY].flush()  # the holder records the end in the background
        for node in nodes:
            _, body = await api(http, node, "GET", "/api/admin/sessions/or1-live", admin,
                                expect=200)
            assert body["session"]["state"] == "ended"
    finally:
        await pc.close()


async def test_a_holder_that_stops_hands_its_sessions_over_after_the_lease(
        nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(nodes)) == 1 else "no single holder")
    holder = holders(nodes)[0]
    others = [s for s in nodes if s is not holder]
    member, _ = await hello(http, others[0], holder.tokens.issue("or1-live", Role.TRAINEE),
                            sockets)
    await stop(holder)
    # The member is told to reconnect (the Session lives on), not that it ended.
    code, messages = await closed_with(member)
    assert messages[-1]["type"] == "going_away", messages
    assert code in (1012, 1006), (code, messages)  # 1006: as above
    # Until its lease expires (3 s here) nobody else takes it: asked meanwhile,
    # a Node says to try again (1013) rather than hold it twice.
    started = time.monotonic()
    token = holder.tokens.issue("or1-live", Role.TRAINEE)
    while True:
        ws, reply = await hello(http, others[1], token, sockets)
        if reply["type"] == "welcome":
            break
        assert reply["error"]["code"] == "session_moving", reply
        code, _ = await closed_with(ws)
        assert code == 1013
        await asyncio.sleep(0.2)
    waited = time.monotonic() - started
    assert 1.0 < waited < 6.0, waited
    assert holders(others) == [others[1]]
    assert reply["serving"]["id"] == others[1].config.server.node_id
