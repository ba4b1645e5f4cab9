"""Noticing, in seconds, peers that went quiet and publishers whose media stopped.

aioice only gives up on a peer after six failed consent checks five seconds
apart (~30 s); a laptop lid closing would leave a frozen picture labelled
"Live" for half a minute. Instead, every datagram a peer sends us (RTP, RTCP,
STUN, DTLS) stamps its :class:`PeerActivity` (``hooks.watch_datagrams``), and
one task per Node looks at the stamps a few times a second:

- a connected peer quiet for ``probe_after_s`` is probed (a STUN binding
  request on its selected pair; a live peer answers at once), so an idle but
  healthy peer, a paused viewer say, is never mistaken for a gone one;
- a connected peer quiet for ``peer_timeout_s`` is gone: its owner's
  ``on_gone`` runs (a publisher's Feeds go down and their grace period starts;
  a viewer's Subscription is closed);
- each watched stream (a Feed) is asked to judge itself (``check(now)``): a
  video Feed with no frame for ``stall_video_s`` while its publisher is still
  connected is *stalled*.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PeerActivity:
    """When we last heard each kind of datagram from one peer (monotonic seconds)."""

    created: float
    rtp: float = 0.0
    rtcp: float = 0.0
    stun: float = 0.0
    dtls: float = 0.0
    clock: Callable[[], float] = time.monotonic

    def heard(self, data: bytes) -> None:
        """Demultiplexed as RFC 7983 does; RTCP by its packet type (RFC 5761)."""
        if not data:
            return
        now = self.clock()
        first = data[0]
        if first < 4:
            self.stun = now
        elif 19 < first < 64:
            self.dtls = now
        elif 127 < first < 192:
            if len(data) > 1 and 192 <= data[1] <= 223:
                self.rtcp = now
            else:
                self.rtp = now

    @property
    def last_heard(self) -> float:
        return max(self.created, self.rtp, self.rtcp, self.stun, self.dtls)

    def describe(self, now: float) -> dict[str, float | None]:
        def ago(t: float) -> float | None:
            return round(now - t, 3) if t else None

        return {"rtp": ago(self.rtp), "rtcp": ago(self.rtcp), "stun": ago(self.stun),
                "dtls": ago(self.dtls)}


@dataclass
class _Peer:
    name: str
    activity: PeerActivity
    connected: Callable[[], bool]
    probe: Callable[[], None]
    on_gone: Callable[[float], None]
    last_probe: float = 0.0
    gone: bool = False


@dataclass
class LivenessStats:
    probes: int = 0
    peers_gone: int = 0
    checks: int = 0


@dataclass
class Liveness:
    """One per Node (a cleanup_ctx runs :meth:`run`); see the module docstring."""

    peer_timeout_s: float = 5.0
    probe_after_s: float = 2.0
    probe_every_s: float = 1.0
    interval_s: float = 0.25
    clock: Callable[[], float] = time.monotonic
    stats: LivenessStats = field(default_factory=LivenessStats)
    _peers: dict[int, _Peer] = field(default_factory=dict)
    _streams: dict[int, Callable[[float], None]] = field(default_factory=dict)
    _next_key: int = 0

    def activity(self) -> PeerActivity:
        return PeerActivity(created=self.clock(), clock=self.clock)

    def watch_peer(self, name: str, activity: PeerActivity, *, connected: Callable[[], bool],
                   probe: Callable[[], None], on_gone: Callable[[float], None]
                   ) -> Callable[[], None]:
        """Judge ``activity`` while ``connected()``; ``on_gone(quiet_s)`` once when
        it has been quiet too long. Returns an unwatch."""
        key = self._key()
        self._peers[key] = _Peer(name, activity, connected, probe, on_gone)

        def unwatch() -> None:
            self._peers.pop(key, None)

        return unwatch

    def watch_stream(self, check: Callable[[float], None]) -> Callable[[], None]:
        """``check(now)`` on every tick (a Feed judging whether it is stalled)."""
        key = self._key()
        self._streams[key] = check

        def unwatch() -> None:
            self._streams.pop(key, None)

        return unwatch

    def _key(self) -> int:
        self._next_key += 1
        return self._next_key

    def tick(self) -> None:
        now = self.clock()
        self.stats.checks += 1
        for key, peer in list(self._peers.items()):
            if peer.gone or not peer.connected():
                continue
            quiet = now - peer.activity.last_heard
            if quiet >= self.peer_timeout_s:
                peer.gone = True
                self._peers.pop(key, None)
                self.stats.peers_gone += 1
                logger.info("peer %s gone: nothing heard for %.1f s (%s)", peer.name, quiet,
                            peer.activity.describe(now))
                self._call(peer.on_gone, quiet)
            elif quiet >= self.probe_after_s and now - peer.last_probe >= self.probe_every_s:
                peer.last_probe = now
                self.stats.probes += 1
                self._call(peer.probe)
        for check in list(self._streams.values()):
            self._call(check, now)

    @staticmethod
    def _call(fn: Callable[..., None], *args: float) -> None:
        try:
            fn(*args)
        except Exception:  # one owner's bug must not stop liveness for the others
            logger.exception("liveness callback failed")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.tick()
