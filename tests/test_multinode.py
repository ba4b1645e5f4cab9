"""Several Nodes and workers as real processes: `scrubin serve` from one
configuration file (each Node its own port and node id, from the
environment), one Redis started by the test (pytest-redis, free port).

Bounded: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server.publish.synthetic import SyntheticTheatreCamera
from server.publish.whep import WhepPlayer
from server.publish.whip import post_offer
from server.roles import Role
from server.tokens import NODE_WIDE, TokenAuthority

from .conftest import CANARY_KEY, LOOPBACK, client_pc, free_ports, offer_sdp
from .test_cluster import hello
from .test_edges import Viewer, advancing, decoding
from .test_edges import subscribe as subscribe_to
from .test_interaction import CIRCLE, request
from .test_ws_protocol import WS, closed_with, of_type, receive_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KEY = "mn:" + "n" * 40
TOKENS = TokenAuthority([KEY])
ADMIN = TOKENS.issue(NODE_WIDE, Role.ADMIN, name="Ada Admin")

multinode_redis = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)


def write_config(folder: Path, redis: RedisExecutor, *, redis_url: bool = True,
                 lease_ttl_s: float = 3.0, udp_ports: str = "", edges: bool = False) -> Path:
    store = (f'redis_url = "redis://{redis.host}:{redis.port}/0"\n'
             f'prefix = "mn-{time.monotonic_ns()}:"\npresence_interval_s = 1\n'
             if redis_url else "")
    path = folder / "scrubin.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {unused_port()}
[store]
{store}
[cluster]
lease_ttl_s = {lease_ttl_s}
edges = {"true" if edges else "false"}
heartbeat_s = 0.5
node_ttl_s = 2.5
[auth]
signing_keys = ["{KEY}", "{CANARY_KEY}"]
[ice]
host_addresses = ["127.0.0.1"]
allowed_remote_networks = ["127.0.0.0/8"]
udp_ports = "{udp_ports}"
[[theatres]]
id = "or1"
slots = ["room", "endoscope"]
[[sessions]]
id = "or1-live"
theatre = "or1"
title = "Laparoscopic cholecystectomy"
procedure = "cholecystectomy"
""")
    return path


@dataclass
class NodeProcess:
    """One `scrubin serve` (a Node, or a supervisor of workers)."""

    name: str
    config: Path
    port: int
    args: list[str] = field(default_factory=lambda: ["--workers", "1"])
    process: subprocess.Popen[bytes] | None = None
    output: list[str] = field(default_factory=list)
    #: Environment of its own (over the defaults below: a shared recordings root).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return "\n".join(self.output)

    def start(self, ready: str = "serving on", count: int = 1) -> None:
        folder = self.config.parent / self.name
        folder.mkdir(exist_ok=True)
        env = {**os.environ, "SCRUBIN_SERVER_PORT": str(self.port),
               "SCRUBIN_SERVER_NODE_ID": self.name,
               "SCRUBIN_AUDIT_PATH": str(folder / "audit.jsonl"),
               "SCRUBIN_RECORDING_ROOT": str(folder / "recordings"), **self.env}
        self.output.append(f"--- start {self.name}")
        process = self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--log-level", "INFO", "serve", "--config",
             str(self.config), *self.args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line.decode("utf-8", "replace").rstrip())

        threading.Thread(target=pump, daemon=True).start()
        started = len(self.output)
        deadline = time.monotonic() + 30
        while sum(ready in line for line in self.output[started - 1:]) < count:
            assert process.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, f"no start in 30 s: {self.text()[-3000:]}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return process.returncode if process is not None else 0
        process.send_signal(sig)
        try:
            return process.wait(25)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(5)


@pytest.fixture
def processes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


@pytest.fixture
async def three(multinode_redis: RedisExecutor, tmp_path: Path,
                processes: list[NodeProcess]) -> AsyncIterator[list[NodeProcess]]:
    assert multinode_redis.port != 6379
    config = write_config(tmp_path, multinode_redis)
    nodes = [NodeProcess(name, config, unused_port()) for name in ("node-a", "node-b", "node-c")]
    processes.extend(nodes)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    yield nodes


