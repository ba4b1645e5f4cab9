"""Interop with WHIP/WHEP clients and cameras a hospital already has (issue 17).

Independent stacks, each installed by .ci/install --test:
- GStreamer webrtcbin (Debian: libnice ICE, GStreamer DTLS with an RSA certificate) as a
  WHIP publisher and a WHEP player (tests/interop/gst_client.py, /usr/bin/python3);
- FFmpeg 8's WHIP muxer inside PyAV (tests/interop/ffmpeg_whip.py, its own process);
- a GStreamer RTSP server on loopback as an IP camera, through `scrubin publish`;
- npm whip-whep in Chromium (tests/test_interop_browser.py).

Content is checked where it can be: every frame sent carries the synthetic camera's
frame counter (server/framecode.py), read back from what the other side decoded.
libnice never gathers loopback, so GStreamer runs under a small LD_PRELOAD shim
(tests/interop/lo_only.c, built here with gcc) that shows it `lo` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.feed import Feed
from server.media.plane import DropReason, EncodedFrame
from server.roles import Role

from .conftest import (
    Server,
    client_pc,
    make_config,
    offer_sdp,
    start_server,
    wait_for,
    whep_subscribe,
)
from .interop.media import gray_counters, write_h264, write_y4m
from .test_live_path import CounterReader

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "interop"
SYSTEM_PYTHON = "/usr/bin/python3"
SESSION = "or1-live"


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def lo_only(workdir: Path) -> Path:
    """The loopback shim for libnice, compiled from tests/interop/lo_only.c."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the libnice loopback shim (.ci/install --test)"
    library = workdir / "lo_only.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(library),
                    str(HERE / "lo_only.c"), "-ldl"], check=True)
    return library


@pytest.fixture(scope="module")
def gst_env(lo_only: Path) -> dict[str, str]:
    check = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstWebRTC', '1.0'); "
         "gi.require_version('GstRtspServer', '1.0'); from gi.repository import Gst; "
         "Gst.init(None); assert Gst.ElementFactory.find('webrtcbin'); "
         "assert Gst.ElementFactory.find('x264enc'); assert Gst.ElementFactory.find('nicesrc')"],
        capture_output=True, text=True)
    assert check.returncode == 0, (
        "GStreamer with webrtcbin, libnice, x264 and the RTSP server is needed "
        f"(.ci/install --test installs it): {check.stderr[-500:]}")
    return {"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(lo_only), "GST_DEBUG": "0",
            "HOME": str(lo_only.parent)}


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    """8 s of framecoded 320x240 video for GStreamer to encode and publish."""
    return write_y4m(workdir / "clip.y4m", 8 * 30)


@pytest.fixture
async def node() -> AsyncIterator[Server]:
    srv, runner = await start_server(make_config())
    try:
        yield srv
    finally:
        await runner.cleanup()


