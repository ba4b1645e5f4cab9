"""Configuration: one TOML file, environment overrides for secrets and addresses.

Every key can be overridden by ``SCRUBIN_<SECTION>_<KEY>`` (upper case), e.g.
``SCRUBIN_SERVER_PORT=8443`` or ``SCRUBIN_AUTH_SIGNING_KEY=...``. Lists are
comma-separated in the environment; ICE server lists are either URLs
(comma-separated) or, to carry credentials, a JSON array of
``{"urls": [...], "username": ..., "credential": ...}``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .roles import Role


class ConfigError(ValueError):
    """The configuration file or environment is wrong (operator's fault)."""


@dataclass(frozen=True)
class IceServer:
    urls: list[str]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Base URL printed in links; empty means http(s)://host:port.
    public_url: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    node_id: str = ""
    # Bearer token for /metrics; empty serves metrics to loopback callers only.
    metrics_token: str = ""
    # Origins allowed to call WHIP/WHEP from a browser ("*" for any).
    cors_origins: list[str] = field(default_factory=list)
    # Public URLs of the other Nodes of this deployment: pages may open
    # websockets to them (CSP connect-src lists every Node's origin).
    node_urls: list[str] = field(default_factory=list)
    # Reverse proxies (networks) whose X-Forwarded-For / X-Forwarded-Proto are
    # believed; from anyone else those headers are ignored.
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IceConfig:
    # Never defaults to a public STUN server: hospital networks are closed and
    # aiortc would otherwise add Google's.
    # Given to clients (pages, WHIP/WHEP answers), with [turn]'s per-Participant
    # TURN credentials; static accounts here are the same for everyone.
    servers: list[IceServer] = field(default_factory=list)
    # The Node's own peer connections. Empty (the default) means the Node answers
    # only from its host candidates: a client behind a firewall reaches it from
    # its TURN relay, and the Node sends to that relay address directly, on the
    # fast path. A TURN server here makes the Node allocate a relay per peer
    # connection, which costs CPU per packet and is only needed when the Node
    # itself cannot be reached by UDP.
    node_servers: list[IceServer] = field(default_factory=list)
    # Addresses advertised as host candidates instead of the interfaces'
    # (NAT 1:1 announcements; 127.0.0.1 for single-machine use, which aioice
    # would never gather on its own).
    host_addresses: list[str] = field(default_factory=list)
    # Remote candidates outside these networks are ignored; empty = any.
    # mDNS (.local) candidates are always ignored.
    allowed_remote_networks: list[str] = field(default_factory=list)
    # UDP ports the Node's peer connections bind, "first-last" (one per peer
    # connection and local address); empty = ephemeral ports. `scrubin serve
    # --workers N` splits the range into N equal parts, one per worker.
    udp_ports: str = ""


@dataclass(frozen=True)
class TurnConfig:
    """A TURN server (coturn with ``use-auth-secret``) shared by every client;
    each Participant with live media gets credentials of its own
    (server/media/turn.py, docs/deployment.md)."""

    # e.g. ["turn:turn.example:3478?transport=udp", "turn:turn.example:3478?transport=tcp",
    #       "turns:turn.example:443?transport=tcp"]
    urls: list[str] = field(default_factory=list)
    # coturn's static-auth-secret; set it with SCRUBIN_TURN_SECRET.
    secret: str = ""
    # Credentials expire this long after they are handed out, and never after
    # the Participant's token. Connections set up before keep working.
    credential_ttl_s: int = 3600


@dataclass(frozen=True)
class AuthConfig:
    # HS256 keys; the first signs, all verify (rotation). Format "kid:secret".
    signing_keys: list[str] = field(default_factory=list)
    token_ttl_s: int = 12 * 3600
    # Longest life of a device (redeemed) or derived (links) token per Role,
    # seconds; a Role not listed gets token_ttl_s. Never beyond the parent's.
    role_max_ttl_s: dict[str, float] = field(default_factory=dict)
    # Live connections (websockets, WHIP, WHEP) re-check their grant against
    # the store this often, so a revocation whose event was lost still closes
    # them (within 5 s: at most 4).
    recheck_interval_s: float = 2.0


@dataclass(frozen=True)
class MediaConfig:
    # Frames kept per video Feed from its last keyframe, for late joiners.
    keyframe_cache_max_bytes: int = 4 * 1024 * 1024
    keyframe_cache_max_frames: int = 90
    # At most one upstream keyframe request per Feed per interval, however
    # many viewers join.
    keyframe_request_interval_ms: int = 500
    # How long a Feed whose publisher dropped waits for it to come back before
    # its Subscriptions are closed.
    feed_grace_s: float = 30.0
    # Hints to browser publishers: aiortc only sends REMB, which keeps Chrome
    # far below what a theatre camera needs.
    min_bitrate_kbps: int = 1000
    start_bitrate_kbps: int = 1500
    max_bitrate_kbps: int = 4000
    # Per-viewer queue bound in frames; a viewer further behind skips to the
    # next keyframe rather than making the server buffer for it.
    viewer_queue_frames: int = 60
    # Packetize each frame once per Feed and only rewrite RTP headers per viewer
    # (server/media/fastpath.py); off = aiortc's RTCRtpSender per viewer.
    fast_path: bool = True
    # Make a low layer (320x180, 15 fps, 250 kbit/s, same codec) for cameras
    # published with one layer (encoders): decoded once and encoded once per Feed
    # on this Node, ~0.1-0.2 of a core each (docs/performance.md). Browser
    # publishers send their own low layer.
    server_low_layer: bool = False
    # The low layer's bitrate ceiling, whoever makes it (REMB and answer hints
    # hold a publisher to it).
    low_layer_max_kbps: int = 250
    # Per viewer, move between a camera's layers from its own feedback (loss,
    # REMB); off: every viewer gets what it asked for (full unless pinned low).
    adaptive_layers: bool = True


@dataclass(frozen=True)
class LivenessConfig:
    """How quickly quiet peers and stopped media are noticed (server/media/liveness.py)."""

    # A connected peer (publisher or viewer) from which nothing at all (RTP,
    # RTCP, STUN, DTLS) arrives for this long is gone: a publisher's Feeds go
    # down (their grace period starts), a viewer's Subscription is closed.
    peer_timeout_s: float = 5.0
    # Quiet this long, a peer is probed with a STUN binding request each
    # second; a live peer answers at once, so idle is never mistaken for gone.
    probe_after_s: float = 2.0
    # A video Feed with no frame for this long while its publisher is
    # connected is "stalled". Audio: Opus DTX still sends a packet every
    # 400 ms in silence, so only a much longer gap means the microphone
    # stopped; 0 disables the check for that kind.
    stall_video_s: float = 1.5
    stall_audio_s: float = 5.0
    # How often the stamps are looked at.
    check_interval_s: float = 0.25
    # A downstream whose deliver() takes longer than this twice in a row (it
    # runs inside the publisher's receive loop) is dropped.
    downstream_block_ms: float = 200.0
    # Websocket ping interval; a page that does not answer within half of it
    # is gone.
    ws_heartbeat_s: float = 5.0
    # A socket whose hello asked for it gets a `keepalive` message when nothing
    # else was sent to it for this long: pages take 7 s of silence for a Node
    # that vanished, so keep it well below that.
    ws_keepalive_s: float = 2.0


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 64 * 1024
    max_sdp_bytes: int = 32 * 1024
    max_media_sections: int = 4
    ws_max_message_bytes: int = 64 * 1024
    max_feeds_per_session: int = 16
    # Per person: an invite with all its devices, or a root token with what was
    # derived from it (docs/security.md); the name is older than the model.
    max_subscriptions_per_participant: int = 16
    # Failed authentications (401) per client address per minute, counted
    # across Nodes; past it the address's failures get 429 for a minute
    # (tokens that verify still get in: many people behind one NAT).
    auth_failures_per_minute: int = 20
    # Websocket messages per Participant: a burst, refilled at this rate.
    # Past it requests get 429; a client that keeps going is disconnected.
    ws_messages_per_second: float = 20.0
    ws_message_burst: int = 50
    # Devices that may redeem one invite (an invite is one person); an
    # invite's max_uses may be lower, never higher.
    devices_per_invite: int = 3
    # Open websockets per person (an invite, or a root token) on this Node.
    websockets_per_person: int = 8
    # A request's headers must be complete this long after the connection
    # opened or the previous response went out (also the idle keep-alive);
    # its body must be read within body_timeout_s.
    header_timeout_s: float = 5.0
    body_timeout_s: float = 7.0


@dataclass(frozen=True)
class AuditConfig:
    # JSON lines, rotated by size; readable by admins (API and `scrubin audit`).
    path: str = "var/audit/audit.jsonl"
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 20
    # With Redis, each Session's entries are also kept there (every Node's,
    # read as one through the API) for this long after its last entry.
    shared_keep_days: float = 90.0


@dataclass(frozen=True)
class StoreConfig:
    # Empty: in-memory (one Node). redis://host:6379/0 shares live state
    # between Nodes; set it with SCRUBIN_STORE_REDIS_URL.
    redis_url: str = ""
    prefix: str = "scrubin:"
    timeout_s: float = 1.0
    presence_ttl_s: float = 15.0
    presence_interval_s: float = 5.0


@dataclass(frozen=True)
class ClusterConfig:
    """Several Nodes on one Redis (docs/architecture.md, "Sessions across Nodes")."""

    # A Node holds each live Session through a lease it renews every third of
    # this; a Node that stops renewing (it died, or lost Redis) loses it after.
    lease_ttl_s: float = 10.0
    # Each Node writes its record into the Node registry this often; a Node
    # whose record is older than node_ttl_s is gone.
    heartbeat_s: float = 1.0
    node_ttl_s: float = 5.0
    # `scrubin serve` worker processes; 0 = one per core when [store].redis_url
    # is set, else one (workers share state through Redis only).
    workers: int = 0
    # A forwarded websocket request (a page on one Node, its Session held by
    # another) that gets no answer in this time fails with 503.
    request_timeout_s: float = 5.0
    # Edges (docs/architecture.md, "Edges"): a Node serves the trainees whose
    # pages connect to it the media of a Session held by another Node, pulling
    # each Feed once from the holder (WHEP, with a relay token it mints) and
    # fanning it out here. Off: those pages move to the holding Node.
    edges: bool = False
    # An edge keeps pulling a Feed nobody here watches this long (a page
    # reloading, a trainee switching cameras).
    edge_linger_s: float = 10.0
    # Life of the relay tokens an edge mints for its pulls; a pull whose token
    # expires is closed by the holder and made again with a fresh one.
    relay_token_ttl_s: float = 3600.0
    # A trainee's page is sent to the least loaded Node (Subscriptions, from
    # the Node registry) when the Node it reached serves this many more.
    placement_margin: int = 50


@dataclass(frozen=True)
class RecordingConfig:
    """The recorder (server/recordings.py, docs/protocol.md "Recording")."""

    # Recordings, one directory each (random id), plus index.json.
    root: str = "var/recordings"
    # Record every Session from the moment it goes live, or these Sessions only;
    # both need a standing consent record (auto_consent_*).
    auto: bool = False
    auto_sessions: list[str] = field(default_factory=list)
    auto_consent_scope: str = ""  # internal_review | deidentified_reuse
    auto_consent_by: str = ""
    auto_consent_note: str = ""
    # Delete Recordings older than this (0: keep), checked every retention_check_s.
    retention_days: float = 0.0
    retention_check_s: float = 86400.0
    # A Feed's part is cut at the first key frame after this many seconds.
    part_max_s: float = 300.0
    # Lifetime of the signed media and thumbnail URLs the review API mints
    # (60 to 300 s; the player renews them).
    media_url_ttl_s: float = 300.0
    # After a full disk, try this often to write what could not be written
    # (index, final manifests) and to finish the recordings it cut short.
    repair_retry_s: float = 10.0
    # Share the signed-off de-identified exports of Recordings consented for
    # deidentified_reuse with the reviewers of every Session (off: only the
    # Session's own reviewers and admins). The Recordings themselves never are.
    share_deidentified: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """Schedules, invite validity, attendance and certificates of attendance
    (server/schedule.py, server/attendance.py, server/certificates.py)."""

    # A Session without a scheduled end lasts this long (from its scheduled
    # start, its start, or, ad hoc, from when an invite is made).
    default_duration_min: float = 240.0
    # Invites made without a validity are valid until the scheduled end plus this.
    invite_margin_min: float = 120.0
    # Reviewer invites: this long after the scheduled end, never past the
    # recordings' retention (recording.retention_days, when set).
    review_window_days: float = 14.0
    # How often the Node holding a live Session samples who receives its main camera.
    attendance_sample_s: float = 5.0
    # Attendance is kept this long after the Session (days; 0: as long as the
    # recordings, i.e. recording.retention_days, or for ever when that is 0).
    attendance_keep_days: float = 0.0
    # A trainee is confirmed when present for at least this share of the Session.
    certificate_min_share: float = 0.75
    # Public certificate verification: lookups per address and minute.
    verify_per_minute: int = 30


@dataclass(frozen=True)
class DeidentifyConfig:
    """De-identified exports for teaching reuse (recorder/deidentify.py,
    server/deidentified.py, docs/protocol.md "De-identified exports")."""

    # Painted over on every de-identified export, per camera slot: [x, y, width, height]
    # as fractions of the picture, e.g. a patient monitor, the endoscope's on-screen text.
    masks: dict[str, list[list[float]]] = field(default_factory=dict)
    # The cameras that see people: faces are found and blurred on them.
    face_slots: list[str] = field(default_factory=lambda: ["room", "overhead"])
    # Conservative mode (an export's choice; this is its default): on those cameras
    # everything outside the slot's regions of interest is blurred too, since face
    # detectors miss masked, capped and turned-away faces. A slot without regions
    # is blurred whole.
    conservative: bool = False
    keep: dict[str, list[list[float]]] = field(default_factory=dict)
    # The audio Feeds of these slots are the narration, kept when an export asks;
    # any other sound (room microphones, trainees' questions) never is.
    narration_slots: list[str] = field(default_factory=lambda: ["narration"])
    # Who signs an export off after reviewing it in the player: admin and/or reviewer
    # (of the Recording's Session).
    sign_off_roles: list[str] = field(default_factory=lambda: ["admin"])
    # The admin who asked for an export may not sign it off.
    four_eyes: bool = False
    # Face search: pictures searched per second of video, at most this many lines high,
    # profiles too (each a third of the cost: docs/performance.md).
    detect_hz: float = 4.0
    detect_height: int = 360
    profile_faces: bool = True
    # Exports made at once on this Node (each takes about a core), and waiting at most.
    concurrent: int = 1
    queue: int = 8


@dataclass(frozen=True)
class TheatreConfig:
    id: str
    name: str
    slots: list[str]


@dataclass(frozen=True)
class SessionConfig:
    """A Session opened when the server starts (scheduling comes with the admin API)."""

    id: str
    theatre: str
    title: str
    procedure: str = ""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ice: IceConfig = field(default_factory=IceConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deidentify: DeidentifyConfig = field(default_factory=DeidentifyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    theatres: list[TheatreConfig] = field(default_factory=list)
    sessions: list[SessionConfig] = field(default_factory=list)

    def role_caps(self) -> dict[Role, float]:
        """Longest life of a device or derived token, per Role."""
        return {role: float(self.auth.role_max_ttl_s.get(role.value, self.auth.token_ttl_s))
                for role in Role}

    @property
    def base_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        scheme = "https" if self.server.tls_cert else "http"
        return f"{scheme}://{self.server.host}:{self.server.port}"


def udp_port_range(text: str) -> tuple[int, int]:
    """"40000-40999" -> (40000, 40999). ValueError if it is not such a range."""
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise ValueError(f"{text!r} is not a range like 40000-40999") from None
    if not sep or not 1024 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: first-last, within 1024-65535")
    return low, high


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Turn a TOML or environment value into the field's declared type."""
    try:
        if annotation == "int":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if annotation == "float":
            return float(value)
        if annotation == "bool":
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if annotation == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if annotation == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if annotation == "dict[str, float]":
            if isinstance(value, str):
                pairs = [item.partition(":") for item in value.split(",") if item.strip()]
                if any(not sep for _, sep, _ in pairs):
                    raise ValueError
                return {k.strip(): float(v) for k, _, v in pairs}
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): float(v) for k, v in value.items()}
        if annotation == "dict[str, list[list[float]]]":
            # Regions per camera slot; in the environment as JSON.
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): [[float(n) for n in region] for region in v]
                    for k, v in value.items()}
        if annotation == "list[IceServer]":
            if isinstance(value, str) and value.strip().startswith("["):
                value = json.loads(value)  # with credentials
            elif isinstance(value, str):
                return [IceServer(urls=[u.strip()]) for u in value.split(",") if u.strip()]
            servers = []
            for item in value:
                urls = item["urls"]
                urls = [urls] if isinstance(urls, str) else list(urls)
                username, credential = item.get("username"), item.get("credential")
                if not all(isinstance(u, str) for u in urls) or not all(
                        v is None or isinstance(v, str) for v in (username, credential)):
                    raise TypeError
                servers.append(IceServer(urls=urls, username=username, credential=credential))
            return servers
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}") from exc
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _section(cls: type[Any], data: Mapping[str, Any], name: str, env: Mapping[str, str]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for fname, f in known.items():
        env_key = f"SCRUBIN_{name.upper()}_{fname.upper()}"
        if env_key in env:
            kwargs[fname] = _coerce(env[env_key], str(f.type), env_key)
        elif fname in data:
            kwargs[fname] = _coerce(data[fname], str(f.type), f"[{name}].{fname}")
    return cls(**kwargs)


def _validate(config: Config) -> None:
    for net in config.ice.allowed_remote_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"[ice].allowed_remote_networks: {net!r} is not a network") from exc
    if config.ice.udp_ports:
        try:
            udp_port_range(config.ice.udp_ports)
        except ValueError as exc:
            raise ConfigError(f"[ice].udp_ports: {exc}") from exc
    cluster = config.cluster
    if not (0 < cluster.heartbeat_s < cluster.node_ttl_s and cluster.lease_ttl_s >= 3
            and cluster.workers >= 0 and cluster.request_timeout_s > 0):
        raise ConfigError("[cluster]: 0 < heartbeat_s < node_ttl_s, lease_ttl_s ≥ 3 s, "
                          "workers ≥ 0, request_timeout_s > 0")
    if not (0 <= cluster.edge_linger_s <= 600 and 60 <= cluster.relay_token_ttl_s <= 86400
            and cluster.placement_margin >= 1):
        raise ConfigError("[cluster]: 0 ≤ edge_linger_s ≤ 600, 60 ≤ relay_token_ttl_s ≤ "
                          "86400, placement_margin ≥ 1")
    for addr in config.ice.host_addresses:
        try:
            ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ConfigError(f"[ice].host_addresses: {addr!r} is not an IP address") from exc
    for server in [*config.ice.servers, *config.ice.node_servers]:
        for url in server.urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ConfigError(f"[ice]: {url!r} is not a stun:, stuns:, turn: or turns: URL")
    _validate_turn(config.turn)
    for net in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"[server].trusted_proxies: {net!r} is not a network") from exc
    for url in [config.server.public_url, *config.server.node_urls]:
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ConfigError(f"[server]: {url!r} is not an http(s) URL")
    for role, seconds in config.auth.role_max_ttl_s.items():
        if role not in {r.value for r in Role} or not 60 <= seconds <= 30 * 24 * 3600:
            raise ConfigError("[auth].role_max_ttl_s: a Role (expert, trainee, reviewer, "
                              "recorder, admin) and 60 s to 30 days")
    if not 0.1 <= config.auth.recheck_interval_s <= 4.0:
        raise ConfigError("[auth].recheck_interval_s: 0.1 to 4 s (revoked connections close "
                          "within 5 s)")
    for key in config.auth.signing_keys:
        kid, sep, secret = key.partition(":")
        if not sep or not kid or len(secret) < 32:
            raise ConfigError(
                "[auth].signing_keys: each key is 'kid:secret' with ≥ 32 chars of secret"
            )
    limits = config.limits
    if limits.auth_failures_per_minute < 1 or limits.ws_message_burst < 1 or not (
            limits.ws_messages_per_second > 0) or limits.devices_per_invite < 1 or (
            limits.websockets_per_person < 1):
        raise ConfigError("[limits]: auth_failures_per_minute, ws_messages_per_second, "
                          "ws_message_burst, devices_per_invite and websockets_per_person "
                          "must be positive")
    if not (0.5 <= limits.header_timeout_s <= 60 and 0.5 <= limits.body_timeout_s <= 300):
        raise ConfigError("[limits]: header_timeout_s 0.5 to 60 s, body_timeout_s 0.5 to 300 s")
    if bool(config.server.tls_cert) != bool(config.server.tls_key):
        raise ConfigError("[server]: tls_cert and tls_key go together")
    recording = config.recording
    if (recording.auto or recording.auto_sessions) and (
            recording.auto_consent_scope not in ("internal_review", "deidentified_reuse")
            or not recording.auto_consent_by.strip()):
        raise ConfigError("[recording]: automatic recording needs a standing consent: "
                          "auto_consent_scope (internal_review or deidentified_reuse) and "
                          "auto_consent_by")
    if recording.retention_days < 0 or recording.retention_check_s <= 0 or (
            recording.part_max_s <= 0 or not 60 <= recording.media_url_ttl_s <= 300
            or recording.repair_retry_s <= 0):
        raise ConfigError("[recording]: retention_days ≥ 0, retention_check_s, part_max_s and "
                          "repair_retry_s > 0, media_url_ttl_s from 60 to 300")
    _validate_deidentify(config.deidentify)
    training = config.training
    if not (1 <= training.default_duration_min <= 24 * 60
            and 0 <= training.invite_margin_min <= 7 * 24 * 60
            and 0 < training.review_window_days <= 30 and 0.1 <= training.attendance_sample_s <= 60
            and training.attendance_keep_days >= 0 and 0 < training.certificate_min_share <= 1
            and training.verify_per_minute >= 1):
        raise ConfigError("[training]: default_duration_min 1 to 1440, invite_margin_min 0 to "
                          "10080, review_window_days up to 30, attendance_sample_s 0.1 to 60, "
                          "attendance_keep_days ≥ 0, certificate_min_share in (0, 1], "
                          "verify_per_minute ≥ 1")
    liveness = config.liveness
    if not (0 < liveness.probe_after_s < liveness.peer_timeout_s) or (
            liveness.check_interval_s <= 0 or liveness.stall_video_s < 0
            or liveness.stall_audio_s < 0 or liveness.downstream_block_ms <= 0
            or liveness.ws_heartbeat_s <= 0 or not 0 < liveness.ws_keepalive_s <= 5):
        raise ConfigError("[liveness]: 0 < probe_after_s < peer_timeout_s; check_interval_s, "
                          "downstream_block_ms and ws_heartbeat_s > 0; 0 < ws_keepalive_s ≤ 5; "
                          "stall_* ≥ 0")
    seen: set[str] = set()
    for theatre in config.theatres:
        if theatre.id in seen:
            raise ConfigError(f"[[theatres]]: duplicate id {theatre.id!r}")
        seen.add(theatre.id)
    for session in config.sessions:
        if session.theatre not in seen:
            raise ConfigError(f"[[sessions]] {session.id}: no theatre {session.theatre!r}")


