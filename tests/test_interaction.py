"""Live interaction over the websocket (docs/protocol.md, "Live interaction"):
telestration, steps and bookmarks, questions and votes, chat, hands, the
trainee microphone and sterile focus, against a real server, with role checks,
size and rate limits, and hostile text carried verbatim as data."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from server.interaction import MIC_SLOT, TokenBuckets, steps_for, visible_to
from server.roles import Role

from .conftest import Server, client_pc, offer_sdp, wait_for, whip_publish
from .test_ws_protocol import WS, check_error, join, of_type, receive_until

HOSTILE = '<img src=x onerror=alert(1)>\u202e"; DROP TABLE questions;--'


async def request(ws: WS, message: dict[str, Any], request_id: str = "r") -> dict[str, Any]:
    """Send and return the reply with this id (events on the way are skipped)."""
    await ws.send_json({**message, "id": request_id})
    return await receive_until(ws, lambda m: m.get("id") == request_id)


async def request_seeing(ws: WS, message: dict[str, Any],
                         request_id: str = "r") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send; the reply and the events that came before it."""
    await ws.send_json({**message, "id": request_id})
    events: list[dict[str, Any]] = []

    def reply(m: dict[str, Any]) -> bool:
        if m.get("id") == request_id:
            return True
        events.append(m)
        return False

    return await receive_until(ws, reply), events


async def refused(ws: WS, message: dict[str, Any], status: int, code: str) -> None:
    check_error(await request(ws, message, "refused"), status, code, request_id="refused")


async def silent(ws: WS, kind: str) -> None:
    """Nothing of ``kind`` reached ``ws`` (a ping round trip flushes its queue)."""
    await ws.send_json({"type": "ping", "id": "flush"})
    seen: list[dict[str, Any]] = []

    def done(message: dict[str, Any]) -> bool:
        seen.append(message)
        return message.get("id") == "flush"

    await receive_until(ws, done)
    assert not [m for m in seen if m.get("type") == kind], seen


CIRCLE = {"kind": "circle", "color": "#FF3B30", "width": 4, "points": [[0.5, 0.5], [0.6, 0.5]]}


async def live_room(http: aiohttp.ClientSession, server: Server,
                    peers: list[RTCPeerConnection]) -> None:
    pc, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
    peers.append(pc)


# -- state for a joining page ---------------------------------------------------

async def test_sync_gives_the_procedure_steps_and_an_empty_session(server, http, sockets):
    trainee, _ = await join(http, server, sockets, Role.TRAINEE)
    state = await request(trainee, {"type": "interaction_sync"})
    assert state["type"] == "interaction_state"
    assert "Critical view of safety" in state["steps"]  # the session is a cholecystectomy
    assert state["current_step"] is None and state["marks"] == []
    assert state["annotations"] == [] and state["questions"] == [] and state["chat"] == []
    assert state["hands"] == [] and state["mic"] is None and state["sterile"] is False
    assert state["limits"]["text_chars"] == 500 and state["limits"]["points"] == 500
    assert 0 <= state["t"] < 30
    assert abs(state["started_at"] - server.session().created_at) < 1e-6


def test_built_in_step_lists_follow_the_procedure_name():
    assert steps_for("Laparoscopic cholecystectomy")[3] == "Critical view of safety"
    assert steps_for("Appendectomy")[1] == "Identify the appendix"
    assert "Mesh placement" in steps_for("TAPP inguinal hernia repair")
    assert steps_for("Something new") == steps_for("")


# -- telestration -----------------------------------------------------------------

