"""Failover and drain with real parts (issue 12, parts 2 and 3): a real
redis-server, three `scrubin serve` processes on loopback, a WHIP publisher
with fallback Nodes (the synthetic camera, which stamps a frame counter),
watch pages in Chromium that decode that counter from the picture.

Today a page plays its media from the Node that holds the Session (the
welcome's ``serving``); a page "on B" is one opened from B's URL. The pages'
failover does not depend on that: they fail over along the welcome's
``nodes`` to whichever Node answers, which routes them.

Bounded: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import unused_port
from pytest_redis.executor import RedisExecutor

from server import framecode
from server.app import drain
from server.http.common import NODES, REGISTRY
from server.http.common import TOKENS as TOKEN_AUTHORITY
from server.publish.synthetic import SyntheticTheatreCamera
from server.publish.whip import WhipOptions, WhipPublisher
from server.recordings import RESCAN_S
from server.roles import Role

from .admin_helpers import api
from .conftest import LOOPBACK, Server, wait_for
from .test_cluster import (  # noqa: F401  (fixtures)
    CONSENT,
    cluster_redis,
    hello,
    holders,
    node_config,
    nodes,
    running_nodes,
    stop,
    whip_through,
)
from .test_interaction import request
from .test_multinode import (  # noqa: F401  (fixtures)
    TOKENS,
    NodeProcess,
    get_json,
    multinode_redis,
    processes,
    the_holder,
    write_config,
)
from .test_ws_protocol import WS, closed_with

pytestmark = pytest.mark.slow

#: The watch page's main video, read like the tests read exports: the counter
#: the synthetic camera stamped into this frame (null: none readable yet).
MAIN_COUNTER_JS = "() => {\n" + framecode.JS_READER + """
  const video = window.scrubin && window.scrubin.mainVideo();
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(video, 0, 0);
  return framecodeRead(ctx.getImageData(0, 0, canvas.width, canvas.height));
}
"""

#: The main Feed's Subscription: its id, frames decoded, and the socket's URL.
PLAYING_JS = """
async () => {
  const c = window.scrubin && window.scrubin.client;
  const sub = c && c.subscriptions.get('room.video');
  if (!sub || !sub.pc) return {url: c ? c.url : null, state: c ? c.state : null};
  const report = await sub.pc.getStats();
  let frames = 0;
  report.forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') frames = r.framesDecoded || 0;
  });
  return {url: c.url, state: c.state, subscription: sub.id, frames};
}
"""


class Viewer:
    """One watch page, and what it was showing when last looked at."""

    def __init__(self, name: str, page: Any) -> None:
        self.name = name
        self.page = page
        self.subscription = ""
        self.counter = -1

    async def look(self) -> tuple[dict[str, Any], int | None]:
        state = await self.page.evaluate(PLAYING_JS)
        counter = await self.page.evaluate(MAIN_COUNTER_JS)
        return state, counter

    async def playing(self, *, new_subscription: bool, timeout_s: float) -> float:
        """Until the page decodes frames whose counter is past the last one
        seen (on a new Subscription, if asked); returns when (monotonic)."""
        deadline = time.monotonic() + timeout_s
        state: dict[str, Any] = {}
        while True:
            state, counter = await self.look()
            fresh = not new_subscription or (state.get("subscription")
                                             not in (None, self.subscription))
            if fresh and state.get("frames", 0) > 0 and counter is not None \
                    and counter > self.counter:
                self.subscription, self.counter = state["subscription"], counter
                return time.monotonic()
            if time.monotonic() >= deadline:
                debug = await self.page.evaluate("""() => { const c = scrubin.client;
                  return {ws: c._ws ? c._ws.readyState : null, url: c.url,
                    unreach: [...c._unreachable.entries()].map(([u, t]) => [u, Date.now() - t]),
                    attempt: c._reconnectAttempt, nodes: c.nodeUrls, home: c.homeUrl,
                    timer: c._reconnectTimer ?? null,
                    log: c.connectionLog.map(([t, what, url]) =>
                      `${new Date(t).toISOString().slice(11, 23)} ${url} ${what}`)}; }""")
                print("DEBUG", self.name, {k: v for k, v in debug.items() if k != "log"})
                print("\n".join(debug["log"]))
            assert time.monotonic() < deadline, (self.name, state, counter, self.counter)
            await asyncio.sleep(0.05)


def ws_url(node: NodeProcess) -> str:
    return node.base_url.replace("http://", "ws://") + "/ws"


async def wait_registry(http: aiohttp.ClientSession, asked: NodeProcess,
                        names: set[str], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        listed = await get_json(http, f"{asked.base_url}/api/admin/nodes")
        if {n["id"] for n in listed["nodes"] if not n.get("draining")} == names:
            return
        assert time.monotonic() < deadline, (names, listed["nodes"])
        await asyncio.sleep(0.1)


async def pages_may_reach(http: aiohttp.ClientSession, started: list[NodeProcess],
                          timeout_s: float = 15.0) -> None:
    """Until a page served by any of ``started`` may open websockets to all of
    them: its Content-Security-Policy lists the Nodes its Node knew of when
    serving it, and a page refused a Node cannot fail over there (seen in CI:
    the three start together and one did not know another yet)."""
    deadline = time.monotonic() + timeout_s
    for node in started:
        while True:
            async with http.get(f"{node.base_url}/watch.html") as response:
                policy = response.headers.get("Content-Security-Policy", "")
            missing = [n.name for n in started if ws_url(n).removesuffix("/ws") not in policy]
            if not missing:
                break
            assert time.monotonic() < deadline, (node.name, missing, policy)
            await asyncio.sleep(0.1)


async def three_nodes(tmp_path: Path, redis: RedisExecutor, started: list[NodeProcess],
                      http: aiohttp.ClientSession, *, edges: bool = False
                      ) -> tuple[list[NodeProcess], NodeProcess, NodeProcess, NodeProcess]:
    """Three `scrubin serve` on one Redis (lease_ttl_s 3, node_ttl_s 2.5): all
    of them, the one holding the Session, and the two others."""
    config = write_config(tmp_path, redis, edges=edges)
    three = [NodeProcess(name, config, unused_port()) for name in ("node-a", "node-b", "node-c")]
    started.extend(three)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in three))
    await pages_may_reach(http, three)
    origin = await the_holder(http, three)
    b, c = (n for n in three if n is not origin)
    return three, origin, b, c


def camera_publisher(origin: NodeProcess, fallbacks: list[str]) -> WhipPublisher:
    """The synthetic room camera, published to ``origin`` (then ``fallbacks``)."""
    return WhipPublisher(
        f"{origin.base_url}/whip/or1-live/room",
        TOKENS.issue("or1-live", Role.EXPERT, name="Room camera"),
        [SyntheticTheatreCamera(640, 360, 15, label="room")],
        WhipOptions(host_addresses=LOOPBACK, fallback_urls=fallbacks))


async def open_watch_pages(browser: Any, homes: tuple[NodeProcess, ...],
                           contexts: list[Any]) -> dict[str, Viewer]:
    """A trainee's watch page opened from each Node of ``homes``, by Node name."""
    from .browser_helpers import open_page

    viewers = {}
    for home in homes:
        token = TOKENS.issue("or1-live", Role.TRAINEE, name=f"Trainee on {home.name}")
        context, page, _ = await open_page(browser, f"{home.base_url}/watch.html#token={token}",
                                           home.name)
        contexts.append(context)
        viewers[home.name] = Viewer(f"page from {home.name}", page)
    return viewers


