"""Capacity per worker, and one Session's viewers over 1 vs 2 workers.

    .venv/bin/python -m bench.capacity [--ns 50,100,150,200] [--window 12] [--json PATH]

Real parts: a redis-server of its own; ``scrubin serve --workers W`` (W = 1, then
2) with ``[cluster] edges = true``, one Session; a pre-encoded 720p30 VP8
~1.5 Mbit/s stream published to the worker that holds it (``bench.stream``).

**Cheap viewers** (``--farms`` processes): a trainee's websocket (``hello``,
``subscribe``) and one recvonly aiortc peer connection each. Once DTLS is up
the viewer's SRTP is not decrypted: every SRTP datagram is only counted per
SSRC (header bytes are in the clear), and a frame is a packet with the RTP
marker bit. The farms' CPU is reported too: how much of the machine measuring
took.

Figures:

* **capacity per worker**: for each N, the worker's CPU (cores), its CPU-s per
  viewer-second above the publisher-only baseline, and the viewers' frame rate
  (min, and how many got ≥ 29 fps);
* **scaling**: the same N viewers on 1 worker, then on 2 (each viewer's
  websocket on one worker's own port, alternating: the holder serves half, the
  other worker is an edge relaying the Feed once and serving the other half);
  CPU-s per viewer-second of the whole server (supervisor and workers) above the
  same server's publisher-only baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import unused_port
from aiortc import RTCPeerConnection, RTCSessionDescription

from server.media.hooks import advertise_host_addresses
from server.roles import Role

from .cluster import SESSION, Deployment, Node, wait_ready
from .peers import LOOPBACK, new_pc, prefer_vp8, publish
from .relay import ADMIN, EDGES_TOML, FEED, TOKENS, cpu_seconds, holder_of
from .stream import PacketReplayTrack, StampBook, encode_stream

FPS_OK = 29.0


class CheapViewer:
    """A websocket and a peer connection whose SRTP is counted, never decrypted."""

    def __init__(self) -> None:
        self.packets: dict[int, int] = {}
        self.frames = 0
        self.pc: RTCPeerConnection | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.error = ""

    def _count_only(self) -> None:
        assert self.pc is not None
        for transceiver in self.pc.getTransceivers():
            dtls = transceiver.receiver.transport
            real = dtls._rx_srtp  # bench-only: private aiortc names
            class Clear:
                """SRTP 'unprotect' that leaves the payload encrypted."""

                @staticmethod
                def unprotect(data: bytes) -> bytes:
                    return data

                unprotect_rtcp = real.unprotect_rtcp

            dtls._rx_srtp = Clear()
            dtls._handle_rtp_data = self._count

    async def _count(self, data: bytes, arrival_time_ms: int) -> None:
        ssrc = int.from_bytes(data[8:12], "big")
        self.packets[ssrc] = self.packets.get(ssrc, 0) + 1
        if data[1] & 0x80:
            self.frames += 1

    async def join(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        try:
            self.ws = await http.ws_connect(f"{url}/ws", max_msg_size=0)
            replies: dict[str, asyncio.Future[dict[str, Any]]] = {
                k: asyncio.get_running_loop().create_future() for k in ("hello", "sub")}

            async def read() -> None:
                assert self.ws is not None
                async for msg in self.ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        future = replies.get(str(data.get("id")))
                        if future is not None and not future.done():
                            future.set_result(data)

            self.reader = asyncio.ensure_future(read())
            await self.ws.send_json({"type": "hello", "token": token, "id": "hello"})
            welcome = await asyncio.wait_for(replies["hello"], 20)
            if welcome.get("type") != "welcome":
                raise RuntimeError(str(welcome)[:200])
            pc = self.pc = new_pc()
            prefer_vp8(pc.addTransceiver("video", direction="recvonly"))
            advertise_host_addresses(pc, LOOPBACK)

            @pc.on("connectionstatechange")
            def _state() -> None:
                if pc.connectionState == "connected":
                    self._count_only()

            await pc.setLocalDescription(await pc.createOffer())
            await self.ws.send_json({"type": "subscribe", "feed": FEED, "id": "sub",
                                     "sdp": pc.localDescription.sdp})
            answer = await asyncio.wait_for(replies["sub"], 20)
            if answer.get("type") != "answer":
                raise RuntimeError(str(answer)[:200])
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]

    async def close(self) -> None:
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 5)
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


def farm_main(conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_farm(conn))


async def _farm(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    viewers: list[CheapViewer] = []
    async with aiohttp.ClientSession() as http:
        conn.send(("ready", os.getpid()))
        while True:
            if not await loop.run_in_executor(None, conn.poll, 0.5):
                if os.getppid() == 1:
                    break
                continue
            cmd, args = conn.recv()
            if cmd == "join":
                new = [CheapViewer() for _ in args]
                for viewer, (url, token) in zip(new, args, strict=True):
                    await viewer.join(http, url, token)
                viewers.extend(new)
                conn.send([v.error for v in new])
            elif cmd == "frames":
                conn.send([v.frames for v in viewers])
            elif cmd == "close":
                await asyncio.gather(*(v.close() for v in viewers))
                viewers.clear()
                conn.send("ok")
            elif cmd == "stop":
                break


class Farm:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=farm_main, args=(child,), daemon=True)
        self.process.start()
        _, self.pid = self.conn.recv()

    async def call(self, cmd: str, args: Any = None, timeout: float = 300) -> Any:
        def roundtrip() -> Any:
            self.conn.send((cmd, args))
            if not self.conn.poll(timeout):
                raise TimeoutError(cmd)
            return self.conn.recv()
        return await asyncio.to_thread(roundtrip)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop", None))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def farm_cpu(farms: list[Farm]) -> float:
    return sum(psutil.Process(f.pid).cpu_times().user + psutil.Process(f.pid).cpu_times().system
               for f in farms)


def worker_nodes(node: Node, workers: int) -> list[Node]:
    """One worker is the Node itself; with more, each has its own port."""
    if workers == 1:
        return [node]
    return [Node(f"w{i}", node.port + 1 + i) for i in range(workers)]


async def measure(farms: list[Farm], pid: int, seconds: float) -> dict[str, Any]:
    async def frames() -> tuple[list[list[int]], float]:
        """Every viewer's frame count, and when (the middle of asking the farms)."""
        asked = time.monotonic()
        counts = list(await asyncio.gather(*(f.call("frames") for f in farms)))
        return counts, (asked + time.monotonic()) / 2

    frames0, at0 = await frames()
    cpu0, farm0, t0 = cpu_seconds(pid), farm_cpu(farms), time.monotonic()
    machine0 = psutil.cpu_times()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    cpu1, farm1 = cpu_seconds(pid), farm_cpu(farms)
    machine1 = psutil.cpu_times()
    frames1, at1 = await frames()
    fps = [(b - a) / (at1 - at0) for before, after in zip(frames0, frames1, strict=True)
           for a, b in zip(before, after, strict=False)]
    busy = sum(getattr(machine1, k) - getattr(machine0, k)
               for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    return {"server_cores": (cpu1 - cpu0) / wall, "farm_cores": (farm1 - farm0) / wall,
            "machine_cores": busy / wall, "fps_min": min(fps) if fps else None,
            "fps_mean": statistics.fmean(fps) if fps else None,
            "ok": sum(1 for f in fps if f >= FPS_OK), "n": len(fps)}


async def run_workers(workers: int, ns: list[int], seconds: float, farms_n: int,
                      stream: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        deployment = Deployment(Path(folder), unused_port())
        deployment.start(["node-a"], extra=EDGES_TOML + "placement_margin = 100000\n",
                         workers=workers)
        node = deployment.nodes[0]
        assert node.process is not None
        http = aiohttp.ClientSession()
        farms: list[Farm] = []
        publisher = None
        try:
            await wait_ready(http, node)
            workers_up = worker_nodes(node, workers)
            urls = [w.url for w in workers_up]
            for worker in workers_up:
                await wait_ready(http, worker)
            holder = await holder_of(http, workers_up)
            track = PacketReplayTrack(stream, StampBook())
            publisher = await publish(http, f"{holder.url}/whip/{SESSION}/room",
                                      TOKENS.issue(SESSION, Role.EXPERT), track)
            await asyncio.sleep(4)
            farms = [Farm() for _ in range(farms_n)]
            base = await measure(farms, node.process.pid, seconds)
            base["viewers"] = 0
            rows.append(base)
            print(f"  {workers} worker(s), publisher only: server {base['server_cores']:.3f} "
                  f"cores", flush=True)
            joined = 0
            for n in ns:
                todo = n - joined
                jobs: list[list[tuple[str, str]]] = [[] for _ in farms]
                for k in range(todo):
                    url = urls[(joined + k) % len(urls)]
                    jobs[k % len(farms)].append((url, TOKENS.issue(SESSION, Role.TRAINEE)))
                errors = await asyncio.gather(*(f.call("join", job) for f, job in
                                                zip(farms, jobs, strict=True)))
                failed = [e for batch in errors for e in batch if e]
                if failed:
                    print(f"  {len(failed)} joins failed, e.g. {failed[0]}", flush=True)
                joined = n
                await asyncio.sleep(4)
                row = await measure(farms, node.process.pid, seconds)
                row["viewers"] = n
                row["cpu_per_viewer_s"] = (row["server_cores"] - base["server_cores"]) / n
                rows.append(row)
                print(f"  {workers} worker(s), N={n:<4} server {row['server_cores']:.3f} cores, "
                      f"{row['cpu_per_viewer_s']:.4f} CPU-s per viewer-s; viewers "
                      f"{row['ok']}/{row['n']} ≥ {FPS_OK:g} fps (min {row['fps_min'] or 0:.1f}); "
                      f"farms {row['farm_cores']:.2f} cores, machine {row['machine_cores']:.2f}"
                      f" of {psutil.cpu_count()}", flush=True)
                if row["fps_min"] is not None and row["ok"] < 0.95 * n:
                    print("  below 29 fps for over 5 % of viewers: not going further")
                    break
            loads = (await (await http.get(f"{urls[0]}/api/admin/nodes", headers={
                "Authorization": f"Bearer {ADMIN}"})).json())["nodes"]
            rows[-1]["subscriptions"] = {n["id"]: n["load"].get("subscriptions")
                                         for n in loads}
        finally:
            for farm in farms:
                with contextlib.suppress(Exception):
                    await farm.call("close", timeout=60)
                farm.stop()
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(publisher.close(), 5)
            await http.close()
            deployment.stop()
    return rows


async def run(ns: list[int], scale_n: int, seconds: float, farms_n: int) -> dict[str, Any]:
    stream = encode_stream(1280, 720, 30, 1_500_000, seconds=10)
    print(f"stream: {stream.width}x{stream.height} {stream.fps:g} fps VP8, "
          f"{stream.mean_bitrate / 1e6:.2f} Mbit/s; machine {psutil.cpu_count()} CPUs",
          flush=True)
    capacity = await run_workers(1, ns, seconds, farms_n, stream)
    two = await run_workers(2, [scale_n], seconds, farms_n, stream)
    one = next((r for r in capacity if r["viewers"] == scale_n), None)
    result: dict[str, Any] = {"capacity_1_worker": capacity, "two_workers": two}
    if one is not None and len(two) > 1:
        ratio = two[1]["cpu_per_viewer_s"] / one["cpu_per_viewer_s"]
        result["scaling_ratio"] = ratio
        print(f"scaling, N={scale_n}: 1 worker {one['cpu_per_viewer_s']:.4f}, 2 workers "
              f"{two[1]['cpu_per_viewer_s']:.4f} CPU-s per viewer-s ({ratio:.2f}×)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="50,100,150,200")
    parser.add_argument("--scale-n", type=int, default=100)
    parser.add_argument("--window", type=float, default=12.0)
    parser.add_argument("--farms", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    result = asyncio.run(run(ns, args.scale_n, args.window, args.farms))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