async def test_expert_draws_and_every_viewer_gets_it_on_the_session_clock(server, http,
                                                                           sockets, peers):
    await live_room(http, server, peers)
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE)
    recorder, _ = await join(http, server, sockets, Role.RECORDER)
    media = {"media_time": 12.345, "rtp_timestamp": 90000, "presented_frames": 370,
             "client_time": 1.7e12, "ignored": "dropped"}
    reply = await request(expert, {"type": "annotate", "feed": "room.video", "shape": CIRCLE,
                                   "fade_s": 5, "media": media})
    assert reply["type"] == "ok"
    annotation = reply["annotation"]
    assert annotation["shape"] == {"kind": "circle", "color": "#ff3b30", "width": 4.0,
                                   "points": [[0.5, 0.5], [0.6, 0.5]]}
    assert annotation["media"] == {k: v for k, v in media.items() if k != "ignored"}
    assert annotation["by"]["name"] == "Dr Grey" and annotation["pinned"] is False
    assert annotation["expires_t"] == pytest.approx(annotation["t"] + 5)

    # (The expert's own copy came before its reply.)
    for ws in (trainee, recorder):
        event = await receive_until(ws, of_type("annotation"))
        assert event["annotation"] == annotation
        assert event["t"] == annotation["t"]

    # A late joiner gets what has not faded yet.
    late, _ = await join(http, server, sockets, Role.TRAINEE)
    state = await request(late, {"type": "interaction_sync"})
    assert [a["id"] for a in state["annotations"]] == [annotation["id"]]

    # Pin, label, clear.
    pinned = await request(expert, {"type": "annotation_pin", "annotation": annotation["id"],
                                    "pinned": True})
    assert pinned["annotation"]["pinned"] is True and pinned["annotation"]["expires_t"] is None
    assert (await receive_until(trainee, of_type("annotation")))["annotation"]["pinned"]
    label = {"kind": "label", "color": "#00ff00", "points": [[0.1, 0.9]], "text": HOSTILE}
    reply = await request(expert, {"type": "annotate", "feed": "room.video", "shape": label})
    assert reply["annotation"]["shape"]["text"] == HOSTILE.replace("\u202e", "")
    await request(expert, {"type": "annotations_clear", "feed": "room.video"})
    cleared = await receive_until(trainee, of_type("annotations_cleared"))
    assert cleared["feed"] == "room.video" and cleared["by"]["name"] == "Dr Grey"
    assert (await request(late, {"type": "interaction_sync"}))["annotations"] == []


async def test_drawings_are_refused_to_other_roles_and_when_malformed(server, http, sockets,
                                                                      peers):
    await live_room(http, server, peers)
    expert, _ = await join(http, server, sockets, Role.EXPERT)
    trainee, _ = await join(http, server, sockets, Role.TRAINEE)
    admin, _ = await join(http, server, sockets, Role.ADMIN)
    good = {"type": "annotate", "feed": "room.video", "shape": CIRCLE}
    await refused(trainee, good, 403, "wrong_role")
    await refused(admin, good, 403, "wrong_role")
    await refused(trainee, {"type": "annotations_clear"}, 403, "wrong_role")

    def shape(**changes: Any) -> dict[str, Any]:
        return {**good, "shape": {**CIRCLE, **changes}}

    too_many = [[0.5, i / 1000] for i in range(501)]
    await refused(expert, shape(kind="freehand", points=too_many), 413, "too_large")
    await refused(expert, shape(kind="label", points=[[0.5, 0.5]], text="x" * 501), 413,
                  "too_large")
    for bad in (shape(kind="polygon"), shape(color="red"), shape(color="#ff0000;x"),
                shape(points=[[0.5, 0.5]]), shape(points=[[0.5, 1.5], [0.5, 0.5]]),
                shape(points=[[0.5, "0.5"], [0.5, 0.5]]), shape(points=[[True, 0], [0, 0]]),
                shape(width=0), shape(kind="label", points=[[0.5, 0.5]], text="  "),
                {**good, "fade_s": 0}, {**good, "pinned": "yes"},
                {**good, "media": {"media_time": "soon"}}, {**good, "shape": "circle"}):
        await refused(expert, bad, 400, "bad_message")
    await refused(expert, {**good, "feed": "endoscope.video"}, 404, "unknown_feed")
    # 500 points is fine.
    fine = [[0.5, i / 1000] for i in range(500)]
    assert (await request(expert, shape(kind="freehand", points=fine)))["type"] == "ok"
    await refused(expert, {"type": "annotation_pin", "annotation": "nope"}, 404,
                  "unknown_annotation")