def _validate_turn(turn: TurnConfig) -> None:
    from .media.turn import turn_transport

    for url in turn.urls:
        if turn_transport(url) is None:
            raise ConfigError(f"[turn].urls: {url!r} is not a turn: (udp or tcp) or turns: URL")
    if bool(turn.urls) != bool(turn.secret):
        raise ConfigError("[turn]: urls and secret go together (SCRUBIN_TURN_SECRET)")
    if turn.secret and len(turn.secret) < 16:
        raise ConfigError("[turn].secret: at least 16 characters (coturn's static-auth-secret)")
    if not 60 <= turn.credential_ttl_s <= 7 * 86400:
        raise ConfigError("[turn].credential_ttl_s: between 60 s and 7 days")


def _validate_deidentify(deidentify: DeidentifyConfig) -> None:
    for name in ("masks", "keep"):
        for slot, items in getattr(deidentify, name).items():
            for region in items:
                if len(region) != 4 or min(region) < 0 or min(region[2:]) <= 0 or (
                        region[0] + region[2] > 1 + 1e-6 or region[1] + region[3] > 1 + 1e-6):
                    raise ConfigError(f"[deidentify].{name}.{slot}: a region is [x, y, width, "
                                      f"height] as fractions inside the picture, got {region}")
    if not deidentify.sign_off_roles or not set(deidentify.sign_off_roles) <= {"admin",
                                                                                "reviewer"}:
        raise ConfigError("[deidentify].sign_off_roles: admin and/or reviewer")
    if not (0.5 <= deidentify.detect_hz <= 30 and 120 <= deidentify.detect_height <= 2160
            and 1 <= deidentify.concurrent <= 8 and 1 <= deidentify.queue <= 100):
        raise ConfigError("[deidentify]: detect_hz 0.5 to 30, detect_height 120 to 2160, "
                          "concurrent 1 to 8, queue 1 to 100")


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Config:
    """Read ``path`` (TOML), apply ``SCRUBIN_*`` environment overrides, validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    sections = {
        "server": ServerConfig,
        "ice": IceConfig,
        "turn": TurnConfig,
        "auth": AuthConfig,
        "media": MediaConfig,
        "liveness": LivenessConfig,
        "limits": LimitsConfig,
        "audit": AuditConfig,
        "store": StoreConfig,
        "recording": RecordingConfig,
        "cluster": ClusterConfig,
        "deidentify": DeidentifyConfig,
        "training": TrainingConfig,
    }
    unknown = set(data) - set(sections) - {"theatres", "sessions"}
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}")
    kwargs: dict[str, Any] = {
        name: _section(cls, data.get(name, {}), name, env) for name, cls in sections.items()
    }
    theatres = []
    for item in data.get("theatres", []):
        try:
            theatres.append(
                TheatreConfig(id=str(item["id"]), name=str(item.get("name", item["id"])),
                              slots=[str(s) for s in item["slots"]])
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"[[theatres]]: {exc}") from exc
    sessions = []
    for item in data.get("sessions", []):
        try:
            sessions.append(SessionConfig(id=str(item["id"]), theatre=str(item["theatre"]),
                                          title=str(item.get("title", item["id"])),
                                          procedure=str(item.get("procedure", ""))))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"[[sessions]]: {exc}") from exc
    config = Config(theatres=theatres, sessions=sessions, **kwargs)
    _validate(config)
    return config
