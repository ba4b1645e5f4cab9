"""Live-path benchmark: prints figures, with baselines measured in the same run.

    .venv/bin/python -m bench.live_path [--quick] [--json PATH] [--profile PREFIX]
        [--joiner-processes K] [--only joins]

``--quick`` takes under 2 minutes, the full run under 5 (budget 10). The server
code measured is whatever ``server`` imports from the current directory; to
measure a fixed revision while others edit the tree, run it from a snapshot
(``git archive HEAD server recorder | tar -x -C DIR``, copy ``bench/``, put the
revision in ``DIR/REVISION`` and run from ``DIR``). The header prints which.

Processes (all on 127.0.0.1):

* server under test, alone in its process (``bench.servers``): ScrubIn's
  ``create_app`` with one Session, later aiortc's ``MediaRelay`` design;
  its CPU time and RSS are read with psutil over fixed windows;
* this process: the publisher (a pre-encoded 720p30 VP8 stream replayed as
  ``av.Packet``s, see ``bench.stream``), one latency viewer that decodes every
  frame and reads the frame counter, the direct (no server) baseline, and the
  join tests' viewers (they decode until their first frame);
* a viewer farm (``bench.farm``): count-only viewers that make up the rest of N;
* ``--joiner-processes`` more farm processes (default 4), idle until the
  simultaneous burst is run again with its joiners spread over them (each
  decodes until its first frame, all starting at one wall-clock moment), as
  separate browsers would decode; the in-process burst is its baseline.

Figures:

* server CPU-seconds per viewer-second for N viewers of one Feed, ScrubIn vs
  MediaRelay (decode once, encode per viewer), and their ratio;
* stamp-to-decode latency (publisher's send time of a frame to the viewer's
  decode of it) through the server vs a direct publisher→viewer connection;
* time from join and from ICE connected to the first decoded frame, for single,
  simultaneous (decoding in this process, and spread over worker processes) and
  staggered joins, with the cores each process used until all had decoded;
* server RSS per viewer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiortc
import av
import numpy as np
import psutil

from server.roles import Role
from server.tokens import TokenAuthority

from .farm import FIRST_FRAME_TIMEOUT, farm_main
from .peers import Viewer, publish, publish_direct
from .servers import FEED, SESSION, SLOT, relay_main, scrubin_main
from .stream import EncodedStream, PacketReplayTrack, StampBook, encode_stream

# Targets from the product issue and reference figures measured on this kind of machine.
TARGET_CPU = 0.004          # CPU-s per viewer-second at 720p30
TARGET_FIRST_FRAME = 0.150  # s, p95 after ICE connects, 32 joins
TARGET_ADDED_1 = 0.005      # s, median server-added latency, 1 viewer
TARGET_ADDED_32 = 0.015     # s, median server-added latency, 32 viewers
TARGET_RSS = 1.0            # MB per viewer
REFERENCE_CPU = {"Janus 1.1.2 streaming": 0.0074, "aiortc pass-through": 0.012,
                 "MediaRelay": "0.18-0.44"}

FPS = 30.0
LIVE_THRESHOLD = 0.1  # a frame arriving < 100 ms after it was sent is "live"


@dataclass
class Plan:
    quick: bool
    stream_seconds: float
    window: float
    settle: float
    ns: list[int]
    relay_ns: list[int]
    relay_window: float
    latency_window: float
    single_joins: int
    burst_joins: int
    staggered_joins: int
    stagger_interval: float
    budget: float
    sender_ns: list[int]
    #: Worker processes the spread simultaneous burst decodes in (0: no spread burst).
    joiner_processes: int = 4
    #: "joins": only the server's share and the join scenarios (no sweep, no baselines).
    only: str | None = None
    #: During the join scenarios, the server and the clients on separate CPUs.
    pin: bool = False

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(quick, 10.0, 4.0, 2.0, [0, 1, 8, 32], [1, 2], 4.0, 5.0,
                       3, 32, 16, 0.2, 135.0, [0, 32])
        return cls(quick, 10.0, 12.0, 3.0, [0, 1, 2, 4, 8, 16, 32], [1, 2, 4, 8], 10.0, 12.0,
                   6, 32, 32, 0.25, 590.0, [0, 1, 8, 32])


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value * 1000:.{digits}f}"


def code_version() -> str:
    """Where the measured server code comes from (others may be editing it)."""
    import subprocess

    import server

    where = os.path.dirname(os.path.dirname(os.path.abspath(server.__file__)))
    marker = os.path.join(where, "REVISION")  # a `git archive` snapshot made to benchmark
    if os.path.exists(marker):
        with open(marker) as fh:
            return f"{where}, snapshot of {fh.read().strip()}"
    try:
        rev = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "server"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{where} at {rev}" + (" with uncommitted changes in server/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"{where} (not a git checkout)"


def snapshot(revision: str) -> tempfile.TemporaryDirectory[str]:
    """``server/`` and what it reads, as of ``revision``, in a temporary directory."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = tempfile.TemporaryDirectory(prefix="scrubin-baseline-")
    archive = subprocess.run(["git", "-C", repo, "archive", revision, "server", "recorder",
                              "docs", "client_web"], capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", target.name], input=archive.stdout, check=True,
                   timeout=60)
    with open(os.path.join(target.name, "REVISION"), "w") as fh:
        fh.write(revision)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def machine_busy() -> float:
    """CPU-seconds all processes on the machine have used (for the external load)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
                 + getattr(t, "steal", 0))


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Child:
    """A spawned process driven over a Pipe; ended by its pid only."""

    def __init__(self, ctx: Any, target: Any, *args: Any, code: str | None = None) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        # A spawned child starts with the parent's sys.path: with ``code`` first,
        # it imports ``server`` from that snapshot (an older revision).
        if code is not None:
            sys.path.insert(0, code)
        try:
            self.proc.start()
        finally:
            if code is not None:
                sys.path.remove(code)
        if not self.conn.poll(60):
            self.kill()
            raise RuntimeError(f"{target.__name__} did not start")
        tag, self.pid = self.conn.recv()
        if tag != "ready":
            self.proc.join(5)
            raise RuntimeError(f"{target.__name__}: {self.pid}")

    async def call(self, cmd: str, args: Any = None, timeout: float = 60) -> Any:
        loop = asyncio.get_running_loop()

        def roundtrip() -> Any:
            self.conn.send((cmd, args))
            if not self.conn.poll(timeout):
                raise TimeoutError(f"no answer to {cmd}")
            return self.conn.recv()

        return await loop.run_in_executor(None, roundtrip)

    def stop(self, message: Any = "stop", timeout: float = 30) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(message)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


class JoinGroup:
    """The joiners of one join scenario, decoding in this process."""

    def __init__(self, viewers: list[Viewer]) -> None:
        self.viewers = viewers
        #: The processes the joiners decode in, when not this one (their CPU is theirs).
        self.pids: list[int] = []

    async def until_decoded(self) -> None:
        end = time.monotonic() + FIRST_FRAME_TIMEOUT
        while any(v.awaiting_first() for v in self.viewers) and (  # noqa: ASYNC110 - bounded
                time.monotonic() < end):
            await asyncio.sleep(0.05)

    async def refresh(self) -> list[Viewer]:
        """The viewers with their latest arrivals."""
        return self.viewers

    async def close(self) -> None:
        await asyncio.gather(*(v.close() for v in self.viewers))


class SpreadJoinGroup(JoinGroup):
    """Decoding joiners spread round-robin over worker processes (``bench.farm``),
    so that, as in separate browsers, no joiner's decode waits for another's.
    Their figures come back as reports and are rebuilt into :class:`Viewer` s here."""

    def __init__(self, workers: list[Child], stamps: StampBook) -> None:
        super().__init__([])
        self.workers = workers
        self.pids = [w.pid for w in workers]
        self.stamps = stamps
        self.calls: list[asyncio.Future[Any]] = []

    def start(self, url: str, tokens: list[str], start_at: float) -> None:
        """Every worker starts its share of the joins at ``start_at`` (wall clock)."""
        options = {"decode": "first", "start_at": start_at}
        k = len(self.workers)
        timeout = start_at - time.time() + FIRST_FRAME_TIMEOUT + 30
        self.calls = [asyncio.ensure_future(w.call("join", (url, tokens[i::k], None, options),
                                                   timeout=timeout))
                      for i, w in enumerate(self.workers)]

    def rebuild(self, reports: list[list[dict[str, Any]]]) -> list[Viewer]:
        self.viewers = [Viewer.from_report(r, self.stamps) for share in reports for r in share]
        return self.viewers

    async def until_decoded(self) -> None:
        # Each worker answers once all its joiners decoded (or FIRST_FRAME_TIMEOUT).
        self.rebuild(list(await asyncio.gather(*self.calls)))

    async def refresh(self) -> list[Viewer]:
        return self.rebuild(list(await asyncio.gather(*(w.call("reports")
                                                        for w in self.workers))))

    async def close(self) -> None:
        # A worker answers one call at a time: let the join calls end (they are bounded).
        await asyncio.gather(*self.calls, return_exceptions=True)
        await asyncio.gather(*(w.call("close") for w in self.workers))


class Bench:
    def __init__(self, plan: Plan, stream: EncodedStream, profile: str | None = None) -> None:
        self.plan = plan
        self.profile = profile
        self.stream = stream
        self.ctx = multiprocessing.get_context("spawn")
        self.key = f"bench:{secrets.token_urlsafe(32)}"
        self.tokens = TokenAuthority([self.key])
        self.deadline = time.monotonic() + plan.budget
        self.results: dict[str, Any] = {"notes": []}
        self.farm: Child | None = None
        #: Worker processes for the spread burst, started before any stream runs
        #: (spawning one blocks this loop for seconds and loads the machine).
        self.joiners: list[Child] = []
        self.me = os.getpid()
        #: A snapshot of an older revision to measure in the same run (--baseline).
        self.baseline: str | None = None

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- helpers ---------------------------------------------------------
    async def wait(self, check: Any, timeout: float, interval: float = 0.05) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return True
            await asyncio.sleep(interval)
        return bool(check())

    async def stats(self, http: aiohttp.ClientSession, base: str,
                    deep: bool = False) -> dict[str, Any]:
        async with http.get(f"{base}/bench/stats{'?deep=1' if deep else ''}",
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            return dict(await response.json())

    async def farm_join(self, url: str, count: int) -> list[dict[str, Any]]:
        assert self.farm is not None
        if count <= 0:
            return []
        tokens = [self.tokens.issue(SESSION, Role.TRAINEE) for _ in range(count)]
        result: list[dict[str, Any]] = await self.farm.call("join", (url, tokens), timeout=60)
        errors = [r["error"] for r in result if r["error"]]
        missing = sum(1 for r in result if r["t_first_frame"] is None and not r["error"])
        if errors:
            self.note(f"{len(errors)} farm joins failed: {errors[0]}")
        if missing:
            self.note(f"{missing} farm viewers got no frame within 10 s")
        return result

    async def window(self, server_pid: int, latency_viewer: Viewer | None,
                     farm_n: int, seconds: float) -> dict[str, Any]:
        """CPU, frame counts and latency over ``seconds`` with N viewers steady."""
        assert self.farm is not None
        farm0 = await self.farm.call("counts") if farm_n else []
        lv0 = (latency_viewer.frames, latency_viewer.bytes) if latency_viewer else (0, 0)
        c0 = (cpu_seconds(server_pid), cpu_seconds(self.me), cpu_seconds(self.farm.pid),
              machine_busy())
        t0 = time.monotonic()
        w0 = time.time()
        await asyncio.sleep(seconds)
        c1 = (cpu_seconds(server_pid), cpu_seconds(self.me), cpu_seconds(self.farm.pid),
              machine_busy())
        elapsed = time.monotonic() - t0
        w1 = time.time()
        farm1 = await self.farm.call("counts") if farm_n else []
        lv1 = (latency_viewer.frames, latency_viewer.bytes) if latency_viewer else (0, 0)
        fps: list[float] = []
        kbps: list[float] = []
        for (f0, b0), (f1, b1) in zip(farm0, farm1, strict=False):
            fps.append((f1 - f0) / elapsed)
            kbps.append((b1 - b0) * 8 / elapsed / 1000)
        if latency_viewer is not None:
            fps.append((lv1[0] - lv0[0]) / elapsed)
            kbps.append((lv1[1] - lv0[1]) * 8 / elapsed / 1000)
        n = len(fps)
        server_rate = (c1[0] - c0[0]) / elapsed
        out: dict[str, Any] = {
            "n": n, "seconds": elapsed,
            "server_cores": server_rate,
            "cpu_per_viewer_s": server_rate / n if n else None,
            "client_cores": (c1[1] - c0[1]) / elapsed,
            "farm_cores": (c1[2] - c0[2]) / elapsed,
            # Everything else on the machine (other users' tests, browsers...).
            "other_cores": max(0.0, (c1[3] - c0[3]) - sum(c1[i] - c0[i] for i in range(3)))
            / elapsed,
            "rss_mb": rss_mb(server_pid),
            "fps_mean": statistics.fmean(fps) if fps else None,
            "fps_min": min(fps) if fps else None,
            "kbps_mean": statistics.fmean(kbps) if kbps else None,
        }
        if latency_viewer is not None and latency_viewer.decoder is not None:
            records = [d for d in latency_viewer.decoder.decoded
                       if w0 <= d.decoded_at <= w1 and d.latency is not None]
            lat = [d.latency for d in records]
            arrival = [d.received_at - (d.decoded_at - d.latency) for d in records]
            out.update({"latency_frames": len(lat), "latency_p50": pct(lat, 50),
                        "latency_p95": pct(lat, 95), "arrival_p50": pct(arrival, 50),
                        "unreadable": latency_viewer.decoder.unreadable,
                        "decode_errors": latency_viewer.decoder.errors})
        return out

    # -- ScrubIn -----------------------------------------------------------
    async def run_scrubin(self, key: str = "scrubin", media: dict[str, Any] | None = None,
                          ns: list[int] | None = None, full: bool = True,
                          code: str | None = None) -> None:
        """One server configuration: the CPU/latency sweep, and with ``full`` the
        direct baseline, the join tests and the profile. ``code``: run the server
        from that snapshot instead of the current tree."""
        plan = self.plan
        label = {"scrubin": "ScrubIn", "sender": "sender path", "baseline": "baseline",
                 "again": "ScrubIn"}.get(key, key)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        whep = f"{base}/whep/{SESSION}/{FEED}"
        server = Child(self.ctx, scrubin_main, port, self.key, media or {}, code=code)
        print(f"{label} server pid {server.pid} on {base}" + (f" (media {media})" if media
                                                                else ""), flush=True)
        stamps = StampBook()
        track = PacketReplayTrack(self.stream, stamps)
        rows: list[dict[str, Any]] = []
        self.results[key] = {"cpu": rows, "media": media or {}}
        http = aiohttp.ClientSession()
        publisher = None
        viewers: list[Viewer] = []
        try:
            publisher = await publish(http, f"{base}/whip/{SESSION}/{SLOT}",
                                      self.tokens.issue(SESSION, Role.EXPERT), track)
            feed_ok = False
            end = time.monotonic() + 15
            while time.monotonic() < end:
                feeds = (await self.stats(http, base))["feeds"]
                if feeds.get(FEED, {}).get("frames_received", 0) > 30:
                    feed_ok = True
                    break
                await asyncio.sleep(0.2)
            if not feed_ok:
                raise RuntimeError("the server's Feed received no frames within 15 s")
            await asyncio.sleep(plan.settle)

            # 1. CPU / RSS / latency sweep over N.
            latency_viewer: Viewer | None = None
            farm_n = 0
            for n in (plan.ns if ns is None else ns):
                if self.left() < plan.window + plan.settle + (60 if full else 5):
                    self.note(f"time budget: {label} sweep stopped before N={n}")
                    break
                if n >= 1 and latency_viewer is None:
                    latency_viewer = Viewer("latency", decode="all", stamps=stamps)
                    viewers.append(latency_viewer)
                    await latency_viewer.join(http, whep,
                                              self.tokens.issue(SESSION, Role.TRAINEE))
                    if latency_viewer.error:
                        raise RuntimeError(f"latency viewer: {latency_viewer.error}")
                    await self.wait(lambda v=latency_viewer: v.t_first_frame is not None, 10)
                if n - 1 > farm_n:
                    await self.farm_join(whep, n - 1 - farm_n)
                    farm_n = n - 1
                await asyncio.sleep(plan.settle)
                row = await self.scrubin_window(http, base, server.pid, track, latency_viewer,
                                                farm_n, n)
                if self.disturbed(row) and self.left() > plan.window + 60:
                    # Another process took the machine (this box is shared): once more.
                    self.print_cpu_row("(disturbed)", row)
                    again = await self.scrubin_window(http, base, server.pid, track,
                                                      latency_viewer, farm_n, n)
                    row = again if self.worse(row, again) else row
                    row["remeasured"] = True
                rows.append(row)
                self.print_cpu_row(label, row)
            if full and self.profile and rows and rows[-1]["n"]:
                await self.run_profile(server.pid, rows[-1]["n"])
            self.results[key]["publisher"] = {
                "keyframe_requests": track.keyframe_requests,
                "keyframes_sent": track.keyframes_sent, "frames_sent": track.frames_sent,
                "skipped_slots": track.skipped_slots}
            await asyncio.gather(*(v.close() for v in viewers))
            viewers.clear()
            if self.farm is not None:
                await self.farm.call("close")
            await asyncio.sleep(2)
            after = await self.stats(http, base, deep=True)
            self.results[key]["after_close"] = self.leftovers(after, server.pid)
            if not full:
                return

            # 1b. The server's share of a joiner's first frame: 32 count-only viewers
            # (no decoding anywhere) join at once; server side, ICE completed ->
            # first frame (the cached keyframe) sent.
            if self.left() > 40:
                await self.run_farm_burst(http, base, whep)

            # 2. Direct publisher -> viewer baseline (no server), same run.
            if plan.only != "joins":
                await self.run_direct()

            # 3. Joins.
            if self.left() > 40:
                clients = [self.me, *(c.pid for c in [self.farm, *self.joiners] if c)]
                try:
                    if plan.pin:
                        self.pin(server.pid, clients)
                    await self.run_joins(http, base, whep, stamps, server.pid)
                finally:
                    if plan.pin:
                        self.pin(server.pid, clients, undo=True)
                await asyncio.sleep(2)
                after = await self.stats(http, base, deep=True)
                self.results["scrubin"]["after_joins"] = self.leftovers(after, server.pid)
            else:
                self.note("time budget: join tests skipped")
        finally:
            await asyncio.gather(*(v.close() for v in viewers))
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(publisher.close(), 5)
            await http.close()
            server.stop()

    def pin(self, server: int, clients: list[int], undo: bool = False) -> None:
        """The server on the first half of the CPUs, the client processes on the
        rest, every thread (threads started later inherit it): the clients' work
        no longer takes the server's CPUs, as with viewers on other machines.
        The rest of the machine's load still lands anywhere."""
        cpus = sorted(range(os.cpu_count() or 1))
        half = max(1, len(cpus) // 2)
        server_cpus, client_cpus = (cpus, cpus) if undo else (cpus[:half], cpus[half:] or cpus)
        for pids, mine in (([server], server_cpus), (clients, client_cpus)):
            for pid in pids:
                for thread in psutil.Process(pid).threads():
                    with contextlib.suppress(OSError):  # a thread that just ended
                        os.sched_setaffinity(thread.id, mine)
        if not undo:
            self.note(f"join scenarios pinned: server on CPUs {server_cpus}, the client "
                      f"processes on {client_cpus}")

    def worse(self, row: dict[str, Any], other: dict[str, Any]) -> bool:
        return (self.disturbed(row), row["other_cores"]) >= (self.disturbed(other),
                                                             other["other_cores"])

    @staticmethod
    def disturbed(row: dict[str, Any]) -> bool:
        """Another process took much of the machine, or the Feed stalled."""
        return bool(row.get("other_cores", 0) > 0.5 or (row.get("feed_max_gap") or 0) > 0.5)

    async def scrubin_window(self, http: aiohttp.ClientSession, base: str, pid: int,
                             track: PacketReplayTrack, latency_viewer: Viewer | None,
                             farm_n: int, n: int) -> dict[str, Any]:
        lost0 = await self.farm_lost(farm_n)
        stats0 = await self.stats(http, base)
        track.take_max_gap()
        row = await self.window(pid, latency_viewer, farm_n, self.plan.window)
        stats1 = await self.stats(http, base)
        lost1 = await self.farm_lost(farm_n)
        feed0 = stats0["feeds"].get(FEED, {})
        feed1 = stats1["feeds"].get(FEED, {})
        row.update({
            "publisher_max_gap": track.take_max_gap(),
            "feed_max_gap": stats1.get("feed_max_gap"),
            "feed_gaps_over_100ms": stats1.get("feed_gaps_over_100ms"),
            "ingest_lost": stats1["ingest"]["lost"] - stats0["ingest"]["lost"],
            "viewer_packets_lost": lost1 - lost0,
            "n": n,
            "max_pending": max((s["pending"] for s in stats1["subscriptions"]), default=0),
            "gop_frames": feed1.get("gop_frames"),
            "upstream_keyframe_requests": feed1.get("keyframe_requests_sent", 0)
            - feed0.get("keyframe_requests_sent", 0),
            "server_tasks": stats1.get("tasks"),
            "paths": dict(Counter(s.get("path", "sender") for s in stats1["subscriptions"])),
        })
        return row

    async def farm_lost(self, farm_n: int) -> int:
        """Packets the farm's viewers counted as lost so far (getStats)."""
        if not farm_n or self.farm is None:
            return 0
        inbound = await self.farm.call("inbound")
        return int(sum(i[1] for i in inbound))

    @staticmethod
    def leftovers(stats: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"rss_mb": rss_mb(pid), "subscriptions": len(stats["subscriptions"]),
                "tasks": stats.get("tasks"), "peer_connections": stats.get("peer_connections"),
                "peer_connections_open": stats.get("peer_connections_open"),
                "task_names": stats.get("task_names")}

    async def run_profile(self, pid: int, n: int) -> None:
        """py-spy on the server during one extra window (not a measured one)."""
        seconds = max(5, int(self.plan.window))
        raw = f"{self.profile}.raw.txt"
        cmd = [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
               str(pid), "--duration", str(seconds), "--rate", "200", "--nonblocking",
               "--format", "raw", "--output", raw]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
        except (TimeoutError, OSError) as exc:
            self.note(f"py-spy failed: {exc}")
            return
        if proc.returncode != 0 or not os.path.exists(raw):  # noqa: ASYNC240
            self.note(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
            return
        self.results["profile"] = summarize_profile(raw, n)
        print(f"  py-spy profile of the server with {n} viewers: {raw}", flush=True)

    async def run_farm_burst(self, http: aiohttp.ClientSession, base: str, whep: str) -> None:
        """The server's share of a joiner's first frame, with count-only viewers
        (nothing decodes): the viewer's ICE connected (its clock) -> the server
        hands it its first frame (the cached keyframe); and on the server alone,
        ICE completed -> DTLS up -> first frame sent."""
        assert self.farm is not None
        n = self.plan.burst_joins
        result = await self.farm_join(whep, n)
        await asyncio.sleep(1.0)
        stats = await self.stats(http, base)
        subs = {s["id"]: s for s in stats["subscriptions"]}
        share = [subs[r["resource"]]["first_sent"] - r["t_ice"] for r in result
                 if r["t_ice"] and subs.get(r["resource"], {}).get("first_sent")]

        def server(name: str) -> list[float]:
            return [s[name] for s in subs.values() if s.get(name) is not None]

        figures: dict[str, Any] = {"n": n, "measured": len(share), "p50": pct(share, 50),
                                   "p95": pct(share, 95), "max": max(share) if share else None}
        for name in ("ice_to_dtls", "dtls_to_first_frame", "ice_to_first_frame"):
            values = server(name)
            figures[name] = (pct(values, 50), pct(values, 95))
        self.results["server_share"] = figures
        print(f"  {n} simultaneous count-only joins: viewer ICE connected -> server sends its "
              f"first frame p50 {ms(figures['p50'], 1)} ms p95 {ms(figures['p95'], 1)} ms "
              f"({len(share)}/{n}); on the server ICE->DTLS "
              f"{'/'.join(ms(v, 1) for v in figures['ice_to_dtls'])} ms, DTLS->first frame "
              f"{'/'.join(ms(v, 1) for v in figures['dtls_to_first_frame'])} ms", flush=True)
        await self.farm.call("close")
        await asyncio.sleep(2)

    async def run_direct(self) -> None:
        stamps = StampBook()
        track = PacketReplayTrack(self.stream, stamps)
        publisher = await publish_direct(track)
        viewer = Viewer("direct", decode="all", stamps=stamps)
        try:
            await viewer.join_direct(publisher)
            if not await self.wait(lambda: viewer.t_first_frame is not None, 10):
                self.note("direct viewer got no frame")
                return
            await asyncio.sleep(self.plan.settle)
            w0 = time.time()
            busy0 = machine_busy() - cpu_seconds(self.me)
            await asyncio.sleep(self.plan.latency_window)
            w1 = time.time()
            others = (machine_busy() - cpu_seconds(self.me) - busy0) / (w1 - w0)
            assert viewer.decoder is not None
            records = [d for d in viewer.decoder.decoded
                       if w0 <= d.decoded_at <= w1 and d.latency is not None]
            lat = [d.latency for d in records]
            arrival = [d.received_at - (d.decoded_at - d.latency) for d in records]
            self.results["direct"] = {
                "latency_frames": len(lat), "latency_p50": pct(lat, 50),
                "latency_p95": pct(lat, 95), "arrival_p50": pct(arrival, 50),
                "fps": len(lat) / (w1 - w0), "other_cores": others}
            print(f"  direct (no server): stamp->decode p50 {ms(pct(lat, 50), 1)} ms "
                  f"p95 {ms(pct(lat, 95), 1)} ms over {len(lat)} frames", flush=True)
        finally:
            await viewer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)

    async def run_joins(self, http: aiohttp.ClientSession, base: str, whep: str,
                        stamps: StampBook, server_pid: int) -> None:
        plan = self.plan
        out: dict[str, Any] = {}
        self.results["joins"] = out

        async def one(viewer: Viewer) -> None:
            await viewer.join(http, whep, self.tokens.issue(SESSION, Role.TRAINEE))

        def done(group: list[Viewer]) -> bool:
            return all(v.error or v.first_decoded_at() is not None for v in group)

        def live(group: list[Viewer]) -> bool:
            return all(v.error or v.caught_up_at(LIVE_THRESHOLD) is not None for v in group)

        sampled: dict[str, Any] = {"pending": 0, "tasks": 0, "series": []}

        async def sample() -> None:
            # Per-viewer queues while joiners catch up (replayed cache + live frames).
            with contextlib.suppress(Exception):
                while True:
                    stats = await self.stats(http, base)
                    sampled["pending"] = max([sampled["pending"]] + [
                        s["pending"] for s in stats["subscriptions"]])
                    sampled["tasks"] = max(sampled["tasks"], stats["tasks"])
                    sampled["series"].append((time.time(), sum(
                        s["pending"] for s in stats["subscriptions"]), len(stats["subscriptions"])))
                    await asyncio.sleep(0.1)

        def cpu_mark(workers: list[int]) -> tuple[float, float, float, float, float]:
            return (time.monotonic(), cpu_seconds(server_pid), cpu_seconds(self.me),
                    sum(cpu_seconds(pid) for pid in workers), machine_busy())

        async def finish(name: str, group: JoinGroup, sampler: asyncio.Task[None],
                         mark: tuple[float, float, float, float, float]) -> None:
            await group.until_decoded()
            now = cpu_mark(group.pids)
            span = now[0] - mark[0]
            used = [now[i] - mark[i] for i in range(1, 5)]
            # Let the catch-up (replayed cache) finish before judging "live".
            end = time.monotonic() + 8
            while not live(await group.refresh()) and (  # noqa: ASYNC110 - bounded poll
                    time.monotonic() < end):
                await asyncio.sleep(0.2)
            viewers = group.viewers
            sampler.cancel()
            stats = await self.stats(http, base)
            out[name] = self.join_figures(viewers, stats)
            out[name]["processes"] = len(group.pids)
            out[name]["max_pending_during"] = sampled["pending"]
            out[name]["cores_until_decoded"] = {
                "server": used[0] / span, "client": used[1] / span, "joiners": used[2] / span,
                "others": max(0.0, used[3] - used[0] - used[1] - used[2]) / span}
            out[name]["packets_lost"] = sum(await asyncio.gather(
                *(v.packets_lost() for v in viewers)))
            # When the server's queues were back to live size (<= 2 frames per viewer).
            joined = [v.t_join for v in viewers if v.t_join]
            start = min(joined)
            out[name]["join_spread"] = max(joined) - start
            series = sampled["series"]
            peak = max(range(len(series)), key=lambda i: series[i][1]) if series else 0
            drained = next((t for t, total, count in series[peak:]
                            if count >= len(viewers) and total <= 2 * count), None)
            out[name]["server_drained_after"] = None if drained is None else drained - start
            sampled.update(pending=0, series=[])
            self.print_join_row(name, out[name])
            await group.close()
            await asyncio.sleep(1.0)

        # Single joins, one after another.
        singles: list[Viewer] = []
        single_stats: dict[str, Any] = {"subscriptions": [], "answers": []}
        for i in range(plan.single_joins):
            viewer = Viewer(f"single{i}", decode="first", stamps=stamps)
            singles.append(viewer)
            await one(viewer)
            await self.wait(lambda v=viewer: done([v]), 10)
            await self.wait(lambda v=viewer: live([v]), 8, interval=0.2)
            await asyncio.sleep(0.7)  # land at different points of the keyframe cycle
            stats = await self.stats(http, base)
            for sub in stats["subscriptions"]:
                single_stats["subscriptions"].append(sub)
            single_stats["answers"] = stats.get("answers", [])
            await viewer.close()
        out["single"] = self.join_figures(singles, single_stats)
        self.print_join_row("single", out["single"])

        # Simultaneous joins, all decoding in this process (on the cores the server
        # and the publisher use): the baseline for the spread burst below.
        burst = [Viewer(f"burst{i}", decode="first", stamps=stamps)
                 for i in range(plan.burst_joins)]
        sampler = asyncio.ensure_future(sample())
        mark = cpu_mark([])
        await asyncio.gather(*(one(v) for v in burst))
        await finish(f"{plan.burst_joins} simultaneous", JoinGroup(burst), sampler, mark)

        # The same burst spread over worker processes, as separate browsers would
        # decode: every process starts its joins at one wall-clock moment.
        if self.joiners:
            spread = SpreadJoinGroup(self.joiners, stamps)
            tokens = [self.tokens.issue(SESSION, Role.TRAINEE) for _ in range(plan.burst_joins)]
            start_at = time.time() + 0.5
            spread.start(whep, tokens, start_at)
            await asyncio.sleep(max(0.0, start_at - time.time()))
            sampler = asyncio.ensure_future(sample())
            mark = cpu_mark(spread.pids)
            try:
                await finish(f"{plan.burst_joins} simultaneous, {len(self.joiners)} procs",
                             spread, sampler, mark)
            except Exception as exc:
                sampler.cancel()
                self.note(f"spread joins not measured: {type(exc).__name__}: {str(exc)[:160]}")
                with contextlib.suppress(Exception):
                    await spread.close()

        # Staggered joins.
        staggered = [Viewer(f"stagger{i}", decode="first", stamps=stamps)
                     for i in range(plan.staggered_joins)]
        tasks = []
        sampler = asyncio.ensure_future(sample())
        mark = cpu_mark([])
        for viewer in staggered:
            tasks.append(asyncio.ensure_future(one(viewer)))
            await asyncio.sleep(plan.stagger_interval)
        await asyncio.gather(*tasks)
        await finish(f"{plan.staggered_joins} staggered {plan.stagger_interval * 1000:.0f} ms",
                     JoinGroup(staggered), sampler, mark)

    def join_figures(self, group: list[Viewer], stats: dict[str, Any] | None) -> dict[str, Any]:
        ok = [v for v in group if v.first_decoded_at() is not None]
        from_join = [v.first_decoded_at() - v.t_join for v in ok]  # type: ignore[operator]
        from_ice = [v.first_decoded_at() - v.t_ice for v in ok if v.t_ice]  # type: ignore[operator]
        join_ice = [v.t_ice - v.t_join for v in ok if v.t_ice]  # type: ignore[operator]
        join_answer = [v.t_answer - v.t_join for v in ok if v.t_answer]  # type: ignore[operator]
        ice_dtls = [v.t_connected - v.t_ice for v in ok  # type: ignore[operator]
                    if v.t_ice and v.t_connected]
        dtls_rx = [v.t_first_frame - v.t_connected for v in ok  # type: ignore[operator]
                   if v.t_connected and v.t_first_frame]
        rx_dec = [v.first_decoded_at() - v.t_first_frame for v in ok  # type: ignore[operator]
                  if v.t_first_frame]
        ice_rx = [v.t_first_frame - v.t_ice for v in ok  # type: ignore[operator]
                  if v.t_ice and v.t_first_frame]
        stale = [first.latency for v in ok
                 if (first := v.first_decoded()) is not None and first.latency is not None]
        live = [(t - v.t_join) for v in ok  # type: ignore[operator]
                if (t := v.caught_up_at(LIVE_THRESHOLD)) is not None]
        skipped = sum(1 for v in ok if v.caught_up_by_skipping(LIVE_THRESHOLD))
        figures: dict[str, Any] = {
            "n": len(group), "decoded": len(ok),
            "errors": [v.error for v in group if v.error][:3],
            "join_first_p50": pct(from_join, 50), "join_first_p95": pct(from_join, 95),
            "ice_first_p50": pct(from_ice, 50), "ice_first_p95": pct(from_ice, 95),
            "ice_rx_p50": pct(ice_rx, 50), "ice_rx_p95": pct(ice_rx, 95),
            "join_answer_p50": pct(join_answer, 50), "join_answer_p95": pct(join_answer, 95),
            "ice_dtls_p50": pct(ice_dtls, 50), "ice_dtls_p95": pct(ice_dtls, 95),
            "dtls_rx_p50": pct(dtls_rx, 50), "dtls_rx_p95": pct(dtls_rx, 95),
            "rx_decode_p50": pct(rx_dec, 50), "rx_decode_p95": pct(rx_dec, 95),
            "join_ice_p50": pct(join_ice, 50), "join_ice_p95": pct(join_ice, 95),
            "first_key": sum(1 for v in ok if v.first_frame_key),
            "stale_p50": pct(stale, 50), "stale_p95": pct(stale, 95),
            "join_live_p50": pct(live, 50), "join_live_p95": pct(live, 95),
            "live": len(live), "live_by_skipping": skipped,
        }
        if stats is not None:
            sent = {s["id"]: s["first_sent"] for s in stats["subscriptions"]}
            ice_sent = [sent[v.resource] - v.t_ice for v in ok  # type: ignore[operator]
                        if v.t_ice and sent.get(v.resource)]
            sent_dec = [v.first_decoded_at() - sent[v.resource]  # type: ignore[operator]
                        for v in ok if sent.get(v.resource)]
            joins = {v.t_join for v in group}
            start = min(joins) - 0.5 if joins else 0
            answer = [end - begin for begin, end in stats.get("answers", []) if begin >= start]
            figures.update({
                "ice_sent_p50": pct(ice_sent, 50), "ice_sent_p95": pct(ice_sent, 95),
                "sent_decoded_p50": pct(sent_dec, 50), "sent_decoded_p95": pct(sent_dec, 95),
                "server_answer_p50": pct(answer, 50), "server_answer_p95": pct(answer, 95)})
            server_first = [s["first_frame_after"] for s in stats["subscriptions"]
                            if s["first_frame_after"] is not None]
            figures["server_first_p95"] = pct(server_first, 95)
            figures["max_pending"] = max((s["pending"] for s in stats["subscriptions"]),
                                         default=0)
        return figures

    # -- MediaRelay baseline ---------------------------------------------------
    async def run_relay(self) -> None:
        plan = self.plan
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        whep = f"{base}/whep/{SESSION}/{FEED}"
        server = Child(self.ctx, relay_main, port)
        print(f"MediaRelay server pid {server.pid} on {base}", flush=True)
        stamps = StampBook()
        track = PacketReplayTrack(self.stream, stamps)
        rows: list[dict[str, Any]] = []
        self.results["relay"] = {"cpu": rows}
        http = aiohttp.ClientSession()
        publisher = None
        latency_viewer: Viewer | None = None
        try:
            publisher = await publish(http, f"{base}/whip/{SESSION}/{SLOT}", "-", track)
            ok = False
            end = time.monotonic() + 15
            while time.monotonic() < end:
                if (await self.stats(http, base))["decoded"] > 30:
                    ok = True
                    break
                await asyncio.sleep(0.2)
            if not ok:
                raise RuntimeError("MediaRelay decoded no frames within 15 s")
            await asyncio.sleep(plan.settle)
            row = await self.window(server.pid, None, 0, plan.relay_window)
            row["n"] = 0
            rows.append(row)
            self.print_cpu_row("MediaRelay", row)
            farm_n = 0
            for n in plan.relay_ns:
                if self.left() < plan.relay_window + plan.settle + 15:
                    self.note(f"time budget: MediaRelay sweep stopped before N={n}")
                    break
                if latency_viewer is None:
                    latency_viewer = Viewer("relay-latency", decode="all", stamps=stamps)
                    await latency_viewer.join(http, whep, "-")
                    await self.wait(lambda v=latency_viewer: v.t_first_frame is not None, 10)
                if n - 1 > farm_n:
                    await self.farm_join(whep, n - 1 - farm_n)
                    farm_n = n - 1
                await asyncio.sleep(plan.settle)
                row = await self.window(server.pid, latency_viewer, farm_n, plan.relay_window)
                if self.disturbed(row) and self.left() > plan.relay_window + 30:
                    row["n"] = n
                    self.print_cpu_row("(disturbed)", row)
                    again = await self.window(server.pid, latency_viewer, farm_n,
                                              plan.relay_window)
                    row = again if self.worse(row, again) else row
                    row["remeasured"] = True
                row["n"] = n
                rows.append(row)
                self.print_cpu_row("MediaRelay", row)
                if (row["fps_min"] or 0) < 0.8 * FPS or row["server_cores"] > 1.7:
                    row["collapsed"] = True
                    self.note(f"MediaRelay collapsed at N={n}: min {row['fps_min']:.1f} fps, "
                              f"server {row['server_cores']:.2f} cores; not going further")
                    break
        finally:
            if latency_viewer is not None:
                await latency_viewer.close()
            if self.farm is not None:
                with contextlib.suppress(Exception):
                    await self.farm.call("close")
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(publisher.close(), 5)
            await http.close()
            server.stop()

    # -- printing ------------------------------------------------------------
    @staticmethod
    def print_cpu_row(name: str, row: dict[str, Any]) -> None:
        per = row["cpu_per_viewer_s"]
        lat = (f" stamp->decode p50 {ms(row.get('latency_p50'), 1)} ms "
               f"p95 {ms(row.get('latency_p95'), 1)} ms" if row.get("latency_p50") else "")
        fps = ("" if row["fps_mean"] is None
               else f", {row['fps_mean']:.1f} fps (min {row['fps_min']:.1f})")
        print(f"  {name:10} N={row['n']:<3} server {row['server_cores']:.3f} cores"
              f"{'' if per is None else f', {per:.4f} CPU-s/viewer-s'}{fps}"
              f", RSS {row['rss_mb']:.1f} MB{lat}; rest of the machine "
              f"{row['other_cores']:.2f} cores", flush=True)

    @staticmethod
    def print_join_row(name: str, f: dict[str, Any]) -> None:
        print(f"  joins {name}: decoded {f['decoded']}/{f['n']}, join->first p50 "
              f"{ms(f['join_first_p50'])} p95 {ms(f['join_first_p95'])} ms, ICE->first p50 "
              f"{ms(f['ice_first_p50'])} p95 {ms(f['ice_first_p95'])} ms, join->live p95 "
              f"{ms(f['join_live_p95'])} ms", flush=True)

    def report(self) -> str:
        r = self.results
        lines: list[str] = []
        add = lines.append
        env = r["env"]
        add("")
        add("ScrubIn live-path benchmark" + (" (--quick)" if self.plan.quick else ""))
        add(f"{env['date']}  {env['cpus']} CPUs  Python {env['python']}  aiortc {env['aiortc']}"
            f"  PyAV {env['av']}")
        add(f"stream: {env['stream']}")
        if env.get("code"):
            add(f"server code: {env['code']}")
        add("")
        scr = {row["n"]: row for row in r.get("scrubin", {}).get("cpu", [])}
        snd = {row["n"]: row for row in r.get("sender", {}).get("cpu", [])}
        rel = {row["n"]: row for row in r.get("relay", {}).get("cpu", [])}

        def marginal(table: dict[int, dict[str, Any]], n: int) -> float | None:
            base = table.get(0, {}).get("server_cores")
            row = table.get(n)
            if not n or base is None or row is None:
                return None
            return float((row["server_cores"] - base) / n)

        paths = sorted({p for row in scr.values() for p in (row.get("paths") or {})})
        add("1. Server CPU per viewer-second, one 720p30 VP8 Feed "
            f"(target <= {TARGET_CPU} CPU-s/viewer-s)")
        add(f"   ScrubIn (viewers' send path: {', '.join(paths) or '-'}):")
        add("      N |  cores  CPU-s/v-s  marginal  fps min  RSS MB  queue")
        for n, row in sorted(scr.items()):
            add(f"   {n:4d} | {row['server_cores']:6.3f}  {_f(row['cpu_per_viewer_s'], 9, 4)}"
                f"  {_f(marginal(scr, n), 8, 4)}  {_f(row['fps_min'], 7, 1)}"
                f"  {row['rss_mb']:6.1f}  {row.get('max_pending', 0):5d}")
        add("   Baselines in the same run (CPU-s/viewer-s, marginal, min fps) and ratios:")
        add("      N | ScrubIn  | ScrubIn, fast path off (aiortc sender per viewer) "
            "| MediaRelay (decode once, encode per viewer) | off/ScrubIn  MediaRelay/ScrubIn")
        for n in sorted(set(scr) | set(snd) | set(rel)):
            if not n:
                continue
            main = scr.get(n, {}).get("cpu_per_viewer_s")
            cells = [f"   {n:4d} | {_f(main, 7, 4)}  |"]
            for table, width in ((snd, 50), (rel, 45)):
                row = table.get(n)
                if row is None:
                    cells.append(" " * width + "|")
                    continue
                flag = " COLLAPSED" if row.get("collapsed") else ""
                text = (f" {_f(row['cpu_per_viewer_s'], 7, 4)}  {_f(marginal(table, n), 7, 4)}"
                        f"  {_f(row['fps_min'], 5, 1)} fps{flag}")
                cells.append(text.ljust(width) + "|")
            for table in (snd, rel):
                other = table.get(n, {}).get("cpu_per_viewer_s")
                cells.append(f" {other / main:9.1f}x" if other and main else " " * 11)
            add("".join(cells))
        add("   ScrubIn stream health per window: N | kbit/s per viewer | longest gap between "
            "frames: sent by the publisher / received by the Feed | Feed gaps > 100 ms | "
            "packets lost at ingest | at farm viewers | cores used by client processes / by "
            "the rest of the machine")
        for n, s in sorted(scr.items()):
            if s.get("feed_max_gap") is None:
                continue
            add(f"     {n:4d} | {_f(s.get('kbps_mean'), 6, 0)} | "
                f"{ms(s.get('publisher_max_gap')):>4} / {ms(s['feed_max_gap']):>4} ms | "
                f"{s.get('feed_gaps_over_100ms', 0):3d} | {s.get('ingest_lost', 0):5d} | "
                f"{s.get('viewer_packets_lost', 0):6d} | "
                f"{s['client_cores'] + s['farm_cores']:.2f} / {s['other_cores']:.2f}")
        add("   (CPU-s/v-s = server CPU / (N x seconds); marginal = (cores(N) - cores(0)) / N;"
            " queue = largest per-viewer queue; X = collapsed)")
        add("   reference on this kind of machine: "
            + ", ".join(f"{k} {v}" for k, v in REFERENCE_CPU.items()))
        add("")
        direct = r.get("direct", {})
        d50 = direct.get("latency_p50")
        add("2. Stamp-to-decode latency (publisher send time -> decoded at viewer), ms")
        add("   path                 viewers   p50     p95  | added p50  ratio "
            "| target (added p50)")
        if d50 is not None:
            add(f"   direct, no server          1 {ms(d50, 1):>6} "
                f"{ms(direct.get('latency_p95'), 1):>7}  |         -      -  |")
        for n, row in sorted(scr.items()):
            if not row.get("latency_p50"):
                continue
            added = row["latency_p50"] - d50 if d50 is not None else None
            target = TARGET_ADDED_1 if n == 1 else TARGET_ADDED_32 if n == 32 else None
            verdict = "" if target is None or added is None else (
                f"<= {target * 1000:.0f}: {'met' if added <= target else 'MISSED'}")
            add(f"   ScrubIn              {n:7d} {ms(row['latency_p50'], 1):>6} "
                f"{ms(row['latency_p95'], 1):>7}  | {ms(added, 1):>9} "
                f"{_f(row['latency_p50'] / d50 if d50 else None, 6, 2)} | {verdict}")
        for n, row in sorted(rel.items()):
            if not row.get("latency_p50"):
                continue
            added = row["latency_p50"] - d50 if d50 is not None else None
            add(f"   MediaRelay           {n:7d} {ms(row['latency_p50'], 1):>6} "
                f"{ms(row['latency_p95'], 1):>7}  | {ms(added, 1):>9} "
                f"{_f(row['latency_p50'] / d50 if d50 else None, 6, 2)} |")
        add("")
        joins = r.get("joins", {})
        if joins:
            add("3. ScrubIn joins: time to first decoded frame, ms (target: ICE->first p95 <= "
                f"{TARGET_FIRST_FRAME * 1000:.0f} with 30+ joins)")
            add(f"   {'scenario':26} ok/n | join->first p50  p95 | ICE->first p50  p95 "
                "| join->ICE p50 | 1st frame age p50 | join->live p50  p95")
            for name, f in joins.items():
                add(f"   {name:26} {f['decoded']:2d}/{f['n']:<2d}| {ms(f['join_first_p50']):>15} "
                    f"{ms(f['join_first_p95']):>4} | {ms(f['ice_first_p50']):>14} "
                    f"{ms(f['ice_first_p95']):>4} | {ms(f['join_ice_p50']):>13} "
                    f"| {ms(f['stale_p50']):>17} | {ms(f['join_live_p50']):>14} "
                    f"{ms(f['join_live_p95']):>4}")
            add("   (1st frame age = how old the first decoded frame was; live = first frame "
                f"arriving < {LIVE_THRESHOLD * 1000:.0f} ms after it was sent)")
            add("   how joiners got live: by draining the replayed backlog or by skipping ahead "
                "(server dropped the backlog at a keyframe); server queues back to <= 2 "
                "frames/viewer after; packets the joiners counted lost")
            for name, f in joins.items():
                add(f"   {name:26}  {f['live']} live: {f['live']- f['live_by_skipping']} "
                    f"drained, {f['live_by_skipping']} skipped | queues drained after "
                    f"{ms(f.get('server_drained_after'))} ms | {f.get('packets_lost', '-')} lost")
            add("   cores busy from the joins' start until all decoded: server | this process "
                "(publisher, and the joiners when not spread) | joiner worker processes | rest "
                "of the machine; spread of the joins' start times")
            for name, f in joins.items():
                if "cores_until_decoded" not in f:
                    continue
                c = f["cores_until_decoded"]
                add(f"   {name:26}  {c['server']:.2f} | {c['client']:.2f} | "
                    + (f"{c['joiners']:.2f} ({f['processes']} processes)" if f["processes"]
                       else "-") + f" | {c['others']:.2f} | {ms(f['join_spread'], 1)} ms")
            spread = next((f for f in joins.values() if f.get("processes")), None)
            local = next((f for name, f in joins.items()
                          if "simultaneous" in name and not f.get("processes")), None)
            if spread and local:
                add(f"   decoding spread over {spread['processes']} processes vs all in this "
                    "process, same run, p50/p95 ms (ratio of p95s):")
                for label, key in (("ICE->first", "ice_first"), ("join->first", "join_first"),
                                   ("received->decoded", "rx_decode")):
                    a, b = spread[f"{key}_p95"], local[f"{key}_p95"]
                    ratio = _f(a / b if a and b else None, 4, 2)
                    add(f"     {label:17} {ms(spread[f'{key}_p50'])}/{ms(a)} vs "
                        f"{ms(local[f'{key}_p50'])}/{ms(b)}  ({ratio})")
            add("   breakdown p50/p95, ms: join->answer | ICE->DTLS connected | DTLS->1st frame "
                "received | received->decoded (client) | largest server queue while joining")
            for name, f in joins.items():
                add(f"   {name:26}  {ms(f['join_answer_p50'])}/{ms(f['join_answer_p95'])} | "
                    f"{ms(f['ice_dtls_p50'])}/{ms(f['ice_dtls_p95'])} | "
                    f"{ms(f['dtls_rx_p50'])}/{ms(f['dtls_rx_p95'])} | "
                    f"{ms(f['rx_decode_p50'])}/{ms(f['rx_decode_p95'])} | "
                    f"{f.get('max_pending_during', '-')} frames")
            add("   server side p50/p95, ms: WHEP POST handled | viewer's ICE connected -> "
                "server hands 1st frame to the sender | that -> decoded at the viewer")
            for name, f in joins.items():
                if "ice_sent_p50" not in f:
                    continue
                add(f"   {name:26}  {ms(f['server_answer_p50'])}/{ms(f['server_answer_p95'])} | "
                    f"{ms(f['ice_sent_p50'])}/{ms(f['ice_sent_p95'])} | "
                    f"{ms(f['sent_decoded_p50'])}/{ms(f['sent_decoded_p95'])}")
            add("")
        add("4. Server RSS per viewer")
        if 0 in scr and scr:
            top = max(scr)
            if top:
                per = (scr[top]["rss_mb"] - scr[0]["rss_mb"]) / top
                r["rss_per_viewer_mb"] = per
                add(f"   ScrubIn: {scr[0]['rss_mb']:.1f} MB with the publisher only, "
                    f"{scr[top]['rss_mb']:.1f} MB with {top} viewers: {per:.2f} MB/viewer "
                    f"(target <= {TARGET_RSS} MB)")
        for label in ("after_close", "after_joins"):
            left = r.get("scrubin", {}).get(label)
            if left:
                add(f"   {label.replace('_', ' ')}: RSS {left['rss_mb']:.1f} MB, "
                    f"{left['subscriptions']} subscriptions, {left['tasks']} tasks, "
                    f"{left['peer_connections']} RTCPeerConnection objects "
                    f"({left['peer_connections_open']} not closed)")
                if left.get("task_names"):
                    add("     tasks: " + ", ".join(f"{k} x{v}" for k, v in
                                                   left["task_names"].items()))
        if 0 in rel and len(rel) > 1:
            top = max(rel)
            add(f"   MediaRelay: {(rel[top]['rss_mb'] - rel[0]['rss_mb']) / top:.2f} MB/viewer "
                f"at N={top}")
        add("")
        prof = r.get("profile")
        if prof:
            add(f"5. Where the server's time goes with {prof['n']} viewers (py-spy, "
                f"{prof['samples']} samples, % of non-idle samples)")
            add("   self time:")
            for name, share in prof["self"][:15]:
                add(f"   {share * 100:5.1f}%  {name}")
            add("   inclusive:")
            for name, share in prof["inclusive"][:20]:
                add(f"   {share * 100:5.1f}%  {name}")
            add("")
        loads = [row["other_cores"] for row in [*scr.values(), *rel.values()]
                 if "other_cores" in row]
        again = [f"{name} N={row['n']}" for name, rows in (("ScrubIn", scr), ("MediaRelay", rel))
                 for row in rows.values() if row.get("remeasured")]
        if again:
            add("Windows measured twice because the machine was busy or the Feed stalled "
                f"(the better one is shown): {', '.join(again)}")
        if loads:
            add(f"External load: the rest of the machine used {min(loads):.2f}-{max(loads):.2f} "
                "cores during the measurement windows (of 2); figures taken under load are "
                "pessimistic.")
            add("")
        base_rows = {row["n"]: row for row in r.get("baseline", {}).get("cpu", [])}
        again_rows = {row["n"]: row for row in r.get("again", {}).get("cpu", [])}
        if base_rows:
            add(f"5b. The media seam against the code before it ({r['env'].get('baseline')}), "
                "same run, same stream")
            add("   code          N | server cores | CPU-s/viewer-s | fps (min) "
                "| stamp->decode p50")
            for name, table in (("current", scr), ("baseline", base_rows),
                                ("current again", again_rows)):
                for n, row in sorted(table.items()):
                    add(f"   {name:13} {n:2d} | {row['server_cores']:12.3f} | "
                        f"{_f(row['cpu_per_viewer_s'], 14, 4)} | "
                        f"{_f(row['fps_mean'], 4, 1)} ({_f(row['fps_min'], 4, 1)}) | "
                        f"{ms(row.get('latency_p50'), 1)} ms")
            add("")
        share = r.get("server_share")
        if share:
            add(f"5c. The server's share of a joiner's first frame: {share['n']} count-only "
                "viewers (nothing decodes) join at once; each viewer's ICE connected -> the "
                f"server sends it its first frame (the cached keyframe): p50 "
                f"{ms(share['p50'], 1)} ms, p95 {ms(share['p95'], 1)} ms, max "
                f"{ms(share['max'], 1)} ms ({share['measured']}/{share['n']} measured)")
            add("   on the server alone, p50/p95 ms: ICE completed -> DTLS up "
                f"{'/'.join(ms(v, 1) for v in share['ice_to_dtls'])}, DTLS up -> first frame "
                f"sent {'/'.join(ms(v, 1) for v in share['dtls_to_first_frame'])}")
            add("")
        add("6. Targets")
        for line in self.verdicts():
            add(f"   {line}")
        for note in r["notes"]:
            add(f"   note: {note}")
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        r = self.results
        out = []
        scr = {row["n"]: row for row in r.get("scrubin", {}).get("cpu", [])}
        if scr:
            top = max(scr)
            v = scr[top]["cpu_per_viewer_s"]
            if v is not None:
                out.append(f"CPU {v:.4f} CPU-s/viewer-s at N={top} vs <= {TARGET_CPU}: "
                           f"{'met' if v <= TARGET_CPU else 'MISSED'}")
        d50 = r.get("direct", {}).get("latency_p50")
        for n, target in ((1, TARGET_ADDED_1), (32, TARGET_ADDED_32)):
            row = scr.get(n)
            if row and row.get("latency_p50") is not None and d50 is not None:
                added = row["latency_p50"] - d50
                out.append(f"server-added latency p50 with {n} viewer(s) {added * 1000:.1f} ms "
                           f"vs <= {target * 1000:.0f} ms: "
                           f"{'met' if added <= target else 'MISSED'}")
        for name, f in r.get("joins", {}).items():
            if f["n"] >= 30 and f["ice_first_p95"] is not None:
                where = (f"decoding in {f['processes']} worker processes" if f.get("processes")
                         else "all decoding in this one process")
                out.append(f"first decoded frame p95 after ICE, {name} ({where}): "
                           f"{f['ice_first_p95'] * 1000:.0f} ms vs <= "
                           f"{TARGET_FIRST_FRAME * 1000:.0f} ms: "
                           f"{'met' if f['ice_first_p95'] <= TARGET_FIRST_FRAME else 'MISSED'}")
        base_rows = {row["n"]: row for row in r.get("baseline", {}).get("cpu", [])}
        again_rows = {row["n"]: row for row in r.get("again", {}).get("cpu", [])}
        top_n = max(base_rows) if base_rows else None
        if top_n and scr.get(top_n) and base_rows[top_n]["cpu_per_viewer_s"]:
            ours = [t[top_n]["cpu_per_viewer_s"] for t in (scr, again_rows) if t.get(top_n)]
            ratio = statistics.fmean(ours) / base_rows[top_n]["cpu_per_viewer_s"]
            out.append(f"CPU per viewer-second at N={top_n} on the seam / before it: "
                       f"{ratio:.3f} vs <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'}")
        share = r.get("server_share")
        if share and share["p95"] is not None:
            out.append(f"server's share of a joiner's first frame ({share['n']} simultaneous): "
                       f"p95 {share['p95'] * 1000:.0f} ms vs <= 50 ms: "
                       f"{'met' if share['p95'] <= 0.050 else 'MISSED'}")
        per = r.get("rss_per_viewer_mb")
        if per is not None:
            out.append(f"RSS {per:.2f} MB/viewer vs <= {TARGET_RSS} MB: "
                       f"{'met' if per <= TARGET_RSS else 'MISSED'}")
        return out

    # -- main ------------------------------------------------------------------
    async def run(self) -> None:
        self.farm = Child(self.ctx, farm_main)
        try:
            for _ in range(self.plan.joiner_processes):
                self.joiners.append(Child(self.ctx, farm_main))
            print(f"joiner processes (spread burst): {[w.pid for w in self.joiners]}", flush=True)
            try:
                await self.run_scrubin(ns=[] if self.plan.only == "joins" else None)
            except Exception as exc:
                self.note(f"ScrubIn phase failed: {type(exc).__name__}: {exc}")
            if self.plan.only == "joins":
                return
            if self.left() > 30:
                try:
                    await self.run_relay()
                except Exception as exc:
                    self.note(f"MediaRelay phase failed: {type(exc).__name__}: {exc}")
            else:
                self.note("time budget: MediaRelay baseline skipped")
            # In-run baseline: the same server with its fast path off (aiortc's
            # RTCRtpSender packetizing per viewer), where the server has a fast path.
            if self.left() > 10 + len(self.plan.sender_ns) * (self.plan.window
                                                               + self.plan.settle + 4):
                try:
                    await self.run_scrubin("sender", {"fast_path": False},
                                           self.plan.sender_ns, full=False)
                except Exception as exc:
                    self.note(f"sender-path baseline not measured: {type(exc).__name__}: "
                              f"{str(exc)[:160]}")
            else:
                self.note("time budget: sender-path baseline skipped")
            if self.baseline is not None:
                # The code before a change, and the current code again right after,
                # so machine load hits both alike.
                for key, code in (("baseline", self.baseline), ("again", None)):
                    try:
                        await self.run_scrubin(key, None, self.plan.sender_ns, full=False,
                                               code=code)
                    except Exception as exc:
                        self.note(f"{key} not measured: {type(exc).__name__}: "
                                  f"{str(exc)[:160]}")

        finally:
            for worker in [self.farm, *self.joiners]:
                worker.stop(("exit", None))


def summarize_profile(path: str, n: int) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = []
            for frame in stack.split(";"):
                name, _, where = frame.partition(" (")
                where = where.rstrip(")")
                file = where.rsplit(":", 1)[0]
                parts = file.split("/")
                short = "/".join(parts[-2:]) if parts else file
                frames.append(f"{name} ({short})")
            if not frames:
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for name in set(frames):
                incl[name] = incl.get(name, 0) + count
    def top(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:40]]
    return {"n": n, "samples": total, "self": top(own), "inclusive": top(incl)}