async def test_drawing_is_rate_limited_per_participant(server, http, sockets, peers):
    await live_room(http, server, peers)
    expert, _ = await join(http, server, sockets, Role.EXPERT)
    message = {"type": "annotate", "feed": "room.video", "shape": CIRCLE}
    for i in range(40):
        await expert.send_json({**message, "id": i})
    replies = [await receive_until(expert, lambda m, i=i: m.get("id") == i) for i in range(40)]
    codes = [r["type"] if r["type"] == "ok" else r["error"]["code"] for r in replies]
    assert 20 <= codes.count("ok") < 30, codes
    assert codes[-1] == "rate_limited"
    check_error(replies[-1], 429, "rate_limited")


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    buckets = TokenBuckets({"chat": (2.0, 3.0)}, lambda: now[0])
    assert [buckets.take("p", "chat") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("q", "chat")  # per participant
    now[0] = 0.5
    assert buckets.take("p", "chat") and not buckets.take("p", "chat")
    now[0] = 100.0
    assert [buckets.take("p", "chat") for _ in range(4)] == [True, True, True, False]
    # Full buckets are swept once there are many; partly used ones stay.
    for i in range(5000):
        buckets.take(f"x{i}", "chat")
    now[0] = 200.0
    buckets.take("p", "chat")
    buckets.take("p", "chat")
    assert len(buckets._buckets) == 1
    assert buckets.take("p", "chat") and not buckets.take("p", "chat")


def test_audiences():
    assert visible_to(None, Role.TRAINEE, "x")
    to = {"roles": ["expert", "recorder"], "participants": ["t1"]}
    assert visible_to(to, Role.EXPERT, "e") and visible_to(to, Role.RECORDER, "r")
    assert visible_to(to, Role.TRAINEE, "t1") and not visible_to(to, Role.TRAINEE, "t2")


# -- steps and bookmarks -------------------------------------------------------------

async def test_expert_marks_steps_and_bookmarks(server, http, sockets):
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE)
    reply = await request(expert, {"type": "mark", "name": "critical VIEW of safety"})
    assert reply["mark"]["name"] == "Critical view of safety"  # the list's own spelling
    event = await receive_until(trainee, of_type("mark"))
    assert event["current_step"] == "Critical view of safety"
    assert event["mark"] == reply["mark"] and event["mark"]["kind"] == "step"

    # Typed on the fly: joins the list.
    await request(expert, {"type": "mark", "name": "Cholangiogram"})
    event = await receive_until(trainee, of_type("mark"))
    assert event["steps"][-1] == "Cholangiogram" and event["current_step"] == "Cholangiogram"
    # A bookmark does not change the step.
    await request(expert, {"type": "mark", "name": "Bleeding controlled", "kind": "bookmark"})
    event = await receive_until(trainee, of_type("mark"))
    assert event["current_step"] == "Cholangiogram" and event["mark"]["kind"] == "bookmark"

    state = await request(trainee, {"type": "interaction_sync"})
    assert [m["name"] for m in state["marks"]] == ["Critical view of safety", "Cholangiogram",
                                                   "Bleeding controlled"]
    times = [m["t"] for m in state["marks"]]
    assert times == sorted(times)

    await refused(trainee, {"type": "mark", "name": "Closure"}, 403, "wrong_role")
    await refused(expert, {"type": "mark", "name": "x" * 121}, 413, "too_large")
    await refused(expert, {"type": "mark", "name": "Closure", "kind": "chapter"}, 400,
                  "bad_message")
    await refused(expert, {"type": "mark"}, 400, "bad_message")


# -- questions, votes, moderation ------------------------------------------------------

