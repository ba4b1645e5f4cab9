"""A Node that dies while recording, and a disk that fills up: a real server
process records stamped media (two VP8 cameras, an H.264 camera, a tone),
is killed with SIGKILL, and the next Node start finishes the recording; a
server process whose recording disk (a small tmpfs of its own) fills up
writes its index and final manifest again once space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from server.http.common import AUDIT
from server.http.review import RECORDINGS
from server.roles import Role

from .conftest import make_config, start_server, wait_for
from .test_recorder import FFPROBE, decode_video, ffprobe, sha256

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

#: A Node recording three cameras and a tone through the real recording control
#: (Recordings.start, as the websocket's start_recording), dumping the cameras'
#: stamp times beside the recordings; it runs until it is killed.
NODE_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    import aiohttp
    from server.http.review import RECORDINGS
    from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone
    from server.recordings import check_consent
    from tests.conftest import make_config, start_server, whip_publish
    from tests.recording_helpers import CONSENT
    from tests.test_recorder import publish_h264

    async def main():
        root, stamps = sys.argv[1], sys.argv[2]
        server, runner = await start_server(make_config(recording={
            "root": root, "repair_retry_s": 0.5}))
        cameras = {"room.video": SyntheticTheatreCamera(320, 180, 15, label="room"),
                   "narration.video": SyntheticTheatreCamera(320, 180, 15, label="overhead"),
                   "endoscope.video": SyntheticTheatreCamera(320, 180, 15, label="endoscope")}
        async with aiohttp.ClientSession() as http:
            await whip_publish(http, server, "room", [cameras["room.video"], SyntheticTone()])
            await whip_publish(http, server, "narration", [cameras["narration.video"]])
            await publish_h264(http, server, "endoscope", cameras["endoscope.video"])
            session = server.session()
            while len(session.feeds) < 4 or not all(
                    f.frames_received > 15 for f in session.feeds.values()):
                await asyncio.sleep(0.05)
            recordings = server.app[RECORDINGS]
            recording = await recordings.start(session, check_consent(CONSENT), by=None)
            print("recording", recording.id, flush=True)
            while True:  # the test's commands, one a line
                command = (await asyncio.to_thread(sys.stdin.readline)).strip()
                if not command:
                    await asyncio.sleep(3600)
                if command == "stamps":
                    data = {f: c.last_stamp_times for f, c in cameras.items()}
                    with open(stamps + ".tmp", "w") as fh:
                        json.dump(data, fh)
                    os.replace(stamps + ".tmp", stamps)
                elif command == "status":
                    live = recordings.status(session)
                    entry = recordings.index.get(recording.id, {})
                    print("status", json.dumps({"live": live, "dirty": recordings.index_dirty,
                                                "state": entry.get("state")}), flush=True)
                print("done", command, flush=True)

    asyncio.run(main())
""")