async def get_json(http: aiohttp.ClientSession, url: str, token: str = ADMIN) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, (url, response.status, await response.text())
        return await response.json()


async def holds(http: aiohttp.ClientSession, node: NodeProcess) -> dict[str, int]:
    return dict((await get_json(http, f"{node.base_url}/api/admin/nodes"))["holds"])


async def the_holder(http: aiohttp.ClientSession, nodes: list[NodeProcess],
                     timeout: float = 10.0) -> NodeProcess:
    deadline = time.monotonic() + timeout
    while True:
        holding = [n for n in nodes if "or1-live" in await holds(http, n)]
        if len(holding) == 1:
            return holding[0]
        assert len(holding) < 2, [n.name for n in holding]
        assert time.monotonic() < deadline, "nobody holds or1-live"
        await asyncio.sleep(0.1)


async def publish(http: aiohttp.ClientSession, entry: NodeProcess,
                  peers: list[RTCPeerConnection]) -> tuple[str, str]:
    """A synthetic camera published to the slot "room" through ``entry``
    (an encoder that follows the 307); the URL that answered, the resource."""
    pc = client_pc()
    peers.append(pc)
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    status, answer, answered, resource, _ = await post_offer(
        http, f"{entry.base_url}/whip/or1-live/room", await offer_sdp(pc),
        TOKENS.issue("or1-live", Role.EXPERT, name="Room camera"))
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return answered, resource


async def test_participants_on_three_node_processes_share_one_session(
        three: list[NodeProcess], http: aiohttp.ClientSession, sockets: list[WS],
        peers: list[RTCPeerConnection]) -> None:
    holder = await the_holder(http, three)
    a, c = (n for n in three if n is not holder)
    registry = await get_json(http, f"{a.base_url}/api/admin/nodes")
    assert {(n["id"], n["url"]) for n in registry["nodes"]} == {
        (n.name, n.base_url) for n in three}
    assert all(n["media"]["addresses"] == LOOPBACK for n in registry["nodes"])

    answered, resource = await publish(http, a, peers)
    assert answered == f"{holder.base_url}/whip/or1-live/room"
    assert resource.startswith(f"{holder.base_url}/whip/or1-live/room/")

    expert, welcome = await hello(http, a, TOKENS.issue("or1-live", Role.EXPERT,
                                                        name="Dr Grey"), sockets)
    assert welcome["serving"] == {"id": holder.name, "url": holder.base_url}
    on_c, _ = await hello(http, c, TOKENS.issue("or1-live", Role.TRAINEE, name="Tom on C"),
                          sockets)
    on_holder, _ = await hello(http, holder, TOKENS.issue("or1-live", Role.TRAINEE,
                                                          name="Tess"), sockets)
    assert [f["id"] for f in welcome["session"]["feeds"]] == ["room.video"]
    roster = await receive_until(expert, lambda m: m.get("type") == "roster"
                                 and len(m["participants"]) == 3)
    assert sorted(p["name"] for p in roster["participants"]) == ["Dr Grey", "Tess",
                                                                 "Tom on C"]

    drawn = await request(expert, {"type": "annotate", "feed": "room.video", "shape": CIRCLE})
    assert drawn["type"] == "ok", drawn
    for ws in (on_c, on_holder):
        assert (await receive_until(ws, of_type("annotation")))["annotation"] == drawn[
            "annotation"]
    asked = await request(on_c, {"type": "ask", "text": "Which clip first?"})
    assert asked["type"] == "ok", asked
    for ws in (expert, on_holder):
        question = await receive_until(ws, of_type("question"))
        assert question["question"]["id"] == asked["question"]["id"]
    chat = await request(on_holder, {"type": "chat", "text": "Thank you"})
    for ws in (expert, on_c):
        said = await receive_until(ws, of_type("chat"))
        assert said["message"] == chat["message"]

    await on_c.close()
    left = await receive_until(expert, lambda m: m.get("type") == "roster"
                               and len(m["participants"]) == 2)
    assert "Tom on C" not in {p["name"] for p in left["participants"]}


