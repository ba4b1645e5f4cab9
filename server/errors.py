"""Errors that reach clients: each says whose fault it is.

``fault`` is "user" (fix your request: token, role, input), "protocol" (the
client broke the protocol: a bug in the client) or "server" (ours; retry later).
"""

from __future__ import annotations

from typing import Any, Literal

Fault = Literal["user", "protocol", "server"]


class ScrubinError(Exception):
    status = 400
    code = "bad_request"
    fault: Fault = "user"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fault": self.fault,
                "status": self.status}


class BadRequest(ScrubinError):
    status = 400
    code = "bad_request"
    fault = "protocol"


class Unauthorized(ScrubinError):
    status = 401
    code = "unauthorized"


class Forbidden(ScrubinError):
    status = 403
    code = "forbidden"


class NotFound(ScrubinError):
    status = 404
    code = "not_found"


class RequestTimeout(ScrubinError):
    """The request (its body) did not arrive in time; the connection closes."""

    status = 408
    code = "request_timeout"
    fault = "protocol"


class Conflict(ScrubinError):
    status = 409
    code = "conflict"


class Gone(ScrubinError):
    status = 410
    code = "gone"


class PayloadTooLarge(ScrubinError):
    status = 413
    code = "too_large"
    fault = "protocol"


class UnsupportedMediaType(ScrubinError):
    status = 415
    code = "unsupported_media_type"
    fault = "protocol"


class Unprocessable(ScrubinError):
    """Well-formed but unusable input, e.g. an SDP offer with no usable codec."""

    status = 422
    code = "unprocessable"


class TooManyRequests(ScrubinError):
    status = 429
    code = "rate_limited"


class Unavailable(ScrubinError):
    status = 503
    code = "unavailable"
    fault = "server"
