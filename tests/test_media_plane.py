"""The media seam on plain data: a Feed, its keyframe policy and downstreams that
misbehave (server/media/plane.py, server/feed.py). End to end with real peers:
tests/test_vanishing_peers.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiortc import RTCRtpCodecParameters

from server.config import LivenessConfig, MediaConfig
from server.feed import PER_REQUESTER_S, Feed
from server.media.plane import (
    DownstreamGone,
    DropReason,
    EncodedFrame,
    FrameQueue,
    KeyframePolicy,
)

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, payloadType=111,
                             parameters={}, )
KEY, DELTA = b"\x10\x02\x00\x9d\x01\x2a", b"\x11\x02\x00"


class Upstream:
    """Counts keyframe requests the Feed sends to its 'publisher'."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self) -> bool:
        self.requests += 1
        return True


class Collect:
    """A well-behaved downstream that keeps what it is given."""

    def __init__(self, name: str = "d") -> None:
        self.name = name
        self.frames: list[EncodedFrame] = []
        self.reasons: list[DropReason] = []

    @property
    def downstream_id(self) -> str:
        return self.name

    def deliver(self, frame: EncodedFrame) -> None:
        self.frames.append(frame)

    def dropped(self, reason: DropReason) -> None:
        self.reasons.append(reason)


class Raises(Collect):
    def deliver(self, frame: EncodedFrame) -> None:
        raise AttributeError("'NoneType' object has no attribute 'sendto'")


class Blocks(Collect):
    def deliver(self, frame: EncodedFrame) -> None:
        time.sleep(0.05)  # far over the 10 ms budget these tests configure


class Gone(Collect):
    def deliver(self, frame: EncodedFrame) -> None:
        raise DownstreamGone("transport closed")


class Queued(Collect):
    """An asynchronous consumer that never drains: what a blocked task looks like."""

    def __init__(self, name: str = "q", max_frames: int = 4) -> None:
        super().__init__(name)
        self.queue = FrameQueue(max_frames=max_frames, video=True)

    def deliver(self, frame: EncodedFrame) -> None:
        self.queue.put(frame)


def make_feed(kind: str = "video", **media: Any) -> tuple[Feed, list[str], list[str]]:
    states: list[str] = []
    drops: list[str] = []
    feed = Feed(feed_id=f"room.{kind}", slot="room", kind=kind,
                codec=VP8 if kind == "video" else OPUS, media=MediaConfig(**media),
                liveness=LivenessConfig(downstream_block_ms=10),
                on_state=lambda f: states.append(f.state), on_closed=lambda f: None,
                on_dropped=lambda f, reason: drops.append(reason))
    return feed, states, drops


def payloads(frames: list[EncodedFrame]) -> list[bytes]:
    return [f.data for f in frames]


async def test_timeline_stays_continuous_across_publishers() -> None:
    feed, states, _ = make_feed()
    viewer = Collect()
    sink = feed.connect_publisher(Upstream())
    feed.attach(viewer, start="now")
    sink(KEY, 1_000_000)
    sink(DELTA, 1_003_000)
    feed.publisher_gone(final=False)
    assert feed.state == "down" and viewer.reasons == []
    sink = feed.connect_publisher(Upstream())
    sink(KEY, 55)  # the new publisher's clock starts anywhere
    sink(DELTA, 3055)
    assert [f.pts for f in viewer.frames] == [0, 3000, 6000, 9000]
    assert states == ["live", "down", "live"]
    feed.close()
    assert viewer.reasons == ["feed_closed"]


async def test_a_joiner_starts_from_the_cached_keyframe_paced_then_live() -> None:
    feed, _, _ = make_feed()
    upstream = Upstream()
    sink = feed.connect_publisher(upstream)
    for i, data in enumerate([DELTA, KEY, DELTA, DELTA]):
        sink(data, i * 3000)
    viewer = Collect()
    feed.attach(viewer, start="cache")
    sink(DELTA, 4 * 3000)  # live while the cache is being replayed: held, then in order
    assert len(viewer.frames) == 1 and viewer.frames[0].keyframe
    for _ in range(100):
        if len(viewer.frames) == 4:
            break
        await asyncio.sleep(0.005)
    assert [f.pts for f in viewer.frames] == [3000, 6000, 9000, 12000]
    assert upstream.requests == 0  # the cache answered; the publisher was not asked
    sink(DELTA, 5 * 3000)
    assert viewer.frames[-1].pts == 15000
    feed.close()


