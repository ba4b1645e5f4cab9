"""De-identified exports through a real server: an admin asks for one, it is
made in the background with its progress, it is pending review and not
shared (409 for another Session's reviewer) until someone allowed signs it off
after watching it in the player; then, and only for a Recording consented for
deidentified_reuse with sharing on, other Sessions' reviewers may list, open
and download it, never the Recording itself. Every step is audited; deleting
the Recording takes its exports along, each file in the audit."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from recorder import deidentified
from recorder.deidentify import DeidentifyOptions
from server.http.common import AUDIT
from server.http.exports import EXPORTS
from server.http.review import RECORDINGS
from server.roles import Role

from .browser_helpers import wait_until
from .conftest import Server, make_config, start_server
from .deidentify_helpers import CONFIG, face_recording
from .recording_helpers import CONSENT

SHARED = {**CONSENT, "scope": "deidentified_reuse"}
OTHER = "or2-other"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None,
               status: int, body: Any = None) -> Any:
    async with http.request(method, url, headers=bearer(token) if token else {},
                            json=body) as response:
        answer = await response.json()
        assert response.status == status, (method, url, answer)
        return answer


@pytest.fixture
async def sharing() -> AsyncIterator[Server]:
    """A server that shares the signed-off exports of deidentified_reuse recordings."""
    server, runner = await start_server(make_config(
        recording={"share_deidentified": True},
        deidentify={**CONFIG, "concurrent": 1, "queue": 1}))
    try:
        yield server
    finally:
        await runner.cleanup()


async def plant(server: Server, **kwargs: Any) -> str:
    recording = await face_recording(server.config.recording.root, **kwargs)
    await asyncio.to_thread(server.app[RECORDINGS].open)
    return recording.id


async def finished(http: aiohttp.ClientSession, server: Server, token: str,
                   export_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the Session's exports until this one is made: (it, every state seen)."""
    seen: list[dict[str, Any]] = []
    url = f"{server.base_url}/api/sessions/or1-live/exports"

    async def done() -> str:
        body = await call(http, "GET", url, token, 200)
        [item] = [e for e in body["exports"] if e["id"] == export_id]
        seen.append(item)
        return "" if item["state"] not in ("queued", "running") else item["state"]

    await wait_until(done, timeout_s=120)
    return seen[-1], seen


def audited(server: Server, prefix: str = "deidentified_") -> list[dict[str, Any]]:
    return [e for e in server.app[AUDIT].read(session="or1-live")
            if e["event"].startswith(prefix)]


