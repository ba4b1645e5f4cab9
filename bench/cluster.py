"""Several Nodes benchmark: cross-Node interaction delay and Redis load.

    .venv/bin/python -m bench.cluster [--participants 100] [--samples 200] [--quick]
                                      [--json PATH]

Real parts: a redis-server of its own (free port, no persistence) and three
Nodes, each ``scrubin serve --workers 1`` in its own process, one configuration
file; websocket clients in this process.

Figures:

* **interaction delay**: the expert draws (``annotate``, a label carrying a
  sequence number) and a trainee receives the ``annotation`` event; delay =
  receive time − send time, one clock (same machine). Three paths:
  - same Node (baseline): expert and trainee on the Node that holds the
    Session;
  - expert on A → trainee on C: the expert on the holding Node A (where the
    expert's page is sent for its camera), the trainee's websocket on C;
  - expert on B → trainee on C: the expert's request forwarded from B to A,
    the event relayed to C (a page that has not moved, or a future edge Node).
* **Redis operations per second**: ``INFO stats`` ``total_commands_processed``
  over a window, with the Nodes idle and no participants, then with
  ``--participants`` websockets connected (a third on each Node), idle and
  then active (the expert draws 5/s, every trainee chats every 10 s);
  reported per 100 participants above the empty deployment, with the
  commands that make it up (``INFO commandstats``) and Redis's own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import unused_port
from redis.asyncio import Redis

from server.roles import Role
from server.tokens import NODE_WIDE, TokenAuthority

ROOT = Path(__file__).resolve().parent.parent
SESSION = "or1-live"
KEY = "bench:" + "b" * 40


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Deployment:
    folder: Path
    redis_port: int
    redis: subprocess.Popen[bytes] | None = None
    nodes: list[Node] = field(default_factory=list)

    def start(self, names: list[str], extra: str = "", workers: int = 1) -> None:
        """``extra``: more TOML (e.g. a ``[cluster]`` table) for every Node."""
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port",
             str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = self.folder / "scrubin.toml"
        config.write_text(f"""
[server]
host = "127.0.0.1"
[store]
redis_url = "redis://127.0.0.1:{self.redis_port}/0"
[auth]
signing_keys = ["{KEY}"]
[ice]
host_addresses = ["127.0.0.1"]
allowed_remote_networks = ["127.0.0.0/8"]
[limits]
websockets_per_person = 8
[[theatres]]
id = "or1"
slots = ["room"]
[[sessions]]
id = "{SESSION}"
theatre = "or1"
title = "Benchmark"
{extra}""")
        for name in names:
            node = Node(name, unused_port())
            env = {**os.environ, "SCRUBIN_SERVER_PORT": str(node.port),
                   "SCRUBIN_SERVER_NODE_ID": name,
                   "SCRUBIN_AUDIT_PATH": str(self.folder / name / "audit.jsonl"),
                   "SCRUBIN_RECORDING_ROOT": str(self.folder / name / "recordings")}
            node.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve",
                 "--config", str(config), "--workers", str(workers)], cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.nodes.append(node)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(20)
                except subprocess.TimeoutExpired:
                    node.process.kill()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)


async def wait_ready(http: aiohttp.ClientSession, node: Node, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{node.url}/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{node.name} did not start")


class Client:
    """A websocket participant; stamps every message it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.labels: dict[int, float] = {}
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data.get("type") == "annotation":
                text = data["annotation"]["shape"].get("text", "")
                if text.startswith("n"):
                    self.labels[int(text[1:])] = now
            request_id = data.get("id")
            if request_id in self.replies and not self.replies[request_id].done():
                self.replies[request_id].set_result(data)

    async def request(self, message: dict[str, Any], request_id: str) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[request_id] = future
        await self.ws.send_json({**message, "id": request_id})
        try:
            return await asyncio.wait_for(future, 10)
        finally:
            self.replies.pop(request_id, None)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def join(http: aiohttp.ClientSession, node: Node,
               token: str) -> tuple[Client, dict[str, Any]]:
    ws = await http.ws_connect(f"{node.url}/ws", max_msg_size=0)
    await ws.send_json({"type": "hello", "token": token, "id": "hello"})
    welcome = await ws.receive_json(timeout=15)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"refused: {welcome}")
    return Client(ws), welcome


async def redis_counters(redis: Redis) -> tuple[int, float, dict[str, int]]:
    stats = await redis.info("stats")
    cpu = await redis.info("cpu")
    commands = await redis.info("commandstats")
    per = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in commands.items()}
    return (int(stats["total_commands_processed"]),
            float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), per)


