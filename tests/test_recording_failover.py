"""A Session's recording follows the Session when it moves between Nodes
(issue 12): one Recording, parts from both Nodes, the same consent, the gap in
the manifest, listed and played as one recording.

Real parts: a real redis-server, real aiortc publishers over loopback, the
real recorder writing into one recordings root that both Nodes share. The
drain runs with two Nodes in this process (tests/test_cluster.py's pattern);
the crash with two `scrubin serve` processes, the holder killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp.test_utils import unused_port
from pytest_redis.executor import RedisExecutor

from recorder.recording import MANIFEST
from server.app import drain
from server.http.common import REGISTRY, STORE
from server.http.review import RECORDINGS
from server.publish.synthetic import SyntheticTheatreCamera
from server.publish.whip import WhipOptions, WhipPublisher
from server.recordings import RESCAN_S
from server.roles import Role

from .admin_helpers import api
from .conftest import LOOPBACK, Server, client_pc, offer_sdp, wait_for
from .test_cluster import (  # noqa: F401  (fixtures)
    CONSENT,
    cluster_redis,
    hello,
    holders,
)
from .test_failover import two_nodes_one_root  # noqa: F401  (fixture)
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
from .test_ws_protocol import WS

pytestmark = pytest.mark.slow

SESSION = "or1-live"


async def publish(http: aiohttp.ClientSession, entry: Server, token: str) -> Any:
    """A camera publishing slot room, asking ``entry`` (a 307 to the Node that
    holds the Session is followed, as RFC 9725 clients do)."""
    from aiortc import RTCSessionDescription, VideoStreamTrack

    pc = client_pc()
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    sdp = await offer_sdp(pc)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    url = f"{entry.base_url}/whip/{SESSION}/room"
    for _ in range(2):
        async with http.post(url, data=sdp, headers=headers,
                             allow_redirects=False) as response:
            if response.status == 307:
                url = response.headers["Location"]
                continue
            assert response.status == 201, await response.text()
            answer = await response.text()
            break
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc


def manifest_of(root: Path) -> tuple[str, dict[str, Any]]:
    """The one Recording under ``root``: its id and manifest."""
    [directory] = [d for d in root.iterdir() if d.is_dir()]
    return directory.name, json.loads((directory / MANIFEST).read_text(encoding="utf-8"))


def recording_ids(root: Path) -> list[str]:
    return [d.name for d in root.iterdir() if d.is_dir()]


def recorded_by(root: Path, node: str, min_bytes: int = 4000) -> str:
    """'' once a part written by ``node`` holds some media."""
    try:
        _, manifest = manifest_of(root)
    except (ValueError, OSError):
        return "no recording yet"
    for feed in manifest.get("feeds", []):
        for part in feed.get("parts", []):
            file = root / manifest["id"] / part["file"]
            if part.get("node") == node and file.is_file() \
                    and file.stat().st_size >= min_bytes:
                return ""
    return f"nothing recorded by {node} yet"


def check_one_recording(root: Path, manifest: dict[str, Any], before: str, after: str,
                        consent: dict[str, Any], moved_wall: tuple[float, float]) -> None:
    """The manifest after the move: one Recording, its parts from both Nodes
    (each plays with PyAV), the same consent, and a gap that covers the time
    nothing could be recorded (on the one Session clock)."""
    assert manifest["state"] == "stopped", manifest["state"]
    assert manifest["consent"] == consent
    [video] = [f for f in manifest["feeds"] if f["id"] == "room.video"]
    parts = video["parts"]
    nodes = [p["node"] for p in parts]
    assert before in nodes and after in nodes, nodes
    assert nodes == sorted(nodes, key=[before, after].index), nodes  # old ones first
    assert [p["index"] for p in parts] == sorted({p["index"] for p in parts})
    for part in parts:
        assert part["complete"], part
        with av.open(str(root / manifest["id"] / part["file"])) as container:
            stream = container.streams.video[0]
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        assert frames == part["frames"] > 0, part
    [gap] = manifest["gaps"]
    assert gap["reason"] == "origin_moved"
    assert (gap["from_node"], gap["to_node"]) == (before, after)
    last_before = max(p["start"] + p["duration"] for p in parts if p["node"] == before)
    first_after = min(p["start"] for p in parts if p["node"] == after)
    assert gap["start"] == round(last_before, 3), (gap, parts)
    assert gap["end"] == round(first_after, 3), (gap, parts)
    assert manifest["started_t"] <= gap["start"] < gap["end"] <= manifest["ended_t"]
    # The Session clock is the same on both Nodes: the gap is where the wall
    # clock says the media stopped and came back.
    zero = manifest["clock_zero_unix"]
    stopped_at, back_at = moved_wall
    assert zero + gap["start"] <= stopped_at + 0.5, (zero + gap["start"], stopped_at)
    assert zero + gap["end"] >= back_at - 0.5, (zero + gap["end"], back_at)
    print(f"gap {gap['start']:.3f} .. {gap['end']:.3f} s ({gap['end'] - gap['start']:.2f} s; "
          f"media stopped at most {stopped_at - zero - gap['start']:.2f} s before the move, "
          f"came back {zero + gap['end'] - back_at:.2f} s after the publisher did)")


async def test_a_recording_continues_on_the_node_a_drained_node_hands_its_session_to(
        two_nodes_one_root: list[Server],  # noqa: F811
        http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    nodes_ = two_nodes_one_root
    await wait_for(lambda: "" if len(holders(nodes_)) == 1 else "no single holder")
    holder = holders(nodes_)[0]
    other = next(s for s in nodes_ if s is not holder)
    before, after = holder.config.server.node_id, other.config.server.node_id
    tokens = holder.tokens
    root = Path(holder.config.recording.root)

    pc = await publish(http, holder, tokens.issue(SESSION, Role.EXPERT))
    try:
        expert, _ = await hello(http, holder, tokens.issue(SESSION, Role.EXPERT,
                                                           name="Dr Grey"), sockets)
        started = await request(expert, {"type": "start_recording", "consent": CONSENT})
        assert started["recording"]["state"] == "on", started
        await wait_for(lambda: recorded_by(root, before), timeout=15)
        recording_id, first = manifest_of(root)
        consent = first["consent"]
        assert {k: consent[k] for k in CONSENT} == CONSENT
        shared = await holder.app[STORE].recordings.get_live_recording(SESSION)
        assert shared is not None and shared.recording_id == recording_id
        assert shared.node_id == before and shared.consent == consent

        stopped_at = time.time()
        await drain(holder.app, grace_s=1.0)
    finally:
        await pc.close()
    handed = manifest_of(root)[1]
    assert handed["state"] == "recording" and handed["ended_t"] is None
    assert all(p["complete"] for f in handed["feeds"] for p in f["parts"])
    # Nobody holds the Session yet: a Node that looks at the root lists the
    # recording as going on and does not finish it (the store says it goes on).
    reviewer = tokens.issue(SESSION, Role.REVIEWER, name="Rita Reviewer")
    await asyncio.sleep(RESCAN_S)
    _, listed = await api(http, other, "GET", f"/api/sessions/{SESSION}/recordings",
                          reviewer, expect=200)
    assert [(e["id"], e["state"]) for e in listed["recordings"]] == [(recording_id,
                                                                       "recording")]
    assert manifest_of(root)[1] == handed

    # The publisher goes to the other Node, which takes the Session.
    back_at = time.time()
    pc = await publish(http, other, tokens.issue(SESSION, Role.EXPERT))
    try:
        await wait_for(lambda: recorded_by(root, after), timeout=20)
        session = other.app[REGISTRY].sessions[SESSION]
        assert session.interaction.started_at == first["clock_zero_unix"]
        shared = await other.app[STORE].recordings.get_live_recording(SESSION)
        assert shared is not None and shared.node_id == after
        assert shared.recording_id == recording_id and shared.consent == consent
        expert, welcome = await hello(http, other, tokens.issue(SESSION, Role.EXPERT,
                                                                name="Dr Grey"), sockets)
        assert welcome["type"] == "welcome", welcome
        stopped = await request(expert, {"type": "stop_recording"})
        assert stopped["type"] == "ok", stopped
    finally:
        await pc.close()

    assert recording_ids(root) == [recording_id]
    manifest = manifest_of(root)[1]
    check_one_recording(root, manifest, before, after, consent, (stopped_at, back_at))
    assert await other.app[STORE].recordings.get_live_recording(SESSION) is None

    # The review API lists one recording, its parts from both Nodes, the gap.
    await asyncio.sleep(RESCAN_S)
    for asked in (other, holder):
        _, listed = await api(http, asked, "GET", f"/api/sessions/{SESSION}/recordings",
                              reviewer, expect=200)
        [entry] = listed["recordings"]
        assert entry["id"] == recording_id and entry["state"] == "stopped"
    # The drained Node, still up, has nothing of it left to finish: its
    # maintenance leaves the recording the other Node completed as it is.
    await holder.app[RECORDINGS].maintain()
    assert manifest_of(root)[1] == manifest
    _, detail = await api(http, other, "GET", f"/api/recordings/{recording_id}", reviewer,
                          expect=200)
    assert detail["recording"]["gaps"] == manifest["gaps"]
    assert detail["recording"]["consent"] == consent
    [feed] = [f for f in detail["recording"]["feeds"] if f["id"] == "room.video"]
    assert {p["node"] for p in feed["parts"]} == {before, after}
    for part in feed["parts"]:
        async with http.get(f"{other.base_url}{part['url']}") as response:
            assert response.status == 200
            assert len(await response.read()) > 1000


async def test_a_recording_continues_on_the_node_that_takes_the_session_from_a_dead_one(
        multinode_redis: RedisExecutor,  # noqa: F811
        processes: list[NodeProcess],  # noqa: F811
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two `scrubin serve` processes on one Redis and one recordings root;
    the holder is killed (SIGKILL) mid-part. The publisher falls back to the
    other Node, which takes the Session once the lease expires and continues
    the recording: the dead Node's open part finished (repaired), new parts
    after the gap."""
    config = write_config(tmp_path, multinode_redis)  # lease_ttl_s 3, node_ttl_s 2.5
    root = tmp_path / "recordings"
    two = [NodeProcess(name, config, unused_port(), env={"SCRUBIN_RECORDING_ROOT": str(root)})
           for name in ("node-a", "node-b")]
    processes.extend(two)
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in two))
    origin = await the_holder(http, two)
    other = next(n for n in two if n is not origin)

    camera = SyntheticTheatreCamera(320, 180, 15, label="room")
    publisher = WhipPublisher(
        f"{origin.base_url}/whip/{SESSION}/room",
        TOKENS.issue(SESSION, Role.EXPERT, name="Room camera"), [camera],
        WhipOptions(host_addresses=LOOPBACK, fallback_urls=[other.base_url]))
    publishing = asyncio.ensure_future(publisher.run())
    expert = TOKENS.issue(SESSION, Role.EXPERT, name="Dr Grey")
    try:
        await api(http, origin, "POST", f"/api/sessions/{SESSION}/recording", expert,
                  {"consent": CONSENT}, expect=201)
        await wait_for(lambda: recorded_by(root, origin.name), timeout=20)
        recording_id, first = manifest_of(root)
        consent = first["consent"]

        origin.stop(signal.SIGKILL)
        killed_at = time.time()
        crashed = manifest_of(root)[1]
        assert crashed["state"] == "recording"
        assert any(not p["complete"] for f in crashed["feeds"] for p in f["parts"])
        await wait_for(lambda: recorded_by(root, other.name), timeout=30)
        assert publisher.url == f"{other.base_url}/whip/{SESSION}/room"
        await api(http, other, "DELETE", f"/api/sessions/{SESSION}/recording", expert,
                  expect=200)
    finally:
        publisher.stop()
        await asyncio.wait_for(publishing, 15)

    assert recording_ids(root) == [recording_id]
    manifest = manifest_of(root)[1]
    check_one_recording(root, manifest, origin.name, other.name, consent,
                        (killed_at, killed_at))
    [video] = [f for f in manifest["feeds"] if f["id"] == "room.video"]
    cut = [p for p in video["parts"] if p["node"] == origin.name][-1]
    assert cut["repaired"] and cut["ended_by"] == "interrupted", cut

    reviewer = TOKENS.issue(SESSION, Role.REVIEWER, name="Rita Reviewer")
    listed = await get_json(http, f"{other.base_url}/api/sessions/{SESSION}/recordings",
                            reviewer)
    assert [(e["id"], e["state"]) for e in listed["recordings"]] == [(recording_id, "stopped")]
    assert "Traceback" not in other.text(), other.text()[-3000:]