@pytest.mark.slow  # two exports of a face
async def test_an_export_is_not_shared_until_signed_off_after_watching_it(
        sharing: Server, http: aiohttp.ClientSession) -> None:
    server = sharing
    base = server.base_url
    rid = await plant(server, consent=SHARED, seconds=3.0,
                      audio=(("narration.audio", (1.0,), 1000.0),))
    admin = server.token(Role.ADMIN, name="Dr Admin", participant_id="admin-1")
    reviewer = server.token(Role.REVIEWER, name="Prof Review")
    foreign = server.token(Role.REVIEWER, OTHER, name="Elsewhere")
    exports = f"{base}/api/recordings/{rid}/exports"

    # Who may ask, and what.
    assert (await call(http, "POST", exports, reviewer, 403, {}))["code"] == "wrong_role"
    assert (await call(http, "POST", exports, server.token(Role.ADMIN, OTHER), 403,
                       {}))["code"] == "wrong_session"
    for bad in ({"feeds": ["endoscope.video"]}, {"colour": True}, {"narration": "yes"},
                {"feeds": []}, [1]):
        assert (await call(http, "POST", exports, admin, 400, bad))["code"] == "bad_export"
    asked = (await call(http, "POST", exports, admin, 202, {"narration": True}))["export"]
    assert asked["state"] in ("queued", "running") and asked["feeds"] == ["room.video"]
    assert asked["options"] == {"conservative": False, "narration": True, "drawings": True}
    eid = asked["id"]
    item, seen = await finished(http, server, admin, eid)
    assert item["state"] == "pending_review", item
    for running in (s for s in seen if s["state"] == "running" and s["progress"]):
        assert 0 <= running["progress"]["fraction"] <= 1
    [file] = item["files"]
    on_disk = Path(server.config.recording.root) / rid / "deidentified" / eid / file["file"]
    assert file["sha256"] == hashlib.sha256(on_disk.read_bytes()).hexdigest()
    assert file["audio"] and file["faces"]["with_faces"] > 0
    assert item["requested"]["by"]["name"] == "Dr Admin" and not item["shared"]

    # Pending review: not shared. Another Session's reviewer gets a clear refusal,
    # the shared list is empty, and the Recording itself is never theirs.
    one = f"{exports}/{eid}"
    body = await call(http, "GET", one, foreign, 409)
    assert body["code"] == "export_not_signed_off"
    assert (await call(http, "GET", f"{base}/api/exports/shared", foreign, 200))["exports"] == []
    assert (await call(http, "GET", f"{base}/api/recordings/{rid}", foreign,
                       403))["code"] == "wrong_session"
    assert (await call(http, "GET", one, server.token(Role.ADMIN, OTHER),
                       403))["code"] == "wrong_session"

    # The Session's reviewer watches it; only admins sign off (the default).
    watched = await call(http, "GET", one, reviewer, 200)
    assert watched["may_review"] is False and watched["events"] == []
    [feed] = watched["recording"]["feeds"]
    url = base + feed["parts"][0]["url"]
    async with http.get(url, headers={"Range": "bytes=0-99"}) as response:
        assert response.status == 206 and response.content_type == "video/mp4"
        assert response.headers["Cache-Control"] == "no-store"
    review = f"{one}/review"
    assert (await call(http, "POST", review, reviewer, 403,
                       {"decision": "sign_off", "playback": watched["playback"]}
                       ))["code"] == "wrong_role"

    # The admin must sign off from a playback that loaded every camera.
    assert (await call(http, "POST", review, admin, 409,
                       {"decision": "sign_off"}))["code"] == "not_reviewed"
    assert (await call(http, "POST", review, admin, 409,  # another token's playback
                       {"decision": "sign_off", "playback": watched["playback"]}
                       ))["code"] == "not_reviewed"
    mine = await call(http, "GET", one, admin, 200)
    assert mine["may_review"] is True
    body = await call(http, "POST", review, admin, 409,
                      {"decision": "sign_off", "playback": mine["playback"]})
    assert body["code"] == "not_reviewed" and "room.video.mp4" in body["message"]
    async with http.get(base + mine["recording"]["feeds"][0]["parts"][0]["url"]) as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).hexdigest() == file["sha256"]
    for bad in ({"decision": "approve"}, {"decision": "reject", "playback": mine["playback"]},
                {"decision": "sign_off", "note": 5}, {"decision": "sign_off", "x": 1}):
        assert (await call(http, "POST", review, admin, 400, bad))["code"] == "bad_review"
    signed = (await call(http, "POST", review, admin, 200,
                         {"decision": "sign_off", "playback": mine["playback"],
                          "note": "faces and monitor checked"}))["export"]
    assert signed["state"] == "signed_off" and signed["shared"] is True
    assert signed["review"]["by"]["name"] == "Dr Admin"
    assert (await call(http, "POST", review, admin, 409,
                       {"decision": "reject", "note": "late"}))["code"] == "export_reviewed"

    # Signed off: shared with other Sessions' reviewers, without names.
    [listed] = (await call(http, "GET", f"{base}/api/exports/shared", foreign, 200))["exports"]
    assert listed["id"] == eid and listed["signed_off"] and listed["procedure"]
    for private in ("requested", "review", "title", "session", "progress"):
        assert private not in listed, private
    theirs = await call(http, "GET", one, foreign, 200)
    assert theirs["may_review"] is False
    assert theirs["recording"]["title"] == "" and theirs["recording"]["expert"] == ""
    async with http.get(base + theirs["recording"]["feeds"][0]["parts"][0]["url"]) as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).hexdigest() == file["sha256"]
    assert (await call(http, "GET", f"{base}/api/recordings/{rid}", foreign,
                       403))["code"] == "wrong_session"

    # Every step in the audit trail.
    steps = [e["event"] for e in audited(server)]
    assert steps[:2] == ["deidentified_requested", "deidentified_finished"]
    assert steps.index("deidentified_signed_off") > steps.index("deidentified_media")
    viewed = [e for e in audited(server) if e["event"] == "deidentified_viewed"]
    assert [e["shared"] for e in viewed] == [False, False, True]
    media = [e for e in audited(server) if e["event"] == "deidentified_media"]
    assert [e["shared"] for e in media] == [False, False, True]
    [signoff] = [e for e in audited(server) if e["event"] == "deidentified_signed_off"]
    assert signoff["playback"] == mine["playback"] and signoff["shared"] is True
    assert signoff["files"] == [{"file": "room.video.mp4", "sha256": file["sha256"]}]

    # An export of a recording consented for internal review only is never shared.
    internal = await plant(server, seconds=1.0)
    made = (await call(http, "POST", f"{base}/api/recordings/{internal}/exports", admin, 202,
                       {"feeds": ["room.video"]}))["export"]
    item, _ = await finished(http, server, admin, made["id"])
    one = f"{base}/api/recordings/{internal}/exports/{made['id']}"
    mine = await call(http, "GET", one, admin, 200)
    async with http.get(base + mine["recording"]["feeds"][0]["parts"][0]["url"]) as response:
        assert response.status == 200
    rejected = (await call(http, "POST", f"{one}/review", admin, 200,
                           {"decision": "reject", "note": "a reflection shows a face"}))
    assert rejected["export"]["state"] == "rejected" and not rejected["export"]["shared"]
    assert (await call(http, "GET", one, foreign, 403))["code"] == "wrong_session"
    shared = (await call(http, "GET", f"{base}/api/exports/shared", foreign, 200))["exports"]
    assert [e["id"] for e in shared] == [eid]