async def measure_redis(redis: Redis, seconds: float) -> dict[str, Any]:
    before = await redis_counters(redis)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = await redis_counters(redis)
    elapsed = time.monotonic() - started
    by_command = {k: round((after[2].get(k, 0) - before[2].get(k, 0)) / elapsed, 1)
                  for k in after[2]}
    return {"ops_per_s": round((after[0] - before[0] - 3) / elapsed, 1),  # our own INFOs
            "redis_cpu": round((after[1] - before[1]) / elapsed, 4),
            "by_command": {k: v for k, v in sorted(by_command.items(), key=lambda kv: -kv[1])
                           if v > 0}}


async def delays(expert: Client, trainee: Client, samples: int, rate: float,
                 first: int) -> list[float]:
    sent: dict[int, float] = {}
    for i in range(first, first + samples):
        shape = {"kind": "label", "color": "#ff3b30", "points": [[0.5, 0.5]], "text": f"n{i}"}
        sent[i] = time.perf_counter()
        await expert.ws.send_json({"type": "annotate", "feed": "room.video", "shape": shape,
                                   "fade_s": 1, "id": f"d{i}"})
        await asyncio.sleep(1 / rate)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(i in trainee.labels for i in sent):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return [(trainee.labels[i] - t) * 1000 for i, t in sent.items() if i in trainee.labels]


async def measure_delays(results: dict[str, Any], phase: str, expert_a: Client,
                         expert_b: Client, same: Client, far: Client, samples: int) -> None:
    """Drawings at 8/s (under the expert's limit of 10/s), three paths; the
    machine's CPU use meanwhile (it is shared: tails are pessimistic)."""
    psutil.cpu_percent()
    base = {"alone": 0, "crowd": 100_000}[phase]
    for key, expert, trainee, first in (("same_node", expert_a, same, base),
                                        ("a_to_c", expert_a, far, base + 10_000),
                                        ("b_to_c", expert_b, far, base + 20_000)):
        results[f"delay_{phase}_{key}"] = summary(
            await delays(expert, trainee, samples, 8, first), samples)
    results[f"machine_busy_{phase}"] = round(psutil.cpu_percent() / 100 * psutil.cpu_count(), 2)


