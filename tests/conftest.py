"""Shared fixtures: a real server on loopback, tokens, and aiortc peers."""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import random
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from server.app import create_app
from server.config import Config, load_config
from server.http.common import REGISTRY, TOKENS
from server.http.guard import NodeRunner
from server.media.hooks import advertise_host_addresses
from server.registry import Registry
from server.roles import Role
from server.session import Session
from server.theatre import Theatre
from server.tokens import NODE_WIDE, TokenAuthority

LOOPBACK = ["127.0.0.1"]
_RECORDINGS_PARENT: list[str] = []

# -- the canary (docs/security.md, "Logs") -----------------------------------------------
#: Every test server also verifies with this key, so the canary token works on
#: each; ``admin_token(server)`` hands it out, so it travels through most of the
#: suite, and an autouse check fails any test whose logs show it.
CANARY_KEY = "canary:" + "c4n4ry-k3y-" * 4
#: A node-wide admin token (named like the suite's other admin tokens).
CANARY_TOKEN = TokenAuthority([CANARY_KEY]).issue(
    NODE_WIDE, Role.ADMIN, name="Ada Admin", token_id="canary-admin", ttl_s=12 * 3600)
#: A media URL signature (32 URL-safe characters: well-formed, never valid).
CANARY_SIGNATURE = "CaNaRy-sIg-0123456789abcdefABCDE"
#: What must never appear in a log line: any segment of the token (its header
#: names the canary key, so even an echo cut short after it shows), the signature.
CANARY_SECRETS = (*CANARY_TOKEN.split("."), CANARY_SIGNATURE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tier (real Chromium, several Node processes, benchmarks-like
    loads on 2 shared cores) gets one retry after a failure. Its tests measure
    real time across processes the OS schedules; on a loaded CI machine a
    lone miss is more often the machine than the code. A retry is reported
    (`R` and "rerun" in the summary), so it is seen and looked into; a test
    that fails twice fails the run. The fast tier never retries."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=2))


@dataclass(frozen=True)
class Canary:
    token: str
    signature: str
    secrets: tuple[str, ...]

    def leaks(self, text: str) -> list[str]:
        return [secret for secret in self.secrets if secret in text]


@pytest.fixture(scope="session")
def canary() -> Canary:
    return Canary(CANARY_TOKEN, CANARY_SIGNATURE, CANARY_SECRETS)


@pytest.fixture(autouse=True)
def _no_secret_reaches_a_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test: the access log and the server's own lines are captured (INFO),
    and none may carry the canary."""
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web", "server", "recorder"):
        caplog.set_level(logging.INFO, logger=name)
    # `scrubin …` run in-process (logs.configure) gives the root logger a
    # handler on this test's captured stderr, closed after it: drop it.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    leaked = [line for line in caplog.text.splitlines()
              if any(secret in line for secret in CANARY_SECRETS)]
    assert not leaked, f"a secret reached the logs: {leaked[:3]}"


def _recordings_parent() -> str:
    """One temporary directory for every test server's recordings, removed at exit."""
    if not _RECORDINGS_PARENT:
        _RECORDINGS_PARENT.append(tempfile.mkdtemp(prefix="scrubin-recordings-"))
        atexit.register(shutil.rmtree, _RECORDINGS_PARENT[0], True)
    return _RECORDINGS_PARENT[0]


def make_config(**sections: dict[str, Any]) -> Config:
    """Loopback-only config: the server advertises and accepts 127.0.0.1 only."""
    sections.setdefault("ice", {})
    sections["ice"].setdefault("host_addresses", LOOPBACK)
    sections["ice"].setdefault("allowed_remote_networks", ["127.0.0.0/8"])
    sections.setdefault("server", {}).setdefault("port", unused_port())
    sections.setdefault("audit", {}).setdefault(
        "path", str(Path(tempfile.mkdtemp(prefix="scrubin-audit-")) / "audit.jsonl"))
    sections.setdefault("recording", {}).setdefault(
        "root", tempfile.mkdtemp(prefix="recordings-", dir=_recordings_parent()))
    sections["server"].setdefault("host", "127.0.0.1")
    # A key of the server's own signs (as in production); the canary's verifies.
    sections.setdefault("auth", {}).setdefault(
        "signing_keys", [f"test:{secrets.token_urlsafe(33)}", CANARY_KEY])
    return load_config(None, env={}, **sections)


@dataclass
class Server:
    app: web.Application
    config: Config
    base_url: str

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def tokens(self) -> TokenAuthority:
        return self.app[TOKENS]

    def token(self, role: Role, session: str = "or1-live", **kwargs: Any) -> str:
        return self.tokens.issue(session, role, **kwargs)

    def session(self, session_id: str = "or1-live") -> Session:
        return self.registry.get(session_id)


async def start_server(config: Config) -> tuple[Server, web.AppRunner]:
    app = create_app(config)
    runner = NodeRunner(app, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    server = Server(app, config, f"http://127.0.0.1:{config.server.port}")
    server.registry.add_theatre(Theatre("or1", "Theatre 1", ("room", "endoscope", "narration")))
    server.registry.create_session("or1-live", "or1", "Cholecystectomy")
    return server, runner


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv, runner = await start_server(make_config())
    try:
        yield srv
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def coturn() -> Iterator[Any]:
    """A real coturn on loopback (tests/coturn.py), shared by the run's tests."""
    from .coturn import running_coturn

    with running_coturn() as turn:
        yield turn


@pytest.fixture
async def turn_server(coturn: Any) -> AsyncIterator[Server]:
    """A server whose clients get their own credentials for ``coturn``."""
    srv, runner = await start_server(make_config(turn={"urls": coturn.urls,
                                                       "secret": coturn.secret}))
    try:
        yield srv
    finally:
        await runner.cleanup()


@pytest.fixture
async def peers() -> AsyncIterator[list[RTCPeerConnection]]:
    """Client peer connections a test creates; all closed afterwards."""
    created: list[RTCPeerConnection] = []
    try:
        yield created
    finally:
        for pc in created:
            await pc.close()


@pytest.fixture
async def sockets() -> AsyncIterator[list[aiohttp.ClientWebSocketResponse]]:
    """Websockets a test opens; all closed afterwards."""
    opened: list[aiohttp.ClientWebSocketResponse] = []
    try:
        yield opened
    finally:
        for ws in opened:
            await ws.close()


@pytest.fixture
async def live_server(server: Server) -> Server:
    """The same server, named for the browser tests that drive it through pages."""
    return server


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """One headless Debian Chromium (tests/browser_helpers.py has the flags)."""
    from .browser_helpers import chromium

    async with chromium() as b:
        yield b


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def offer_sdp(pc: RTCPeerConnection) -> str:
    advertise_host_addresses(pc, LOOPBACK)
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


async def whip_publish(http: aiohttp.ClientSession, server: Server, slot: str,
                       tracks: list[MediaStreamTrack], token: str | None = None,
                       session: str = "or1-live") -> tuple[RTCPeerConnection, str]:
    """Publish ``tracks`` to ``slot``; returns the peer and the resource URL."""
    pc = client_pc()
    for track in tracks:
        pc.addTransceiver(track, direction="sendonly")
    sdp = await offer_sdp(pc)
    token = token or server.token(Role.EXPERT, session)
    async with http.post(f"{server.base_url}/whip/{session}/{slot}", data=sdp,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, f"{server.base_url}{location}"


async def whep_subscribe(http: aiohttp.ClientSession, server: Server, feed: str, kind: str,
                         token: str | None = None, session: str = "or1-live",
                         ) -> tuple[RTCPeerConnection, str, asyncio.Future[MediaStreamTrack]]:
    pc = client_pc()
    pc.addTransceiver(kind, direction="recvonly")
    track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @pc.on("track")
    def _on_track(t: MediaStreamTrack) -> None:
        if not track.done():
            track.set_result(t)

    sdp = await offer_sdp(pc)
    token = token or server.token(Role.TRAINEE, session)
    async with http.post(f"{server.base_url}/whep/{session}/{feed}", data=sdp,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        assert response.status == 201, body
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return pc, f"{server.base_url}{location}", track


async def wait_for(check: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``check()`` (returns '' when done, else the reason it is not)."""
    deadline = asyncio.get_running_loop().time() + timeout
    reason = "never checked"
    while asyncio.get_running_loop().time() < deadline:
        reason = check()
        if not reason:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {reason}")


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> int:
    """The first of ``count`` consecutive ports (TCP, or UDP with
    ``socket.SOCK_DGRAM``) nobody uses on loopback now."""
    for _ in range(200):
        first = random.randrange(20000, 60000)
        probes = []
        try:
            for port in range(first, first + count):
                probe = socket.socket(socket.AF_INET, kind)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return first
    raise AssertionError(f"no {count} free consecutive ports")


def live_peer_connections() -> list[RTCPeerConnection]:
    gc.collect()
    return [o for o in gc.get_objects()
            if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"]
