"""The grant model (docs/security.md) against a real server: every bearer
capability comes from a grant and dies with it. Each test replays one finding
of the outside test (issue 9) and checks that the attack now fails, with the
status the finding's "done" names."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server.config import SessionConfig, TheatreConfig
from server.errors import Conflict, Forbidden, Gone
from server.http.common import AUDIT, STORE
from server.interaction import Interaction, Limits
from server.roles import MAY_DERIVE, Role
from server.tokens import NODE_WIDE, Grant, TokenAuthority

from .admin_helpers import admin_token, api, schedule
from .conftest import (
    Server,
    client_pc,
    make_config,
    offer_sdp,
    start_server,
    wait_for,
    whip_publish,
)
from .test_ws_protocol import closed_with, connect, receive, receive_until

WS = aiohttp.ClientWebSocketResponse
DEVICES = ["device-a" * 3, "device-b" * 3, "device-c" * 3, "device-d" * 3]


# -- helpers ------------------------------------------------------------------------------

async def invite(http: aiohttp.ClientSession, server: Server, session: str = "or1-live",
                 **fields: Any) -> dict[str, Any]:
    fields.setdefault("role", "trainee")
    _, body = await api(http, server, "POST", f"/api/admin/sessions/{session}/invites",
                        admin_token(server), fields, expect=201)
    return dict(body)


async def redeem(http: aiohttp.ClientSession, server: Server, token: str, device: str,
                 *, expect: int = 200) -> dict[str, Any]:
    _, body = await api(http, server, "POST", "/api/invites/redeem", token,
                        {"device": device, "name": "Someone"}, expect=expect)
    return dict(body)


async def hello(http: aiohttp.ClientSession, server: Server, token: str,
                sockets: list[WS]) -> WS:
    ws = await connect(http, server, sockets)
    await ws.send_json({"type": "hello", "token": token, "id": "h"})
    return ws


async def welcomed(http: aiohttp.ClientSession, server: Server, token: str,
                   sockets: list[WS]) -> WS:
    ws = await hello(http, server, token, sockets)
    assert (await receive(ws))["type"] == "welcome"
    return ws


async def refused_hello(http: aiohttp.ClientSession, server: Server, token: str,
                        sockets: list[WS]) -> tuple[int | None, str]:
    code, messages = await closed_with(await hello(http, server, token, sockets))
    return code, messages[0]["error"]["code"]


async def whep(http: aiohttp.ClientSession, server: Server, token: str,
               peers: list[RTCPeerConnection], feed: str = "room.video",
               kind: str = "video") -> tuple[int, str]:
    """Ask for a WHEP Subscription with a real offer: (status, error code or "")."""
    pc = client_pc()
    peers.append(pc)
    pc.addTransceiver(kind, direction="recvonly")
    sdp = await offer_sdp(pc)
    async with http.post(f"{server.base_url}/whep/or1-live/{feed}", data=sdp,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        if response.status == 201:
            return 201, ""
        return response.status, (await response.json())["code"]


async def camera(http: aiohttp.ClientSession, server: Server, peers: list[RTCPeerConnection],
                 *, audio: bool = False) -> None:
    tracks: list[Any] = [VideoStreamTrack()]
    if audio:
        tracks.append(AudioStreamTrack())
    pc, _ = await whip_publish(http, server, "room", tracks)
    peers.append(pc)
    session = server.session()
    wanted = ["room.video", "room.audio"] if audio else ["room.video"]
    await wait_for(lambda: "" if all(f in session.feeds for f in wanted) else "no feeds yet")


def grant_of(server: Server, token: str) -> Grant:
    return server.tokens.verify(token)


def token_in(link: str) -> str:
    return link.split("#token=", 1)[1]


# -- finding 1: links mint only what the table allows, and die with their parent ---------

async def test_an_invited_experts_links_obey_the_model_and_die_with_the_invite(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS],
        peers: list[RTCPeerConnection]) -> None:
    await camera(http, server, peers)
    expert_invite = await invite(http, server, role="expert", name="Dr Invited", ttl_s=600)
    invite_id = expert_invite["invite"]["id"]
    device = await redeem(http, server, expert_invite["token"], DEVICES[0])
    parent = grant_of(server, device["token"])
    assert parent.kind == "device" and parent.parents == (invite_id,)
    assert parent.expires_at <= expert_invite["invite"]["expires_at"]

    _, links = await api(http, server, "GET", "/api/sessions/or1-live/links", device["token"],
                         expect=200)
    # An expert may not mint reviewers (recordings) or admins.
    assert links["reviewer_page"] is None
    minted = [token_in(links["expert_page"]), token_in(links["trainee_page"]),
              *(e["bearer_token"] for e in links["whip"]),
              *(e["bearer_token"] for e in links["whep"])]
    assert len(minted) == 2 + 3 + 1
    for token in minted:
        grant = grant_of(server, token)
        assert grant.kind == "derived" and grant.role in MAY_DERIVE[Role.EXPERT]
        assert grant.parents == parent.lineage and grant.person_id == invite_id
        # min(parent's expiry, the Role's cap): never the 12 h of old.
        assert grant.expires_at <= parent.expires_at <= time.time() + 600
    derived = [e for e in server.app[AUDIT].read(session="or1-live")
               if e["event"] == "token_derived"]
    assert len(derived) == len(minted) and {e["parent"] for e in derived} == {parent.token_id}

    trainee, player = token_in(links["trainee_page"]), links["whep"][0]["bearer_token"]
    watching = await welcomed(http, server, trainee, sockets)
    assert await whep(http, server, player, peers) == (201, "")
    session = server.session()
    assert len(session.subscriptions) == 1
    # A derived token is no invite: it redeems nothing.
    _, error = await api(http, server, "POST", "/api/invites/redeem", trainee,
                         {"device": DEVICES[1]}, expect=403)
    assert error["code"] == "not_an_invite"
    # The expert's own token reads no recordings, nor does anything it mints.
    for token in (device["token"], trainee, minted[0]):
        _, error = await api(http, server, "GET", "/api/sessions/or1-live/recordings", token,
                             expect=403)
        assert error["code"] == "wrong_role"

    await api(http, server, "DELETE", f"/api/admin/sessions/or1-live/invites/{invite_id}",
              admin_token(server), expect=200)
    code, messages = await closed_with(watching)
    assert messages[-1]["error"]["code"] == "token_revoked" and code in (4401, 1006)
    await wait_for(lambda: "" if not session.subscriptions else "the player still watches")
    assert await whep(http, server, player, peers) == (401, "token_revoked")
    assert await refused_hello(http, server, trainee, sockets) == (4401, "token_revoked")
    for token in (device["token"], *minted):
        _, error = await api(http, server, "GET", "/api/sessions/or1-live", token, expect=401)
        assert error["code"] == "token_revoked"
    _, error = await api(http, server, "GET", "/api/sessions/or1-live/links",
                         device["token"], expect=401)
    await api(http, server, "POST", "/api/invites/redeem", expert_invite["token"],
              {"device": DEVICES[2]}, expect=401)


def test_the_derivation_table_and_expiry_rule() -> None:
    authority = TokenAuthority(["k1:" + "d" * 40], caps={Role.TRAINEE: 90.0})
    expert = authority.verify(authority.issue("or1-live", Role.EXPERT, ttl_s=600))
    for role in (Role.REVIEWER, Role.ADMIN, Role.RECORDER):
        with pytest.raises(Forbidden) as refused:
            authority.derive(expert, role)
        assert refused.value.code == "wrong_role"
    _, trainee = authority.derive(expert, Role.TRAINEE, ttl_s=3600)
    # The Role's cap (90 s) is shorter than the parent's 600 s and the 3600 asked.
    assert trainee.expires_at <= time.time() + 90 and trainee.parents == expert.lineage
    for role in Role:
        with pytest.raises(Forbidden):
            authority.derive(trainee, role)
    _, encoder = authority.derive(expert, Role.EXPERT, ttl_s=3600)
    assert encoder.expires_at <= expert.expires_at  # never beyond the parent
    # Another Session's token is not the parent's to mint.
    with pytest.raises(Forbidden) as elsewhere:
        authority.derive(expert, Role.TRAINEE, session_id="or2-other")
    assert elsewhere.value.code == "wrong_session"
    # A node-wide admin mints for any one Session, never node-wide.
    admin = authority.verify(authority.issue(NODE_WIDE, Role.ADMIN))
    scoped = dataclasses.replace(admin, session_id="or2-other", scope=NODE_WIDE)
    _, reviewer = authority.derive(scoped, Role.REVIEWER)
    assert reviewer.session_id == "or2-other" and reviewer.person_id == admin.token_id
    with pytest.raises(Forbidden):
        authority.derive(admin, Role.ADMIN, session_id=NODE_WIDE)
    # Derivation chains are bounded.
    chain = expert
    with pytest.raises(Forbidden) as deep:
        for _ in range(10):
            _, chain = authority.derive(chain, Role.EXPERT)
    assert deep.value.code == "derivation_too_deep" and len(chain.parents) == 4
    # Only invites are redeemed to device tokens.
    with pytest.raises(Forbidden) as not_invite:
        authority.personal(expert, participant_id="p", name="x")
    assert not_invite.value.code == "not_an_invite"


# -- finding 2: a Session id names one Session forever -----------------------------------

async def test_an_ended_session_id_is_never_reused(server: Server, http: aiohttp.ClientSession,
                                                  sockets: list[WS]) -> None:
    admin = admin_token(server)
    await schedule(http, server, admin, "sq", title="First patient")
    trainee = await invite(http, server, "sq")
    reviewer = await invite(http, server, "sq", role="reviewer")
    await api(http, server, "POST", "/api/admin/sessions/sq/start", admin, expect=200)
    await welcomed(http, server, trainee["token"], sockets)
    await api(http, server, "POST", "/api/admin/sessions/sq/end", admin, expect=200)

    # Another patient's case under the same id is refused, live or scheduled.
    for body in ({"id": "sq", "theatre": "or1", "title": "Second patient"},
                 {"id": "sq", "theatre": "or1", "title": "Second", "starts_at": 2e9}):
        _, error = await api(http, server, "POST", "/api/admin/sessions", admin, body,
                             expect=409)
        assert error["code"] == "session_exists"
    with pytest.raises(Gone):
        server.registry.create_session("sq", "or1", "Second patient")
    record = await server.app[STORE].sessions.get_session("sq")
    assert record is not None and record.state == "ended" and record.title == "First patient"
    # The old invites and tokens: 410, on every route, redeeming included.
    for token in (trainee["token"], reviewer["token"]):
        _, error = await api(http, server, "GET", "/api/sessions/sq", token, expect=410)
        assert error["code"] == "session_ended"
        _, error = await api(http, server, "POST", "/api/invites/redeem", token,
                             {"device": DEVICES[3]}, expect=410)
    assert await refused_hello(http, server, trainee["token"], sockets) == (4403,
                                                                             "session_ended")


config_redis = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)


@pytest.mark.slow
async def test_a_configured_session_keeps_its_identity_until_it_ends(
        config_redis: RedisExecutor, http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    base = make_config(store={"redis_url": f"redis://{config_redis.host}:{config_redis.port}/0",
                              "prefix": "configured-identity:"},
                       server={"node_id": "node-c"},
                       auth={"signing_keys": ["k1:" + "c" * 40]})
    config = dataclasses.replace(
        base, theatres=[TheatreConfig("or7", "Theatre 7", ["room"])],
        sessions=[SessionConfig("sq7", "or7", "Morning list")])

    server, runner = await start_server(config)
    try:
        await server.registry.flush()
        first = await server.app[STORE].sessions.get_session("sq7")
        assert first is not None and first.state == "live"
        trainee = await invite(http, server, "sq7")
        await welcomed(http, server, trainee["token"], sockets)
    finally:
        await runner.cleanup()

    # Restarted: the same Session, resumed (same start), its invites still good.
    server, runner = await start_server(config)
    try:
        await server.registry.flush()
        again = await server.app[STORE].sessions.get_session("sq7")
        assert again is not None and again.state == "live" and again.started_at == first.started_at
        await welcomed(http, server, trainee["token"], sockets)
        await api(http, server, "POST", "/api/admin/sessions/sq7/end", admin_token(server),
                  expect=200)
    finally:
        await runner.cleanup()

    # Restarted after it ended: the configured entry does not bring it back.
    server, runner = await start_server(config)
    try:
        await server.registry.flush()
        await wait_for(lambda: "" if "sq7" not in server.registry.sessions else "revived")
        ended = await server.app[STORE].sessions.get_session("sq7")
        assert ended is not None and ended.state == "ended" and ended.ended_at == (
            await server.app[STORE].sessions.get_session("sq7")).ended_at
        assert await refused_hello(http, server, trainee["token"], sockets) == (
            4403, "session_ended")
        _, error = await api(http, server, "POST", "/api/admin/sessions", admin_token(server),
                             {"id": "sq7", "theatre": "or7", "title": "x"}, expect=409)
        assert error["code"] == "session_exists"
    finally:
        await runner.cleanup()


# -- finding 3: only invites redeem; every per-person limit counts per invite ------------

async def test_only_invites_redeem_and_an_invite_is_a_few_devices(
        server: Server, http: aiohttp.ClientSession) -> None:
    created = await invite(http, server)
    assert created["invite"]["max_uses"] == server.config.limits.devices_per_invite == 3
    devices = [await redeem(http, server, created["token"], d) for d in DEVICES[:3]]
    assert len({d["participant"]["id"] for d in devices}) == 3
    _, error = await api(http, server, "POST", "/api/invites/redeem", created["token"],
                         {"device": DEVICES[3]}, expect=403)
    assert error["code"] == "invite_used_up"
    # Any other token, copied to new "devices", is no longer a new Participant each.
    _, links = await api(http, server, "GET", "/api/sessions/or1-live/links",
                         server.token(Role.EXPERT), expect=200)
    for token in (server.token(Role.TRAINEE), devices[0]["token"],
                  token_in(links["trainee_page"])):
        _, error = await api(http, server, "POST", "/api/invites/redeem", token,
                             {"device": DEVICES[3]}, expect=403)
        assert error["code"] == "not_an_invite"
    # An invite is one person: never more devices than the Node allows.
    _, error = await api(http, server, "POST", "/api/admin/sessions/or1-live/invites",
                         admin_token(server), {"role": "trainee", "max_uses": 4}, expect=400)


async def test_subscriptions_count_per_invite_even_when_asked_all_at_once(
        http: aiohttp.ClientSession, peers: list[RTCPeerConnection]) -> None:
    server, runner = await start_server(make_config(
        limits={"max_subscriptions_per_participant": 2}))
    try:
        await camera(http, server, peers, audio=True)
        created = await invite(http, server)
        a, b = [(await redeem(http, server, created["token"], d))["token"] for d in DEVICES[:2]]
        assert await whep(http, server, a, peers) == (201, "")
        assert await whep(http, server, b, peers, "room.audio", "audio") == (201, "")
        # The invite's second device finds the person's cap reached.
        assert await whep(http, server, b, peers) == (409, "too_many_subscriptions")
        # 12 copies of one token asking at once: the cap, not 12.
        copies = server.token(Role.TRAINEE)
        results = await asyncio.gather(*(whep(http, server, copies, peers) for _ in range(12)))
        assert sorted(results) == [(201, "")] * 2 + [(409, "too_many_subscriptions")] * 10
        # Someone else is not affected.
        other = await invite(http, server)
        assert await whep(http, server, other["token"], peers) == (201, "")
    finally:
        await runner.cleanup()


async def test_one_vote_per_invite_however_many_devices(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    asker = await welcomed(http, server, (await invite(http, server))["token"], sockets)
    await asker.send_json({"type": "ask", "text": "Why clip there?", "id": "ask"})
    asked = await receive_until(asker, lambda m: m.get("id") == "ask")
    question = asked["question"]["id"]
    created = await invite(http, server)
    voters = [await welcomed(http, server, (await redeem(http, server, created["token"], d))[
        "token"], sockets) for d in DEVICES[:3]]
    for i, ws in enumerate(voters):
        await ws.send_json({"type": "vote", "question": question, "id": f"v{i}"})
        reply = await receive_until(ws, lambda m, i=i: m.get("id") == f"v{i}")
        assert reply["type"] == "ok" and reply["question"]["votes"] == 1, reply
    # Another invite's vote counts.
    other = await welcomed(http, server, (await invite(http, server))["token"], sockets)
    await other.send_json({"type": "vote", "question": question, "id": "o"})
    assert (await receive_until(other, lambda m: m.get("id") == "o"))["question"]["votes"] == 2


def test_no_one_person_fills_the_sessions_questions() -> None:
    now = [0.0]
    interaction = Interaction(
        procedure="cholecystectomy", started_at=0.0, emit=lambda event: None,
        listen=lambda listener: lambda: None, participant=lambda pid: None,
        has_video_feed=lambda feed: False, close_mic=lambda: None,
        limits=Limits(questions=12, questions_per_person=5), clock=lambda: now[0])

    def device(person: str, participant: str) -> Grant:
        return Grant(session_id="or1-live", role=Role.TRAINEE, participant_id=participant,
                     name=participant, expires_at=time.time() + 600, token_id=f"t-{participant}",
                     kind="device", parents=(person,), person=person)

    def ask(grant: Grant) -> str:
        now[0] += 60  # past the ask rate: only the counts matter here
        try:
            interaction.handle(grant, {"type": "ask", "text": "why?"})
        except Conflict as exc:
            return exc.code
        return "ok"

    one = [device("invite-1", f"d{i}") for i in range(3)]
    # Three devices of one invite share its five questions.
    assert [ask(one[i % 3]) for i in range(7)] == ["ok"] * 5 + ["too_many_questions"] * 2
    # Others still ask until the Session's own limit.
    others = [device(f"invite-{i}", f"p{i}") for i in range(2, 6)]
    results = [ask(g) for g in others for _ in range(3)]
    assert results.count("ok") == 7 and results[-1] == "too_many_questions"
    assert len(interaction.questions) == 12


# -- finding 10 (first half): websockets per person -----------------------------------------

async def test_websockets_are_capped_per_person(http: aiohttp.ClientSession,
                                                sockets: list[WS]) -> None:
    server, runner = await start_server(make_config(limits={"websockets_per_person": 3}))
    try:
        created = await invite(http, server)
        a, b = [(await redeem(http, server, created["token"], d))["token"] for d in DEVICES[:2]]
        open_ = [await welcomed(http, server, token, sockets) for token in (a, a, b)]
        for token in (a, b, created["token"]):
            assert await refused_hello(http, server, token, sockets) == (
                4409, "too_many_connections")
        # 30 copies of one root token: 3 welcomed, the rest refused.
        copies = server.token(Role.TRAINEE)
        outcomes = []
        for _ in range(30):
            ws = await hello(http, server, copies, sockets)
            first = await receive(ws)
            outcomes.append(first["type"] if first["type"] == "welcome"
                            else first["error"]["code"])
        assert outcomes == ["welcome"] * 3 + ["too_many_connections"] * 27
        # Another person is not affected; closing one frees a place.
        await welcomed(http, server, (await invite(http, server))["token"], sockets)
        await open_[0].close()
        for _ in range(50):
            ws = await hello(http, server, b, sockets)
            if (await receive(ws))["type"] == "welcome":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a closed socket never freed its place")
    finally:
        await runner.cleanup()


# -- revocation reaches live connections even when its event is lost -----------------------

async def test_a_revocation_whose_event_is_lost_still_closes_within_5_s(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS],
        peers: list[RTCPeerConnection]) -> None:
    await camera(http, server, peers)
    session = server.session()
    created = await invite(http, server)
    device = (await redeem(http, server, created["token"], DEVICES[0]))["token"]
    watching = await welcomed(http, server, device, sockets)
    assert await whep(http, server, device, peers) == (201, "")
    expert = await welcomed(http, server, server.token(Role.EXPERT), sockets)
    bystander = await welcomed(http, server, (await invite(http, server))["token"], sockets)

    # Straight into the store, as another Node would, with no event at all.
    store = server.app[STORE]
    started = time.monotonic()
    await store.invites.revoke_invite(created["invite"]["id"],
                                      expires_at=created["invite"]["expires_at"])
    _, messages = await closed_with(watching, timeout=5.0)
    assert messages[-1]["error"]["code"] == "token_revoked"
    await wait_for(lambda: "" if not session.subscriptions else "still watching", timeout=5.0)
    assert time.monotonic() - started < 5.0
    # "Every token of the Session issued before now", also without an event.
    await store.invites.revoke_session("or1-live", before=time.time())
    _, messages = await closed_with(expert, timeout=5.0)
    assert messages[-1]["error"]["code"] == "token_revoked"
    _, messages = await closed_with(bystander, timeout=5.0)
    assert messages[-1]["error"]["code"] == "token_revoked"
    closed = [e for e in server.app[AUDIT].read(session="or1-live")
              if e["event"] == "connection_closed"]
    assert {e["reason"] for e in closed} == {"revoked"} and len(closed) >= 3


async def test_a_connection_whose_token_expires_is_closed(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    short = server.token(Role.TRAINEE, ttl_s=2)
    watching = await welcomed(http, server, short, sockets)
    code, messages = await closed_with(watching, timeout=8.0)
    assert code in (4401, 1006) and messages[-1]["error"]["code"] == "token_expired"


# -- finding 9: any token revoked one by one; signing keys rotated by a procedure ------------

async def test_node_wide_admin_and_root_tokens_are_revoked_one_by_one(
        server: Server, http: aiohttp.ClientSession, sockets: list[WS],
        peers: list[RTCPeerConnection]) -> None:
    from server import cli

    admin = admin_token(server)
    other_admin = server.tokens.issue(NODE_WIDE, Role.ADMIN, name="Bea Admin")
    expert = server.token(Role.EXPERT, name="Dr Root")  # `scrubin token`, no invite
    pc, _ = await whip_publish(http, server, "room", [VideoStreamTrack()], token=expert)
    peers.append(pc)
    session = server.session()
    await wait_for(lambda: "" if session.ingests else "not publishing")
    expert_ws = await welcomed(http, server, expert, sockets)
    _, links = await api(http, server, "GET", "/api/sessions/or1-live/links", expert,
                         expect=200)
    trainee_ws = await welcomed(http, server, token_in(links["trainee_page"]), sockets)

    # One node-wide admin token, by its id; the other admin is untouched.
    bea = grant_of(server, other_admin).token_id
    _, body = await api(http, server, "DELETE", f"/api/admin/tokens/{bea}", admin, expect=200)
    assert body["revoked"] == bea and body["until"] > time.time() + 29 * 86400
    _, error = await api(http, server, "GET", "/api/admin/theatres", other_admin, expect=401)
    assert error["code"] == "token_revoked"
    await api(http, server, "GET", "/api/admin/theatres", admin, expect=200)

    # A root expert token, given whole to the CLI: it and everything derived
    # from it stop, live connections and its WHIP publication included.
    code = await asyncio.to_thread(cli.main, ["--log-level", "WARNING", "revoke", expert,
                                              "--server", server.base_url, "--token", admin])
    assert code == 0
    for ws in (expert_ws, trainee_ws):
        _, messages = await closed_with(ws)
        assert messages[-1]["error"]["code"] == "token_revoked"
    await wait_for(lambda: "" if not session.ingests else "still publishing")
    for token in (expert, token_in(links["trainee_page"]), links["whip"][0]["bearer_token"]):
        _, error = await api(http, server, "GET", "/api/sessions/or1-live", token, expect=401)
        assert error["code"] == "token_revoked"
    revoked = [e for e in server.app[AUDIT].read(limit=10_000) if e["event"] == "token_revoked"]
    assert [e["token"] for e in revoked] == [bea, grant_of(server, expert).token_id]
    await api(http, server, "DELETE", "/api/admin/tokens/" + "x" * 65, admin, expect=400)

    # Every node-wide admin token at once; a Session's admin token is not one.
    session_admin = server.token(Role.ADMIN)
    third = server.tokens.issue(NODE_WIDE, Role.ADMIN)
    await api(http, server, "DELETE", "/api/admin/tokens", third, expect=200)
    for token in (admin, third):
        await api(http, server, "GET", "/api/admin/theatres", token, expect=401)
    await api(http, server, "GET", "/api/admin/sessions/or1-live", session_admin, expect=200)
    await api(http, server, "GET", "/api/admin/theatres",
              server.tokens.issue(NODE_WIDE, Role.ADMIN), expect=200)


@pytest.mark.slow
async def test_signing_key_rotation_follows_the_written_procedure(
        config_redis: RedisExecutor, http: aiohttp.ClientSession, sockets: list[WS]) -> None:
    """docs/security.md, "Rotating the signing key": add the new key second on
    every Node, then first, then drop the old one once its tokens are gone."""
    old, new = "2026-05:" + "o" * 40, "2026-11:" + "n" * 40

    def node(keys: list[str]) -> Any:
        return make_config(store={"redis_url": f"redis://{config_redis.host}:"
                                                f"{config_redis.port}/0",
                                  "prefix": "rotation:"},
                           server={"node_id": "node-r"}, auth={"signing_keys": keys})

    async def phase(keys: list[str]) -> tuple[Server, Any]:
        return await start_server(node(keys))

    old_admin = TokenAuthority([old]).issue(NODE_WIDE, Role.ADMIN, name="Old admin")
    server, runner = await phase([old])
    try:
        _, created = await api(http, server, "POST", "/api/admin/sessions/or1-live/invites",
                               old_admin, {"role": "trainee"}, expect=201)
        old_link = created["token"]
    finally:
        await runner.cleanup()

    # 1. The new key verifies everywhere before anything is signed with it.
    server, runner = await phase([old, new])
    try:
        new_admin = TokenAuthority([new]).issue(NODE_WIDE, Role.ADMIN, name="New admin")
        for token in (old_admin, new_admin):
            await api(http, server, "GET", "/api/admin/theatres", token, expect=200)
        assert grant_of(server, server.token(Role.TRAINEE)).token_id  # still signs with old
    finally:
        await runner.cleanup()

    # 2. The new key signs; invites are signed again from their records.
    server, runner = await phase([new, old])
    try:
        _, listed = await api(http, server, "GET", "/api/admin/sessions/or1-live/invites",
                              new_admin, expect=200)
        new_link = listed["invites"][0]["token"]
        assert new_link != old_link
        await redeem(http, server, old_link, DEVICES[0])  # old links still work meanwhile
    finally:
        await runner.cleanup()

    # 3. The old key is retired: what it signed is refused, the rest goes on.
    server, runner = await phase([new])
    try:
        _, error = await api(http, server, "GET", "/api/admin/theatres", old_admin, expect=401)
        assert error["code"] == "token_invalid"
        await api(http, server, "POST", "/api/invites/redeem", old_link,
                  {"device": DEVICES[1]}, expect=401)
        same = await redeem(http, server, new_link, DEVICES[0])  # the same device, same use
        await welcomed(http, server, same["token"], sockets)
        await api(http, server, "GET", "/api/admin/theatres", new_admin, expect=200)
    finally:
        await runner.cleanup()
