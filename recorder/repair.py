"""Finishing a Recording that a crash or a full disk left unfinished.

A Node killed while recording leaves a manifest in state ``recording`` whose
last part of each Feed is ``complete: false`` with no duration, no frame
count and no checksum; WebM parts then carry no duration either (Matroska
writes it when the file is closed), so a player cannot tell how long they are.
:func:`repair` makes such a recording whole again, from what is on disk:

- every incomplete part is **remuxed into a copy** (no decoding): the packets
  the file holds, up to its last complete one, into a new file of the same
  kind, which is closed properly (WebM: duration and cues; MP4: fragments and
  their index); the copy replaces the part atomically. Its true duration,
  frame count, size and sha256 go into the manifest (``repaired: true``); a
  part whose file is missing or holds no frame is dropped from the list;
- the part's ``start`` is the one the manifest last said: the writer keeps the
  open part's start current there (recorder.writer), so Feeds stay in sync;
- the recording ends where its media ends: ``ended_t`` is the end of its last
  part (``duration = ended_t - started_t``), its state ``interrupted`` (a
  ``failed`` recording stays ``failed``), and ``recording_interrupted`` is the
  last event;
- temporary files (``.*.tmp``, copies of an earlier repair cut short) are
  removed.

A running Recording holds an exclusive ``flock`` on its ``events.jsonl`` (the
kernel releases it when the process dies); :func:`repair` takes the same
lock first and leaves alone (:class:`RecordingBusy`) a recording that another
process, or another Node sharing the disk, is still writing.

Nothing here runs on the event loop. A full disk makes :func:`repair` raise
(``OSError``); the recording is left as it was, to be repaired again later.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import itertools
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from .recording import EVENTS, MANIFEST, write_atomic
from .writer import WriterOptions, container_format, sha256_file

logger = logging.getLogger(__name__)

#: States a recording is in while something is still writing it.
UNFINISHED = frozenset({"new", "recording", "stopping"})
#: Temporary files: the atomic writes' (``.<name>.tmp``) and repair copies.
_TEMPORARY = re.compile(r"^\..+\.(tmp|repair)$")
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RecordingBusy(Exception):
    """Someone is writing this recording (its lock is held): not ours to repair."""


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int]:
    """The recording's lock (see the module docstring); yields its events file."""
    fd = os.open(directory / EVENTS, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecordingBusy(f"{directory.name} is being recorded") from None
        yield fd
    finally:
        os.close(fd)


@dataclass
class RepairReport:
    """What :func:`repair` did to one recording."""

    recording: str
    state: str
    parts: list[dict[str, Any]] = field(default_factory=list)  # repaired: file, frames, ...
    dropped: list[str] = field(default_factory=list)  # listed parts with no file or no frame
    removed: list[str] = field(default_factory=list)  # temporary files

    def describe(self) -> dict[str, Any]:
        return {"recording": self.recording, "state": self.state, "parts": self.parts,
                "dropped": self.dropped, "removed": self.removed}


def needs_repair(manifest: dict[str, Any]) -> bool:
    """True for a recording nothing is writing any more that is not finished."""
    if manifest.get("state") in UNFINISHED:
        return True
    return any(not part.get("complete") for feed in manifest.get("feeds", [])
               for part in feed.get("parts", []))


def remove_temporary(directory: Path, *, min_age_s: float = 0.0) -> list[str]:
    """Remove what an interrupted atomic write or repair left in ``directory``.
    ``min_age_s``: only what was last written longer ago than this, for a
    directory other processes write too (the root of recordings shared by
    Nodes: another Node's write under way is not a leftover)."""
    removed = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for child in directory.iterdir():
            if _TEMPORARY.match(child.name) and not child.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    if min_age_s and now - child.stat().st_mtime < min_age_s:
                        continue
                    child.unlink()
                    removed.append(child.name)
    return removed


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


@dataclass
class _Copied:
    frames: int
    duration: float


def remux_copy(source: Path, target: Path, mime_type: str) -> _Copied:
    """Copy the packets of ``source`` (up to a torn end) into ``target``, a
    properly closed file of the same kind, timestamps from 0. Raises
    ``ValueError`` when ``source`` holds no packet."""
    fmt = container_format(mime_type, WriterOptions())
    options = {k: v for k, v in fmt.options.items() if k != "flush_packets"}
    with av.open(str(source)) as src:
        stream = (src.streams.video or src.streams.audio)[0]
        time_base = stream.time_base or Fraction(1, 1000)
        packets: list[tuple[int, int, Any]] = []  # (pts, dts, packet)
        try:
            for packet in src.demux(stream):
                if packet.dts is None or packet.pts is None or packet.is_corrupt:
                    continue
                packets.append((packet.pts, packet.dts, packet))
        except (av.error.InvalidDataError, av.error.EOFError, OSError):
            pass  # the torn end of a file being written when the Node stopped
        if not packets:
            raise ValueError(f"{source.name} holds no complete frame")
        first = packets[0][0]
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with open(fd, "wb") as fh:
            with av.open(fh, "w", format=fmt.container, options=options) as dst:
                out = dst.add_stream_from_template(stream)
                for pts, dts, packet in packets:
                    packet.pts, packet.dts = pts - first, dts - first
                    packet.stream = out
                    dst.mux(packet)
            fh.flush()
            os.fsync(fh.fileno())
    times = [pts - first for pts, _, _ in packets]
    steps = [b - a for a, b in itertools.pairwise(times) if b > a]
    last = packets[-1][2].duration or (statistics.median(steps) if steps else 0)
    return _Copied(len(packets), float((times[-1] + last) * time_base))


def finish_parts(path: Path, manifest: dict[str, Any], report: RepairReport) -> list[float]:
    """Finish every incomplete part ``manifest`` lists (changed in place; see
    the module docstring), what was done in ``report``; returns where each
    part kept ends on the Session clock. The caller holds the recording's
    lock. Also used by a Node that continues a Recording whose previous
    writer died (recorder.recording, ``resume``)."""
    ends: list[float] = []
    for feed in manifest.get("feeds", []):
        kept = []
        for part in feed.get("parts", []):
            name = str(part.get("file", ""))
            if part.get("complete"):
                kept.append(part)
                ends.append(float(part["start"]) + float(part.get("duration") or 0))
                continue
            file = path / name
            if not _PART_NAME.match(name) or ".." in name or not file.is_file() \
                    or file.is_symlink():
                report.dropped.append(name)
                continue
            copy = path / f".{name}.repair"
            try:
                copied = remux_copy(file, copy, str(part.get("codec") or feed.get("codec")))
            except (ValueError, av.error.FFmpegError) as exc:
                logger.warning("recording %s: %s dropped: %s", path.name, name, exc)
                with contextlib.suppress(OSError):
                    copy.unlink()
                file.unlink()
                report.dropped.append(name)
                continue
            except BaseException:
                with contextlib.suppress(OSError):
                    copy.unlink()
                raise
            os.replace(copy, file)
            part.update(frames=copied.frames, duration=round(copied.duration, 4),
                        bytes=file.stat().st_size, sha256=sha256_file(file), complete=True,
                        ended_by=part.get("ended_by") or "interrupted", repaired=True)
            kept.append(part)
            ends.append(float(part["start"]) + copied.duration)
            report.parts.append({"feed": feed.get("id"), "file": name,
                                 "frames": copied.frames,
                                 "duration": round(copied.duration, 4),
                                 "sha256": part["sha256"]})
        feed["parts"] = kept
    return ends


def repair(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None,
           *, now: float | None = None) -> RepairReport | None:
    """Finish the recording in ``directory`` (see the module docstring); None
    when it needed nothing but the removal of temporary files. ``manifest``:
    use this one rather than the file (the final manifest a full disk kept from
    being written). Raises ``OSError`` when the disk refuses (still full),
    :class:`RecordingBusy` when someone is still writing it."""
    path = Path(directory)
    with _locked(path) as events:
        return _repair(path, manifest, events, now)


def _repair(path: Path, manifest: dict[str, Any] | None, events: int,
            now: float | None) -> RepairReport | None:
    removed = remove_temporary(path)
    if manifest is None:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if not needs_repair(manifest):
        if removed:
            logger.info("recording %s: removed %s", path.name, ", ".join(removed))
        return None
    report = RepairReport(str(manifest.get("id") or path.name), "", removed=removed)
    manifest = json.loads(json.dumps(manifest))  # ours to change
    ends = finish_parts(path, manifest, report)
    started_t = float(manifest.get("started_t") or 0.0)
    clock_zero = manifest.get("clock_zero_unix")
    if manifest.get("state") in UNFINISHED:
        manifest["state"] = "interrupted"
    if manifest.get("ended_t") is None:
        ended_t = round(max([started_t, *ends]), 3)
        manifest["ended_t"] = ended_t
        manifest["duration"] = round(ended_t - started_t, 3)
        if isinstance(clock_zero, (int, float)):
            manifest["ended"] = _iso(float(clock_zero) + ended_t)
        _append_event(events, {"t": ended_t, "type": "recording_interrupted"})
    for gap in manifest.get("gaps") or []:
        # The Node that continued it died before it wrote anything.
        if isinstance(gap, dict) and gap.get("end") is None:
            gap["end"] = max(float(gap.get("start") or 0.0), float(manifest["ended_t"]))
    manifest["repaired"] = {
        "at": _iso(now if now is not None else datetime.datetime.now(datetime.UTC).timestamp()),
        "parts": [p["file"] for p in report.parts], "dropped": report.dropped}
    report.state = str(manifest["state"])
    write_atomic(path / MANIFEST,
                 (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    logger.info("recording %s repaired: %s, %d part(s) finished, %d dropped", path.name,
                report.state, len(report.parts), len(report.dropped))
    return report


def _append_event(fd: int, event: dict[str, Any]) -> None:
    """Append one event to the open events file, after cutting a line torn by the crash."""
    size = os.fstat(fd).st_size
    if size:
        os.lseek(fd, max(0, size - 65536), os.SEEK_SET)
        tail = os.read(fd, 65536)
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())
    os.fsync(fd)
