"""TURN with a real coturn on loopback (tests/coturn.py): per-Participant
shared-secret credentials, what coturn does with them, media through the
relay over UDP, TCP and TLS, and the Node's own ICE configuration.

Relay-only clients here really go through coturn: with the relay transport
policy aioice gathers no host candidate, so the only path is via the relay.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from server.config import ConfigError, IceServer, TurnConfig, load_config
from server.http import ws as ws_module
from server.media.turn import (
    ClientIceServers,
    link_headers,
    parse_link_headers,
    turn_credential,
    turn_transport,
    turn_username,
)
from server.publish.synthetic import SyntheticTheatreCamera
from server.roles import Role
from server.tokens import TokenAuthority

from .conftest import Server, make_config, offer_sdp, start_server, wait_for, whip_publish
from .coturn import Coturn
from .test_live_path import CounterReader

SESSION = "or1-live"
KEY = "k1:" + "s" * 40


def grant(role: Role = Role.TRAINEE, ttl_s: float = 3600, participant: str = "p-1") -> Any:
    tokens = TokenAuthority([KEY])
    return tokens.verify(tokens.issue(SESSION, role, ttl_s=ttl_s, participant_id=participant))


def turn_of(servers: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = [s for s in servers if any(u.startswith("turn") for u in s["urls"])]
    return entry


def only(entry: dict[str, Any], url: str) -> RTCIceServer:
    return RTCIceServer(urls=[url], username=entry["username"], credential=entry["credential"])


# -- credentials --------------------------------------------------------------------

def test_credentials_are_cotuns_shared_secret_scheme_per_participant_and_short_lived():
    now = float(int(time.time()))
    catalog = ClientIceServers(
        [IceServer(urls=["stun:stun.example:3478"])],
        TurnConfig(urls=["turn:t.example:3478"], secret="x" * 32, credential_ttl_s=600),
        clock=lambda: now)
    first = catalog.for_grant(grant(participant="p-1", ttl_s=7200))
    assert first.servers[0] == {"urls": ["stun:stun.example:3478"]}
    turn = turn_of(first.servers)
    expiry = int(now) + 600
    assert turn["username"] == f"{expiry}:p-1" and first.expires_at == expiry
    # base64(HMAC-SHA1(secret, username)), as coturn's use-auth-secret computes it.
    expected = base64.b64encode(hmac.new(b"x" * 32, f"{expiry}:p-1".encode(),
                                         hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected
    other = turn_of(catalog.for_grant(grant(participant="p-2", ttl_s=7200)).servers)
    assert other["username"] == f"{expiry}:p-2" and other["credential"] != expected


def test_credentials_never_outlive_the_token_and_reviewers_get_none():
    catalog = ClientIceServers([IceServer(urls=["stun:stun.example"])],
                               TurnConfig(urls=["turn:t.example"], secret="x" * 32,
                                          credential_ttl_s=3600))
    short = grant(ttl_s=120)
    ice = catalog.for_grant(short)
    assert ice.expires_at == int(short.expires_at) <= time.time() + 120
    assert turn_of(ice.servers)["username"].startswith(f"{int(short.expires_at)}:")
    for role in (Role.EXPERT, Role.ADMIN, Role.RECORDER):
        assert turn_of(catalog.for_grant(grant(role)).servers)
    reviewer = catalog.for_grant(grant(Role.REVIEWER))
    assert reviewer.servers == [] and reviewer.expires_at is None


def test_odd_participant_ids_become_safe_usernames():
    assert turn_username(5, "abc-1.x_y") == "5:abc-1.x_y"
    odd = turn_username(5, 'a "b"\\ c')
    assert odd.startswith("5:") and all(c.isalnum() for c in odd[2:])
    assert turn_credential("s", "5:a") == base64.b64encode(
        hmac.new(b"s", b"5:a", hashlib.sha1).digest()).decode()


def test_turn_urls_are_classified_by_transport():
    assert turn_transport("turn:h:3478") == "udp"
    assert turn_transport("turn:h:3478?transport=tcp") == "tcp"
    assert turn_transport("turns:h:443?transport=tcp") == "tls"
    assert turn_transport("turns:h") == "tls"
    assert turn_transport("turns:h?transport=udp") is None  # DTLS: no client speaks it here
    assert turn_transport("stun:h") is None


def test_link_headers_carry_credentials_and_parse_back():
    servers = [{"urls": ["stun:s.example"]},
               {"urls": ["turn:t.example?transport=udp", "turns:t.example:443?transport=tcp"],
                "username": "1700000000:p-1", "credential": 'a+b/c="d\\'}]
    values = link_headers(servers)
    assert values[0] == '<stun:s.example>; rel="ice-server"'
    assert values[1] == ('<turn:t.example?transport=udp>; rel="ice-server"; '
                         'username="1700000000:p-1"; credential="a+b/c=\\"d\\\\"; '
                         'credential-type="password"')
    parsed = parse_link_headers(values)
    assert parsed == [{"urls": ["stun:s.example"]},
                      {"urls": ["turn:t.example?transport=udp"], "username": "1700000000:p-1",
                       "credential": 'a+b/c="d\\'},
                      {"urls": ["turns:t.example:443?transport=tcp"],
                       "username": "1700000000:p-1", "credential": 'a+b/c="d\\'}]
    # Several links in one header (as browsers join them), other relations ignored.
    joined = ", ".join([*values[:2], '</x>; rel="next"'])
    assert parse_link_headers([joined]) == parsed[:2]


# -- configuration ------------------------------------------------------------------

def test_turn_and_ice_servers_from_the_environment_keep_credentials():
    env = {
        "SCRUBIN_TURN_URLS": "turn:t.example:3478?transport=udp,turns:t.example:443",
        "SCRUBIN_TURN_SECRET": "y" * 24,
        "SCRUBIN_TURN_CREDENTIAL_TTL_S": "900",
        "SCRUBIN_ICE_SERVERS": '[{"urls": ["turn:fixed.example"], "username": "u", '
                               '"credential": "c"}, {"urls": "stun:s.example"}]',
        "SCRUBIN_ICE_NODE_SERVERS": "stun:node.example",
    }
    config = load_config(None, env=env)
    assert config.turn == TurnConfig(
        urls=["turn:t.example:3478?transport=udp", "turns:t.example:443"], secret="y" * 24,
        credential_ttl_s=900)
    assert config.ice.servers == [IceServer(["turn:fixed.example"], "u", "c"),
                                  IceServer(["stun:s.example"])]
    assert config.ice.node_servers == [IceServer(["stun:node.example"])]
    assert load_config(None, env={}).ice.node_servers == []  # never relays of its own


@pytest.mark.parametrize(("sections", "message"), [
    ({"turn": {"urls": ["turn:t.example"]}}, "urls and secret go together"),
    ({"turn": {"secret": "z" * 20}}, "urls and secret go together"),
    ({"turn": {"urls": ["turn:t.example"], "secret": "short"}}, "at least 16"),
    ({"turn": {"urls": ["http://t.example"], "secret": "z" * 20}}, "not a turn:"),
    ({"turn": {"urls": ["turn:t.example"], "secret": "z" * 20, "credential_ttl_s": 5}},
     "between 60 s"),
    ({"ice": {"node_servers": [{"urls": "ftp://x"}]}}, "not a stun:"),
])
def test_bad_turn_configuration_is_refused(sections: dict[str, Any], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, env={}, **sections)


def test_ice_servers_json_must_be_well_formed():
    with pytest.raises(ConfigError):
        load_config(None, env={"SCRUBIN_ICE_SERVERS": '[{"urls": ["stun:x"], "username": 5}]'})
    with pytest.raises(ConfigError):
        load_config(None, env={"SCRUBIN_ICE_SERVERS": "[not json"})


# -- what coturn does with them -----------------------------------------------------

class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


async def allocate(coturn: Coturn, username: str, credential: str) -> Any:
    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol, server_addr=("127.0.0.1", coturn.port), username=username,
        password=credential)
    return transport


async def test_coturn_refuses_credentials_once_they_expire(coturn: Coturn):
    """An allocation made in time keeps working (coturn checked its key once);
    a new one with the same credentials after the expiry is refused."""
    ttl = 3600
    soon = time.time() + 2
    catalog = ClientIceServers([], TurnConfig(urls=coturn.urls, secret=coturn.secret,
                                              credential_ttl_s=ttl),
                               clock=lambda: soon - ttl)  # credentials expire in ~2 s
    ice = catalog.for_grant(grant(participant="expiring"))
    assert ice.expires_at is not None
    entry = turn_of(ice.servers)
    early = await allocate(coturn, entry["username"], entry["credential"])
    loop = asyncio.get_running_loop()
    peer, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    try:
        # coturn compares whole seconds: wait until the expiry is in the past.
        while time.time() < ice.expires_at + 1.05:  # noqa: ASYNC110 - bounded by the expiry
            await asyncio.sleep(0.1)
        with pytest.raises(stun.TransactionFailed) as refused:
            await allocate(coturn, entry["username"], entry["credential"])
        assert refused.value.response.attributes["ERROR-CODE"][0] == 401
        # The earlier allocation still relays: its permission and channel are
        # authenticated requests made after the expiry.
        early.sendto(b"still relayed", peer.get_extra_info("sockname"))
        await wait_for(lambda: "" if sink.received else "nothing relayed", timeout=5)
        assert sink.received == [b"still relayed"]
    finally:
        early.close()
        peer.close()

    expired = turn_of(ClientIceServers(
        [], TurnConfig(urls=coturn.urls, secret=coturn.secret),
        clock=lambda: time.time() - 7200).for_grant(grant()).servers)
    with pytest.raises(stun.TransactionFailed):
        await allocate(coturn, expired["username"], expired["credential"])
    wrong = turn_of(ClientIceServers([], TurnConfig(urls=coturn.urls, secret="w" * 20))
                    .for_grant(grant()).servers)
    with pytest.raises(stun.TransactionFailed):
        await allocate(coturn, wrong["username"], wrong["credential"])


# -- media through the relay ----------------------------------------------------------

async def ice_servers(http: aiohttp.ClientSession, server: Server, token: str) -> list[Any]:
    async with http.get(f"{server.base_url}/api/sessions/{SESSION}",
                        headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["ice_servers"])


async def relay_only_viewer(http: aiohttp.ClientSession, server: Server, token: str,
                            ice: RTCIceServer, peers: list[RTCPeerConnection],
                            ) -> tuple[RTCPeerConnection, str, Any,
                                       asyncio.Future[MediaStreamTrack]]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[ice],
                                            iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    peers.append(pc)
    pc.addTransceiver("video", direction="recvonly")
    track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: track.done() or track.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    candidates = [line for line in offer.splitlines() if line.startswith("a=candidate:")]
    assert candidates and all(" typ relay " in c for c in candidates), candidates
    async with http.post(f"{server.base_url}/whep/{SESSION}/room.video", data=offer,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp",
                                  "Origin": "https://viewer.example"}) as response:
        answer = await response.text()
        assert response.status == 201, answer
        headers = response.headers
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, answer, headers, track


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_relay_only_viewer_decodes_the_camera_through_coturn(
        coturn: Coturn, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        monkeypatch: pytest.MonkeyPatch, transport: str):
    # aioice verifies the TURN server's certificate against the default trust store.
    monkeypatch.setenv("SSL_CERT_FILE", str(coturn.ca_file))
    server, runner = await start_server(make_config(
        turn={"urls": coturn.urls, "secret": coturn.secret},
        server={"cors_origins": ["https://viewer.example"]}))
    try:
        publisher, _ = await whip_publish(http, server, "room",
                                          [SyntheticTheatreCamera(320, 180, 15)])
        peers.append(publisher)
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        token = server.token(Role.TRAINEE, participant_id=f"relayed-{transport}")
        entry = turn_of(await ice_servers(http, server, token))
        assert entry["username"].endswith(f":relayed-{transport}")
        pc, answer, headers, remote = await relay_only_viewer(
            http, server, token, only(entry, coturn.url(transport)), peers)

        # The Node allocated no relay of its own: it answers from its host
        # candidate and sends to the viewer's relay address.
        assert "typ relay" not in answer and "typ host" in answer
        # The answer names the same servers, credentials included, readable by
        # a browser page of an allowed origin.
        links = parse_link_headers(headers.getall("Link"))
        assert [u for link in links for u in link["urls"]] == coturn.urls
        assert all(link["username"] == entry["username"]
                   and link["credential"] == entry["credential"] for link in links)
        assert "Link" in headers["Access-Control-Expose-Headers"]

        reader = CounterReader(await asyncio.wait_for(remote, 10))
        await wait_for(lambda: "" if len(reader.counters) >= 20
                       else f"{len(reader.counters)} counters, {pc.connectionState}", timeout=20)
        await reader.stop()
        counters = reader.counters
        assert counters == sorted(counters) and counters[-1] - counters[0] >= 15, counters
        # Relayed viewers are on the fast path like direct ones.
        (subscription,) = session.subscriptions.values()
        assert subscription.path == "fast"
        assert f"username=<{entry['username']}>" in coturn.log()
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_node_servers_are_the_nodes_own_and_make_it_allocate_relays(
        coturn: Coturn, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]):
    """``ice.node_servers`` is the only way the Node allocates a relay; the
    clients' TURN settings never reach its peer connections."""
    username = turn_username(int(time.time()) + 600, "the-node")
    node = {"urls": [coturn.url("udp")], "username": username,
            "credential": turn_credential(coturn.secret, username)}
    server, runner = await start_server(make_config(ice={"node_servers": [node]}))
    try:
        publisher, _ = await whip_publish(http, server, "room",
                                          [SyntheticTheatreCamera(160, 120, 5)])
        peers.append(publisher)
        answer = str(server.session().ingests[next(iter(server.session().ingests))]
                     .pc.localDescription.sdp)
        assert "typ relay" in answer
        # Its clients get no TURN from it: none is configured for them.
        assert await ice_servers(http, server, server.token(Role.TRAINEE)) == []
    finally:
        await runner.cleanup()