async def stop_watching(publisher: WhipPublisher, publishing: asyncio.Future[Any],
                        contexts: list[Any]) -> None:
    """Teardown of a failover test: the camera publisher, then the pages."""
    publisher.stop()
    await asyncio.wait_for(publishing, 15)
    for context in contexts:
        await context.close()


async def test_pages_and_the_publisher_survive_nodes_dying_and_draining(
        multinode_redis: RedisExecutor,  # noqa: F811
        processes: list[NodeProcess],  # noqa: F811
        tmp_path: Path, http: aiohttp.ClientSession, browser: Any) -> None:
    three, origin, b, c = await three_nodes(tmp_path, multinode_redis, processes, http)
    publisher = camera_publisher(origin, [b.base_url, c.base_url])
    publishing = asyncio.ensure_future(publisher.run())
    contexts: list[Any] = []
    try:
        viewers = list((await open_watch_pages(browser, (b, c), contexts)).values())
        for viewer in viewers:
            await viewer.playing(new_subscription=True, timeout_s=20)
            assert (await viewer.look())[0]["url"] == ws_url(origin)

        # B dies: the pages opened from it play on (from the origin).
        b.stop(signal.SIGKILL)
        for viewer in viewers:
            before = viewer.subscription
            await viewer.playing(new_subscription=False, timeout_s=5)
            await asyncio.sleep(1.0)
            await viewer.playing(new_subscription=False, timeout_s=5)
            assert viewer.subscription == before

        # The origin dies: the publisher and both pages (the one from B
        # cannot go home) continue on C, without a reload.
        killed = time.monotonic()
        origin.stop(signal.SIGKILL)
        again = [await v.playing(new_subscription=True, timeout_s=30) for v in viewers]
        for viewer in viewers:
            assert (await viewer.look())[0]["url"] == ws_url(c), viewer.name
        assert publisher.url == f"{c.base_url}/whip/or1-live/room"
        print(f"origin killed: pages playing again after "
              f"{', '.join(f'{t - killed:.2f} s' for t in again)} "
              f"(lease_ttl_s 3, node_ttl_s 2.5)")

        # B comes back; C drains: within 3 s the publisher and the pages are
        # on B and the pictures move on.
        await asyncio.to_thread(b.start)
        await wait_registry(http, c, {b.name, c.name})
        assert c.process is not None
        draining = time.monotonic()
        c.process.send_signal(signal.SIGTERM)
        moved = [await v.playing(new_subscription=True, timeout_s=10) for v in viewers]
        delays = [t - draining for t in moved]
        print(f"C drained: pages playing again after {', '.join(f'{d:.2f} s' for d in delays)}")
        assert max(delays) < 3.0, delays
        for viewer in viewers:
            assert (await viewer.look())[0]["url"] == ws_url(b), viewer.name
        assert publisher.url == f"{b.base_url}/whip/or1-live/room"
        # It exits by itself (a second SIGTERM, as c.stop() would send, could
        # land after its loop closed).
        drained = c.process
        assert await asyncio.to_thread(drained.wait, 15) == 0
        assert "drained in" in c.text(), c.text()[-3000:]
        assert "Traceback" not in c.text(), c.text()[-3000:]
    except AssertionError:
        for node in three:  # what the Nodes saw, for a failure in CI
            print(f"--- {node.name} (origin: {node is origin})\n{node.text()[-4000:]}")
        raise
    finally:
        await stop_watching(publisher, publishing, contexts)


