"""The review API: library, one Recording, media by signed URL with HTTP Range,
who may see what, files never reached outside a recording, deletion and
retention."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from server.cli import main as scrubin
from server.http.common import AUDIT
from server.http.review import RECORDINGS
from server.recordings import Recordings
from server.roles import Role
from server.tokens import NODE_WIDE, Grant

from .conftest import Server, make_config, start_server, wait_for
from .recording_helpers import CONSENT, PART, age_recording, build_recording, circle, mark
from .test_recording_control import Client, join, publish_camera


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(http: aiohttp.ClientSession, url: str, token: str | None,
                   status: int = 200) -> Any:
    async with http.get(url, headers=bearer(token) if token else {}) as response:
        body = await response.json()
        assert response.status == status, (url, body)
        return body


def manager(server: Server) -> Recordings:
    return server.app[RECORDINGS]


async def plant(server: Server, session_id: str = "or1-live", **kwargs: Any) -> str:
    """A real stopped Recording in the server's root, listed."""
    recording = await build_recording(server.config.recording.root, session_id, **kwargs)
    manager(server).open()
    return recording.id


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.ws.close()


@pytest.mark.slow  # real media over WebRTC
async def test_record_then_library_then_recording_then_range_requests(
        server: Server, http: aiohttp.ClientSession, clients: list[Client],
        peers: list[RTCPeerConnection]) -> None:
    await publish_camera(http, server, peers)
    expert = await join(http, server, clients, Role.EXPERT, "Dr Grey")
    assert (await expert.request({"type": "start_recording", "consent": CONSENT}))["type"] == "ok"
    await expert.request({"type": "mark", "name": "Port placement"})
    await expert.request({"type": "mark", "name": "Look here", "kind": "bookmark"})
    await asyncio.sleep(2)
    assert (await expert.request({"type": "stop_recording"}))["type"] == "ok"

    reviewer = server.token(Role.REVIEWER, name="Prof Review")
    library = await get_json(http, f"{server.base_url}/api/sessions/or1-live/recordings",
                             reviewer)
    [entry] = library["recordings"]
    assert entry["title"] == "Cholecystectomy" and entry["expert"] == "Dr Grey"
    assert entry["state"] == "stopped" and 1.5 < entry["duration"] < 4
    assert entry["consent_scope"] == "internal_review"
    assert library["expires_at"] > time.time() + 60
    async with http.get(server.base_url + entry["thumbnail"]) as response:
        assert response.status == 200 and response.content_type == "image/jpeg"
        assert (await response.read())[:2] == b"\xff\xd8"

    detail = await get_json(http, f"{server.base_url}/api/recordings/{entry['id']}", reviewer)
    recording = detail["recording"]
    assert recording["consent"]["recorded_by"] == CONSENT["recorded_by"]
    [feed] = [f for f in recording["feeds"] if f["id"] == "room.video"]
    part = feed["parts"][0]
    assert part["start"] >= 0 and part["frames"] > 10
    kinds = [(e["type"], e.get("mark", {}).get("kind")) for e in detail["events"]
             if e["type"] == "mark"]
    assert kinds == [("mark", "step"), ("mark", "bookmark")]
    assert all(a["t"] <= b["t"] for a, b in itertools.pairwise(detail["events"]))
    path = Path(server.config.recording.root) / entry["id"] / part["file"]
    data = path.read_bytes()
    manifest = json.loads(path.with_name("manifest.json").read_text())
    listed = next(p for f in manifest["feeds"] for p in f["parts"] if p["file"] == part["file"])
    url = server.base_url + part["url"]

    async with http.get(url) as response:
        assert response.status == 200 and response.content_type == "video/webm"
        body = await response.read()
        assert hashlib.sha256(body).hexdigest() == listed["sha256"]
        assert response.headers["Accept-Ranges"] == "bytes"
    async with http.get(url, headers={"Range": "bytes=0-99"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 0-99/{len(data)}"
        assert await response.read() == data[:100]
    middle = len(data) // 2
    async with http.get(url, headers={"Range": f"bytes={middle}-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {middle}-{len(data) - 1}/{len(data)}"
        assert await response.read() == data[middle:]
    async with http.get(url, headers={"Range": f"bytes={len(data) + 10}-"}) as response:
        assert response.status == 416
    viewed = [e for e in server.app[AUDIT].read(session="or1-live")
              if e["event"] == "recording_viewed"]
    assert viewed and viewed[0]["name"] == "Prof Review"


async def test_who_may_see_a_recording(server: Server, http: aiohttp.ClientSession) -> None:
    mine = await plant(server, thumbnail=False)
    other = await plant(server, "or2-other", thumbnail=False)
    base = server.base_url
    for role in (Role.REVIEWER, Role.ADMIN):
        library = await get_json(http, f"{base}/api/sessions/or1-live/recordings",
                                 server.token(role))
        assert [e["id"] for e in library["recordings"]] == [mine]
        assert library["recordings"][0]["thumbnail"] is None
        await get_json(http, f"{base}/api/recordings/{mine}", server.token(role))
    node_admin = server.token(Role.ADMIN, NODE_WIDE)
    await get_json(http, f"{base}/api/recordings/{other}", node_admin)
    library = await get_json(http, f"{base}/api/sessions/or2-other/recordings", node_admin)
    assert [e["id"] for e in library["recordings"]] == [other]

    cases = [(None, 401, "token_missing"), ("not-a-token", 401, "token_invalid")]
    cases += [(server.token(role), 403, "wrong_role")
              for role in (Role.TRAINEE, Role.EXPERT, Role.RECORDER)]
    for token, status, code in cases:
        for url in (f"{base}/api/recordings/{mine}", f"{base}/api/sessions/or1-live/recordings"):
            body = await get_json(http, url, token, status)
            assert body["code"] == code, (url, body)
    # Another Session's reviewer, and unknown ids.
    body = await get_json(http, f"{base}/api/recordings/{other}", server.token(Role.REVIEWER),
                          403)
    assert body["code"] == "wrong_session"
    body = await get_json(http, f"{base}/api/sessions/or2-other/recordings",
                          server.token(Role.REVIEWER), 403)
    assert body["code"] == "wrong_session"
    for unknown in ("x" * 24, "..", "%2e%2e", mine[:-1] + "Z", "a" * 80):
        body = await get_json(http, f"{base}/api/recordings/{unknown}",
                              server.token(Role.REVIEWER), 404)
        assert body["code"] in ("unknown_recording", "not_found"), body


async def test_a_recording_is_never_shared_beyond_its_session(
        http: aiohttp.ClientSession) -> None:
    """Whatever its consent: with share_deidentified, what other Sessions'
    reviewers get is its signed-off de-identified exports
    (tests/test_deidentified_api.py), never its parts, events and names."""
    server, runner = await start_server(make_config(recording={"share_deidentified": True}))
    try:
        internal = await plant(server, "or2-other", thumbnail=False)
        reusable = await plant(server, "or2-other", thumbnail=False,
                               consent={**CONSENT, "scope": "deidentified_reuse"})
        reviewer = server.token(Role.REVIEWER)  # of or1-live
        for recording in (internal, reusable):
            body = await get_json(http, f"{server.base_url}/api/recordings/{recording}",
                                  reviewer, 403)
            assert body["code"] == "wrong_session"
        # Admins of another Session get no more than its own.
        body = await get_json(http, f"{server.base_url}/api/recordings/{reusable}",
                              server.token(Role.ADMIN), 403)
        assert body["code"] == "wrong_session"
        await get_json(http, f"{server.base_url}/api/recordings/{reusable}",
                       server.token(Role.REVIEWER, "or2-other"))
    finally:
        await runner.cleanup()


def viewer(server: Server, role: Role = Role.REVIEWER, **kwargs: Any) -> tuple[str, Grant]:
    token = server.token(role, **kwargs)
    return token, server.tokens.verify(token)


async def test_media_urls_never_leave_the_recording(server: Server,
                                                    http: aiohttp.ClientSession) -> None:
    recording_id = await plant(server)
    root = Path(server.config.recording.root)
    directory = root / recording_id
    signer = manager(server).signer
    _, reviewer = viewer(server)
    play = signer.playback(recording_id, reviewer)
    expires = int(time.time()) + 200
    secret = root.parent / f"secret-{recording_id}.txt"
    secret.write_text("outside the recordings")
    (root / "outside.webm").write_text("in the root, not in the recording")

    def signed(name: str, raw: str | None = None) -> str:
        """A correctly signed URL for ``name`` (so only the path checks refuse it)."""
        url = signer.url(recording_id, name, expires, reviewer, play)
        if raw is not None:
            url = f"/api/recordings/{recording_id}/media/{raw}?{url.partition('?')[2]}"
        return server.base_url + url

    async with http.get(signed(PART)) as response:
        assert response.status == 200
    hostile = ["..", "../manifest.json", "../../etc/passwd", "/etc/passwd", str(secret),
               "manifest.json", "events.jsonl", "thumbnail.jpg", ".manifest.json.tmp",
               f"../{recording_id}/{PART}", "../outside.webm", "room.video-000.webm/",
               "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "room.video-000.webm\x00.txt"]
    for name in hostile:
        async with http.get(signed(name)) as response:
            text = await response.text()
            assert response.status in (400, 404), (name, response.status, text)
            assert "outside" not in text and "root:" not in text, name
    # Raw path forms the router sees (dot segments, encoded dots and slashes).
    for raw in ("..", "%2e%2e", "%2E%2E%2Fmanifest.json", "..%2F..%2Fsecret",
                "%2Fetc%2Fpasswd", "x/../../manifest.json"):
        async with http.get(signed(raw, raw)) as response:
            assert response.status in (400, 401, 404), (raw, response.status)
            assert "root:" not in await response.text()

    # A symlink planted in the recording, listed by a tampered manifest.
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (directory / "room.video-001.webm").symlink_to(secret)
    manifest["feeds"][0]["parts"].append({**manifest["feeds"][0]["parts"][0], "index": 1,
                                          "file": "room.video-001.webm"})
    manifest_path.write_text(json.dumps(manifest))
    async with http.get(signed("room.video-001.webm")) as response:
        assert response.status == 404
        assert "outside" not in await response.text()
    # A real part replaced by a symlink, even to a file inside the root.
    os.replace(directory / PART, root / "moved.webm")
    (directory / PART).symlink_to(root / "moved.webm")
    async with http.get(signed(PART)) as response:
        assert response.status == 404
    # The recording directory itself a symlink.
    (directory / PART).unlink()
    os.replace(root / "moved.webm", directory / PART)
    os.replace(directory, root / "elsewhere")
    directory.symlink_to(root / "elsewhere")
    async with http.get(signed(PART)) as response:
        assert response.status == 404
    body = await get_json(http, f"{server.base_url}/api/recordings/{recording_id}",
                          server.token(Role.REVIEWER), 404)
    assert body["code"] == "unknown_recording"


@pytest.fixture
async def lenient() -> AsyncIterator[Server]:
    """A server that lets one address fail authentication many times."""
    srv, runner = await start_server(make_config(limits={"auth_failures_per_minute": 1000}))
    try:
        yield srv
    finally:
        await runner.cleanup()


async def test_media_signatures(lenient: Server, http: aiohttp.ClientSession) -> None:
    server = lenient
    recording_id = await plant(server)
    signer = manager(server).signer
    _, reviewer = viewer(server)
    _, other_viewer = viewer(server)
    play = signer.playback(recording_id, reviewer)
    now = int(time.time())

    async def status(url: str) -> tuple[int, str]:
        async with http.get(server.base_url + url) as response:
            if response.content_type == "application/json":
                return response.status, (await response.json())["code"]
            return response.status, ""

    def parts(url: str) -> tuple[str, dict[str, str]]:
        path, _, query = url.partition("?")
        return path, dict(item.split("=", 1) for item in query.split("&"))

    def rebuilt(path: str, query: dict[str, str]) -> str:
        return path + "?" + "&".join(f"{k}={v}" for k, v in query.items())

    good = signer.url(recording_id, PART, now + 60, reviewer, play)
    path, query = parts(good)
    assert await status(good) == (200, "")
    thumb = signer.url(recording_id, "thumbnail", now + 60, reviewer, play)
    assert await status(thumb) == (200, "")
    assert await status(path) == (401, "token_missing")
    for key in ("exp", "sig", "play", "g"):
        assert await status(rebuilt(path, {k: v for k, v in query.items() if k != key})) == (
            401, "token_missing"), key
    # Anything altered: the expiry, the playback, the grant (another viewer's).
    _, theirs = parts(signer.url(recording_id, PART, now + 60, other_viewer, play))
    for key, value in (("exp", str(now + 61)), ("play", "x" + query["play"]),
                       ("g", theirs["g"]), ("sig", query["sig"][::-1])):
        assert await status(rebuilt(path, {**query, key: value})) == (401, "token_invalid"), key
    # Strict ASCII parsing (finding 6: "²" passed str.isdigit, then int() failed: 500).
    for exp in ("abc", "%C2%B2", "%D9%A3", "1e9", "-5", " 5", "9" * 13, "", "%00"):
        got = await status(rebuilt(path, {**query, "exp": exp}))
        assert got[0] == 401 and got[1] in ("token_invalid", "token_missing"), (exp, got)
    for bad in ({"sig": "%C2%B2" * 6}, {"play": "%C2%B2.x"}, {"g": "%FF" * 4},
                {"sig": "A" * 500}, {"g": "A" * 5000}):
        assert await status(rebuilt(path, {**query, **bad})) == (401, "token_invalid"), bad
    # A thumbnail's signature does not open a part, nor another recording's.
    _, thumb_query = parts(thumb)
    assert await status(rebuilt(path, thumb_query)) == (401, "token_invalid")
    other = await plant(server)
    assert await status(rebuilt(f"/api/recordings/{other}/media/{PART}", query)) == (
        401, "token_invalid")
    assert await status(signer.url(recording_id, PART, now - 5, reviewer, play)) == (
        401, "token_expired")


async def test_media_urls_are_bound_to_the_viewers_grant_and_audited_per_playback(
        server: Server, http: aiohttp.ClientSession) -> None:
    """Finding 5: signed media URLs worked for anyone, survived revocation, were
    not audited and were cached for an hour."""
    from .admin_helpers import admin_token, api

    recording_id = await plant(server)
    _, created = await api(http, server, "POST", "/api/admin/sessions/or1-live/invites",
                           admin_token(server), {"role": "reviewer", "name": "Prof R"},
                           expect=201)
    token = created["token"]
    url = f"{server.base_url}/api/recordings/{recording_id}"
    detail = await get_json(http, url, token)
    playback = detail["playback"]
    assert time.time() < detail["expires_at"] <= time.time() + 300
    part_url = server.base_url + detail["recording"]["feeds"][0]["parts"][0]["url"]
    async with http.get(part_url) as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    for start in range(0, 500, 100):  # a media element's Range requests
        async with http.get(part_url, headers={"Range": f"bytes={start}-{start + 99}"}) as r:
            assert r.status == 206 and r.headers["Cache-Control"] == "no-store"

    def entries(event: str) -> list[dict[str, Any]]:
        return [e for e in server.app[AUDIT].read(session="or1-live") if e["event"] == event]

    [media] = entries("recording_media")
    assert (media["recording"], media["part"], media["playback"]) == (recording_id, PART,
                                                                      playback)
    assert media["role"] == "reviewer" and media["address"] == "127.0.0.1"
    # The player renews its URLs within the same playback: no new entries.
    renewed = await get_json(http, f"{url}?playback={playback}", token)
    assert renewed["playback"] == playback
    new_url = server.base_url + renewed["recording"]["feeds"][0]["parts"][0]["url"]
    async with http.get(new_url) as response:
        assert response.status == 200
    assert len(entries("recording_media")) == 1 and len(entries("recording_viewed")) == 1
    # Another token cannot continue this playback: it gets its own.
    other = await get_json(http, f"{url}?playback={playback}", server.token(Role.REVIEWER))
    assert other["playback"] != playback and len(entries("recording_viewed")) == 2

    # Revoked: the URLs handed out a moment ago stop, Range requests included.
    await api(http, server, "DELETE",
              f"/api/admin/sessions/or1-live/invites/{created['invite']['id']}",
              admin_token(server), expect=200)
    for target, headers in ((part_url, {}), (new_url, {"Range": "bytes=0-99"})):
        async with http.get(target, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["code"] == "token_revoked"
    await get_json(http, url, token, 401)
    # The URLs never outlive the grant they were issued to.
    short, _ = viewer(server, ttl_s=100)
    assert (await get_json(http, url, short))["expires_at"] <= time.time() + 100


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deleted_audit(server: Server) -> list[dict[str, Any]]:
    return [e for e in server.app[AUDIT].read(session="or1-live")
            if e["event"] == "recording_deleted"]


async def test_delete_is_audited_with_every_file_and_its_checksum(
        server: Server, http: aiohttp.ClientSession, clients: list[Client],
        capsys: pytest.CaptureFixture[str]) -> None:
    first = await plant(server, feeds=(("room.video", 0), ("endoscope.video", 500)))
    second = await plant(server)
    root = Path(server.config.recording.root)
    # What is on disk before: every file and its checksum, computed here.
    expected = {p.name: (p.stat().st_size, sha256_of(p)) for p in (root / first).iterdir()}
    manifest = json.loads((root / first / "manifest.json").read_text())
    parts = {p["file"]: p["sha256"] for f in manifest["feeds"] for p in f["parts"]}
    assert len(parts) == 2 and set(parts) < set(expected)
    url = f"{server.base_url}/api/recordings/{first}"
    for role in (Role.REVIEWER, Role.EXPERT):
        async with http.delete(url, headers=bearer(server.token(role))) as response:
            assert response.status == 403
    async with http.delete(url, headers=bearer(server.token(Role.ADMIN, "or2-other"))) as r:
        assert r.status == 403 and (await r.json())["code"] == "wrong_session"
    async with http.delete(url, headers=bearer(server.token(Role.ADMIN, name="Ms Admin"))
                           ) as response:
        assert response.status == 200
        body = await response.json()
    assert body["deleted"] == first and body["verified"] is True
    assert {f["file"]: (f["bytes"], f["sha256"]) for f in body["files"]} == expected
    kinds = {f["file"]: f["kind"] for f in body["files"]}
    assert kinds["manifest.json"] == "manifest" and kinds["events.jsonl"] == "events"
    assert kinds["thumbnail.jpg"] == "thumbnail"
    assert {name for name, kind in kinds.items() if kind == "part"} == set(parts)
    assert all(f["matches_manifest"] for f in body["files"] if f["kind"] == "part")
    assert not (root / first).exists()
    index = json.loads((root / "index.json").read_text())["recordings"]
    assert [e["id"] for e in index] == [second]
    await get_json(http, url, server.token(Role.ADMIN), 404)
    async with http.delete(url, headers=bearer(server.token(Role.ADMIN))) as response:
        assert response.status == 404
    # The audit trail says what was deleted, by whom: the same files and checksums.
    [audited] = deleted_audit(server)
    assert (audited["recording"], audited["reason"], audited["by"]["name"]) == (
        first, "deleted", "Ms Admin")
    assert audited["files"] == body["files"] and audited["verified"] is True
    assert audited["title"] == "Cholecystectomy"

    # scrubin recording list / hold / delete / release, with a node-wide admin token.
    admin = server.token(Role.ADMIN, NODE_WIDE)
    cli = ["--server", server.base_url, "--token", admin]
    capsys.readouterr()
    assert await asyncio.to_thread(scrubin, ["recording", "list", "--session", "or1-live",
                                             *cli]) == 0
    listing = capsys.readouterr().out
    assert second in listing and first not in listing and "Cholecystectomy" in listing
    assert "HOLD" not in listing
    assert await asyncio.to_thread(scrubin, ["recording", "hold", second, "--reason",
                                             "claim 2026-114", *cli]) == 0
    assert "on legal hold" in capsys.readouterr().out
    assert (root / second / "hold.json").is_file()
    assert await asyncio.to_thread(scrubin, ["recording", "list", "--session", "or1-live",
                                             *cli]) == 0
    assert "HOLD" in capsys.readouterr().out
    # Held: the deletion is refused, nothing removed, nothing audited as deleted.
    assert await asyncio.to_thread(scrubin, ["recording", "delete", second, *cli]) == 2
    assert "on legal hold" in capsys.readouterr().err
    assert (root / second / "manifest.json").is_file() and len(deleted_audit(server)) == 1
    assert await asyncio.to_thread(scrubin, ["recording", "release", second, *cli]) == 0
    assert not (root / second / "hold.json").exists()
    on_disk = {p.name: sha256_of(p) for p in (root / second).iterdir()}
    capsys.readouterr()
    assert await asyncio.to_thread(scrubin, ["recording", "delete", second, *cli]) == 0
    printed = capsys.readouterr().out
    assert all(f"{digest}" in printed for digest in on_disk.values()), printed
    assert "files, checked" in printed
    assert not (root / second).exists() and not manager(server).index
    assert await asyncio.to_thread(scrubin, ["recording", "delete", second, *cli]) == 2
    events = [e["event"] for e in server.app[AUDIT].read(session="or1-live")
              if e["event"].startswith(("legal_hold", "recording_deleted"))]
    assert events == ["recording_deleted", "legal_hold_set", "legal_hold_released",
                      "recording_deleted"]

    # A running recording is not deleted under its writer.
    expert = await join(http, server, clients, Role.EXPERT)
    assert (await expert.request({"type": "start_recording", "consent": CONSENT}))["type"] == "ok"
    [running] = manager(server).index
    async with http.delete(f"{server.base_url}/api/recordings/{running}",
                           headers=bearer(admin)) as response:
        assert response.status == 409 and (await response.json())["code"] == "recording_active"
    assert (root / running).is_dir()


async def test_legal_hold_api(server: Server, http: aiohttp.ClientSession) -> None:
    recording_id = await plant(server, thumbnail=False)
    url = f"{server.base_url}/api/recordings/{recording_id}/hold"
    admin = server.token(Role.ADMIN, name="Ms Admin")
    for role in (Role.REVIEWER, Role.EXPERT, Role.TRAINEE):
        async with http.put(url, json={"reason": "x"},
                            headers=bearer(server.token(role))) as response:
            assert response.status == 403, role
    async with http.put(url, json={"reason": "x"},
                        headers=bearer(server.token(Role.ADMIN, "or2-other"))) as response:
        assert response.status == 403 and (await response.json())["code"] == "wrong_session"
    for body in ({}, {"reason": "  "}, {"reason": 5}, {"reason": "x" * 501}):
        async with http.put(url, json=body, headers=bearer(admin)) as response:
            assert response.status == 400 and (await response.json())["code"] == "bad_hold"
    async with http.delete(url, headers=bearer(admin)) as response:
        assert response.status == 409 and (await response.json())["code"] == "not_on_hold"
    async with http.put(url, json={"reason": "Inquiry\u202e 12"}, headers=bearer(admin)) as r:
        assert r.status == 200
        hold = (await r.json())["hold"]
    assert hold["reason"] == "Inquiry 12" and hold["by"]["name"] == "Ms Admin"
    # The library shows it; a reviewer sees it too.
    library = await get_json(http, f"{server.base_url}/api/sessions/or1-live/recordings",
                             server.token(Role.REVIEWER))
    assert library["recordings"][0]["hold"]["reason"] == "Inquiry 12"
    async with http.delete(f"{server.base_url}/api/recordings/{recording_id}",
                           headers=bearer(admin)) as response:
        assert response.status == 409 and (await response.json())["code"] == "legal_hold"
    # The hold survives a restart of the index (it is on disk, beside the manifest).
    manager(server).open()
    assert manager(server).index[recording_id]["hold"]["reason"] == "Inquiry 12"
    async with http.delete(url, headers=bearer(admin)) as response:
        assert response.status == 200 and (await response.json())["hold"] is None
    assert manager(server).index[recording_id]["hold"] is None
    audit = [(e["event"], e["by"]["name"], e.get("reason")) for e in
             server.app[AUDIT].read(session="or1-live") if e["event"].startswith("legal_hold")]
    assert audit == [("legal_hold_set", "Ms Admin", "Inquiry 12"),
                     ("legal_hold_released", "Ms Admin", None)]


async def test_retention_deletes_old_recordings(http: aiohttp.ClientSession,
                                                tmp_path: Path) -> None:
    config = make_config(recording={"root": str(tmp_path), "retention_days": 30,
                                    "retention_check_s": 0.2})
    old = await build_recording(tmp_path, events=[mark(1.5, "Port placement"), circle(2.0)])
    age_recording(old.directory, days=40)
    held = await build_recording(tmp_path)
    age_recording(held.directory, days=400)
    (held.directory / "hold.json").write_text(json.dumps({"reason": "litigation"}))
    old_files = {p.name: sha256_of(p) for p in old.directory.iterdir()}
    new = await build_recording(tmp_path)
    server, runner = await start_server(config)
    try:
        # The directory goes first (in a thread), then the index entry.
        await wait_for(lambda: "" if not old.directory.exists()
                       and old.id not in manager(server).index else "not deleted yet",
                       timeout=5)
        assert new.directory.is_dir() and held.directory.is_dir()
        assert set(manager(server).index) == {new.id, held.id}
        entries = json.loads((tmp_path / "index.json").read_text())["recordings"]
        assert {e["id"] for e in entries} == {new.id, held.id}
        deleted = deleted_audit(server)
        assert [(e["recording"], e["reason"], e["by"]) for e in deleted] == [
            (old.id, "retention", None)]
        assert {f["file"]: f["sha256"] for f in deleted[0]["files"]} == old_files
        # Later passes keep the new one, and the one on legal hold.
        await asyncio.sleep(0.5)
        assert new.directory.is_dir() and held.directory.is_dir()
        assert len(deleted_audit(server)) == 1
    finally:
        await runner.cleanup()
