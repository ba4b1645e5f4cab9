"""Recordings of a Node: starting and stopping them, the index, review access,
signed media URLs, deletion and retention (docs/protocol.md, "Recording").

One ``Recordings`` per Node (``app[RECORDINGS]``, server/http/review.py). Per
live Session it keeps at most one running :class:`recorder.Recording`,
started by the expert or an admin (websocket ``start_recording`` with a
consent record) or automatically (``[recording] auto`` / ``auto_sessions``,
with the standing consent of the configuration). Every participant is told
whether recording is on (Session event ``recording``, forwarded by each
websocket); ``Session.end()`` awaits the recording's stop. A disk error stops
the Recording, not the Session: the expert's page shows it and the audit trail
has it.

On disk, under ``[recording] root``: one directory per Recording (its random
id; recorder.recording describes the layout, plus ``thumbnail.jpg`` made when
it stops and ``hold.json`` while it is on legal hold) and ``index.json``, a
summary of each, rebuilt from the manifests at start. Files are served only by
id and by names listed in the manifest, never by joining a path from a
request, and never through a symlink.

Several Nodes (a shared store and one recordings root): the recording state
of a live Session (its Recording id, consent, clock zero, the Node writing
it) is in the store (``LiveRecording``) while it is on. When the Session
moves, the Node that lets it go hands the Recording over (its parts closed,
the manifest left ``recording``) and the Node that takes it continues the
same Recording on the same Session clock (``recorder.Recording``,
``resume``), writing the gap in the manifest; a Node that died mid-part
leaves its open part to the next one, which finishes it first. While the
store says a Recording goes on, no Node finishes it as interrupted; an entry
whose Session has ended for good is cleared by the next Node that looks.

Repair: when the Node starts, recordings a crash left unfinished are finished
(recorder.repair: parts remuxed into properly closed copies with their true
durations, state ``interrupted``) before the index is rebuilt. A full disk
that kept the index or a final manifest from being written is retried every
``repair_retry_s`` until space returns.

Deletion, by an admin or by retention, is audited with every file it removed
and its sha256 (computed just before), and checked: the directory must be
gone. A recording on legal hold (admins; ``hold.json``) is never deleted:
retention skips it, a deletion is ``409 legal_hold``. Another Node or a person
may remove files, or the whole recording, while it is being deleted: a file
gone before it was read is not listed, a recording gone before it was removed
is forgotten (``404 unknown_recording``), never counted as deleted here.

Retention sweeps, one Node of a deployment at a time: every Node runs the
loop, but a sweep first takes the retention lease in the store (the Session
leases' mechanism under a name no Session id can have), renewed while it runs
and released after; a Node that finds another holding it skips that pass.
Before sweeping it looks at the root again, so it never deletes what another
Node's sweep already removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import quote

from recorder import Recording, RecordingError, SessionInfo, WriterOptions, deidentified
from recorder.deidentified import EXPORTS
from recorder.export import THUMBNAIL, make_thumbnail
from recorder.recording import EVENTS, MANIFEST, write_atomic
from recorder.repair import RecordingBusy, needs_repair, remove_temporary, repair
from recorder.replay import player_events, read_events
from recorder.writer import sha256_file

from .audit import AuditTrail
from .config import Config
from .errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Unauthorized, Unavailable
from .roles import MODERATORS, Role
from .session import Session
from .store import LeaseStore, LiveRecording, Store, StoreUnavailable
from .tokens import Grant

logger = logging.getLogger(__name__)

#: A Node looks for recordings other Nodes made on the shared root at most this often.
RESCAN_S = 1.0

SCOPES = ("live_only", "internal_review", "deidentified_reuse")
#: Who may review a Recording, beside admins.
REVIEWERS = frozenset({Role.REVIEWER, Role.ADMIN})
RECORDING_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
INDEX = "index.json"
HOLD = "hold.json"
HOLD_REASON_CHARS = 500
#: Websocket requests handled here.
MESSAGE_TYPES = frozenset({"start_recording", "stop_recording"})
CONSENT_FIELDS = {"recorded_by": 200, "recorded_at": 64, "scope": 32, "note": 1000}
#: (playback, recording, part) already in the audit trail, remembered at most.
MEDIA_AUDIT_MEMORY = 20_000
#: Events sent to the player at most (the rest is in events.jsonl).
MAX_EVENTS = 50_000
#: A temporary file in the root older than this is a leftover (a Node's index
#: write takes milliseconds); a younger one may be another Node's write under way.
ROOT_TEMPORARY_AGE_S = 60.0
#: The lease a Node holds in the store while it makes a retention sweep. It lives
#: among the Sessions' leases: the ':' keeps it from ever being a Session id.
RETENTION_LEASE = "recordings:retention"
#: Short, so a Node that dies mid-sweep holds up the next sweep briefly; renewed
#: every third of it while a sweep runs (hashing large parts can take minutes).
RETENTION_LEASE_S = 30.0
#: A sweep that could not ask the store for the lease is tried again this soon.
RETENTION_RETRY_S = 60.0
CONTENT_TYPES = {".webm": "video/webm", ".mp4": "video/mp4", ".mkv": "video/x-matroska"}
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")

LiveState = Literal["on", "off", "failed"]


def check_consent(raw: Any) -> dict[str, str]:
    """The consent record of a ``start_recording``: ``recorded_by``, ``recorded_at``
    (ISO 8601), ``scope``, optional ``note``. ``live_only`` is a 409: that
    consent does not cover recording."""
    if not isinstance(raw, dict):
        raise BadRequest("recording needs a consent record: {recorded_by, recorded_at, scope, "
                         "note?}", code="consent_missing")
    unknown = set(raw) - set(CONSENT_FIELDS)
    if unknown:
        raise BadRequest(f"unknown consent fields {sorted(unknown)}", code="bad_consent")
    out: dict[str, str] = {}
    for name, limit in CONSENT_FIELDS.items():
        value = raw.get(name)
        if name == "note" and (value is None or (isinstance(value, str) and not value.strip())):
            continue
        if not isinstance(value, str) or not _CONTROL.sub("", value).strip():
            raise BadRequest(f"consent.{name} must be a non-empty string", code="bad_consent")
        if len(value) > limit:
            raise BadRequest(f"consent.{name} is longer than {limit} characters",
                             code="bad_consent")
        out[name] = _CONTROL.sub("", value).strip()
    try:
        datetime.datetime.fromisoformat(out["recorded_at"].replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest("consent.recorded_at must be an ISO 8601 date or time",
                         code="bad_consent") from None
    if out["scope"] not in SCOPES:
        raise BadRequest(f"consent.scope must be one of {', '.join(SCOPES)}", code="bad_consent")
    if out["scope"] == "live_only":
        raise Conflict("the consent covers live teaching only: this Session may not be "
                       "recorded", code="consent_scope")
    return out


def _iso_to_unix(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def summarize(manifest: dict[str, Any], *, thumbnail: bool,
              hold: dict[str, Any] | None = None) -> dict[str, Any]:
    """An index entry: what the library lists, from a manifest."""
    session = manifest.get("session") or {}
    consent = manifest.get("consent") or {}
    feeds = [{"id": f.get("id"), "kind": f.get("kind"), "codec": f.get("codec"),
              "parts": len(f.get("parts", []))} for f in manifest.get("feeds", [])]
    return {
        "id": manifest.get("id"),
        "session": session.get("session_id"),
        "theatre": session.get("theatre"),
        "title": session.get("title", ""),
        "procedure": session.get("procedure", ""),
        "expert": session.get("expert", ""),
        "state": manifest.get("state"),
        "started": manifest.get("started"),
        "ended": manifest.get("ended"),
        "started_unix": _iso_to_unix(manifest.get("started")),
        "ended_unix": _iso_to_unix(manifest.get("ended")),
        "started_t": manifest.get("started_t"),
        "duration": manifest.get("duration"),
        "consent_scope": consent.get("scope"),
        "feeds": feeds,
        "thumbnail": thumbnail,
        "errors": len(manifest.get("errors") or []),
        "hold": hold,
    }


@dataclass(frozen=True)
class MediaTicket:
    """What a signed media URL carries: the grant it was issued to (enough to
    check its revocation on every request) and the playback it belongs to."""

    playback: str
    token_ids: tuple[str, ...]
    scope: str
    issued_at: float
    participant: str
    role: str


_EXP = re.compile(r"[0-9]{1,12}", re.ASCII)
_SIG = re.compile(r"[A-Za-z0-9_-]{32}", re.ASCII)
_PLAY = re.compile(r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,64}", re.ASCII)
_GRANT = re.compile(r"[A-Za-z0-9_-]{1,2048}", re.ASCII)


class MediaSigner:
    """Short-lived signed URLs for media elements, which cannot send a bearer
    token. A URL is bound to the viewer's grant (``g``: its lineage, scope and
    ``iat``, checked against revocation on every request) and to one playback
    (``play``); ``sig`` is an HMAC-SHA256 of (recording, file, exp, play, g).
    Parameters are parsed strictly (ASCII digits only, bounded lengths)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_config(cls, config: Config) -> MediaSigner:
        keys = config.auth.signing_keys
        if not keys:
            return cls(secrets.token_bytes(32))
        secret = keys[0].partition(":")[2].encode()
        # A key of its own, derived: a media signature is never a token signature.
        return cls(hmac.new(secret, b"scrubin media url v2", hashlib.sha256).digest())

    def _mac(self, *parts: str) -> str:
        digest = hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).digest()[:24]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def playback(self, recording_id: str, grant: Grant, nonce: str | None = None) -> str:
        """An id for one playback of a Recording by one token (renewing the URLs
        keeps it: one audit entry per playback and part)."""
        nonce = nonce or secrets.token_urlsafe(9)
        return f"{nonce}.{self._mac('playback', recording_id, grant.token_id, nonce)[:16]}"

    def is_playback(self, value: str, recording_id: str, grant: Grant) -> bool:
        if not _PLAY.fullmatch(value):
            return False
        nonce = value.partition(".")[0]
        return hmac.compare_digest(value, self.playback(recording_id, grant, nonce))

    @staticmethod
    def _grant_ref(grant: Grant) -> str:
        ref = [grant.token_scope, grant.issued_at, list(grant.lineage), grant.participant_id,
               grant.role.value]
        raw = json.dumps(ref, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def url(self, recording_id: str, name: str, expires: int, grant: Grant,
            playback: str) -> str:
        ref = self._grant_ref(grant)
        sig = self._mac(recording_id, name, str(expires), playback, ref)
        path = "thumbnail" if name == THUMBNAIL_NAME else f"media/{quote(name, safe='')}"
        return (f"/api/recordings/{recording_id}/{path}?exp={expires}&play={playback}"
                f"&g={ref}&sig={sig}")

    def check(self, recording_id: str, name: str, query: Mapping[str, str],
              now: float | None = None) -> MediaTicket:
        """The ticket of a media URL: 401 ``token_missing``, ``token_invalid``
        (malformed, or signed for another file, recording, expiry, playback or
        grant) or ``token_expired``. Revocation is the caller's next check."""
        exp, sig, play, ref = (query.get(k) for k in ("exp", "sig", "play", "g"))
        if not exp or not sig or not play or not ref:
            raise Unauthorized("media URLs carry exp, play, g and sig; get them from "
                               "GET /api/recordings/{recording}", code="token_missing")
        if not (_EXP.fullmatch(exp) and _SIG.fullmatch(sig) and _PLAY.fullmatch(play)
                and _GRANT.fullmatch(ref)):
            raise Unauthorized("malformed media signature", code="token_invalid")
        expected = self._mac(recording_id, name, exp, play, ref)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise Unauthorized("bad media signature", code="token_invalid")
        if int(exp) < (time.time() if now is None else now):
            raise Unauthorized("this media URL has expired; the player fetches new ones",
                               code="token_expired")
        try:
            scope, issued_at, lineage, participant, role = json.loads(
                base64.urlsafe_b64decode(ref + "=" * (-len(ref) % 4)))
            ticket = MediaTicket(play, tuple(str(t) for t in lineage), str(scope),
                                 float(issued_at), str(participant), str(role))
        except (ValueError, TypeError):
            # Signed by us, so only a bug gets here; still the client's 401.
            raise Unauthorized("malformed media signature", code="token_invalid") from None
        return ticket


#: The signed name of a Recording's thumbnail.
THUMBNAIL_NAME = "thumbnail"


class SeenOnce:
    """Keys seen, the oldest forgotten past ``limit``: "is this the first
    time?" in bounded memory (one audit entry per playback and file, however
    many Range requests a media element makes)."""

    def __init__(self, limit: int = MEDIA_AUDIT_MEMORY) -> None:
        self._seen: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._limit = limit

    def first(self, key: tuple[str, ...]) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True


@dataclass
class _Live:
    """Recording control of one live Session."""

    session: Session
    recording: Recording | None = None
    state: LiveState = "off"
    since: float | None = None
    error: dict[str, Any] | None = None
    unfollow: Callable[[], None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Recordings:
    def __init__(self, config: Config, audit: AuditTrail, *, store: Store | None = None,
                 node_id: str | None = None) -> None:
        self.config = config.recording
        #: The shared store when Sessions can move between Nodes (Redis), else None.
        self._store = store if store is not None and store.kind != "memory" else None
        #: Where the retention lease is taken (any store: one in memory is this Node's own).
        self._leases: LeaseStore | None = store.leases if store is not None else None
        self._lease_node = store.node_id if store is not None else None
        #: Passes of the retention loop so far (made, skipped or put off): when the
        #: one a Node makes as it starts is over.
        self.retention_passes = 0
        self.node_id = node_id or config.server.node_id
        self.root = Path(self.config.root)
        self.audit = audit
        self.signer = MediaSigner.from_config(config)
        self.index: dict[str, dict[str, Any]] = {}
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._manifests: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        self._audited = SeenOnce()
        #: The index on disk is out of date (its last write failed: a full disk).
        self.index_dirty = False
        #: Recordings to finish once the disk lets us: id -> final manifest (or
        #: None: the one on disk).
        self._unfinished: dict[str, dict[str, Any] | None] = {}
        #: Recordings another process is writing (their lock is held).
        self._elsewhere: set[str] = set()
        #: Recordings of live Sessions the store says go on (on whichever Node
        #: holds the Session next): never finished as interrupted here.
        self._resumable: set[str] = set()
        #: The manifest (mtime, size) each listed Recording was summarized from,
        #: and when the root was last looked at (``refresh``).
        self._scanned: dict[str, tuple[int, int]] = {}
        self._refreshed_at = 0.0
        #: Awaited before a Recording is deleted (its id): what else lives in its
        #: directory stops first (a de-identified export being made).
        self.before_delete: list[Callable[[str], Awaitable[None]]] = []

    # -- lifecycle ------------------------------------------------------------
    def open(self) -> None:
        """Create the root; finish what a crash left unfinished; rebuild the index
        from the recordings on disk. (In a thread: it reads and writes files.)"""
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        # Other Nodes sharing the root may be writing the index this moment.
        remove_temporary(self.root, min_age_s=ROOT_TEMPORARY_AGE_S)
        active = self._active_ids()
        self.index = {}
        for child in sorted(self.root.iterdir()):
            if not RECORDING_ID.match(child.name) or child.is_symlink() or not child.is_dir():
                continue
            try:
                manifest = json.loads((child / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("recordings: %s has no readable manifest; not listed", child.name)
                continue
            if manifest.get("id") != child.name:
                continue
            if child.name not in active | self._resumable:
                manifest = self._finish(child, manifest) or manifest
            self.index[child.name] = self._summary(child, manifest)
        self._save_index()

    async def refresh(self, *, missing: str | None = None) -> None:
        """Several Nodes share one recordings root (the same directory on every
        Node, e.g. a shared volume): what other Nodes recorded, finished or
        deleted since this Node last looked is listed here too. At most once a
        second; ``missing``: only if that Recording is not listed here."""
        if missing is not None and missing in self.index:
            return
        now = time.monotonic()
        if now - self._refreshed_at < RESCAN_S:
            return
        self._refreshed_at = now
        await self.load_resumable()
        await asyncio.to_thread(self.rescan)

    async def load_resumable(self) -> None:
        """Which Recordings the store says go on; an entry whose Session has
        ended for good (nobody stopped it: its Node died and no Node took the
        Session again) is cleared, and its Recording finished as usual."""
        if self._store is None:
            return
        try:
            records = await self._store.recordings.list_live_recordings()
            resumable = set()
            for record in records:
                session = await self._store.sessions.get_session(record.session_id)
                if session is None or session.state == "ended":
                    await self._store.recordings.clear_live_recording(record.session_id,
                                                                      record.recording_id)
                    continue
                resumable.add(record.recording_id)
        except StoreUnavailable:
            return  # what we knew stays
        self._resumable = resumable - self._active_ids()

    def rescan(self) -> bool:
        """The root against the index (in a thread: it reads files). A
        recording left unfinished by a Node that died is finished here
        (``interrupted``), one another live Node writes is left alone (its
        lock). True if the index changed."""
        active = self._active_ids()
        seen: set[str] = set()
        changed = False
        try:
            children = sorted(self.root.iterdir())
        except OSError as exc:
            logger.warning("recordings: the root could not be read: %s", exc)
            return False
        for child in children:
            if not RECORDING_ID.match(child.name) or child.is_symlink() or not child.is_dir():
                continue
            seen.add(child.name)
            if child.name in active:
                continue
            if child.name in self._resumable:
                # Goes on when a Node takes its Session: list what is on disk.
                with contextlib.suppress(OSError, ValueError):
                    st = os.stat(child / MANIFEST)
                    key = (st.st_mtime_ns, st.st_size)
                    if self._scanned.get(child.name) == key:
                        continue
                    manifest = json.loads((child / MANIFEST).read_text(encoding="utf-8"))
                    if manifest.get("id") == child.name:
                        self.index[child.name] = self._summary(child, manifest)
                        self._scanned[child.name] = key
                        changed = True
                continue
            try:
                st = os.stat(child / MANIFEST)
                key = (st.st_mtime_ns, st.st_size)
                if self._scanned.get(child.name) == key and child.name in self.index:
                    continue
                manifest = json.loads((child / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being created, or not a recording: not listed
            if manifest.get("id") != child.name:
                continue
            if summarize(manifest, thumbnail=False)["state"] in ("new", "recording",
                                                                  "stopping"):
                manifest = self._finish(child, manifest) or manifest
            self.index[child.name] = self._summary(child, manifest)
            with contextlib.suppress(OSError):
                st = os.stat(child / MANIFEST)
                self._scanned[child.name] = (st.st_mtime_ns, st.st_size)
            changed = True
        for gone in set(self.index) - seen - active:
            # Deleted by another Node.
            del self.index[gone]
            self._scanned.pop(gone, None)
            changed = True
        if changed:
            self._save_index()
        return changed

    def _summary(self, directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        entry = summarize(manifest, thumbnail=(directory / THUMBNAIL).is_file(),
                          hold=_read_hold(directory))
        if entry["state"] in ("new", "recording", "stopping") and \
                directory.name not in self._active_ids() | self._elsewhere | self._resumable:
            entry["state"] = "interrupted"  # not finished yet (the disk refused)
        return entry

    def _finish(self, directory: Path, manifest: dict[str, Any] | None = None
                ) -> dict[str, Any] | None:
        """Repair a recording nothing writes any more (recorder.repair); returns
        its new manifest, or None when it needed nothing or the disk refused (it
        is then tried again every ``repair_retry_s``)."""
        try:
            report = repair(directory, manifest)
        except RecordingBusy:
            # Another process (another Node on the same disk) is recording it.
            logger.info("recording %s: being recorded elsewhere; left alone", directory.name)
            self._elsewhere.add(directory.name)
            return None
        except (OSError, ValueError) as exc:
            logger.error("recording %s: could not be finished yet: %s", directory.name, exc)
            self._unfinished[directory.name] = manifest
            return None
        self._unfinished.pop(directory.name, None)
        self._elsewhere.discard(directory.name)
        if report is None:
            return None
        with contextlib.suppress(Exception):
            if not (directory / THUMBNAIL).is_file():
                make_thumbnail(directory)
        fixed: dict[str, Any] = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        session = (fixed.get("session") or {}).get("session_id")
        self.audit.record("recording_repaired", session=session, recording=directory.name,
                          state=report.state, parts=report.parts, dropped=report.dropped,
                          duration=fixed.get("duration"))
        return fixed

    async def close(self, timeout: float = 15.0) -> None:
        """Let background starts and stops finish (they are bounded), then cancel."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _save_index(self) -> bool:
        data = json.dumps({"recordings": list(self.index.values())}, indent=1,
                          ensure_ascii=False).encode()
        try:
            # Rebuilt from the manifests at start: no fsync needed. Every Node
            # sharing the root writes it.
            write_atomic(self.root / INDEX, data, sync=False, shared=True)
        except OSError as exc:
            if not self.index_dirty:
                logger.warning("recordings: index not written (tried again every %g s): %s",
                               self.config.repair_retry_s, exc)
            self.index_dirty = True
            return False
        if self.index_dirty:
            logger.info("recordings: index written again")
        self.index_dirty = False
        return True

    async def maintain(self) -> None:
        """Finish the recordings a full disk cut short and write the index, if
        the disk lets us now."""
        for recording_id, manifest in list(self._unfinished.items()):
            directory = self.root / recording_id
            if recording_id in self._active_ids() | self._resumable:
                continue
            if directory.is_symlink() or not directory.is_dir():
                logger.warning("recording %s: its directory is gone; not finished",
                               recording_id)
                self._unfinished.pop(recording_id, None)
                continue
            fixed = await asyncio.to_thread(self._finish, directory, manifest)
            if recording_id in self._unfinished:
                continue  # still refused
            if fixed is not None and recording_id in self.index:
                self.index[recording_id] = await asyncio.to_thread(self._summary, directory,
                                                                   fixed)
                self._manifests.pop(recording_id, None)
                self.index_dirty = True
        if self.index_dirty:
            self._save_index()

    async def maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.repair_retry_s)
            try:
                await self.maintain()
            except Exception:
                logger.exception("recordings: maintenance pass failed")

    # -- live Sessions --------------------------------------------------------
    def attach_session(self, session: Session) -> None:
        """A Session went live here: its recording control, and its automatic
        recording if configured."""
        if session.id in self._live and self._live[session.id].session is session:
            return
        self._live[session.id] = _Live(session)
        session.end_hooks.append(lambda: self._session_ended(session))
        auto = None
        if self.config.auto or session.id in self.config.auto_sessions:
            auto = {"recorded_by": self.config.auto_consent_by,
                    "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(
                        timespec="seconds"),
                    "scope": self.config.auto_consent_scope}
            if self.config.auto_consent_note:
                auto["note"] = self.config.auto_consent_note
        if self._store is not None:
            # Taken over from another Node (or this one's previous run)? Its
            # recording goes on here; else the automatic one starts.
            self._spawn(self._take_over(session, auto))
        elif auto is not None:
            self._spawn(self._auto_start(session, auto))

    async def _take_over(self, session: Session, auto: dict[str, str] | None) -> None:
        assert self._store is not None
        try:
            record = await self._store.recordings.get_live_recording(session.id)
        except StoreUnavailable as exc:
            logger.warning("session %s: could not ask whether it was being recorded: %s",
                           session.id, exc.message)
            record = None
        if record is None:
            if auto is not None:
                await self._auto_start(session, auto)
            return
        if session.state != "live":
            return
        # The Session clock the recording is timed on goes on here.
        session.interaction.adopt_clock(record.clock_zero_unix)
        try:
            await self.start(session, dict(record.consent), by=None, resume=record)
        except Exception as exc:
            logger.error("session %s: recording %s did not continue here: %s", session.id,
                         record.recording_id, exc)

    async def _auto_start(self, session: Session, consent: dict[str, str]) -> None:
        try:
            # The standing consent applies from the moment the Session went live.
            await self.start(session, check_consent(consent), by=None, consent_t=0.0)
        except Exception as exc:
            logger.error("session %s: automatic recording did not start: %s", session.id, exc)

    def forget_session(self, session: Session) -> None:
        live = self._live.get(session.id)
        if live is not None and live.session is session and live.recording is None:
            del self._live[session.id]

    async def _session_ended(self, session: Session) -> None:
        await self.stop(session, by=None, reason="session_ended")
        self.forget_session(session)

    def status(self, session: Session) -> dict[str, Any]:
        """The ``recording`` message for this Session's participants."""
        live = self._live.get(session.id)
        if live is None:
            return {"type": "recording", "state": "off", "since": None}
        message: dict[str, Any] = {"type": "recording", "state": live.state,
                                   "since": live.since}
        if live.error is not None:
            message["error"] = live.error
        return message

    def _announce(self, live: _Live) -> None:
        live.session.emit(self.status(live.session))

    async def handle(self, session: Session, grant: Grant,
                     message: dict[str, Any]) -> dict[str, Any]:
        """``start_recording`` / ``stop_recording`` from a websocket."""
        if grant.session_id != session.id:
            raise Forbidden("token is for another session", code="wrong_session")
        if grant.role not in MODERATORS:
            raise Forbidden(f"role {grant.role.value} may not start or stop recording",
                            code="wrong_role")
        by = {"id": grant.participant_id, "name": grant.name or grant.role.value,
              "role": grant.role.value}
        if message.get("type") == "start_recording":
            consent = check_consent(message.get("consent"))
            await self.start(session, consent, by=by, grant=grant)
        else:
            if not await self.stop(session, by=by, reason="stopped"):
                raise Conflict("the Session is not being recorded", code="not_recording")
        return {"type": "ok", "recording": self.status(session)}

    async def start(self, session: Session, consent: Mapping[str, Any], *,
                    by: dict[str, str] | None, grant: Grant | None = None,
                    consent_t: float | None = None,
                    resume: LiveRecording | None = None) -> Recording:
        """Start recording now: consent was confirmed at ``consent_t`` (Session
        clock; default now) and nothing from before it is kept. ``resume``:
        continue that Recording, which another Node (or this one's previous
        run) recorded until the Session moved here."""
        if session.state != "live":
            raise Gone(f"session {session.id} has ended", code="session_ended")
        live = self._live.get(session.id)
        if live is None or live.session is not session:
            self.attach_session(session)
            live = self._live[session.id]
        async with live.lock:
            if session.state != "live":
                raise Gone(f"session {session.id} has ended", code="session_ended")
            if live.recording is not None:
                raise Conflict("the Session is already being recorded", code="recording_active")
            expert = (grant.name if grant is not None and grant.role is Role.EXPERT
                      and grant.name else self._expert_name(session))
            record: dict[str, Any] = (
                dict(consent) if resume is not None else
                {**consent, "started_by": by or {"id": "", "name": "automatic",
                                                 "role": "system"}, "auto": by is None})
            info = SessionInfo(session_id=session.id, theatre=session.theatre.id,
                               title=session.title, expert=expert, procedure=session.procedure)
            recording = Recording(
                self.root, info, record,
                on_error=lambda error: self._failed(session, recording, error),
                options=WriterOptions(part_max_s=self.config.part_max_s),
                origin=session.interaction.clock_zero,
                origin_unix=(resume.clock_zero_unix if resume is not None
                             else session.interaction.started_at),
                consent_t=resume.started_t if resume is not None else consent_t,
                recording_id=resume.recording_id if resume is not None else None,
                resume=resume is not None, node=self.node_id)
            live.recording, live.error = recording, None
            await recording.start()
            if recording.state != "recording":
                # start() reported why through _failed; nothing was written.
                live.recording = None
                reason = live.error["message"] if live.error else "unknown error"
                raise Unavailable(f"the recording could not start: {reason}",
                                  code="recording_failed")
            live.unfollow = recording.follow(session)
            live.state, live.since = "on", session.interaction.now()
            self._resumable.discard(recording.id)
            self.index[recording.id] = summarize(
                recording.manifest(), thumbnail=(recording.directory / THUMBNAIL).is_file(),
                hold=self.index.get(recording.id, {}).get("hold"))
            self._save_index()
        await self._share(session, recording)
        scope = recording.consent.get("scope")
        if resume is not None:
            gap = recording.gaps[-1]
            self.audit.record("recording_resumed", session=session.id, recording=recording.id,
                              scope=scope, from_node=gap.get("from_node"),
                              gap_start=gap.get("start"), repaired=recording.repaired)
            logger.info("session %s: recording %s continues here (from node %s)", session.id,
                        recording.id, gap.get("from_node"))
        else:
            self.audit.record("recording_started", session=session.id,
                              recording=recording.id, scope=scope, by=by, auto=by is None)
            logger.info("session %s: recording %s started (%s)", session.id, recording.id,
                        scope)
        self._announce(live)
        return recording

    async def _share(self, session: Session, recording: Recording) -> None:
        """Tell the store: the Node that takes the Session next continues this."""
        if self._store is None:
            return
        assert recording.clock_zero is not None and recording.started_t is not None
        try:
            await self._store.recordings.put_live_recording(LiveRecording(
                session_id=session.id, recording_id=recording.id, consent=recording.consent,
                clock_zero_unix=recording.clock_zero, started_t=recording.started_t,
                node_id=self.node_id, since=time.time()))
        except StoreUnavailable as exc:
            # Recording goes on here; only a move would not continue it.
            logger.warning("session %s: recording %s not written to the store (%s): it "
                           "would not continue on another Node", session.id, recording.id,
                           exc.message)

    async def _unshare(self, session: Session, recording: Recording) -> None:
        if self._store is None:
            return
        try:
            await self._store.recordings.clear_live_recording(session.id, recording.id)
        except StoreUnavailable as exc:
            # Cleared by the next Node that looks once the Session has ended.
            logger.warning("session %s: recording %s still marked on in the store (%s)",
                           session.id, recording.id, exc.message)

    def _expert_name(self, session: Session) -> str:
        for participant in session.participants.values():
            if participant.role is Role.EXPERT:
                return participant.name
        return ""

    async def stop(self, session: Session, *, by: dict[str, str] | None,
                   reason: str) -> bool:
        """Stop the Session's recording (False: none was running)."""
        live = self._live.get(session.id)
        if live is None or live.session is not session:
            return False
        async with live.lock:
            recording = live.recording
            if recording is None:
                return False
            if live.unfollow is not None:
                live.unfollow()
                live.unfollow = None
            # The Session goes on on another Node, which continues the recording.
            hand_over = (self._store is not None and reason == "session_ended"
                         and session.moved and recording.state == "recording")
            try:
                manifest = await recording.stop(hand_over=hand_over)
            finally:
                live.recording = None
            if recording.handed_over:
                self._resumable.add(recording.id)
            else:
                await self._unshare(session, recording)
            thumbnail = False
            with contextlib.suppress(Exception):
                thumbnail = await asyncio.to_thread(
                    make_thumbnail, recording.directory, tuple(session.theatre.slots)) is not None
            self.index[recording.id] = summarize(manifest, thumbnail=thumbnail,
                                                 hold=self.index.get(recording.id, {}).get("hold"))
            self._save_index()
            if not recording.handed_over and (not recording.manifest_saved
                                              or needs_repair(manifest)):
                # A full disk: the final manifest, or a part, is not on disk. (A
                # Recording handed over is another Node's to finish: never from
                # this manifest, which the next Node's writes supersede.)
                self._unfinished[recording.id] = manifest
                self._spawn(self.maintain())
            failed = recording.state == "failed" or live.state == "failed"
            if not failed:
                live.state, live.error = "off", None
            live.since = session.interaction.now()
        if recording.handed_over:
            self.audit.record("recording_handed_over", session=session.id,
                              recording=recording.id)
            logger.info("session %s: recording %s handed over (the Session moves)",
                        session.id, recording.id)
        else:
            self.audit.record("recording_stopped", session=session.id,
                              recording=recording.id, reason=reason, by=by,
                              duration=manifest.get("duration"), state=manifest.get("state"))
            logger.info("session %s: recording %s stopped (%s)", session.id, recording.id,
                        reason)
        if session.state == "live":
            self._announce(live)
        return True

    def _failed(self, session: Session, recording: Recording, error: RecordingError) -> None:
        """From the Recording, on the loop: a Feed's writer or the whole recording
        failed. The live Session goes on."""
        live = self._live.get(session.id)
        fatal = recording.state == "failed"
        self.audit.record("recording_failed", session=session.id, recording=recording.id,
                          code=error.code, message=error.message, feed=error.feed_id,
                          fatal=fatal)
        if live is None or live.recording is not recording:
            return
        live.error = error.describe()
        if fatal:
            live.state, live.since = "failed", session.interaction.now()
            if recording.origin is not None and live.unfollow is not None:
                # Close what can be closed, list the error: in the background.
                self._spawn(self.stop(session, by=None, reason="failed"))
        self._announce(live)

    # -- review -----------------------------------------------------------------
    def entry(self, recording_id: str) -> dict[str, Any]:
        if not RECORDING_ID.match(recording_id) or recording_id not in self.index:
            raise NotFound("no such recording", code="unknown_recording")
        return self.index[recording_id]

    def for_session(self, session_id: str) -> list[dict[str, Any]]:
        entries = [e for e in self.index.values() if e.get("session") == session_id]
        return sorted(entries, key=lambda e: e.get("started") or "", reverse=True)

    def check_access(self, grant: Grant, entry: dict[str, Any]) -> None:
        """Reviewers and admins of the Recording's Session (node-wide admins:
        any). A Recording is never shared beyond its Session, whatever its
        consent: what ``share_deidentified`` shares is its signed-off
        de-identified exports (server/deidentified.py)."""
        if grant.role not in REVIEWERS:
            raise Forbidden("recordings are for reviewers and admins", code="wrong_role")
        if grant.covers(str(entry.get("session"))):
            return
        raise Forbidden("this recording belongs to another session", code="wrong_session")

    def expiry(self, grant: Grant) -> int:
        """When the media URLs minted now for ``grant`` expire: ``media_url_ttl_s``
        (at most 5 min), never after the grant itself."""
        return int(min(time.time() + self.config.media_url_ttl_s, grant.expires_at))

    def listed(self, entry: dict[str, Any], expires: int, grant: Grant,
               playback: str) -> dict[str, Any]:
        out = {k: v for k, v in entry.items() if k not in ("started_unix", "ended_unix")}
        out["thumbnail"] = (self.signer.url(entry["id"], THUMBNAIL_NAME, expires, grant,
                                            playback)
                            if entry.get("thumbnail") else None)
        return out

    def audit_media(self, ticket: MediaTicket, session: Any, recording_id: str, name: str,
                    address: str | None) -> None:
        """One audit entry per playback and part, however many Range requests
        the media element makes (bounded memory: the oldest are forgotten)."""
        if not self._audited.first((ticket.playback, recording_id, name)):
            return
        self.audit.record("recording_media", session=session, recording=recording_id,
                          part=name, playback=ticket.playback, participant=ticket.participant,
                          role=ticket.role, token=ticket.token_ids[0], address=address)

    def manifest(self, recording_id: str) -> dict[str, Any]:
        """The manifest on disk (cached while unchanged)."""
        directory = self._directory(recording_id)
        path = directory / MANIFEST
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound("no such recording", code="unknown_recording")
            key = (st.st_mtime_ns, st.st_size)
            cached = self._manifests.get(recording_id)
            if cached is not None and cached[0] == key:
                return cached[1]
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise NotFound("no such recording", code="unknown_recording") from None
        if len(self._manifests) > 256:
            self._manifests.clear()
        self._manifests[recording_id] = (key, manifest)
        return dict(manifest)

    def detail(self, recording_id: str, expires: int, grant: Grant,
               playback: str) -> dict[str, Any]:
        """What the player needs: the manifest's Feeds and parts with signed
        URLs (for ``grant``, in ``playback``), the consent, and the events
        (flattened, recorder.replay)."""
        entry = self.entry(recording_id)
        manifest = self.manifest(recording_id)
        feeds = []
        for feed in manifest.get("feeds", []):
            parts = []
            for part in feed.get("parts", []):
                name = str(part.get("file", ""))
                if not part.get("frames") or not _safe_name(name):
                    continue
                parts.append({k: part.get(k) for k in (
                    "index", "file", "start", "duration", "frames", "complete", "width",
                    "height", "node")} | {"url": self.signer.url(recording_id, name, expires, grant,
                                                          playback)})
            feeds.append({"id": feed.get("id"), "kind": feed.get("kind"),
                          "codec": feed.get("codec"), "parts": parts})
        raw = read_events(self._directory(recording_id) / EVENTS, limit=MAX_EVENTS)
        return {
            "recording": {**self.listed(entry, expires, grant, playback), "feeds": feeds,
                          "consent": manifest.get("consent"),
                          "clock_zero_unix": manifest.get("clock_zero_unix"),
                          "started_t": manifest.get("started_t"),
                          "ended_t": manifest.get("ended_t"),
                          "gaps": manifest.get("gaps") or [],
                          "errors": manifest.get("errors") or []},
            "events": player_events(raw),
            "expires_at": expires,
            "playback": playback,
        }

    def media_path(self, recording_id: str, name: str) -> tuple[Path, str]:
        """The file of a part (or the thumbnail) to serve: only a name the
        manifest lists, a regular file directly inside the recording's
        directory, under the root, reached through no symlink."""
        self.entry(recording_id)
        if name == THUMBNAIL_NAME:
            return self._inside(recording_id, THUMBNAIL), "image/jpeg"
        listed = {str(p.get("file")) for f in self.manifest(recording_id).get("feeds", [])
                  for p in f.get("parts", [])}
        if name not in listed or not _safe_name(name):
            raise NotFound("no such part", code="unknown_part")
        return (self._inside(recording_id, name),
                CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream"))

    def directory(self, recording_id: str) -> Path:
        """A listed Recording's directory: a real directory under the root (404
        otherwise)."""
        self.entry(recording_id)
        return self._directory(recording_id)

    def _directory(self, recording_id: str) -> Path:
        if not RECORDING_ID.match(recording_id):
            raise NotFound("no such recording", code="unknown_recording")
        directory = self.root / recording_id
        try:
            st = os.lstat(directory)
        except OSError:
            raise NotFound("no such recording", code="unknown_recording") from None
        if not stat.S_ISDIR(st.st_mode):  # a symlink is not a directory to lstat
            raise NotFound("no such recording", code="unknown_recording")
        return directory

    def _inside(self, recording_id: str, name: str) -> Path:
        directory = self._directory(recording_id)
        path = directory / name
        try:
            st = os.lstat(path)
            real = path.resolve(strict=True)
            root = self.root.resolve(strict=True)
        except OSError:
            raise NotFound("no such file", code="unknown_part") from None
        if (not stat.S_ISREG(st.st_mode) or real.parent != directory.resolve()
                or not real.is_relative_to(root)):
            logger.warning("recording %s: refused to serve %r (not a plain file inside the "
                           "recording)", recording_id, name)
            raise NotFound("no such file", code="unknown_part")
        return path

    # -- deletion and retention -----------------------------------------------------
    def _active_ids(self) -> set[str]:
        return {live.recording.id for live in self._live.values() if live.recording is not None}

    async def delete(self, recording_id: str, *, by: dict[str, str] | None,
                     reason: str) -> dict[str, Any]:
        """Remove every part, the events, thumbnail and manifest, and the index
        entry; audited with each file removed and its sha256, and checked. A
        Recording still running is a 409, one on legal hold too."""
        entry = self.entry(recording_id)
        if recording_id in self._active_ids() | self._elsewhere | self._resumable:
            raise Conflict("this recording is running; stop it first", code="recording_active")
        if entry.get("hold"):
            raise Conflict("this recording is on legal hold; an admin must release it first",
                           code="legal_hold")
        directory = self.root / recording_id
        if not await asyncio.to_thread(os.path.lexists, directory):
            self._vanished(recording_id)
        for hook in list(self.before_delete):
            await hook(recording_id)
        files = await asyncio.to_thread(self._inventory, recording_id)
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            # Removed whole while its files were being read: not ours to report.
            self._vanished(recording_id)
        if stat.S_ISDIR(st.st_mode):
            # rmtree unlinks symlinks inside, it never follows them; a file someone
            # else removes meanwhile is no error (what is left is checked below).
            await asyncio.to_thread(shutil.rmtree, directory, True)
        else:
            with contextlib.suppress(FileNotFoundError):
                directory.unlink()
        gone = not await asyncio.to_thread(os.path.lexists, directory)
        session = entry.get("session")
        if not gone:
            self.audit.record("recording_delete_failed", session=session,
                              recording=recording_id, reason=reason, by=by, files=files)
            logger.error("recording %s: deletion left files behind", recording_id)
            raise Unavailable("the recording could not be deleted completely",
                              code="delete_failed")
        self.index.pop(recording_id, None)
        self._manifests.pop(recording_id, None)
        self._unfinished.pop(recording_id, None)
        self._save_index()
        self.audit.record("recording_deleted", session=session, recording=recording_id,
                          reason=reason, by=by, files=files, verified=True,
                          title=entry.get("title"), started=entry.get("started"))
        logger.info("recording %s deleted (%s): %d files", recording_id, reason, len(files))
        return {"deleted": recording_id, "files": files, "verified": True}

    def _vanished(self, recording_id: str) -> NoReturn:
        """The recording's directory is gone, removed by another Node sharing the
        root or by a person: forgotten here, and 404 to whoever asked."""
        logger.info("recording %s: already gone from the root (another Node, or by hand); "
                    "forgotten", recording_id)
        self.index.pop(recording_id, None)
        self._manifests.pop(recording_id, None)
        self._unfinished.pop(recording_id, None)
        self._scanned.pop(recording_id, None)
        self._save_index()
        raise NotFound("no such recording", code="unknown_recording")

    def _inventory(self, recording_id: str) -> list[dict[str, Any]]:
        """Every file of a recording as it is now: name, kind, size, sha256 (and
        whether it is the one the manifest lists). A file that vanishes before it
        is read is not listed: whoever removed it, it was not this deletion."""
        directory = self.root / recording_id
        listed: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            listed = {str(p.get("file")): p for f in manifest.get("feeds", [])
                      for p in f.get("parts", [])}
        out: list[dict[str, Any]] = []
        try:
            children = sorted(directory.iterdir())
        except OSError:
            return out
        for child in children:
            try:
                st = os.lstat(child)
            except OSError:
                continue
            if child.name == EXPORTS and stat.S_ISDIR(st.st_mode):
                # The de-identified exports made of it go with it, each file listed.
                for export in deidentified.directories(directory):
                    out += [{**item, "file": f"{EXPORTS}/{export.name}/{item['file']}",
                             "kind": "deidentified"}
                            for item in deidentified.inventory(export)]
                continue
            item: dict[str, Any] = {"file": child.name}
            if not stat.S_ISREG(st.st_mode):
                item["kind"] = "symlink" if stat.S_ISLNK(st.st_mode) else "other"
                out.append(item)
                continue
            part = listed.get(child.name)
            kind = "part" if part is not None else {
                MANIFEST: "manifest", EVENTS: "events", THUMBNAIL: "thumbnail",
                HOLD: "hold"}.get(child.name, "other")
            item.update(kind=kind, bytes=st.st_size)
            try:
                item["sha256"] = sha256_file(child)
            except FileNotFoundError:
                continue
            except OSError as exc:
                item["error"] = exc.strerror or str(exc)
            if part is not None and part.get("sha256"):
                item["matches_manifest"] = item.get("sha256") == part["sha256"]
            out.append(item)
        return out

    # -- legal hold ---------------------------------------------------------------------
    async def set_hold(self, recording_id: str, *, reason: str | None,
                       by: dict[str, str]) -> dict[str, Any] | None:
        """Put a recording on legal hold (``reason``) or release it (None);
        returns the hold. Audited."""
        entry = self.entry(recording_id)
        directory = self._directory(recording_id)
        if reason is None:
            if not entry.get("hold"):
                return None
            await asyncio.to_thread(_remove_hold, directory)
            entry["hold"] = None
            self._save_index()
            self.audit.record("legal_hold_released", session=entry.get("session"),
                              recording=recording_id, by=by)
            return None
        reason = _CONTROL.sub("", reason).strip() if isinstance(reason, str) else ""
        if not reason:
            raise BadRequest("a legal hold needs a reason", code="bad_hold")
        if len(reason) > HOLD_REASON_CHARS:
            raise BadRequest(f"the reason is longer than {HOLD_REASON_CHARS} characters",
                             code="bad_hold")
        hold = {"reason": reason, "by": by,
                "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        try:
            await asyncio.to_thread(write_atomic, directory / HOLD,
                                    json.dumps(hold, ensure_ascii=False).encode())
        except OSError as exc:
            raise Unavailable(f"the hold could not be written: {exc.strerror or exc}",
                              code="hold_failed") from None
        entry["hold"] = hold
        self._save_index()
        self.audit.record("legal_hold_set", session=entry.get("session"),
                          recording=recording_id, by=by, reason=reason)
        return hold

    async def expire(self, now: float | None = None, *,
                     go_on: Callable[[], bool] | None = None) -> list[str]:
        """Delete the Recordings older than ``retention_days`` (by their end, or
        start); returns their ids. ``go_on``, asked before each deletion: False
        stops here (the sweep's lease was lost)."""
        days = self.config.retention_days
        if days <= 0:
            return []
        cutoff = (time.time() if now is None else now) - days * 86400
        deleted = []
        active = self._active_ids() | self._resumable
        for recording_id, entry in list(self.index.items()):
            when = entry.get("ended_unix") or entry.get("started_unix")
            if recording_id in active or when is None or when >= cutoff:
                continue
            if entry.get("hold"):
                logger.info("recording %s: past retention, kept on legal hold", recording_id)
                continue
            if go_on is not None and not go_on():
                logger.warning("recordings: retention pass stopped, another Node took it over")
                break
            if recording_id in self._elsewhere:
                # Its lock was held when this Node looked, perhaps only for a moment
                # (another Node starting checks every recording under it): again.
                directory = self.root / recording_id
                if await asyncio.to_thread(os.path.isdir, directory):
                    await asyncio.to_thread(self._finish, directory)
                if recording_id in self._elsewhere:
                    logger.info("recording %s: past retention, being written elsewhere; "
                                "left for a later pass", recording_id)
                    continue
            try:
                await self.delete(recording_id, by=None, reason="retention")
                deleted.append(recording_id)
            except NotFound:
                pass  # gone meanwhile (_vanished said so)
            except Exception:
                logger.exception("recording %s: retention could not delete it", recording_id)
        return deleted

    async def sweep(self, now: float | None = None) -> list[str] | None:
        """One retention pass, if no other Node of the deployment is making one:
        under the retention lease (renewed while it runs), after looking at the
        root again. Returns the ids deleted; None when another Node holds the
        lease. StoreUnavailable when the lease could not be asked for."""
        if self.config.retention_days <= 0:
            return []
        if self._leases is None:
            return await self.expire(now)
        leases = self._leases
        lease = await leases.acquire_lease(RETENTION_LEASE, ttl_s=RETENTION_LEASE_S)
        if lease.node_id != self._lease_node:
            logger.info("recordings: retention pass left to Node %s, which is making one",
                        lease.node_id)
            return None
        lost = asyncio.Event()
        keeper = asyncio.ensure_future(self._keep_retention_lease(leases, lease.fence, lost))
        try:
            # What other Nodes deleted (or recorded) since this Node last looked.
            await self.load_resumable()
            await asyncio.to_thread(self.rescan)
            self._refreshed_at = time.monotonic()
            return await self.expire(now, go_on=lambda: not lost.is_set())
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(StoreUnavailable):
                await leases.release_lease(RETENTION_LEASE, lease.fence)

    @staticmethod
    async def _keep_retention_lease(leases: LeaseStore, fence: int, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(RETENTION_LEASE_S / 3)
            try:
                if await leases.renew_leases({RETENTION_LEASE: fence}, ttl_s=RETENTION_LEASE_S):
                    lost.set()
                    return
            except StoreUnavailable:
                continue  # the next renewal takes it back if nobody took it meanwhile

    async def retention_loop(self) -> None:
        while True:
            wait = self.config.retention_check_s
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                logger.warning("recordings: retention pass put off, the store is unreachable: "
                               "%s", exc)
                wait = min(wait, RETENTION_RETRY_S)
            except Exception:
                logger.exception("recordings: retention pass failed")
            self.retention_passes += 1
            await asyncio.sleep(wait)


def _read_hold(directory: Path) -> dict[str, Any] | None:
    try:
        hold = json.loads((directory / HOLD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Unreadable but present: held all the same (never delete on a doubt).
        return {"reason": "(hold.json unreadable)", "by": None, "at": None}
    return hold if isinstance(hold, dict) else {"reason": str(hold), "by": None, "at": None}


def _remove_hold(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / HOLD).unlink()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_name(name: str) -> bool:
    return bool(_NAME.match(name)) and ".." not in name
