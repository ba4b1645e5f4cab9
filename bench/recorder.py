"""Recorder benchmark: CPU per recorded Feed and bytes written vs received.

    .venv/bin/python -m bench.recorder [--feeds 4] [--seconds 10] [--json PATH]

A pre-encoded 720p30 VP8 stream (``bench.stream``, ~1.5 Mbit/s) is fed in real
time to ``--feeds`` Feed stand-ins, each recorded by a :class:`recorder.Recording`,
all in this process. The recorder's cost is the CPU time of its threads (one
writer per Feed, the recording's I/O thread; read with psutil) plus the CPU
time its frame listener takes on the event loop, over the steady state (closing
the parts, i.e. trailers and sha256, is reported separately).

Figures:

* recorder CPU-seconds per recorded Feed-second (target <= 0.01), with the
  default fsync every second and without fsync;
* event-loop time per frame spent in the recorder's frame listener (CPU, and
  wall time, which includes waiting for the GIL held by a writer thread);
* bytes written (part files) / bytes received (encoded frames);
* throughput of one writer thread with frames pushed as fast as the queue
  takes them (frames/s, CPU per frame).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import av
import psutil

from recorder import Recording, SessionInfo, WriterOptions
from server.media.plane import Downstream, DropReason, EncodedFrame, Start

from .stream import EncodedStream, encode_stream

TARGET_CPU = 0.01  # CPU-s per recorded Feed-second at 720p30
TIME_BASE = fractions.Fraction(1, 90_000)


class BenchFeed:
    """What the recorder sees of a Feed (the media seam's upstream); times its deliveries."""

    def __init__(self, feed_id: str) -> None:
        self.id = feed_id
        self.kind = "video"
        self.mime_type = "video/VP8"
        self.clock_rate = 90_000
        self.downstreams: list[Downstream] = []
        self.listener_s = 0.0
        self.listener_cpu_s = 0.0

    def attach(self, downstream: Downstream, *, start: Start) -> None:
        self.downstreams.append(downstream)

    def detach(self, downstream: Downstream, reason: DropReason = "closed") -> None:
        if downstream in self.downstreams:
            self.downstreams.remove(downstream)

    def pause(self, downstream: Downstream) -> None:
        pass

    def resume(self, downstream: Downstream) -> None:
        pass

    def request_keyframe(self, requester: str) -> bool:
        return True  # the replay restarts at its key frame every pass anyway

    def emit(self, data: bytes, pts: int, keyframe: bool) -> None:
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = TIME_BASE
        frame = EncodedFrame(data=data, pts=pts, keyframe=keyframe,
                             received_at=time.monotonic(), packet=packet)
        started, cpu = time.perf_counter(), time.thread_time()
        for downstream in self.downstreams:
            downstream.deliver(frame)
        self.listener_cpu_s += time.thread_time() - cpu
        self.listener_s += time.perf_counter() - started


def recorder_threads_cpu() -> float:
    """CPU seconds used so far by the recorder's threads (writers, I/O)."""
    ids = {t.native_id for t in threading.enumerate()
           if t.name.startswith(("recorder-", "recording-io"))}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads()
               if t.id in ids)


async def paced(stream: EncodedStream, feeds: list[BenchFeed], seconds: float) -> None:
    """Emit ``stream`` on every Feed in real time."""
    count = int(seconds * stream.fps)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(count):
        due = t0 + i / stream.fps
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        index = i % len(stream.frames)
        data = stream.frames[index]
        for feed in feeds:
            feed.emit(data, i * 3000, index == 0)


async def recorded_run(stream: EncodedStream, n: int, seconds: float, root: str,
                       options: WriterOptions) -> dict[str, Any]:
    feeds = [BenchFeed(f"cam{i}.video") for i in range(n)]
    recording = Recording(root, SessionInfo("bench", "or1", "bench", "bench"), {},
                          options=options)
    await recording.start()
    for feed in feeds:
        recording.attach(feed)
    threads0, process0 = recorder_threads_cpu(), time.process_time()
    await paced(stream, feeds, seconds)
    threads = recorder_threads_cpu() - threads0
    process = time.process_time() - process0
    stop0 = time.process_time()
    manifest = await recording.stop()
    stop_cpu = time.process_time() - stop0  # closing parts: trailer, sha256
    stats = [f["stats"] for f in manifest["feeds"]]
    frames = sum(s["frames_in"] for s in stats)
    listener_cpu = sum(f.listener_cpu_s for f in feeds)
    return {
        "cpu_s": threads + listener_cpu,
        "threads_cpu_s": threads,
        "process_cpu_s": process,
        "stop_cpu_s": stop_cpu,
        "listener_cpu_s_per_frame": listener_cpu / max(1, frames),
        "listener_s_per_frame": sum(f.listener_s for f in feeds) / max(1, frames),
        "bytes_in": sum(s["bytes_in"] for s in stats),
        "file_bytes": sum(s["file_bytes"] for s in stats),
        "frames_in": frames,
        "frames_written": sum(s["frames_written"] for s in stats),
        "dropped": sum(s["dropped_queue_full"] for s in stats),
        "parts": sum(len(f["parts"]) for f in manifest["feeds"]),
    }


