"""RecordingError: why a recording (or one Feed of it) stopped writing.

``code`` is for programs (the websocket, the expert's page), ``message`` for
people; neither contains a filesystem path (``path`` keeps it for the logs).
"""

from __future__ import annotations

import errno
from typing import Any, Literal

ErrorCode = Literal["disk_full", "not_writable", "io_error", "mux_failed", "stalled"]

#: Codes after which nothing more can be written anywhere in the recording.
FATAL_CODES: frozenset[str] = frozenset({"disk_full", "not_writable"})

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT,
                 errno.EISDIR}


class RecordingError(Exception):
    def __init__(self, code: ErrorCode, message: str, *, feed_id: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
        self.feed_id = feed_id
        self.path = path

    def describe(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "feed": self.feed_id}


def error_from_exception(exc: BaseException, *, feed_id: str | None = None,
                         path: str | None = None) -> RecordingError:
    """Classify what the filesystem or the muxer raised."""
    if isinstance(exc, RecordingError):
        return exc
    number = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and number in _DISK_FULL:
        return RecordingError("disk_full", "the recording disk is full", feed_id=feed_id,
                              path=path)
    if isinstance(exc, OSError) and number in _NOT_WRITABLE:
        reason = errno.errorcode.get(number or 0, "?")
        return RecordingError("not_writable",
                              f"the recording directory is not writable ({reason})",
                              feed_id=feed_id, path=path)
    if isinstance(exc, OSError):
        return RecordingError("io_error", f"writing the recording failed: {exc.strerror or exc}",
                              feed_id=feed_id, path=path)
    return RecordingError("mux_failed", f"the recording could not be written: "
                          f"{type(exc).__name__}: {exc}", feed_id=feed_id, path=path)
