"""`scrubin`: serve, demo, publish, links, token, admin-token; theatre, session and
invite (the admin API of a running Node)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCIceServer

from . import admin_cli, logs, recording_cli, workers
from .app import create_app, drain
from .config import Config, ConfigError, load_config
from .http.common import REGISTRY, TOKENS
from .http.guard import NodeRunner
from .links import format_links, session_links
from .nodes import NodeIdInUse
from .resources import DEMO_CONFIG
from .roles import PERSON_ROLES, Role

logger = logging.getLogger("scrubin")


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    return context


async def _start(config: Config, shared_port: int | None = None
                 ) -> tuple[web.AppRunner, web.Application]:
    app = create_app(config)
    runner = NodeRunner(app, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    context = _ssl_context(config)
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=context)
    await site.start()
    if shared_port is not None:
        # A worker: the port every worker listens on too (server/workers.py).
        await web.TCPSite(runner, config.server.host, shared_port, ssl_context=context,
                          reuse_port=True).start()
    return runner, app


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(config: Config, shared_port: int | None = None) -> None:
    runner, app = await _start(config, shared_port)
    if shared_port is not None:
        print(f"ScrubIn worker {config.server.node_id} serving on {config.base_url} and "
              f"port {shared_port}", flush=True)
    else:
        print(f"ScrubIn serving on {config.base_url}", flush=True)
    # No tokens here: this output ends in service logs (docs/security.md).
    for session in app[REGISTRY].sessions.values():
        print(f"Session {session.id} is live. Its links: scrubin links --server "
              f"{config.base_url} --session {session.id} --token <an admin token from "
              "`scrubin admin-token --config FILE`>", flush=True)
    try:
        await _until_signal()
        # Still listening: joins are refused with the Node to use instead,
        # and every page moves there before the listener closes.
        await drain(app)
    finally:
        await runner.cleanup()


async def demo(config: Config, cameras: list[str], width: int, height: int, fps: float,
               state_dir: Path | None = None) -> None:
    from .demo_state import forget_signing_key
    from .publish.sources import open_source
    from .publish.whip import WhipOptions, WhipPublisher

    runner, app = await _start(config)
    session = app[REGISTRY].get(config.sessions[0].id)
    tokens = app[TOKENS]
    stopping = False

    def on_event(event: dict[str, object]) -> None:
        # Ended by its expert or an admin (not by this process stopping): its
        # links must not work again after a restart.
        if event.get("type") == "session_ended" and not stopping and state_dir is not None:
            forget_signing_key(state_dir)

    session.listen(on_event)
    publishers = []
    for index, slot in enumerate(cameras):
        source = open_source("synthetic", label=slot, width=width, height=height, fps=fps,
                             audio=index == 0)
        token = tokens.issue(session.id, Role.EXPERT, name=f"Synthetic {slot} camera")
        publisher = WhipPublisher(f"{config.base_url}/whip/{session.id}/{slot}", token,
                                  source.tracks,
                                  WhipOptions(host_addresses=config.ice.host_addresses))
        publishers.append((publisher, asyncio.ensure_future(publisher.run())))
    for _ in range(100):
        if all(p.state == "live" for p, _ in publishers):
            break
        await asyncio.sleep(0.1)
    links = session_links(session, tokens, config.base_url, config.auth.token_ttl_s)
    print(f"\nScrubIn demo running on {config.base_url} (Ctrl-C to stop)\n", flush=True)
    print(format_links(links), flush=True)
    from .tokens import NODE_WIDE

    admin = tokens.issue(NODE_WIDE, Role.ADMIN, name="Demo admin",
                         ttl_s=config.auth.token_ttl_s)
    print(f"\n  Admin page (schedule sessions, invite people):\n"
          f"    {config.base_url}/admin.html#token={admin}", flush=True)
    print("\nOpen the trainee link in Chromium or Firefox to watch the synthetic theatre camera.",
          flush=True)
    try:
        await _until_signal()
    finally:
        stopping = True
        for publisher, task in publishers:
            publisher.stop()
            with contextlib.suppress(Exception):
                await task
        await runner.cleanup()


async def publish(args: argparse.Namespace) -> int:
    from .publish.passthrough import SourceError
    from .publish.sources import open_source
    from .publish.whip import WhipError, WhipOptions, WhipPublisher

    try:
        source = open_source(args.source, label=args.label or args.url.rstrip("/").split("/")[-1],
                             width=args.width, height=args.height, fps=args.fps,
                             audio=not args.no_audio, passthrough=not args.transcode)
    except SourceError as exc:
        print(f"publish refused: {exc}", file=sys.stderr)
        return 2
    options = WhipOptions(
        ice_servers=[RTCIceServer(urls=u) for u in args.ice_server],
        host_addresses=args.host_address, video_codec=source.video_codec,
        takeover=args.takeover, relay_only=args.relay_only,
        connect_timeout_s=args.connect_timeout, fallback_urls=args.fallback)
    publisher = WhipPublisher(args.url, args.token, source.tracks, options)
    publisher.on_state = lambda _: print(f"publish: {publisher.describe_state()}", flush=True)
    task = asyncio.ensure_future(publisher.run())
    stopper = asyncio.ensure_future(_until_signal())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    publisher.stop()
    stopper.cancel()
    try:
        await task
    except WhipError as exc:
        print(f"publish refused: {exc}", file=sys.stderr)
        return 2
    finally:
        source.close()
    return 0


async def fetch_links(server: str, session: str, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
        f"{server.rstrip('/')}/api/sessions/{session}/links",
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        body = await response.json()
        if response.status != 200:
            print(f"error {response.status}: {body.get('message')}", file=sys.stderr)
            return 2
    print(format_links(body))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """One Node, a worker of a supervisor (--worker i/N), or the supervisor."""
    config = load_config(args.config)
    if args.worker is not None:
        index, count = workers.parse_worker(args.worker)
        asyncio.run(serve(workers.worker_config(config, index, count),
                          shared_port=config.server.port))
        return 0
    count = workers.worker_count(config, args.workers)
    if count == 1:
        asyncio.run(serve(config))
        return 0
    command = workers.worker_command(str(args.config) if args.config else None,
                                     args.log_level)
    return asyncio.run(workers.supervise(command, count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scrubin", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run a Node")
    p_serve.add_argument("--config", type=Path, help="TOML file (see configs/)")
    p_serve.add_argument("--workers", type=int, default=None,
                         help="Node processes on this machine (default: one per core with "
                              "[store].redis_url, one without; see README, \"Ports\")")
    p_serve.add_argument("--worker", default=None, help=argparse.SUPPRESS)

    p_demo = sub.add_parser("demo", help="a Node with a synthetic theatre camera, links printed")
    p_demo.add_argument("--port", type=int, default=None)
    p_demo.add_argument("--cameras", default="room",
                        help="comma-separated demo slots to fill (room,endoscope,…)")
    p_demo.add_argument("--size", default="1280x720")
    p_demo.add_argument("--fps", type=float, default=30)
    p_demo.add_argument("--state-dir", type=Path, default=Path("var"),
                        help="audit trail, recordings and the demo's signing key (default: var)")

    p_pub = sub.add_parser("publish", help="publish a source to a Session slot over WHIP")
    p_pub.add_argument("url", help="WHIP URL, e.g. http://host:8080/whip/SESSION/SLOT")
    p_pub.add_argument("--token", required=True, help="expert bearer token")
    p_pub.add_argument("--source", default="synthetic",
                       help="synthetic | FILE | rtsp://… | v4l2:/dev/videoN")
    p_pub.add_argument("--label", default="")
    p_pub.add_argument("--size", default="1280x720")
    p_pub.add_argument("--fps", type=float, default=30)
    p_pub.add_argument("--no-audio", action="store_true")
    p_pub.add_argument("--transcode", action="store_true",
                       help="decode and re-encode even H.264 sources")
    p_pub.add_argument("--ice-server", action="append", default=[],
                       help="a STUN/TURN URL to use besides the server's (which come with "
                            "this token's own TURN credentials)")
    p_pub.add_argument("--relay-only", action="store_true",
                       help="only through TURN (checks the path a firewalled camera takes)")
    p_pub.add_argument("--connect-timeout", type=float, default=20.0,
                       help="seconds before an attempt that has not connected tries the next "
                            "TURN transport (UDP, then TCP, then TLS)")
    p_pub.add_argument("--host-address", action="append", default=[],
                       help="advertise this address instead of the interfaces' (default: "
                            "loopback when the URL is loopback or localhost)")
    p_pub.add_argument("--fallback", action="append", default=[], metavar="URL",
                       help="another Node of the deployment (its base URL), tried in turn "
                            "when the current one does not answer; repeat for more")
    p_pub.add_argument("--takeover", action="store_true",
                       help="replace another encoder publishing the slot (never the expert's "
                            "own camera)")

    p_links = sub.add_parser("links", help="print page, WHIP and WHEP links of a Session")
    p_links.add_argument("--server", default="http://127.0.0.1:8080")
    p_links.add_argument("--session", required=True)
    p_links.add_argument("--token", required=True, help="expert or admin token of the Session")

    p_token = sub.add_parser("token", help="mint a token with the configured signing key")
    p_token.add_argument("--config", type=Path, required=True)
    p_token.add_argument("--session", required=True,
                         help="a Session id, or '*' (node-wide; role admin only)")
    p_token.add_argument("--role", choices=[r.value for r in Role if r in PERSON_ROLES],
                         required=True)
    p_token.add_argument("--name", default="")
    p_token.add_argument("--ttl", type=float, default=None)

    p_admin = sub.add_parser("admin-token",
                             help="mint a node-wide admin token (theatres, sessions, invites)")
    p_admin.add_argument("--config", type=Path, required=True)
    p_admin.add_argument("--name", default="Admin")
    p_admin.add_argument("--ttl", type=float, default=None)

    admin_cli.add_parsers(sub)
    recording_cli.add_parsers(sub)

    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        if args.command == "serve":
            return _serve(args)
        elif args.command == "demo":
            from .demo_state import signing_key

            state: Path = args.state_dir
            overrides: dict[str, dict[str, Any]] = {
                "server": {"port": args.port} if args.port else {},
                "audit": {"path": str(state / "audit" / "audit.jsonl")},
                "recording": {"root": str(state / "recordings")},
            }
            # SCRUBIN_AUTH_SIGNING_KEYS, when set, wins as for any Node.
            if "SCRUBIN_AUTH_SIGNING_KEYS" not in os.environ:
                overrides["auth"] = {"signing_keys": [signing_key(state)]}
            config = load_config(DEMO_CONFIG, **overrides)
            width, height = (int(v) for v in args.size.lower().split("x"))
            asyncio.run(demo(config, [c.strip() for c in args.cameras.split(",") if c.strip()],
                             width, height, args.fps, state))
        elif args.command == "publish":
            args.width, args.height = (int(v) for v in args.size.lower().split("x"))
            return asyncio.run(publish(args))
        elif args.command == "links":
            return asyncio.run(fetch_links(args.server, args.session, args.token))
        elif args.command in ("token", "admin-token"):
            from .tokens import MAX_LIFETIME_S, NODE_WIDE, TokenAuthority

            config = load_config(args.config)
            if not config.auth.signing_keys:
                print("no [auth].signing_keys configured: tokens would not verify anywhere",
                      file=sys.stderr)
                return 2
            ttl = args.ttl or config.auth.token_ttl_s
            session, role = ((NODE_WIDE, Role.ADMIN) if args.command == "admin-token"
                             else (args.session, Role(args.role)))
            if session == NODE_WIDE and role is not Role.ADMIN:
                print("only admin tokens may be node-wide (--session '*')", file=sys.stderr)
                return 2
            if not 0 < ttl <= MAX_LIFETIME_S:
                print(f"--ttl: 1 to {MAX_LIFETIME_S} seconds", file=sys.stderr)
                return 2
            authority = TokenAuthority(config.auth.signing_keys)
            token = authority.issue(session, role, name=args.name, ttl_s=ttl)
            grant = authority.verify(token)
            # The token on stdout (for a pipe), how to revoke it on stderr.
            print(token)
            print(f"token id {grant.token_id}, expires "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(grant.expires_at))}; "
                  f"revoke it with: scrubin revoke {grant.token_id}", file=sys.stderr)
        elif args.command in admin_cli.COMMANDS:
            return admin_cli.run(args)
        elif args.command in recording_cli.COMMANDS:
            return recording_cli.run(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except NodeIdInUse as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
