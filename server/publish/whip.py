"""A WHIP client (RFC 9725) that keeps a slot published across drops.

This is how ``scrubin publish`` and the demo camera reach a Session: the same
HTTP endpoint OBS or a hardware encoder would use. Sources are shared through
a MediaRelay so a reconnect does not stop the camera or file.

Behind a firewall a camera reaches the Node through TURN. Before each attempt
the publisher asks the Node for the ICE servers of its own token (its own
short-lived TURN credentials; ``GET /api/sessions/{session}``, or else the
``Link: rel="ice-server"`` headers of its last answer). aiortc uses one TURN
URL per peer connection, so an attempt that does not connect is followed by
one through the next transport: UDP, then TCP, then TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aioice import Candidate
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from ..media.hooks import advertise_host_addresses, watch_datagrams
from ..media.turn import parse_link_headers, turn_transport

logger = logging.getLogger(__name__)


class IceUnreachable(Exception):
    """This attempt's ICE configuration gave no candidate to offer."""
#: Redirects followed for one offer (RFC 9725 section 4.5: a server may send
#: a client's first POST to another endpoint, e.g. the Node that holds the Session).
MAX_REDIRECTS = 3


async def post_offer(http: aiohttp.ClientSession, url: str, sdp: str, token: str,
                     params: dict[str, str] | None = None
                     ) -> tuple[int, str, str, str, list[str]]:
    """POST an SDP offer; a 307/308 is followed with the same token and body
    (aiohttp would drop the token on a redirect to another host). Returns the
    status, the body, the URL that answered, its ``Location`` and its ``Link``
    headers."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    for _ in range(MAX_REDIRECTS + 1):
        async with http.post(url, data=sdp, headers=headers, params=params,
                             allow_redirects=False) as response:
            body = await response.text()
            target = response.headers.get("Location", "")
            if response.status not in (307, 308) or not target:
                return (response.status, body, url, target,
                        list(response.headers.getall("Link", [])))
        following = urljoin(url, target)
        if urlsplit(following).scheme not in ("http", "https"):
            raise WhipError(response.status, body)
        logger.info("offer to %s redirected to %s", url, following)
        url, params = following, None  # the query came along in the Location
    raise WhipError(response.status, "too many redirects")


class WhipError(Exception):
    """The server refused the publication; ``status`` and body say why."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"WHIP {status}: {body[:300]}")
        self.status = status
        self.body = body
        self.code = ""
        #: The Node the server named instead (a draining Node's ``node``).
        self.node_url: str | None = None
        try:
            data = json.loads(body)
            self.code = str(data.get("code", ""))
            node = data.get("node")
            if isinstance(node, dict) and isinstance(node.get("url"), str):
                self.node_url = node["url"]
        except (ValueError, AttributeError):
            pass

    @property
    def retryable(self) -> bool:
        """Worth trying again later: the server's trouble, or a Session not open yet."""
        return self.status >= 500 or self.status in (409, 429) or self.code == "unknown_session"


def loopback_host_addresses(url: str) -> list[str]:
    """What to advertise when ``url`` reaches the server over loopback.

    aioice never gathers loopback, so a publisher on the server's own machine
    would offer only its LAN addresses, which a server advertising 127.0.0.1
    (the demo) ignores: ICE could never connect without ``--host-address``.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    return [str(address)] if address.is_loopback else []


def candidate_hosts(sdp: str) -> list[str]:
    """The distinct addresses of the ICE candidates in ``sdp``, in order."""
    hosts: list[str] = []
    for line in sdp.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        try:
            host = str(Candidate.from_sdp(line[len("a=candidate:"):].strip()).host)
        except (ValueError, IndexError):
            continue
        if host not in hosts:
            hosts.append(host)
    return hosts


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def explain_ice_failure(local: list[str], remote: list[str]) -> str:
    """Why no candidate pair worked, in words an operator can act on."""
    if not remote:
        # The server drops every offered candidate outside its allowed networks;
        # left with none, aioice gathers none of its own either.
        return (f"ICE failed: the server answered without candidates, as it does when none "
                f"of this machine's addresses ({', '.join(local) or 'none'}) is in its [ice] "
                "allowed_remote_networks; on the server's own machine publish with "
                "--host-address 127.0.0.1")
    why = (f"ICE failed: none of this machine's addresses ({', '.join(local) or 'none'}) "
           f"reached the server's ({', '.join(remote)})")
    if all(_is_loopback(h) for h in remote) and not any(_is_loopback(h) for h in local):
        why += ("; the server advertises only loopback: publish from the server's own "
                "machine (--host-address 127.0.0.1) or set [ice] host_addresses on the "
                "server to an address this machine reaches")
    elif local and all(_is_loopback(h) for h in local) and not any(
            _is_loopback(h) for h in remote):
        why += ("; this machine advertises only loopback but the server is elsewhere: "
                "drop --host-address or give an address the server reaches")
    return why


@dataclass
class WhipOptions:
    #: Used besides the Node's (e.g. a STUN server of the camera's own network).
    ice_servers: list[RTCIceServer] = field(default_factory=list)
    #: Addresses to advertise instead of the interfaces'. Empty: the
    #: interfaces', or loopback when the URL is a loopback or localhost one.
    host_addresses: list[str] = field(default_factory=list)
    #: Restrict video to one codec ("video/H264" for passthrough sources).
    video_codec: str | None = None
    reconnect: bool = True
    min_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    #: Replace another encoder publishing the slot (never the expert's page).
    takeover: bool = False
    #: An attempt that is not connected by then counts as failed; the next
    #: tries the next TURN transport.
    connect_timeout_s: float = 20.0
    #: Ask the Node for this token's ICE servers (TURN credentials) before each attempt.
    server_ice: bool = True
    #: Relayed candidates only: the path a camera behind a firewall would take.
    relay_only: bool = False
    #: Other Nodes of the deployment (base URLs, or WHIP URLs): tried in turn
    #: when the current one does not answer (docs/protocol.md, "Failover").
    fallback_urls: list[str] = field(default_factory=list)
    #: A connected server that sends nothing for this long (no RTCP, no STUN)
    #: is gone: its machine or process died without closing the connection.
    quiet_timeout_s: float = 4.0
    #: Connecting to a Node that does not answer gives up after this long.
    http_connect_timeout_s: float = 3.0


TRANSPORT_ORDER = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class IceAttempt:
    """One peer connection's ICE servers and what to call them in messages."""

    label: str
    servers: list[RTCIceServer]


