"""Property-based fuzzing: the HTTP API from the OpenAPI document the server
serves (schemathesis), and the websocket protocol after hello (hypothesis).

The server never answers 5xx, answers only with the statuses, content types
and bodies its document declares, and keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
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
from server.http.ws import SOCKET_MESSAGES
from server.recordings import MESSAGE_TYPES as RECORDING_MESSAGES
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

    def __init__(self, limits: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-node",
                                       daemon=True)
        self.thread.start()
        config = make_config(limits=limits or {"auth_failures_per_minute": 100_000})
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


EXPORT_OPERATIONS = ("listExports", "sharedExports", "getExport", "exportMedia",
                     "reviewExport", "deleteExport", "requestExport")


def test_export_api_as_an_admin_with_a_deidentified_export(live_node: LiveNode) -> None:
    """The de-identified exports' parameters and bodies, their signed media URLs
    included, fuzzed against a real export pending review."""
    from recorder import deidentified
    from recorder.deidentify import DeidentifyOptions

    from .recording_helpers import build_recording

    server = live_node.server
    recording = live_node.run(build_recording(server.config.recording.root, "or1-live",
                                              seconds=1.0, thumbnail=False))
    live_node.run(asyncio.to_thread(server.app[RECORDINGS].open))
    options = DeidentifyOptions(face_slots=())
    record, claim = deidentified.create(recording.directory, options, via="test",
                                        requested_by={"id": "x", "name": "Fuzz", "role": "admin"})
    deidentified.make(recording.directory, claim, options)
    # Not deleting it, not asking for more (each would be a real export).
    failures = fuzz(live_node, live_node.token(Role.ADMIN), only=EXPORT_OPERATIONS[:5],
                    path_parameters={"session": "or1-live", "recording": recording.id,
                                     "export": record["id"], "file": "room.video.mp4"})
    assert not failures, "\n\n".join(failures)


def test_the_node_still_serves_after_the_http_fuzzing(live_node: LiveNode) -> None:
    assert requests.get(f"{live_node.base_url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{live_node.base_url}/readyz", timeout=5).status_code == 200
    answer = requests.get(f"{live_node.base_url}/api/sessions/or1-live", timeout=5,
                          headers={"Authorization": f"Bearer {live_node.token(Role.TRAINEE)}"})
    assert answer.status_code in (200, 410), answer.text


# -- the websocket protocol ------------------------------------------------------------------

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ROLES = ("expert", "trainee", "admin", "recorder")
#: Handled by the websocket itself (server/http/ws.py); the rest by the Session's
#: interaction and the recorder, which name their own types.
SOCKET_TYPES = set(SOCKET_MESSAGES)


def documented_client_messages() -> dict[str, tuple[list[str], str]]:
    """Every client → server message type of docs/protocol.md: its fields, and
    the first Role its "who" column names (who may send it, so the fuzzing
    reaches the parsers rather than a role check)."""
    documented: dict[str, tuple[list[str], str]] = {}
    header = re.compile(r"^\| type \| fields \| who \| reply \|\n\|[-|]+\|\n((?:\|.*\|\n)+)",
                        re.MULTILINE)
    for table in header.finditer(PROTOCOL.read_text()):
        for row in table[1].splitlines():
            name_cell, fields_cell, who, _ = (c.strip() for c in row.strip().strip("|").split("|"))
            if fields_cell.startswith("see "):
                continue  # a pointer to the table that defines them
            positions = {r: who.find(r) for r in ROLES if r in who}
            role = min(positions, key=lambda r: positions[r]) if positions else "expert"
            for name in re.findall(r"`([a-z_]+)`", name_cell):
                documented[name] = (re.findall(r"`([a-z_]+)`", fields_cell), role)
    return documented


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)
#: Values that get past the first type checks, so the fuzzing reaches deeper.
plausible = st.sampled_from(["room", "room.video", "room.audio", "trainee-mic", "step",
                             "bookmark", "open", "answered", "internal_review", "", "#ff0000",
                             "v=0\r\n", 0, 1, 8, True, False, [0.5, 0.5], [[0.1, 0.2], [0.3, 0.4]],
                             {"kind": "arrow", "color": "#00ff00", "width": 4,
                              "points": [[0.1, 0.1], [0.9, 0.9]]},
                             {"recorded_by": "Dr A", "recorded_at": "2026-05-01T08:30:00Z",
                              "scope": "internal_review"}])


def documented_message(kind: str, fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    values = plausible | json_values
    every_field = st.fixed_dictionaries({"type": st.just(kind), **{f: values for f in fields}})
    some_fields = st.fixed_dictionaries(
        {"type": st.just(kind)}, optional={**{f: values for f in fields}, "extra": json_values})
    return every_field | some_fields


class WsNode(LiveNode):
    """A node of its own for the websocket fuzzing (the HTTP fuzzing may end
    Sessions), with message rates out of the way."""

    def __init__(self) -> None:
        self.sessions = 0
        super().__init__(limits={"auth_failures_per_minute": 100_000,
                                 "ws_messages_per_second": 100_000.0,
                                 "ws_message_burst": 100_000})

    def new_session(self) -> str:
        self.sessions += 1
        session_id = f"fuzz-{self.sessions}"

        async def create() -> None:
            self.server.registry.create_session(session_id, "or1", "Fuzzing")

        self.run(create())
        return session_id


@pytest.fixture(scope="module")
def ws_node() -> Iterator[WsNode]:
    node = WsNode()
    try:
        yield node
    finally:
        node.close()


async def exchange(node: LiveNode, token: str, frames: list[str | bytes],
                   ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """hello, then ``frames``, then a ping: the welcome and the replies by id.
    Stops early when the Session ends (end_session closes the socket)."""
    replies: dict[str, list[dict[str, Any]]] = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{node.base_url}/ws") as ws:
        await ws.send_json({"type": "hello", "token": token, "id": "hello"})
        welcome = await ws.receive_json(timeout=5)
        assert welcome["type"] == "welcome", welcome  # nothing fuzzed otherwise
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        await ws.send_json({"type": "ping", "id": "last"})
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                assert msg.data == 1000, (msg, frames)  # only end_session closes it
                return welcome, replies
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, frames)
            reply = json.loads(msg.data)
            if reply.get("type") == "error":
                assert reply["error"]["status"] < 500, (reply, frames)
                assert reply["error"]["fault"] != "server", (reply, frames)
            if reply.get("id") == "last":
                assert reply["type"] == "pong", reply
                return welcome, replies
            if reply.get("id") is not None:
                replies.setdefault(str(reply["id"]), []).append(reply)


def test_the_protocol_document_lists_every_message_the_server_handles(ws_node: WsNode) -> None:
    documented = documented_client_messages()
    handled = (SOCKET_TYPES | RECORDING_MESSAGES
               | ws_node.server.session().interaction.message_types)
    assert set(documented) - {"hello"} == handled
    assert documented["vote"][1] == "trainee" and documented["annotate"][1] == "expert"
    assert "consent" in documented["start_recording"][0]


def fuzz_message_type(node: WsNode, kind: str, fields: list[str], role: Role,
                      answered: dict[str, int], codes: dict[str, set[str]]) -> None:
    # end_session really ends its Session: one message, a fresh Session each time.
    batch_size = 1 if kind == "end_session" else 4
    session_id = node.new_session()

    @given(batch=st.lists(documented_message(kind, fields), min_size=1, max_size=batch_size))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(batch: list[dict[str, Any]]) -> None:
        session = node.new_session() if kind == "end_session" else session_id
        frames: list[str | bytes] = [
            json.dumps({**message, "id": f"m{i}"}) for i, message in enumerate(batch)]
        _, replies = asyncio.run(exchange(node, node.token(role, session), frames))
        for i in range(len(batch)):
            got = replies.get(f"m{i}", [])
            assert len(got) == 1, (kind, batch, replies)
            code = got[0].get("error", {}).get("code", got[0]["type"])
            assert code not in ("unknown_type", "rate_limited"), (kind, got)
            codes.setdefault(kind, set()).add(code)
            answered[kind] = answered.get(kind, 0) + 1

    run()


def test_every_documented_client_message_is_fuzzed(ws_node: WsNode) -> None:
    """Each type of docs/protocol.md, sent by a Role allowed to send it, with its
    documented fields holding random or plausible values: never a server error,
    every request answered, none of them unknown to the server."""
    answered: dict[str, int] = {}
    codes: dict[str, set[str]] = {}
    documented = documented_client_messages()
    for kind, (fields, role) in sorted(documented.items()):
        if kind != "hello":  # only ever the first message: fuzzed below
            fuzz_message_type(ws_node, kind, fields, Role(role), answered, codes)
    missing = sorted(k for k in documented if k != "hello" and answered.get(k, 0) < 25)
    assert not missing, f"fuzzed too little: {missing} ({answered})"
    print(f"websocket: {sum(answered.values())} messages, replies "
          f"{ {k: sorted(v) for k, v in sorted(codes.items())} }")


@given(hello=st.fixed_dictionaries(
    {"type": st.just("hello")},
    optional={"token": st.sampled_from(["valid", "other-session", "reviewer", "node-wide"])
              | st.text(max_size=60) | json_values,
              "id": st.integers() | st.text(max_size=8) | json_values, "extra": json_values}))
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_random_hellos_are_welcomed_or_refused_cleanly(ws_node: WsNode,
                                                      hello: dict[str, Any]) -> None:
    tokens = {"valid": ws_node.token(Role.TRAINEE),
              "other-session": ws_node.token(Role.TRAINEE, "elsewhere"),
              "reviewer": ws_node.token(Role.REVIEWER),
              "node-wide": ws_node.token(Role.ADMIN, NODE_WIDE)}
    if isinstance(hello.get("token"), str) and hello["token"] in tokens:
        hello = {**hello, "token": tokens[hello["token"]]}

    async def exchange_hello() -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{ws_node.base_url}/ws") as ws:
            await ws.send_str(json.dumps(hello))
            reply = await ws.receive_json(timeout=5)
            if reply["type"] == "welcome":
                assert hello.get("token") == tokens["valid"]
                return
            assert reply["type"] == "error", reply
            assert reply["error"]["status"] < 500, reply
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code in (4401, 4403), (ws.close_code, reply)

    asyncio.run(exchange_hello())


frames = st.one_of(
    st.dictionaries(st.sampled_from(["type", "id", "slot", "feed", "sdp", "subscription",
                                     "text", "token", "points", "on", "participant"]),
                    json_values, max_size=5).map(json.dumps),
    json_values.map(json.dumps), st.text(max_size=200), st.binary(max_size=64))


@given(batch=st.lists(frames, min_size=1, max_size=8))
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_random_websocket_frames_after_hello_get_no_server_error(
        ws_node: WsNode, batch: list[str | bytes]) -> None:
    asyncio.run(exchange(ws_node, ws_node.token(Role.EXPERT), batch))


def test_the_node_still_serves_after_the_websocket_fuzzing(ws_node: WsNode) -> None:
    assert requests.get(f"{ws_node.base_url}/healthz", timeout=5).status_code == 200
    answer = requests.get(f"{ws_node.base_url}/api/sessions/or1-live", timeout=5,
                          headers={"Authorization": f"Bearer {ws_node.token(Role.TRAINEE)}"})
    assert answer.status_code == 200, answer.text
