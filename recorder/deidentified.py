"""A de-identified export on disk: a new artefact beside its Recording that
stays *pending review* until someone signs it off.

Layout, inside the Recording's directory (so it is deleted with it, by hand or
by retention, and held with it)::

    deidentified/<export id>/
        export.json      what it is: who asked, the options, its state, its files
                         (size, sha256, faces found), the review
        <feed>.mp4       one de-identified MP4 per camera (recorder.deidentify)
        .lock            held (flock) by the process making it

States: ``queued`` → ``running`` → ``pending_review`` → ``signed_off`` or
``rejected``; ``failed`` (an error, a cancellation, or the process making it
died: export.json says ``running`` but nobody holds the lock). While running,
export.json carries ``progress`` (``done``/``total``, seconds of video, the
face pass weighted) rewritten every few seconds, so another process (the Node,
for an export ``scrubin export --deidentify`` is making) can show it.

Nothing here checks who may do what: the server does (server/deidentified.py).
Every function does file I/O: call them off the event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .deidentify import DeidentifyOptions, deidentify_feed, work
from .export import ExportError, Progress, RecordingFiles
from .recording import write_atomic
from .writer import sha256_file

logger = logging.getLogger(__name__)

EXPORTS = "deidentified"
RECORD = "export.json"
LOCK = ".lock"
FORMAT = "scrubin-deidentified/1"
EXPORT_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
#: A camera's file is named after its Feed: ``room.video.mp4``.
FEED_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.video")
STATES = ("queued", "running", "pending_review", "signed_off", "rejected", "failed")
UNFINISHED = frozenset({"queued", "running"})
DECISIONS = ("signed_off", "rejected")
#: How often a running export rewrites its progress into export.json.
SAVE_PROGRESS_S = 2.0


class ExportCancelled(Exception):
    """The export was stopped on request (its progress callback said so)."""


class ExportBusy(ExportError):
    """Another process is making this export."""


class ExportState(ExportError):
    """The export is not in the state the operation needs."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def export_directory(recording_dir: Path, export_id: str) -> Path:
    if not EXPORT_ID.match(export_id):
        raise ExportError(f"{export_id!r} is not an export id")
    return Path(recording_dir) / EXPORTS / export_id


class Claim:
    """The lock of an export being made, held from its creation to its end, so
    that no other process (another Node on the same disk) takes a queued export
    for one whose maker died."""

    def __init__(self, directory: Path, tries: int = 20) -> None:
        self.directory = directory
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        for attempt in range(tries):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A reader's probe (locked()) holds it for microseconds; a maker, for good.
                if attempt == tries - 1:
                    os.close(fd)
                    raise ExportBusy(f"export {directory.name} is being made elsewhere"
                                     ) from None
                time.sleep(0.05)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def create(recording_dir: str | os.PathLike[str], options: DeidentifyOptions, *,
           requested_by: dict[str, Any], via: str, feeds: Sequence[str] | None = None,
           export_id: str | None = None) -> tuple[dict[str, Any], Claim]:
    """A new export of ``feeds`` (default: every camera recorded), ``queued``,
    and its claim: pass both to :func:`make` (or release the claim)."""
    recording = Path(recording_dir)
    files = RecordingFiles.load(recording)
    cameras = [str(f["id"]) for f in files.video_feeds()]
    if not cameras:
        raise ExportError("this recording has no video")
    chosen = cameras if feeds is None else list(dict.fromkeys(feeds))
    unknown = [f for f in chosen if f not in cameras]
    if unknown or not chosen:
        raise ExportError(f"no recorded camera {', '.join(unknown) or '(none chosen)'} "
                          f"(cameras: {', '.join(cameras)})")
    export_id = export_id or secrets.token_urlsafe(12)
    directory = export_directory(recording, export_id)
    directory.parent.mkdir(mode=0o750, exist_ok=True)
    directory.mkdir(mode=0o750)
    # Locked before export.json exists: whoever reads a record finds it claimed.
    claim = Claim(directory)
    session = files.manifest.get("session") or {}
    record: dict[str, Any] = {
        "format": FORMAT,
        "id": export_id,
        "recording": files.manifest.get("id"),
        "session": session.get("session_id"),
        "state": "queued",
        "requested": {"by": requested_by, "at": now_iso(), "via": via},
        "feeds": chosen,
        "options": options.describe(),
        "started": None,
        "finished": None,
        "progress": None,
        "duration": None,
        "files": [],
        "error": None,
        "review": None,
    }
    try:
        save(directory, record)
    except BaseException:
        claim.release()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return record, claim


def save(directory: Path, record: dict[str, Any], *, sync: bool = True) -> None:
    write_atomic(directory / RECORD, (json.dumps(record, indent=1, ensure_ascii=False)
                                      + "\n").encode(), sync=sync)