def ice_attempts(servers: list[RTCIceServer]) -> list[IceAttempt]:
    """The configurations to try in turn: every non-TURN server in each, plus
    one TURN URL (aiortc uses only the first it is given), UDP before TCP
    before TLS, since each step costs more per packet than the one before."""
    base: list[RTCIceServer] = []
    relays: list[tuple[int, str, RTCIceServer]] = []
    for server in servers:
        for url in [server.urls] if isinstance(server.urls, str) else list(server.urls):
            single = RTCIceServer(urls=[url], username=server.username,
                                  credential=server.credential)
            transport = turn_transport(url)
            if transport is None:
                if not url.startswith(("turn:", "turns:")):  # aiortc cannot use the others
                    base.append(single)
            else:
                relays.append((TRANSPORT_ORDER.index(transport), transport, single))
    if not relays:
        return [IceAttempt("direct", base)]
    relays.sort(key=lambda r: r[0])
    return [IceAttempt(f"TURN over {transport}", [*base, relay])
            for _, transport, relay in relays]


def _as_rtc(servers: list[dict[str, object]]) -> list[RTCIceServer]:
    out = []
    for entry in servers:
        urls = entry.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            continue
        username, credential = entry.get("username"), entry.get("credential")
        out.append(RTCIceServer(urls=urls, username=str(username) if username else None,
                                credential=str(credential) if credential else None))
    return out


def on_node(node_url: str, whip_url: str) -> str:
    """``whip_url``'s path on another Node (``node_url``: its base URL, or a
    full WHIP URL, kept as it is)."""
    node = urlsplit(node_url)
    if node.path.rstrip("/").split("/")[-3:-2] == ["whip"]:
        return node_url
    path = urlsplit(whip_url)
    return urlunsplit((node.scheme, node.netloc, node.path.rstrip("/") + path.path,
                       path.query, ""))


