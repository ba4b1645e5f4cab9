"""The servers under test, each run in its own process (``multiprocessing`` spawn)
so that its CPU time and RSS can be read from outside.

* ``scrubin_main``: ``server.app.create_app`` with a loopback-only config and one
  Session (theatre ``or1``, slot ``room``), plus a read-only ``/bench/stats``
  route for queue and cache figures.
* ``relay_main``: the baseline, aiortc's ``MediaRelay`` design: the publisher's
  track is decoded once and every viewer gets its own encoder. Same URL shapes
  as ScrubIn's WHIP/WHEP so the same clients drive both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tempfile
import time
import types
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import psutil
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .peers import receive_losses

SESSION = "or1-live"
SLOT = "room"
FEED = "room.video"
LOOPBACK = ["127.0.0.1"]


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.ERROR)


async def _wait_for_stop(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        ready = await loop.run_in_executor(None, conn.poll, 0.5)
        if ready:
            with contextlib.suppress(EOFError):
                conn.recv()
            return
        if os.getppid() == 1:  # orphaned: the benchmark died
            return


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


# -- ScrubIn -----------------------------------------------------------------
def _instrument_first_send() -> None:
    """Note when each viewer's sender takes its first frame (wall clock).

    Bench-only, in the server process: the wrapper records one time, then puts
    the original method on the instance so later frames bypass it.
    """
    from server.subscription import ForwardTrack

    original = ForwardTrack.recv

    async def recv(self: Any) -> Any:
        packet = await original(self)
        self.bench_first_sent = time.time()
        self.recv = types.MethodType(original, self)
        return packet

    ForwardTrack.recv = recv  # type: ignore[method-assign]
    try:  # the fast path (packetized once per Feed), where the server has one
        from server.media.fastpath import FastSender
    except ImportError:
        return
    send_frame = FastSender.send_frame

    def first_send_frame(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = send_frame(self, *args, **kwargs)
        if getattr(self, "_send", None) is not None:
            self.bench_first_sent = time.time()
            self.send_frame = types.MethodType(send_frame, self)
        return result

    FastSender.send_frame = first_send_frame  # type: ignore[method-assign]


def _first_sent(sub: Any) -> float | None:
    fast = getattr(sub, "_fast", None)
    return getattr(sub.track, "bench_first_sent", None) or getattr(fast, "bench_first_sent", None)


def _pending(sub: Any) -> int:
    """Frames waiting for this viewer: the sender path's queue, or the fast path's
    backlog behind a replay (works on the code before the media seam too)."""
    if hasattr(sub.track, "pending"):  # before the media seam
        return int(sub.track.pending) + len(getattr(sub, "_pending", ()))
    return len(getattr(sub, "_queue", ()))


def _between(sub: Any, start: str, end: str) -> float | None:
    begin, finish = getattr(sub, start, None), getattr(sub, end, None)
    return None if begin is None or finish is None else finish - begin


class _ArrivalTap:
    """A downstream of the media seam that only notes when frames arrive."""

    def __init__(self, on_frame: Any) -> None:
        self.on_frame = on_frame

    @property
    def downstream_id(self) -> str:
        return "bench:arrivals"

    def deliver(self, frame: Any) -> None:
        self.on_frame(frame)

    def dropped(self, reason: str) -> None:
        pass


def scrubin_main(conn: Connection, port: int, signing_key: str,
                 media: dict[str, Any] | None = None,
                 slots: tuple[str, ...] = (SLOT,),
                 sections: dict[str, dict[str, Any]] | None = None) -> None:
    """``sections``: more configuration (e.g. ``turn``, ``ice.node_servers``)."""
    _quiet_logs()
    asyncio.run(_scrubin(conn, port, signing_key, media or {}, slots, sections or {}))


async def _scrubin(conn: Connection, port: int, signing_key: str,
                   media: dict[str, Any], slots: tuple[str, ...] = (SLOT,),
                   extra: dict[str, dict[str, Any]] | None = None) -> None:
    from server.app import create_app
    from server.config import ConfigError, load_config
    from server.http.common import REGISTRY
    from server.theatre import Theatre

    sections: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "ice": {"host_addresses": LOOPBACK, "allowed_remote_networks": ["127.0.0.0/8"],
                "servers": []},
        "auth": {"signing_keys": [signing_key]},
    }
    if media:
        sections["media"] = media  # ConfigError if this server has no such setting
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    audit_dir = tempfile.mkdtemp(prefix="scrubin-bench-")
    try:  # keep the benchmark's audit trail out of the working tree
        config = load_config(None, env={}, audit={"path": f"{audit_dir}/audit.jsonl"},
                             **sections)
    except ConfigError:
        try:
            config = load_config(None, env={}, **sections)
        except ConfigError as exc:
            conn.send(("error", f"config refused: {exc}"))
            return
    _instrument_first_send()
    app = create_app(config)
    answers: list[tuple[float, float]] = []

    @web.middleware
    async def answer_time(request: web.Request, handler: Any) -> web.StreamResponse:
        start = time.time()
        try:
            return await handler(request)
        finally:
            if request.method == "POST" and request.path.startswith("/whep/"):
                answers.append((start, time.time()))

    app.middlewares.append(answer_time)
    # Arrival times of the Feed's frames (via its public frame-listener hook).
    arrivals: dict[str, Any] = {"feed": None, "last": None, "max_gap": 0.0, "gaps": 0}

    def on_frame(frame: Any) -> None:
        now = time.monotonic()
        if arrivals["last"] is not None:
            gap = now - arrivals["last"]
            arrivals["max_gap"] = max(arrivals["max_gap"], gap)
            if gap > 0.1:
                arrivals["gaps"] += 1
        arrivals["last"] = now

    async def stats(request: web.Request) -> web.Response:
        session = app[REGISTRY].sessions.get(SESSION)
        feeds: dict[str, Any] = {}
        subs: list[dict[str, Any]] = []
        ingest: dict[str, int] = {"received": 0, "lost": 0}
        if session is not None:
            feed = session.feeds.get(FEED)
            if feed is not None and arrivals["feed"] is not feed:
                arrivals["feed"] = feed
                if hasattr(feed, "add_frame_listener"):  # before the media seam
                    feed.add_frame_listener(on_frame)
                else:
                    feed.attach(_ArrivalTap(on_frame), start="now")
            for ing in list(session.ingests.values()):
                received, lost = receive_losses(ing.pc)
                ingest["received"] += received
                ingest["lost"] += lost
            for feed in session.feeds.values():
                feeds[feed.id] = {
                    "state": feed.state,
                    "frames_received": feed.frames_received,
                    "bytes_received": feed.bytes_received,
                    "keyframe_requests_sent": feed.keyframe_requests_sent,
                    "gop_frames": len(getattr(feed, "_gop", [])),
                    "gop_bytes": getattr(feed, "_gop_bytes", None),
                    "subscriptions": sum(1 for sub in session.subscriptions.values()
                                         if sub.feed_id == feed.id),
                }
            for sub in session.subscriptions.values():
                subs.append({
                    "id": sub.id,
                    "first_sent": _first_sent(sub),
                    "state": sub.state,
                    "pending": _pending(sub),
                    "path": getattr(sub, "path", "sender"),
                    "layer": getattr(sub, "layer", "full"),
                    "loss": getattr(sub, "loss", None),
                    "switches": getattr(sub, "layer_switches", 0),
                    "frames_forwarded": sub.frames_forwarded,
                    "first_frame_after": None if sub.first_frame_at is None
                    else sub.first_frame_at - sub.created_at,
                    # Server side only: its ICE completed -> DTLS up -> first frame sent.
                    "ice_to_first_frame": _between(sub, "ice_connected_at", "first_frame_at"),
                    "ice_to_dtls": _between(sub, "ice_connected_at", "connected_at"),
                    "dtls_to_first_frame": _between(sub, "connected_at", "first_frame_at"),
                })
        out = {"rss": _rss(), "feeds": feeds, "subscriptions": subs,
               "tasks": len(asyncio.all_tasks()), "ingest": ingest,
               "feed_max_gap": arrivals["max_gap"], "feed_gaps_over_100ms": arrivals["gaps"],
               "answers": answers[-64:]}
        # Gaps are per stats call: reset.
        arrivals["max_gap"] = 0.0
        arrivals["gaps"] = 0
        if request.query.get("deep"):
            # Costly (walks the heap): only between measurement windows.
            gc.collect()
            pcs = [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection)]
            out["peer_connections"] = len(pcs)
            out["peer_connections_open"] = sum(1 for pc in pcs if pc.connectionState != "closed")
            names = Counter(getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks())
            out["task_names"] = dict(names.most_common(12))
        return web.json_response(out)

    app.router.add_get("/bench/stats", stats)
    runner = web.AppRunner(app, shutdown_timeout=2, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    registry = app[REGISTRY]
    registry.add_theatre(Theatre("or1", "Theatre 1", tuple(slots)))
    registry.create_session(SESSION, "or1", "Benchmark")
    conn.send(("ready", os.getpid()))
    try:
        await _wait_for_stop(conn)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 20)


# -- MediaRelay baseline -----------------------------------------------------
class _Drain:
    """Keeps reading the relayed source so decoded frames never pile up."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.frames = 0
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames += 1