def _f(value: float | None, width: int, digits: int) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, <= 2 minutes")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="py-spy the server for one extra window at the largest N "
                             "(needs py-spy in the venv); raw output to PREFIX.raw.txt")
    parser.add_argument("--joiner-processes", type=int, default=4, metavar="K",
                        help="also run the simultaneous joins spread over K worker processes "
                             "(default 4; 0: only in this process)")
    parser.add_argument("--only", choices=["joins"],
                        help="joins: only the server's share of a join and the join scenarios")
    parser.add_argument("--pin", action="store_true",
                        help="during the join scenarios, the server on half the CPUs and the "
                             "client processes on the other half")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure the server at git revision REV (e.g. the commit "
                             "before a change) at N=0 and 32, in the same run")
    args = parser.parse_args()
    plan = Plan.make(args.quick)
    plan.joiner_processes = max(0, args.joiner_processes)
    plan.only = args.only
    plan.pin = args.pin
    started = time.monotonic()
    stream = encode_stream(seconds=plan.stream_seconds)
    snapshot_dir = None
    if args.baseline:
        snapshot_dir = snapshot(args.baseline)
        plan.budget += 150
    bench = Bench(plan, stream, args.profile)
    if snapshot_dir is not None:
        bench.baseline = snapshot_dir.name
    bench.results["env"] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "aiortc": aiortc.__version__, "av": av.__version__, "platform": platform.platform(),
        "stream": (f"{stream.width}x{stream.height} {stream.fps:.0f} fps VP8, "
                   f"{stream.mean_bitrate / 1e6:.2f} Mbit/s as encoded "
                   f"(keyframe {stream.keyframe_bytes / 1000:.1f} kB, deltas "
                   f"{stream.delta_bytes_mean / 1000:.1f} kB), replayed from "
                   f"{len(stream.frames)} pre-encoded frames"),
        "plan": plan.__dict__,
        "code": code_version(),
        "baseline": args.baseline,
    }
    print(f"stream ready in {time.monotonic() - started:.1f} s: {bench.results['env']['stream']}",
          flush=True)
    asyncio.run(bench.run())
    bench.results["env"]["duration_s"] = time.monotonic() - started
    if snapshot_dir is not None:
        snapshot_dir.cleanup()
    text = bench.report()
    print(text)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(bench.results, fh, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
