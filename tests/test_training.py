"""Training records (issue 15): invites that fit the schedule, attendance from
real peers, certificates of attendance read back from the PDF, and their
public verification. Time moves on an injected clock, never by sleeping."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiortc.mediastreams import VideoStreamTrack

from server import cli
from server.attendance import TRACKERS
from server.http.common import STORE
from server.roles import Role
from server.store import SessionRecord

from .admin_helpers import admin_token, api, schedule
from .conftest import Server, make_config, wait_for, whep_subscribe, whip_publish
from .test_interaction import request
from .test_ws_protocol import WS, connect, join, receive

DAY = 86400.0
HOUR = 3600.0


class Clock:
    """The Node's clock in these tests: it moves when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _start(clock: Clock | None = None, **sections: dict[str, Any]
                 ) -> tuple[Server, aiohttp.web.AppRunner]:
    from server.app import create_app
    from server.http.guard import NodeRunner
    from server.theatre import Theatre

    config = make_config(**sections)
    app = create_app(config, clock=clock)
    runner = NodeRunner(app, shutdown_timeout=2)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, config.server.host, config.server.port).start()
    server = Server(app, config, f"http://127.0.0.1:{config.server.port}")
    server.registry.add_theatre(Theatre("or1", "Theatre 1", ("room", "endoscope", "narration")))
    server.registry.create_session("or1-live", "or1", "Cholecystectomy")
    return server, runner


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def timed(clock: Clock) -> AsyncIterator[Server]:
    """A Node whose clock the test moves."""
    server, runner = await _start(clock, training={"verify_per_minute": 8})
    try:
        yield server
    finally:
        await runner.cleanup()


async def redeem(http: aiohttp.ClientSession, server: Server, token: str, device: str,
                 *, expect: int = 200) -> dict[str, Any]:
    _, body = await api(http, server, "POST", "/api/invites/redeem", token,
                        {"device": device, "name": "Dr Karev"}, expect=expect)
    return dict(body)


# -- 1. invites fit the schedule -----------------------------------------------------

async def test_invites_made_the_day_before_admit_their_people_at_the_start(
        timed: Server, clock: Clock, http: aiohttp.ClientSession, sockets: list[WS]):
    server, admin = timed, admin_token(timed, ttl_s=5 * DAY)
    starts = clock() + DAY - 2 * HOUR  # "tomorrow 08:30", made the evening before
    created = await schedule(http, server, admin, "or1-am", starts_at=starts, duration_min=90,
                             expert="Dr Grey")
    assert created["ends_at"] == starts + 90 * 60
    _, trainee = await api(http, server, "POST", "/api/admin/sessions/or1-am/invites", admin,
                           {"role": "trainee", "max_uses": 2}, expect=201)
    _, expert = await api(http, server, "POST", "/api/admin/sessions/or1-am/invites", admin,
                          {"role": "expert", "name": "Dr Grey"}, expect=201)
    view = trainee["invite"]
    # Valid until the scheduled end plus the margin (120 min), shown relative to the start.
    assert view["expires_at"] == starts + 90 * 60 + 120 * 60
    assert view["expires_after_start_s"] == 210 * 60 and not view["expires_before_start"]
    assert view["seats"] == {"taken": 0, "available": 2}
    # The old default (12 h) would have died at 06:30: refused before it is made.
    status, body = await api(http, server, "POST", "/api/admin/sessions/or1-am/invites",
                             admin, {"role": "trainee", "ttl_s": 12 * HOUR})
    assert status == 409 and body["code"] == "invite_expires_early"
    _, early = await api(http, server, "POST", "/api/admin/sessions/or1-am/invites", admin,
                         {"role": "trainee", "ttl_s": 12 * HOUR, "allow_expiring": True},
                         expect=201)
    assert early["invite"]["expires_before_start"] is True

    clock.advance(DAY - 2 * HOUR)  # the start: 22 h later, nobody slept
    await redeem(http, server, early["token"], "device-early-0001", expect=401)
    personal = await redeem(http, server, trainee["token"], "device-karev-0001")
    # A device token never outlives its invite.
    assert personal["expires_at"] <= view["expires_at"]
    expert_ws = await connect(http, server, sockets)
    expert_token = (await redeem(http, server, expert["token"], "device-grey-00001"))["token"]
    await expert_ws.send_json({"type": "hello", "token": expert_token, "id": "h"})
    assert (await receive(expert_ws))["type"] == "welcome"
    trainee_ws = await connect(http, server, sockets)
    await trainee_ws.send_json({"type": "hello", "token": personal["token"], "id": "h"})
    welcome = await receive(trainee_ws)
    assert welcome["type"] == "welcome" and welcome["session"]["state"] == "live"
    _, listed = await api(http, server, "GET", "/api/admin/sessions/or1-am/invites", admin,
                          expect=200)
    seats = {i["id"]: i["seats"] for i in listed["invites"]}
    assert seats[view["id"]] == {"taken": 1, "available": 1}


