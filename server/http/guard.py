"""The HTTP connection below the handlers (docs/security.md, "Connections" and
"Logs"): the one place that reaches into aiohttp's server internals, as
server/media/hooks.py does for aiortc; tests/test_hardening.py fails loudly if
an aiohttp upgrade moves them.

- **Access log without secrets.** Signed media URLs carry ``sig=`` and the
  grant they belong to in their query: the access log writes the path only.
- **Malformed requests are not echoed.** aiohttp answers a request it cannot
  parse (an oversized or invalid header) with a 400 whose body, and an ERROR
  log line whose traceback, quote the offending bytes: an ``Authorization``
  header included. Here they get the documented error object and one line
  without them.
- **Slow clients.** aiohttp has no timeout for reading headers: a client
  sending one byte a second holds a connection (and a file descriptor)
  forever. ``handler_args`` give every connection ``limits.header_timeout_s``
  to complete a request's headers after it opens or after the previous
  response (the keep-alive timer, which closes a connection still waiting for
  a complete request), and ``lingering_time`` bounds reading a body a handler
  did not want; handlers read bodies within ``limits.body_timeout_s``
  (``read_body`` in common.py). A reverse proxy's own limits may sit in front
  as well, not instead.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from ..config import Config

#: Seconds a body the handler did not read may take to arrive before the
#: connection closes (aiohttp reads it so the connection can be reused).
LINGER_S = 1.0


class AccessLog(AbstractAccessLogger):
    """One line per request: client, method, path (never the query), status,
    size, duration. No Referer or User-Agent either. The path is percent-encoded
    again: a request cannot write control characters (a forged line) or
    undecodable bytes into the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse,
            time: float) -> None:
        path = quote(request.path, safe="/:@!$&'()*+,;=-._~")
        self.logger.info('%s "%s %s" %s %s %.3fs', request.remote, quote(request.method),
                         path, response.status, response.body_length, time)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering unparseable requests without
    quoting them."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            # Handler failures: errors_middleware has turned every Exception
            # into the error object already; this is aiohttp's own.
            return super().handle_error(request, status, exc, None)
        # The exception's message and traceback quote the request's bytes.
        self.logger.info("refused a malformed request from %s (%d %s)", request.remote,
                         status, type(exc).__name__ if exc is not None else "")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        body = {"code": "bad_request", "fault": "protocol", "status": status,
                "message": "malformed HTTP request (a header too long or invalid?)"}
        response = web.Response(status=status, text=json.dumps(body),
                                content_type="application/json")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """Makes a GuardedRequestHandler for each connection (aiohttp's own
    ``Server.__call__``, with the subclass)."""

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class NodeRunner(web.AppRunner):
    """The runner every Node (and every test server) uses."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same state, one method more: the app's handler and factory, kwargs.
        server.__class__ = GuardedServer
        return server


def handler_args(config: Config) -> dict[str, Any]:
    """``web.Application(handler_args=…)``: for every connection."""
    return {
        "access_log_class": AccessLog,
        # aiohttp's keep-alive timer starts when a connection opens and after
        # each response, and closes a connection still waiting for a complete
        # request: it is the header timeout (and the idle keep-alive).
        "keepalive_timeout": config.limits.header_timeout_s,
        "lingering_time": LINGER_S,
    }