async def test_a_viewer_who_asks_another_node_gets_the_media_of_the_holder(
        three: list[NodeProcess], http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]) -> None:
    holder = await the_holder(http, three)
    c = next(n for n in three if n is not holder)
    await publish(http, holder, peers)
    token = TOKENS.issue("or1-live", Role.TRAINEE, name="Player")
    url = f"{c.base_url}/whep/or1-live/room.video"
    # Asked directly, the Node that does not hold the Session says where it is.
    async with http.post(url, data="v=0\r\n", allow_redirects=False, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}) as response:
        assert response.status == 307
        assert response.headers["Location"] == f"{holder.base_url}/whep/or1-live/room.video"
        body = await response.json()
        assert body["code"] == "session_elsewhere" and body["node"]["id"] == holder.name
    # A WHEP player that follows the redirect plays the holder's Feed.
    player = WhepPlayer(url, token, host_addresses=LOOPBACK)
    try:
        await player.start(http)
        assert player.answered_by == f"{holder.base_url}/whep/or1-live/room.video"
        assert player.resource.startswith(f"{holder.base_url}/whep/or1-live/room.video/")
        await asyncio.wait_for(player.first_frame.wait(), 15)
        deadline = time.monotonic() + 10
        while player.frames < 10:
            assert time.monotonic() < deadline, player.frames
            await asyncio.sleep(0.1)
    finally:
        assert await player.stop(http) == 200  # the DELETE reached the holder


async def test_edges_as_processes_serve_their_trainees_from_one_relay_each(
        multinode_redis: RedisExecutor, tmp_path: Path, http: aiohttp.ClientSession,
        sockets: list[WS], processes: list[NodeProcess]) -> None:
    config = write_config(tmp_path, multinode_redis, edges=True)
    nodes = [NodeProcess(name, config, unused_port()) for name in ("node-a", "node-b", "node-c")]
    processes.extend(nodes)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    holder = await the_holder(http, nodes)
    b, c = (n for n in nodes if n is not holder)
    camera = SyntheticTheatreCamera(640, 360, 15, label="room")
    publisher = client_pc()
    vp8 = [cap for cap in RTCRtpSender.getCapabilities("video").codecs
           if cap.mimeType in ("video/VP8", "video/rtx")]
    publisher.addTransceiver(camera, direction="sendonly").setCodecPreferences(vp8)
    viewers: list[Viewer] = []
    try:
        status, answer, _, _, _ = await post_offer(
            http, f"{b.base_url}/whip/or1-live/room", await offer_sdp(publisher),
            TOKENS.issue("or1-live", Role.EXPERT, name="Room camera"))
        assert status == 201, answer
        await publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        deadline = time.monotonic() + 10
        while not any(f["id"] == "room.video" and f["state"] == "live" for f in (await get_json(
                http, f"{holder.base_url}/api/admin/sessions/or1-live"))["session"]["feeds"]):
            assert time.monotonic() < deadline, "the camera's Feed is not live"
            await asyncio.sleep(0.1)
        # Trainees on B and C are served there; each edge pulls the Feed once.
        for edge in (b, c):
            for i in range(2):
                ws, welcome = await hello(http, edge, TOKENS.issue(
                    "or1-live", Role.TRAINEE, name=f"trainee {i}"), sockets)
                assert welcome["serving"] == {"id": edge.name, "url": edge.base_url}, welcome
                viewers.append(await subscribe_to(ws, rid=f"sub-{i}"))
        deadline = time.monotonic() + 20
        while decoding(viewers, 10):
            assert time.monotonic() < deadline, decoding(viewers, 10)
            await asyncio.sleep(0.1)
        assert all(advancing(v) for v in viewers), [v.counters[-5:] for v in viewers]
        described = await get_json(http, f"{holder.base_url}/api/admin/sessions/or1-live")
        feeds = {f["id"]: f for f in described["session"]["feeds"]}
        # One relay per edge, not four viewers: the viewers are on the edges.
        assert (feeds["room.video"]["relays"], feeds["room.video"]["viewers"]) == (2, 0)
        # B and C both serve (the failover of B's viewers to C is another test's).
        deadline = time.monotonic() + 5
        while True:
            loads = {n["id"]: n["load"].get("subscriptions") for n in (await get_json(
                http, f"{holder.base_url}/api/admin/nodes"))["nodes"]}
            if loads == {holder.name: 2, b.name: 2, c.name: 2}:
                break
            assert time.monotonic() < deadline, loads
            await asyncio.sleep(0.2)
    finally:
        for viewer in viewers:
            await viewer.close()
        camera.stop()
        await publisher.close()


