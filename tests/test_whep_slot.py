"""WHEP per camera slot (the camera and the Session's narration on one peer connection)
and DELETEs that arrive after a resource already ended (docs/protocol.md, issue 17)."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack, VideoStreamTrack

from server.roles import Role

from .conftest import (
    Server,
    client_pc,
    live_peer_connections,
    offer_sdp,
    wait_for,
    whep_subscribe,
    whip_publish,
)

SESSION = "or1-live"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


Tracks = dict[str, asyncio.Future[MediaStreamTrack]]


async def slot_viewer(http: aiohttp.ClientSession, server: Server, slot: str, token: str,
                      kinds: tuple[str, ...] = ("video", "audio"),
                      ) -> tuple[RTCPeerConnection, str, str, Tracks]:
    pc = client_pc()
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    loop = asyncio.get_running_loop()
    tracks: Tracks = {k: loop.create_future() for k in kinds}

    @pc.on("track")
    def _on_track(track: MediaStreamTrack) -> None:
        tracks[track.kind].set_result(track)

    async with http.post(f"{server.base_url}/whep/{SESSION}/{slot}", data=await offer_sdp(pc),
                         headers={**auth(token), "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, f"{server.base_url}{location}", body, tracks


def msid_streams(sdp: str) -> dict[str, str]:
    """kind -> the media stream id of its a=msid line."""
    out = {}
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        kind = section[2:7].strip()
        match = re.search(r"^a=msid:(\S+) ", section, re.M)
        if match:
            out[kind] = match.group(1)
    return out


def direction(sdp: str, kind: str) -> str:
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        if section.startswith(f"m={kind}"):
            for d in ("sendonly", "recvonly", "sendrecv", "inactive"):
                if f"a={d}" in section:
                    return d
    return "none"


async def remote_sender_report(pc: RTCPeerConnection, kind: str) -> float | None:
    """The wall time (s since the epoch) of the last sender report received for ``kind``."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind != kind:
            continue
        stats = await transceiver.receiver.getStats()
        for stat in stats.values():
            if stat.type == "remote-outbound-rtp":
                return float(stat.remoteTimestamp.timestamp())
    return None


async def test_whep_per_slot_carries_camera_and_narration_in_one_stream(server, http, peers):
    video_pub, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    audio_pub, _ = await whip_publish(http, server, "narration", [AudioStreamTrack()])
    peers += [video_pub, audio_pub]
    token = server.token(Role.TRAINEE)
    viewer, url, answer, tracks = await slot_viewer(http, server, "room", token)
    peers.append(viewer)

    # One media stream: a player keeps its audio and video in lip sync.
    streams = msid_streams(answer)
    assert set(streams) == {"video", "audio"} and streams["video"] == streams["audio"], answer
    assert direction(answer, "video") == direction(answer, "audio") == "sendonly"
    video = await asyncio.wait_for(tracks["video"], 10)
    frame = await asyncio.wait_for(video.recv(), 10)
    assert frame.width == 640
    audio = await asyncio.wait_for(tracks["audio"], 10)
    sound = await asyncio.wait_for(audio.recv(), 10)
    assert sound.sample_rate == 48000
    session = server.session()
    (view,) = session.slot_views.values()
    assert sorted(s.feed_id for s in view.subscriptions) == ["narration.audio", "room.video"]

    # Sender reports on both carry the publishers' wall clock (same machine here).
    async def reported() -> str:
        for kind in ("video", "audio"):
            at = await remote_sender_report(viewer, kind)
            if at is None:
                return f"no sender report for {kind} yet"
            if abs(at - time.time()) > 5:
                return f"{kind} sender report says {at}, now is {time.time()}"
        return ""

    deadline = time.monotonic() + 15
    reason = await reported()
    while reason and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        reason = await reported()
    assert not reason, reason

    async with http.delete(url, headers=auth(token)) as response:
        assert response.status == 200, await response.text()

    def freed() -> str:
        if session.slot_views or session.subscriptions:
            return f"still held: {session.slot_views} {session.subscriptions}"
        mine = {id(video_pub), id(audio_pub), id(viewer)}
        open_ = [pc for pc in live_peer_connections() if id(pc) not in mine]
        return f"{len(open_)} server peers open" if len(open_) != 2 else ""

    await wait_for(freed, timeout=5)


async def test_whep_per_slot_without_narration_answers_audio_inactive(server, http, peers):
    publisher, _ = await whip_publish(http, server, "endoscope", [VideoStreamTrack()])
    peers.append(publisher)
    viewer, _, answer, tracks = await slot_viewer(http, server, "endoscope",
                                                  server.token(Role.TRAINEE))
    peers.append(viewer)
    assert direction(answer, "video") == "sendonly"
    assert direction(answer, "audio") == "inactive", answer
    video = await asyncio.wait_for(tracks["video"], 10)
    await asyncio.wait_for(video.recv(), 10)


async def test_whep_per_slot_needs_a_live_camera(server, http, peers):
    pc = client_pc()
    peers.append(pc)
    pc.addTransceiver("video", direction="recvonly")
    async with http.post(f"{server.base_url}/whep/{SESSION}/room", data=await offer_sdp(pc),
                         headers={**auth(server.token(Role.TRAINEE)),
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 404
        assert (await response.json())["code"] == "unknown_feed"


async def test_delete_after_the_client_closed_first_is_200_with_the_same_token(
        server, http, peers):
    expert = server.token(Role.EXPERT)
    publisher, publisher_url = await whip_publish(http, server, "room", [VideoStreamTrack()],
                                                  token=expert)
    trainee = server.token(Role.TRAINEE, participant_id="t-1")
    viewer, viewer_url, track = await whep_subscribe(http, server, "room.video", "video",
                                                     token=trainee)
    await asyncio.wait_for((await asyncio.wait_for(track, 10)).recv(), 10)
    session = server.session()

    # whip-whep closes its peer connection, then sends DELETE.
    await viewer.close()
    await wait_for(lambda: "" if not session.subscriptions else "viewer still subscribed")
    other = server.token(Role.TRAINEE, participant_id="t-1")  # same person, another token
    async with http.delete(viewer_url, headers=auth(other)) as response:
        assert response.status == 404
    async with http.delete(viewer_url, headers=auth(trainee)) as response:
        assert response.status == 200, await response.text()

    await publisher.close()
    await wait_for(lambda: "" if not session.ingests else "publisher still there", timeout=40)
    async with http.delete(publisher_url, headers=auth(expert)) as response:
        assert response.status == 200, await response.text()
    wrong_slot = publisher_url.replace("/room/", "/endoscope/")
    async with http.delete(wrong_slot, headers=auth(expert)) as response:
        assert response.status == 404