async def test_rescheduling_moves_the_validity_of_invites_already_handed_out(
        timed: Server, clock: Clock, http: aiohttp.ClientSession):
    server, admin = timed, admin_token(timed, ttl_s=5 * DAY)
    starts = clock() + DAY
    await schedule(http, server, admin, "or1-pm", starts_at=starts)  # default length: 4 h
    _, invite = await api(http, server, "POST", "/api/admin/sessions/or1-pm/invites", admin,
                          {"role": "trainee"}, expect=201)
    _, reviewer = await api(http, server, "POST", "/api/admin/sessions/or1-pm/invites", admin,
                            {"role": "reviewer"}, expect=201)
    # Reviewers: the review window (14 days) after the scheduled end.
    assert reviewer["invite"]["expires_at"] == starts + 4 * HOUR + 14 * DAY
    # Moved two days later: the same token is valid two days longer.
    await api(http, server, "PATCH", "/api/admin/sessions/or1-pm", admin,
              {"starts_at": starts + 2 * DAY}, expect=200)
    clock.advance(DAY + 7 * HOUR)  # past the first schedule's end and margin
    personal = await redeem(http, server, invite["token"], "device-moved-0001")
    await api(http, server, "GET", "/api/sessions/or1-pm", personal["token"], expect=200)
    # Moved back: refused at once, though the token itself says nothing new.
    await api(http, server, "PATCH", "/api/admin/sessions/or1-pm", admin,
              {"starts_at": starts}, expect=200)
    _, body = await api(http, server, "POST", "/api/invites/redeem", invite["token"],
                        {"device": "device-moved-0002"}, expect=401)
    assert body["code"] == "token_expired"
    # And the device token redeemed in between dies with its invite.
    _, body = await api(http, server, "GET", "/api/sessions/or1-pm", personal["token"],
                        expect=401)
    assert body["code"] == "token_expired"


# -- 2. attendance from real peers ----------------------------------------------------

