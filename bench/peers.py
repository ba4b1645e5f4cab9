"""Client side of the benchmark: a WHIP publisher of pre-encoded packets and
WHEP viewers that never decode in aiortc (a tapped receiver hands them whole
encoded frames); a few viewers decode in a thread to read the frame counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)

from server import framecode
from server.media.hooks import advertise_host_addresses, tap_receiver

from .stream import PacketReplayTrack, StampBook

LOOPBACK = ["127.0.0.1"]
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20)
#: Per joiner, frames whose arrival is remembered (for the catch-up figure).
ARRIVAL_HISTORY = 400


def receive_losses(pc: RTCPeerConnection) -> tuple[int, int]:
    """(packets received, packets lost on first transmission) over every SSRC.

    aiortc's getStats() gives all of a receiver's SSRCs (media and RTX) the same
    stats id, so the report keeps only one of them; read the receiver's own
    per-SSRC statistics instead (bench-only use of a private name).
    """
    received = lost = 0
    for transceiver in pc.getTransceivers():
        streams = getattr(transceiver.receiver, "_RTCRtpReceiver__remote_streams", {})
        for stream in list(streams.values()):
            received += stream.packets_received
            lost += stream.packets_lost
    return received, lost


def new_pc(ice_servers: list[dict[str, Any]] | None = None,
           relay_only: bool = False) -> RTCPeerConnection:
    # An explicit (possibly empty) list: None would make aiortc add a public STUN server.
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in ice_servers or []]
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))


def prefer_vp8(transceiver) -> None:  # type: ignore[no-untyped-def]
    caps = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences(
        [c for c in caps if c.mimeType.lower() == "video/vp8"]
        + [c for c in caps if c.mimeType.lower() == "video/rtx"])


async def _post_sdp(http: aiohttp.ClientSession, url: str, sdp: str,
                    token: str) -> tuple[str, str]:
    async with http.post(url, data=sdp, timeout=HTTP_TIMEOUT,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        if response.status != 201:
            raise RuntimeError(f"POST {url}: {response.status} {body[:200]}")
        return body, response.headers.get("Location", "")


async def publish(http: aiohttp.ClientSession, url: str, token: str,
                  track: PacketReplayTrack) -> RTCPeerConnection:
    pc = new_pc()
    transceiver = pc.addTransceiver(track, direction="sendonly")
    prefer_vp8(transceiver)
    # aiortc would ask its (absent) encoder for a keyframe: route PLI/FIR to the replay.
    transceiver.sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]
    advertise_host_addresses(pc, LOOPBACK)
    await pc.setLocalDescription(await pc.createOffer())
    try:
        answer, _ = await _post_sdp(http, url, pc.localDescription.sdp, token)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    except BaseException:
        await pc.close()
        raise
    return pc


@dataclass
class Decoded:
    counter: int
    rtp_timestamp: int
    received_at: float
    decoded_at: float
    latency: float | None  # decoded_at - publisher's send time of that counter


class FrameDecoder:
    """Decodes one viewer's VP8 frames in its own thread and reads the counter.

    ``until_first``: stop decoding after the first frame whose counter reads
    (join tests); otherwise decode everything (latency viewers).
    """

    def __init__(self, stamps: StampBook, until_first: bool) -> None:
        self._stamps = stamps
        self._until_first = until_first
        self._queue: queue.SimpleQueue[tuple[bytes, int, float] | None] = queue.SimpleQueue()
        self.decoded: list[Decoded] = []
        self.first: Decoded | None = None
        self.errors = 0
        self.unreadable = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-decoder")
        self._thread.start()

    def put(self, data: bytes, rtp_timestamp: int, received_at: float) -> None:
        if not self._done:
            self._queue.put((data, rtp_timestamp, received_at))

    def stop(self) -> None:
        self._done = True
        self._queue.put(None)

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        codec = av.CodecContext.create("vp8", "r")
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, rtp_timestamp, received_at = item
            try:
                frames = codec.decode(av.Packet(data))
            except av.FFmpegError:
                self.errors += 1  # e.g. a delta frame before any keyframe
                continue
            for frame in frames:
                decoded_at = time.time()
                plane = frame.planes[0]
                luma = np.frombuffer(plane, np.uint8).reshape(
                    frame.height, plane.line_size)[:, : frame.width]
                counter = framecode.read(luma)
                if counter is None:
                    self.unreadable += 1
                    continue
                sent = self._stamps.lookup(counter, decoded_at)
                record = Decoded(counter, rtp_timestamp, received_at, decoded_at,
                                 None if sent is None else decoded_at - sent)
                if self.first is None:
                    self.first = record
                if self._until_first:
                    self._done = True
                    return
                self.decoded.append(record)


@dataclass
class Viewer:
    """One WHEP viewer; ``decode`` None (count only), "first" or "all"."""

    name: str
    decode: str | None = None
    stamps: StampBook | None = None
    pc: RTCPeerConnection | None = None
    resource: str = ""  # WHEP resource id (ScrubIn: the Subscription id)
    t_join: float | None = None
    t_answer: float | None = None
    t_ice: float | None = None
    t_connected: float | None = None
    t_first_frame: float | None = None
    first_frame_key: bool | None = None
    frames: int = 0
    bytes: int = 0
    error: str | None = None
    arrivals: list[tuple[int, float]] = field(default_factory=list)
    decoder: FrameDecoder | None = None
    #: RTCIceServer dictionaries (e.g. TURN with this viewer's credentials).
    ice_servers: list[dict[str, Any]] | None = None
    #: Relayed candidates only: everything this viewer gets comes through TURN.
    relay_only: bool = False
    #: A viewer rebuilt from another process's :meth:`report` has no decoder or
    #: peer connection here: its first decoded frame and its losses as reported.
    reported_first: Decoded | None = None
    reported_lost: int = 0

    def _on_frame(self, data: bytes, rtp_timestamp: int) -> None:
        now = time.time()
        if self.t_first_frame is None:
            self.t_first_frame = now
            self.first_frame_key = len(data) >= 3 and not (data[0] & 0x01)
        self.frames += 1
        self.bytes += len(data)
        if len(self.arrivals) < ARRIVAL_HISTORY:
            self.arrivals.append((rtp_timestamp, now))
        if self.decoder is not None:
            self.decoder.put(data, rtp_timestamp, now)

    def _prepare(self) -> RTCPeerConnection:
        self.t_join = time.time()
        if self.decode is not None:
            assert self.stamps is not None
            self.decoder = FrameDecoder(self.stamps, until_first=self.decode == "first")
        pc = self.pc = new_pc(self.ice_servers, self.relay_only)

        @pc.on("iceconnectionstatechange")
        def _ice() -> None:
            if pc.iceConnectionState == "completed" and self.t_ice is None:
                self.t_ice = time.time()

        @pc.on("connectionstatechange")
        def _conn() -> None:
            if pc.connectionState == "connected" and self.t_connected is None:
                self.t_connected = time.time()

        return pc

    async def join(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        """WHEP: offer recvonly video, tap the receiver before media can arrive."""
        pc = self._prepare()
        try:
            transceiver = pc.addTransceiver("video", direction="recvonly")
            prefer_vp8(transceiver)
            tap_receiver(transceiver.receiver, "video", self._on_frame)
            if not self.relay_only:  # host candidates would bypass the relay
                advertise_host_addresses(pc, LOOPBACK)
            await pc.setLocalDescription(await pc.createOffer())
            answer, location = await _post_sdp(http, url, pc.localDescription.sdp, token)
            self.t_answer = time.time()
            self.resource = location.rstrip("/").rsplit("/", 1)[-1]
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]

    async def join_direct(self, publisher: RTCPeerConnection) -> None:
        """No server: the publisher's offer straight to this viewer."""
        pc = self._prepare()
        await pc.setRemoteDescription(publisher.localDescription)
        for transceiver in pc.getTransceivers():
            tap_receiver(transceiver.receiver, "video", self._on_frame)
        advertise_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createAnswer())
        self.t_answer = time.time()
        await publisher.setRemoteDescription(pc.localDescription)

    async def close(self) -> None:
        if self.decoder is not None:
            self.decoder.stop()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 5)

    # -- figures -----------------------------------------------------------
    def first_decoded(self) -> Decoded | None:
        return self.reported_first if self.decoder is None else self.decoder.first

    def first_decoded_at(self) -> float | None:
        first = self.first_decoded()
        return None if first is None else first.decoded_at

    def awaiting_first(self) -> bool:
        """No error yet, and no first frame (decoded, for a decoding viewer)."""
        if self.error is not None:
            return False
        return (self.t_first_frame if self.decoder is None else self.first_decoded_at()) is None

    def lost(self) -> int:
        """Packets lost on first transmission so far."""
        return self.reported_lost if self.pc is None else receive_losses(self.pc)[1]

    async def packets_lost(self) -> int:
        return self.lost()

    def report(self) -> dict[str, Any]:
        """This viewer's timings, picklable, for a process that rebuilds it with
        :meth:`from_report` (joiners spread over worker processes)."""
        return {"name": self.name, "resource": self.resource, "t_join": self.t_join,
                "t_answer": self.t_answer, "t_ice": self.t_ice, "t_connected": self.t_connected,
                "t_first_frame": self.t_first_frame, "first_frame_key": self.first_frame_key,
                "frames": self.frames, "bytes": self.bytes, "error": self.error,
                "arrivals": list(self.arrivals), "first": self.first_decoded(),
                "lost": self.lost()}

    @classmethod
    def from_report(cls, report: dict[str, Any], stamps: StampBook) -> Viewer:
        """A viewer of another process, for figures only. That process has no
        publisher, so its first decoded frame's age is looked up here, in the
        publisher's ``stamps`` (one wall clock for every process on the machine)."""
        first: Decoded | None = report["first"]
        if first is not None:
            sent = stamps.lookup(first.counter, first.decoded_at)
            first = dataclasses.replace(
                first, latency=None if sent is None else first.decoded_at - sent)
        return cls(report["name"], stamps=stamps, resource=report["resource"],
                   t_join=report["t_join"], t_answer=report["t_answer"], t_ice=report["t_ice"],
                   t_connected=report["t_connected"], t_first_frame=report["t_first_frame"],
                   first_frame_key=report["first_frame_key"], frames=report["frames"],
                   bytes=report["bytes"], error=report["error"], arrivals=report["arrivals"],
                   reported_first=first, reported_lost=report["lost"])

    def caught_up_by_skipping(self, threshold: float = 0.1) -> bool | None:
        """True if the viewer reached live by jumping ahead (frames skipped, e.g. the
        server dropping a backlog at a keyframe), False if by draining the backlog."""
        when = self.caught_up_at(threshold)
        if when is None:
            return None
        previous = None
        for rtp_timestamp, received_at in self.arrivals:
            if received_at > when:
                break
            if previous is not None:
                step = (rtp_timestamp - previous) & 0xFFFFFFFF
                if 4 * 3000 < step < 0x80000000:
                    return True
            previous = rtp_timestamp
        return False

    def caught_up_at(self, threshold: float = 0.1) -> float | None:
        """When frames started arriving live (< ``threshold`` s after they were
        sent), estimated from RTP timestamps relative to the first decoded frame
        whose send time is known. Replayed cached frames arrive stale."""
        first = self.first_decoded()
        if first is None or first.latency is None:
            return None
        sent0 = first.decoded_at - first.latency
        for rtp_timestamp, received_at in self.arrivals:
            delta = (rtp_timestamp - first.rtp_timestamp) & 0xFFFFFFFF
            if delta >= 0x80000000:
                continue  # before the first decoded frame
            if received_at - (sent0 + delta / 90_000) < threshold:
                return received_at
        return None


async def publish_direct(track: PacketReplayTrack) -> RTCPeerConnection:
    """A publisher peer whose offer a :meth:`Viewer.join_direct` answers."""
    pc = new_pc()
    transceiver = pc.addTransceiver(track, direction="sendonly")
    prefer_vp8(transceiver)
    transceiver.sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]
    advertise_host_addresses(pc, LOOPBACK)
    await pc.setLocalDescription(await pc.createOffer())
    return pc
