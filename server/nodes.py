"""The Node registry as this Node keeps it: its own record, every Node's.

Each Node writes its ``NodeRecord`` (id, public URL, media addresses and UDP
ports, load) to the shared store every ``cluster.heartbeat_s`` and reads
everyone's back; a Node whose record is older than ``cluster.node_ttl_s`` is
gone. What other parts need from it is narrow: the URL of a Node (routing
pages and WHIP/WHEP clients to the Node that holds a Session), every Node's
origin (the pages' CSP, CORS), and being told when Nodes go.

A node id names one Node across restarts (``server.node_id``, by default
host name and port) and one process at a time: the registry refuses a second
live process under the same id, so a Node restarted after a crash waits until
the record of its previous run has expired (at most ``node_ttl_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from .config import Config
from .errors import ScrubinError
from .store import NodeRecord, NodeStore, StoreUnavailable

logger = logging.getLogger(__name__)

#: Load figures a Node publishes (see ``Nodes``): name -> value.
Load = Callable[[], Mapping[str, float]]


class NodeIdInUse(ScrubinError):
    """Another running process already uses this Node's id (operator's fault)."""

    status = 503
    code = "node_id_in_use"
    fault = "server"


def default_node_id(config: Config) -> str:
    """``server.node_id``, else one that stays the same across restarts on
    this machine: host name and port."""
    if config.server.node_id:
        return config.server.node_id
    return f"{socket.gethostname()}-{config.server.port}"


def origin_of(url: str) -> str | None:
    """scheme://host:port of a Node URL; None for a listening address."""
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname in ("0.0.0.0", "::"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


class Nodes:
    def __init__(
        self,
        store: NodeStore,
        *,
        node_id: str,
        url: str,
        media_addresses: tuple[str, ...] = (),
        udp_ports: str = "",
        heartbeat_s: float = 1.0,
        ttl_s: float = 5.0,
        load: Load | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.url = url.rstrip("/")
        self.instance = secrets.token_hex(8)
        self._store = store
        self._media = media_addresses
        self._udp_ports = udp_ports
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._load = load or (lambda: {})
        self._clock = clock
        self._started_at = clock()
        #: Every live Node as of the last heartbeat (this one included).
        self.known: dict[str, NodeRecord] = {}
        #: Told the ids of Nodes that were in the registry and are gone.
        self.on_gone: list[Callable[[set[str]], None]] = []
        #: Told when the set of Node URLs changed.
        self.on_urls: list[Callable[[], None]] = []
        #: False while another process holds this Node's id.
        self.in_registry = False
        #: Stopping (SIGTERM): said in the registry, so nobody is sent here.
        self.draining = False
        self._task: asyncio.Task[None] | None = None
        self._cpu = (time.process_time(), time.monotonic())

    # -- what others ask ---------------------------------------------------
    def url_of(self, node_id: str) -> str | None:
        if node_id == self.node_id:
            return self.url
        record = self.known.get(node_id)
        return record.url if record is not None else None

    async def lookup(self, node_id: str) -> str | None:
        """A Node's URL, asked of the store now (None: not in the registry);
        routing must not send anyone to a Node that left a second ago."""
        if node_id == self.node_id:
            return self.url
        try:
            record = await self._store.get_node(node_id)
        except StoreUnavailable:
            return self.url_of(node_id)
        return record.url if record is not None else None

    def alive(self, node_id: str) -> bool:
        return node_id == self.node_id or node_id in self.known

    def serving(self) -> list[dict[str, str]]:
        """The Nodes a page may fail over to: every live Node that is not
        draining (this one first, unless it drains), as ``{id, url}``."""
        others = sorted((r for r in self.known.values() if not r.draining),
                        key=lambda r: r.node_id)
        own = [] if self.draining else [{"id": self.node_id, "url": self.url}]
        return own + [{"id": r.node_id, "url": r.url} for r in others]

    def successor(self) -> dict[str, str] | None:
        """Another live Node that is not draining, the least loaded (Sessions
        held, then websockets): where this Node sends its pages and clients
        when it drains. None when there is none."""
        others = [r for r in self.known.values() if not r.draining]
        if not others:
            return None
        best = min(others, key=lambda r: (r.load.get("sessions", 0.0),
                                          r.load.get("websockets", 0.0), r.node_id))
        return {"id": best.node_id, "url": best.url}

    def current_load(self, what: str = "subscriptions") -> dict[str, float]:
        """``what`` of every live Node that takes pages (this one measured now,
        the others as of their last heartbeat; draining ones left out):
        placement compares them."""
        loads = {node_id: float(record.load.get(what, 0.0))
                 for node_id, record in self.known.items() if not record.draining}
        loads[self.node_id] = float(self._load().get(what, 0.0))
        return loads

    def urls(self) -> list[str]:
        """Every live Node's URL, sorted (this one's included)."""
        return sorted({self.url, *(r.url for r in self.known.values())})

    def record(self) -> NodeRecord:
        return NodeRecord(node_id=self.node_id, instance=self.instance, url=self.url,
                          media_addresses=self._media, udp_ports=self._udp_ports,
                          load=self._measure(), started_at=self._started_at,
                          heartbeat_at=self._clock(), draining=self.draining)

    def _measure(self) -> dict[str, float]:
        load = {k: float(v) for k, v in self._load().items()}
        cpu, wall = time.process_time(), time.monotonic()
        last_cpu, last_wall = self._cpu
        if wall - last_wall > 0:
            # Share of one core since the last heartbeat.
            load["cpu"] = round((cpu - last_cpu) / (wall - last_wall), 3)
        self._cpu = (cpu, wall)
        return load

    # -- lifecycle ---------------------------------------------------------
    async def claim(self) -> None:
        """Enter the registry at start. A record of this id from another
        process that stays alive longer than one TTL is a second Node under the
        same id: NodeIdInUse. Redis being down does not stop the Node (the
        heartbeat enters it later)."""
        deadline = time.monotonic() + self.ttl_s + 2 * self.heartbeat_s
        while True:
            try:
                other = await self._store.heartbeat(self.record(), ttl_s=self.ttl_s)
            except StoreUnavailable as exc:
                logger.warning("node registry: not entered yet (%s)", exc.message)
                return
            if other is None:
                self.in_registry = True
                await self.refresh()
                return
            if time.monotonic() > deadline:
                raise NodeIdInUse(
                    f"node id {self.node_id!r} is in use by another running Node (since "
                    f"{time.strftime('%H:%M:%S', time.localtime(other.started_at))}); give "
                    "each Node its own server.node_id")
            logger.info("node registry: waiting for the previous run of %s to expire",
                        self.node_id)
            await asyncio.sleep(self.heartbeat_s / 2)

    async def beat(self) -> None:
        """One heartbeat: write this record, read everyone's."""
        other = await self._store.heartbeat(self.record(), ttl_s=self.ttl_s)
        if other is not None:
            if self.in_registry or not self.known:
                logger.error("node registry: another process runs as %s; this one is not "
                             "in the registry", self.node_id)
            self.in_registry = False
        else:
            self.in_registry = True
        await self.refresh()

    async def refresh(self) -> None:
        records = {r.node_id: r for r in await self._store.list_nodes()}
        records.pop(self.node_id, None)
        gone = set(self.known) - set(records)
        urls_changed = {r.url for r in records.values()} != {
            r.url for r in self.known.values()}
        self.known = records
        if gone:
            logger.info("node registry: %s gone", ", ".join(sorted(gone)))
            for on_gone in list(self.on_gone):
                _call(functools.partial(on_gone, gone))
        if urls_changed:
            for on_urls in list(self.on_urls):
                _call(on_urls)

    async def drain(self) -> None:
        """Say in the registry at once that this Node drains: the other
        Nodes stop sending anyone here (pages' failover lists, successors)."""
        self.draining = True
        with contextlib.suppress(StoreUnavailable):
            await self.beat()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
            except StoreUnavailable:
                pass  # the store logs the outage once; the next beat retries

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.run())

    async def close(self) -> None:
        """Stop beating and leave the registry (best effort: it expires anyway)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.in_registry:
            self.in_registry = False
            with contextlib.suppress(StoreUnavailable):
                await self._store.remove_node(self.node_id, self.instance)


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("node registry: a listener failed")