@pytest.fixture
async def sampled() -> AsyncIterator[Server]:
    server, runner = await _start(training={"attendance_sample_s": 0.2})
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_attendance_from_real_peers_joining_receiving_and_leaving(
        sampled: Server, http: aiohttp.ClientSession, sockets: list[WS], peers: list[Any],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    server = sampled
    expert_ws, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    peers.append(publisher)
    zoe = server.token(Role.TRAINEE, name="Zoë Ngô", participant_id="p-zoe")
    zoe_ws, _ = await join(http, server, sockets, Role.TRAINEE, token=zoe)
    await request(expert_ws, {"type": "mark", "name": "Trocar placement"})
    # Zoë receives the main camera (the room's video) over her own peer connection.
    await wait_for(lambda: "" if "room.video" in server.session().feeds else "no feed yet")
    viewer, _, track = await whep_subscribe(http, server, "room.video", "video", token=zoe)
    peers.append(viewer)
    await asyncio.wait_for((await asyncio.wait_for(track, 10)).recv(), 10)
    # Alex has the page open but receives no video; a relay Node is no person.
    alex_ws, _ = await join(http, server, sockets, Role.TRAINEE, name="Alex",
                            participant_id="p-alex")
    await request(zoe_ws, {"type": "ask", "text": "Why a 10 mm port there?"})
    await request(expert_ws, {"type": "mark", "name": "Dissection"})
    tracker = server.app[TRACKERS]["or1-live"]

    def zoe_watched() -> str:
        rows = {r.participant_id: r for r in tracker.records()}
        seconds = rows["p-zoe"].main_camera_s if "p-zoe" in rows else 0
        return "" if seconds >= 1.0 else f"main camera {seconds:.1f} s"

    await wait_for(zoe_watched, timeout=15)
    await alex_ws.close()
    await wait_for(lambda: "" if all(r.intervals[-1][1] is not None for r in tracker.records()
                                     if r.participant_id == "p-alex") else "alex still in")
    await request(expert_ws, {"type": "mark", "name": "Closure"})

    expert = server.token(Role.EXPERT, name="Dr Grey")
    _, view = await api(http, server, "GET", "/api/sessions/or1-live/attendance", expert,
                        expect=200)
    rows = {r["participant"]: r for r in view["participants"]}
    assert set(rows) >= {"p-zoe", "p-alex"}
    assert all(r["role"] != "relay" for r in rows.values())
    zoe_row, alex_row = rows["p-zoe"], rows["p-alex"]
    assert zoe_row["name"] == "Zoë Ngô" and zoe_row["main_camera_s"] >= 1.0
    assert zoe_row["steps"] == ["Trocar placement", "Dissection", "Closure"]
    assert zoe_row["questions"] == ["Why a 10 mm port there?"]
    # Alex came during the trocars and left before the closure.
    assert alex_row["main_camera_s"] == 0
    assert alex_row["steps"] == ["Trocar placement", "Dissection"]
    assert alex_row["intervals"][0][1] is not None  # left
    assert zoe_row["intervals"][0][1] is None  # still here
    # Trainees do not read it; the CSV says the same.
    await api(http, server, "GET", "/api/sessions/or1-live/attendance", zoe, expect=403)
    async with http.get(f"{server.base_url}/api/sessions/or1-live/attendance?format=csv",
                        headers={"Authorization": f"Bearer {expert}"}) as response:
        assert response.status == 200 and response.content_type == "text/csv"
        table = list(csv.DictReader(io.StringIO(await response.text())))
    by_id = {r["participant"]: r for r in table}
    assert by_id["p-zoe"]["name"] == "Zoë Ngô" and float(by_id["p-zoe"]["main_camera_min"]) > 0
    assert by_id["p-zoe"]["questions"] == "Why a 10 mm port there?"
    # Ending the Session writes it to the store, where any Node reads it.
    await api(http, server, "POST", "/api/admin/sessions/or1-live/end", admin_token(server),
              expect=200)

    async def stored() -> list[Any]:
        return await server.app[STORE].training.list_attendance("or1-live")

    for _ in range(50):
        records = await stored()
        if records and all(i[1] is not None for r in records for i in r.intervals):
            break
        await asyncio.sleep(0.05)
    assert {r.participant_id for r in records} >= {"p-zoe", "p-alex"}
    assert all(i[1] is not None for r in records for i in r.intervals)
    # The CLI prints the same table.
    monkeypatch.setenv("SCRUBIN_SERVER", server.base_url)
    monkeypatch.setenv("SCRUBIN_ADMIN_TOKEN", admin_token(server))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["--log-level", "WARNING", "attendance", "show",
                                              "or1-live"])
    out = capsys.readouterr().out
    assert code == 0 and "Zoë Ngô" in out and "Alex" in out and "Dissection" in out


# -- 3. certificates -----------------------------------------------------------------------

PDFTOTEXT = shutil.which("pdftotext")


@pytest.mark.skipif(PDFTOTEXT is None, reason="pdftotext (poppler-utils) is installed by "
                    ".ci/install --test")
