"""De-identified exports on a Node: asked for by an admin (library page, API)
or made offline (``scrubin export --deidentify``), reviewed in the player,
signed off or rejected, and only then shared (docs/protocol.md, "De-identified
exports"; docs/security.md).

**Who.** Admins of a Recording's Session (node-wide admins: any) ask for an
export and delete one. The Session's reviewers and admins see every export and
its state, pending ones included (they may watch the Recording itself). An
export is signed off (or rejected) by a Role of ``[deidentify]
sign_off_roles`` (default admin) of the Session, after opening it in the
player: the sign-off names the player's playback, and every file of the export
must have been served in that playback (``409 not_reviewed`` otherwise).
With ``four_eyes`` the admin who asked may not sign off.

**Sharing.** With ``[recording] share_deidentified`` on, a *signed-off*
export of a Recording consented for ``deidentified_reuse`` is shared:
reviewers of every Session may list it (``GET /api/exports/shared``), open it in
the player and download its files, through signed URLs bound to their grant.
Nothing else of that Recording is shared (its parts, events, names). An export
not signed off is ``409 export_not_signed_off`` to them; the Recording itself,
``403 wrong_session``.

**Where.** Inside their Recording (recorder/deidentified.py): deleting the
Recording (by hand or by retention) cancels an export being made and deletes
them all, each file listed with its sha256 in the audit; a legal hold holds
them. Exports run in a worker thread, ``[deidentify] concurrent`` at a time
(default one: about a core each), at most ``queue`` waiting.

**Audit.** ``deidentified_requested``, ``deidentified_finished`` (files, sha256,
faces found), ``deidentified_failed``, ``deidentified_cancelled``,
``deidentified_viewed`` (per playback; ``shared`` for another Session's
reviewer), ``deidentified_media`` (per playback and file),
``deidentified_signed_off``, ``deidentified_rejected``, ``deidentified_deleted``
(files, sha256), ``deidentified_interrupted`` (found cut short at start).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recorder import deidentified
from recorder.deidentified import Claim, ExportCancelled
from recorder.deidentify import DeidentifyOptions, regions
from recorder.export import ExportError, RecordingFiles

from .audit import AuditTrail
from .config import Config, DeidentifyConfig
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from .recordings import _CONTROL, MEDIA_AUDIT_MEMORY, REVIEWERS, MediaTicket, Recordings, SeenOnce
from .roles import Role
from .tokens import NODE_WIDE, Grant

logger = logging.getLogger(__name__)

#: The choices of ``POST /api/recordings/{recording}/exports``.
CHOICES = frozenset({"feeds", "conservative", "narration", "drawings"})
NOTE_CHARS = 1000
#: States whose files exist.
WITH_FILES = frozenset({"pending_review", "signed_off", "rejected"})
Standing = Literal["own", "shared"]


def options_from(config: DeidentifyConfig, *, conservative: bool | None = None,
                 narration: bool = False, drawings: bool = True) -> DeidentifyOptions:
    """An export's options: the Node's regions and detector settings, the
    export's own choices."""
    return DeidentifyOptions(
        masks=regions(config.masks), keep=regions(config.keep),
        face_slots=tuple(config.face_slots),
        conservative=config.conservative if conservative is None else conservative,
        narration=narration, narration_slots=tuple(config.narration_slots),
        drawings=drawings, profile_faces=config.profile_faces, detect_hz=config.detect_hz,
        detect_height=config.detect_height)


def who(grant: Grant) -> dict[str, str]:
    return {"id": grant.participant_id, "name": grant.name or grant.role.value,
            "role": grant.role.value}


def subject(recording_id: str, export_id: str) -> str:
    """What the media signer signs for an export: its URLs are
    ``/api/recordings/{recording}/exports/{export}/media/{file}``."""
    return f"{recording_id}/exports/{export_id}"


