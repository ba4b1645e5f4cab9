"""/healthz, /readyz and /metrics tell operators the truth."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiortc.mediastreams import VideoStreamTrack

from server.app import create_app
from server.http.common import ACCEPTING, AUDIT
from server.roles import Role

from .conftest import Server, make_config, start_server, wait_for, whep_subscribe, whip_publish


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics")


async def test_health_and_readiness(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.base_url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{server.base_url}/readyz") as response:
        assert response.status == 200
    server.app[ACCEPTING]["joins"] = False
    async with http.get(f"{server.base_url}/readyz") as response:
        assert response.status == 503


async def test_metrics_count_feeds_viewers_first_frames_and_denials(
        server: Server, http: aiohttp.ClientSession) -> None:
    publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    viewer = None
    try:
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        viewer, _, track = await whep_subscribe(http, server, "room.video", "video")
        await asyncio.wait_for(track, 10)
        sub = next(iter(session.subscriptions.values()))
        await wait_for(lambda: "" if sub.frames_forwarded > 3 else "no frames")
        async with http.post(f"{server.base_url}/whep/or1-live/room.video", data="v=0",
                             headers={"Authorization": "Bearer nonsense",
                                      "Content-Type": "application/sdp"}) as response:
            assert response.status == 401
        async with http.get(f"{server.base_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        assert sample(text, 'scrubin_feeds{state="live"}') == 1
        assert sample(text, 'scrubin_subscriptions{state="flowing"}') == 1
        assert sample(text, 'scrubin_sessions{state="live"}') == 1
        assert sample(text, "scrubin_first_frame_seconds_count") == 1
        assert sample(text, "scrubin_frames_forwarded_total") > 3
        assert sample(text, 'scrubin_auth_denials_total{code="token_invalid"}') == 1
        assert sample(text, 'scrubin_join_failures_total{code="token_invalid"}') == 1
    finally:
        await publisher.close()
        if viewer is not None:
            await viewer.close()


async def test_metrics_token_when_configured(http: aiohttp.ClientSession) -> None:
    srv, runner = await start_server(make_config(server={"metrics_token": "m" * 32}))
    try:
        async with http.get(f"{srv.base_url}/metrics") as response:
            assert response.status == 401
        async with http.get(f"{srv.base_url}/metrics",
                            headers={"Authorization": "Bearer " + "m" * 32}) as response:
            assert response.status == 200
            assert "scrubin_sessions" in await response.text()
        # Other routes still want their own tokens.
        async with http.get(f"{srv.base_url}/api/sessions/or1-live",
                            headers={"Authorization": "Bearer " + "m" * 32}) as response:
            assert response.status == 401
        async with http.get(f"{srv.base_url}/api/sessions/or1-live",
                            headers={"Authorization": "Bearer " + srv.token(Role.TRAINEE)}
                            ) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_audit_trail_records_joins_publishing_and_denials(
        server: Server, http: aiohttp.ClientSession) -> None:
    publisher, resource = await whip_publish(http, server, "room", [VideoStreamTrack()])
    try:
        # publish_start is written when the publication's media first flows.
        await wait_for(lambda: "" if any(e["event"] == "publish_start" for e in server.app[
            AUDIT].read()) else "no media yet")
        expert = server.token(Role.EXPERT)
        async with http.delete(resource, headers={"Authorization": f"Bearer {expert}"}) as r:
            assert r.status == 200
        async with http.post(f"{server.base_url}/whip/or1-live/room", data="v=0",
                             headers={"Authorization": f"Bearer {server.token(Role.TRAINEE)}",
                                      "Content-Type": "application/sdp"}) as r:
            assert r.status == 403
        ws = await http.ws_connect(f"{server.base_url}/ws")
        await ws.send_json({"type": "hello", "token": server.token(Role.TRAINEE, name="Dr <b>")})
        assert (await ws.receive_json())["type"] == "welcome"
        await ws.close()
        await wait_for(lambda: "" if any(e["event"] == "leave" for e in server.app[
            AUDIT].read()) else "no leave yet")

        admin = server.token(Role.ADMIN)
        async with http.get(f"{server.base_url}/api/sessions/or1-live/audit",
                            headers={"Authorization": f"Bearer {admin}"}) as r:
            assert r.status == 200
            entries = (await r.json())["entries"]
        events = [e["event"] for e in entries]
        assert events.index("publish_start") < events.index("publish_stop")
        assert "denied" in events and "join" in events and "leave" in events
        join = next(e for e in entries if e["event"] == "join")
        assert join["role"] == "trainee" and join["address"] == "127.0.0.1"
        assert join["name"] == "Dr <b>"  # data, verbatim
        denied = next(e for e in entries if e["event"] == "denied")
        assert denied["code"] == "wrong_role"
        async with http.get(f"{server.base_url}/api/sessions/or1-live/audit",
                            headers={"Authorization": f"Bearer {expert}"}) as r:
            assert r.status == 403
    finally:
        await publisher.close()


async def test_audit_cli_prints_the_trail(server: Server, http: aiohttp.ClientSession) -> None:
    from server.tokens import NODE_WIDE

    publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    try:
        await wait_for(lambda: "" if any(e["event"] == "publish_start" for e in server.app[
            AUDIT].read()) else "no media yet")
        admin = server.tokens.issue(NODE_WIDE, Role.ADMIN, name="Auditor")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "audit", "--server", server.base_url,
            "--token", admin, "--session", "or1-live", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err
        assert b"publish_start" in out and b'"slot": "room"' in out
        trainee = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "audit", "--server", server.base_url,
            "--token", server.token(Role.TRAINEE), "--session", "or1-live",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(trainee.communicate(), 30)
        assert trainee.returncode == 2 and b"403" in err
    finally:
        await publisher.close()


async def test_the_server_serves_https_itself(tmp_path: Path) -> None:
    """Browsers allow cameras only on secure origins: the Node terminates TLS."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from server.cli import _ssl_context

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    config = make_config(server={"tls_cert": str(tmp_path / "cert.pem"),
                                 "tls_key": str(tmp_path / "key.pem")})
    assert config.base_url.startswith("https://")
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.server.port,
                      ssl_context=_ssl_context(config)).start()
    try:
        client_ssl = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        async with aiohttp.ClientSession() as http, http.get(
                f"https://localhost:{config.server.port}/watch.html", ssl=client_ssl) as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                # Plain HTTP to the TLS port is not served.
                async with http.get(f"http://127.0.0.1:{config.server.port}/healthz") as r:
                    await r.read()
    finally:
        await runner.cleanup()