async def test_certificates_confirmed_read_back_and_verified(
        timed: Server, clock: Clock, http: aiohttp.ClientSession, sockets: list[WS],
        tmp_path: Any):
    server, admin = timed, admin_token(timed, ttl_s=5 * DAY)
    store = server.app[STORE]
    await store.sessions.update_session("or1-live", procedure="Laparoscopic cholecystectomy",
                                        expert="Dr Miranda Bailey")
    zoe = server.token(Role.TRAINEE, name="Zoë Ngô-Łukasiewicz", participant_id="p-zoe",
                       ttl_s=DAY)
    alex = server.token(Role.TRAINEE, name="Alex Karev", participant_id="p-alex", ttl_s=DAY)
    expert = server.token(Role.EXPERT, name="Dr Miranda Bailey", ttl_s=DAY)
    await join(http, server, sockets, Role.TRAINEE, token=zoe)
    alex_ws, _ = await join(http, server, sockets, Role.TRAINEE, token=alex)
    clock.advance(20 * 60)
    await alex_ws.close()
    tracker = server.app[TRACKERS]["or1-live"]
    await wait_for(lambda: "" if any(r.intervals[-1][1] for r in tracker.records()
                                     if r.participant_id == "p-alex") else "alex still in")
    clock.advance(40 * 60)
    # Not before the end.
    status, body = await api(http, server, "POST", "/api/sessions/or1-live/certificates",
                             expert, {})
    assert status == 409 and body["code"] == "session_not_ended"
    await api(http, server, "POST", "/api/admin/sessions/or1-live/end", admin, expect=200)
    # Alex was there a third of the hour: below the minimum share (75 %).
    status, body = await api(http, server, "POST", "/api/sessions/or1-live/certificates",
                             expert, {"participants": ["p-alex"]})
    assert status == 409 and body["code"] == "below_minimum_share"
    _, body = await api(http, server, "POST", "/api/sessions/or1-live/certificates", expert,
                        {}, expect=201)
    assert len(body["issued"]) == 1
    cert_id = body["issued"][0]
    assert len(bytes.fromhex(cert_id)) * 8 >= 128
    # Confirming again issues nothing new.
    _, again = await api(http, server, "POST", "/api/sessions/or1-live/certificates", admin,
                         {}, expect=200)
    assert again["issued"] == []

    # Zoë finds hers from her own token, and downloads the PDF; Alex finds none.
    _, mine = await api(http, server, "GET", "/api/sessions/or1-live/certificate", zoe,
                        expect=200)
    assert mine["certificate"]["id"] == cert_id
    _, none = await api(http, server, "GET", "/api/sessions/or1-live/certificate", alex,
                        expect=200)
    assert none == {"certificate": None}
    pdf_path = f"/api/sessions/or1-live/certificates/{cert_id}/pdf"
    await api(http, server, "GET", pdf_path, alex, expect=403)
    async with http.get(f"{server.base_url}{pdf_path}",
                        headers={"Authorization": f"Bearer {zoe}"}) as response:
        assert response.status == 200 and response.content_type == "application/pdf"
        (tmp_path / "c.pdf").write_bytes(await response.read())
    assert PDFTOTEXT is not None
    text = (await asyncio.to_thread(
        subprocess.run, [PDFTOTEXT, "-enc", "UTF-8", str(tmp_path / "c.pdf"), "-"],
        check=True, capture_output=True, text=True)).stdout
    flat = " ".join(text.split())
    record = await store.sessions.get_session("or1-live")
    assert isinstance(record, SessionRecord) and record.started_at is not None
    for expected in ("Certificate of attendance", "Zoë Ngô-Łukasiewicz", "Cholecystectomy",
                     "Procedure: Laparoscopic cholecystectomy", "Expert: Dr Miranda Bailey",
                     "Minutes attended: 60", f"Verification id: {cert_id}",
                     time.strftime("Date: %Y-%m-%d", time.gmtime(record.started_at))):
        assert expected in flat, (expected, flat)

    # Public verification: exactly the certificate's fields for a valid id.
    async with http.get(f"{server.base_url}/api/verify/{cert_id}") as response:
        assert response.status == 200
        verified = await response.json()
    assert verified == {"valid": True, "certificate": {
        "id": cert_id, "name": "Zoë Ngô-Łukasiewicz", "title": "Cholecystectomy",
        "procedure": "Laparoscopic cholecystectomy", "expert": "Dr Miranda Bailey",
        "date": time.strftime("%Y-%m-%d", time.gmtime(record.started_at)), "minutes": 60}}
    # The same PDF from the verification id alone, no token: Zoë keeps her
    # certificate after her token has expired.
    async with http.get(f"{server.base_url}/api/verify/{cert_id}/pdf") as response:
        assert response.status == 200 and response.content_type == "application/pdf"
        (tmp_path / "public.pdf").write_bytes(await response.read())
    public_text = (await asyncio.to_thread(
        subprocess.run, [PDFTOTEXT, "-enc", "UTF-8", str(tmp_path / "public.pdf"), "-"],
        check=True, capture_output=True, text=True)).stdout
    assert " ".join(public_text.split()) == flat
    forged = secrets.token_hex(20)
    async with http.get(f"{server.base_url}/api/verify/{forged}") as response:
        assert response.status == 404 and (await response.json())["code"] == \
            "unknown_certificate"
    await api(http, server, "DELETE", f"/api/sessions/or1-live/certificates/{cert_id}", admin,
              expect=200)
    async with http.get(f"{server.base_url}/api/verify/{cert_id}") as response:
        assert response.status == 410 and (await response.json())["code"] == \
            "certificate_revoked"
    async with http.get(f"{server.base_url}/api/verify/{cert_id}/pdf") as response:
        assert response.status == 410
    await api(http, server, "GET", pdf_path, zoe, expect=410)
    # Rate-limited per address (8 a minute here; 5 used above, the PDFs included).
    statuses = []
    for _ in range(4):
        async with http.get(f"{server.base_url}/api/verify/{forged}") as response:
            statuses.append(response.status)
    assert statuses == [404] * 3 + [429]
    page = await http.get(f"{server.base_url}/verify.html")
    assert page.status == 200 and "verify.js" in await page.text()


