"""TURN benchmark: server CPU per relayed viewer vs per direct viewer.

    .venv/bin/python -m bench.turn [--quick] [--json PATH]

Prints figures and checks nothing. Everything runs on 127.0.0.1, in one run:

* a real coturn (``tests/coturn.py``: loopback, random ports, bounded);
* the server under test alone in its process (``bench.servers``), one Feed
  (the pre-encoded 720p30 VP8 stream of ``bench.stream``, ~1.5 Mbit/s);
* N count-only viewers in a farm process (``bench.farm``).

Two server configurations, each measured with no viewer (the publisher
alone), N direct viewers, and N relay-only viewers reaching the server only
through coturn over UDP, each with its own credentials from
``GET /api/sessions/{session}``:

* ``default``: ``ice.node_servers`` empty, the Node allocates no relay and
  sends to each relayed viewer's relay address from its host candidate;
* ``node relays``: ``ice.node_servers`` = the same coturn, so the Node also
  allocates a relay per peer connection (how it behaved before the Node's ICE
  servers were separated from the clients').

Figures: server cores, CPU-s per viewer-second (N viewers) and marginal
(cores(N) - cores(0)) / N, viewer frame rate and packet loss, the
Subscriptions' send path, and coturn's cores. Direct and relayed windows
alternate over several rounds (the machine is shared; the report gives the
median and the range).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import aiortc
import psutil

from server.media.turn import turn_credential, turn_username
from server.roles import Role
from server.tokens import TokenAuthority
from tests.coturn import Coturn, running_coturn

from .farm import farm_main
from .live_path import Child, code_version, cpu_seconds, free_port, machine_busy
from .peers import publish
from .servers import FEED, SESSION, SLOT, scrubin_main
from .stream import PacketReplayTrack, StampBook, encode_stream

DISTURBED_CORES = 0.5  # other processes' load that makes a window worth measuring again


class TurnBench:
    def __init__(self, quick: bool, configs: tuple[str, ...] = ("default", "node")) -> None:
        self.quick = quick
        self.configs = configs
        self.n = 8 if quick else 16
        self.rounds = 1 if quick else 3
        self.window_s = 5.0 if quick else 8.0
        self.settle_s = 2.0 if quick else 3.0
        self.ctx = multiprocessing.get_context("spawn")
        self.key = "bench:" + "k" * 40
        self.tokens = TokenAuthority([self.key])
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.stream = encode_stream(seconds=10.0)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    async def run(self) -> None:
        with running_coturn() as coturn:
            farm = Child(self.ctx, farm_main)
            try:
                if "default" in self.configs:
                    await self.configuration("default", {"turn": {
                        "urls": [coturn.url("udp")], "secret": coturn.secret}}, coturn, farm)
                if "node" in self.configs:
                    username = turn_username(int(time.time()) + 3600, "bench-node")
                    node = [{"urls": [coturn.url("udp")], "username": username,
                             "credential": turn_credential(coturn.secret, username)}]
                    await self.configuration("node relays", {
                        "turn": {"urls": [coturn.url("udp")], "secret": coturn.secret},
                        "ice": {"node_servers": node}}, coturn, farm)
            finally:
                farm.stop(("exit", None))

    async def configuration(self, name: str, sections: dict[str, Any], coturn: Coturn,
                            farm: Child) -> None:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        whep = f"{base}/whep/{SESSION}/{FEED}"
        server = Child(self.ctx, scrubin_main, port, self.key, {}, (SLOT,), sections)
        print(f"{name}: server pid {server.pid} on {base}", flush=True)
        track = PacketReplayTrack(self.stream, StampBook())
        http = aiohttp.ClientSession()
        publisher = None
        try:
            publisher = await publish(http, f"{base}/whip/{SESSION}/{SLOT}",
                                      self.tokens.issue(SESSION, Role.EXPERT), track)
            await self.until_feed(http, base)
            await asyncio.sleep(self.settle_s)
            args = (server.pid, coturn, farm, http, base)
            await self.measure(name, "publisher only", 0, *args)
            # Alternating, so a slow spell of the shared machine does not land
            # on one kind only; the report takes the median of the rounds.
            for round_ in range(self.rounds):
                kinds = ("direct", "relayed") if round_ % 2 == 0 else ("relayed", "direct")
                for kind in kinds:
                    await self.join(name, kind, farm, http, base, whep)
                    await self.measure(name, kind, self.n, *args)
                    await farm.call("close")
                    await asyncio.sleep(self.settle_s)
            await self.measure(name, "publisher only", 0, *args)
        finally:
            if publisher is not None:
                await publisher.close()
            await http.close()
            server.stop()

    async def join(self, name: str, kind: str, farm: Child, http: aiohttp.ClientSession,
                   base: str, whep: str) -> None:
        tokens = [self.tokens.issue(SESSION, Role.TRAINEE) for _ in range(self.n)]
        ices: list[dict[str, Any]] = [{}] * self.n
        if kind == "relayed":  # each with its own credentials, as a page gets them
            ices = [{"servers": await self.ice_servers(http, base, t), "relay_only": True}
                    for t in tokens]
        joined = await farm.call("join", (whep, tokens, ices), timeout=90)
        failed = [r["error"] or "no frame" for r in joined
                  if r["error"] or r["t_first_frame"] is None]
        if failed:
            self.note(f"{name}/{kind}: {len(failed)} viewers failed: {failed[0]}")
        await asyncio.sleep(self.settle_s)

    async def until_feed(self, http: aiohttp.ClientSession, base: str) -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            feeds = (await self.stats(http, base))["feeds"]
            if feeds.get(FEED, {}).get("frames_received", 0) > 30:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the server's Feed received no frames within 15 s")

    @staticmethod
    async def stats(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
        async with http.get(f"{base}/bench/stats",
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            return dict(await response.json())

    @staticmethod
    async def ice_servers(http: aiohttp.ClientSession, base: str, token: str) -> Any:
        async with http.get(f"{base}/api/sessions/{SESSION}",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            return (await response.json())["ice_servers"]

    async def measure(self, config: str, kind: str, n: int, server_pid: int, coturn: Coturn,
                      farm: Child, http: aiohttp.ClientSession, base: str) -> None:
        row = await self.window(config, kind, n, server_pid, coturn, farm, http, base)
        if row["other_cores"] > DISTURBED_CORES:
            self.print_row(row, "(disturbed)")
            again = await self.window(config, kind, n, server_pid, coturn, farm, http, base)
            row = min(row, again, key=lambda r: r["other_cores"])
            row["remeasured"] = True
        self.rows.append(row)
        self.print_row(row)

    async def window(self, config: str, kind: str, n: int, server_pid: int, coturn: Coturn,
                     farm: Child, http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
        counts0 = await farm.call("counts") if n else []
        inbound0 = await farm.call("inbound") if n else []
        pids = (server_pid, coturn.process.pid, farm.pid, psutil.Process().pid)
        c0 = [cpu_seconds(p) for p in pids] + [machine_busy()]
        sys0 = psutil.Process(server_pid).cpu_times().system
        t0 = time.monotonic()
        await asyncio.sleep(self.window_s)
        c1 = [cpu_seconds(p) for p in pids] + [machine_busy()]
        sys1 = psutil.Process(server_pid).cpu_times().system
        elapsed = time.monotonic() - t0
        counts1 = await farm.call("counts") if n else []
        inbound1 = await farm.call("inbound") if n else []
        stats = await self.stats(http, base)
        received = sum(i[0] for i in inbound1) - sum(i[0] for i in inbound0)
        lost = sum(i[1] for i in inbound1) - sum(i[1] for i in inbound0)
        fps = [(f1 - f0) / elapsed for (f0, _), (f1, _) in zip(counts0, counts1, strict=True)]
        used = [(b - a) / elapsed for a, b in zip(c0, c1, strict=True)]
        return {
            "config": config, "kind": kind, "n": n, "seconds": elapsed,
            "server_cores": used[0], "coturn_cores": used[1], "viewer_cores": used[2],
            # Kernel time: on loopback it includes delivering into the receiver's socket.
            "server_system_cores": (sys1 - sys0) / elapsed,
            "other_cores": max(0.0, used[4] - sum(used[:4])),
            "fps_mean": statistics.fmean(fps) if fps else None,
            "fps_min": min(fps) if fps else None,
            "paths": dict(Counter(s.get("path", "?") for s in stats["subscriptions"])),
            # Packets the viewers received, and lost on first transmission (NACKed).
            "packets": received, "lost": lost,
        }

    @staticmethod
    def print_row(row: dict[str, Any], tag: str = "") -> None:
        fps = "-" if row["fps_mean"] is None else f"{row['fps_mean']:.1f}/{row['fps_min']:.1f}"
        print(f"  {row['config']:<12} {row['kind']:<15} N={row['n']:<3} server "
              f"{row['server_cores']:.3f} cores, coturn {row['coturn_cores']:.3f}, fps {fps}, "
              f"lost {row['lost']}/{row['packets']}, paths {row['paths']}, "
              f"others {row['other_cores']:.2f} {tag}", flush=True)

    def report(self) -> str:
        lines = ["", "Server CPU per viewer, one 720p30 VP8 Feed, "
                 f"N = {self.n} viewers, {self.window_s:.0f} s windows, "
                 f"{self.rounds} alternating round(s) per kind (median; min-max)",
                 "",
                 "| Node's ICE servers | viewers | server cores | CPU-s per viewer-s "
                 "| marginal per viewer | ÷ direct | of which kernel | fps min | packets lost "
                 "| send path | coturn cores |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for config in dict.fromkeys(r["config"] for r in self.rows):
            rows = [r for r in self.rows if r["config"] == config]
            idle = [r["server_cores"] for r in rows if r["kind"] == "publisher only"]
            base = statistics.fmean(idle) if idle else 0.0
            lines.append(f"| {config} | publisher only | {base:.3f} | - | - | - | - | - | - "
                         f"| - | - |")
            idle_sys = statistics.fmean(r["server_system_cores"] for r in rows
                                        if r["kind"] == "publisher only")
            marginal: dict[str, list[float]] = {}
            for r in rows:
                if r["n"]:
                    marginal.setdefault(r["kind"], []).append(
                        (r["server_cores"] - base) / r["n"])
            direct = statistics.median(marginal["direct"]) if "direct" in marginal else None
            for kind, values in marginal.items():
                of_kind = [r for r in rows if r["kind"] == kind]
                cores = statistics.median(r["server_cores"] for r in of_kind)
                mid = statistics.median(values)
                ratio = mid / direct if direct else None
                kernel = statistics.median((r["server_system_cores"] - idle_sys) / r["n"]
                                           for r in of_kind)
                paths = Counter[str]()
                for r in of_kind:
                    paths.update(r["paths"])
                lines.append(
                    f"| {config} | {kind} | {cores:.3f} | {cores / self.n:.4f} | {mid:.4f} "
                    f"({min(values):.4f}-{max(values):.4f}) | {_f(ratio, 2)} | {kernel:.4f} | "
                    f"{min(r['fps_min'] for r in of_kind):.1f} | "
                    f"{sum(r['lost'] for r in of_kind)} of {sum(r['packets'] for r in of_kind)} | "
                    f"{', '.join(f'{k} {v}' for k, v in paths.items())} | "
                    f"{statistics.median(r['coturn_cores'] for r in of_kind):.3f} |")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N=8, 5 s windows, one round (~1.5 minutes; full ~5)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--configs", default="default,node",
                        help="which server configurations: default (no relays of the Node's "
                             "own), node (ice.node_servers = the same coturn)")
    args = parser.parse_args()
    started = time.monotonic()
    bench = TurnBench(args.quick, tuple(c.strip() for c in args.configs.split(",")))
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "python": platform.python_version(), "aiortc": aiortc.__version__,
           "code": code_version(), "cpus": psutil.cpu_count()}
    print(f"{env}", flush=True)
    asyncio.run(bench.run())
    print(bench.report())
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "rows": bench.rows, "notes": bench.notes}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