async def test_the_recorder_never_gets_frames_from_before_it_attached() -> None:
    feed, _, _ = make_feed()
    upstream = Upstream()
    sink = feed.connect_publisher(upstream)
    sink(KEY, 0)
    sink(DELTA, 3000)
    recorder = Collect("recorder")
    feed.attach(recorder, start="keyframe")
    assert upstream.requests == 1  # asked through the policy, not served from the cache
    sink(DELTA, 6000)
    assert recorder.frames == []
    sink(KEY, 9000)
    sink(DELTA, 12000)
    assert [f.pts for f in recorder.frames] == [9000, 12000]
    assert recorder.frames[0].keyframe
    feed.close()


async def test_keyframe_requests_are_coalesced_across_joiners() -> None:
    feed, _, _ = make_feed(keyframe_request_interval_ms=200)
    upstream = Upstream()
    feed.connect_publisher(upstream)
    for i in range(30):  # thirty joins at once, no cache yet
        feed.attach(Collect(f"v{i}"), start="cache")
    assert upstream.requests == 1
    await asyncio.sleep(0.3)
    assert upstream.requests == 2  # one deferred request covers all later ones
    await asyncio.sleep(0.3)
    assert upstream.requests == 2
    feed.close()


async def test_one_viewers_pli_flood_does_not_force_keyframes_on_everyone() -> None:
    feed, _, _ = make_feed(keyframe_request_interval_ms=0)
    upstream = Upstream()
    feed.connect_publisher(upstream)
    accepted = sum(feed.request_keyframe("viewer:flood") for _ in range(500))
    assert accepted == 1 and upstream.requests == 1
    assert feed.keyframes.stats.refused == 499
    # Everyone else is still heard.
    assert feed.request_keyframe("viewer:other")
    assert upstream.requests == 2


def test_policy_limits_per_requester_and_overall_on_an_injected_clock() -> None:
    now = [100.0]
    timers: list[tuple[float, Any]] = []
    sent: list[float] = []

    class Handle:
        def cancel(self) -> None:
            pass

    def call_later(delay: float, callback: Any) -> Handle:
        timers.append((now[0] + delay, callback))
        return Handle()

    def send() -> bool:
        sent.append(now[0])
        return True

    policy = KeyframePolicy(send, interval_s=0.5, per_requester_s=2.0, call_later=call_later,
                            clock=lambda: now[0])
    assert policy.request("a")
    assert policy.request("b")           # within the interval: deferred, not lost
    assert sent == [100.0] and len(timers) == 1
    assert not policy.request("a")       # a again within its own 2 s: refused
    now[0] = 100.5
    timers.pop()[1]()
    assert sent == [100.0, 100.5]        # the deferred one covered b
    now[0] = 102.1
    assert policy.request("a")           # a's own interval is over
    assert sent[-1] == 102.1
    policy.connect(None)
    assert not policy.request("c")       # no publisher: nothing to ask
    assert PER_REQUESTER_S >= 1.0


@pytest.mark.parametrize("bad,reason", [(Raises, "failed"), (Blocks, "blocked"),
                                        (Gone, "transport_gone")])
async def test_a_misbehaving_downstream_is_dropped_and_nobody_else_notices(
        bad: type[Collect], reason: str) -> None:
    feed, states, drops = make_feed()
    upstream = Upstream()
    sink = feed.connect_publisher(upstream)
    before, culprit, after = Collect("before"), bad("culprit"), Collect("after")
    for downstream in (before, culprit, after):
        feed.attach(downstream, start="now")
    sink(KEY, 0)        # must not raise into the publisher's receive loop
    sink(DELTA, 3000)
    assert culprit.reasons == [reason]
    assert drops == [reason]
    assert feed.downstreams == [before, after]
    assert payloads(before.frames) == payloads(after.frames) == [KEY, DELTA]
    assert feed.state == "live" and states == ["live"]
    feed.close()
    assert culprit.reasons == [reason]  # told once, not again at close


class StallsOnce(Collect):
    """A healthy downstream whose process was descheduled during one call."""

    def deliver(self, frame: EncodedFrame) -> None:
        super().deliver(frame)
        if len(self.frames) == 2:
            time.sleep(0.05)


