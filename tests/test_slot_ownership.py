"""One publisher per camera slot (docs/protocol.md, "WHIP ingest" and "Websocket"):
refused with `slot_taken` unless the publisher asks to take over and may; both
sides see it happen; the broadcast page never fights an encoder for its slot."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack

from server.publish.whip import WhipOptions, WhipPublisher
from server.roles import Role

from .browser_helpers import chromium_available, open_page, wait_js
from .conftest import LOOPBACK, Server, client_pc, offer_sdp, wait_for, whep_subscribe
from .test_ws_protocol import WS, check_error, join, of_type, receive_until

SESSION = "or1-live"
ROOM = f"/whip/{SESSION}/room"


async def whip(http: aiohttp.ClientSession, server: Server, token: str, *,
               takeover: bool = False) -> tuple[int, str, RTCPeerConnection]:
    pc = client_pc()
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    url = f"{server.base_url}{ROOM}" + ("?takeover=1" if takeover else "")
    async with http.post(url, data=await offer_sdp(pc),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        status = response.status
    if status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return status, body, pc


async def page_publish(ws: WS, pc: RTCPeerConnection, request_id: str, *,
                       takeover: bool | None = None) -> dict[str, object]:
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    message = {"type": "publish", "slot": "room", "id": request_id, "sdp": await offer_sdp(pc)}
    if takeover is not None:
        message["takeover"] = takeover
    await ws.send_json(message)
    reply = await receive_until(ws, lambda m: m.get("id") == request_id)
    if reply["type"] == "answer":
        await pc.setRemoteDescription(RTCSessionDescription(str(reply["sdp"]), "answer"))
    return reply


async def test_the_experts_page_takes_a_slot_from_an_encoder_never_the_reverse(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    session = server.session()
    encoder_token = server.token(Role.EXPERT, name="Room encoder", participant_id="enc-1")
    status, body, encoder = await whip(http, server, encoder_token)
    peers.append(encoder)
    assert status == 201, body
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].frames_received else "no frames")
    viewer, _, _ = await whep_subscribe(http, server, "room.video", "video")
    peers.append(viewer)
    viewer_id = next(iter(session.subscriptions))
    expert, welcome = await join(http, server, sockets, Role.EXPERT, name="Dr Grey",
                                 participant_id="exp-1")
    # The page learns who publishes the slot (and so never preselects a camera for it).
    (feed,) = [f for f in welcome["session"]["feeds"] if f["id"] == "room.video"]
    assert feed["publisher"] == {"id": "enc-1", "name": "Room encoder", "via": "whip"}

    # Without asking: refused, the encoder keeps the slot.
    page = client_pc()
    peers.append(page)
    refused = await page_publish(expert, page, "p1")
    check_error(refused, 409, "slot_taken", request_id="p1")
    assert "Room encoder" in refused["error"]["message"]  # type: ignore[index]
    assert session.slot_owner("room") is not None
    assert session.slot_owner("room").participant_id == "enc-1"  # type: ignore[union-attr]

    # Taking over: the page owns the slot, the encoder's connection is closed,
    # the viewer stays subscribed to the same Feed.
    page = client_pc()
    peers.append(page)
    answer = await page_publish(expert, page, "p2", takeover=True)
    assert answer["type"] == "answer"
    assert session.slot_owner("room").participant_id == "exp-1"  # type: ignore[union-attr]
    await wait_for(lambda: "" if encoder.connectionState == "closed"
                   else f"encoder still {encoder.connectionState}")
    assert viewer_id in session.subscriptions
    assert session.describe_feed(session.feeds["room.video"])["publisher"] == {
        "id": "exp-1", "name": "Dr Grey", "via": "page"}

    # The encoder comes back: it may not take the expert's camera, even asking.
    status, body, again = await whip(http, server, encoder_token)
    peers.append(again)
    assert status == 409 and '"slot_taken"' in body
    status, body, again = await whip(http, server, encoder_token, takeover=True)
    peers.append(again)
    assert status == 403 and '"takeover_refused"' in body
    assert session.slot_owner("room").participant_id == "exp-1"  # type: ignore[union-attr]


async def test_both_sides_see_a_takeover_between_pages_and_between_encoders(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    session = server.session()
    laptop, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey",
                           participant_id="exp-laptop")
    tablet, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey (tablet)",
                           participant_id="exp-tablet")
    admin, _ = await join(http, server, sockets, Role.ADMIN, name="Theatre manager")
    first, second = client_pc(), client_pc()
    peers += [first, second]
    assert (await page_publish(laptop, first, "a"))["type"] == "answer"
    assert (await page_publish(tablet, second, "b", takeover=True))["type"] == "answer"
    # The page that lost the slot is told, and by whom; it must not publish it again.
    ended = await receive_until(laptop, of_type("publication_ended"))
    assert ended["slot"] == "room" and ended["reason"] == "taken_over"
    assert ended["by"] == {"id": "exp-tablet", "name": "Dr Grey (tablet)", "via": "page"}
    # Moderators see it too.
    seen = await receive_until(admin, of_type("slot_taken_over"))
    assert seen["from"]["id"] == "exp-laptop" and seen["by"]["id"] == "exp-tablet"
    # A websocket takeover flag must be a boolean.
    bad = client_pc()
    peers.append(bad)
    check_error(await page_publish(laptop, bad, "c", takeover="yes"),  # type: ignore[arg-type]
                400, "bad_message", request_id="c")

    # Between encoders: a second one takes over only when asked.
    await session.close_slot(session.slot_owner("room").grant,  # type: ignore[union-attr,arg-type]
                             "room")
    one = server.token(Role.EXPERT, name="Encoder A", participant_id="enc-a")
    two = server.token(Role.EXPERT, name="Encoder B", participant_id="enc-b")
    status, _, pc_a = await whip(http, server, one)
    peers.append(pc_a)
    assert status == 201
    await wait_for(lambda: "" if pc_a.connectionState == "connected" else pc_a.connectionState)
    status, body, pc_b = await whip(http, server, two)
    peers.append(pc_b)
    assert status == 409 and '"slot_taken"' in body
    status, _, pc_b = await whip(http, server, two, takeover=True)
    peers.append(pc_b)
    assert status == 201
    assert session.slot_owner("room").participant_id == "enc-b"  # type: ignore[union-attr]
    await wait_for(lambda: "" if pc_a.connectionState == "closed" else pc_a.connectionState)


async def test_scrubin_publish_waits_for_a_taken_slot_instead_of_fighting(
        server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        sockets: list[WS]) -> None:
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey",
                           participant_id="exp-1")
    page = client_pc()
    peers.append(page)
    assert (await page_publish(expert, page, "p"))["type"] == "answer"
    states: list[str] = []
    publisher = WhipPublisher(f"{server.base_url}{ROOM}",
                              server.token(Role.EXPERT, name="Encoder", participant_id="enc"),
                              [VideoStreamTrack()],
                              WhipOptions(host_addresses=LOOPBACK, min_backoff_s=0.05,
                                          max_backoff_s=0.3))
    publisher.on_state = states.append
    task = asyncio.ensure_future(publisher.run())
    try:
        await wait_for(lambda: "" if states.count("waiting") >= 2 else f"{states}")
        assert "live" not in states and not task.done()
        assert session.slot_owner("room").participant_id == "exp-1"  # type: ignore[union-attr]
        # Once the expert stops, the encoder gets the slot.
        await expert.send_json({"type": "unpublish", "slot": "room", "id": "u"})
        await receive_until(expert, of_type("ok", id="u"))
        await wait_for(lambda: "" if publisher.state == "live" else publisher.state, timeout=15)
        assert session.slot_owner("room").participant_id == "enc"  # type: ignore[union-attr]
    finally:
        publisher.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not chromium_available(), reason="needs /usr/bin/chromium")
async def test_the_broadcast_page_leaves_an_encoders_slot_alone_until_asked(
        live_server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        browser: object) -> None:
    server = live_server
    session = server.session()
    status, _, encoder = await whip(http, server, server.token(
        Role.EXPERT, name="Synthetic camera", participant_id="enc-1"))
    peers.append(encoder)
    assert status == 201
    token = server.token(Role.EXPERT, name="Dr Grey", participant_id="exp-1")
    _, page, log = await open_page(browser, f"{server.base_url}/broadcast.html#token={token}",
                                   "expert")
    await wait_js(page, "() => window.scrubin && window.scrubin.client.state === 'open'")
    # The camera goes to the next free slot, not to the encoder's.
    await wait_js(page, "() => scrubin.slotState('endoscope') === 'preview'")
    room = page.locator('.slot-card[data-slot="room"]')
    assert await room.locator(".camera-select").input_value() == ""
    assert "Synthetic camera" in await room.locator(".slot-owner").inner_text()
    await page.click("#go-live")
    await wait_for(lambda: "" if session.slot_owner("endoscope") is not None else "not live")
    assert session.slot_owner("room").participant_id == "enc-1"  # type: ignore[union-attr]
    # Choosing a camera for the encoder's slot offers a takeover; taking it is explicit.
    await room.locator(".camera-select").select_option(index=1)
    takeover = room.locator(".slot-takeover")
    await takeover.wait_for(state="visible")
    await takeover.click()
    await wait_for(lambda: "" if session.slot_owner("room") is not None
                   and session.slot_owner("room").participant_id == "exp-1"  # type: ignore[union-attr]
                   else "not taken over", timeout=15)
    await wait_for(lambda: "" if encoder.connectionState == "closed" else "encoder connected")
    assert not log.errors, log.errors
