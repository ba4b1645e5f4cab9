"""`scrubin publish` through TURN: its own credentials from the Node, and UDP
then TCP then TLS when the one before does not get through."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import aiohttp
import pytest
from aiortc import RTCIceServer

from server.publish.synthetic import SyntheticTheatreCamera
from server.publish.whip import WhipOptions, WhipPublisher, ice_attempts, session_api_url
from server.roles import Role

from .conftest import Server, make_config, start_server, wait_for, whep_subscribe
from .coturn import Coturn
from .test_live_path import CounterReader


def test_attempts_put_one_turn_url_each_udp_then_tcp_then_tls():
    servers = [RTCIceServer(urls=["stun:s.example"]),
               RTCIceServer(urls=["turns:t.example:443?transport=tcp",
                                  "turn:t.example:3478?transport=udp",
                                  "turn:t.example:3478?transport=tcp"],
                            username="1:p", credential="c")]
    attempts = ice_attempts(servers)
    assert [a.label for a in attempts] == ["TURN over udp", "TURN over tcp", "TURN over tls"]
    for attempt, url in zip(attempts, ["turn:t.example:3478?transport=udp",
                                       "turn:t.example:3478?transport=tcp",
                                       "turns:t.example:443?transport=tcp"], strict=True):
        stun, turn = attempt.servers
        assert stun.urls == ["stun:s.example"]
        assert (turn.urls, turn.username, turn.credential) == ([url], "1:p", "c")
    assert [a.label for a in ice_attempts([RTCIceServer(urls="stun:s.example")])] == ["direct"]
    assert ice_attempts([]) == ice_attempts([RTCIceServer(urls=["turns:x?transport=udp"])])


def test_the_session_api_is_found_from_the_whip_url():
    assert session_api_url("https://n.example/whip/or1/room") == \
        "https://n.example/api/sessions/or1"
    assert session_api_url("https://n.example/scrubin/whip/or1/room/") == \
        "https://n.example/scrubin/api/sessions/or1"
    assert session_api_url("https://other.example/ingest/abc") is None


def dead_port() -> int:
    """Nothing listens here (UDP or TCP): a transport the firewall blocks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
async def test_publisher_uses_its_own_credentials_relay_only_over_udp(
        turn_server: Server, coturn: Coturn) -> None:
    server = turn_server
    publisher = WhipPublisher(f"{server.base_url}/whip/or1-live/room",
                              server.token(Role.EXPERT, participant_id="cam-udp"),
                              [SyntheticTheatreCamera(160, 120, 10)],
                              WhipOptions(relay_only=True, connect_timeout_s=10))
    task = asyncio.ensure_future(publisher.run())
    try:
        await wait_for(lambda: "" if publisher.state == "live" else publisher.state, timeout=20)
        assert publisher.ice_label == "TURN over udp"
        feed = server.session().feeds["room.video"]
        await wait_for(lambda: "" if feed.frames_received > 5 else f"{feed.frames_received}")
        (ingest,) = server.session().ingests.values()
        remote = [c for c in ingest.pc.remoteDescription.sdp.splitlines()
                  if c.startswith("a=candidate:")]
        assert remote and all(" typ relay " in c for c in remote), remote
        assert ":cam-udp>" in coturn.log()
    finally:
        publisher.stop()
        await task


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_cli_publish_falls_back_to_tls_through_coturn(
        coturn: Coturn, http: aiohttp.ClientSession) -> None:
    """UDP and TCP to the relay are blocked (nothing answers there); TLS passes.
    The camera ends up live through TURN over TLS and a viewer reads its frames."""
    server, runner = await start_server(make_config(turn={
        "urls": [f"turn:127.0.0.1:{dead_port()}?transport=udp",
                 f"turn:127.0.0.1:{dead_port()}?transport=tcp", coturn.url("tls")],
        "secret": coturn.secret}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "--log-level", "WARNING", "publish",
        f"{server.base_url}/whip/or1-live/room",
        "--token", server.token(Role.EXPERT, participant_id="camera-7"),
        "--source", "synthetic", "--size", "320x180", "--fps", "15", "--no-audio",
        "--relay-only", "--connect-timeout", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSL_CERT_FILE": str(coturn.ca_file)})
    viewer = None
    try:
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed", timeout=60)
        viewer, _, remote = await whep_subscribe(http, server, "room.video", "video")
        reader = CounterReader(await asyncio.wait_for(remote, 10))
        await wait_for(lambda: "" if len(reader.counters) >= 10 else f"{len(reader.counters)}",
                       timeout=20)
        await reader.stop()
        assert reader.counters == sorted(reader.counters)
        assert ":camera-7>" in coturn.log()
    finally:
        process.terminate()
        out, err = await asyncio.wait_for(process.communicate(), 15)
        if viewer is not None:
            await viewer.close()
        await runner.cleanup()
    lines = out.decode().splitlines()
    assert "publish: connecting (TURN over udp)" in lines, lines
    assert "publish: connecting (TURN over tcp)" in lines, lines
    assert "publish: live (TURN over tls)" in lines, lines
    assert process.returncode == 0, err.decode()[-2000:]