def summary(values: list[float], asked: int) -> dict[str, Any]:
    return {"n": len(values), "lost": asked - len(values),
            "p50_ms": round(percentile(values, 50), 2), "p95_ms": round(percentile(values, 95), 2),
            "p99_ms": round(percentile(values, 99), 2),
            "mean_ms": round(statistics.fmean(values), 2) if values else None}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = TokenAuthority([KEY])
    admin = tokens.issue(NODE_WIDE, Role.ADMIN)
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    deployment = Deployment(folder, unused_port())
    deployment.start(["node-a", "node-b", "node-c"])
    results: dict[str, Any] = {"participants": args.participants, "samples": args.samples}
    clients: list[Client] = []
    redis = Redis(port=deployment.redis_port, decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            for node in deployment.nodes:
                await wait_ready(http, node)
            holder = None
            for _ in range(100):
                for node in deployment.nodes:
                    async with http.get(f"{node.url}/api/admin/nodes", headers={
                            "Authorization": f"Bearer {admin}"}) as response:
                        if SESSION in (await response.json())["holds"]:
                            holder = node
                if holder is not None:
                    break
                await asyncio.sleep(0.1)
            assert holder is not None, "nobody holds the Session"
            a = holder
            b, c = (n for n in deployment.nodes if n is not holder)
            # A camera, so drawings have a Feed to go on.
            from aiortc import RTCPeerConnection, RTCSessionDescription
            from aiortc.mediastreams import VideoStreamTrack

            from server.media.hooks import advertise_host_addresses
            from server.publish.whip import post_offer

            camera = RTCPeerConnection()
            camera.addTransceiver(VideoStreamTrack(), direction="sendonly")
            advertise_host_addresses(camera, ["127.0.0.1"])
            await camera.setLocalDescription(await camera.createOffer())
            status, answer, _, _, _ = await post_offer(
                http, f"{a.url}/whip/{SESSION}/room", camera.localDescription.sdp,
                tokens.issue(SESSION, Role.EXPERT, name="Camera"))
            assert status == 201, answer
            await camera.setRemoteDescription(RTCSessionDescription(answer, "answer"))

            await asyncio.sleep(2)
            results["redis_empty"] = await measure_redis(redis, args.window)

            expert_a, _ = await join(http, a, tokens.issue(SESSION, Role.EXPERT, name="Expert"))
            expert_b, _ = await join(http, b, tokens.issue(SESSION, Role.EXPERT, name="Expert B"))
            clients += [expert_a, expert_b]
            trainees: dict[str, list[Client]] = {"a": [], "b": [], "c": []}
            for where, node in (("a", a), ("c", c)):
                client, _ = await join(http, node, tokens.issue(
                    SESSION, Role.TRAINEE, name=f"Measuring trainee on {where}"))
                trainees[where].append(client)
                clients.append(client)
            # Delays with only the measuring participants (the paths alone).
            await measure_delays(results, "alone", expert_a, expert_b, trainees["a"][0],
                                 trainees["c"][0], args.samples)
            before_joins = (await redis_counters(redis))[0]
            for i in range(args.participants - 4):
                where = "abc"[i % 3]
                node = {"a": a, "b": b, "c": c}[where]
                client, _ = await join(http, node, tokens.issue(
                    SESSION, Role.TRAINEE, name=f"Trainee {i}"))
                trainees[where].append(client)
                clients.append(client)
            results["redis_ops_per_join"] = round(
                ((await redis_counters(redis))[0] - before_joins) / (args.participants - 4), 1)
            await asyncio.sleep(2)
            results["redis_idle"] = await measure_redis(redis, args.window)

            # Active: the expert draws 5/s; every trainee chats every 10 s.
            stop = asyncio.Event()

            async def chatter(client: Client, index: int) -> None:
                await asyncio.sleep(index * 10 / max(1, len(clients)))
                n = 0
                while not stop.is_set():
                    with contextlib.suppress(Exception):
                        await client.ws.send_json({"type": "chat", "text": "ok",
                                                   "id": f"chat{n}"})
                    n += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 10)

            async def drawer() -> None:
                n = 100_000
                while not stop.is_set():
                    shape = {"kind": "arrow", "color": "#00ff00",
                             "points": [[0.1, 0.1], [0.2, 0.2]]}
                    await expert_a.ws.send_json({"type": "annotate", "feed": "room.video",
                                                 "shape": shape, "fade_s": 1, "id": f"x{n}"})
                    n += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)

            everyone = [t for group in trainees.values() for t in group]
            load = [asyncio.ensure_future(chatter(t, i)) for i, t in enumerate(everyone)]
            load.append(asyncio.ensure_future(drawer()))
            await asyncio.sleep(3)
            results["redis_active"] = await measure_redis(redis, args.window)
            stop.set()
            await asyncio.gather(*load)
            await asyncio.sleep(1)

            # And with every participant connected (each drawing goes to all).
            await measure_delays(results, "crowd", expert_a, expert_b, trainees["a"][0],
                                 trainees["c"][0], args.samples)
            await camera.close()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        await redis.aclose()
        deployment.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def report(results: dict[str, Any]) -> str:
    lines = ["Several Nodes: 3 Nodes (one process each) on one Redis, one Session held by A",
             f"load average {os.getloadavg()[0]:.1f} on {psutil.cpu_count()} cores at the end"]
    for phase, title in (("alone", "4 participants"),
                         ("crowd", f"{results['participants']} participants")):
        lines += ["", f"Interaction delay, {title} (annotate sent -> annotation received), ms; "
                      f"machine busy {results[f'machine_busy_{phase}']} cores:"]
        for key, label in (("same_node", "same Node (baseline)"),
                           ("a_to_c", "expert on A -> trainee on C"),
                           ("b_to_c", "expert on B -> trainee on C")):
            d = results[f"delay_{phase}_{key}"]
            lines.append(f"  {label:30} p50 {d['p50_ms']:7.2f}  p95 {d['p95_ms']:7.2f}  "
                         f"p99 {d['p99_ms']:7.2f}  (n={d['n']}, lost {d['lost']})")
        base = results[f"delay_{phase}_same_node"]
        lines.append("  ratio to the same Node, p50 / p95: A->C " + " / ".join(
            f"{results[f'delay_{phase}_a_to_c'][q] / base[q]:.2f}" for q in ("p50_ms", "p95_ms"))
            + ", B->C " + " / ".join(
            f"{results[f'delay_{phase}_b_to_c'][q] / base[q]:.2f}" for q in ("p50_ms", "p95_ms")))
    n = results["participants"]
    empty = results["redis_empty"]["ops_per_s"]
    lines += ["", f"Redis operations per second ({n} participants, a third on each Node):",
              f"  empty deployment (3 Nodes, 1 camera): {empty:8.1f}"]
    for key, label in (("redis_idle", "idle"), ("redis_active", "active")):
        r = results[key]
        per_100 = (r["ops_per_s"] - empty) * 100 / n
        top = ", ".join(f"{k} {v}" for k, v in list(r["by_command"].items())[:6])
        lines.append(f"  {label:6} {r['ops_per_s']:8.1f}  -> {per_100:7.1f} per 100 participants"
                     f"  (Redis CPU {r['redis_cpu'] * 100:.1f} % of a core; {top})")
    lines.append(f"  joining: {results['redis_ops_per_join']} operations per participant")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds per Redis window (a multiple of the 5 s presence refresh)")
    parser.add_argument("--quick", action="store_true", help="30 participants, 60 samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.participants, args.samples, args.window = 30, 60, 10.0
    results = asyncio.run(run(args))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
