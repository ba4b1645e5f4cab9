"""Connection checks: can this browser and network receive a Session's media?

A trainee opens ``/preflight.html`` from their invite before the Session. The
page connects data-channel-only peer connections to this Node: one directly,
and one through each TURN transport with the relay-only policy; over the
first that works the Node sends a burst of data and the page measures how
fast it arrives (docs/protocol.md, "Connection checks").

Nothing of a Session is touched: it need not be live, an invite is not used
up by a check, and each check's peer connection lives at most
``CHECK_LIFETIME_S``. Checks are bounded per Node and per Participant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from multidict import CIMultiDict

from ..config import Config
from ..errors import Forbidden, TooManyRequests, Unprocessable
from ..media.peers import PeerFactory
from ..media.sdp import check_datachannel_offer
from ..media.turn import link_headers, turn_transport
from ..roles import VIEWERS
from ..tokens import Grant
from .common import CONFIG, PEERS, REGISTRY, audit_grant, authenticate, read_sdp

logger = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: Check peer connections on this Node at once, and per Participant (a page
#: runs one direct and one per TURN transport).
MAX_CHECKS = 16
MAX_CHECKS_PER_PARTICIPANT = 4
CHECK_LIFETIME_S = 60.0
#: One download: at most this much, for at most this long.
MAX_DOWNLOAD_BYTES = 8 * 1024 * 1024
MAX_DOWNLOAD_S = 5.0
#: What a page asks for: two seconds at the highest video bitrate, so the
#: measurement covers more than the first congestion window.
DOWNLOAD_SECONDS = 2.0
CHUNK_BYTES = 16 * 1024
#: The Node keeps at most this much queued in a check's data channel.
BUFFER_HIGH = 1024 * 1024
BUFFER_LOW = 256 * 1024
MAX_MESSAGE = 1024


class Check:
    """One connection check: a peer connection and what it is doing."""

    def __init__(self, participant_id: str, pc: RTCPeerConnection) -> None:
        self.participant_id = participant_id
        self.pc = pc
        self.created = time.monotonic()
        self.tasks: set[asyncio.Task[None]] = set()


class Preflights:
    """This Node's connection checks (closed with the app)."""

    def __init__(self, peers: PeerFactory, config: Config) -> None:
        self._peers = peers
        self._config = config
        self._checks: list[Check] = []
        self._timers: dict[Check, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._checks)

    async def answer(self, grant: Grant, offer: str) -> str:
        """Answer a check's offer: one data channel, served until it closes."""
        limits = self._config.limits
        clean = check_datachannel_offer(offer, max_bytes=limits.max_sdp_bytes,
                                        allowed_networks=self._peers.allowed_networks)
        mine = [c for c in self._checks if c.participant_id == grant.participant_id]
        if len(mine) >= MAX_CHECKS_PER_PARTICIPANT:
            await self._close(mine[0])  # a page checking again replaces its old checks
        elif len(self._checks) >= MAX_CHECKS:
            raise TooManyRequests("too many connection checks on this server right now; "
                                  "try again in a minute", code="preflight_busy")
        pc = self._peers.create()
        check = Check(grant.participant_id, pc)
        self._checks.append(check)
        self._timers[check] = asyncio.get_running_loop().call_later(
            CHECK_LIFETIME_S, lambda: asyncio.ensure_future(self._close(check)))

        @pc.on("datachannel")
        def _channel(channel: RTCDataChannel) -> None:
            _serve(check, channel)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._close(check)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(clean, "offer"))
            self._peers.before_local_description(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises assorted errors on odd offers
            await self._close(check)
            raise Unprocessable(f"offer rejected: {exc}", code="sdp_rejected") from None
        return str(pc.localDescription.sdp)

    async def _close(self, check: Check) -> None:
        if check not in self._checks:
            return
        self._checks.remove(check)
        timer = self._timers.pop(check, None)
        if timer is not None:
            timer.cancel()
        for task in list(check.tasks):
            task.cancel()
        await check.pc.close()

    async def close(self) -> None:
        for check in list(self._checks):
            await self._close(check)


PREFLIGHTS = web.AppKey("preflights", Preflights)


def _serve(check: Check, channel: RTCDataChannel) -> None:
    """``{"type": "ping", "t": …}`` → ``pong``; ``{"type": "download",
    "bytes": n, "seconds": s}`` → binary chunks, then ``done``."""

    @channel.on("message")
    def _message(message: object) -> None:
        if not isinstance(message, str) or len(message) > MAX_MESSAGE:
            return
        with contextlib.suppress(ValueError, RecursionError):
            request = json.loads(message)
            if not isinstance(request, dict):
                return
            if request.get("type") == "ping":
                channel.send(json.dumps({"type": "pong", "t": request.get("t")}))
            elif request.get("type") == "download" and not check.tasks:
                size, seconds = request.get("bytes"), request.get("seconds")
                if not isinstance(size, int) or not isinstance(seconds, (int, float)):
                    return
                task = asyncio.ensure_future(_download(
                    channel, max(0, min(size, MAX_DOWNLOAD_BYTES)),
                    max(0.0, min(float(seconds), MAX_DOWNLOAD_S))))
                check.tasks.add(task)
                task.add_done_callback(check.tasks.discard)


async def _download(channel: RTCDataChannel, size: int, seconds: float) -> None:
    chunk = os.urandom(CHUNK_BYTES)  # incompressible, like video
    drained = asyncio.Event()
    channel.bufferedAmountLowThreshold = BUFFER_LOW
    channel.on("bufferedamountlow", drained.set)
    start = time.monotonic()
    deadline = start + seconds
    sent = 0
    while sent < size and channel.readyState == "open":
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if channel.bufferedAmount > BUFFER_HIGH:
            drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), left)
            continue
        piece = min(CHUNK_BYTES, size - sent)
        channel.send(chunk[:piece])
        sent += piece
        if sent % (16 * CHUNK_BYTES) == 0:
            await asyncio.sleep(0)  # let the transport send
    if channel.readyState == "open":
        channel.send(json.dumps({"type": "done", "bytes": sent,
                                 "seconds": round(time.monotonic() - start, 3)}))