async def test_questions_reach_the_expert_queue_votes_and_moderation(server, http, sockets):
    expert, _ = await join(http, server, sockets, Role.EXPERT)
    admin, _ = await join(http, server, sockets, Role.ADMIN)
    asker, _ = await join(http, server, sockets, Role.TRAINEE, name="Asker",
                          participant_id="tr-1")
    voter, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-2")

    reply = await request(asker, {"type": "ask", "text": HOSTILE})
    question = reply["question"]
    assert question["text"] == HOSTILE.replace("\u202e", "")
    assert question["author"] == {"id": "tr-1", "name": "Asker"}
    assert question["votes"] == 0 and question["status"] == "open"
    for ws in (expert, admin, voter):
        msg = await receive_until(ws, of_type("question"))
        assert msg["question"] == question

    # Text is carried verbatim in JSON, never escaped into markup by the server.
    raw = json.dumps(question["text"])
    assert "&lt;" not in raw

    voted = await request(voter, {"type": "vote", "question": question["id"]})
    assert voted["question"]["votes"] == 1
    assert (await receive_until(expert, of_type("question")))["question"]["votes"] == 1
    # Voting twice counts once; voting for yourself is refused.
    assert (await request(voter, {"type": "vote", "question": question["id"]}))["question"][
        "votes"] == 1
    await refused(asker, {"type": "vote", "question": question["id"]}, 403, "own_question")
    state = await request(voter, {"type": "interaction_sync"})
    assert state["voted"] == [question["id"]] and state["questions"][0]["votes"] == 1

    await refused(expert, {"type": "ask", "text": "?"}, 403, "wrong_role")
    await refused(asker, {"type": "ask", "text": "x" * 501}, 413, "too_large")
    await refused(asker, {"type": "ask", "text": " \n "}, 400, "bad_message")
    await refused(asker, {"type": "ask", "text": 42}, 400, "bad_message")
    await refused(voter, {"type": "vote", "question": "q999"}, 404, "unknown_question")
    await refused(voter, {"type": "question_status", "question": question["id"],
                          "status": "answered"}, 403, "wrong_role")
    await refused(expert, {"type": "question_status", "question": question["id"],
                           "status": "deleted"}, 400, "bad_message")

    answered = await request(expert, {"type": "question_status", "question": question["id"],
                                      "status": "answered"})
    assert answered["question"]["status"] == "answered"
    assert (await receive_until(asker, of_type("question")))["question"]["status"] == "answered"
    await refused(voter, {"type": "vote", "question": question["id"], "up": False}, 409,
                  "question_closed")
    # The admin moderates too.
    dismissed = await request(admin, {"type": "question_status", "question": question["id"],
                                      "status": "dismissed"})
    assert dismissed["question"]["status"] == "dismissed"


async def test_questions_are_rate_limited_even_across_rejoins(server, http, sockets):
    # Limits count per person: the same token (or another device of its invite)
    # coming back finds its bucket as it left it.
    token = server.token(Role.TRAINEE, participant_id="tr-1")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, token=token)
    codes = []
    for i in range(4):
        reply = await request(trainee, {"type": "ask", "text": f"question {i}"}, f"q{i}")
        codes.append(reply["type"] if reply["type"] == "ok" else reply["error"]["code"])
    assert codes == ["ok", "ok", "ok", "rate_limited"]
    await trainee.close()
    await wait_for(lambda: "" if "tr-1" not in server.session().participants else "still in")
    again, _ = await join(http, server, sockets, Role.TRAINEE, token=token)
    await refused(again, {"type": "ask", "text": "once more"}, 429, "rate_limited")


# -- chat and hands ---------------------------------------------------------------------