async def test_a_draining_node_gives_its_session_up_and_refuses_joins_naming_another(
        nodes: list[Server],  # noqa: F811
        http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    """In one process (tests/test_cluster.py's three Nodes): the holder
    drains; its page is sent to another Node, which takes the Session at once
    (the lease was released, no waiting for it to expire); afterwards, while
    the drained Node still listens, joins there are refused naming that Node."""
    await wait_for(lambda: "" if len(holders(nodes)) == 1 else f"{len(holders(nodes))} hold")
    holder = holders(nodes)[0]
    tokens = holder.app[TOKEN_AUTHORITY]
    trainee = tokens.issue("or1-live", Role.TRAINEE, name="Tom")
    page, welcome = await hello(http, holder, trainee, sockets)
    assert welcome["type"] == "welcome", welcome
    assert {n["id"] for n in welcome["nodes"]} == {"node-a", "node-b", "node-c"}
    assert welcome["nodes"][0]["id"] == holder.config.server.node_id

    await drain(holder.app, grace_s=3.0)
    code, messages = await closed_with(page)
    # 1006: aiohttp's client when the server did not wait for its close reply.
    assert code in (1012, 1006) and messages[-1]["type"] == "going_away", (code, messages)
    successor = messages[-1]["node"]
    others = {s.config.server.node_id: s for s in nodes if s is not holder}
    assert successor["id"] in others and successor["url"] == others[successor["id"]].base_url
    assert not holder.app[REGISTRY].sessions

    # The page reconnects where it was told: the Session is live there now.
    _, welcome = await hello(http, others[successor["id"]], trainee, sockets)
    assert welcome["type"] == "welcome", welcome
    assert welcome["serving"] == successor
    # Once it has read the registry again, it lists the drained Node no more.
    successor_nodes = others[successor["id"]].app[NODES]
    await successor_nodes.refresh()
    assert holder.config.server.node_id not in {n["id"] for n in successor_nodes.serving()}

    # The drained Node still listens (until its runner stops): it sends
    # everyone to the successor.
    expert = tokens.issue("or1-live", Role.EXPERT, name="Camera")
    async with http.post(f"{holder.base_url}/whip/or1-live/room", data="v=0\r\n", headers={
            "Authorization": f"Bearer {expert}", "Content-Type": "application/sdp"}) as response:
        body = await response.json()
        assert response.status == 503, body
        assert body["code"] == "node_draining" and body["fault"] == "server"
        assert body["node"] == successor
    late, message = await hello(http, holder, trainee, sockets)
    assert message == {"type": "going_away", "reason": "this Node is shutting down",
                       "node": successor}
    assert (await closed_with(late))[0] in (1001, 1006)
    listed = {n.node_id: n for n in await holder.app[NODES]._store.list_nodes()}
    assert listed[holder.config.server.node_id].draining


@pytest.fixture
async def two_nodes_one_root(cluster_redis: RedisExecutor,  # noqa: F811
                             tmp_path: Path) -> AsyncIterator[list[Server]]:
    """Two Nodes in one process, one Redis, one recordings root (a shared
    volume, as docs/deployment.md asks of several Nodes)."""
    prefix = f"root-{time.monotonic_ns()}:"
    root = tmp_path / "recordings"
    async with running_nodes([dataclasses.replace(
            config, recording=dataclasses.replace(config.recording, root=str(root)))
            for config in (node_config(cluster_redis, n, prefix)
                           for n in ("node-a", "node-b"))]) as servers:
        yield servers


async def test_a_recording_made_on_one_node_is_listed_and_played_from_another(
        two_nodes_one_root: list[Server], http: aiohttp.ClientSession,
        sockets: list[WS]) -> None:
    nodes_ = two_nodes_one_root
    await wait_for(lambda: "" if len(holders(nodes_)) == 1 else "no single holder")
    holder = holders(nodes_)[0]
    other = next(s for s in nodes_ if s is not holder)
    tokens = holder.tokens
    reviewer = tokens.issue("or1-live", Role.REVIEWER, name="Rita Reviewer")
    # Listed before anything was recorded: the other Node has nothing yet.
    _, before = await api(http, other, "GET", "/api/sessions/or1-live/recordings", reviewer,
                          expect=200)
    assert before["recordings"] == []

    pc, _, _ = await whip_through(http, other, tokens.issue("or1-live", Role.EXPERT), "room")
    try:
        expert, _ = await hello(http, holder, tokens.issue("or1-live", Role.EXPERT,
                                                           name="Dr Grey"), sockets)
        started = await request(expert, {"type": "start_recording", "consent": CONSENT})
        assert started["recording"]["state"] == "on", started
        root = Path(holder.config.recording.root)

        def recorded() -> str:
            parts = [p for p in root.glob("*/room.video*") if p.stat().st_size > 2000]
            return "" if parts else "no picture recorded yet"

        await wait_for(recorded, timeout=15)
        stopped = await request(expert, {"type": "stop_recording"})
        assert stopped["type"] == "ok", stopped
    finally:
        await pc.close()

    # A reviewer who asks the other Node lists it and plays it there.
    await asyncio.sleep(RESCAN_S)  # its last look at the root was just now
    _, listed = await api(http, other, "GET", "/api/sessions/or1-live/recordings", reviewer,
                          expect=200)
    [entry] = listed["recordings"]
    assert entry["session"] == "or1-live"
    _, detail = await api(http, other, "GET", f"/api/recordings/{entry['id']}", reviewer,
                          expect=200)
    assert detail["recording"]["consent"]["recorded_by"] == CONSENT["recorded_by"]
    [feed] = [f for f in detail["recording"]["feeds"] if f["id"] == "room.video"]
    assert feed["parts"] and feed["parts"][0]["frames"] > 0
    async with http.get(f"{other.base_url}{feed['parts'][0]['url']}") as response:
        assert response.status == 200
        assert len(await response.read()) > 2000


async def test_pages_on_an_edge_that_dies_play_on_from_another_node(
        multinode_redis: RedisExecutor,  # noqa: F811
        processes: list[NodeProcess],  # noqa: F811
        tmp_path: Path, http: aiohttp.ClientSession, browser: Any) -> None:
    """Edges on: trainees' pages are served by the Node they opened (B, C),
    each pulling the camera from the origin. B is killed: its page plays again
    from another Node within 5 s, and C's page is not disturbed."""
    three, origin, b, c = await three_nodes(tmp_path, multinode_redis, processes, http,
                                            edges=True)
    publisher = camera_publisher(origin, [])
    publishing = asyncio.ensure_future(publisher.run())
    contexts: list[Any] = []
    try:
        viewers = await open_watch_pages(browser, (b, c), contexts)
        for name, viewer in viewers.items():
            await viewer.playing(new_subscription=True, timeout_s=20)
            home = b if name == b.name else c
            # Served by the edge it opened, not moved to the origin.
            assert (await viewer.look())[0]["url"] == ws_url(home), name
        for viewer in viewers.values():  # and the pictures move on
            await asyncio.sleep(1.0)
            await viewer.playing(new_subscription=False, timeout_s=5)

        # B dies: its page plays again from another Node; C's page is untouched.
        on_c = viewers[c.name].subscription
        killed = time.monotonic()
        b.stop(signal.SIGKILL)
        again = await viewers[b.name].playing(new_subscription=True, timeout_s=15)
        print(f"edge killed: its page playing again after {again - killed:.2f} s")
        assert again - killed < 5.0, again - killed
        assert (await viewers[b.name].look())[0]["url"] in (ws_url(origin), ws_url(c))
        await viewers[c.name].playing(new_subscription=False, timeout_s=5)
        assert viewers[c.name].subscription == on_c
    except AssertionError:
        for node in three:  # what the Nodes saw, for a failure in CI
            print(f"--- {node.name} (origin: {node is origin})\n{node.text()[-4000:]}")
        raise
    finally:
        await stop_watching(publisher, publishing, contexts)


async def test_a_page_fails_over_to_a_node_that_joined_after_it_loaded(
        multinode_redis: RedisExecutor,  # noqa: F811
        processes: list[NodeProcess],  # noqa: F811
        tmp_path: Path, http: aiohttp.ClientSession, browser: Any) -> None:
    """A page's Content-Security-Policy lists the Nodes known when it was
    served. B starts after the page loaded from A; the page learns of B (a
    welcome); A dies. The browser refuses B to this page, so the page loads
    itself from B (token in the fragment) and plays there."""
    config = write_config(tmp_path, multinode_redis)
    a = NodeProcess("node-a", config, unused_port())
    b = NodeProcess("node-b", config, unused_port())
    processes.extend([a, b])
    await asyncio.to_thread(a.start)
    await the_holder(http, [a])
    publisher = camera_publisher(a, [b.base_url])
    publishing = asyncio.ensure_future(publisher.run())
    contexts: list[Any] = []
    try:
        viewer = (await open_watch_pages(browser, (a,), contexts))[a.name]
        await viewer.playing(new_subscription=True, timeout_s=20)
        await asyncio.to_thread(b.start)
        await wait_registry(http, a, {a.name, b.name})
        # A new welcome names B (the page's policy, from before B, does not);
        # A learns of B at its next heartbeat.
        deadline = time.monotonic() + 15
        while len(set(await viewer.page.evaluate("() => scrubin.client.nodeUrls"))) < 2:
            assert time.monotonic() < deadline, await viewer.page.evaluate(
                "() => [scrubin.client.nodeUrls, scrubin.client.connectionLog]")
            await viewer.page.evaluate("() => scrubin.client._ws && scrubin.client._ws.close()")
            await asyncio.sleep(1.0)
        await viewer.playing(new_subscription=False, timeout_s=15)

        killed = time.monotonic()
        a.stop(signal.SIGKILL)
        while not viewer.page.url.startswith(b.base_url):
            assert time.monotonic() - killed < 20, viewer.page.url
            await asyncio.sleep(0.1)
        while True:  # the page is loading there: its script may not be up yet
            try:
                again = await viewer.playing(new_subscription=True, timeout_s=30)
                break
            except Exception as exc:  # navigation: its context destroyed
                if isinstance(exc, AssertionError) or time.monotonic() - killed > 40:
                    raise
                await asyncio.sleep(0.2)
        print(f"A killed: the page reloaded from B and played after {again - killed:.2f} s")
        assert (await viewer.look())[0]["url"] == ws_url(b)
    except Exception:
        for opened in contexts:
            for page in opened.pages:
                print("PAGE", page.url, (await page.content())[:3000])
        for node in (a, b):
            print(f"--- {node.name}\n{node.text()[-4000:]}")
        raise
    finally:
        await stop_watching(publisher, publishing, contexts)


#: Every state the page's client goes through from now on, with when (ms since the epoch).
RECORD_STATES_JS = """() => {
  window.scrubinStates = [];
  window.scrubin.client.addEventListener('state', (e) => window.scrubinStates.push(
    {state: e.detail.state, reason: e.detail.reason, t: Date.now()}));
}"""


async def test_pages_on_an_edge_that_vanishes_play_on_from_another_node(
        multinode_redis: RedisExecutor,  # noqa: F811
        processes: list[NodeProcess],  # noqa: F811
        tmp_path: Path, http: aiohttp.ClientSession, browser: Any) -> None:
    """As the edge test above, but B vanishes without a reset, as when its
    machine leaves the network: SIGSTOP, so the kernel keeps its sockets open
    and nothing answers. Its page notices the silence and plays again from
    another Node; C's page is not disturbed. Before that, B merely stalls for
    1.5 s (a loaded machine): its page stays with it."""
    three, origin, b, c = await three_nodes(tmp_path, multinode_redis, processes, http,
                                            edges=True)
    publisher = camera_publisher(origin, [])
    publishing = asyncio.ensure_future(publisher.run())
    contexts: list[Any] = []
    assert b.process is not None
    frozen = b.process
    try:
        viewers = await open_watch_pages(browser, (b, c), contexts)
        for name, viewer in viewers.items():
            await viewer.playing(new_subscription=True, timeout_s=20)
            home = b if name == b.name else c
            assert (await viewer.look())[0]["url"] == ws_url(home), name
        on_b, on_c = viewers[b.name], viewers[c.name]
        for viewer in viewers.values():
            await viewer.page.evaluate(RECORD_STATES_JS)
            await asyncio.sleep(1.0)
            await viewer.playing(new_subscription=False, timeout_s=5)

        # Slow, not gone: B stops for 1.5 s. Watched past the pages' silence
        # deadline (7 s), its page stays on B and the picture moves on.
        frozen.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)
        frozen.send_signal(signal.SIGCONT)
        before = on_b.subscription
        watched_until = time.monotonic() + 12
        while time.monotonic() < watched_until:
            await asyncio.sleep(1.0)
            await on_b.playing(new_subscription=False, timeout_s=10)
        assert await on_b.page.evaluate("() => window.scrubinStates") == []
        assert (await on_b.look())[0]["url"] == ws_url(b)
        print(f"edge stalled 1.5 s: its page stayed (same Subscription: "
              f"{on_b.subscription == before})")

        # Gone: B stops for good.
        on_c_subscription = on_c.subscription
        frozen.send_signal(signal.SIGSTOP)
        froze, froze_wall = time.monotonic(), time.time()
        again = await on_b.playing(new_subscription=True, timeout_s=20)
        states = await on_b.page.evaluate("() => window.scrubinStates")
        noticed = next(s for s in states if s["state"] == "reconnecting")
        print(f"edge vanished: its page noticed after {noticed['t'] / 1000 - froze_wall:.2f} s "
              f"({noticed['reason']}), playing again from another Node after "
              f"{again - froze:.2f} s")
        assert (await on_b.look())[0]["url"] in (ws_url(origin), ws_url(c))
        await on_c.playing(new_subscription=False, timeout_s=5)
        assert on_c.subscription == on_c_subscription
        assert await on_c.page.evaluate("() => window.scrubinStates") == []
    except AssertionError:
        for node in three:  # what the Nodes saw, for a failure in CI
            print(f"--- {node.name} (origin: {node is origin})\n{node.text()[-4000:]}")
        raise
    finally:
        # Awake again, so that it stops as the others do.
        if frozen.poll() is None:
            frozen.send_signal(signal.SIGCONT)
        await stop_watching(publisher, publishing, contexts)


