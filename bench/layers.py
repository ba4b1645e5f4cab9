"""Adaptive-quality benchmark: prints figures, baselines measured in the same run.

    .venv/bin/python -m bench.layers [--quick] [--json PATH]

Processes (all on 127.0.0.1): each server under test alone in its process
(``bench.servers``, ScrubIn's ``create_app``), its CPU read with psutil over
fixed windows; this process publishes pre-encoded streams (720p30 VP8 at
1.5 Mbit/s, and its 320x180 15 fps low layer at 250 kbit/s) and runs the
viewers, which count whole encoded frames (a tapped receiver, no decoding)
and, where decode load is measured, decode in a thread and time it.

Figures:

1. What one trainee receives with four cameras: main view full + three
   thumbnails low, against all four full (the code before layers): kbit/s and
   the CPU it takes to decode them.
2. Frame rate delivered to a viewer behind a 600 kbit/s link (seeded UDP relay
   with 1 % loss, 20 ms delay), with layer selection on and off.
3. Server CPU per camera for a low layer the server makes (decode once, encode
   once per Feed), against the same camera without it.
4. Server CPU-s per viewer-second with 32 viewers of one two-layer camera,
   layer selection on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import psutil
from aiortc import RTCSessionDescription

from server.media.hooks import advertise_host_addresses, tap_receiver
from server.roles import Role
from server.tokens import TokenAuthority

from .live_path import Child, free_port
from .peers import LOOPBACK, _post_sdp, new_pc, prefer_vp8
from .servers import SESSION, scrubin_main
from .stream import EncodedStream, PacketReplayTrack, StampBook, encode_stream

SLOTS = ("room",)


@dataclass
class Plan:
    window: float
    settle: float
    viewers: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(4.0, 2.0, 16) if quick else cls(10.0, 3.0, 32)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class Counter:
    """A viewer's receiver, tapped: whole encoded frames and bytes; optionally
    decoded in a thread so the decode cost can be timed."""

    def __init__(self, decode: bool = False) -> None:
        self.frames = 0
        self.repeats = 0  # a frame seen again (same RTP timestamp): not delivered twice
        self.bytes = 0
        self._recent: collections.deque[int] = collections.deque(maxlen=64)
        self.decode_cpu_s = 0.0
        self._queue: list[bytes] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True) if decode else None
        if self._thread is not None:
            self._thread.start()

    def __call__(self, data: bytes, rtp_timestamp: int) -> None:
        self.bytes += len(data)
        if rtp_timestamp in self._recent:
            self.repeats += 1
            return
        self._recent.append(rtp_timestamp)
        self.frames += 1
        if self._thread is not None:
            self._queue.append(data)
            self._wake.set()

    def _run(self) -> None:
        decoder = av.CodecContext.create("vp8", "r")
        while not self._stop:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._queue:
                data = self._queue.pop(0)
                started = time.thread_time()
                with contextlib.suppress(av.error.FFmpegError):
                    decoder.decode(av.Packet(data))
                self.decode_cpu_s += time.thread_time() - started

    def stop(self) -> None:
        self._stop = True
        self._wake.set()


@dataclass
class Bench:
    plan: Plan
    full: EncodedStream
    low: EncodedStream
    key: str = field(default_factory=lambda: "bench:" + os.urandom(24).hex())
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = TokenAuthority([self.key])
        self.ctx = multiprocessing.get_context("spawn")

    @contextlib.asynccontextmanager
    async def server(self, media: dict[str, Any], slots: tuple[str, ...] = SLOTS) -> Any:
        port = free_port()
        child = Child(self.ctx, scrubin_main, port, self.key, media, slots)
        try:
            yield child, f"http://127.0.0.1:{port}"
        finally:
            child.stop()

    async def publish(self, http: aiohttp.ClientSession, base: str, slot: str,
                      layers: bool) -> Any:
        """One camera, replayed pre-encoded: the full layer and, with ``layers``, the low."""
        pc = new_pc()
        for stream in (self.full, self.low) if layers else (self.full,):
            track = PacketReplayTrack(stream, StampBook())
            transceiver = pc.addTransceiver(track, direction="sendonly")
            prefer_vp8(transceiver)
            transceiver.sender._send_keyframe = track.request_keyframe  # type: ignore
        advertise_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createOffer())
        answer, _ = await _post_sdp(http, f"{base}/whip/{SESSION}/{slot}",
                                    pc.localDescription.sdp,
                                    self.tokens.issue(SESSION, Role.EXPERT, name=slot))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        return pc

    async def ws_viewer(self, http: aiohttp.ClientSession, base: str, feeds: dict[str, str],
                        decode: bool = False) -> tuple[Any, list[Any], dict[str, Counter]]:
        """A trainee's page, without the browser: one websocket, one Subscription
        per Feed, each asking for the layer given (``auto``, ``full``, ``low``)."""
        ws = await http.ws_connect(f"{base}/ws")
        await ws.send_json({"type": "hello", "id": "h",
                            "token": self.tokens.issue(SESSION, Role.TRAINEE)})
        await ws.receive_json(timeout=10)
        pcs, counters = [], {}
        for index, (feed, layer) in enumerate(feeds.items()):
            pc = new_pc()
            pcs.append(pc)
            transceiver = pc.addTransceiver("video", direction="recvonly")
            prefer_vp8(transceiver)
            counters[feed] = Counter(decode)
            tap_receiver(transceiver.receiver, "video", counters[feed])
            advertise_host_addresses(pc, LOOPBACK)
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send_json({"type": "subscribe", "feed": feed, "id": f"s{index}",
                                "sdp": pc.localDescription.sdp})
            while True:
                reply = await ws.receive_json(timeout=10)
                if reply.get("id") == f"s{index}":
                    break
            if reply.get("type") != "answer":
                raise RuntimeError(f"subscribe {feed}: {reply}")
            await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
            if layer != "auto":
                await ws.send_json({"type": "set_layer", "subscription": reply["subscription"],
                                    "layer": layer, "id": f"l{index}"})
        return ws, pcs, counters

    async def window(self, pid: int, counters: dict[str, Counter]) -> dict[str, Any]:
        before = {k: (c.frames, c.bytes, c.decode_cpu_s, c.repeats)
                  for k, c in counters.items()}
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(self.plan.window)
        elapsed = time.monotonic() - t0
        cpu = (cpu_seconds(pid) - cpu0) / elapsed
        per = {k: {"fps": (c.frames - before[k][0]) / elapsed,
                   "kbps": (c.bytes - before[k][1]) * 8 / elapsed / 1000,
                   "decode_cores": (c.decode_cpu_s - before[k][2]) / elapsed,
                   "repeats_per_s": (c.repeats - before[k][3]) / elapsed}
               for k, c in counters.items()}
        return {"server_cores": cpu, "viewers": per,
                "kbps_total": sum(v["kbps"] for v in per.values()),
                "decode_cores_total": sum(v["decode_cores"] for v in per.values())}

    # -- 1. four cameras ---------------------------------------------------------
    async def four_cameras(self) -> None:
        slots = ("room", "endoscope", "overhead", "microscope")
        out: dict[str, Any] = {}
        for name, layers, wants in (
                ("layers: main full, thumbnails low", True,
                 {"room.video": "auto", "endoscope.video": "low", "overhead.video": "low",
                  "microscope.video": "low"}),
                ("one layer: all four full", False, {f"{s}.video": "auto" for s in slots})):
            async with self.server({}, slots) as (child, base), aiohttp.ClientSession() as http:
                pubs = [await self.publish(http, base, s, layers) for s in slots]
                await asyncio.sleep(self.plan.settle)
                ws, pcs, counters = await self.ws_viewer(http, base, wants, decode=True)
                await asyncio.sleep(self.plan.settle * 2)
                out[name] = await self.window(child.pid, counters)
                for c in counters.values():
                    c.stop()
                await ws.close()
                await asyncio.gather(*(pc.close() for pc in pcs + pubs))
            row = out[name]
            print(f"  1. {name}: {row['kbps_total'] / 1000:.2f} Mbit/s to the trainee, decoding "
                  f"{row['decode_cores_total']:.3f} cores ("
                  + ", ".join(f"{k.split('.')[0]} {v['kbps']:.0f} kbit/s {v['fps']:.0f} fps"
                              for k, v in row["viewers"].items()) + ")", flush=True)
        self.results["four_cameras"] = out

    # -- 2. weak link ------------------------------------------------------------
    async def weak_link(self) -> None:
        from tests.netem import Link, UdpRelay, server_candidate

        out: dict[str, Any] = {}
        for name, adaptive in (("layer selection on", True), ("layer selection off", False)):
            async with self.server({"adaptive_layers": adaptive}) as (child, base), \
                    aiohttp.ClientSession() as http:
                pub = await self.publish(http, base, "room", layers=True)
                await asyncio.sleep(self.plan.settle)
                pc = new_pc()
                transceiver = pc.addTransceiver("video", direction="recvonly")
                prefer_vp8(transceiver)
                counter = Counter()
                tap_receiver(transceiver.receiver, "video", counter)
                advertise_host_addresses(pc, LOOPBACK)
                await pc.setLocalDescription(await pc.createOffer())
                answer, _ = await _post_sdp(http, f"{base}/whep/{SESSION}/room.video",
                                            pc.localDescription.sdp,
                                            self.tokens.issue(SESSION, Role.TRAINEE))
                relay = await UdpRelay(server_candidate(answer), Link(
                    rate_bps=600_000, loss=0.01, delay_s=0.02, queue_bytes=30_000,
                    seed=11)).start()
                await pc.setRemoteDescription(RTCSessionDescription(
                    relay.point_answer_here(answer), "answer"))
                await asyncio.sleep(self.plan.settle * 4)  # time to settle on a layer
                row = await self.window(child.pid, {"room.video": counter})
                row["relay"] = vars(relay.stats)
                out[name] = row
                relay.close()
                await asyncio.gather(pc.close(), pub.close())
            v = out[name]["viewers"]["room.video"]
            print(f"  2. 600 kbit/s link, {name}: {v['fps']:.1f} frames/s delivered, "
                  f"{v['kbps']:.0f} kbit/s, {v['repeats_per_s']:.1f} repeated frames/s; relay "
                  f"dropped {out[name]['relay']['dropped_queue']} "
                  "packets at its queue", flush=True)
        self.results["weak_link"] = out

    # -- 3. server-made low layer ------------------------------------------------
    async def server_low_layer(self) -> None:
        out: dict[str, Any] = {}
        for name, make in (("server makes the low layer", True), ("no low layer", False)):
            async with self.server({"server_low_layer": make}) as (child, base), \
                    aiohttp.ClientSession() as http:
                pub = await self.publish(http, base, "room", layers=False)
                await asyncio.sleep(self.plan.settle * 2)
                out[name] = await self.window(child.pid, {})
                await pub.close()
            print(f"  3. {name}: server {out[name]['server_cores']:.3f} cores", flush=True)
        cost = (out["server makes the low layer"]["server_cores"]
                - out["no low layer"]["server_cores"])
        out["cost_cores_per_feed"] = cost
        print(f"  3. a server-made low layer costs {cost:.3f} cores per 720p30 camera", flush=True)
        self.results["server_low_layer"] = out

    # -- 4. selection overhead ---------------------------------------------------
    async def selection_overhead(self) -> None:
        out: dict[str, Any] = {}
        n = self.plan.viewers
        for name, adaptive in (("selection on", True), ("selection off", False)):
            async with self.server({"adaptive_layers": adaptive}) as (child, base), \
                    aiohttp.ClientSession() as http:
                pub = await self.publish(http, base, "room", layers=True)
                await asyncio.sleep(self.plan.settle)
                idle = await self.window(child.pid, {})
                _, pcs, counters = await self.ws_viewer(
                    http, base, {"room.video": "auto"}, decode=False)
                more = [await self.ws_viewer(http, base, {"room.video": "auto"})
                        for _ in range(n - 1)]
                for _ws, p, c in more:
                    pcs += p
                    counters.update({f"room.video#{len(counters)}": x for x in c.values()})
                await asyncio.sleep(self.plan.settle * 2)
                row = await self.window(child.pid, counters)
                row["per_viewer_s"] = (row["server_cores"] - idle["server_cores"]) / n
                out[name] = row
                await asyncio.gather(*(pc.close() for pc in pcs), pub.close())
            fps = [v["fps"] for v in out[name]["viewers"].values()]
            print(f"  4. {n} viewers, {name}: {out[name]['per_viewer_s']:.4f} CPU-s per "
                  f"viewer-second, {statistics.fmean(fps):.1f} fps (min {min(fps):.1f})",
                  flush=True)
        on, off = out["selection on"]["per_viewer_s"], out["selection off"]["per_viewer_s"]
        out["ratio"] = on / off if off else None
        self.results["selection_overhead"] = out

    def report(self) -> str:
        r = self.results
        lines = ["", "== Adaptive quality benchmark ==",
                 f"   {r['env']['date']}, {r['env']['cpus']} CPUs, streams: {r['env']['streams']}"]
        four = r.get("four_cameras", {})
        if four:
            layers = four.get("layers: main full, thumbnails low", {})
            single = four.get("one layer: all four full", {})
            lines.append("1. One trainee, four cameras: Mbit/s received | decode cores")
            for name, row in four.items():
                lines.append(f"   {name:36} {row['kbps_total'] / 1000:6.2f} | "
                             f"{row['decode_cores_total']:.3f}")
            if layers and single:
                mbps = layers["kbps_total"] / 1000
                load = layers["decode_cores_total"] / max(single["decode_cores_total"], 1e-9)
                lines.append(f"   with layers: {mbps:.2f} Mbit/s vs <= 2.5: "
                             f"{'met' if mbps <= 2.5 else 'MISSED'}; decode load {load:.2f}x "
                             "of all-full")
        weak = r.get("weak_link", {})
        for name, row in weak.items():
            v = row["viewers"]["room.video"]
            lines.append(f"2. 600 kbit/s link, {name}: {v['fps']:.1f} frames/s, "
                         f"{v['kbps']:.0f} kbit/s")
        low = r.get("server_low_layer")
        if low:
            lines.append(f"3. Server-made low layer: {low['cost_cores_per_feed']:.3f} cores per "
                         "720p30 camera (decode once + scale + encode 320x180 15 fps)")
        sel = r.get("selection_overhead")
        if sel:
            lines.append(f"4. {self.plan.viewers} viewers: CPU-s/viewer-s with selection on "
                         f"{sel['selection on']['per_viewer_s']:.4f}, off "
                         f"{sel['selection off']['per_viewer_s']:.4f}"
                         + (f" (ratio {sel['ratio']:.2f})" if sel.get("ratio") else ""))
        return "\n".join(lines)


async def run(bench: Bench, only: str | None = None) -> None:
    for phase in (bench.four_cameras, bench.weak_link, bench.server_low_layer,
                  bench.selection_overhead):
        if only and phase.__name__ != only:
            continue
        try:
            await phase()
        except Exception as exc:  # one phase failing must not hide the others' figures
            print(f"  {phase.__name__} failed: {type(exc).__name__}: {exc}", flush=True)
            bench.results.setdefault("errors", []).append(f"{phase.__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--only", choices=["four_cameras", "weak_link", "server_low_layer",
                                           "selection_overhead"], help="run one phase")
    args = parser.parse_args()
    started = time.monotonic()
    full = encode_stream()
    low = encode_stream(320, 180, 15, 250_000)
    bench = Bench(Plan.make(args.quick), full, low)
    bench.results["env"] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "streams": f"full {full.width}x{full.height} {full.fps:.0f} fps "
                   f"{full.mean_bitrate / 1e6:.2f} Mbit/s, low {low.width}x{low.height} "
                   f"{low.fps:.0f} fps {low.mean_bitrate / 1e3:.0f} kbit/s"}
    asyncio.run(run(bench, args.only))
    print(bench.report())
    print(f"(total {time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(bench.results, fh, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
