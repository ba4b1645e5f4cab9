"""Property-based fuzzing: the HTTP API from the OpenAPI document the server
serves (schemathesis), and the websocket protocol after hello (hypothesis).

The server never answers 5xx, answers only with the statuses, content types
and bodies its document declares, and keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.http.review import RECORDINGS
from server.roles import Role
from server.tokens import NODE_WIDE

from .conftest import Server, make_config, start_server

pytestmark = pytest.mark.slow

T = TypeVar("T")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_EXAMPLES = 30

# WHIP and WHEP bodies are SDP text.
schemathesis.serializer.alias("application/sdp", "text/plain")


class LiveNode:
    """A real server on its own event loop in a thread, so synchronous clients
    (schemathesis uses requests) can call it from the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-node",
                                       daemon=True)
        self.thread.start()
        config = make_config(limits={"auth_failures_per_minute": 100_000})
        self.server: Server
        self.server, self._runner = self.run(start_server(config))
        self.base_url = self.server.base_url

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def token(self, role: Role, session: str = "or1-live") -> str:
        return self.server.tokens.issue(session, role, name=f"Fuzz {role.value}")

    def close(self) -> None:
        self.run(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live_node() -> Iterator[LiveNode]:
    node = LiveNode()
    try:
        yield node
    finally:
        node.close()


def fuzz(node: LiveNode, token: str, *, path_parameters: dict[str, str] | None = None,
         exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[str]:
    """Every operation of the served document (or ``only`` these), positive and
    negative inputs, ``MAX_EXAMPLES`` each; the failures, described."""
    schema = schemathesis.openapi.from_url(f"{node.base_url}/api/openapi.json", timeout=10)
    schema.config.update(base_url=node.base_url)
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    statuses: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    if only:
        operations = [o for o in operations if o.definition.raw.get("operationId") in only]
        assert len(operations) == len(only)
    for operation in operations:
        if operation.definition.raw.get("operationId") in exclude:
            continue
        # Negative inputs where there is something to break: a body or a query
        # (any string is a valid path parameter).
        negatable = bool(operation.body) or bool(operation.query)
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (
            GenerationMode.POSITIVE,)
        for mode in modes:
            params = {k: v for k, v in (path_parameters or {}).items()
                      if k in {p.name for p in operation.path_parameters}}
            strategy = operation.as_strategy(mode, headers=headers, path_parameters=params)

            @given(case=strategy)
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                response = case.call_and_validate(checks=CHECKS, timeout=15)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Exception as exc:  # one line per failing operation, then go on
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    # Real traffic, and not only refusals.
    assert sum(statuses.values()) > 10 * len(operations), statuses
    assert any(200 <= status < 300 for status in statuses), statuses
    print(f"fuzzed {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}")
    return failures


def test_api_as_a_node_admin(live_node: LiveNode) -> None:
    failures = fuzz(live_node, live_node.token(Role.ADMIN, NODE_WIDE))
    assert not failures, "\n\n".join(failures)


def test_api_as_the_sessions_expert(live_node: LiveNode) -> None:
    # The live Session and a real slot, so SDP and JSON bodies reach the parsers;
    # not ending it (that would only test 410 from then on).
    failures = fuzz(live_node, live_node.token(Role.EXPERT),
                    path_parameters={"session": "or1-live", "slot": "room"},
                    exclude=("endSession", "endAdminSession"))
    assert not failures, "\n\n".join(failures)


REVIEW_OPERATIONS = ("listRecordings", "getRecording", "recordingMedia", "recordingThumbnail")


def test_review_api_as_a_reviewer_with_a_recording(live_node: LiveNode) -> None:
    """Finding 6: the review API's parameters, query strings of signed media
    URLs included (``exp=²`` was a 500), are fuzzed too."""
    from .recording_helpers import PART, PLANTED_ID, build_recording

    server = live_node.server
    live_node.run(build_recording(server.config.recording.root, "or1-live",
                                  recording_id=PLANTED_ID))
    live_node.run(asyncio.to_thread(server.app[RECORDINGS].open))
    failures = fuzz(live_node, live_node.token(Role.REVIEWER), only=REVIEW_OPERATIONS,
                    path_parameters={"session": "or1-live", "recording": PLANTED_ID,
                                     "part": PART})
    assert not failures, "\n\n".join(failures)


def test_the_node_still_serves_after_the_http_fuzzing(live_node: LiveNode) -> None:
    assert requests.get(f"{live_node.base_url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{live_node.base_url}/readyz", timeout=5).status_code == 200
    answer = requests.get(f"{live_node.base_url}/api/sessions/or1-live", timeout=5,
                          headers={"Authorization": f"Bearer {live_node.token(Role.TRAINEE)}"})
    assert answer.status_code in (200, 410), answer.text


# -- the websocket protocol ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)
KNOWN_TYPES = ["ping", "publish", "unpublish", "subscribe", "unsubscribe", "hello",
               "end_session_", "chat", "ask", "draw", "hand", "vote", "mark", "sterile",
               "interaction_sync", "mic_grant"]
messages = st.one_of(
    st.dictionaries(st.sampled_from(["type", "id", "slot", "feed", "sdp", "subscription",
                                     "text", "token", "points", "on", "participant"]),
                    json_values, max_size=5),
    st.fixed_dictionaries({"type": st.sampled_from(KNOWN_TYPES)},
                          optional={"id": st.integers() | st.text(max_size=8),
                                    "slot": json_values, "feed": json_values,
                                    "sdp": st.text(max_size=200), "text": json_values}),
    json_values,
)
frames = st.one_of(messages.map(json.dumps), st.text(max_size=200),
                   st.binary(max_size=64))


@given(batch=st.lists(frames, min_size=1, max_size=8))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_websocket_messages_after_hello_get_no_server_error(
        live_node: LiveNode, batch: list[Any]) -> None:
    async def exchange() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{live_node.base_url}/ws") as ws:
            await ws.send_json({"type": "hello", "token": live_node.token(Role.TRAINEE),
                                "id": "hello"})
            welcome = await ws.receive_json(timeout=5)
            if welcome.get("type") == "error":
                # The Session was ended by the HTTP fuzzing: still a clean refusal.
                assert welcome["error"]["status"] < 500, welcome
                return
            assert welcome["type"] == "welcome", welcome
            for frame in batch:
                if isinstance(frame, bytes):
                    await ws.send_bytes(frame)
                else:
                    await ws.send_str(frame)
            await ws.send_json({"type": "ping", "id": "last"})
            while True:
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, batch)
                reply = json.loads(msg.data)
                if reply.get("type") == "error":
                    assert reply["error"]["status"] < 500, (reply, batch)
                    assert reply["error"]["fault"] != "server", (reply, batch)
                if reply.get("id") == "last":
                    assert reply["type"] == "pong", reply
                    return

    asyncio.run(exchange())


def test_the_node_still_serves_after_the_websocket_fuzzing(live_node: LiveNode) -> None:
    assert requests.get(f"{live_node.base_url}/healthz", timeout=5).status_code == 200