async def test_the_lease_survives_a_node_restart_without_two_holders(
        multinode_redis: RedisExecutor, tmp_path: Path, http: aiohttp.ClientSession,
        sockets: list[WS], processes: list[NodeProcess]) -> None:
    config = write_config(tmp_path, multinode_redis, lease_ttl_s=10)
    nodes = [NodeProcess(name, config, unused_port()) for name in ("node-a", "node-b")]
    processes.extend(nodes)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    holder = await the_holder(http, nodes)
    other = next(n for n in nodes if n is not holder)
    fence = (await holds(http, holder))["or1-live"]
    member, _ = await hello(http, other, TOKENS.issue("or1-live", Role.TRAINEE), sockets)

    seen: list[tuple[float, str, dict[str, int]]] = []
    watching = True

    async def watch() -> None:
        """Both Nodes' own view of what they hold, every 50 ms."""
        while watching:
            for node in nodes:
                try:
                    seen.append((time.monotonic(), node.name, await holds(http, node)))
                except (aiohttp.ClientError, AssertionError):
                    pass  # down
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        holder.stop(signal.SIGKILL)  # a crash: nothing released, nothing said
        # Its registry record expires (node_ttl_s); its members are sent to reconnect.
        deadline = time.monotonic() + 10
        while [n["id"] for n in (await get_json(
                http, f"{other.base_url}/api/admin/nodes"))["nodes"]] != [other.name]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        _, messages = await closed_with(member, timeout=5)
        assert messages[-1]["type"] == "going_away", messages
        # Asked now, the other Node does not take the lease: try again (1013).
        ws, reply = await hello(http, other, TOKENS.issue("or1-live", Role.TRAINEE), sockets)
        assert reply["type"] == "error" and reply["error"]["code"] == "session_moving", reply
        assert (await closed_with(ws))[0] == 1013
        await asyncio.to_thread(holder.start)  # same node id, same port
        back = await the_holder(http, nodes, timeout=15)
        assert back is holder
        assert (await holds(http, holder))["or1-live"] > fence  # a new fence
        # Joining through the other Node works again.
        _, welcome = await hello(http, other, TOKENS.issue("or1-live", Role.TRAINEE),
                                     sockets)
        assert welcome["type"] == "welcome" and welcome["serving"]["id"] == holder.name
    finally:
        watching = False
        await watcher
    assert seen
    for _, name, held in seen:
        if name == other.name:
            assert "or1-live" not in held, "the other Node held it"
    fences = [held["or1-live"] for _, name, held in seen if "or1-live" in held]
    assert fences == sorted(fences)


# -- workers -------------------------------------------------------------------------------


async def test_workers_need_redis(tmp_path: Path, multinode_redis: RedisExecutor) -> None:
    config = write_config(tmp_path, multinode_redis, redis_url=False)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "server.cli", "serve", "--config", str(config),
                         "--workers", "2"], cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 2
    assert b"redis_url" in done.stderr and b"workers" in done.stderr