async def test_chat_for_all_and_hands_for_the_expert(server, http, sockets):
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, name=HOSTILE,
                            participant_id="tr-1")
    other, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-2")
    recorder, _ = await join(http, server, sockets, Role.RECORDER)

    _, before = await request_seeing(trainee, {"type": "chat", "text": HOSTILE})
    for ws in (expert, other):
        msg = await receive_until(ws, of_type("chat"))
        assert msg["message"]["text"] == HOSTILE.replace("\u202e", "")
        assert msg["message"]["by"] == {"id": "tr-1", "name": HOSTILE, "role": "trainee"}
    assert [m["message"] for m in before if m["type"] == "chat"] == [msg["message"]]
    await request(expert, {"type": "chat", "text": "Look at the duct"})
    assert (await receive_until(trainee, of_type("chat")))["message"]["by"]["role"] == "expert"
    await refused(recorder, {"type": "chat", "text": "hi"}, 403, "wrong_role")
    await refused(trainee, {"type": "chat", "text": "x" * 501}, 413, "too_large")
    state = await request(other, {"type": "interaction_sync"})
    assert [m["text"] for m in state["chat"]][-1] == "Look at the duct"

    # Hands: the expert (and recorder) see them; other trainees do not.
    assert (await request(trainee, {"type": "hand", "raised": True}))["raised"] is True
    hand = await receive_until(expert, of_type("hand"))
    assert hand["participant"]["id"] == "tr-1" and hand["raised"] is True
    await receive_until(recorder, of_type("hand"))
    await silent(other, "hand")
    assert [h["participant"]["id"] for h in
            (await request(expert, {"type": "interaction_sync"}))["hands"]] == ["tr-1"]
    assert (await request(other, {"type": "interaction_sync"}))["hands"] == []
    await refused(expert, {"type": "hand", "raised": True}, 403, "wrong_role")
    await refused(other, {"type": "hand", "raised": False, "participant": "tr-1"}, 403,
                  "wrong_role")
    # The expert lowers it.
    await request(expert, {"type": "hand", "raised": False, "participant": "tr-1"})
    lowered = await receive_until(trainee, of_type("hand"))
    assert lowered["raised"] is False

    # The expert sees who comes and goes.
    await other.close()
    left = await receive_until(expert, of_type("presence"))
    assert left["event"] == "left" and left["participant"]["id"] == "tr-2"
    await join(http, server, sockets, Role.TRAINEE, name="Newcomer", participant_id="tr-3")
    joined = await receive_until(expert, of_type("presence"))
    assert joined["event"] == "joined" and joined["participant"]["name"] == "Newcomer"
    await silent(trainee, "presence")


# -- the trainee microphone ------------------------------------------------------------------

async def mic_offer(pc: RTCPeerConnection, video: bool = False) -> str:
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    if video:
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    return await offer_sdp(pc)


async def test_only_the_granted_trainee_publishes_audio_and_take_back_closes_it(
        server, http, sockets, peers):
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT)
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, name="Tess",
                            participant_id="tr-1")
    other, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-2")

    async def publish(ws: WS, video: bool = False) -> dict[str, Any]:
        pc = client_pc()
        peers.append(pc)
        reply = await request(ws, {"type": "publish", "slot": MIC_SLOT,
                                   "sdp": await mic_offer(pc, video)})
        if reply["type"] == "answer":
            await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        return reply

    check_error(await publish(trainee), 403, "not_granted")
    await refused(trainee, {"type": "mic_grant", "participant": "tr-1"}, 403, "wrong_role")
    await refused(expert, {"type": "mic_grant", "participant": "nobody"}, 404,
                  "unknown_participant")
    expert_id = next(p.id for p in session.participants.values() if p.role == Role.EXPERT)
    await refused(expert, {"type": "mic_grant", "participant": expert_id}, 409, "not_a_trainee")

    await request(trainee, {"type": "hand", "raised": True})
    granted = await request(expert, {"type": "mic_grant", "participant": "tr-1"})
    assert granted["mic"] == {"id": "tr-1", "name": "Tess"}
    for ws in (trainee, other):
        assert (await receive_until(ws, of_type("mic")))["holder"] == {"id": "tr-1",
                                                                       "name": "Tess"}
    # Granting lowers the hand.
    assert (await receive_until(trainee, of_type("hand")))["raised"] is False

    check_error(await publish(other), 403, "not_granted")
    check_error(await publish(trainee, video=True), 422, "sdp_kind_mismatch")
    answer = await publish(trainee)
    assert answer["type"] == "answer" and answer["feeds"] == [f"{MIC_SLOT}.audio"]
    live = await receive_until(expert, lambda m: m.get("type") == "feed"
                               and m["feed"]["id"] == f"{MIC_SLOT}.audio")
    assert live["feed"]["kind"] == "audio"
    # Nobody else's publish rules changed: a trainee still cannot use camera slots.
    await refused(trainee, {"type": "publish", "slot": "room", "sdp": "v=0"}, 403, "wrong_role")

    _, events = await request_seeing(expert, {"type": "mic_revoke"})
    assert (await receive_until(trainee, of_type("mic")))["holder"] is None
    closed = [m["feed"]["id"] for m in events
              if m["type"] == "feed" and m["feed"]["state"] == "closed"]
    assert closed == [f"{MIC_SLOT}.audio"], events
    await wait_for(lambda: "" if not any(i.slot == MIC_SLOT for i in session.ingests.values())
                   else "microphone ingest still open")
    check_error(await publish(trainee), 403, "not_granted")

    # The holder may give it back; leaving gives it back too.
    await request(expert, {"type": "mic_grant", "participant": "tr-2"})
    await refused(trainee, {"type": "mic_revoke"}, 403, "wrong_role")
    await other.close()
    revoked = await receive_until(expert, lambda m: m.get("type") == "mic")
    while revoked["holder"] is not None:
        revoked = await receive_until(expert, of_type("mic"))
    assert session.interaction.mic_holder is None