def relay_main(conn: Connection, port: int) -> None:
    _quiet_logs()
    asyncio.run(_relay(conn, port))


async def _relay(conn: Connection, port: int) -> None:
    from server.media.hooks import advertise_host_addresses

    relay = MediaRelay()
    source: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    pcs: set[RTCPeerConnection] = set()
    drains: list[_Drain] = []
    viewers: list[dict[str, Any]] = []

    async def answer(pc: RTCPeerConnection, offer: str) -> str:
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        advertise_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createAnswer())
        return str(pc.localDescription.sdp)

    async def whip(request: web.Request) -> web.Response:
        offer = await request.text()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not source.done():
                # Decode once: a always-running consumer, as a recorder would be.
                drains.append(_Drain(relay.subscribe(track, buffered=False)))
                source.set_result(track)

        sdp = await answer(pc, offer)
        return web.Response(status=201, text=sdp, content_type="application/sdp",
                            headers={"Location": f"{request.path}/pub"})

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        track = await asyncio.wait_for(asyncio.shield(source), 10)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        # Encode per viewer: aiortc's sender runs a Vp8Encoder on each proxy.
        pc.addTrack(relay.subscribe(track, buffered=False))
        advertise_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createAnswer())
        viewers.append({"created": time.time()})
        return web.Response(status=201, text=str(pc.localDescription.sdp),
                            content_type="application/sdp",
                            headers={"Location": f"{request.path}/{len(viewers)}"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"rss": _rss(), "decoded": sum(d.frames for d in drains),
                                  "tasks": len(asyncio.all_tasks())})

    app = web.Application()
    app.router.add_post("/whip/{session}/{slot}", whip)
    app.router.add_post("/whep/{session}/{feed}", whep)
    app.router.add_get("/bench/stats", stats)
    runner = web.AppRunner(app, shutdown_timeout=2, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    conn.send(("ready", os.getpid()))
    try:
        await _wait_for_stop(conn)
    finally:
        for pc in list(pcs):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 10)