async def test_two_workers_share_the_port_and_serve_pages_on_both(
        multinode_redis: RedisExecutor, tmp_path: Path, http: aiohttp.ClientSession,
        processes: list[NodeProcess], peers: list[RTCPeerConnection], browser: Any) -> None:
    from .browser_helpers import INBOUND_STATS_JS, open_page, wait_js

    first_udp = free_ports(100, socket.SOCK_DGRAM)
    config = write_config(tmp_path, multinode_redis, udp_ports=f"{first_udp}-{first_udp + 99}")
    port = free_ports(3)  # the shared port, then one per worker
    supervisor = NodeProcess("scrubin", config, port, args=["--workers", "2"])
    processes.append(supervisor)
    await asyncio.to_thread(supervisor.start, "serving on", 2)
    workers = {}
    deadline = time.monotonic() + 15
    while len(workers) < 2:
        assert time.monotonic() < deadline, supervisor.text()[-2000:]
        listed = await get_json(http, f"{supervisor.base_url}/api/admin/nodes")
        workers = {n["id"]: n for n in listed["nodes"]}
        await asyncio.sleep(0.2)
    assert set(workers) == {"scrubin-w0", "scrubin-w1"}
    assert workers["scrubin-w0"]["url"] == f"http://127.0.0.1:{port + 1}"
    assert workers["scrubin-w1"]["url"] == f"http://127.0.0.1:{port + 2}"
    assert workers["scrubin-w0"]["media"]["udp_ports"] == f"{first_udp}-{first_udp + 49}"
    assert workers["scrubin-w1"]["media"]["udp_ports"] == f"{first_udp + 50}-{first_udp + 99}"

    # Both workers answer on the shared port (the kernel spreads connections).
    answered: set[str] = set()
    for _ in range(200):
        async with aiohttp.ClientSession() as fresh, \
                fresh.get(f"{supervisor.base_url}/readyz") as response:
            answered.add((await response.json())["node"])
        if len(answered) == 2:
            break
    assert answered == {"scrubin-w0", "scrubin-w1"}

    # A camera through the shared port lands on the worker holding the Session.
    worker_urls = {n: w["url"] for n, w in workers.items()}
    holding = [n for n, url in worker_urls.items()
               if "or1-live" in (await get_json(http, f"{url}/api/admin/nodes"))["holds"]]
    assert len(holding) == 1
    holder_url = worker_urls[holding[0]]
    _, resource = await publish(http, supervisor, peers)
    assert resource.startswith(f"{holder_url}/whip/or1-live/room/")
    # Its peer connections use its own UDP ports.
    low, _, high = workers[holding[0]]["media"]["udp_ports"].partition("-")
    pc = client_pc()
    peers.append(pc)
    pc.addTransceiver("video", direction="recvonly")
    status, answer, _, _, _ = await post_offer(
        http, f"{supervisor.base_url}/whep/or1-live/room.video", await offer_sdp(pc),
        TOKENS.issue("or1-live", Role.TRAINEE))
    assert status == 201, answer
    ports = [int(line.split()[5]) for line in answer.splitlines()
             if line.startswith("a=candidate")]
    assert ports and all(int(low) <= p <= int(high) for p in ports), ports

    # Watch pages opened from each worker's own URL move to the holder and play.
    contexts = []
    try:
        for name, url in worker_urls.items():
            token = TOKENS.issue("or1-live", Role.TRAINEE, name=f"Page on {name}")
            context, page, log = await open_page(browser, f"{url}/watch.html#token={token}",
                                                 name)
            contexts.append(context)
            await wait_js(page, "() => window.scrubin && window.scrubin.client.state === 'open'")
            connected = await page.evaluate("() => window.scrubin.client.url")
            assert connected == holder_url.replace("http://", "ws://") + "/ws", connected
            deadline = time.monotonic() + 20
            while True:
                stats = await page.evaluate(INBOUND_STATS_JS, "room.video")
                if stats and stats["framesDecoded"] > 5:
                    break
                assert time.monotonic() < deadline, (stats, log.messages[-20:])
                await asyncio.sleep(0.2)
            assert not log.errors, log.errors
    finally:
        for context in contexts:
            await context.close()
    assert supervisor.stop() == 0
    assert "Traceback" not in supervisor.text(), supervisor.text()[-3000:]