class Client:
    """An interop client process and the JSON events it prints."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == name), None)

    async def finish(self, timeout: float = 40) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(
                f"client still running after {timeout}s: {self.events}") from None
        await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await self._reader


async def gst(env: dict[str, str], *args: str) -> Client:
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, str(HERE / "gst_client.py"), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    return Client(process)


@contextlib.asynccontextmanager
async def clients() -> AsyncIterator[list[Client]]:
    started: list[Client] = []
    try:
        yield started
    finally:
        for client in started:
            await client.kill()


def feed_state(server: Server, feed_id: str) -> str:
    feed = server.session().feeds.get(feed_id)
    if feed is None:
        return f"no {feed_id} yet"
    return "" if feed.frames_received >= 10 else f"{feed_id}: {feed.frames_received} frames"


async def published_counters(http: aiohttp.ClientSession, node: Server,
                             minimum: int = 20) -> list[int]:
    """The frame counters an aiortc WHEP viewer decodes from ``room.video``."""
    viewer, _, remote = await whep_subscribe(http, node, "room.video", "video")
    reader = CounterReader(await asyncio.wait_for(remote, 10))
    try:
        await wait_for(lambda: "" if len(reader.counters) >= minimum
                       else f"{len(reader.counters)} counters", timeout=15)
    finally:
        await reader.stop()
        await viewer.close()
    return reader.counters


def increasing(counters: list[int | None]) -> list[int]:
    readable = [c for c in counters if c is not None]
    assert readable, "no readable frame counter"
    assert readable == sorted(readable), readable
    return readable


# -- GStreamer webrtcbin ----------------------------------------------------------

@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_gstreamer_publishes_and_plays(codec: str, node: Server, gst_env: dict[str, str],
                                             clip: Path, workdir: Path,
                                             http: aiohttp.ClientSession) -> None:
    """webrtcbin (RSA DTLS, libnice) publishes over WHIP and plays over WHEP; the H.264
    player asks for Constrained Baseline (42e01f) only, as GStreamer players do."""
    base = f"{node.base_url}"
    async with clients() as started:
        publisher = await gst(gst_env, "publish", f"{base}/whip/{SESSION}/room",
                              node.token(Role.EXPERT), "--codec", codec, "--y4m", str(clip),
                              "--seconds", "8")
        started.append(publisher)
        await wait_for(lambda: feed_state(node, "room.video"), timeout=20)
        feed = node.session().feeds["room.video"]
        assert feed.codec.mimeType.lower() == f"video/{codec}"
        assert "room.audio" in node.session().feeds

        # What it published decodes, in order.
        increasing(await published_counters(http, node))

        # webrtcbin as a WHEP player of the camera slot: picture and sound on one connection.
        out = workdir / f"played-{codec}.gray"
        player = await gst(gst_env, "play", f"{base}/whep/{SESSION}/room",
                           node.token(Role.TRAINEE), "--codec", codec, "--profile", "42e01f",
                           "--audio", "--seconds", "3", "--out", str(out))
        started.append(player)
        assert await player.finish() == 0, player.events
        assert (player.event("status") or {}).get("status") == 201, player.events
        done = player.event("done") or {}
        assert done.get("delete") == 200, player.events
        assert done.get("audio", 0) >= 50, f"{done.get('audio')} Opus frames decoded"
        played = increasing(gray_counters(out))
        assert len(played) >= 30, f"{len(played)} frames decoded by GStreamer"

        assert await publisher.finish() == 0, publisher.events
        assert (publisher.event("done") or {}).get("delete") == 200, publisher.events


async def test_gstreamer_h264_player_in_packetization_mode_0_gets_a_clear_422(
        node: Server, gst_env: dict[str, str], clip: Path) -> None:
    async with clients() as started:
        publisher = await gst(gst_env, "publish", f"{node.base_url}/whip/{SESSION}/room",
                              node.token(Role.EXPERT), "--codec", "h264", "--y4m", str(clip),
                              "--seconds", "8")
        started.append(publisher)
        await wait_for(lambda: feed_state(node, "room.video"), timeout=20)
        # No packetization-mode in the offer: mode 0, which cannot carry FU-A.
        player = await gst(gst_env, "play", f"{node.base_url}/whep/{SESSION}/room.video",
                           node.token(Role.TRAINEE), "--codec", "h264", "--profile", "42e01f",
                           "--packetization-mode", "none", "--seconds", "1")
        started.append(player)
        assert await player.finish() == 3, player.events
        status = player.event("status") or {}
        assert status.get("status") == 422, player.events
        error = json.loads(status["body"])
        assert error["code"] == "h264_packetization_mode"
        assert "packetization-mode=1" in error["message"] and "Constrained Baseline" in \
            error["message"]
        assert "Failed to set" not in error["message"]  # never aiortc's own words
        assert not node.session().subscriptions


async def test_gstreamer_high_profile_publisher_reaches_high_players_only(
        node: Server, gst_env: dict[str, str], clip: Path, workdir: Path,
        http: aiohttp.ClientSession) -> None:
    """A hardware encoder's High profile (no B-frames) is received although aiortc lists
    only Baseline labels; players are matched by what they can decode."""
    async with clients() as started:
        publisher = await gst(gst_env, "publish", f"{node.base_url}/whip/{SESSION}/room",
                              node.token(Role.EXPERT), "--codec", "h264", "--y4m", str(clip),
                              "--h264-profile", "high", "--seconds", "8")
        started.append(publisher)
        await wait_for(lambda: feed_state(node, "room.video"), timeout=20)
        stream = node.session().feeds["room.video"].h264
        assert stream is not None and stream.profile_idc == 100, stream
        answer = (publisher.event("status") or {}).get("sdp", "")
        assert "profile-level-id=64" in answer, "the publisher's own label comes back"

        # aiortc's player offers only Baseline profiles: refused, naming what it needs.
        refused = client_offer_error = None
        viewer = client_pc()
        viewer.addTransceiver("video", direction="recvonly")
        try:
            async with http.post(f"{node.base_url}/whep/{SESSION}/room.video",
                                 data=await offer_sdp(viewer), headers={
                                     "Authorization": f"Bearer {node.token(Role.TRAINEE)}",
                                     "Content-Type": "application/sdp"}) as response:
                refused, client_offer_error = response.status, await response.json()
        finally:
            await viewer.close()
        assert refused == 422 and client_offer_error["code"] == "codec_mismatch"
        assert "High" in client_offer_error["message"]

        out = workdir / "high.gray"
        player = await gst(gst_env, "play", f"{node.base_url}/whep/{SESSION}/room.video",
                           node.token(Role.TRAINEE), "--codec", "h264", "--profile", "64001f",
                           "--seconds", "3", "--out", str(out))
        started.append(player)
        assert await player.finish() == 0, player.events
        played = increasing(gray_counters(out))
        assert len(played) >= 30, f"{len(played)} frames decoded"


# -- FFmpeg's WHIP muxer ----------------------------------------------------------

def make_certificate(directory: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed certificate for FFmpeg (RSA 2048 or ECDSA P-256), via the cryptography
    package the venv already has."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
                else ec.generate_private_key(ec.SECP256R1()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ffmpeg-{kind}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{kind}.crt", directory / f"{kind}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def ffmpeg_whip(url: str, token: str, seconds: float, *options: str
                      ) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "ffmpeg_whip.py"), url, token, str(seconds), *options,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


@pytest.mark.parametrize("certificate", ["rsa", "ecdsa"])
async def test_ffmpeg_whip_muxer_publishes_and_a_42e01f_player_plays_it(
        certificate: str, node: Server, gst_env: dict[str, str], workdir: Path) -> None:
    """FFmpeg offers a=setup:passive: the answer must be active (RFC 8842), and aiortc as
    DTLS client must accept an RSA server. Its Feed is labelled Baseline (42001f) while
    its SPS is constrained, so a Constrained Baseline (42e01f) player gets it."""
    cert, key = make_certificate(workdir, certificate)
    expert = node.token(Role.EXPERT)
    process = await ffmpeg_whip(f"{node.base_url}/whip/{SESSION}/room", expert, 8,
                                f"cert_file={cert}", f"key_file={key}")
    try:
        await wait_for(lambda: feed_state(node, "room.video"), timeout=20)
        feeds = node.session().feeds
        video = feeds["room.video"]
        assert video.codec.mimeType == "video/H264"
        assert video.codec.parameters.get("profile-level-id") == "42001f"
        assert video.h264 is not None and video.h264.constraints & 0x40, video.h264
        assert feeds["room.audio"].codec.mimeType.lower() == "audio/opus"
        assert node.session().ingests  # and its answer said a=setup:active

        out = workdir / f"ffmpeg-{certificate}.gray"
        player = await gst(gst_env, "play", f"{node.base_url}/whep/{SESSION}/room.video",
                           node.token(Role.TRAINEE), "--codec", "h264", "--profile",
                           "42e01f", "--seconds", "3", "--out", str(out))
        try:
            assert await player.finish() == 0, player.events
        finally:
            await player.kill()
        assert (player.event("status") or {}).get("status") == 201, player.events
        played = increasing(gray_counters(out))
        assert len(played) >= 30, f"{len(played)} frames decoded"
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, stderr.decode()[-800:]
        # FFmpeg's DELETE on close found its resource.
        await wait_for(lambda: "" if not node.session().ingests else "still publishing")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- RTSP camera through `scrubin publish` -------------------------------------------

class FrameLog:
    """A downstream of the media seam that notes each frame's arrival and keyframe flag."""

    downstream_id = "test:frame-log"

    def __init__(self) -> None:
        self.frames: list[tuple[float, bool]] = []

    def deliver(self, frame: EncodedFrame) -> None:
        self.frames.append((time.monotonic(), frame.keyframe))

    def dropped(self, reason: DropReason) -> None:
        pass


