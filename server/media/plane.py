"""The media plane's seam: what passes between a Feed and whatever consumes it.

Dependency-free on purpose (standard library only): the recorder, relays to
other Nodes and per-viewer layer selection build on these few names without
importing the server's internals or aiortc.

- :class:`EncodedFrame` is one complete encoded frame on its Feed's timeline.
- An **upstream** (:class:`Upstream`, implemented by ``server.feed.Feed``)
  takes frames in from one publisher and hands them out to downstreams; it
  asks its publisher for keyframes only through its :class:`KeyframePolicy`.
- A **downstream** (:class:`Downstream`) is anything that consumes a Feed: a
  local viewer (``server.subscription.Subscription``), the recorder's writer,
  later a relay to another Node. The Feed never learns what it is.

Isolation rule (docs/architecture.md, "The media seam"): ``deliver`` runs
inside the publisher's packet handler, so it must return at once. A
downstream that raises, blocks past its budget, reports itself gone
(:class:`DownstreamGone`) or keeps falling behind is dropped by the Feed, told
why through :meth:`Downstream.close`, and counted; the Feed, its publisher
and every other downstream carry on. Anything with an asynchronous transport
puts a :class:`FrameQueue` between ``deliver`` and its consumer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

#: Why a downstream stopped receiving (metrics label, websocket ``reason``).
DropReason = Literal[
    "failed",          # deliver raised
    "blocked",         # deliver took longer than its budget
    "behind",          # its queue overflowed again and again
    "transport_gone",  # its transport is closed (DownstreamGone)
    "peer_gone",       # its peer stopped answering (liveness)
    "feed_closed",     # the Feed ended
    "closed",          # its owner closed it (unsubscribe, DELETE, stop)
    "revoked",         # the grant it was made with was revoked
]

#: Where a new downstream starts:
#: - ``cache``: the Feed's last keyframe and what followed (paced), then live;
#:   viewers and relays, so a picture appears at once.
#: - ``keyframe``: the next keyframe from now (asked for through the policy);
#:   the recorder, which must never get media from before it attached.
#: - ``now``: every frame from now on (audio).
Start = Literal["cache", "keyframe", "now"]


class DownstreamGone(Exception):
    """Raised by ``deliver`` when the downstream's transport is gone for good."""


