"""A Recording that moves between Nodes (issue 12): the Node that lets the
Session go hands the Recording over, the one that takes the Session over
continues it, same directory, same manifest, same consent, the gap written.

Real recorder, real VP8 frames of the synthetic camera, files opened with
PyAV; "Nodes" are two Recording objects on one root (what two processes on a
shared volume do; the cross-process runs are in tests/test_recording_failover.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import av

from recorder import Recording, SessionInfo
from recorder.recording import EVENTS, MANIFEST

from .recording_helpers import CONSENT, FPS, FakeFeed, encode_vp8

INFO = SessionInfo("or1-live", "or1", "Cholecystectomy", "Dr Expert")
RECORDING_ID = "moving-recording-0123456789"


def feed_frames(recording: Recording, feed: FakeFeed, first: int, count: int,
                start_t: float) -> None:
    """``count`` frames of the camera (counter from ``first``) captured from
    Session time ``start_t``."""
    assert recording.origin is not None
    for i, (data, key) in enumerate(encode_vp8(count, first)):
        feed.emit(data, 1000 + (first + i) * (90000 // FPS), key,
                  recording.origin + start_t + i / FPS)


def frames_in(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size)


async def test_a_recording_handed_over_continues_on_the_next_node(tmp_path: Path) -> None:
    # The Session clock started 20 s ago; consent at 0.5.
    origin = time.monotonic() - 20.0
    origin_unix = time.time() - 20.0
    consent = {**CONSENT, "started_by": {"name": "Dr Expert"}}
    first = Recording(tmp_path, INFO, consent, recording_id=RECORDING_ID, origin=origin,
                      origin_unix=origin_unix, consent_t=0.5, node="node-a")
    await first.start()
    first_feed = FakeFeed()
    first.attach(first_feed)
    feed_frames(first, first_feed, 0, 30, 1.0)  # 1.0 .. 3.0
    handed = await first.stop(hand_over=True)
    assert handed["state"] == "recording" and handed["ended_t"] is None
    assert all(p["complete"] for f in handed["feeds"] for p in f["parts"])

    # The next Node: same id, same clock zero; it waits for nothing (closed).
    second = Recording(tmp_path, INFO, {"ignored": "the manifest's consent is kept"},
                       recording_id=RECORDING_ID, origin=origin, origin_unix=origin_unix,
                       consent_t=0.5, resume=True, node="node-b")
    await second.start()
    assert second.state == "recording", second.errors
    second_feed = FakeFeed()
    second.attach(second_feed)
    feed_frames(second, second_feed, 100, 30, 6.0)  # 6.0 .. 8.0
    manifest = await second.stop()

    on_disk = json.loads((tmp_path / RECORDING_ID / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["state"] == "stopped" and manifest["consent"] == consent
    assert manifest["clock_zero_unix"] == first.clock_zero
    assert manifest["started_t"] == 0.5
    [feed] = manifest["feeds"]
    parts = feed["parts"]
    assert [p["node"] for p in parts] == ["node-a", "node-b"], parts
    assert [p["index"] for p in parts] == [0, 1]
    [gap] = manifest["gaps"]
    assert gap["reason"] == "origin_moved"
    assert (gap["from_node"], gap["to_node"]) == ("node-a", "node-b")
    end_a = parts[0]["start"] + parts[0]["duration"]
    assert gap["start"] == round(end_a, 3) and abs(end_a - 3.0) < 0.2, (gap, parts)
    assert gap["end"] == round(parts[1]["start"], 3) and abs(gap["end"] - 6.0) < 0.2, gap
    assert manifest["duration"] == round(manifest["ended_t"] - 0.5, 3)
    for part in parts:
        assert frames_in(tmp_path / RECORDING_ID / part["file"]) == part["frames"] == 30
    events = [json.loads(line) for line in (tmp_path / RECORDING_ID / EVENTS).read_text()
              .splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds.index("recording_handed_over") < kinds.index("recording_resumed")
    assert kinds[-1] == "recording_stopped"


async def test_the_next_node_waits_for_the_one_still_closing(tmp_path: Path) -> None:
    """The Node that drains lets the Session's lease go before its recording
    has closed its parts: the next one waits for its lock, then continues."""
    origin, origin_unix = time.monotonic() - 10.0, time.time() - 10.0
    first = Recording(tmp_path, INFO, CONSENT, recording_id=RECORDING_ID, origin=origin,
                      origin_unix=origin_unix, consent_t=0.0, node="node-a")
    await first.start()
    feed = FakeFeed()
    first.attach(feed)
    feed_frames(first, feed, 0, 15, 1.0)
    second = Recording(tmp_path, INFO, CONSENT, recording_id=RECORDING_ID, origin=origin,
                       origin_unix=origin_unix, consent_t=0.0, resume=True, node="node-b")
    resuming = asyncio.ensure_future(second.start())
    await asyncio.sleep(0.3)
    assert not resuming.done()  # the lock is still held by the first
    await first.stop(hand_over=True)
    await asyncio.wait_for(resuming, 5)
    assert second.state == "recording"
    manifest = await second.stop()
    [gap] = manifest["gaps"]
    # Nothing recorded after the move: the gap runs to the end.
    assert gap["end"] == manifest["ended_t"]
    assert [p["node"] for p in manifest["feeds"][0]["parts"]] == ["node-a"]