class Node:
    """The server process, driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self, prefix: str, timeout: float = 60) -> str:
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
            if not raw:
                raise AssertionError("the Node process ended")
            text = raw.decode().strip()
            if text.startswith(prefix):
                return text

    async def command(self, command: str) -> str | None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        answer = None
        while True:
            text = await self.line("")
            if text == f"done {command}":
                return answer
            if text.startswith(command):
                answer = text[len(command):].strip()


@contextlib.asynccontextmanager
async def node_process(tmp_path: Path, root: Path, *, prefix: tuple[str, ...] = ()
                       ) -> AsyncIterator[Node]:
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    log = (tmp_path / "node-stderr.txt").open("wb")
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, str(script), str(root), str(tmp_path / "stamps.json"),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
    try:
        yield Node(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()


def stamp_residuals(directory: Path, manifest: dict[str, Any], feed_id: str,
                    stamps: dict[str, float]) -> list[float]:
    """Per recorded frame: where the recording placed it (Session clock) minus
    when the camera made it (its stamp on the same clock)."""
    zero = manifest["clock_zero_unix"]
    out = []
    for feed in manifest["feeds"]:
        if feed["id"] != feed_id:
            continue
        for part in feed["parts"]:
            for t, counter, _ in decode_video(directory / part["file"]):
                stamp = stamps.get(str(counter))
                if stamp is not None:
                    out.append(part["start"] + t - (stamp - zero))
    return out


async def test_sigkill_then_node_start_finishes_the_recording(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    root = tmp_path / "recordings"
    async with node_process(tmp_path, root) as node:
        recording_id = (await node.line("recording")).split()[1]
        await asyncio.sleep(5)
        await node.command("stamps")
        killed_at = time.time()
        node.process.send_signal(signal.SIGKILL)
        await node.process.wait()
    assert node.process.returncode == -signal.SIGKILL
    stamps = json.loads((tmp_path / "stamps.json").read_text())

    directory = root / recording_id
    crashed = json.loads((directory / "manifest.json").read_text())
    # What the crash left: still "recording", the open parts unfinished, and
    # (Matroska writes it on close) WebM parts without a duration.
    assert crashed["state"] == "recording"
    open_parts = {f["id"]: f["parts"][-1] for f in crashed["feeds"]}
    assert set(open_parts) == {"room.video", "room.audio", "narration.video",
                               "endoscope.video"}
    assert all(not p["complete"] and p["sha256"] is None for p in open_parts.values())
    webm = directory / open_parts["room.video"]["file"]
    if FFPROBE:
        probe = await asyncio.to_thread(
            subprocess.run, [FFPROBE, "-v", "error", "-show_entries", "format=duration",
                             "-of", "json", str(webm)], capture_output=True, text=True,
            check=False, timeout=30)
        assert json.loads(probe.stdout)["format"].get("duration") in (None, "N/A")
    # A write cut short by the kill leaves an empty temporary file behind. In the
    # root, which Nodes share, only an old one is a leftover: a young one may be
    # another Node's index write under way.
    (directory / ".manifest.json.tmp").write_bytes(b"")
    (root / ".index.json.4242-0badcafe.tmp").write_bytes(b"")
    os.utime(root / ".index.json.4242-0badcafe.tmp", (time.time() - 120, time.time() - 120))
    (root / ".index.json.4343-0badf00d.tmp").write_bytes(b"")

    # The next Node start: the recording is finished before it is listed.
    server, runner = await start_server(make_config(recording={"root": str(root)}))
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["state"] == "interrupted"
        assert not (directory / ".manifest.json.tmp").exists()
        assert not (root / ".index.json.4242-0badcafe.tmp").exists()
        assert (root / ".index.json.4343-0badf00d.tmp").exists()
        started_t = manifest["started_t"]
        ends = []
        on_disk = {p.name for p in directory.iterdir()} - {"manifest.json", "events.jsonl",
                                                          "thumbnail.jpg"}
        listed = {p["file"] for f in manifest["feeds"] for p in f["parts"]}
        assert on_disk == listed
        for feed in manifest["feeds"]:
            for part in feed["parts"]:
                path = directory / part["file"]
                # Consent-exact: nothing from before the recording started.
                assert part["start"] >= started_t, (part, started_t)
                assert part["complete"] and part["bytes"] == path.stat().st_size
                assert part["sha256"] == sha256(path)
                if part["file"] == open_parts[feed["id"]]["file"]:
                    assert part["repaired"] is True and part["ended_by"] == "interrupted"
                    # Where it was before the kill: the manifest kept its start current.
                    assert part["start"] == open_parts[feed["id"]]["start"]
                if feed["kind"] == "video":
                    frames = decode_video(path)
                    assert len(frames) == part["frames"] > 0
                    counters = [c for _, c, _ in frames]
                    assert counters == list(range(counters[0], counters[0] + len(counters)))
                    last = frames[-1][0]
                else:
                    # Where its last sound ends (a loaded publisher's tone skips ahead:
                    # the timeline has gaps the samples do not fill).
                    with av.open(str(path)) as container:
                        last = max(float(f.time or 0.0) + f.samples / f.sample_rate
                                   for f in container.decode(audio=0))
                assert abs(part["duration"] - last) < 0.1, (part, last)
                if FFPROBE:
                    probe = ffprobe(path)
                    assert abs(float(probe["format"]["duration"]) - part["duration"]) < 0.1
                ends.append(part["start"] + part["duration"])
        # The recording ends where its media ends, shortly before the kill (to the
        # millisecond: the repair sums the unrounded start and duration, these are
        # the manifest's rounded ones, so a tie can round either way).
        assert abs(manifest["ended_t"] - max(ends)) <= 0.0011, (manifest["ended_t"], ends)
        assert manifest["duration"] == round(manifest["ended_t"] - started_t, 3)
        kill_t = killed_at - manifest["clock_zero_unix"]
        assert 0 <= kill_t - manifest["ended_t"] <= 2.0, (kill_t, manifest["ended_t"])
        assert 4.0 < manifest["duration"] < 6.0
        # Two cameras of the same kind stay in sync (median placement vs stamps).
        room = statistics.median(stamp_residuals(directory, manifest, "room.video",
                                                 stamps["room.video"]))
        overhead = statistics.median(stamp_residuals(directory, manifest, "narration.video",
                                                     stamps["narration.video"]))
        print(f"camera placement after repair: room {room * 1000:.2f} ms, "
              f"overhead {overhead * 1000:.2f} ms")
        assert abs(room - overhead) <= 0.002, (room, overhead)
        events = (directory / "events.jsonl").read_text().splitlines()
        assert json.loads(events[-1]) == {"t": manifest["ended_t"],
                                          "type": "recording_interrupted"}

        entry = server.app[RECORDINGS].index[recording_id]
        assert entry["state"] == "interrupted" and entry["duration"] == manifest["duration"]
        assert entry["thumbnail"] is True
        index = json.loads((root / "index.json").read_text())["recordings"]
        assert [(e["id"], e["state"]) for e in index] == [(recording_id, "interrupted")]
        [repaired] = [e for e in server.app[AUDIT].read(session="or1-live")
                      if e["event"] == "recording_repaired"]
        assert repaired["state"] == "interrupted"
        assert {p["file"] for p in repaired["parts"]} == {p["file"] for p in
                                                           open_parts.values()}
        # The review API serves it like any other.
        async with http.get(f"{server.base_url}/api/recordings/{recording_id}", headers={
                "Authorization": f"Bearer {server.token(Role.REVIEWER)}"}) as response:
            assert response.status == 200
            detail = await response.json()
        assert detail["recording"]["state"] == "interrupted"
        assert all(p["complete"] for f in detail["recording"]["feeds"] for p in f["parts"])
        # Starting again repairs nothing more.
        await asyncio.to_thread(server.app[RECORDINGS].open)
        assert json.loads((directory / "manifest.json").read_text()) == manifest
        assert len([e for e in server.app[AUDIT].read(session="or1-live")
                    if e["event"] == "recording_repaired"]) == 1
    finally:
        await runner.cleanup()


async def until(node: Node, wanted: Callable[[dict[str, Any]], bool],
                timeout: float = 20) -> dict[str, Any]:
    """The Node's recording status, once ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = json.loads(await node.command("status") or "{}")
        if wanted(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"not as wanted within {timeout:g} s: {status}")
        await asyncio.sleep(0.2)