class DownstreamBehind(Exception):
    """Raised by ``deliver`` when the downstream had to discard its backlog;
    ``fatal`` when it keeps happening and the downstream should be dropped."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(slots=True)
class EncodedFrame:
    """One complete encoded frame on its Feed's continuous timeline.

    Every downstream of a Feed receives the same object and only reads it.
    """

    data: bytes
    #: The Feed's continuous RTP timeline (in ``clock_rate`` units).
    pts: int
    keyframe: bool
    #: ``time.monotonic()`` when its last packet arrived.
    received_at: float
    #: ``time.time()`` at the same moment (recordings, the Session clock).
    wall: float = 0.0
    #: RTP payloads, packetized once per Feed for every fast-path viewer.
    payloads: Sequence[bytes] = ()
    #: Whatever container object a consumer needs (an ``av.Packet``), made
    #: once per frame by the Feed and shared.
    packet: Any = None

    @property
    def size(self) -> int:
        return len(self.data)


class Downstream(Protocol):
    """One consumer of one Feed. See the module docstring for the rules."""

    @property
    def downstream_id(self) -> str: ...

    def deliver(self, frame: EncodedFrame) -> None:
        """Take one frame now, without blocking; may raise (the Feed drops it)."""

    def dropped(self, reason: DropReason) -> None:
        """The Feed let go of this downstream (it gets no more frames): clean up."""


class Upstream(Protocol):
    """What a downstream (or its owner) may do with its Feed."""

    id: str
    kind: str

    @property
    def mime_type(self) -> str: ...

    @property
    def clock_rate(self) -> int: ...

    def attach(self, downstream: Downstream, *, start: Start) -> None: ...

    def detach(self, downstream: Downstream, reason: DropReason = "closed") -> None: ...

    def pause(self, downstream: Downstream) -> None: ...

    def resume(self, downstream: Downstream) -> None: ...

    def request_keyframe(self, requester: str) -> bool: ...


@dataclass
class KeyframeStats:
    asked: int = 0       # requests received (joins, PLIs, switches, recorder...)
    sent: int = 0        # requests sent upstream to the publisher
    refused: int = 0     # a requester asking again within its own interval


class KeyframePolicy:
    """Every keyframe request of a Feed goes through here.

    Upstream, at most one request per ``interval_s``; requests arriving in
    between are coalesced into one deferred request at the end of the
    interval, so thirty joins make one or two requests. Per requester (a
    viewer's PLIs, a relay, the recorder), at most one request per
    ``per_requester_s``, so one viewer cannot make the publisher send
    keyframes for everyone every half second.
    """

    #: Bound on remembered requesters (oldest forgotten first).
    MAX_REQUESTERS = 4096

    def __init__(
        self,
        send: Callable[[], bool] | None,
        *,
        interval_s: float,
        per_requester_s: float,
        call_later: Callable[[float, Callable[[], None]], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval_s
        self._per_requester = per_requester_s
        self._call_later = call_later
        self._clock = clock
        self._last_sent = -1e18
        self._deferred: Any = None
        self._requesters: dict[str, float] = {}
        self.stats = KeyframeStats()

    def connect(self, send: Callable[[], bool] | None) -> None:
        """A (new) publisher, or none while the Feed waits for one."""
        self._send = send
        if send is None:
            self.cancel()

    def request(self, requester: str) -> bool:
        """Ask for a keyframe on behalf of ``requester``. True if it will be
        (or was just) sent upstream; False if refused or there is no publisher."""
        self.stats.asked += 1
        now = self._clock()
        last = self._requesters.get(requester)
        if last is not None and now - last < self._per_requester:
            self.stats.refused += 1
            return False
        if self._send is None:
            return False
        self._requesters.pop(requester, None)
        self._requesters[requester] = now
        if len(self._requesters) > self.MAX_REQUESTERS:
            del self._requesters[next(iter(self._requesters))]
        wait = self._last_sent + self._interval - now
        if wait > 0:
            if self._deferred is None:
                self._deferred = self._call_later(wait, self._fire_deferred)
            return True
        self._fire(now)
        return True

    def forget(self, requester: str) -> None:
        self._requesters.pop(requester, None)

    def _fire_deferred(self) -> None:
        self._deferred = None
        if self._send is not None:
            self._fire(self._clock())

    def _fire(self, now: float) -> None:
        self._last_sent = now
        if self._send is not None and self._send():
            self.stats.sent += 1

    def cancel(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None


@dataclass
class QueueStats:
    overflows: int = 0
    frames_discarded: int = 0


@dataclass
class FrameQueue:
    """A bounded queue between ``deliver`` and an asynchronous consumer.

    When it is full the backlog is discarded and the queue waits for the next
    keyframe (video) instead of growing: the consumer is told by
    :class:`DownstreamBehind` raised from :meth:`put`, which the Feed counts
    and answers with a keyframe request. A consumer that overflows
    ``max_overflows`` times within ``window_s`` is dropped as ``behind``.
    """

    max_frames: int
    video: bool
    max_overflows: int = 3
    window_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _frames: deque[EncodedFrame] = field(default_factory=deque)
    _needs_keyframe: bool = False
    _overflow_times: deque[float] = field(default_factory=deque)
    stats: QueueStats = field(default_factory=QueueStats)

    def put(self, frame: EncodedFrame) -> None:
        if self._needs_keyframe:
            if not frame.keyframe:
                return
            self._needs_keyframe = False
        elif self.video and frame.keyframe and len(self._frames) > 2:
            # Behind by more than a couple of frames: a keyframe lets the
            # consumer skip the backlog instead of us buffering it.
            self.stats.frames_discarded += len(self._frames)
            self._frames.clear()
        if len(self._frames) >= self.max_frames:
            self.stats.overflows += 1
            self.stats.frames_discarded += len(self._frames)
            self._frames.clear()
            now = self.clock()
            self._overflow_times.append(now)
            while self._overflow_times and now - self._overflow_times[0] > self.window_s:
                self._overflow_times.popleft()
            if len(self._overflow_times) >= self.max_overflows:
                raise DownstreamBehind(f"overflowed {len(self._overflow_times)} times in "
                                       f"{self.window_s:g} s", fatal=True)
            self._needs_keyframe = self.video
            raise DownstreamBehind(f"queue of {self.max_frames} frames overflowed")
        self._frames.append(frame)

    def extend(self, frames: Sequence[EncodedFrame]) -> None:
        """Start from cached frames (a keyframe first)."""
        self._frames.extend(frames)
        if frames and frames[0].keyframe:
            self._needs_keyframe = False

    def get(self) -> EncodedFrame | None:
        return self._frames.popleft() if self._frames else None

    def clear(self) -> None:
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)
