"""Edge relay benchmark: what an edge costs its origin, and what a hop adds.

    .venv/bin/python -m bench.relay [--edges 3] [--window 15] [--json PATH]

Real parts: a redis-server of its own and 1 + ``--edges`` Nodes, each
``scrubin serve --workers 1`` in its own process (``[cluster] edges = true``),
one configuration; a pre-encoded 720p30 VP8 ~1.5 Mbit/s stream published to the
Node that holds the Session (``bench.stream``), viewers in this process.

Figures, every one with its baseline from the same run:

* **origin CPU per edge vs per local viewer**: the origin's CPU (its process
  and its worker, psutil) over a fixed window with the publisher only, then
  with ``--edges`` count-only WHEP viewers on the origin itself, then with the
  same number of edges each relaying the Feed to one viewer of its own;
  (window CPU − publisher-only CPU) / count / window, in CPU-s per second;
* **latency added per hop**: stamp-to-decode latency (the publisher's send time
  of a frame to a decoder reading its frame counter, one clock) of a viewer on
  the origin and, at the same time, of a viewer on an edge; medians, and their
  difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import unused_port
from aiortc import RTCSessionDescription

from server.media.hooks import advertise_host_addresses, tap_receiver
from server.roles import Role
from server.tokens import NODE_WIDE, TokenAuthority

from .cluster import KEY, SESSION, Deployment, Node, wait_ready
from .peers import LOOPBACK, Viewer, prefer_vp8, publish
from .stream import PacketReplayTrack, StampBook, encode_stream

TOKENS = TokenAuthority([KEY])
ADMIN = TOKENS.issue(NODE_WIDE, Role.ADMIN, name="bench")
FEED = "room.video"
EDGES_TOML = "\n[cluster]\nedges = true\n"


def cpu_seconds(pid: int) -> float:
    """CPU of a ``scrubin serve`` and its worker(s)."""
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def pid_of(node: Node) -> int:
    assert node.process is not None
    return node.process.pid


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        response.raise_for_status()
        return await response.json()


async def holder_of(http: aiohttp.ClientSession, nodes: list[Node]) -> Node:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node in nodes:
            with contextlib.suppress(aiohttp.ClientError):
                listed = await get_json(http, f"{node.url}/api/admin/nodes")
                if SESSION in listed["holds"]:
                    return node
        await asyncio.sleep(0.2)
    raise RuntimeError("nobody holds the Session")


class WsViewer:
    """A trainee's page, reduced: a websocket and one subscription over it
    (the only way to be served by an edge)."""

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.welcome: dict[str, Any] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:  # also answers the server's pings
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._replies.pop(str(data.get("id")), None)
            if future is not None and not future.done():
                future.set_result(data)

    async def _ask(self, message: dict[str, Any], rid: str) -> dict[str, Any]:
        assert self.ws is not None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        await self.ws.send_json({**message, "id": rid})
        return await asyncio.wait_for(future, 15)

    async def join(self, http: aiohttp.ClientSession, node: Node, token: str) -> None:
        self.ws = await http.ws_connect(f"{node.url}/ws", max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        self.welcome = await self._ask({"type": "hello", "token": token}, "hello")
        if self.welcome.get("type") != "welcome":
            raise RuntimeError(f"refused: {self.welcome}")
        pc = self.viewer._prepare()
        transceiver = pc.addTransceiver("video", direction="recvonly")
        prefer_vp8(transceiver)
        tap_receiver(transceiver.receiver, "video", self.viewer._on_frame)
        advertise_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createOffer())
        reply = await self._ask({"type": "subscribe", "feed": FEED,
                                 "sdp": pc.localDescription.sdp}, "sub")
        if reply.get("type") != "answer":
            raise RuntimeError(f"subscribe refused: {reply}")
        await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))

    async def close(self) -> None:
        await self.viewer.close()
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def window(nodes: dict[str, int], viewers: list[Viewer], seconds: float
                 ) -> dict[str, Any]:
    """CPU cores of each Node process and viewers' frame rates over ``seconds``."""
    cpu0 = {name: cpu_seconds(pid) for name, pid in nodes.items()}
    frames0 = [v.frames for v in viewers]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    cores = {name: (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in nodes.items()}
    fps = [(v.frames - f) / wall for v, f in zip(viewers, frames0, strict=True)]
    return {"cores": cores, "fps_min": min(fps) if fps else None,
            "fps_mean": statistics.fmean(fps) if fps else None, "seconds": wall}


def latencies(viewer: Viewer, since: float) -> list[float]:
    assert viewer.decoder is not None
    return [d.latency for d in viewer.decoder.decoded
            if d.latency is not None and d.decoded_at >= since]


async def run(edges: int, seconds: float) -> dict[str, Any]:
    stream = encode_stream(1280, 720, 30, 1_500_000, seconds=10)
    print(f"stream: {stream.width}x{stream.height} {stream.fps:g} fps VP8, "
          f"{stream.mean_bitrate / 1e6:.2f} Mbit/s", flush=True)
    results: dict[str, Any] = {"edges": edges, "window_s": seconds}
    with tempfile.TemporaryDirectory() as folder:
        deployment = Deployment(Path(folder), unused_port())
        names = ["node-a", *(f"node-{chr(ord('b') + i)}" for i in range(edges))]
        for name in names:
            (Path(folder) / name).mkdir()
        deployment.start(names, extra=EDGES_TOML)
        http = aiohttp.ClientSession()
        publisher = None
        viewers: list[Viewer] = []
        pages: list[WsViewer] = []
        try:
            for node in deployment.nodes:
                await wait_ready(http, node)
            origin = await holder_of(http, deployment.nodes)
            edge_nodes = [n for n in deployment.nodes if n is not origin]
            pids = {n.name: pid_of(n) for n in deployment.nodes}
            print(f"origin {origin.name}; edges {', '.join(n.name for n in edge_nodes)}")
            stamps = StampBook()
            track = PacketReplayTrack(stream, stamps)
            publisher = await publish(http, f"{origin.url}/whip/{SESSION}/room",
                                      TOKENS.issue(SESSION, Role.EXPERT), track)
            whep = f"{origin.url}/whep/{SESSION}/{FEED}"

            async def feed_live() -> bool:
                session = await get_json(http, f"{origin.url}/api/admin/sessions/{SESSION}")
                return any(f["id"] == FEED and f["state"] == "live"
                           for f in session["session"]["feeds"])

            deadline = time.monotonic() + 20
            while not await feed_live():
                if time.monotonic() > deadline:
                    raise RuntimeError("the Feed did not go live")
                await asyncio.sleep(0.2)
            await asyncio.sleep(3)

            def show(name: str, row: dict[str, Any]) -> None:
                fps = "" if row["fps_min"] is None else f", viewers ≥ {row['fps_min']:.1f} fps"
                cores = ", ".join(f"{k} {v:.3f}" for k, v in row["cores"].items())
                print(f"  {name:28} cores: {cores}{fps}", flush=True)

            base = await window(pids, [], seconds)
            show("publisher only", base)

            # N viewers on the origin itself (count-only: no decoding).
            local = [Viewer(f"local{i}") for i in range(edges)]
            for viewer in local:
                await viewer.join(http, whep, TOKENS.issue(SESSION, Role.TRAINEE))
            viewers.extend(local)
            await until(lambda: all(v.frames > 30 for v in local), 20, "local viewers")
            await asyncio.sleep(2)
            with_local = await window(pids, local, seconds)
            show(f"+{edges} viewers on the origin", with_local)
            for viewer in local:
                await viewer.close()
                viewers.remove(viewer)
            await asyncio.sleep(3)

            # N edges, each relaying the Feed to one viewer of its own.
            for i, node in enumerate(edge_nodes):
                page = WsViewer(Viewer(f"edge{i}"))
                await page.join(http, node, TOKENS.issue(SESSION, Role.TRAINEE))
                if page.welcome["serving"]["id"] != node.name:
                    raise RuntimeError(f"placed elsewhere: {page.welcome['serving']}")
                pages.append(page)
            await until(lambda: all(p.viewer.frames > 30 for p in pages), 20, "edge viewers")
            await asyncio.sleep(2)
            with_edges = await window(pids, [p.viewer for p in pages], seconds)
            show(f"+{edges} edges, 1 viewer each", with_edges)
            for page in pages:
                await page.close()
            pages.clear()

            o = origin.name
            per_local = (with_local["cores"][o] - base["cores"][o]) / edges
            per_edge = (with_edges["cores"][o] - base["cores"][o]) / edges
            edge_cost = statistics.fmean(with_edges["cores"][n.name] - base["cores"][n.name]
                                         for n in edge_nodes)
            results["origin_cpu"] = {"publisher_only": base, "local": with_local,
                                     "edges": with_edges, "per_local_viewer": per_local,
                                     "per_edge": per_edge, "edge_node_cost": edge_cost}
            print(f"origin CPU-s per second: per local viewer {per_local:.4f}, per edge "
                  f"{per_edge:.4f} ({per_edge / per_local if per_local > 0 else float('nan'):.2f}"
                  f"× a viewer); an edge relaying to one viewer uses {edge_cost:.3f} cores",
                  flush=True)

            # Latency: a decoding viewer on the origin and one on an edge, together.
            on_origin = Viewer("lat-origin", decode="all", stamps=stamps)
            on_edge = WsViewer(Viewer("lat-edge", decode="all", stamps=stamps))
            await on_origin.join(http, whep, TOKENS.issue(SESSION, Role.TRAINEE))
            viewers.append(on_origin)
            await on_edge.join(http, edge_nodes[0], TOKENS.issue(SESSION, Role.TRAINEE))
            pages.append(on_edge)
            await until(lambda: on_origin.frames > 30 and on_edge.viewer.frames > 30, 20,
                        "latency viewers")
            await asyncio.sleep(2)
            since = time.time()
            lat_row = await window(pids, [on_origin, on_edge.viewer], seconds)
            direct, hop = latencies(on_origin, since), latencies(on_edge.viewer, since)
            p50_origin, p50_edge = statistics.median(direct), statistics.median(hop)
            results["latency"] = {
                "origin_p50_ms": p50_origin * 1000, "edge_p50_ms": p50_edge * 1000,
                "origin_p95_ms": statistics.quantiles(direct, n=20)[18] * 1000,
                "edge_p95_ms": statistics.quantiles(hop, n=20)[18] * 1000,
                "added_p50_ms": (p50_edge - p50_origin) * 1000,
                "samples": [len(direct), len(hop)], "fps_min": lat_row["fps_min"]}
            print(f"stamp→decode median: origin viewer {p50_origin * 1000:.1f} ms, edge viewer "
                  f"{p50_edge * 1000:.1f} ms: added per hop {(p50_edge - p50_origin) * 1000:.1f}"
                  f" ms ({len(direct)}/{len(hop)} frames, ≥ {lat_row['fps_min']:.1f} fps)",
                  flush=True)
            results["machine"] = {"cpus": psutil.cpu_count()}
        finally:
            for page in pages:
                with contextlib.suppress(Exception):
                    await page.close()
            for viewer in viewers:
                with contextlib.suppress(Exception):
                    await viewer.close()
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(publisher.close(), 5)
            await http.close()
            deployment.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args.edges, args.window))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