def fill(path: Path) -> None:
    """Write ``path`` until the disk is full, to the last block."""
    with open(path, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


def namespace_prefix(mountpoint: Path, size_kib: int) -> tuple[str, ...] | None:
    """Run a command with ``mountpoint`` a tmpfs of ``size_kib`` of its own (a
    private mount namespace; user namespaces when not root); None if this
    machine cannot."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    userns = () if os.geteuid() == 0 else ("--user", "--map-root-user")
    prefix = (unshare, *userns, "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs -o size={size_kib}k tmpfs "{mountpoint}" && exec "$0" "$@"')
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    return prefix if probe.returncode == 0 else None


async def test_a_full_disk_is_repaired_once_space_returns(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    root.mkdir()
    prefix = namespace_prefix(root, 6 * 1024)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    async with node_process(tmp_path, root, prefix=prefix) as node:
        recording_id = (await node.line("recording")).split()[1]
        # The Node's own view of its recording disk (its mount namespace).
        inside = Path(f"/proc/{node.process.pid}/root") / root.relative_to("/")
        directory = inside / recording_id
        await wait_for(lambda: "" if any(directory.glob("room.video-*.webm")) else "no part")
        await asyncio.sleep(1)
        # Fill the disk to the last block: the next cluster cannot be written.
        ballast = inside / "ballast"
        await asyncio.to_thread(fill, ballast)
        status = await until(node, lambda s: s["live"]["state"] == "failed")
        assert status["live"]["error"]["code"] == "disk_full"
        # Its stop tried to write the index and the final manifest, and could not.
        await until(node, lambda s: s["dirty"])
        # The index on disk is stale: it still says "recording".
        index = json.loads((inside / "index.json").read_text())["recordings"]
        assert [(e["id"], e["state"]) for e in index] == [(recording_id, "recording")]
        assert not (directory / ".manifest.json.tmp").exists()
        assert not (inside / ".index.json.tmp").exists()

        # Space returns: within a few retries the index and the manifest are right.
        ballast.unlink()
        await wait_for(lambda: "" if json.loads((inside / "index.json").read_text())
                       ["recordings"][0]["state"] == "failed" else "index not repaired",
                       timeout=20)
        status = await until(node, lambda s: not s["dirty"])
        assert status["state"] == "failed"
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["state"] == "failed"
        assert manifest["errors"][0]["code"] == "disk_full"
        for feed in manifest["feeds"]:
            for part in feed["parts"]:
                path = directory / part["file"]
                assert part["complete"] and part["sha256"] == sha256(path), part
                if feed["kind"] == "video":
                    assert len(decode_video(path)) == part["frames"] > 0
        listed = {p["file"] for f in manifest["feeds"] for p in f["parts"]}
        assert {p.name for p in directory.iterdir()} - listed <= {
            "manifest.json", "events.jsonl", "thumbnail.jpg"}
        assert not [p for p in directory.iterdir() if p.name.startswith(".")]