# -- sterile focus ----------------------------------------------------------------------------

async def test_sterile_focus_holds_questions_and_silences_trainees(server, http, sockets,
                                                                   peers):
    session = server.session()
    expert, _ = await join(http, server, sockets, Role.EXPERT, name="Dr Grey")
    trainee, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-1")
    other, _ = await join(http, server, sockets, Role.TRAINEE, participant_id="tr-2")
    early = (await request(other, {"type": "ask", "text": "Before?"}))["question"]
    await request(expert, {"type": "mic_grant", "participant": "tr-1"})
    pc = client_pc()
    peers.append(pc)
    reply = await request(trainee, {"type": "publish", "slot": MIC_SLOT,
                                    "sdp": await mic_offer(pc)})
    await pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))

    await refused(trainee, {"type": "sterile", "on": True}, 403, "wrong_role")
    await request(expert, {"type": "sterile", "on": True})
    for ws in (trainee, other):
        assert (await receive_until(ws, of_type("sterile")))["on"] is True
    # The microphone is taken back at once.
    assert (await receive_until(trainee, of_type("mic")))["holder"] is None
    await wait_for(lambda: "" if f"{MIC_SLOT}.audio" not in session.feeds else "mic feed open")

    await refused(trainee, {"type": "chat", "text": "hi"}, 409, "sterile_focus")
    await refused(trainee, {"type": "hand", "raised": True}, 409, "sterile_focus")
    await refused(expert, {"type": "mic_grant", "participant": "tr-1"}, 409, "sterile_focus")
    # Questions queue quietly: the author has it, nobody else hears of it.
    held = (await request(trainee, {"type": "ask", "text": "Why clip twice?"}))["question"]
    assert held["held"] is True
    await request(trainee, {"type": "vote", "question": early["id"]})
    await silent(expert, "question")
    await silent(other, "question")
    assert [q["id"] for q in (await request(other, {"type": "interaction_sync"}))["questions"]] \
        == [early["id"]]
    assert {q["id"] for q in (await request(trainee, {"type": "interaction_sync"}))[
        "questions"]} == {early["id"], held["id"]}
    await refused(other, {"type": "vote", "question": held["id"]}, 404, "unknown_question")
    # The expert still talks.
    await request(expert, {"type": "chat", "text": "Clipping now"})
    await receive_until(other, of_type("chat"))

    _, events = await request_seeing(expert, {"type": "sterile", "on": False})
    assert [m["type"] for m in events if m["type"] in ("sterile", "questions")] == [
        "sterile", "questions"]
    released = next(m for m in events if m["type"] == "questions")
    by_id = {q["id"]: q for q in released["questions"]}
    assert by_id[held["id"]]["held"] is False and by_id[early["id"]]["votes"] == 1
    assert (await receive_until(other, of_type("questions")))["questions"] == \
        released["questions"]
    await request(trainee, {"type": "chat", "text": "Thanks"})