async def throughput(stream: EncodedStream, frames: int, root: str) -> dict[str, float]:
    """One writer, frames pushed as fast as its queue takes them."""
    feed = BenchFeed("fast.video")
    # Frames pushed faster than real time look (by their timestamps) as if made
    # long before they arrived: a consent an hour earlier keeps them all.
    recording = Recording(root, SessionInfo("bench", "or1", "bench", "bench"), {},
                          options=WriterOptions(queue_frames=10_000, fsync_s=0),
                          consent_t=-3600.0)
    await recording.start()
    writer = recording.attach(feed)
    assert writer is not None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(frames):
        index = i % len(stream.frames)
        feed.emit(stream.frames[index], i * 3000, index == 0)
    await recording.stop()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"frames_per_s": frames / wall, "cpu_ms_per_frame": cpu / frames * 1000}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stream = encode_stream(1280, 720, 30, 1_500_000, seconds=10.0)
    root = tempfile.mkdtemp(prefix="scrubin-bench-recorder-")
    try:
        feed_seconds = args.feeds * args.seconds
        synced = await recorded_run(stream, args.feeds, args.seconds, root, WriterOptions())
        unsynced = await recorded_run(stream, args.feeds, args.seconds, root,
                                      WriterOptions(fsync_s=0))
        fast = await throughput(stream, 900, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "stream": {"width": stream.width, "height": stream.height, "fps": stream.fps,
                   "kbit_s": round(stream.mean_bitrate / 1000)},
        "feeds": args.feeds,
        "seconds": args.seconds,
        "cpu_per_feed_second": round(synced["cpu_s"] / feed_seconds, 5),
        "cpu_per_feed_second_no_fsync": round(unsynced["cpu_s"] / feed_seconds, 5),
        "process_cpu_per_feed_second": round(synced["process_cpu_s"] / feed_seconds, 5),
        "stop_cpu_s_per_feed": round(synced["stop_cpu_s"] / args.feeds, 4),
        "listener_us_per_frame": round(synced["listener_cpu_s_per_frame"] * 1e6, 1),
        "listener_wall_us_per_frame": round(synced["listener_s_per_frame"] * 1e6, 1),
        "bytes_written_over_received": round(synced["file_bytes"] / synced["bytes_in"], 4),
        "frames": {k: synced[k] for k in ("frames_in", "frames_written", "dropped", "parts")},
        "one_writer_unpaced": {k: round(v, 3) for k, v in fast.items()},
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feeds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    cpu = figures["cpu_per_feed_second"]
    print(f"recorder, {figures['feeds']} Feeds of {figures['stream']['width']}x"
          f"{figures['stream']['height']}@{figures['stream']['fps']:g} VP8 "
          f"~{figures['stream']['kbit_s']} kbit/s, {figures['seconds']:g} s")
    print(f"  CPU per recorded Feed-second   {cpu:.4f}  (target <= {TARGET_CPU}; "
          f"{'met' if cpu <= TARGET_CPU else 'MISSED'})")
    print(f"  ... without fsync              {figures['cpu_per_feed_second_no_fsync']:.4f}")
    print(f"  (whole process, feeding incl.) {figures['process_cpu_per_feed_second']:.4f}")
    print(f"  closing a part (trailer, sha)  {figures['stop_cpu_s_per_feed']} CPU-s")
    print(f"  event loop per frame (listener) {figures['listener_us_per_frame']} us CPU, "
          f"{figures['listener_wall_us_per_frame']} us wall")
    print(f"  bytes written / received       {figures['bytes_written_over_received']}")
    print(f"  frames                         {figures['frames']}")
    print(f"  one writer, unpaced            {figures['one_writer_unpaced']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
