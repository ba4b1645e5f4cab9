"""Edges (docs/architecture.md, "Edges"): three Nodes on one Redis, the camera
published to the Session's holder, trainees served by the Nodes they joined,
which relay each Feed once from the holder.

Real parts: a redis-server of the test's own, real servers in one process,
websockets, aiortc publishers and viewers on loopback decoding the synthetic
camera's frame counter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server import framecode
from server.http.common import EDGES, NODES, REGISTRY
from server.interaction import MIC_SLOT
from server.publish.synthetic import SyntheticTheatreCamera
from server.roles import Role
from server.session import Session
from server.subscription import Subscription

from .admin_helpers import admin_token, api
from .conftest import Server, client_pc, offer_sdp, wait_for
from .test_cluster import hello, holders, node_config, running_nodes
from .test_interaction import mic_offer, request
from .test_layers import publish_layers
from .test_ws_protocol import WS, of_type, receive_until

pytestmark = pytest.mark.slow

SESSION = "or1-live"

edges_redis = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)


@pytest.fixture
async def edge_nodes(edges_redis: RedisExecutor) -> AsyncIterator[list[Server]]:
    prefix = f"edges-{time.monotonic_ns()}:"
    configs = []
    for node in ("node-a", "node-b", "node-c"):
        config = node_config(edges_redis, node, prefix, edges=True, edge_linger_s=0.5)
        # A relay whose origin closed it is noticed within a second or two.
        configs.append(dataclasses.replace(config, liveness=dataclasses.replace(
            config.liveness, peer_timeout_s=2.0, probe_after_s=1.0)))
    async with running_nodes(configs) as servers:
        yield servers


class Viewer:
    """One trainee's subscription over its websocket, decoding frame counters."""

    def __init__(self, pc: RTCPeerConnection, subscription: str) -> None:
        self.pc = pc
        self.subscription = subscription
        self.counters: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self, track: MediaStreamTrack) -> None:
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                counter = framecode.read(frame.to_ndarray(format="bgr24"))
                self.sizes.append((frame.width, frame.height))
                if counter is not None:
                    self.counters.append(counter)
        except MediaStreamError:
            pass

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.pc.close()


async def subscribe(ws: WS, feed: str = "room.video", rid: str = "sub") -> Viewer:
    pc = client_pc()
    pc.addTransceiver("video", direction="recvonly")
    track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def _on_track(t: MediaStreamTrack) -> None:
        if not track.done():
            track.set_result(t)

    reply = await request(ws, {"type": "subscribe", "feed": feed, "sdp": await offer_sdp(pc)},
                          rid)
    assert reply["type"] == "answer", reply
    await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
    viewer = Viewer(pc, reply["subscription"])
    viewer.start(await asyncio.wait_for(track, 5))
    return viewer