@contextlib.contextmanager
def rtsp_camera(env: dict[str, str], port: int, clip: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), str(port),
                                str(clip)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "listening"
        yield process
    finally:
        process.kill()
        process.wait()


class Cable:
    """A TCP relay on loopback between `scrubin publish` and the camera: pulling it drops
    the connection and refuses new ones (a cable or switch port gone) while the camera
    keeps encoding, so on return the stream resumes mid-GOP, as real cameras do."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def plug(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def pull(self) -> None:
        assert self._server is not None
        self._server.close()
        for a, b in self._links:
            a.transport.abort()
            b.transport.abort()
        self._links.clear()
        await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.append((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def test_rtsp_camera_drops_and_returns_cleanly(node: Server, gst_env: dict[str, str],
                                                     workdir: Path,
                                                     http: aiohttp.ClientSession) -> None:
    """H.264 from a real RTSP server (GStreamer's) passes through `scrubin publish`; when
    the camera's connection drops and comes back mid-GOP, nothing is forwarded before its
    next keyframe, and the picture is back within a second of its return plus one
    keyframe interval."""
    from aiohttp.test_utils import unused_port

    gop_s = 2.0
    clip = write_h264(workdir / "camera.mp4", 300, gop=int(gop_s * 30))
    port = unused_port()
    env = {k: v for k, v in gst_env.items() if k != "LD_PRELOAD"}  # no ICE here
    scrubin = Path(sys.executable).parent / "scrubin"
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "Debian's ffmpeg is installed by .ci/install --test"
    log = FrameLog()
    viewer = None
    cable = Cable(port)
    with rtsp_camera(env, port, clip):
        # Another client keeps the camera's shared stream running across the drop.
        watcher = await asyncio.create_subprocess_exec(
            ffmpeg, "-nostdin", "-loglevel", "error", "-rtsp_transport", "tcp", "-i",
            f"rtsp://127.0.0.1:{port}/camera", "-f", "null", "-",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await cable.plug()
        publish = await asyncio.create_subprocess_exec(
            str(scrubin), "publish", f"{node.base_url}/whip/{SESSION}/room",
            "--token", node.token(Role.EXPERT), "--source",
            f"rtsp://127.0.0.1:{cable.port}/camera", "--host-address", "127.0.0.1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await wait_for(lambda: feed_state(node, "room.video"), timeout=30)
            feed: Feed = node.session().feeds["room.video"]
            assert feed.codec.mimeType == "video/H264"
            feed.attach(log, start="now")
            viewer, _, remote = await whep_subscribe(http, node, "room.video", "video")
            reader = CounterReader(await asyncio.wait_for(remote, 10))
            await wait_for(lambda: "" if len(reader.counters) >= 15
                           else f"{len(reader.counters)} counters", timeout=15)
            increasing(reader.counters)

            await cable.pull()
            await asyncio.sleep(3.3)  # not a whole number of GOPs: the return is mid-GOP
            before = len(log.frames)
            await cable.plug()
            returned_at = time.monotonic()
            await wait_for(lambda: "" if len(log.frames) > before + 10 else "no frames yet",
                           timeout=15)
            # The first frame after the outage: after the longest silence in the log.
            gaps = [(b[0] - a[0], i + 1) for i, (a, b) in
                    enumerate(itertools.pairwise(log.frames))]
            silence, index = max(gaps)
            assert silence > 2.0, f"no outage seen ({silence:.2f} s)"
            first_at, first_is_key = log.frames[index]
            waited = first_at - returned_at
            print(f"picture back {waited:.2f} s after the camera returned")
            assert first_is_key, "the reopened camera was forwarded before its keyframe"
            assert waited < 1.0 + gop_s + 1.0, f"picture back {waited:.2f} s after return"
            counters_before = len(reader.counters)
            await wait_for(lambda: "" if len(reader.counters) >= counters_before + 15
                           else "viewer decodes nothing after the return", timeout=15)
            assert reader.unreadable <= 2, f"{reader.unreadable} undecodable frames"
            await reader.stop()
        finally:
            if viewer is not None:
                await viewer.close()
            for process in (publish, watcher):
                process.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 10)
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            with contextlib.suppress(AssertionError):
                await cable.pull()


async def test_scrubin_publish_refuses_h264_with_b_frames(workdir: Path) -> None:
    clip = write_h264(workdir / "bframes.mp4", 60, bframes=2, profile="high")
    scrubin = Path(sys.executable).parent / "scrubin"
    result = await asyncio.create_subprocess_exec(
        str(scrubin), "publish", "http://127.0.0.1:9/whip/x/room", "--token", "t",
        "--source", str(clip), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(result.communicate(), 60)
    assert result.returncode == 2
    message = stderr.decode()
    assert "B-frames" in message and "--transcode" in message, message


async def test_ffmpeg_whip_muxer_with_its_own_certificate_cannot_connect(node: Server) -> None:
    """Documented in docs/interop.md: without cert_file/key_file FFmpeg generates an ECDSA
    certificate on P-224, a curve the OpenSSL under aiortc no longer offers in TLS, so the
    handshake fails. If this starts passing, FFmpeg or OpenSSL changed: update the doc."""
    from OpenSSL import SSL

    context = SSL.Context(SSL.DTLS_METHOD)
    assert SSL._lib.SSL_CTX_set1_curves_list(context._context, b"P-224") == 0, (
        "this OpenSSL offers P-224 again: FFmpeg's defaults may work now")
    process = await ffmpeg_whip(f"{node.base_url}/whip/{SESSION}/room",
                                node.token(Role.EXPERT), 2)
    _, stderr = await asyncio.wait_for(process.communicate(), 40)
    assert process.returncode != 0
    assert "DTLS" in stderr.decode(), stderr.decode()[-600:]
    assert not node.session().ingests