async def test_one_slow_delivery_is_forgiven_a_second_in_a_row_is_not() -> None:
    feed, _, drops = make_feed()
    sink = feed.connect_publisher(Upstream())
    stalls_once, blocks = StallsOnce("once"), Blocks("always")
    feed.attach(stalls_once, start="now")
    feed.attach(blocks, start="now")
    sink(KEY, 0)
    assert blocks.reasons == [] and drops == []  # first strike for both
    for i in range(1, 5):
        sink(DELTA, i * 3000)
    assert blocks.reasons == ["blocked"] and drops == ["blocked"]
    assert stalls_once.reasons == [] and len(stalls_once.frames) == 5
    assert feed.downstreams == [stalls_once]
    feed.close()


async def test_a_consumer_that_stops_draining_skips_to_keyframes_then_is_dropped() -> None:
    feed, _, drops = make_feed(keyframe_request_interval_ms=0)
    upstream = Upstream()
    sink = feed.connect_publisher(upstream)
    stuck, healthy = Queued(max_frames=4), Collect("healthy")
    feed.attach(stuck, start="now")
    feed.attach(healthy, start="now")
    sink(KEY, 0)
    for i in range(1, 6):  # the fifth frame overflows: backlog discarded, keyframe asked
        sink(DELTA, i * 3000)
    assert stuck.queue.stats.overflows == 1 and upstream.requests == 1
    assert len(stuck.queue) == 0
    sink(DELTA, 6 * 3000)  # not a keyframe: still waiting for one
    assert len(stuck.queue) == 0
    frames = 7
    while not stuck.reasons and frames < 200:  # it never drains: overflows again and again
        sink(KEY if frames % 5 == 0 else DELTA, frames * 3000)
        frames += 1
    assert stuck.reasons == ["behind"] and drops == ["behind"]
    assert len(healthy.frames) == frames
    feed.close()


async def test_paused_downstreams_get_nothing_and_resume_at_a_keyframe() -> None:
    feed, _, _ = make_feed(keyframe_request_interval_ms=0)
    upstream = Upstream()
    sink = feed.connect_publisher(upstream)
    viewer = Collect()
    feed.attach(viewer, start="now")
    sink(KEY, 0)
    feed.pause(viewer)
    sink(DELTA, 3000)
    assert payloads(viewer.frames) == [KEY]
    feed.resume(viewer)
    assert upstream.requests == 1
    sink(DELTA, 6000)            # not decodable after a gap: skipped
    sink(KEY, 9000)
    assert [f.pts for f in viewer.frames] == [0, 9000]
    feed.close()


async def test_audio_starts_at_once_and_is_never_cached() -> None:
    feed, _, _ = make_feed("audio")
    sink = feed.connect_publisher(Upstream())
    sink(b"\x01", 0)
    listener = Collect()
    feed.attach(listener, start="cache")
    sink(b"\x02", 960)
    assert payloads(listener.frames) == [b"\x02"] and feed.cached_frames() == []
    assert not feed.request_keyframe("x")
    feed.close()


async def test_a_down_feed_closes_after_its_grace_period() -> None:
    feed, states, _ = make_feed(feed_grace_s=0.1)
    viewer = Collect()
    feed.connect_publisher(Upstream())
    feed.attach(viewer, start="now")
    feed.publisher_gone(final=False)
    await asyncio.sleep(0.2)
    assert feed.state == "closed" and states == ["live", "down", "closed"]
    assert viewer.reasons == ["feed_closed"]


async def test_a_feed_without_frames_is_stalled_and_recovers() -> None:
    feed, states, _ = make_feed()
    sink = feed.connect_publisher(Upstream())
    sink(KEY, 0)
    assert feed.last_frame_at is not None
    feed.check_stall(feed.last_frame_at + 1.0)
    assert feed.state == "live"
    feed.check_stall(feed.last_frame_at + 1.6)
    assert feed.state == "stalled"
    sink(DELTA, 3000)
    assert feed.state == "live" and states == ["live", "stalled", "live"]
    feed.close()


async def test_sender_reports_map_the_timeline_to_the_publishers_clock() -> None:
    feed, _, _ = make_feed()
    sink = feed.connect_publisher(Upstream())
    assert feed.ntp_at(0) is None
    sink(KEY, 1_000_000)                      # our pts 0
    ntp = 0xE000_0000_0000_0000
    feed.on_sender_report(ntp, 1_000_000 + 90_000)   # one second after that frame
    assert feed.ntp_at(90_000) == ntp
    assert feed.ntp_at(0) == ntp - (1 << 32)
    assert feed.ntp_at(45_000) == ntp - (1 << 31)
    feed.close()