def session_api_url(whip_url: str) -> str | None:
    """``…/whip/{session}/{slot}`` → ``…/api/sessions/{session}`` (same prefix)."""
    parts = urlsplit(whip_url)
    segments = parts.path.rstrip("/").split("/")
    if len(segments) < 3 or segments[-3] != "whip":
        return None
    path = "/".join([*segments[:-3], "api", "sessions", segments[-2]])
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class WhipPublisher:
    def __init__(self, url: str, token: str, tracks: list[MediaStreamTrack],
                 options: WhipOptions | None = None) -> None:
        self.url = url
        self.token = token
        self.options = options or WhipOptions()
        #: Every Node to try, in order: the first URL, then the fallbacks.
        self.urls = list(dict.fromkeys(
            [url, *(on_node(u, url) for u in self.options.fallback_urls)]))
        #: When the server last sent us anything (monotonic), while connected.
        self._heard = 0.0
        #: Nodes tried in a row that did not answer.
        self._unanswered = 0
        self._relay = MediaRelay()
        self._sources = tracks
        self._pc: RTCPeerConnection | None = None
        self._resource: str | None = None
        # The last attempt's offer and answer, to explain an ICE failure.
        self._sdp = ("", "")
        self._stopping = asyncio.Event()
        self.host_addresses = self.options.host_addresses or loopback_host_addresses(url)
        self.connections = 0
        self.state = "new"
        #: Why the last attempt ended (empty while live or before any failure).
        self.reason = ""
        #: Seconds until the next attempt, while ``reconnecting``.
        self.retry_in = 0.0
        #: The Node's ICE servers from the last answer's Link headers.
        self._linked: list[RTCIceServer] = []
        #: The ICE configuration of the current (or last) attempt, e.g. "TURN over tcp".
        self.ice_label = ""
        self.on_state: Callable[[str], None] | None = None

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    def describe_state(self) -> str:
        """One line for a terminal: the state, and why and when for a retry."""
        if self.state == "reconnecting":
            return f"reconnecting in {self.retry_in:.1f} s: {self.reason or 'dropped'}"
        if self.state == "refused" and self.reason:
            return f"refused: {self.reason}"
        if self.state in ("connecting", "live") and self.ice_label:
            return f"{self.state} ({self.ice_label})"
        return self.state

    async def node_ice_servers(self, http: aiohttp.ClientSession) -> list[RTCIceServer]:
        """This token's ICE servers, fresh from the Node; the last answer's
        Link headers if it cannot say (not ScrubIn, or unreachable)."""
        url = session_api_url(self.url) if self.options.server_ice else None
        if url is None:
            return list(self._linked)
        try:
            async with http.get(url, headers={"Authorization": f"Bearer {self.token}"},
                                timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status == 200:
                    body = await response.json()
                    return _as_rtc([e for e in body.get("ice_servers", [])
                                    if isinstance(e, dict)])
                logger.info("no ICE servers from %s: HTTP %s", url, response.status)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            logger.info("no ICE servers from %s: %s", url, exc)
        return list(self._linked)

    async def connect(self, http: aiohttp.ClientSession,
                      servers: list[RTCIceServer] | None = None) -> RTCPeerConnection:
        """One publication attempt: offer, answer, and the peer connection."""
        policy = (RTCIceTransportPolicy.RELAY if self.options.relay_only
                  else RTCIceTransportPolicy.ALL)
        pc = RTCPeerConnection(RTCConfiguration(
            iceServers=list(self.options.ice_servers if servers is None else servers),
            iceTransportPolicy=policy))
        try:
            for source in self._sources:
                transceiver = pc.addTransceiver(
                    self._relay.subscribe(source, buffered=False), direction="sendonly")
                if source.kind == "video" and self.options.video_codec:
                    wanted = self.options.video_codec.lower()
                    caps = RTCRtpSender.getCapabilities("video").codecs
                    transceiver.setCodecPreferences(
                        [c for c in caps if c.mimeType.lower() in (wanted, "video/rtx")])
            if not self.options.relay_only:  # host candidates would defeat the point
                advertise_host_addresses(pc, self.host_addresses)
            await pc.setLocalDescription(await pc.createOffer())
            self._heard = time.monotonic()
            watch_datagrams(pc, self._on_datagram)
            if "a=candidate:" not in pc.localDescription.sdp:
                raise IceUnreachable("no ICE candidate (TURN server unreachable?)")
            params = {"takeover": "1"} if self.options.takeover else None
            status, body, answered, location, links = await post_offer(
                http, self.url, pc.localDescription.sdp, self.token, params)
            if status != 201:
                raise WhipError(status, body)
            self._linked = _as_rtc(parse_link_headers(links))
            self._resource = urljoin(answered, location) if location else None
            self._sdp = (pc.localDescription.sdp, body)
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        except BaseException:
            await pc.close()
            raise
        self.connections += 1
        return pc

    def _on_datagram(self, data: bytes) -> None:
        self._heard = time.monotonic()

    def _next_url(self) -> bool:
        """The next Node after one that did not answer; True once every Node
        was tried since the last one that did."""
        index = self.urls.index(self.url) if self.url in self.urls else -1
        self.url = self.urls[(index + 1) % len(self.urls)]
        self._unanswered += 1
        return self._unanswered >= len(self.urls)

    async def run(self) -> None:
        """Publish until stop(); reconnect with backoff when anything drops.

        The backoff is reset only by a connection that came up: a server that
        answers every offer but never connects (ICE) is retried ever more
        slowly, and ``reason`` says why each attempt ended. An attempt that
        never connects moves on to the next TURN transport; one that
        connected and later dropped retries the same."""
        backoff = self.options.min_backoff_s
        rung = 0
        self._unanswered = 0
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=self.options.http_connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self._stopping.is_set():
                wait: float | None = None  # None: the backoff
                servers = [*self.options.ice_servers, *await self.node_ice_servers(http)]
                attempts = ice_attempts(servers)
                attempt = attempts[rung % len(attempts)]
                self.ice_label = attempt.label
                connected = False
                try:
                    self._set_state("connecting")
                    pc = self._pc = await self.connect(http, attempt.servers)
                    self._unanswered = 0
                    connected = await self._until_dropped(pc)
                    if connected:
                        backoff = self.options.min_backoff_s
                        # Dropped after being live: at once, the same Node first
                        # (it refuses fast if it is gone, then the next).
                        wait = 0.0
                    elif not self._stopping.is_set() and len(attempts) > 1:
                        rung += 1
                        logger.warning("publish to %s: %s with %s; trying %s next", self.url,
                                       self.reason, attempt.label,
                                       attempts[rung % len(attempts)].label)
                except IceUnreachable as exc:
                    self.reason = f"{exc} with {attempt.label}"
                    logger.warning("publish to %s: %s", self.url, self.reason)
                    rung += 1
                except WhipError as exc:
                    self.reason = f"server answered {exc.status}: {exc.body[:200]}"
                    logger.warning("publish to %s refused: %s", self.url, exc)
                    if not exc.retryable:
                        self._set_state("refused")
                        raise
                    if exc.code == "node_draining":
                        # That Node stops; it names another (else: the next one).
                        if exc.node_url:
                            self.url = on_node(exc.node_url, self.url)
                        else:
                            self._next_url()
                        wait = 0.0
                    elif exc.code == "session_moving":
                        # Its holder went; a Node takes it when the lease expires.
                        wait = min(backoff, 1.0)
                    if exc.code == "slot_taken":
                        # Someone else publishes this slot (the expert took it over):
                        # wait for it to be free instead of fighting for it.
                        self._set_state("waiting")
                        backoff = self.options.max_backoff_s
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self.reason = f"server unreachable: {exc}"
                    logger.warning("server unreachable at %s: %s", self.url, exc)
                    if len(self.urls) > 1 and not self._next_url():
                        wait = 0.1  # another Node, soon; the backoff once all were tried
                finally:
                    await self._teardown(http, abandon=not connected)
                if self._stopping.is_set() or not self.options.reconnect:
                    break
                self.retry_in = backoff if wait is None else wait
                self._set_state("reconnecting")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.retry_in)
                if wait is None:
                    self._unanswered = 0
                    backoff = min(backoff * 2, self.options.max_backoff_s)
        self._set_state("stopped")

    async def _until_dropped(self, pc: RTCPeerConnection) -> bool:
        """Wait until ``pc`` fails, closes or stop() is called; sets ``reason``.
        Returns whether it was ever connected."""
        connected = asyncio.Event()
        gone = asyncio.Event()

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState == "connected":
                self.reason = ""
                connected.set()
                self._set_state("live")
            if pc.connectionState in ("failed", "closed"):
                gone.set()

        async def quiet() -> None:
            # ICE consent would take ~30 s to notice a server that died.
            while True:
                await asyncio.sleep(0.25)
                if (connected.is_set() and pc.connectionState == "connected"
                        and time.monotonic() - self._heard > self.options.quiet_timeout_s):
                    self.reason = (f"nothing from the server for "
                                   f"{self.options.quiet_timeout_s:g} s")
                    gone.set()
                    return

        stop = asyncio.ensure_future(self._stopping.wait())
        dropped = asyncio.ensure_future(gone.wait())
        watcher = asyncio.ensure_future(quiet())
        try:
            done, _ = await asyncio.wait({stop, dropped}, timeout=self.options.connect_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done and not connected.is_set():
                self.reason = (f"not connected after {self.options.connect_timeout_s:g} s "
                               f"(ICE {pc.iceConnectionState})")
                return False
            if not done:
                await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            dropped.cancel()
            watcher.cancel()
        if self._stopping.is_set():
            return connected.is_set()
        if connected.is_set():
            if not self.reason:
                self.reason = "connection lost"
        elif pc.iceConnectionState == "failed":
            offer, answer = self._sdp
            self.reason = explain_ice_failure(candidate_hosts(offer), candidate_hosts(answer))
        else:
            self.reason = f"connection {pc.connectionState} before it came up (DTLS)"
        logger.info("publish to %s: %s", self.url, self.reason)
        return connected.is_set()

    async def _teardown(self, http: aiohttp.ClientSession, *, abandon: bool = False) -> None:
        """``abandon``: the attempt never connected; its resource goes too."""
        pc, self._pc = self._pc, None
        resource, self._resource = self._resource, None
        if resource is not None and (self._stopping.is_set() or abandon):
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.delete(resource, headers={"Authorization": f"Bearer {self.token}"},
                                       timeout=aiohttp.ClientTimeout(total=5)):
                    pass
        if pc is not None:
            await pc.close()

    def stop(self) -> None:
        self._stopping.set()