@dataclass
class _Job:
    recording: str
    export: str
    session: str | None
    claim: Claim
    options: DeidentifyOptions
    state: str = "queued"
    done: float = 0.0
    total: float = 0.0
    started: float | None = None  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None

    def progress(self, done: float, total: float) -> None:
        """From the worker thread (plain float stores)."""
        self.done, self.total = done, total

    def describe(self) -> dict[str, Any] | None:
        if self.state != "running" or self.total <= 0:
            return None
        fraction = min(1.0, self.done / self.total)
        eta = None
        if self.started is not None and fraction >= 0.02:
            elapsed = time.monotonic() - self.started
            eta = round(elapsed * (1 - fraction) / fraction, 1)
        return {"done": round(self.done, 2), "total": round(self.total, 2),
                "fraction": round(fraction, 4), "eta_s": eta}


class DeidentifiedExports:
    def __init__(self, config: Config, recordings: Recordings, audit: AuditTrail) -> None:
        self.config = config.deidentify
        self.share = config.recording.share_deidentified
        self._recordings = recordings
        self._audit = audit
        self._jobs: dict[str, _Job] = {}
        self._slots = asyncio.Semaphore(self.config.concurrent)
        self._reviewing = asyncio.Lock()
        self._audited = SeenOnce()
        #: (export, playback) -> the files served in that playback (for sign-off).
        self._served: OrderedDict[tuple[str, str], set[str]] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Exports a stopped process left queued or running are failed (in a thread)."""
        for recording_id in list(self._recordings.index):
            directory = self._recordings.root / recording_id
            for export in deidentified.directories(directory):
                try:
                    before = deidentified.load(export).get("state")
                    record = deidentified.settle(export)
                except (ExportError, OSError) as exc:
                    logger.warning("de-identified export %s: %s", export.name, exc)
                    continue
                if before != record.get("state"):
                    self._audit.record("deidentified_interrupted", session=record.get("session"),
                                       recording=recording_id, export=export.name,
                                       state=before)

    async def close(self, timeout: float = 15.0) -> None:
        """Stop the exports being made (they end as ``failed``: cancelled)."""
        for job in list(self._jobs.values()):
            self._cancel(job)
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def cancel_for(self, recording_id: str) -> None:
        """Before a Recording is deleted: its exports being made stop."""
        tasks = []
        for job in list(self._jobs.values()):
            if job.recording == recording_id:
                self._cancel(job)
                if job.task is not None:
                    tasks.append(job.task)
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    # -- who ---------------------------------------------------------------------------
    def standing(self, grant: Grant, entry: dict[str, Any]) -> Standing:
        """``own`` (the Session's reviewers and admins) or ``shared`` (another
        Session's reviewer, for a Recording whose exports are shared); 403 else."""
        if grant.role not in REVIEWERS:
            raise Forbidden("de-identified exports are for reviewers and admins",
                            code="wrong_role")
        if grant.covers(str(entry.get("session"))):
            return "own"
        if grant.role is Role.REVIEWER and self.shareable(entry):
            return "shared"
        raise Forbidden("this recording belongs to another session", code="wrong_session")

    def shareable(self, entry: dict[str, Any]) -> bool:
        return self.share and entry.get("consent_scope") == "deidentified_reuse"

    def _admin(self, grant: Grant, entry: dict[str, Any], what: str) -> None:
        if grant.role is not Role.ADMIN:
            raise Forbidden(f"only admins {what}", code="wrong_role")
        if not grant.covers(str(entry.get("session"))):
            raise Forbidden("this recording belongs to another session", code="wrong_session")

    # -- files ---------------------------------------------------------------------------
    def _directory(self, recording_id: str, export_id: str) -> Path:
        if not deidentified.EXPORT_ID.match(export_id):
            raise NotFound("no such export", code="unknown_export")
        directory = self._recordings.directory(recording_id) / deidentified.EXPORTS / export_id
        try:
            ok = stat.S_ISDIR(os.lstat(directory).st_mode) and stat.S_ISDIR(
                os.lstat(directory.parent).st_mode)
        except OSError:
            ok = False
        if not ok:  # lstat: a symlink is not a directory
            raise NotFound("no such export", code="unknown_export")
        return directory

    def _read(self, directory: Path) -> dict[str, Any]:
        """An export's record (in a thread): as the worker left it; one cut short
        elsewhere is settled as failed."""
        try:
            if directory.name in self._jobs:
                return deidentified.load(directory)
            return deidentified.settle(directory)
        except (ExportError, OSError):
            raise NotFound("no such export", code="unknown_export") from None

    async def record(self, recording_id: str, export_id: str) -> dict[str, Any]:
        directory = self._directory(recording_id, export_id)
        return await asyncio.to_thread(self._read, directory)

    def _state(self, record: dict[str, Any]) -> str:
        job = self._jobs.get(str(record.get("id")))
        return job.state if job is not None else str(record.get("state"))

    def summary(self, record: dict[str, Any], entry: dict[str, Any],
                standing: Standing = "own") -> dict[str, Any]:
        """What the API says of an export: everything to its own Session; to
        another Session's reviewer, nothing that names anyone."""
        state = self._state(record)
        job = self._jobs.get(str(record.get("id")))
        progress = job.describe() if job is not None else None
        if progress is None and state == "running" and isinstance(record.get("progress"), dict):
            done = float(record["progress"].get("done") or 0)
            total = float(record["progress"].get("total") or 0)
            if total > 0:  # made by another process: as it last wrote it
                progress = {"done": done, "total": total,
                            "fraction": round(min(1.0, done / total), 4), "eta_s": None}
        options = record.get("options") or {}
        files = [{k: f.get(k) for k in ("feed", "file", "bytes", "sha256", "duration",
                                        "width", "height")} | {"audio": bool(f.get("audio"))}
                 for f in record.get("files") or []] if state in WITH_FILES else []
        review = record.get("review") if isinstance(record.get("review"), dict) else None
        out: dict[str, Any] = {
            "id": record.get("id"),
            "recording": record.get("recording"),
            "state": state,
            "duration": record.get("duration"),
            "feeds": list(record.get("feeds") or []),
            "options": {k: bool(options.get(k)) for k in ("conservative", "narration",
                                                          "drawings")},
            "files": files,
            "shared": state == "signed_off" and self.shareable(entry),
            "procedure": entry.get("procedure", ""),
        }
        if standing == "shared":
            out["signed_off"] = review.get("at") if review else None
            return out
        requested = record.get("requested") or {}
        for f, raw in zip(files, record.get("files") or [], strict=False):
            f["faces"] = raw.get("faces")
        out.update(
            session=record.get("session"), title=entry.get("title", ""),
            progress=progress, error=record.get("error") if state == "failed" else None,
            requested={"by": requested.get("by"), "at": requested.get("at"),
                       "via": requested.get("via")},
            started=record.get("started"), finished=record.get("finished"),
            review={k: review.get(k) for k in ("decision", "by", "at", "note")}
            if review else None)
        return out

    # -- asking for one ---------------------------------------------------------------------
    async def request(self, recording_id: str, grant: Grant, body: Any) -> dict[str, Any]:
        """``POST /api/recordings/{recording}/exports`` (admins): queued, made in
        the background; returns its summary."""
        if grant.role is not Role.ADMIN:
            raise Forbidden("only admins ask for de-identified exports", code="wrong_role")
        entry = self._recordings.entry(recording_id)
        self._admin(grant, entry, "ask for de-identified exports")
        feeds, choices = _choices(body)
        if entry.get("state") in ("recording", "stopping"):
            raise Conflict("this recording is still running; export it once it has stopped",
                           code="recording_active")
        waiting = len(self._jobs)
        if waiting >= self.config.queue + self.config.concurrent:
            raise Conflict(f"{waiting} exports are being made or waiting on this Node; try "
                           "again when one is done", code="too_many_exports")
        directory = self._recordings.directory(recording_id)
        cameras = await asyncio.to_thread(_cameras, directory)
        if not cameras:
            raise Conflict("this recording has no video to export", code="no_video")
        unknown = [f for f in feeds or [] if f not in cameras]
        if unknown:
            raise BadRequest(f"no recorded camera {', '.join(unknown)} (cameras: "
                             f"{', '.join(cameras)})", code="bad_export")
        options = options_from(self.config, **choices)
        by = who(grant)
        try:
            record, claim = await asyncio.to_thread(
                deidentified.create, directory, options, requested_by=by, via="api",
                feeds=feeds)
        except (ExportError, OSError) as exc:
            logger.error("recording %s: export not created: %s", recording_id, exc)
            raise Unavailable("the export could not be created", code="export_unavailable"
                              ) from None
        job = _Job(recording_id, record["id"], entry.get("session"), claim, options)
        self._jobs[job.export] = job
        job.task = asyncio.ensure_future(self._run(job, directory))
        self._audit.record("deidentified_requested", session=entry.get("session"),
                           recording=recording_id, export=job.export, by=by,
                           feeds=record["feeds"], options=record["options"], via="api")
        return self.summary(record, entry)

    @staticmethod
    def _cancel(job: _Job) -> None:
        """Stop a job: the worker sees the event at its next progress report; one
        still waiting for a worker stops waiting at once."""
        job.cancel.set()
        if job.state == "queued" and job.task is not None:
            job.task.cancel()

    async def _run(self, job: _Job, recording_dir: Path) -> None:
        fields = {"session": job.session, "recording": job.recording, "export": job.export}
        try:
            try:
                async with self._slots:
                    job.state, job.started = "running", time.monotonic()
                    record = await asyncio.to_thread(
                        deidentified.make, recording_dir, job.claim, job.options,
                        progress=job.progress, cancelled=job.cancel.is_set)
            except asyncio.CancelledError:
                if job.state != "queued":
                    raise
                # Cancelled (by _cancel) while waiting for a worker.
                await asyncio.to_thread(deidentified.abandon, job.claim, "cancelled")
                raise ExportCancelled(job.export) from None
        except ExportCancelled:
            self._audit.record("deidentified_cancelled", **fields)
        except Exception as exc:
            logger.error("de-identified export %s of %s failed: %s", job.export, job.recording,
                         exc)
            self._audit.record("deidentified_failed", **fields, error=str(exc) or repr(exc))
        else:
            self._audit.record(
                "deidentified_finished", **fields, duration=record.get("duration"),
                files=[{k: f.get(k) for k in ("file", "bytes", "sha256", "faces")}
                       for f in record.get("files", [])])
        finally:
            job.claim.release()
            self._jobs.pop(job.export, None)

    # -- lists -----------------------------------------------------------------------------
    async def for_session(self, session_id: str) -> list[dict[str, Any]]:
        """Every export of the Session's Recordings, newest first (its own view)."""
        out = []
        for entry in self._recordings.for_session(session_id):
            for record in await asyncio.to_thread(self._all, str(entry["id"])):
                out.append(self.summary(record, entry))
        out.sort(key=lambda s: (s.get("requested") or {}).get("at") or "", reverse=True)
        return out

    async def shared(self, grant: Grant) -> list[dict[str, Any]]:
        """The signed-off exports shared with ``grant`` (``GET /api/exports/shared``)."""
        if grant.role not in REVIEWERS:
            raise Forbidden("de-identified exports are for reviewers and admins",
                            code="wrong_role")
        out = []
        for recording_id, entry in list(self._recordings.index.items()):
            if not self.shareable(entry):
                continue
            try:
                standing = self.standing(grant, entry)
            except Forbidden:
                continue
            for record in await asyncio.to_thread(self._all, recording_id):
                if self._state(record) == "signed_off":
                    out.append(self.summary(record, entry, standing))
        out.sort(key=lambda s: str(s.get("signed_off") or (s.get("review") or {}).get("at")),
                 reverse=True)
        return out

    def _all(self, recording_id: str) -> list[dict[str, Any]]:
        records = []
        for directory in deidentified.directories(self._recordings.root / recording_id):
            try:
                records.append(self._read(directory))
            except NotFound:
                continue
        return records

    # -- the player ------------------------------------------------------------------------
    async def detail(self, recording_id: str, export_id: str, grant: Grant,
                     playback: str) -> tuple[dict[str, Any], bool]:
        """What the player needs (the shape of a Recording's, one part per
        camera, no events), for ``grant``; and whether this is a new playback
        (audited)."""
        entry = self._recordings.entry(recording_id)
        standing = self.standing(grant, entry)
        record = await self.record(recording_id, export_id)
        state = self._state(record)
        if standing == "shared" and state != "signed_off":
            raise Conflict("this de-identified export has not been signed off: it is not "
                           "shared yet", code="export_not_signed_off")
        signer = self._recordings.signer
        name = subject(recording_id, export_id)
        renewing = signer.is_playback(playback, name, grant)
        if not renewing:
            playback = signer.playback(name, grant)
        expires = self._recordings.expiry(grant)
        feeds = []
        if state in WITH_FILES:
            for f in record.get("files") or []:
                part = {"index": 0, "file": f["file"], "start": 0.0,
                        "duration": f.get("duration"), "frames": f.get("frames"),
                        "complete": True, "width": f.get("width"), "height": f.get("height"),
                        "url": signer.url(name, str(f["file"]), expires, grant, playback)}
                feeds.append({"id": f["feed"], "kind": "video", "codec": "video/H264",
                              "parts": [part]})
        duration = record.get("duration") or 0.0
        own = standing == "own"
        recording = {
            "id": recording_id, "export": export_id, "session": entry.get("session") if own
            else None, "title": entry.get("title", "") if own else "",
            "procedure": entry.get("procedure", ""), "expert": entry.get("expert", "")
            if own else "", "started": entry.get("started") if own else None,
            "duration": duration, "state": "stopped", "started_t": 0.0, "ended_t": duration,
            "clock_zero_unix": None, "consent_scope": entry.get("consent_scope"),
            "consent": {"scope": entry.get("consent_scope")}, "thumbnail": None,
            "hold": None, "errors": [], "feeds": feeds}
        summary = self.summary(record, entry, standing)
        review_ok = own and state == "pending_review" and grant.role.value in \
            self.config.sign_off_roles and not self._four_eyes(record, grant)
        if not renewing:
            self._audit.record("deidentified_viewed", session=entry.get("session"),
                               recording=recording_id, export=export_id, state=state,
                               participant=grant.participant_id, role=grant.role.value,
                               name=grant.name, playback=playback, shared=not own)
        return {"recording": recording, "events": [], "expires_at": expires,
                "playback": playback, "export": summary, "may_review": review_ok}, not renewing

    def _four_eyes(self, record: dict[str, Any], grant: Grant) -> bool:
        """Would this be the asker signing off their own export (``four_eyes``)?"""
        asker = ((record.get("requested") or {}).get("by") or {}).get("id")
        return self.config.four_eyes and bool(asker) and asker == grant.participant_id

    async def media_path(self, recording_id: str, export_id: str, name: str,
                         ticket: MediaTicket) -> Path:
        """A file of an export for a signed URL: listed in its record, a regular
        file directly inside its directory, reached through no symlink; for
        another Session's reviewer, only once signed off (and still shared)."""
        entry = self._recordings.entry(recording_id)
        session = str(entry.get("session"))
        own = ticket.scope == session or (ticket.scope == NODE_WIDE
                                          and ticket.role == Role.ADMIN.value)
        if not own and not self.shareable(entry):
            raise Forbidden("this recording belongs to another session", code="wrong_session")
        directory = self._directory(recording_id, export_id)
        record = await asyncio.to_thread(self._read, directory)
        state = self._state(record)
        if not own and state != "signed_off":
            raise Conflict("this de-identified export has not been signed off",
                           code="export_not_signed_off")
        listed = {str(f.get("file")) for f in record.get("files") or []}
        if state not in WITH_FILES or name not in listed:
            raise NotFound("no such file", code="unknown_part")
        path = directory / name
        try:
            st = os.lstat(path)
            inside = path.resolve(strict=True).parent == directory.resolve(strict=True)
        except OSError:
            raise NotFound("no such file", code="unknown_part") from None
        if not stat.S_ISREG(st.st_mode) or not inside:
            raise NotFound("no such file", code="unknown_part")
        return path

    def served(self, ticket: MediaTicket, recording_id: str, export_id: str, name: str,
               address: str | None) -> None:
        """A file went out in a playback: remembered for the sign-off, audited
        once per playback and file (bounded memory: the oldest are forgotten)."""
        files = self._served.setdefault((export_id, ticket.playback), set())
        files.add(name)
        self._served.move_to_end((export_id, ticket.playback))
        while len(self._served) > MEDIA_AUDIT_MEMORY:
            self._served.popitem(last=False)
        if not self._audited.first((ticket.playback, export_id, name)):
            return
        entry = self._recordings.index.get(recording_id, {})
        self._audit.record("deidentified_media", session=entry.get("session"),
                           recording=recording_id, export=export_id, file=name,
                           playback=ticket.playback, participant=ticket.participant,
                           role=ticket.role, token=ticket.token_ids[0], address=address,
                           shared=ticket.scope not in (entry.get("session"), NODE_WIDE))

    # -- sign-off --------------------------------------------------------------------------
    async def review(self, recording_id: str, export_id: str, grant: Grant,
                     body: Any) -> dict[str, Any]:
        """Sign off or reject (``{"decision": "sign_off"|"reject", "playback",
        "note"}``)."""
        if grant.role not in REVIEWERS:
            raise Forbidden("de-identified exports are reviewed by admins or reviewers",
                            code="wrong_role")
        entry = self._recordings.entry(recording_id)
        if not grant.covers(str(entry.get("session"))):
            raise Forbidden("this recording belongs to another session", code="wrong_session")
        if grant.role.value not in self.config.sign_off_roles:
            raise Forbidden(f"de-identified exports are signed off by "
                            f"{' or '.join(self.config.sign_off_roles)}", code="wrong_role")
        decision, playback, note = _decision(body)
        directory = self._directory(recording_id, export_id)
        async with self._reviewing:
            record = await asyncio.to_thread(self._read, directory)
            state = self._state(record)
            if state in ("queued", "running"):
                raise Conflict("this export is still being made", code="export_not_ready")
            if state == "failed":
                raise Conflict("this export failed; ask for a new one", code="export_failed")
            if state != "pending_review":
                raise Conflict(f"this export was already reviewed ({state})",
                               code="export_reviewed")
            if decision == "signed_off":
                if self._four_eyes(record, grant):
                    raise Forbidden("you asked for this export: someone else signs it off",
                                    code="four_eyes")
                self._check_watched(record, recording_id, grant, playback)
            try:
                record = await asyncio.to_thread(deidentified.review, directory, decision,
                                                 by=who(grant), note=note, playback=playback)
            except OSError as exc:
                logger.error("export %s: review not written: %s", export_id, exc)
                raise Unavailable("the review could not be saved", code="review_failed"
                                  ) from None
        self._audit.record(
            f"deidentified_{decision}", session=entry.get("session"), recording=recording_id,
            export=export_id, by=who(grant), note=note, playback=playback,
            shared=decision == "signed_off" and self.shareable(entry),
            files=[{k: f.get(k) for k in ("file", "sha256")} for f in record.get("files", [])])
        return self.summary(record, entry)

    def _check_watched(self, record: dict[str, Any], recording_id: str, grant: Grant,
                       playback: str | None) -> None:
        """Signing off is for someone who opened the export in the player: the
        playback named is this token's, and it loaded every file."""
        export_id = str(record.get("id"))
        if not playback or not self._recordings.signer.is_playback(
                playback, subject(recording_id, export_id), grant):
            raise Conflict("sign off from the player, after watching the export (the request "
                           "names the player's playback)", code="not_reviewed")
        files = {str(f.get("file")) for f in record.get("files") or []}
        missing = sorted(files - self._served.get((export_id, playback), set()))
        if missing:
            raise Conflict(f"the player has not loaded {', '.join(missing)} yet: watch every "
                           "camera before signing off", code="not_reviewed")

    # -- deletion ----------------------------------------------------------------------------
    async def delete(self, recording_id: str, export_id: str, grant: Grant) -> dict[str, Any]:
        """Admins: an export deleted, each file listed with its sha256 (and
        audited), the directory checked gone; one being made is cancelled
        first. A Recording on legal hold keeps its exports (``409 legal_hold``)."""
        if grant.role is not Role.ADMIN:
            raise Forbidden("only admins delete de-identified exports", code="wrong_role")
        entry = self._recordings.entry(recording_id)
        self._admin(grant, entry, "delete de-identified exports")
        directory = self._directory(recording_id, export_id)
        if entry.get("hold"):
            raise Conflict("this recording is on legal hold, its exports too; an admin must "
                           "release it first", code="legal_hold")
        job = self._jobs.get(export_id)
        if job is not None:
            self._cancel(job)
            if job.task is not None:
                await asyncio.wait([job.task], timeout=30)
        files, gone = await asyncio.to_thread(deidentified.remove, directory)
        fields = {"session": entry.get("session"), "recording": recording_id,
                  "export": export_id, "by": who(grant), "files": files}
        if not gone:
            self._audit.record("deidentified_delete_failed", **fields)
            raise Unavailable("the export could not be deleted completely", code="delete_failed")
        self._audit.record("deidentified_deleted", **fields, verified=True)
        return {"deleted": export_id, "recording": recording_id, "files": files,
                "verified": True}


def _choices(body: Any) -> tuple[list[str] | None, dict[str, Any]]:
    """The body of ``POST …/exports``: ``{"feeds"?, "conservative"?, "narration"?,
    "drawings"?}``."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("expected {\"feeds\"?, \"conservative\"?, \"narration\"?, "
                         "\"drawings\"?}", code="bad_export")
    unknown = set(body) - CHOICES
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", code="bad_export")
    feeds = body.get("feeds")
    if feeds is not None and (not isinstance(feeds, list) or not feeds or len(feeds) > 16
                              or not all(isinstance(f, str) and 0 < len(f) <= 80
                                         for f in feeds)):
        raise BadRequest("feeds is a list of 1 to 16 camera Feed ids", code="bad_export")
    choices: dict[str, Any] = {}
    for name in ("conservative", "narration", "drawings"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise BadRequest(f"{name} is true or false", code="bad_export")
        choices[name] = value
    return feeds, choices


def _decision(body: Any) -> tuple[str, str | None, str]:
    if not isinstance(body, dict) or body.get("decision") not in ("sign_off", "reject"):
        raise BadRequest("expected {\"decision\": \"sign_off\" or \"reject\", \"playback\", "
                         "\"note\"?}", code="bad_review")
    unknown = set(body) - {"decision", "playback", "note"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}", code="bad_review")
    playback = body.get("playback")
    if playback is not None and (not isinstance(playback, str) or len(playback) > 200):
        raise BadRequest("playback is the player's playback id", code="bad_review")
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > NOTE_CHARS:
        raise BadRequest(f"note is text of at most {NOTE_CHARS} characters", code="bad_review")
    note = _CONTROL.sub("", note).strip()
    decision = "signed_off" if body["decision"] == "sign_off" else "rejected"
    if decision == "rejected" and not note:
        raise BadRequest("a rejection says why (note)", code="bad_review")
    return decision, playback, note


def _cameras(directory: Path) -> list[str]:
    try:
        return [str(f["id"]) for f in RecordingFiles.load(directory).video_feeds()]
    except ExportError:
        return []