# -- layers -----------------------------------------------------------------------------


def test_a_viewer_moves_down_on_sustained_loss_and_back_up_after_a_quiet_spell() -> None:
    from server.media.layers import LayerController

    now = [0.0]
    control = LayerController(clock=lambda: now[0])
    control.start("full")
    assert control.on_report(0.20) is None          # one bad report is noise
    assert control.on_report(0.01) is None
    assert control.on_report(0.20) is None
    assert control.on_report(0.25) == "low"         # two in a row: down
    for _ in range(5):                               # clean, but not long enough yet
        now[0] += 1
        assert control.on_report(0.0) is None
    now[0] += 1.5
    assert control.on_report(0.0) == "full"         # 6 s clean: try the full layer again
    now[0] += 1
    assert control.on_report(0.3) is None
    assert control.on_report(0.3) == "low"          # failed within probation: wait doubles
    for _ in range(10):
        now[0] += 1
        assert control.on_report(0.0) is None
    now[0] += 2.5
    assert control.on_report(0.0) == "full"         # after 12 s
    now[0] += 11                                    # it held through probation
    assert control.on_report(0.0) is None
    assert control.on_report(0.2) is None
    assert control.on_report(0.2) == "low"
    now[0] += 5.5
    assert control.on_report(0.0) is None
    now[0] += 1.0                                   # the short wait again: the last try held
    assert control.on_report(0.0) == "full"


def test_remb_below_the_full_layers_bitrate_moves_a_viewer_down_without_loss() -> None:
    from server.media.layers import LayerController

    now = [0.0]
    control = LayerController(clock=lambda: now[0])
    control.start("full")
    assert control.on_report(0.0, remb_bps=2_000_000, full_bps=1_500_000) is None
    assert control.on_report(0.0, remb_bps=900_000, full_bps=1_500_000) is None
    assert control.on_report(0.0, remb_bps=900_000, full_bps=1_500_000) == "low"
    now[0] += 5
    # On the low layer REMB is bounded by what the viewer receives, so it does
    # not hold it down: a clean link is tried on the full layer after the wait.
    assert control.on_report(0.0, remb_bps=375_000, full_bps=1_500_000) is None
    now[0] += 1.5
    assert control.on_report(0.0, remb_bps=375_000, full_bps=1_500_000) == "full"


def test_vp8_picture_ids_are_rewritten_in_place_of_the_descriptor() -> None:
    from server.media.fastpath import vp8_picture_id, vp8_with_picture_id_offset

    payload = bytes((0x90, 0x80, 0x80 | 0x7F, 0xFE)) + b"frame"  # X, I, M: 15-bit id 0x7FFE
    assert vp8_picture_id(payload) == 0x7FFE
    moved = vp8_with_picture_id_offset(payload, 5)
    assert vp8_picture_id(moved) == 3 and moved[4:] == b"frame" and moved[:2] == payload[:2]
    assert vp8_with_picture_id_offset(b"\x10\x00abc", 5) == b"\x10\x00abc"  # no picture id


async def test_every_h264_keyframe_carries_its_parameter_sets() -> None:
    """A viewer that joins, or moves here from another layer, at a keyframe the
    encoder sent without SPS/PPS can still decode it."""
    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                                 parameters={"packetization-mode": "1",
                                             "profile-level-id": "42e01f"})
    feed = Feed(feed_id="endoscope.video", slot="endoscope", kind="video", codec=h264,
                media=MediaConfig(fast_path=False), liveness=LivenessConfig(),
                on_state=lambda f: None, on_closed=lambda f: None)
    sink = feed.connect_publisher(Upstream())
    viewer = Collect()
    feed.attach(viewer, start="now")
    sps, pps = b"\x00\x00\x00\x01\x67\x42\xe0\x1f\xaa", b"\x00\x00\x00\x01\x68\xce\x06"
    idr, delta = b"\x00\x00\x00\x01\x65\x88\x84", b"\x00\x00\x00\x01\x41\x9a\x02"
    sink(sps + pps + idr, 0)
    sink(delta, 3000)
    sink(idr, 6000)            # an encoder that sent the parameter sets only at the start
    first, second, third = (f.data for f in viewer.frames)
    assert first == sps + pps + idr and second == delta
    assert third.startswith(b"\x00\x00\x01\x67") and b"\x00\x00\x01\x68" in third
    assert third.endswith(idr) and viewer.frames[2].keyframe
    feed.close()