async def test_certificate_and_attendance_commands(
        timed: Server, clock: Clock, http: aiohttp.ClientSession, sockets: list[WS],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any):
    server, admin = timed, admin_token(timed, ttl_s=5 * DAY)
    zoe = server.token(Role.TRAINEE, name="Zoë Ngô", participant_id="p-zoe", ttl_s=DAY)
    await join(http, server, sockets, Role.TRAINEE, token=zoe)
    clock.advance(30 * 60)
    await api(http, server, "POST", "/api/admin/sessions/or1-live/end", admin, expect=200)
    monkeypatch.setenv("SCRUBIN_SERVER", server.base_url)
    monkeypatch.setenv("SCRUBIN_ADMIN_TOKEN", admin)

    async def scrubin(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["--log-level", "WARNING", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await scrubin("attendance", "csv", "or1-live")
    assert code == 0 and out.startswith("participant,role,name") and "Zoë Ngô" in out
    code, out, _ = await scrubin("certificate", "confirm", "or1-live", "--json")
    assert code == 0
    cert_id = json.loads(out)["issued"][0]
    code, out, _ = await scrubin("certificate", "list", "or1-live")
    assert code == 0 and cert_id in out and "Zoë Ngô" in out and "30 min" in out
    target = tmp_path / "zoe.pdf"
    code, out, _ = await scrubin("certificate", "pdf", "or1-live", cert_id, "--out",
                                 str(target))
    assert code == 0 and target.read_bytes().startswith(b"%PDF")
    code, out, _ = await scrubin("certificate", "revoke", "or1-live", cert_id)
    assert code == 0 and "revoked" in out
    code, _, err = await scrubin("certificate", "pdf", "or1-live", cert_id, "--out",
                                 str(target))
    assert code == 2 and "410" in err


async def test_a_relay_participant_never_counts(sampled: Server, http: aiohttp.ClientSession,
                                                sockets: list[WS]):
    tracker = sampled.app[TRACKERS]["or1-live"]
    tracker.on_event({"type": "participant_joined",
                      "participant": {"id": "node:edge-1", "role": "relay", "name": "edge"}})
    ws, _ = await join(http, sampled, sockets, Role.TRAINEE, name="Meredith",
                       participant_id="p-mer")
    await wait_for(lambda: "" if [r.participant_id for r in tracker.records()] == ["p-mer"]
                   else str(tracker.records()))
    await ws.close()
    await wait_for(lambda: "" if tracker.records()[0].intervals[-1][1] is not None
                   else "still in")


@pytest.mark.slow
@pytest.mark.browser
async def test_the_verification_page_offers_the_pdf_without_a_token(
        timed: Server, http: aiohttp.ClientSession, browser: Any) -> None:
    """The link printed on a certificate opens the public page; it shows the
    fields and a download of the same certificate, no token needed."""
    from server.store import CertificateRecord

    from .browser_helpers import open_page

    cert_id = secrets.token_hex(20)
    await timed.app[STORE].training.put_certificate(CertificateRecord(
        id=cert_id, session_id="or1-live", participant_id="p-zoe", name="Zoë Ngô",
        title="Cholecystectomy", procedure="Laparoscopic cholecystectomy",
        expert="Dr Miranda Bailey", date="2026-12-05", minutes=42, issued_at=time.time()))
    context, page, _ = await open_page(browser, f"{timed.base_url}/verify.html#id={cert_id}",
                                       "verify")
    try:
        link = page.locator("#verify-pdf")
        await link.wait_for(state="visible")
        assert "Zoë Ngô" in await page.locator("#verify-fields").inner_text()
        assert await link.get_attribute("href") == f"/api/verify/{cert_id}/pdf"
        async with page.expect_download() as waiting:
            await link.click()
        download = await waiting.value
        path = await download.path()
        assert path is not None
        assert (await asyncio.to_thread(path.read_bytes))[:5] == b"%PDF-"
        assert download.suggested_filename == "certificate-or1-live.pdf"
    finally:
        await context.close()
