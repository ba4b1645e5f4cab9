"""The one place the application is assembled: ``create_app(config)``.

All state lives under typed AppKeys; each long-lived resource is one
cleanup_ctx. Shutdown order: stop accepting joins, tell every socket it is
going away, then end every Session (closing all peer connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import WSCloseCode, web

from . import attendance
from .audit import JsonlAuditTrail, SharedAudit
from .cluster import Cluster
from .config import Config
from .edge import Edges
from .http import admin, api, exports, guard, preflight, review, revocation, training, whip
from .http.common import (
    ACCEPTING,
    AUDIT,
    AUTH_GUARD,
    CLOCK,
    CLUSTER,
    CONFIG,
    CSP,
    EDGES,
    LIVENESS,
    MESSAGE_RATES,
    METRICS,
    NODE_ID,
    NODES,
    PEERS,
    PENDING_SUBSCRIPTIONS,
    PRESENCE,
    PUBLICATION_WATCHES,
    REGISTRY,
    SHARED_AUDIT,
    SOCKET_GRANTS,
    STORE,
    TOKENS,
    WEBSOCKETS,
    AuthGuard,
    DeploymentOrigins,
    Handler,
    MessageRates,
    errors_middleware,
    forwarded_middleware,
    own_resource_urls,
    security_headers,
)
from .http.review import RECORDINGS
from .http.ws import answer_forwarded, going_away, websocket
from .media.liveness import Liveness
from .media.peers import PeerFactory
from .metrics import Metrics
from .nodes import Nodes, default_node_id
from .registry import Registry
from .resources import CLIENT_DIR
from .session import Session
from .store import MemoryState, Presence, open_store
from .tokens import Grant, TokenAuthority

logger = logging.getLogger(__name__)

#: How long a draining Node waits for its pages to move (docs/architecture.md, "Drain").
DRAIN_GRACE_S = 3.0
#: Sockets their Session did not send away by then are told directly.
DRAIN_NUDGE_S = 0.5

PAGES = ("index", "broadcast", "watch", "admin", "join", "library", "player", "preflight",
         "verify")


def create_app(config: Config, *, clock: Callable[[], float] | None = None) -> web.Application:
    """``clock`` (epoch seconds, the wall clock by default) is where token
    expiry, invite validity and the store's deadlines read the time: tests
    move it instead of sleeping."""
    app = web.Application(
        middlewares=[forwarded_middleware(config.server.trusted_proxies), security_headers,
                     errors_middleware, own_resource_urls],
        client_max_size=config.limits.max_body_bytes,
        handler_args=guard.handler_args(config),
    )
    node_id = default_node_id(config)
    live = config.liveness
    liveness = app[LIVENESS] = Liveness(
        peer_timeout_s=live.peer_timeout_s, probe_after_s=live.probe_after_s,
        interval_s=live.check_interval_s)
    peers = PeerFactory(config.ice, liveness, config.turn)
    app[CONFIG] = config
    origins = app[CSP] = DeploymentOrigins(config)
    app[NODE_ID] = node_id
    app[PEERS] = peers
    app[CLOCK] = clock or time.time
    app[TOKENS] = TokenAuthority(config.auth.signing_keys, config.role_caps(),
                                 clock=app[CLOCK])
    app[WEBSOCKETS] = weakref.WeakSet()
    app[SOCKET_GRANTS] = weakref.WeakKeyDictionary()
    app[ACCEPTING] = {"joins": True}
    app[PENDING_SUBSCRIPTIONS] = Counter()
    watches: set[asyncio.Task[None]] = set()
    app[PUBLICATION_WATCHES] = watches
    # An injected clock moves the memory store's wall clock (invites,
    # revocations) but not its monotonic one (leases, presence, heartbeats).
    memory = MemoryState(wall=clock) if clock is not None else None
    store = app[STORE] = open_store(config.store.redis_url or None, node_id=node_id,
                                    prefix=config.store.prefix, timeout_s=config.store.timeout_s,
                                    memory=memory, clock=clock)
    app[PRESENCE] = Presence(store.presence, node_id=node_id, ttl_s=config.store.presence_ttl_s,
                             interval_s=config.store.presence_interval_s)
    app[AUTH_GUARD] = AuthGuard(store.rates, config.limits.auth_failures_per_minute)
    app[MESSAGE_RATES] = MessageRates(config.limits.ws_messages_per_second,
                                      config.limits.ws_message_burst)
    nodes = app[NODES] = Nodes(
        store.nodes, node_id=node_id, url=config.base_url,
        media_addresses=tuple(config.ice.host_addresses), udp_ports=config.ice.udp_ports,
        heartbeat_s=config.cluster.heartbeat_s, ttl_s=config.cluster.node_ttl_s,
        load=lambda: _load(app))
    nodes.on_urls.append(lambda: origins.update(nodes.urls()))
    registry = app[REGISTRY] = Registry(config, peers, node_id, store, node_url=nodes.lookup)
    metrics = app[METRICS] = Metrics()
    metrics.watch(registry)
    audit = app[AUDIT] = JsonlAuditTrail(config.audit.path, node_id=node_id,
                                         max_bytes=config.audit.max_bytes,
                                         backups=config.audit.backups)
    if store.kind != "memory":
        shared = app[SHARED_AUDIT] = SharedAudit(
            store.audit, keep_s=config.audit.shared_keep_days * 86400)
        audit.forward = shared.add
    registry.on_session = lambda session, state: audit.record(
        "session_moved" if session.moved else f"session_{state}", session=session.id,
        theatre=session.theatre.id, title=session.title)
    registry.on_first_frame = metrics.first_frame.observe
    registry.on_media_count = metrics.count_media
    registry.watch_stream = liveness.watch_stream

    app.add_routes(api.routes)
    app.add_routes(admin.routes)
    app.add_routes(whip.routes)
    app.add_routes(training.routes)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/", _page("index"))
    for page in PAGES:
        app.router.add_get(f"/{page}.html", _page(page))
    for folder in ("js", "css"):
        if (CLIENT_DIR / folder).is_dir():
            app.router.add_static(f"/{folder}", CLIENT_DIR / folder, follow_symlinks=False)

    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_liveness)
    # Before _sessions: cleanup runs in reverse, so Sessions end before the store closes.
    app.cleanup_ctx.append(_store)
    # Before _sessions: publications closed by Sessions ending are audited first.
    app.cleanup_ctx.append(_publication_watches)
    # Before _cluster: its stand-ins closing end the edges' media copies first.
    app.cleanup_ctx.append(_edges)
    app.cleanup_ctx.append(_cluster)
    app.cleanup_ctx.append(_sessions)
    review.setup(app)  # recording control, review API, retention (after _sessions)
    exports.setup(app)  # de-identified exports (after the review API: its Recordings)
    revocation.setup(app)  # revocations reach live connections
    preflight.setup(app)  # connection checks for participants' networks
    _cluster_setup(app)  # the live state of Sessions across Nodes
    # Attendance of the Sessions held here (after the cluster: it sees every
    # Participant the cluster joins to them).
    attendance.setup(app, store=lambda: app[STORE], clock=app[CLOCK])
    # Last: the configured Sessions go live once every hook is in place.
    app.cleanup_ctx.append(_configured_sessions)
    app.on_shutdown.append(_going_away)
    return app


def _cluster_setup(app: web.Application) -> None:
    """Hubs for the Sessions held here, stand-ins for those held elsewhere
    (server/cluster.py), hooked into the registry after the other hooks."""
    config, registry, nodes = app[CONFIG], app[REGISTRY], app[NODES]

    async def answer(session: Session, grant: Grant, message: dict[str, Any]
                     ) -> dict[str, Any]:
        return await answer_forwarded(app, session, grant, message)

    cluster = app[CLUSTER] = Cluster(
        app[STORE], node_id=nodes.node_id, answer=answer, fence=registry.fences.get,
        alive=nodes.alive, recording=lambda session: app[RECORDINGS].status(session),
        timeout_s=config.cluster.request_timeout_s,
        # A safety net for lost events: the presence TTL is soon enough.
        reconcile_s=config.store.presence_ttl_s)
    previous = registry.on_session

    def on_session(session: Session, state: str) -> None:
        if previous is not None:
            previous(session, state)
        cluster.session_changed(session, state)

    registry.on_session = on_session
    if registry.on_event is not None:
        cluster.on_bus_event = registry.on_event
    registry.on_event = cluster.on_event
    nodes.on_gone.append(cluster.nodes_gone)
    edges = app[EDGES] = Edges(config, registry, app[PEERS], app[TOKENS], nodes.node_id)
    cluster.on_remote_closed.append(edges.remote_closed)


async def _edges(app: web.Application) -> AsyncIterator[None]:
    """Relays of Feeds held elsewhere (server/edge.py), with their HTTP client."""
    await app[EDGES].start()
    yield
    await app[EDGES].close()


async def _cluster(app: web.Application) -> AsyncIterator[None]:
    app[CLUSTER].start()
    yield
    # After every Session here ended (its hub says so to the other Nodes).
    await app[CLUSTER].close()


def _load(app: web.Application) -> dict[str, float]:
    """What this Node carries, for the Node registry."""
    sessions = list(app[REGISTRY].sessions.values())
    sockets: weakref.WeakSet[Any] = app[WEBSOCKETS]
    edges = app.get(EDGES)
    # Relayed Feeds and their viewers count as much as local ones: placement
    # (server/http/ws.py) compares Nodes by subscriptions.
    return {"sessions": len(sessions),
            "websockets": len([ws for ws in list(sockets) if not ws.closed]),
            "feeds": sum(len(s.feeds) for s in sessions)
            + (edges.feeds() if edges is not None else 0),
            "subscriptions": sum(len(s.subscriptions) for s in sessions)
            + (edges.subscriptions() if edges is not None else 0)}


def _page(name: str) -> Handler:
    path = CLIENT_DIR / f"{name}.html"

    async def handler(request: web.Request) -> web.StreamResponse:
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

    return handler


async def _audit(app: web.Application) -> AsyncIterator[None]:
    app[AUDIT].record("node_started")
    shared = app.get(SHARED_AUDIT)
    if shared is not None:
        shared.start()
    yield
    app[AUDIT].record("node_stopped")
    if shared is not None:
        await shared.close()
    app[AUDIT].close()


async def _liveness(app: web.Application) -> AsyncIterator[None]:
    """One task notices quiet peers and stalled Feeds (server/media/liveness.py)."""
    task = asyncio.ensure_future(app[LIVENESS].run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await app[PEERS].close()


async def _publication_watches(app: web.Application) -> AsyncIterator[None]:
    yield
    # Their peer connections are closed by now: each writes its audit entry at once.
    watches = app[PUBLICATION_WATCHES]
    pending = set(watches)
    if pending:
        _, late = await asyncio.wait(pending, timeout=2)
        for task in late:
            task.cancel()


async def _store(app: web.Application) -> AsyncIterator[None]:
    app[PRESENCE].start()
    nodes = app[NODES]
    # Into the Node registry first (a second process under this id stops
    # here), so Sessions held elsewhere are routed from the start.
    await nodes.claim()
    nodes.start()
    await app[REGISTRY].open()
    yield
    await app[PRESENCE].close()
    await nodes.close()
    await app[STORE].close()


async def _configured_sessions(app: web.Application) -> AsyncIterator[None]:
    await app[REGISTRY].open_configured()
    yield


async def _sessions(app: web.Application) -> AsyncIterator[None]:
    yield
    # Every Session ends with the Node: no peer connection outlives the app.
    await app[REGISTRY].close()


async def drain(app: web.Application, grace_s: float = DRAIN_GRACE_S) -> None:
    """SIGTERM, while the Node still listens: take no new joins (503
    ``node_draining`` naming another Node), say so in the Node registry, give
    every Session held here up at once (leases released; participants told to
    reconnect to another Node), send the pages of Sessions held elsewhere there
    too, then wait up to ``grace_s`` for the sockets to go. The shutdown
    (``runner.cleanup()``) follows."""
    nodes, registry = app[NODES], app[REGISTRY]
    if nodes.draining:
        return
    app[ACCEPTING]["joins"] = False
    await nodes.drain()
    successor = nodes.successor()
    logger.info("draining: joins refused; Sessions and pages move to %s",
                successor["id"] if successor else "no other Node (none is live)")
    app[AUDIT].record("node_draining", successor=successor["id"] if successor else None)
    await registry.hand_over(nodes.successor)
    app[CLUSTER].hand_over()
    started = time.monotonic()
    sockets: weakref.WeakSet[Any] = app[WEBSOCKETS]
    told: set[int] = set()
    while time.monotonic() < started + grace_s:
        open_sockets = [ws for ws in list(sockets) if not ws.closed]
        if not open_sockets:
            break
        if time.monotonic() > started + DRAIN_NUDGE_S:
            # Told through their Session already; a socket still open (one
            # that has not joined yet, say) is told directly.
            for ws in open_sockets:
                if id(ws) not in told:
                    told.add(id(ws))
                    await _send_going_away(app, ws, "this Node is shutting down")
        await asyncio.sleep(0.05)
    logger.info("drained in %.2f s", time.monotonic() - started)


async def _send_going_away(app: web.Application, ws: Any, reason: str) -> None:
    try:
        await ws.send_json(going_away(app, reason))
    except (ConnectionError, RuntimeError):
        pass
    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


async def _going_away(app: web.Application) -> None:
    app[ACCEPTING]["joins"] = False
    # Out of the Node registry first: no Node sends anyone here any more.
    await app[NODES].close()
    sockets: weakref.WeakSet[Any] = app[WEBSOCKETS]
    for ws in list(sockets):
        if ws.closed:
            continue
        await _send_going_away(app, ws, "server is shutting down")