# -- who gets what --------------------------------------------------------------------

async def test_each_participant_gets_its_own_credentials_and_reviewers_none(
        turn_server: Server, http: aiohttp.ClientSession, peers: list[RTCPeerConnection]):
    server = turn_server
    one = turn_of(await ice_servers(http, server, server.token(Role.TRAINEE,
                                                               participant_id="tr-1")))
    two = turn_of(await ice_servers(http, server, server.token(Role.TRAINEE,
                                                               participant_id="tr-2")))
    assert one["username"].endswith(":tr-1") and two["username"].endswith(":tr-2")
    assert one["credential"] != two["credential"]
    assert await ice_servers(http, server, server.token(Role.REVIEWER)) == []

    # The WHIP answer carries the publisher's own, as Link headers.
    publisher_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(publisher_pc)
    publisher_pc.addTransceiver(SyntheticTheatreCamera(160, 120, 5), direction="sendonly")
    async with http.post(f"{server.base_url}/whip/{SESSION}/endoscope",
                         data=await offer_sdp(publisher_pc),
                         headers={"Authorization": "Bearer " + server.token(
                             Role.EXPERT, participant_id="cam-2"),
                                  "Content-Type": "application/sdp"}) as response:
        assert response.status == 201
        links = parse_link_headers(response.headers.getall("Link"))
        # No Origin, no CORS grant: the headers are there for any client.
        assert "Access-Control-Expose-Headers" not in response.headers
    assert {u for s in links for u in s["urls"]} == set(turn_server.config.turn.urls)
    assert all(s["username"].endswith(":cam-2") for s in links)