def load(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{directory.name}: no readable {RECORD}: {exc}") from None
    if not isinstance(record, dict) or record.get("id") != directory.name:
        raise ExportError(f"{directory.name}: {RECORD} is not this export's")
    return record


def directories(recording_dir: str | os.PathLike[str]) -> list[Path]:
    """The export directories of a recording (real directories only, no symlinks)."""
    root = Path(recording_dir) / EXPORTS
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            return []
        children = sorted(root.iterdir())
    except OSError:
        return []
    out = []
    for child in children:
        try:
            if EXPORT_ID.match(child.name) and stat.S_ISDIR(os.lstat(child).st_mode):
                out.append(child)
        except OSError:
            continue
    return out


def locked(directory: Path) -> bool:
    """Is some process making this export (holding its lock)?"""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing lets go of the probe's own lock
    return False


def settle(directory: Path) -> dict[str, Any]:
    """The export's record; one that says queued or running while nobody holds
    its lock was cut short (its process died): it becomes ``failed``, and its
    half-written files go."""
    record = load(directory)
    if record.get("state") not in UNFINISHED or locked(directory):
        return record
    _remove_media(directory)
    record.update(state="failed", error="interrupted: the process making it stopped",
                  finished=record.get("finished") or now_iso())
    save(directory, record)
    return record


def make(recording_dir: str | os.PathLike[str], claim: Claim, options: DeidentifyOptions,
         *, progress: Progress | None = None,
         cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Make a ``queued`` export (its claim from :func:`create`, released at
    the end): every chosen camera de-identified, then ``pending_review``.
    ``progress(done, total)`` as it goes; ``cancelled()`` true stops it
    (:class:`ExportCancelled`). On any failure the export is ``failed``, its
    error recorded, no media file left; the error is raised."""
    recording = Path(recording_dir)
    directory = claim.directory
    export_id = directory.name
    try:
        record = load(directory)
        if record.get("state") != "queued":
            raise ExportState(f"export {export_id} is {record.get('state')}, not queued",
                              str(record.get("state")))
        try:
            record = _make(recording, directory, record, options, progress, cancelled)
        except BaseException as exc:
            _remove_media(directory)
            reason = "cancelled" if isinstance(exc, ExportCancelled) else str(exc) or repr(exc)
            record.update(state="failed", error=reason, finished=now_iso(), files=[])
            with contextlib.suppress(OSError):
                save(directory, record)
            raise
    finally:
        claim.release()
    return record


def _make(recording: Path, directory: Path, record: dict[str, Any],
          options: DeidentifyOptions, progress: Progress | None,
          cancelled: Callable[[], bool] | None) -> dict[str, Any]:
    files = RecordingFiles.load(recording)
    feeds = [str(f) for f in record.get("feeds", [])]
    for feed_id in feeds:
        if not FEED_FILE.fullmatch(feed_id):
            raise ExportError(f"{feed_id!r} cannot name a file")
    costs = [work(files, feed_id, options) for feed_id in feeds]
    total = sum(costs)
    record.update(state="running", started=now_iso(),
                  progress={"done": 0.0, "total": round(total, 3)})
    save(directory, record)
    finished_work = 0.0
    last_save = time.monotonic()

    def report(done: float, _total: float) -> None:
        nonlocal last_save
        if cancelled is not None and cancelled():
            raise ExportCancelled(directory.name)
        overall = min(finished_work + done, total)
        if progress is not None:
            progress(overall, total)
        if time.monotonic() - last_save >= SAVE_PROGRESS_S:
            last_save = time.monotonic()
            record["progress"] = {"done": round(overall, 3), "total": round(total, 3)}
            save(directory, record, sync=False)

    results: list[dict[str, Any]] = []
    for feed_id, cost in zip(feeds, costs, strict=True):
        name = f"{feed_id}.mp4"
        partial = directory / f".{name}.part"
        result = deidentify_feed(recording, feed_id, partial, options, progress=report)
        os.replace(partial, directory / name)
        results.append({**result.describe(), "file": name,
                        "bytes": (directory / name).stat().st_size,
                        "sha256": sha256_file(directory / name)})
        finished_work += cost
    record.update(state="pending_review", files=results, finished=now_iso(),
                  progress={"done": round(total, 3), "total": round(total, 3)},
                  duration=max((r["duration"] for r in results), default=0.0))
    save(directory, record)
    if progress is not None:
        progress(total, total)
    return record


def abandon(claim: Claim, reason: str) -> None:
    """A ``queued`` export that will not be made (cancelled before it started):
    ``failed`` with ``reason``; its claim released."""
    try:
        record = load(claim.directory)
        if record.get("state") == "queued":
            record.update(state="failed", error=reason, finished=now_iso())
            save(claim.directory, record)
    except (ExportError, OSError) as exc:
        logger.warning("export %s not marked failed: %s", claim.directory.name, exc)
    finally:
        claim.release()


def review(directory: Path, decision: str, *, by: dict[str, Any], note: str = "",
           playback: str | None = None) -> dict[str, Any]:
    """Sign off (``signed_off``) or reject (``rejected``) a ``pending_review`` export."""
    if decision not in DECISIONS:
        raise ValueError(f"decision is one of {DECISIONS}")
    record = load(directory)
    if record.get("state") != "pending_review":
        raise ExportState(f"export {directory.name} is {record.get('state')}, not pending "
                          "review", str(record.get("state")))
    record["review"] = {"decision": decision, "by": by, "at": now_iso(), "note": note,
                        "playback": playback}
    record["state"] = decision
    save(directory, record)
    return record


def _remove_media(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name.endswith(".mp4") or child.name.endswith(".mp4.part"):
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def inventory(directory: Path) -> list[dict[str, Any]]:
    """Every file of an export as it is now: name, size, sha256. A file removed
    meanwhile (by another Node sharing the root, or a person) is not listed."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for child in sorted(directory.iterdir()):
            item: dict[str, Any] = {"file": child.name}
            try:
                st = os.lstat(child)
                if not stat.S_ISREG(st.st_mode):
                    item["kind"] = "other"
                else:
                    item["bytes"] = st.st_size
                    item["sha256"] = sha256_file(child)
            except FileNotFoundError:
                continue
            except OSError as exc:
                item["error"] = exc.strerror or str(exc)
            out.append(item)
    return out


def remove(directory: Path) -> tuple[list[dict[str, Any]], bool]:
    """Delete an export: (its files with their sha256 just before, whether the
    directory is checked gone)."""
    files = inventory(directory)
    # rmtree unlinks symlinks inside, it never follows them.
    shutil.rmtree(directory, ignore_errors=True)
    return files, not os.path.lexists(directory)
