"""Connection checks (server/http/preflight.py) with a real aiortc client:
direct and through coturn, before the Session is live, without using up the
invite, bounded per Participant."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import VideoStreamTrack

from server.http.preflight import PREFLIGHTS
from server.media.turn import parse_link_headers
from server.roles import Role

from .admin_helpers import admin_token, api, schedule
from .conftest import Server, offer_sdp, wait_for
from .coturn import Coturn


def url(session: str) -> str:
    return f"/api/sessions/{session}/preflight"


async def check(http: aiohttp.ClientSession, server: Server, token: str, session: str,
                pc: RTCPeerConnection, *, loopback: bool = True
                ) -> tuple[int, Any, RTCDataChannel, list[dict[str, Any]]]:
    """POST a data-channel offer; (status, answer or error, channel, Link servers)."""
    channel = pc.createDataChannel("preflight")
    if loopback:
        offer = await offer_sdp(pc)
    else:  # relay-only: no host candidate to advertise
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
    async with http.post(f"{server.base_url}{url(session)}", data=offer,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        if response.status != 201:
            return response.status, await response.json(), channel, []
        answer = await response.text()
        links = parse_link_headers(response.headers.getall("Link", []))
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return 201, answer, channel, links


class Inbox:
    def __init__(self, channel: RTCDataChannel) -> None:
        self.text: list[dict[str, Any]] = []
        self.binary = 0
        channel.on("message", self._on)

    def _on(self, message: object) -> None:
        if isinstance(message, bytes):
            self.binary += len(message)
        elif isinstance(message, str):
            self.text.append(json.loads(message))

    def of(self, kind: str) -> dict[str, Any] | None:
        return next((m for m in self.text if m.get("type") == kind), None)


async def ping_and_download(channel: RTCDataChannel, size: int) -> Inbox:
    await wait_for(lambda: "" if channel.readyState == "open" else channel.readyState,
                   timeout=15)
    inbox = Inbox(channel)
    channel.send(json.dumps({"type": "ping", "t": 7}))
    await wait_for(lambda: "" if inbox.of("pong") else "no pong")
    assert inbox.of("pong") == {"type": "pong", "t": 7}
    channel.send(json.dumps({"type": "download", "bytes": size, "seconds": 5}))
    await wait_for(lambda: "" if inbox.of("done") else f"{inbox.binary} bytes", timeout=15)
    return inbox


async def test_check_before_the_session_direct_then_the_invite_still_works(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]):
    admin = admin_token(server)
    await schedule(http, server, admin, "or1-later", title="Hernia repair")
    _, created = await api(http, server, "POST", "/api/admin/sessions/or1-later/invites", admin,
                           {"role": "trainee", "max_uses": 1}, expect=201)
    invite = created["token"]

    _, info = await api(http, server, "GET", url("or1-later"), invite, expect=200)
    assert info["session"]["state"] == "scheduled"
    assert info["session"]["title"] == "Hernia repair"
    assert info["ice_servers"] == [] and info["turn"] == []
    config = server.config.media
    assert info["video_kbps"] == {"min": config.min_bitrate_kbps,
                                  "good": config.max_bitrate_kbps}

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(pc)
    status, answer, channel, links = await check(http, server, invite, "or1-later", pc)
    assert status == 201, answer
    assert links == []
    inbox = await ping_and_download(channel, info["download"]["bytes"])
    done = inbox.of("done")
    assert done is not None and done["bytes"] == info["download"]["bytes"] == inbox.binary
    assert len(server.app[PREFLIGHTS]) == 1
    # Nothing of the Session was touched: still scheduled, nobody in it.
    assert "or1-later" not in server.registry.sessions
    # Checking was not a use: the single-use invite is redeemed afterwards.
    _, redeemed = await api(http, server, "POST", "/api/invites/redeem", invite,
                            {"device": "d" * 32, "name": "Dr Check"}, expect=200)
    assert "watch.html" in redeemed["page"]
    await pc.close()
    await wait_for(lambda: "" if len(server.app[PREFLIGHTS]) == 0
                   else f"{len(server.app[PREFLIGHTS])} checks open", timeout=15)


@pytest.mark.slow
async def test_check_through_coturn_relay_only(
        turn_server: Server, coturn: Coturn, http: aiohttp.ClientSession,
        peers: list[RTCPeerConnection]):
    server = turn_server
    token = server.token(Role.TRAINEE, participant_id="checker")
    _, info = await api(http, server, "GET", url("or1-live"), token, expect=200)
    assert info["turn"] == [{"url": coturn.url(t), "transport": t} for t in ("udp", "tcp", "tls")]
    (entry,) = info["ice_servers"]
    assert entry["username"].endswith(":checker")
    pc = RTCPeerConnection(RTCConfiguration(
        iceServers=[RTCIceServer(urls=[coturn.url("tcp")], username=entry["username"],
                                 credential=entry["credential"])],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    peers.append(pc)
    status, answer, channel, links = await check(http, server, token, "or1-live", pc,
                                                 loopback=False)
    assert status == 201, answer
    assert [u for link in links for u in link["urls"]] == coturn.urls
    assert {link["username"] for link in links} == {entry["username"]}
    inbox = await ping_and_download(channel, 300_000)
    assert inbox.binary == 300_000
    assert f"username=<{entry['username']}>" in coturn.log()


async def test_checks_are_for_live_media_roles_data_only_and_bounded(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]):
    status, body = await api(http, server, "GET", url("or1-live"), server.token(Role.REVIEWER))
    assert (status, body["code"]) == (403, "wrong_role")

    video = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(video)
    video.addTransceiver(VideoStreamTrack(), direction="sendonly")
    async with http.post(f"{server.base_url}{url('or1-live')}", data=await offer_sdp(video),
                         headers={"Authorization": "Bearer " + server.token(Role.TRAINEE),
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 422
        assert (await response.json())["code"] == "sdp_not_datachannel"

    # A page checking again replaces its oldest check: at most 4 per Participant.
    token = server.token(Role.TRAINEE, participant_id="again")
    for _ in range(6):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peers.append(pc)
        status, answer, _, _ = await check(http, server, token, "or1-live", pc)
        assert status == 201, answer
    assert len(server.app[PREFLIGHTS]) == 4
