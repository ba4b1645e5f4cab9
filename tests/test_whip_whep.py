"""WHIP ingest and WHEP egress over real HTTP with real aiortc peers (docs/protocol.md, RFC 9725).

Every refused request must answer the documented error object and keep nothing:
no Ingest, no Feed, no Subscription, no live peer connection on the server.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from server.media.hooks import advertise_host_addresses
from server.roles import Role
from server.session import Session
from server.tokens import TokenAuthority

from .conftest import (
    Server,
    client_pc,
    live_peer_connections,
    make_config,
    offer_sdp,
    start_server,
    wait_for,
    whep_subscribe,
    whip_publish,
)

SESSION = "or1-live"
WHIP_ROOM = f"/whip/{SESSION}/room"
WHEP_ROOM_VIDEO = f"/whep/{SESSION}/room.video"
RESOURCE_ID = r"[A-Za-z0-9_-]{16,}"
#: Whose fault each status is (docs/protocol.md, "Errors").
PROTOCOL_FAULTS = {400, 405, 413, 415}


# -- helpers ----------------------------------------------------------------

async def make_offer(*kinds: str, direction: str = "sendonly",
                     codecs: dict[str, list[str]] | None = None) -> str:
    """A real aiortc offer (loopback candidates); the peer is closed again at once."""
    pc = client_pc()
    try:
        for kind in kinds:
            if direction == "sendonly":
                track = VideoStreamTrack() if kind == "video" else AudioStreamTrack()
                transceiver = pc.addTransceiver(track, direction="sendonly")
            else:
                transceiver = pc.addTransceiver(kind, direction=direction)
            if codecs and kind in codecs:
                caps = RTCRtpReceiver.getCapabilities(kind).codecs
                transceiver.setCodecPreferences(
                    [c for c in caps if c.mimeType in codecs[kind]])
        return await offer_sdp(pc)
    finally:
        await pc.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post_sdp(http: aiohttp.ClientSession, server: Server, path: str, body: str | bytes,
                   token: str | None, content_type: str | None = "application/sdp",
                   origin: str | None = None) -> tuple[int, Any, str]:
    headers: dict[str, str] = {}
    if token is not None:
        headers.update(auth(token))
    if content_type is not None:
        headers["Content-Type"] = content_type
    if origin is not None:
        headers["Origin"] = origin
    data = body.encode() if isinstance(body, str) else body
    async with http.post(f"{server.base_url}{path}", data=data, headers=headers) as response:
        return response.status, response.headers, await response.text()


async def check_error(response: aiohttp.ClientResponse, status: int,
                      code: str | None) -> dict[str, Any]:
    """The documented error object, with the documented fault, as JSON."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", response.headers
    body = await response.json()
    assert set(body) >= {"code", "message", "fault", "status"}, body
    assert body["status"] == status, body
    assert isinstance(body["code"], str) and body["code"], body
    if code is not None:
        assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    assert body["fault"] == ("protocol" if status in PROTOCOL_FAULTS else "user"), body
    return body


async def refused(http: aiohttp.ClientSession, server: Server, path: str, body: str | bytes,
                  token: str | None, status: int, code: str,
                  content_type: str | None = "application/sdp",
                  session: Session | None = None) -> dict[str, Any]:
    """POST that must be refused and leave nothing behind."""
    before = Leftovers(session or server.session())
    headers: dict[str, str] = {}
    if token is not None:
        headers.update(auth(token))
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = body.encode() if isinstance(body, str) else body
    async with http.post(f"{server.base_url}{path}", data=data, headers=headers) as response:
        assert "Location" not in response.headers
        error = await check_error(response, status, code)
    before.assert_unchanged()
    return error