async def test_websocket_sends_fresh_credentials_before_they_expire(
        coturn: Coturn, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch):
    # A 60 s lifetime, refreshed when 98 % of it is left: about every second.
    monkeypatch.setattr(ws_module, "ICE_REFRESH_AT", 0.98)
    server, runner = await start_server(make_config(
        turn={"urls": coturn.urls, "secret": coturn.secret, "credential_ttl_s": 60}))
    try:
        async with http.ws_connect(f"{server.base_url}/ws") as ws:
            await ws.send_json({"type": "hello", "id": 1, "token": server.token(
                Role.TRAINEE, participant_id="ws-1")})
            welcome = await ws.receive_json(timeout=5)
            assert welcome["type"] == "welcome"
            first = turn_of(welcome["ice_servers"])
            expiry = int(first["username"].split(":")[0])
            assert time.time() + 55 < expiry <= time.time() + 60
            deadline = time.monotonic() + 10
            fresh = None
            while fresh is None and time.monotonic() < deadline:
                message = await ws.receive_json(timeout=deadline - time.monotonic())
                if message["type"] == "ice_servers":
                    fresh = turn_of(message["ice_servers"])
            assert fresh is not None, "no ice_servers message"
            assert fresh["username"].endswith(":ws-1")
            assert int(fresh["username"].split(":")[0]) > expiry
        # Credentials as long as the token: nothing to refresh.
        async with http.ws_connect(f"{server.base_url}/ws") as ws:
            await ws.send_json({"type": "hello", "id": 1, "token": server.token(
                Role.TRAINEE, ttl_s=30)})
            welcome = await ws.receive_json(timeout=5)
            with pytest.raises(TimeoutError):
                while True:
                    message = await ws.receive_json(timeout=2.5)
                    assert message["type"] != "ice_servers", message
    finally:
        await runner.cleanup()