@pytest.mark.slow  # exports of a face
async def test_exports_are_cancelled_and_deleted_with_their_recording(
        sharing: Server, http: aiohttp.ClientSession) -> None:
    server = sharing
    base = server.base_url
    rid = await plant(server, seconds=8.0)
    admin = server.token(Role.ADMIN)
    exports = f"{base}/api/recordings/{rid}/exports"
    # One made at a time, one waiting: a third is refused.
    first = (await call(http, "POST", exports, admin, 202, {}))["export"]
    second = (await call(http, "POST", exports, admin, 202, {"conservative": True}))["export"]
    assert (await call(http, "POST", exports, admin, 409, {}))["code"] == "too_many_exports"
    listed = (await call(http, "GET", f"{base}/api/sessions/or1-live/exports", admin,
                         200))["exports"]
    assert {e["id"]: e["state"] for e in listed}[second["id"]] == "queued"
    # Deleting one being made (or waiting) cancels it; its files go, each listed.
    for item in (second, first):
        deleted = await call(http, "DELETE", f"{exports}/{item['id']}", admin, 200)
        assert deleted["verified"] and "export.json" in {f["file"] for f in deleted["files"]}
    assert not deidentified.directories(Path(server.config.recording.root) / rid)
    cancelled = [e for e in audited(server) if e["event"] == "deidentified_cancelled"]
    assert {e["export"] for e in cancelled} == {first["id"], second["id"]}

    # A made export; a legal hold keeps it; deleting the Recording takes it along.
    short = await plant(server, seconds=1.0)
    made = (await call(http, "POST", f"{base}/api/recordings/{short}/exports", admin, 202,
                       {}))["export"]
    item, _ = await finished(http, server, admin, made["id"])
    assert item["state"] == "pending_review"
    await call(http, "PUT", f"{base}/api/recordings/{short}/hold", admin, 200,
               {"reason": "inquiry"})
    assert (await call(http, "DELETE", f"{base}/api/recordings/{short}/exports/{made['id']}",
                       admin, 409))["code"] == "legal_hold"
    await call(http, "DELETE", f"{base}/api/recordings/{short}/hold", admin, 200)
    assert (await call(http, "DELETE", f"{base}/api/recordings/{short}/exports/{made['id']}",
                       server.token(Role.REVIEWER), 403))["code"] == "wrong_role"
    deleted = await call(http, "DELETE", f"{base}/api/recordings/{short}", admin, 200)
    ours = [f for f in deleted["files"] if f.get("kind") == "deidentified"]
    assert {f["file"] for f in ours} >= {f"deidentified/{made['id']}/room.video.mp4",
                                         f"deidentified/{made['id']}/export.json"}
    assert next(f for f in ours if f["file"].endswith(".mp4"))["sha256"] == \
        item["files"][0]["sha256"]
    assert (await call(http, "GET", f"{base}/api/recordings/{short}/exports/{made['id']}",
                       admin, 404))["code"] == "unknown_recording"

    # An export a stopped process left running is failed when the Node starts.
    again = await plant(server, seconds=1.0)
    directory = Path(server.config.recording.root) / again
    record, claim = deidentified.create(
        directory, DeidentifyOptions(), requested_by={"name": "cli"}, via="cli")
    claim.release()
    await asyncio.to_thread(server.app[EXPORTS].open)
    [lost] = (await call(http, "GET", f"{base}/api/sessions/or1-live/exports", admin,
                         200))["exports"]
    assert lost["id"] == record["id"] and lost["state"] == "failed"
    assert "interrupted" in lost["error"]
    assert audited(server)[-1]["event"] == "deidentified_interrupted"