async def publish_camera(http: aiohttp.ClientSession, holder: Server, codec: str = "video/VP8"
                         ) -> tuple[RTCPeerConnection, SyntheticTheatreCamera]:
    camera = SyntheticTheatreCamera(640, 360, 15, label="room")
    pc = client_pc()
    chosen = [c for c in RTCRtpSender.getCapabilities("video").codecs
              if c.mimeType in (codec, "video/rtx")]
    pc.addTransceiver(camera, direction="sendonly").setCodecPreferences(chosen)
    token = holder.tokens.issue(SESSION, Role.EXPERT, name="Dr Grey")
    async with http.post(f"{holder.base_url}/whip/{SESSION}/room", data=await offer_sdp(pc),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, camera


def relays(session: Session, feed: str = "room.video") -> list[Subscription]:
    """The holder's relay Subscriptions of ``feed`` (edges' pulls)."""
    return [s for s in session.subscriptions.values()
            if s.feed_id == feed and s.grant is not None and s.grant.role is Role.RELAY]


def decoding(viewers: list[Viewer], more_than: int) -> str:
    short = [len(v.counters) for v in viewers if len(v.counters) <= more_than]
    return f"frames decoded: {[len(v.counters) for v in viewers]}" if short else ""


def advancing(viewer: Viewer) -> bool:
    tail = viewer.counters[-5:]
    return len(tail) == 5 and all(b > a for a, b in itertools.pairwise(tail))


async def test_edges_serve_their_trainees_with_one_relay_per_feed(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    b, c = (s for s in edge_nodes if s is not holder)
    session = holder.app[REGISTRY].sessions[SESSION]
    publisher, camera = await publish_camera(http, holder)
    viewers: list[Viewer] = []
    try:
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed yet")
        # Two trainees on each of B and C: each is served by the Node it joined.
        for edge in (b, c):
            for i in range(2):
                ws, welcome = await hello(http, edge, holder.tokens.issue(
                    SESSION, Role.TRAINEE, name=f"trainee {i}"), sockets)
                assert welcome["type"] == "welcome", welcome
                here = {"id": edge.config.server.node_id, "url": edge.base_url}
                assert welcome["node"] == here and welcome["serving"] == here
                viewers.append(await subscribe(ws, rid=f"sub-{i}"))
        # Every one of them decodes the camera's frames, counting up.
        await wait_for(lambda: decoding(viewers, 10), timeout=20)
        assert all(advancing(v) for v in viewers), [v.counters[-5:] for v in viewers]
        # The holder serves each edge once per Feed, however many viewers it has.
        assert sorted(s.participant_id for s in relays(session)) == sorted(
            f"node:{e.config.server.node_id}" for e in (b, c))
        assert len(session.subscriptions) == 2
        for edge in (b, c):
            copy = edge.app[EDGES].sessions[SESSION]
            assert set(copy.pulls) == {"room.video"}
            assert len(copy.session.subscriptions) == 2
            assert edge.app[NODES].current_load()[edge.config.server.node_id] == 2

        # The holder closes B's pull (as when its relay grant is revoked or
        # expires): B pulls again, its viewers carry on.
        pull = b.app[EDGES].sessions[SESSION].pulls["room.video"]
        b_id = b.config.server.node_id
        assert session.close_revoked(lambda g: g.participant_id == f"node:{b_id}") == 1
        await wait_for(lambda: "" if pull.connections >= 2 else "not pulled again", timeout=15)
        await wait_for(lambda: "" if len(relays(session)) == 2 else "relays missing")
        on_b = viewers[:2]
        counts = [len(v.counters) for v in on_b]
        await wait_for(lambda: "" if all(len(v.counters) > n + 5 for v, n in zip(
            on_b, counts, strict=True)) else "B's viewers stopped", timeout=10)
        assert all(advancing(v) for v in on_b)
        assert sorted(s.participant_id for s in relays(session)) == sorted(
            f"node:{e.config.server.node_id}" for e in (b, c))

        # Nobody on C watches any more: its pull stops after edge_linger_s.
        for viewer in viewers[2:]:
            await viewer.close()
        c_ws = sockets[2:4]
        for ws in c_ws:
            await ws.close()
        c_id = c.config.server.node_id
        await wait_for(lambda: "" if [s.participant_id for s in relays(session)] == [
            f"node:{b_id}"] else f"relays: {[s.participant_id for s in relays(session)]}",
            timeout=10)
        assert c_id not in [s.participant_id for s in relays(session)]
    finally:
        for viewer in viewers:
            await viewer.close()
        camera.stop()
        await publisher.close()


async def test_relay_grants_are_for_whep_only_and_never_minted_by_people(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    relay = holder.tokens.issue(SESSION, Role.RELAY, participant_id="node:x", name="edge x")
    # Not a page, not the API.
    _, refused = await hello(http, holder, relay, sockets)
    assert refused["type"] == "error" and refused["error"]["code"] == "wrong_role", refused
    for path in (f"/api/sessions/{SESSION}", f"/api/sessions/{SESSION}/links"):
        status, body = await api(http, holder, "GET", path, relay)
        assert (status, body["code"]) == (403, "wrong_role"), (path, body)
    # People cannot mint one: the admin API's invites refuse the role.
    status, body = await api(http, holder, "POST", f"/api/admin/sessions/{SESSION}/invites",
                             admin_token(holder), {"role": "relay", "name": "sneaky"})
    assert (status, body["code"]) == (400, "bad_role"), body
    # WHEP's layer query takes auto, full or low only.
    async with http.post(f"{holder.base_url}/whep/{SESSION}/room.video?layer=medium",
                         data="v=0", headers={"Authorization": f"Bearer {relay}",
                                              "Content-Type": "application/sdp"}) as response:
        assert response.status == 400
        assert (await response.json())["code"] == "bad_query"


async def test_a_trainee_on_a_loaded_node_is_placed_on_the_least_loaded_one(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    b, c = (s for s in edge_nodes if s is not holder)
    b_nodes = b.app[NODES]
    # B believes it carries far more than the others (their heartbeats say 0).
    b_nodes._load = lambda: {"subscriptions": 51.0}  # its measure, not a fake Node
    await wait_for(lambda: "" if len(b_nodes.known) == 2 else "registry incomplete")
    _, welcome = await hello(http, b, holder.tokens.issue(SESSION, Role.TRAINEE), sockets)
    assert welcome["serving"]["id"] in (holder.config.server.node_id, c.config.server.node_id)
    assert welcome["serving"]["id"] != b.config.server.node_id
    # An expert is always served by the holder, whatever the loads.
    _, expert = await hello(http, b, holder.tokens.issue(SESSION, Role.EXPERT), sockets)
    assert expert["serving"]["id"] == holder.config.server.node_id
    # Within the margin a trainee stays where it joined.
    b_nodes._load = lambda: {"subscriptions": 50.0}
    _, near = await hello(http, b, holder.tokens.issue(SESSION, Role.TRAINEE), sockets)
    assert near["serving"]["id"] == b.config.server.node_id


async def test_an_edge_relays_the_low_layer_and_lets_go_of_a_feed_the_origin_closes(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    edge = next(s for s in edge_nodes if s is not holder)
    session = holder.app[REGISTRY].sessions[SESSION]
    publisher, camera = await publish_layers(http, holder, full=(640, 360), fps=15)
    viewer: Viewer | None = None
    try:
        await wait_for(lambda: "" if "room.video" in session.feeds
                       and session.feeds["room.video"].low is not None else "no layers yet")
        ws, welcome = await hello(http, edge, holder.tokens.issue(SESSION, Role.TRAINEE),
                                  sockets)
        assert welcome["serving"]["id"] == edge.config.server.node_id
        viewer = await subscribe(ws)
        await wait_for(lambda: decoding([viewer], 5), timeout=15)
        copy = edge.app[EDGES].sessions[SESSION]
        # The camera's low layer is pulled as a second stream: local layer switches.
        await wait_for(lambda: "" if set(copy.pulls) == {"room.video", "room.video.low"}
                       else f"pulls: {set(copy.pulls)}")
        assert len(relays(session)) == 2  # one per layer, both for this edge
        reply = await request(ws, {"type": "set_layer", "subscription": viewer.subscription,
                                   "layer": "low"}, "low")
        assert reply["type"] == "ok", reply
        seen = len(viewer.sizes)
        await wait_for(lambda: "" if (320, 180) in viewer.sizes[seen:] else
                       f"sizes since: {set(viewer.sizes[seen:])}", timeout=10)

        # The expert stops the camera: the edge's viewer is told, the pulls stop.
        expert, _ = await hello(http, holder, holder.tokens.issue(SESSION, Role.EXPERT),
                                sockets)
        stopped = await request(expert, {"type": "unpublish", "slot": "room"}, "stop")
        assert stopped["type"] == "ok", stopped
        closed = await receive_until(ws, of_type("subscription_closed"), timeout=15)
        assert closed["feed"] == "room.video", closed
        await wait_for(lambda: "" if not copy.pulls else f"pulls: {set(copy.pulls)}")
        await wait_for(lambda: "" if not relays(session) else "relays left on the origin")
    finally:
        if viewer is not None:
            await viewer.close()
        camera.stop()
        await publisher.close()


async def test_an_edge_relays_h264_as_its_stream_says(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    edge = next(s for s in edge_nodes if s is not holder)
    session = holder.app[REGISTRY].sessions[SESSION]
    publisher, camera = await publish_camera(http, holder, "video/H264")
    viewer: Viewer | None = None
    try:
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed yet")
        ws, _ = await hello(http, edge, holder.tokens.issue(SESSION, Role.TRAINEE), sockets)
        viewer = await subscribe(ws)
        await wait_for(lambda: decoding([viewer], 10), timeout=15)
        assert advancing(viewer), viewer.counters[-5:]
        relayed = edge.app[EDGES].sessions[SESSION].session.feeds["room.video"]
        assert relayed.codec.mimeType == "video/H264"
        # Matched against the SPS it forwards, as the origin's Feed is.
        assert relayed.h264 is not None and relayed.h264 == session.feeds["room.video"].h264
    finally:
        if viewer is not None:
            await viewer.close()
        camera.stop()
        await publisher.close()


async def test_a_trainee_served_by_an_edge_speaks_into_the_holder(
        edge_nodes: list[Server], http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    await wait_for(lambda: "" if len(holders(edge_nodes)) == 1 else "no holder yet")
    holder = holders(edge_nodes)[0]
    edge = next(s for s in edge_nodes if s is not holder)
    session = holder.app[REGISTRY].sessions[SESSION]
    expert, _ = await hello(http, holder, holder.tokens.issue(SESSION, Role.EXPERT), sockets)
    trainee, welcome = await hello(http, edge, holder.tokens.issue(
        SESSION, Role.TRAINEE, name="Tess", participant_id="tr-1"), sockets)
    assert welcome["serving"]["id"] == edge.config.server.node_id
    pc = client_pc()
    try:
        offer = await mic_offer(pc)
        refused = await request(trainee, {"type": "publish", "slot": MIC_SLOT, "sdp": offer},
                                "early")
        assert refused["type"] == "error" and refused["error"]["code"] == "not_granted", refused
        await wait_for(lambda: "" if "tr-1" in session.participants else "not on the roster")
        granted = await request(expert, {"type": "mic_grant", "participant": "tr-1"}, "grant")
        assert granted["type"] == "ok", granted
        answer = await request(trainee, {"type": "publish", "slot": MIC_SLOT, "sdp": offer},
                               "mic")
        assert answer["type"] == "answer" and answer["feeds"] == [f"{MIC_SLOT}.audio"], answer
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        # The voice reaches the holder's Feed straight from the trainee's peer.
        await wait_for(lambda: "" if (f := session.feeds.get(f"{MIC_SLOT}.audio")) is not None
                       and f.frames_received > 10 else "no microphone frames on the holder",
                       timeout=10)
        stopped = await request(trainee, {"type": "unpublish", "slot": MIC_SLOT}, "stop")
        assert stopped["type"] == "ok", stopped
        await wait_for(lambda: "" if f"{MIC_SLOT}.audio" not in session.feeds
                       else "microphone Feed still open")
    finally:
        await pc.close()