class Leftovers:
    """What a Session and the process hold now; a refused request must not add to it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ingests = set(session.ingests)
        self.feeds = set(session.feeds)
        self.subscriptions = set(session.subscriptions)
        self.peers = {id(pc) for pc in live_peer_connections()}

    def assert_unchanged(self) -> None:
        assert set(self.session.ingests) == self.ingests
        assert set(self.session.feeds) == self.feeds
        assert set(self.session.subscriptions) == self.subscriptions
        new = [pc for pc in live_peer_connections() if id(pc) not in self.peers]
        assert not new, f"{len(new)} peer connection(s) left open by a refused request"


def sections(sdp: str) -> list[str]:
    return re.split(r"\r?\n(?=m=)", sdp)[1:]


def candidate_hosts(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def server_peers(*clients: RTCPeerConnection) -> list[RTCPeerConnection]:
    mine = {id(pc) for pc in clients}
    return [pc for pc in live_peer_connections() if id(pc) not in mine]


def remote_candidate_hosts(pc: RTCPeerConnection) -> set[str]:
    hosts = set()
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport.transport
        hosts |= {c.ip for c in transport.getRemoteCandidates()}
    return hosts


async def publish(http: aiohttp.ClientSession, server: Server, peers: list[RTCPeerConnection],
                  slot: str = "room", kinds: tuple[str, ...] = ("video",),
                  token: str | None = None) -> str:
    tracks = [VideoStreamTrack() if k == "video" else AudioStreamTrack() for k in kinds]
    pc, url = await whip_publish(http, server, slot, tracks, token=token)
    peers.append(pc)
    return url


# -- WHIP: success, resource lifecycle ----------------------------------------

async def test_whip_post_creates_resource_with_complete_answer(server, http, peers):
    offer = await make_offer("video", "audio")
    status, headers, answer = await post_sdp(http, server, WHIP_ROOM, offer,
                                             server.token(Role.EXPERT))
    assert status == 201, answer
    assert headers["Content-Type"].split(";")[0] == "application/sdp"

    location = headers["Location"]
    match = re.fullmatch(rf"{WHIP_ROOM}/({RESOURCE_ID})", location)
    assert match, f"Location must be relative, under the endpoint: {location}"
    resource = match.group(1)
    assert headers["ETag"] == f'"{resource}"'
    session = server.session()
    assert resource in session.ingests
    assert sorted(session.feeds) == ["room.audio", "room.video"]
    assert {f.state for f in session.feeds.values()} == {"live"}

    media = sections(answer)
    assert [m.split()[0] for m in media] == ["m=video", "m=audio"]
    for section in media:
        assert "a=setup:passive" in section.splitlines(), section
        assert "a=end-of-candidates" in section.splitlines(), section
        assert "a=recvonly" in section.splitlines(), section
    hosts = candidate_hosts(answer)
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts
    video_fmtp = [line for line in media[0].splitlines() if line.startswith("a=fmtp:")
                  and "apt=" not in line]
    assert video_fmtp and all("x-google-min-bitrate=1000" in f for f in video_fmtp), video_fmtp
    assert all("x-google-max-bitrate=4000" in f for f in video_fmtp)
    assert "x-google" not in media[1]

    # A second publication gets a different, unguessable id.
    status, headers2, _ = await post_sdp(http, server, f"/whip/{SESSION}/endoscope",
                                         await make_offer("video"), server.token(Role.EXPERT))
    assert status == 201
    other = headers2["Location"].rsplit("/", 1)[1]
    assert other != resource and len(other) >= 16


async def test_whip_to_whep_media_flows_and_delete_frees_everything(server, http, peers):
    publisher_url = await publish(http, server, peers, kinds=("video", "audio"))
    publisher = peers[0]
    viewer, viewer_url, track = await whep_subscribe(http, server, "room.video", "video")
    peers.append(viewer)
    assert re.fullmatch(rf"{server.base_url}{WHEP_ROOM_VIDEO}/{RESOURCE_ID}", viewer_url)

    frame = await asyncio.wait_for((await asyncio.wait_for(track, 10)).recv(), 10)
    assert (frame.width, frame.height) == (640, 480)
    assert publisher.connectionState == "connected"
    session = server.session()
    assert session.describe_feed(session.feeds["room.video"])["viewers"] == 1
    assert len(server_peers(publisher, viewer)) == 2

    async with http.delete(publisher_url, headers=auth(server.token(Role.EXPERT))) as response:
        assert response.status == 200, await response.text()

    def freed() -> str:
        left = {"ingests": session.ingests, "feeds": session.feeds,
                "subscriptions": session.subscriptions}
        if any(left.values()):
            return f"still held: {left}"
        live = server_peers(publisher, viewer)
        return f"{len(live)} server peer connection(s) open" if live else ""

    await wait_for(freed, timeout=5)

    async with http.delete(publisher_url, headers=auth(server.token(Role.EXPERT))) as response:
        await check_error(response, 404, "unknown_resource")
    async with http.delete(viewer_url, headers=auth(server.token(Role.TRAINEE))) as response:
        await check_error(response, 404, "unknown_resource")


async def test_whep_delete_closes_only_that_subscription(server, http, peers):
    await publish(http, server, peers)
    viewer_token = server.token(Role.TRAINEE, participant_id="viewer-1")
    viewer, viewer_url, _ = await whep_subscribe(http, server, "room.video", "video",
                                                 token=viewer_token)
    peers.append(viewer)
    session = server.session()
    (subscription_id,) = session.subscriptions
    assert viewer_url.endswith(f"/{subscription_id}")

    # Another trainee may not delete it.
    async with http.delete(viewer_url, headers=auth(server.token(Role.TRAINEE))) as response:
        await check_error(response, 403, "not_owner")
    assert subscription_id in session.subscriptions
    # Nor under another feed's path.
    wrong_path = viewer_url.replace("room.video", "room.audio")
    async with http.delete(wrong_path, headers=auth(viewer_token)) as response:
        await check_error(response, 404, "unknown_resource")

    async with http.delete(viewer_url, headers=auth(viewer_token)) as response:
        assert response.status == 200
    await wait_for(lambda: "" if not session.subscriptions else "subscription still there")
    assert session.feeds["room.video"].state == "live"
    assert session.describe_feed(session.feeds["room.video"])["viewers"] == 0
    await wait_for(lambda: "" if len(server_peers(*peers)) == 1 else "viewer peer still open")
    # Within 60 s the same token's repeated DELETE is met (200); any other token is not.
    async with http.delete(viewer_url, headers=auth(viewer_token)) as response:
        assert response.status == 200
    other_token = server.token(Role.TRAINEE, participant_id="viewer-1")
    async with http.delete(viewer_url, headers=auth(other_token)) as response:
        await check_error(response, 404, "unknown_resource")


async def test_patch_is_405_and_options_advertise_sdp(server, http, peers):
    url = await publish(http, server, peers)
    token = server.token(Role.EXPERT)
    async with http.patch(url, data=b"a=candidate:x", headers={
            **auth(token), "Content-Type": "application/trickle-ice-sdpfrag"}) as response:
        # 405 has no code of its own in the table; the object is still the documented one.
        await check_error(response, 405, None)
        allow = {m.strip() for m in response.headers["Allow"].split(",")}
        assert "DELETE" in allow and "PATCH" not in allow
    viewer, viewer_url, _ = await whep_subscribe(http, server, "room.video", "video")
    peers.append(viewer)
    async with http.patch(viewer_url, data=b"", headers=auth(token)) as response:
        await check_error(response, 405, None)
        assert "DELETE" in response.headers["Allow"]

    for path in (WHIP_ROOM, WHEP_ROOM_VIDEO):
        async with http.options(f"{server.base_url}{path}") as response:
            assert response.status == 204
            assert response.headers["Accept-Post"] == "application/sdp"
            # No origins configured: no CORS grant to anyone.
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.options(f"{server.base_url}{path}",
                                headers={"Origin": "https://ok.example"}) as response:
            assert response.status == 204
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_only_for_configured_origins(http):
    srv, runner = await start_server(make_config(server={"cors_origins": ["https://ok.example"]}))
    created: list[RTCPeerConnection] = []
    try:
        for path in (WHIP_ROOM, WHEP_ROOM_VIDEO):
            async with http.options(f"{srv.base_url}{path}", headers={
                    "Origin": "https://ok.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type"}) as response:
                assert response.status == 204
                h = response.headers
                assert h["Access-Control-Allow-Origin"] == "https://ok.example"
                assert "POST" in h["Access-Control-Allow-Methods"]
                assert "DELETE" in h["Access-Control-Allow-Methods"]
                allowed = h["Access-Control-Allow-Headers"].lower()
                assert "authorization" in allowed and "content-type" in allowed
                exposed = h["Access-Control-Expose-Headers"].lower()
                assert "location" in exposed and "etag" in exposed
                assert "Origin" in h.get("Vary", "")
            for evil in ("https://evil.example", "https://ok.example.evil.example", "null"):
                async with http.options(f"{srv.base_url}{path}",
                                        headers={"Origin": evil}) as response:
                    assert response.status == 204
                    assert "Access-Control-Allow-Origin" not in response.headers
                    assert "Access-Control-Allow-Methods" not in response.headers

        token = srv.token(Role.EXPERT)
        status, headers, body = await post_sdp(http, srv, WHIP_ROOM, await make_offer("video"),
                                               token, origin="https://ok.example")
        assert status == 201, body
        assert headers["Access-Control-Allow-Origin"] == "https://ok.example"
        assert "location" in headers["Access-Control-Expose-Headers"].lower()
        location = headers["Location"]
        status, headers, body = await post_sdp(http, srv, f"/whip/{SESSION}/endoscope",
                                               await make_offer("video"), token,
                                               origin="https://evil.example")
        assert status == 201, body
        assert "Access-Control-Allow-Origin" not in headers
        async with http.delete(f"{srv.base_url}{location}", headers={
                **auth(token), "Origin": "https://ok.example"}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "https://ok.example"
        # A browser client must be able to read why it was refused.
        status, headers, body = await post_sdp(http, srv, WHIP_ROOM, await make_offer("video"),
                                               None, origin="https://ok.example")
        assert status == 401
        assert headers.get("Access-Control-Allow-Origin") == "https://ok.example", (
            "error responses to an allowed origin need CORS headers too")
        status, headers, body = await post_sdp(http, srv, WHIP_ROOM, await make_offer("video"),
                                               None, origin="https://evil.example")
        assert status == 401
        assert "Access-Control-Allow-Origin" not in headers
    finally:
        for pc in created:
            await pc.close()
        await runner.cleanup()


# -- tokens and roles ---------------------------------------------------------

def _expired(server: Server) -> str:
    return server.token(Role.EXPERT, now=time.time() - 7200, ttl_s=60)


def _foreign_same_kid(server: Server) -> str:
    # Same kid ("ephemeral") as the server's own key, different secret.
    return TokenAuthority([]).issue(SESSION, Role.EXPERT)


def _foreign_kid(server: Server) -> str:
    return TokenAuthority(["other:" + "x" * 40]).issue(SESSION, Role.EXPERT)


AUTH_CASES: list[tuple[str, Callable[[Server], str | None], str, int, str]] = [
    ("no-token", lambda s: None, "whip", 401, "token_missing"),
    ("empty-bearer", lambda s: "", "whip", 401, "token_missing"),
    ("garbage", lambda s: "not.a.jwt", "whip", 401, "token_invalid"),
    ("garbage-whep", lambda s: "garbage", "whep", 401, "token_invalid"),
    ("expired", _expired, "whip", 401, "token_expired"),
    ("other-authority", _foreign_same_kid, "whip", 401, "token_invalid"),
    ("unknown-kid", _foreign_kid, "whep", 401, "token_invalid"),
    ("trainee-whip", lambda s: s.token(Role.TRAINEE), "whip", 403, "wrong_role"),
    ("recorder-whip", lambda s: s.token(Role.RECORDER), "whip", 403, "wrong_role"),
    ("reviewer-whip", lambda s: s.token(Role.REVIEWER), "whip", 403, "wrong_role"),
    ("reviewer-whep", lambda s: s.token(Role.REVIEWER), "whep", 403, "wrong_role"),
    ("other-session-whip", lambda s: s.token(Role.EXPERT, "or2-live"), "whip", 403,
     "wrong_session"),
    ("other-session-whep", lambda s: s.token(Role.TRAINEE, "or2-live"), "whep", 403,
     "wrong_session"),
]


@pytest.mark.parametrize(("make_token", "endpoint", "status", "code"),
                         [case[1:] for case in AUTH_CASES], ids=[c[0] for c in AUTH_CASES])
async def test_auth_refusals(server, http, peers, make_token, endpoint, status, code):
    await publish(http, server, peers)  # so that WHEP would otherwise succeed
    kind_offer = await make_offer("video", direction="sendonly" if endpoint == "whip"
                                  else "recvonly")
    path = WHIP_ROOM if endpoint == "whip" else WHEP_ROOM_VIDEO
    token = make_token(server)
    if token == "":
        before = Leftovers(server.session())
        async with http.post(f"{server.base_url}{path}", data=kind_offer.encode(), headers={
                "Authorization": "Bearer ", "Content-Type": "application/sdp"}) as response:
            await check_error(response, status, code)
        before.assert_unchanged()
        return
    await refused(http, server, path, kind_offer, token, status, code)


async def test_delete_needs_a_valid_token(server, http, peers):
    url = await publish(http, server, peers)
    async with http.delete(url) as response:
        await check_error(response, 401, "token_missing")
    async with http.delete(url, headers=auth(server.token(Role.TRAINEE))) as response:
        await check_error(response, 403, "not_owner")
    async with http.delete(url, headers=auth(server.token(Role.EXPERT, "or2-live"))) as response:
        await check_error(response, 403, "wrong_session")
    # The resource id only counts under its own slot.
    async with http.delete(url.replace("/room/", "/endoscope/"),
                           headers=auth(server.token(Role.EXPERT))) as response:
        await check_error(response, 404, "unknown_resource")
    async with http.delete(url + "x", headers=auth(server.token(Role.EXPERT))) as response:
        await check_error(response, 404, "unknown_resource")
    assert len(server.session().ingests) == 1


async def test_unknown_session_slot_feed(server, http, peers):
    offer = await make_offer("video")
    await refused(http, server, f"/whip/{SESSION}/ceiling", offer, server.token(Role.EXPERT),
                  404, "unknown_slot")
    await refused(http, server, WHEP_ROOM_VIDEO, await make_offer("video", direction="recvonly"),
                  server.token(Role.TRAINEE), 404, "unknown_feed")
    await refused(http, server, "/whip/nowhere/room", offer,
                  server.token(Role.EXPERT, "nowhere"), 404, "unknown_session")
    await publish(http, server, peers)
    await refused(http, server, f"/whep/{SESSION}/room.audio",
                  await make_offer("audio", direction="recvonly"), server.token(Role.TRAINEE),
                  404, "unknown_feed")


async def test_ended_session_is_gone(server, http, peers):
    await publish(http, server, peers)
    session = server.session()
    async with http.post(f"{server.base_url}/api/sessions/{SESSION}/end",
                         headers=auth(server.token(Role.EXPERT))) as response:
        assert response.status == 200
    assert session.state == "ended"
    assert not session.feeds and not session.ingests
    await refused(http, server, WHIP_ROOM, await make_offer("video"), server.token(Role.EXPERT),
                  410, "session_ended", session=session)
    await refused(http, server, WHEP_ROOM_VIDEO, await make_offer("video", direction="recvonly"),
                  server.token(Role.TRAINEE), 410, "session_ended", session=session)
    assert not server_peers(*peers)


# -- bodies and SDP -------------------------------------------------------------

async def test_wrong_content_type_is_415(server, http):
    offer = await make_offer("video")
    token = server.token(Role.EXPERT)
    for ctype in ("text/plain", "application/json", "application/sdpx", None):
        await refused(http, server, WHIP_ROOM, offer, token, 415, "unsupported_media_type",
                      content_type=ctype)
    await refused(http, server, WHEP_ROOM_VIDEO, offer, server.token(Role.TRAINEE), 415,
                  "unsupported_media_type", content_type="text/plain")
    # Parameters after the media type are fine.
    status, _, body = await post_sdp(http, server, WHIP_ROOM, offer, token,
                                     content_type="application/sdp; charset=utf-8")
    assert status == 201, body


async def test_bodies_over_the_limits_are_413(server, http):
    offer = await make_offer("video")
    token = server.token(Role.EXPERT)
    limits = server.config.limits
    # Over the SDP limit but under the HTTP body limit: the SDP check refuses it.
    padding = "".join(f"a=x-pad:{i:06d}{'p' * 64}\r\n"
                      for i in range(limits.max_sdp_bytes // 70 + 10))
    big_sdp = offer + padding
    assert limits.max_sdp_bytes < len(big_sdp) < limits.max_body_bytes
    await refused(http, server, WHIP_ROOM, big_sdp, token, 413, "sdp_too_large")
    # Over the HTTP body limit.
    huge = offer + "a=x-pad:" + "p" * (limits.max_body_bytes + 1000) + "\r\n"
    await refused(http, server, WHIP_ROOM, huge, token, 413, "too_large")
    await refused(http, server, WHEP_ROOM_VIDEO, huge, server.token(Role.TRAINEE), 413,
                  "too_large")


def _truncations(offer: str) -> dict[str, str]:
    lines = offer.split("\r\n")
    m_line = next(i for i, line in enumerate(lines) if line.startswith("m="))
    cand = offer.index("a=candidate:")
    return {
        "half": offer[: len(offer) // 2],
        "after-m-line": "\r\n".join(lines[: m_line + 1]) + "\r\n",
        "mid-candidate": offer[: cand + 30],
        "mid-fingerprint": offer[: offer.index("a=fingerprint:") + 30],
        "header-only": "\r\n".join(lines[:4]) + "\r\n",
    }


async def test_malformed_sdp_is_refused_and_nothing_is_kept(server, http):
    offer = await make_offer("video", "audio")
    token = server.token(Role.EXPERT)
    cases = {
        "garbage": ("hello, I am not SDP", 400, "sdp_malformed"),
        "empty": ("", 400, "sdp_malformed"),
        "whitespace": ("\r\n  \r\n", 400, "sdp_malformed"),
        "not-utf8": (b"v=0\r\n\xff\xfe\xfd", 400, "sdp_malformed"),
        "bad-candidate": (offer.replace("a=candidate:", "a=candidate:x", 1)
                          .replace(" udp ", " udp nonsense ", 1), 400, "sdp_malformed"),
        "no-ice-credentials": ("\r\n".join(line for line in offer.split("\r\n")
                                           if not line.startswith("a=ice-")),
                               400, "sdp_malformed"),
        "no-fingerprint": ("\r\n".join(line for line in offer.split("\r\n")
                                       if not line.startswith("a=fingerprint")),
                           400, "sdp_malformed"),
    }
    for name, text in _truncations(offer).items():
        cases[f"truncated-{name}"] = (text, None, None)
    for name, (body, status, code) in cases.items():
        before = Leftovers(server.session())
        async with http.post(f"{server.base_url}{WHIP_ROOM}", data=body if isinstance(body, bytes)
                             else body.encode(), headers={
                                 **auth(token), "Content-Type": "application/sdp"}) as response:
            if status is None:
                # Any refusal is fine for a truncated offer, but it must be the
                # client's (4xx) and documented, never a 500 or a 201.
                assert 400 <= response.status < 500, (name, await response.text())
                error = await check_error(response, response.status,
                                          (await response.json())["code"])
                assert error["code"] in {"sdp_malformed", "sdp_no_media", "sdp_no_codec",
                                         "sdp_rejected", "sdp_no_candidate"}, (name, error)
            else:
                await check_error(response, status, code)
        before.assert_unchanged()


async def accepted_without(http, server, offer, token, host):
    status, headers, answer = await post_sdp(http, server, WHIP_ROOM, offer, token)
    assert status == 201, answer
    ingest = server.session().ingests[headers["Location"].rsplit("/", 1)[1]]
    assert not any(host in h for h in remote_candidate_hosts(ingest.pc))
    async with http.delete(f"{server.base_url}{headers['Location']}",
                           headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200


async def test_unusable_offers_are_422(server, http):
    token = server.token(Role.EXPERT)

    pc = client_pc()
    try:
        pc.createDataChannel("chat")
        datachannel_only = await offer_sdp(pc)
    finally:
        await pc.close()
    assert "m=application" in datachannel_only
    await refused(http, server, WHIP_ROOM, datachannel_only, token, 422, "sdp_no_media")

    await refused(http, server, WHIP_ROOM, await make_offer("video", direction="recvonly"),
                  token, 422, "sdp_direction")
    await refused(http, server, WHIP_ROOM, await make_offer("video", direction="inactive"),
                  token, 422, "sdp_direction")

    pcmu = await make_offer("audio", codecs={"audio": ["audio/PCMU"]})
    assert "PCMU" in pcmu and "opus" not in pcmu
    await refused(http, server, f"/whip/{SESSION}/narration", pcmu, token, 422, "sdp_no_codec")

    # Hand-edited: the offer's only audio codec replaced by PCMU.
    opus = await make_offer("audio", codecs={"audio": ["audio/opus"]})
    edited = opus.replace("opus/48000/2", "PCMU/8000")
    assert "opus" not in edited
    await refused(http, server, f"/whip/{SESSION}/narration", edited, token, 422, "sdp_no_codec")

    limit = server.config.limits.max_media_sections
    too_many = await make_offer(*(["video", "audio"] * limit)[: limit + 1])
    await refused(http, server, WHIP_ROOM, too_many, token, 422, "sdp_too_many_media")
    # Two video sections are a camera and its low layer; a third is one too many.
    await refused(http, server, WHIP_ROOM, await make_offer("video", "video", "video"), token,
                  422, "sdp_duplicate_kind")
    await refused(http, server, WHIP_ROOM, await make_offer("audio", "audio"), token, 422,
                  "sdp_duplicate_kind")


async def test_remote_candidates_outside_allowed_networks_are_never_used(server, http, peers):
    token = server.token(Role.EXPERT)
    offer = await make_offer("video")
    lan_only = "\r\n".join(line.replace(" 127.0.0.1 ", " 10.1.2.3 ")
                           if line.startswith("a=candidate:") else line
                           for line in offer.split("\r\n"))
    assert " 10.1.2.3 " in lan_only and candidate_hosts(lan_only) == ["10.1.2.3"]
    # Accepted (browsers hide their addresses behind mDNS; ICE then connects through
    # peer-reflexive candidates), but the server never learns, let alone contacts,
    # an address outside the allowed networks.
    await accepted_without(http, server, lan_only, token, "10.1.2.3")

    mdns = " 2f6c1d0e-9b1a-4c1e-8b57-0d1c1a2b3c4d.local "
    mdns_only = "\r\n".join(line.replace(" 127.0.0.1 ", mdns)
                            if line.startswith("a=candidate:") else line
                            for line in offer.split("\r\n"))
    assert candidate_hosts(mdns_only) == [mdns.strip()]
    await accepted_without(http, server, mdns_only, token, ".local")

    # Mixed: the loopback candidate is used; the LAN and mDNS ones never reach ICE.
    pc = client_pc()
    peers.append(pc)
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    real = await offer_sdp(pc)
    extra = []
    for line in real.split("\r\n"):
        extra.append(line)
        if line.startswith("a=candidate:"):
            parts = line.split()
            extra.append(" ".join([parts[0] + "1", *parts[1:4], "10.1.2.3", *parts[5:]]))
            extra.append(" ".join([parts[0] + "2", *parts[1:4], "abcdef.local", *parts[5:]]))
            extra.append(" ".join([parts[0] + "3", *parts[1:4], "192.168.7.7", *parts[5:]]))
    mixed = "\r\n".join(extra)
    status, headers, answer = await post_sdp(http, server, WHIP_ROOM, mixed, token)
    assert status == 201, answer
    ingest = server.session().ingests[headers["Location"].rsplit("/", 1)[1]]
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await wait_for(lambda: "" if pc.connectionState == "connected" else pc.connectionState)
    assert remote_candidate_hosts(ingest.pc) <= {"127.0.0.1"}, remote_candidate_hosts(ingest.pc)


# -- WHEP specifics -------------------------------------------------------------

async def test_whep_offer_must_match_the_feed(server, http, peers):
    await publish(http, server, peers)
    token = server.token(Role.TRAINEE)
    await refused(http, server, WHEP_ROOM_VIDEO, await make_offer("audio", direction="recvonly"),
                  token, 422, "sdp_kind_mismatch")
    await refused(http, server, WHEP_ROOM_VIDEO, await make_offer("video", direction="sendonly"),
                  token, 422, "sdp_direction")
    # Whatever its code (see the xfail test below), a player without the Feed's codec
    # is refused as the client's problem, and nothing is kept.
    before = Leftovers(server.session())
    h264_only = await make_offer("video", direction="recvonly",
                                 codecs={"video": ["video/H264", "video/rtx"]})
    status, _, body = await post_sdp(http, server, WHEP_ROOM_VIDEO, h264_only, token)
    assert status == 422, body
    before.assert_unchanged()

    # The answer offers exactly the Feed's codec.
    status, _, answer = await post_sdp(http, server, WHEP_ROOM_VIDEO,
                                       await make_offer("video", direction="recvonly"), token)
    assert status == 201, answer
    codecs = {line.split()[1].split("/")[0] for line in answer.splitlines()
              if line.startswith("a=rtpmap:")}
    assert codecs <= {"VP8", "rtx"} and "VP8" in codecs, codecs
    assert "a=setup:passive" in answer and "a=end-of-candidates" in answer
    assert set(candidate_hosts(answer)) == {"127.0.0.1"}
    for subscription in list(server.session().subscriptions.values()):
        await subscription.close()


async def test_whep_player_without_the_feed_codec_gets_codec_mismatch(server, http, peers):
    await publish(http, server, peers)
    # The Feed is VP8; a player that only takes H.264 cannot be served without transcoding.
    h264_only = await make_offer("video", direction="recvonly",
                                 codecs={"video": ["video/H264", "video/rtx"]})
    assert "VP8" not in h264_only and "H264" in h264_only
    await refused(http, server, WHEP_ROOM_VIDEO, h264_only, server.token(Role.TRAINEE), 422,
                  "codec_mismatch")


async def test_feed_limit_is_409(http):
    srv, runner = await start_server(make_config(limits={"max_feeds_per_session": 1}))
    created: list[RTCPeerConnection] = []
    try:
        encoder = srv.token(Role.EXPERT, participant_id="encoder-1")
        await publish(http, srv, created, token=encoder)
        await refused(http, srv, f"/whip/{SESSION}/endoscope", await make_offer("video"),
                      srv.token(Role.EXPERT), 409, "too_many_feeds")
        # The same publisher again on the same slot replaces its connection: no new Feed.
        await publish(http, srv, created, token=encoder)
        assert list(srv.session().feeds) == ["room.video"]
        assert len(srv.session().ingests) == 1
    finally:
        for pc in created:
            await pc.close()
        await runner.cleanup()


async def test_subscription_limit_is_409(http):
    srv, runner = await start_server(make_config(
        limits={"max_subscriptions_per_participant": 1}))
    created: list[RTCPeerConnection] = []
    try:
        await publish(http, srv, created)
        token = srv.token(Role.TRAINEE, participant_id="t-1")
        viewer, _, _ = await whep_subscribe(http, srv, "room.video", "video", token=token)
        created.append(viewer)
        await refused(http, srv, WHEP_ROOM_VIDEO, await make_offer("video", direction="recvonly"),
                      token, 409, "too_many_subscriptions")
        # The limit is per participant.
        other, _, _ = await whep_subscribe(http, srv, "room.video", "video")
        created.append(other)
        assert len(srv.session().subscriptions) == 2
    finally:
        for pc in created:
            await pc.close()
        await runner.cleanup()


async def test_a_publisher_whose_every_candidate_is_refused_still_connects(http):
    """Its candidates are all outside the allowed networks and its offer says it
    has no more (a=end-of-candidates): the server must still answer in a way its
    checks (peer-reflexive candidates) can connect through."""
    srv, runner = await start_server(make_config(ice={"allowed_remote_networks":
                                                      ["127.0.0.1/32"]}))
    pc = client_pc()
    try:
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        advertise_host_addresses(pc, ["127.0.0.2"])
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        assert "a=end-of-candidates" in offer and candidate_hosts(offer) == ["127.0.0.2"]
        status, _, answer = await post_sdp(http, srv, WHIP_ROOM, offer, srv.token(Role.EXPERT))
        assert status == 201, answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await wait_for(lambda: "" if pc.connectionState == "connected" else pc.connectionState)
        feed = srv.session().feeds["room.video"]
        await wait_for(lambda: "" if feed.frames_received else "no frames")
    finally:
        await pc.close()
        await runner.cleanup()
