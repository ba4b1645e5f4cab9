"""Recording control over the websocket and the HTTP API: start and stop with a
consent record, consent-exact start (stamped media through the server),
refusals, everyone told, automatic recording, Session end, disk errors."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from server.config import ConfigError, load_config
from server.http.common import AUDIT
from server.http.review import RECORDINGS
from server.publish.synthetic import SyntheticTheatreCamera, SyntheticTone
from server.roles import Role

from .conftest import Server, make_config, start_server, wait_for, whip_publish
from .recording_helpers import CONSENT
from .test_recorder import decode_audio, decode_video

WS = aiohttp.ClientWebSocketResponse
AUTO = {"auto_consent_scope": "internal_review", "auto_consent_by": "Theatre manager"}


class Client:
    """One websocket participant: requests by id, every other message kept."""

    def __init__(self, ws: WS, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.events: list[dict[str, Any]] = []
        self._next = 0

    async def request(self, message: dict[str, Any], timeout: float = 15) -> dict[str, Any]:
        self._next += 1
        request_id = f"r{self._next}"
        await self.ws.send_json({**message, "id": request_id})
        while True:
            reply = await self.ws.receive_json(timeout=timeout)
            if reply.get("id") == request_id:
                return dict(reply)
            self.events.append(reply)

    async def wait_event(self, match: Callable[[dict[str, Any]], bool],
                         timeout: float = 10) -> dict[str, Any]:
        for event in self.events:
            if match(event):
                self.events.remove(event)
                return event
        async with asyncio.timeout(timeout):
            while True:
                event = await self.ws.receive_json()
                if match(event):
                    return dict(event)
                self.events.append(event)


def recording_event(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "recording" and m.get("state") == state


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.ws.close()


async def join(http: aiohttp.ClientSession, server: Server, clients: list[Client],
               role: Role, name: str = "") -> Client:
    ws = await http.ws_connect(f"{server.base_url}/ws")
    await ws.send_json({"type": "hello", "id": "h",
                        "token": server.token(role, name=name or role.value)})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome", welcome
    client = Client(ws, welcome)
    clients.append(client)
    return client


async def publish_camera(http: aiohttp.ClientSession, server: Server,
                         peers: list[RTCPeerConnection]) -> None:
    pc, _ = await whip_publish(http, server, "room", [SyntheticTheatreCamera(320, 180, 15)])
    peers.append(pc)
    session = server.session()
    await wait_for(lambda: "" if "room.video" in session.feeds
                   and session.feeds["room.video"].frames_received > 5 else "no frames yet")


async def start_over_http(http: aiohttp.ClientSession, server: Server, token: str,
                          consent: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{server.base_url}/api/sessions/or1-live/recording",
                         json={"consent": consent},
                         headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


@pytest.mark.slow  # real media over WebRTC
@pytest.mark.parametrize("way", ["websocket", "http"])
async def test_nothing_from_before_consent_and_every_clock_agrees(
        server: Server, http: aiohttp.ClientSession, clients: list[Client],
        peers: list[RTCPeerConnection], way: str) -> None:
    """A camera (frame counter, stamped when made) and a tone (beeps on whole
    wall-clock seconds) have been live for seconds, so the Feed holds frames
    from before consent. The first recorded picture is the first keyframe made
    after consent, the sound starts at consent, and the parts sit on the
    Session clock where the camera and the tone made them."""
    camera, tone = SyntheticTheatreCamera(320, 180, 15), SyntheticTone()
    pc, _ = await whip_publish(http, server, "room", [camera, tone])
    peers.append(pc)
    session = server.session()
    await wait_for(lambda: "" if "room.audio" in session.feeds
                   and session.feeds["room.video"].frames_received > 30 else "no media yet")
    assert session.feeds["room.video"].cached_frames()  # a GOP from before consent
    expert = await join(http, server, clients, Role.EXPERT, "Dr Grey")
    asked = time.time()
    if way == "websocket":
        reply = await expert.request({"type": "start_recording", "consent": CONSENT})
        assert reply["type"] == "ok", reply
    else:
        status, body = await start_over_http(http, server, server.token(Role.EXPERT), CONSENT)
        assert status == 201 and body["recording"]["state"] == "on", body
    answered = time.time()
    await asyncio.sleep(3)
    assert (await expert.request({"type": "stop_recording"}))["type"] == "ok"

    [directory] = [p for p in root_of(server).iterdir() if p.is_dir()]
    manifest = json.loads((directory / "manifest.json").read_text())
    zero, started_t = manifest["clock_zero_unix"], manifest["started_t"]
    # One clock: the recording's is the Session's.
    assert zero == session.interaction.started_at
    consent_wall = zero + started_t
    assert asked - 0.002 <= consent_wall <= answered + 0.002
    assert manifest["duration"] == round(manifest["ended_t"] - started_t, 3)
    [video] = [f for f in manifest["feeds"] if f["id"] == "room.video"]
    [audio] = [f for f in manifest["feeds"] if f["id"] == "room.audio"]
    assert all(p["start"] >= started_t for p in video["parts"] + audio["parts"])

    # Video: the first picture was made after consent (a fresh keyframe, asked
    # for), and is placed where the camera made it.
    part = video["parts"][0]
    file_t, first, _ = decode_video(directory / part["file"])[0]
    assert first is not None and file_t == 0.0
    made = camera.last_stamp_times[first]
    assert made >= consent_wall - 0.001, (made - consent_wall)
    assert made - consent_wall < 1.5, "the keyframe asked for at consent came late"
    # Placed by its timestamp: the time on the camera's frame grid, which the
    # picture's hand-out trails when the machine is loaded.
    due = camera.last_due_times[first]
    assert abs((zero + part["start"]) - due) < 0.03, (zero + part["start"] - due, made - due)
    # Audio: from consent on, nothing before; beeps where the tone made them.
    apart = audio["parts"][0]
    assert apart["start"] - started_t < 0.1
    first_sample, samples = decode_audio(directory / apart["file"])
    loud = [i for i in range(1, samples.size) if abs(samples[i]) > 0.3
            and not (abs(samples[max(0, i - 4800):i]) > 0.3).any()]
    assert loud, "no beep recorded"
    offsets = []
    for onset in loud:
        at = zero + apart["start"] + first_sample + onset / 48000
        offsets.append(at - round(at))  # a beep starts on a whole second
    placement = statistics.median(offsets)
    assert abs(placement) < 0.03, offsets
    # The tone's first recorded sample was made at or after consent.
    assert zero + apart["start"] - placement >= consent_wall - 0.02
    print(f"{way}: first picture {1000 * (made - consent_wall):.0f} ms after consent, "
          f"sound {1000 * (zero + apart['start'] - consent_wall):.0f} ms after, "
          f"video placed {1000 * (zero + part['start'] - due):+.1f} ms, "
          f"audio {1000 * placement:+.1f} ms")


async def test_recording_over_the_http_api(server: Server, http: aiohttp.ClientSession) -> None:
    url = f"{server.base_url}/api/sessions/or1-live/recording"
    for role in (Role.TRAINEE, Role.REVIEWER):
        status, body = await start_over_http(http, server, server.token(role), CONSENT)
        assert (status, body["code"]) == (403, "wrong_role"), body
    status, body = await start_over_http(http, server, server.token(Role.EXPERT), None)
    assert (status, body["code"]) == (400, "consent_missing")
    status, body = await start_over_http(http, server, server.token(Role.EXPERT),
                                         {**CONSENT, "scope": "live_only"})
    assert (status, body["code"]) == (409, "consent_scope")
    assert not [p for p in root_of(server).iterdir() if p.is_dir()]
    status, body = await start_over_http(http, server, server.token(Role.ADMIN), CONSENT)
    assert status == 201 and body["recording"]["state"] == "on"
    status, body = await start_over_http(http, server, server.token(Role.EXPERT), CONSENT)
    assert (status, body["code"]) == (409, "recording_active")
    headers = {"Authorization": f"Bearer {server.token(Role.EXPERT)}"}
    async with http.delete(url, headers=headers) as response:
        assert response.status == 200 and (await response.json())["recording"]["state"] == "off"
    async with http.delete(url, headers=headers) as response:
        assert response.status == 409 and (await response.json())["code"] == "not_recording"
    assert [e["by"]["role"] for e in audit_events(server)] == ["admin", "expert"]


def root_of(server: Server) -> Path:
    return Path(server.config.recording.root)


def audit_events(server: Server, prefix: str = "recording_") -> list[dict[str, Any]]:
    return [e for e in server.app[AUDIT].read(session="or1-live")
            if str(e["event"]).startswith(prefix)]


@pytest.mark.slow  # real media over WebRTC
async def test_expert_starts_and_stops_with_consent_and_everyone_is_told(
        server: Server, http: aiohttp.ClientSession, clients: list[Client],
        peers: list[RTCPeerConnection]) -> None:
    await publish_camera(http, server, peers)
    expert = await join(http, server, clients, Role.EXPERT, "Dr Grey")
    trainee = await join(http, server, clients, Role.TRAINEE)
    assert trainee.welcome["recording"] == {"type": "recording", "state": "off", "since": None}

    consent = {**CONSENT, "note": "patient consented to internal teaching review"}
    reply = await expert.request({"type": "start_recording", "consent": consent})
    assert reply["type"] == "ok", reply
    assert reply["recording"]["state"] == "on"
    on = await trainee.wait_event(recording_event("on"))
    assert isinstance(on["since"], float) and "error" not in on
    # A late joiner learns it from its welcome.
    late = await join(http, server, clients, Role.TRAINEE)
    assert late.welcome["recording"]["state"] == "on"

    await expert.request({"type": "mark", "name": "Port placement"})
    await asyncio.sleep(2)
    reply = await expert.request({"type": "stop_recording"})
    assert reply["type"] == "ok" and reply["recording"]["state"] == "off", reply
    off = await trainee.wait_event(recording_event("off"))
    assert off["since"] >= on["since"]

    [directory] = [p for p in root_of(server).iterdir() if p.is_dir()]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["state"] == "stopped"
    assert manifest["consent"]["scope"] == "internal_review"
    assert manifest["consent"]["note"] == consent["note"]
    assert manifest["consent"]["started_by"]["name"] == "Dr Grey"
    assert manifest["session"]["expert"] == "Dr Grey"
    parts = [p for f in manifest["feeds"] for p in f["parts"]]
    assert parts and all(p["complete"] for p in parts)
    assert (directory / "thumbnail.jpg").stat().st_size > 1000
    events = [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines()]
    marks = [e for e in events if e["type"] == "interaction"
             and e["message"]["type"] == "mark"]
    assert marks and marks[0]["message"]["mark"]["name"] == "Port placement"
    # The mark's Session time is where the recording puts it.
    assert abs(marks[0]["t"] - marks[0]["message"]["t"]) < 0.05

    index = json.loads((root_of(server) / "index.json").read_text())["recordings"]
    assert [e["id"] for e in index] == [directory.name]
    assert index[0]["state"] == "stopped" and index[0]["thumbnail"] is True
    audit = audit_events(server)
    assert [e["event"] for e in audit] == ["recording_started", "recording_stopped"]
    assert audit[0]["scope"] == "internal_review" and audit[0]["by"]["role"] == "expert"
    assert audit[1]["reason"] == "stopped"


async def test_refusals_record_nothing(server: Server, http: aiohttp.ClientSession,
                                       clients: list[Client]) -> None:
    expert = await join(http, server, clients, Role.EXPERT)
    trainee = await join(http, server, clients, Role.TRAINEE)
    recorder = await join(http, server, clients, Role.RECORDER)

    def error(reply: dict[str, Any], status: int, code: str) -> None:
        assert reply["type"] == "error", reply
        assert (reply["error"]["status"], reply["error"]["code"]) == (status, code), reply

    for client in (trainee, recorder):
        error(await client.request({"type": "start_recording", "consent": CONSENT}),
              403, "wrong_role")
        error(await client.request({"type": "stop_recording"}), 403, "wrong_role")
    error(await expert.request({"type": "start_recording"}), 400, "consent_missing")
    for bad in ({**CONSENT, "scope": "forever"}, {**CONSENT, "recorded_at": "yesterday"},
                {**CONSENT, "recorded_by": " "}, {**CONSENT, "extra": 1},
                {k: v for k, v in CONSENT.items() if k != "recorded_by"}):
        error(await expert.request({"type": "start_recording", "consent": bad}),
              400, "bad_consent")
    error(await expert.request({"type": "start_recording",
                                "consent": {**CONSENT, "scope": "live_only"}}),
          409, "consent_scope")
    error(await expert.request({"type": "stop_recording"}), 409, "not_recording")
    assert not [p for p in root_of(server).iterdir() if p.is_dir()]
    assert not audit_events(server)
    denied = [e for e in server.app[AUDIT].read(session="or1-live") if e["event"] == "denied"]
    assert {e["request"] for e in denied} == {"start_recording", "stop_recording"}

    # Twice is a conflict; an admin may stop what the expert started.
    assert (await expert.request({"type": "start_recording", "consent": CONSENT}))["type"] == "ok"
    error(await expert.request({"type": "start_recording", "consent": CONSENT}),
          409, "recording_active")
    admin = await join(http, server, clients, Role.ADMIN)
    assert admin.welcome["recording"]["state"] == "on"
    reply = await admin.request({"type": "stop_recording"})
    assert reply["type"] == "ok", reply
    assert [e["by"]["role"] for e in audit_events(server)] == ["expert", "admin"]


@pytest.mark.slow  # real media over WebRTC
async def test_automatic_recording_and_session_end(http: aiohttp.ClientSession,
                                                   clients: list[Client],
                                                   peers: list[RTCPeerConnection]) -> None:
    server, runner = await start_server(make_config(recording={"auto": True, **AUTO}))
    try:
        await wait_for(lambda: "" if server.app[RECORDINGS].status(server.session())["state"]
                       == "on" else "not recording yet")
        await publish_camera(http, server, peers)
        trainee = await join(http, server, clients, Role.TRAINEE)
        assert trainee.welcome["recording"]["state"] == "on"
        await asyncio.sleep(1)
        async with http.post(f"{server.base_url}/api/sessions/or1-live/end", headers={
                "Authorization": f"Bearer {server.token(Role.EXPERT)}"}) as response:
            assert response.status == 200
        # Session.end() returned: the recording is stopped and listed.
        [entry] = server.app[RECORDINGS].index.values()
        assert entry["state"] == "stopped" and entry["consent_scope"] == "internal_review"
        manifest = json.loads((root_of(server) / entry["id"] / "manifest.json").read_text())
        # The standing consent applies from the Session going live.
        assert manifest["started_t"] == 0.0
        assert all(p["start"] >= 0 for f in manifest["feeds"] for p in f["parts"])
        assert manifest["consent"]["recorded_by"] == "Theatre manager"
        assert manifest["consent"]["auto"] is True
        assert manifest["feeds"][0]["parts"][0]["complete"]
        events = (root_of(server) / entry["id"] / "events.jsonl").read_text()
        assert '"session_ended"' in events
        audit = audit_events(server)
        assert [(e["event"], e.get("reason")) for e in audit] == [
            ("recording_started", None), ("recording_stopped", "session_ended")]
        assert audit[0]["auto"] is True
    finally:
        await runner.cleanup()

    # Only the listed Sessions, and never without a standing consent.
    server, runner = await start_server(make_config(recording={
        "auto_sessions": ["or9-other"], **AUTO}))
    try:
        await asyncio.sleep(0.2)
        assert server.app[RECORDINGS].status(server.session())["state"] == "off"
    finally:
        await runner.cleanup()
    with pytest.raises(ConfigError, match="standing consent"):
        load_config(None, env={}, recording={"auto": True})
    with pytest.raises(ConfigError, match="standing consent"):
        load_config(None, env={}, recording={"auto_sessions": ["x"],
                                             "auto_consent_scope": "live_only",
                                             "auto_consent_by": "x"})


@pytest.mark.slow  # real media over WebRTC
async def test_disk_error_reaches_the_expert_and_the_audit_while_the_session_goes_on(
        http: aiohttp.ClientSession, clients: list[Client],
        peers: list[RTCPeerConnection]) -> None:
    server, runner = await start_server(make_config(recording={"part_max_s": 1.0}))
    try:
        await publish_camera(http, server, peers)
        expert = await join(http, server, clients, Role.EXPERT)
        trainee = await join(http, server, clients, Role.TRAINEE)
        assert (await expert.request({"type": "start_recording",
                                      "consent": CONSENT}))["type"] == "ok"
        await asyncio.sleep(1.2)
        [directory] = [p for p in root_of(server).iterdir() if p.is_dir()]
        moved = directory.with_name("moved")
        directory.rename(moved)
        directory.write_text("not a directory any more")
        failed = await expert.wait_event(recording_event("failed"), timeout=15)
        assert failed["error"]["code"] == "not_writable", failed
        assert "/" not in failed["error"]["message"]  # no filesystem path for people
        assert (await trainee.wait_event(recording_event("failed")))["state"] == "failed"
        audit = audit_events(server, "recording_failed")
        assert audit and audit[0]["code"] == "not_writable" and audit[0]["fatal"] is True

        # The live Session never noticed.
        session = server.session()
        assert session.state == "live" and session.feeds["room.video"].state == "live"
        frames = session.feeds["room.video"].frames_received
        await wait_for(lambda: "" if session.feeds["room.video"].frames_received > frames + 10
                       else "no frames since the failure")
        assert (await trainee.request({"type": "ping"}))["type"] == "pong"
        # The expert can start again once the disk is back.
        directory.unlink()
        shutil.rmtree(moved)
        await wait_for(lambda: "" if not server.app[RECORDINGS]._active_ids() else "stopping")
        reply = await expert.request({"type": "start_recording", "consent": CONSENT})
        assert reply["type"] == "ok" and reply["recording"]["state"] == "on", reply
        assert "error" not in reply["recording"]
    finally:
        await runner.cleanup()