@pytest.mark.slow
async def test_viewers_reached_through_the_nodes_own_relay_get_aiortcs_sender(
        coturn: Coturn, http: aiohttp.ClientSession, peers: list[RTCPeerConnection],
        monkeypatch: pytest.MonkeyPatch):
    """With ``node_servers`` the Node has relay candidates of its own; a viewer
    whose selected pair starts there cannot take the synchronous fast path (its
    TURN client sends asynchronously): it is served by aiortc's sender instead,
    and every viewer decodes whichever pair won."""
    monkeypatch.setenv("SSL_CERT_FILE", str(coturn.ca_file))
    username = turn_username(int(time.time()) + 600, "the-node")
    node = {"urls": [coturn.url("udp")], "username": username,
            "credential": turn_credential(coturn.secret, username)}
    server, runner = await start_server(make_config(
        ice={"node_servers": [node]}, turn={"urls": coturn.urls, "secret": coturn.secret}))
    try:
        publisher, _ = await whip_publish(http, server, "room",
                                          [SyntheticTheatreCamera(320, 180, 15)])
        peers.append(publisher)
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        readers = []
        for index in range(4):
            token = server.token(Role.TRAINEE, participant_id=f"viewer-{index}")
            entry = turn_of(await ice_servers(http, server, token))
            _, _, _, remote = await relay_only_viewer(
                http, server, token, only(entry, coturn.url("udp")), peers)
            readers.append(CounterReader(await asyncio.wait_for(remote, 10)))
        for reader in readers:
            await wait_for(lambda r=reader: "" if len(r.counters) >= 10
                           else f"{len(r.counters)} counters", timeout=30)
            await reader.stop()
        for subscription in session.subscriptions.values():
            connection = subscription.pc.getTransceivers()[0].sender.transport.transport
            pair = connection._connection._nominated[1]
            relayed_here = pair.local_candidate.type == "relay"
            assert subscription.path == ("sender" if relayed_here else "fast"), pair
    finally:
        await runner.cleanup()