async def test_a_node_that_accepts_the_socket_but_never_answers_hello_is_left(
        http: aiohttp.ClientSession, browser: Any) -> None:
    """A Node that froze between accepting a page's socket and answering its
    hello (the silence check starts at welcome): the page gives up on it and
    joins another Node. In one process: the Node that answers, and a mute one
    the first lists in `server.node_urls` (so the page's policy allows it)."""
    from aiohttp import web

    from .browser_helpers import open_page
    from .conftest import make_config, start_server

    async def mute(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:  # reads the hello, never answers
            pass
        return ws

    mute_app = web.Application()
    mute_app.router.add_get("/ws", mute)
    mute_runner = web.AppRunner(mute_app)
    await mute_runner.setup()
    mute_port = unused_port()
    await web.TCPSite(mute_runner, "127.0.0.1", mute_port).start()
    mute_url = f"ws://127.0.0.1:{mute_port}/ws"
    server, runner = await start_server(make_config(
        server={"node_urls": [f"http://127.0.0.1:{mute_port}"]}))
    own_url = server.base_url.replace("http://", "ws://") + "/ws"
    try:
        token = server.app[TOKEN_AUTHORITY].issue("or1-live", Role.TRAINEE, name="Trainee")
        context, page, _ = await open_page(browser, f"{server.base_url}/watch.html#token={token}",
                                           "mute")
        try:
            await wait_for_js(page, "() => window.scrubin && scrubin.client.state === 'open'")
            moved = time.monotonic()
            await page.evaluate("""(url) => { const c = scrubin.client;
              c._detachSocket(); c.url = url; c._open(); }""", mute_url)
            await wait_for_js(page, "(url) => scrubin.client._opened && scrubin.client.url === url",
                              mute_url)
            await wait_for_js(page, "(url) => scrubin.client.state === 'open' "
                                    "&& scrubin.client.url === url", own_url, timeout_s=20)
            log = await page.evaluate("() => scrubin.client.connectionLog.map((e) => e[1])")
            print(f"mute Node left after {time.monotonic() - moved:.1f} s: {log[-6:]}")
            assert any(what.startswith("no answer to hello") for what in log), log
        finally:
            await context.close()
    finally:
        await runner.cleanup()
        await mute_runner.cleanup()


async def wait_for_js(page: Any, check: str, arg: Any = None, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await page.evaluate(check, arg):
        assert time.monotonic() < deadline, check
        await asyncio.sleep(0.1)