async def _check_grant(request: web.Request) -> Grant:
    # A check is not a use of an invite: a trainee may check with it days before.
    grant = await authenticate(request, redeem=False)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role not in VIEWERS:
        raise Forbidden(f"role {grant.role.value} receives no live media", code="wrong_role")
    return grant


@routes.get("/api/sessions/{session}/preflight")
async def preflight_info(request: web.Request) -> web.Response:
    """What the check page needs: the Session, this token's ICE servers and
    the bitrates the Session's video needs."""
    grant = await _check_grant(request)
    config = request.app[CONFIG]
    ice = request.app[PEERS].ice_servers_for(grant)
    turn = [{"url": url, "transport": transport}
            for server in ice.servers for url in _urls(server)
            if (transport := turn_transport(url)) is not None]
    return web.json_response({
        "session": await request.app[REGISTRY].describe(request.match_info["session"]),
        "participant": {"id": grant.participant_id, "role": grant.role.value,
                        "name": grant.name},
        "ice_servers": ice.servers,
        "turn": turn,
        "video_kbps": {"min": config.media.min_bitrate_kbps,
                       "good": config.media.max_bitrate_kbps},
        "download": {"bytes": min(MAX_DOWNLOAD_BYTES,
                                  int(config.media.max_bitrate_kbps * 125 * DOWNLOAD_SECONDS)),
                     "seconds": MAX_DOWNLOAD_S},
    })


def _urls(server: dict[str, object]) -> list[str]:
    urls = server.get("urls", [])
    return [urls] if isinstance(urls, str) else [str(u) for u in urls]  # type: ignore[attr-defined]


@routes.post("/api/sessions/{session}/preflight")
async def preflight_check(request: web.Request) -> web.Response:
    grant = await _check_grant(request)
    # A Session that exists and has not ended (404, 410), live or not.
    await request.app[REGISTRY].describe(request.match_info["session"])
    offer = await read_sdp(request)
    answer = await request.app[PREFLIGHTS].answer(grant, offer)
    audit_grant(request.app, "preflight", grant, request.remote)
    headers: CIMultiDict[str] = CIMultiDict()
    for link in link_headers(request.app[PEERS].ice_servers_for(grant).servers):
        headers.add("Link", link)
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers=headers)


def setup(app: web.Application) -> None:
    app[PREFLIGHTS] = Preflights(app[PEERS], app[CONFIG])
    app.add_routes(routes)
    app.cleanup_ctx.append(_preflights)


async def _preflights(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[PREFLIGHTS].close()

