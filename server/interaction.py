"""Interaction: what happens around the video of one Session.

Telestration (drawings on a Feed), procedure steps and bookmarks, questions
with votes, chat, raised hands, the trainee microphone and the "sterile focus"
switch. One ``Interaction`` per Session holds that state; every change goes
out as a Session event (``{"type": "interaction", "to": audience, "message":
wire message}``) so each websocket forwards what its Participant may see, a
recorder can store it, and the store's EventBus can carry it to other Nodes.

Every wire message carries ``t``: the Session clock, seconds since the Session
started (monotonic, milliseconds), so a recording replays each drawing, step
or question at the moment it was made.

Every request is checked here: Role, sizes (text, points), rates (a token
bucket per Participant and kind of action) and the sterile switch. Methods
never await: each change is atomic on the event loop.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, TooManyRequests
from .participant import Participant
from .roles import MODERATORS, VIEWERS, Role
from .tokens import Grant

Event = dict[str, Any]

#: The slot a granted trainee publishes its microphone into (audio only).
MIC_SLOT = "trainee-mic"

#: Who may do what (every message checks one of these).
DRAWERS = frozenset({Role.EXPERT})
STEP_MARKERS = frozenset({Role.EXPERT})
ASKERS = frozenset({Role.TRAINEE})
CHATTERS = frozenset({Role.EXPERT, Role.TRAINEE, Role.ADMIN})
#: Receive everything, whatever the audience: they keep the record.
ALWAYS_TOLD = frozenset({Role.RECORDER})

SHAPES = ("freehand", "arrow", "circle", "label")
POINTS_PER_SHAPE = {"arrow": (2, 2), "circle": (2, 2), "label": (1, 1)}
COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
QUESTION_STATUSES = ("open", "answered", "dismissed")
MEDIA_FIELDS = ("media_time", "rtp_timestamp", "capture_time", "presented_frames",
                "expected_display_time", "client_time")
#: Control characters (but newline and tab) and bidirectional overrides, which
#: could make a hostile text display as something else.
_UNSAFE_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")

#: Built-in step lists, chosen by a word of the Session's procedure (or title).
PROCEDURE_STEPS: dict[str, tuple[str, ...]] = {
    "cholecystectomy": (
        "Port placement", "Exposure of Calot's triangle", "Dissection of Calot's triangle",
        "Critical view of safety", "Clip and divide cystic artery", "Clip and divide cystic duct",
        "Gallbladder off the liver bed", "Haemostasis and irrigation", "Specimen extraction",
        "Closure"),
    "appendicectomy": (
        "Port placement", "Identify the appendix", "Divide the mesoappendix",
        "Secure the appendix base", "Divide the appendix", "Specimen extraction",
        "Washout", "Closure"),
    "hernia": (
        "Port placement", "Peritoneal flap", "Dissection of the myopectineal orifice",
        "Reduce the hernia sac", "Mesh placement", "Mesh fixation", "Close the peritoneum",
        "Closure"),
    "colectomy": (
        "Port placement", "Mobilisation", "Vascular ligation", "Bowel division",
        "Anastomosis", "Leak test", "Specimen extraction", "Closure"),
}
PROCEDURE_ALIASES = {"appendectomy": "appendicectomy", "tapp": "hernia", "tep": "hernia",
                     "inguinal": "hernia", "lap chole": "cholecystectomy"}
GENERIC_STEPS = ("Incision / access", "Exposure", "Key step", "Haemostasis", "Closure")


def steps_for(procedure: str) -> list[str]:
    """The built-in step list for a procedure name (generic if none matches)."""
    name = procedure.lower()
    for word, key in PROCEDURE_ALIASES.items():
        if word in name:
            return list(PROCEDURE_STEPS[key])
    for key, steps in PROCEDURE_STEPS.items():
        if key in name:
            return list(steps)
    return list(GENERIC_STEPS)


@dataclass(frozen=True)
class Limits:
    text_chars: int = 500
    step_chars: int = 120
    points: int = 500
    steps: int = 100
    annotations: int = 200
    questions: int = 500
    #: Questions of one person (an invite and all its devices): no one invite
    #: fills the Session's ``questions``.
    questions_per_person: int = 50
    chat_history: int = 200
    marks: int = 1000
    fade_default_s: float = 8.0
    fade_min_s: float = 1.0
    fade_max_s: float = 600.0
    width_max: float = 24.0


#: Per person (an invite and all its devices, or a token and what was derived
#: from it) and kind of action: (tokens per second, burst).
RATES: Mapping[str, tuple[float, float]] = {
    "draw": (10.0, 20.0),
    "mark": (2.0, 6.0),
    "ask": (0.2, 3.0),
    "vote": (5.0, 10.0),
    "chat": (1.0, 5.0),
    "hand": (1.0, 3.0),
    "moderate": (10.0, 20.0),
}


class TokenBuckets:
    """A token bucket per (person, action): refill at ``rate`` per second
    up to ``burst``; each allowed action takes one token."""

    def __init__(self, rates: Mapping[str, tuple[float, float]],
                 clock: Callable[[], float]) -> None:
        self._rates = rates
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, who: str, action: str) -> bool:
        rate, burst = self._rates[action]
        now = self._clock()
        if len(self._buckets) > 4096:
            self._sweep(now)
        tokens, at = self._buckets.get((who, action), (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[(who, action)] = (tokens, now)
            return False
        self._buckets[(who, action)] = (tokens - 1.0, now)
        return True

    def _sweep(self, now: float) -> None:
        """Drop buckets that have refilled: they hold nothing a new one would not."""
        for key, (tokens, at) in list(self._buckets.items()):
            rate, burst = self._rates[key[1]]
            if tokens + (now - at) * rate >= burst:
                del self._buckets[key]


def audience(roles: frozenset[Role] | None = None,
             participants: tuple[str, ...] = ()) -> dict[str, list[str]] | None:
    """Who receives an event: None is everyone; otherwise these Roles and these
    Participants (recorders always)."""
    if roles is None and not participants:
        return None
    wanted = set(roles or ()) | ALWAYS_TOLD
    return {"roles": sorted(r.value for r in wanted), "participants": list(participants)}


def visible_to(to: Any, role: Role, participant_id: str) -> bool:
    """May a Participant with ``role`` see an event addressed ``to``?"""
    if to is None:
        return True
    return role.value in to.get("roles", ()) or participant_id in to.get("participants", ())


@dataclass
class Question:
    id: str
    text: str
    author_id: str
    author_name: str
    t: float
    held: bool
    status: str = "open"
    #: Persons (``Grant.person_id``) who voted: one vote per invite, however
    #: many devices or copies of a token it has.
    voters: set[str] = field(default_factory=set)
    author_person: str = ""

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text,
                "author": {"id": self.author_id, "name": self.author_name},
                "t": self.t, "votes": len(self.voters), "status": self.status,
                "held": self.held}


class Interaction:
    """The live interaction state of one Session (see the module docstring)."""

    def __init__(
        self,
        *,
        procedure: str,
        started_at: float,
        emit: Callable[[Event], None],
        listen: Callable[[Callable[[Event], None]], Callable[[], None]],
        participant: Callable[[str], Participant | None],
        has_video_feed: Callable[[str], bool],
        close_mic: Callable[[], None],
        limits: Limits | None = None,
        rates: Mapping[str, tuple[float, float]] = RATES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.procedure = procedure
        self.started_at = started_at
        self.limits = limits or Limits()
        self._emit = emit
        self._participant = participant
        self._has_video_feed = has_video_feed
        self._close_mic = close_mic
        self._clock = clock
        self._t0 = clock()
        self._buckets = TokenBuckets(rates, clock)
        self._ids = 0
        self.steps: list[str] = steps_for(procedure)
        self.current_step: str | None = None
        self.marks: deque[dict[str, Any]] = deque(maxlen=self.limits.marks)
        self.annotations: dict[str, dict[str, Any]] = {}
        self.questions: dict[str, Question] = {}
        self.chat: deque[dict[str, Any]] = deque(maxlen=self.limits.chat_history)
        self.hands: dict[str, dict[str, Any]] = {}
        self.mic_holder: dict[str, str] | None = None
        self.sterile = False
        self._handlers: dict[str, Callable[[Grant, dict[str, Any]], dict[str, Any]]] = {
            "interaction_sync": self._sync,
            "annotate": self._annotate,
            "annotation_pin": self._pin,
            "annotations_clear": self._clear,
            "mark": self._mark,
            "ask": self._ask,
            "vote": self._vote,
            "question_status": self._question_status,
            "chat": self._chat,
            "hand": self._hand,
            "mic_grant": self._mic_grant,
            "mic_revoke": self._mic_revoke,
            "sterile": self._sterile,
        }
        listen(self._on_session_event)

    @property
    def message_types(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def now(self) -> float:
        """The Session clock: seconds since the Session started."""
        return round(self._clock() - self._t0, 3)

    @property
    def clock_zero(self) -> float:
        """The Session clock's zero on ``clock`` (``time.monotonic()``); its wall
        time is ``started_at``. A recording shares this clock."""
        return self._t0

    def adopt_clock(self, started_at: float, wall: Callable[[], float] = time.time) -> None:
        """Run on the Session clock another Node started (wall time of its zero,
        ``started_at``): a Session taken over goes on on the same clock, so what
        it records here lines up with what was recorded there."""
        self._t0 = self._clock() - (wall() - started_at)
        self.started_at = started_at

    def handle(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        """Apply one websocket request; returns the reply (raises ScrubinError)."""
        return self._handlers[str(message.get("type"))](grant, message)

    # -- the microphone, for Session.publish --------------------------------
    def check_mic_publisher(self, grant: Grant) -> None:
        if self.mic_holder is None or self.mic_holder["id"] != grant.participant_id:
            raise Forbidden("the microphone has not been given to you", code="not_granted")

    def release_mic(self, grant: Grant) -> None:
        """The holder gives the microphone back, or a moderator takes it."""
        if self.mic_holder is None:
            return
        if grant.role not in MODERATORS and self.mic_holder["id"] != grant.participant_id:
            raise Forbidden("only the expert or the holder may take the microphone back",
                            code="wrong_role")
        self._set_mic(None, grant)

    # -- session events -----------------------------------------------------
    def _on_session_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "participant_left":
            # (Rate buckets are kept: leaving and rejoining does not reset them.)
            participant_id = str(event["participant"]["id"])
            if self.hands.pop(participant_id, None) is not None:
                self._send({"type": "hand", "participant": event["participant"],
                            "raised": False}, self._hand_audience(participant_id))
            if self.mic_holder is not None and self.mic_holder["id"] == participant_id:
                self._set_mic(None, None)
        elif kind == "feed" and event["feed"].get("state") == "closed":
            feed_id = event["feed"]["id"]
            dropped = [a for a in self.annotations.values() if a["feed"] == feed_id]
            for annotation in dropped:
                del self.annotations[annotation["id"]]
            if dropped:
                self._send({"type": "annotations_cleared", "feed": feed_id, "by": None,
                            "reason": "feed_closed"})

    # -- helpers --------------------------------------------------------------
    def _send(self, message: dict[str, Any], to: dict[str, list[str]] | None = None) -> None:
        message.setdefault("t", self.now())
        self._emit({"type": "interaction", "to": to, "message": message})

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    def _who(self, grant: Grant) -> dict[str, str]:
        participant = self._participant(grant.participant_id)
        name = participant.name if participant is not None else (grant.name or grant.role.value)
        return {"id": grant.participant_id, "name": name, "role": grant.role.value}

    def _require(self, grant: Grant, roles: frozenset[Role], action: str) -> None:
        if grant.role not in roles:
            raise Forbidden(f"role {grant.role.value} may not {action}", code="wrong_role")

    def _rate(self, grant: Grant, action: str) -> None:
        if not self._buckets.take(grant.person_id, action):
            raise TooManyRequests(f"too many {action} requests; slow down", code="rate_limited")

    def _not_sterile(self, what: str) -> None:
        if self.sterile:
            raise Conflict(f"sterile focus: {what} is paused until the surgeon is ready",
                           code="sterile_focus")

    def _text(self, message: dict[str, Any], name: str, limit: int) -> str:
        value = message.get(name)
        if not isinstance(value, str):
            raise BadRequest(f"message needs a string field {name!r}", code="bad_message")
        if len(value) > limit:
            raise PayloadTooLarge(f"{name} is longer than {limit} characters", code="too_large")
        value = _UNSAFE_CHARS.sub("", value).strip()
        if not value:
            raise BadRequest(f"{name} is empty", code="bad_message")
        return value

    @staticmethod
    def _ref(message: dict[str, Any], name: str) -> str:
        value = message.get(name)
        if not isinstance(value, str) or not value or len(value) > 64:
            raise BadRequest(f"message needs a string field {name!r}", code="bad_message")
        return value

    @staticmethod
    def _flag(message: dict[str, Any], name: str, default: bool | None = None) -> bool:
        value = message.get(name, default)
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false", code="bad_message")
        return value

    def _hand_audience(self, participant_id: str) -> dict[str, list[str]] | None:
        return audience(MODERATORS, (participant_id,))

    # -- state for a (re)joining page ----------------------------------------
    def _sync(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, VIEWERS, "follow the session")
        self._prune()
        sees_all = grant.role in MODERATORS or grant.role in ALWAYS_TOLD
        questions = [q.describe() for q in self.questions.values()
                     if not q.held or q.author_id == grant.participant_id
                     or grant.role in ALWAYS_TOLD]
        hands = [h for pid, h in self.hands.items() if sees_all or pid == grant.participant_id]
        limits = self.limits
        return {
            "type": "interaction_state",
            "t": self.now(),
            "started_at": self.started_at,
            "procedure": self.procedure,
            "steps": list(self.steps),
            "current_step": self.current_step,
            "marks": list(self.marks)[-200:],
            "annotations": [self._annotation_view(a) for a in self.annotations.values()],
            "questions": questions,
            "voted": [q.id for q in self.questions.values()
                      if grant.person_id in q.voters],
            "chat": list(self.chat),
            "hands": hands,
            "mic": self.mic_holder,
            "sterile": self.sterile,
            "limits": {"text_chars": limits.text_chars, "step_chars": limits.step_chars,
                       "points": limits.points, "fade_default_s": limits.fade_default_s,
                       "fade_min_s": limits.fade_min_s, "fade_max_s": limits.fade_max_s},
        }

    # -- telestration ---------------------------------------------------------
    def _annotate(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, DRAWERS, "draw")
        feed_id = self._ref(message, "feed")
        shape = self._shape(message.get("shape"))
        pinned = self._flag(message, "pinned", False)
        fade = message.get("fade_s", self.limits.fade_default_s)
        if (not isinstance(fade, (int, float)) or isinstance(fade, bool)
                or not self.limits.fade_min_s <= fade <= self.limits.fade_max_s):
            raise BadRequest(f"fade_s must be between {self.limits.fade_min_s} and "
                             f"{self.limits.fade_max_s} seconds", code="bad_message")
        media = self._media(message.get("media"))
        if not self._has_video_feed(feed_id):
            raise NotFound(f"no live video feed {feed_id!r}", code="unknown_feed")
        self._rate(grant, "draw")
        self._prune()
        if len(self.annotations) >= self.limits.annotations:
            # The oldest drawing makes room, pinned or not: a page shows a few
            # dozen at most.
            del self.annotations[next(iter(self.annotations))]
        now = self.now()
        who = self._who(grant)
        annotation: dict[str, Any] = {"id": self._new_id("a"), "feed": feed_id, "shape": shape,
                      "pinned": pinned, "fade_s": float(fade), "t": now, "fade_from": now,
                      "by": {"id": who["id"], "name": who["name"]}, "media": media}
        self.annotations[annotation["id"]] = annotation
        view = self._annotation_view(annotation)
        self._send({"type": "annotation", "annotation": view, "t": now})
        return {"type": "ok", "annotation": view}

    def _shape(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadRequest("shape must be an object", code="bad_message")
        kind = raw.get("kind")
        if kind not in SHAPES:
            raise BadRequest(f"shape kind must be one of {', '.join(SHAPES)}",
                             code="bad_message")
        color = raw.get("color", "#ff3b30")
        if not isinstance(color, str) or not COLOR.match(color):
            raise BadRequest("color must be #rrggbb", code="bad_message")
        width = raw.get("width", 4)
        if (not isinstance(width, (int, float)) or isinstance(width, bool)
                or not 1 <= width <= self.limits.width_max):
            raise BadRequest(f"width must be between 1 and {self.limits.width_max}",
                             code="bad_message")
        points = raw.get("points")
        if not isinstance(points, list):
            raise BadRequest("points must be a list of [x, y]", code="bad_message")
        if len(points) > self.limits.points:
            raise PayloadTooLarge(f"a drawing has at most {self.limits.points} points",
                                  code="too_large")
        low, high = POINTS_PER_SHAPE.get(kind, (1, self.limits.points))
        if not low <= len(points) <= high:
            raise BadRequest(f"a {kind} has {low}–{high} points", code="bad_message")
        clean = []
        for point in points:
            if (not isinstance(point, list) or len(point) != 2
                    or not all(_unit(v) for v in point)):
                raise BadRequest("each point is [x, y] with 0 ≤ x, y ≤ 1 (normalised to the "
                                 "video picture)", code="bad_message")
            clean.append([round(float(point[0]), 5), round(float(point[1]), 5)])
        shape: dict[str, Any] = {"kind": kind, "color": color.lower(),
                                 "width": round(float(width), 2), "points": clean}
        if kind == "label":
            shape["text"] = self._text(raw, "text", self.limits.text_chars)
        return shape

    @staticmethod
    def _media(raw: Any) -> dict[str, float]:
        """The expert page's timing of the frame on screen (all optional)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise BadRequest("media must be an object", code="bad_message")
        media = {}
        for name in MEDIA_FIELDS:
            value = raw.get(name)
            if value is None:
                continue
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise BadRequest(f"media.{name} must be a number", code="bad_message")
            media[name] = value
        return media

    def _annotation_view(self, annotation: dict[str, Any]) -> dict[str, Any]:
        view = {k: v for k, v in annotation.items() if k != "fade_from"}
        view["expires_t"] = (None if annotation["pinned"]
                             else round(annotation["fade_from"] + annotation["fade_s"], 3))
        return view

    def _prune(self) -> None:
        now = self.now()
        for key in [k for k, a in self.annotations.items()
                    if not a["pinned"] and a["fade_from"] + a["fade_s"] < now]:
            del self.annotations[key]

    def _pin(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, MODERATORS, "pin drawings")
        annotation_id = self._ref(message, "annotation")
        pinned = self._flag(message, "pinned", True)
        self._rate(grant, "moderate")
        self._prune()
        annotation = self.annotations.get(annotation_id)
        if annotation is None:
            raise NotFound("no such drawing (it may have faded)", code="unknown_annotation")
        if annotation["pinned"] != pinned:
            annotation["pinned"] = pinned
            annotation["fade_from"] = self.now()  # unpinned: it fades from now
            self._send({"type": "annotation", "annotation": self._annotation_view(annotation)})
        return {"type": "ok", "annotation": self._annotation_view(annotation)}

    def _clear(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, MODERATORS, "clear drawings")
        feed_id = message.get("feed")
        if feed_id is not None:
            feed_id = self._ref(message, "feed")
        self._rate(grant, "moderate")
        for key in [k for k, a in self.annotations.items()
                    if feed_id is None or a["feed"] == feed_id]:
            del self.annotations[key]
        who = self._who(grant)
        self._send({"type": "annotations_cleared", "feed": feed_id,
                    "by": {"id": who["id"], "name": who["name"]}, "reason": "cleared"})
        return {"type": "ok"}

    # -- steps and bookmarks ---------------------------------------------------
    def _mark(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, STEP_MARKERS, "mark steps")
        name = self._text(message, "name", self.limits.step_chars)
        kind = message.get("kind", "step")
        if kind not in ("step", "bookmark"):
            raise BadRequest("kind must be 'step' or 'bookmark'", code="bad_message")
        self._rate(grant, "mark")
        if kind == "step":
            known = next((s for s in self.steps if s.casefold() == name.casefold()), None)
            if known is None:
                if len(self.steps) >= self.limits.steps:
                    raise Conflict(f"at most {self.limits.steps} steps", code="too_many_steps")
                self.steps.append(name)
            else:
                name = known
            self.current_step = name
        who = self._who(grant)
        mark = {"id": self._new_id("m"), "kind": kind, "name": name, "t": self.now(),
                "by": {"id": who["id"], "name": who["name"]}}
        self.marks.append(mark)
        self._send({"type": "mark", "mark": mark, "current_step": self.current_step,
                    "steps": list(self.steps), "t": mark["t"]})
        return {"type": "ok", "mark": mark}

    # -- questions ----------------------------------------------------------------
    def _ask(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, ASKERS, "ask questions")
        text = self._text(message, "text", self.limits.text_chars)
        self._rate(grant, "ask")
        if len(self.questions) >= self.limits.questions:
            raise Conflict("this session has its maximum of questions",
                           code="too_many_questions")
        if sum(1 for q in self.questions.values()
               if q.author_person == grant.person_id) >= self.limits.questions_per_person:
            raise Conflict(f"at most {self.limits.questions_per_person} questions per person",
                           code="too_many_questions")
        who = self._who(grant)
        question = Question(id=self._new_id("q"), text=text, author_id=who["id"],
                            author_name=who["name"], t=self.now(), held=self.sterile,
                            author_person=grant.person_id)
        self.questions[question.id] = question
        self._announce(question, grant)
        return {"type": "ok", "question": question.describe()}

    def _announce(self, question: Question, grant: Grant) -> None:
        # Sterile focus: nobody is told but the one who acted (and recorders);
        # everyone gets the whole list when the surgeon is ready again.
        to = None
        if self.sterile and grant.role not in MODERATORS:
            to = audience(frozenset(), (grant.participant_id,))
        elif question.held:
            to = audience(frozenset(), tuple({question.author_id, grant.participant_id}))
        self._send({"type": "question", "question": question.describe()}, to)

    def _question(self, grant: Grant, message: dict[str, Any]) -> Question:
        question = self.questions.get(self._ref(message, "question"))
        if question is None or (question.held and question.author_id != grant.participant_id
                                and grant.role not in MODERATORS):
            raise NotFound("no such question", code="unknown_question")
        return question

    def _vote(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, ASKERS, "vote")
        question = self._question(grant, message)
        up = self._flag(message, "up", True)
        if question.author_id == grant.participant_id or (
                question.author_person == grant.person_id):
            raise Forbidden("you cannot vote for your own question", code="own_question")
        if question.status != "open":
            raise Conflict(f"this question is {question.status}", code="question_closed")
        self._rate(grant, "vote")
        before = len(question.voters)
        if up:
            question.voters.add(grant.person_id)
        else:
            question.voters.discard(grant.person_id)
        if len(question.voters) != before:
            self._announce(question, grant)
        return {"type": "ok", "question": question.describe(), "voted": up}

    def _question_status(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, MODERATORS, "moderate questions")
        question = self._question(grant, message)
        status = message.get("status")
        if status not in QUESTION_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(QUESTION_STATUSES)}",
                             code="bad_message")
        self._rate(grant, "moderate")
        if question.status != status:
            question.status = status
            self._announce(question, grant)
        return {"type": "ok", "question": question.describe()}

    # -- chat and hands --------------------------------------------------------------
    def _chat(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, CHATTERS, "chat")
        text = self._text(message, "text", self.limits.text_chars)
        if grant.role == Role.TRAINEE:
            self._not_sterile("chat")
        self._rate(grant, "chat")
        entry = {"id": self._new_id("c"), "text": text, "by": self._who(grant), "t": self.now()}
        self.chat.append(entry)
        self._send({"type": "chat", "message": entry, "t": entry["t"]})
        return {"type": "ok", "message": entry}

    def _hand(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        raised = self._flag(message, "raised", True)
        target = message.get("participant", grant.participant_id)
        if target != grant.participant_id:
            # Moderators lower someone else's hand; nobody raises it for them.
            self._require(grant, MODERATORS, "lower someone else's hand")
            target = self._ref(message, "participant")
            if raised:
                raise Forbidden("only the participant can raise their hand", code="wrong_role")
        else:
            self._require(grant, ASKERS, "raise a hand")
            if raised:
                self._not_sterile("raising hands")
        self._rate(grant, "hand")
        if raised:
            who = self._who(grant)
            if target not in self.hands:
                self.hands[target] = {"participant": {"id": who["id"], "name": who["name"]},
                                      "t": self.now()}
                self._send({"type": "hand", "participant": self.hands[target]["participant"],
                            "raised": True}, self._hand_audience(target))
        else:
            hand = self.hands.pop(target, None)
            if hand is not None:
                self._send({"type": "hand", "participant": hand["participant"],
                            "raised": False}, self._hand_audience(target))
        return {"type": "ok", "raised": target in self.hands}

    # -- the microphone ------------------------------------------------------------------
    def _mic_grant(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, MODERATORS, "give the microphone")
        target = self._participant(self._ref(message, "participant"))
        if target is None:
            raise NotFound("that participant is not connected", code="unknown_participant")
        if target.role != Role.TRAINEE:
            raise Conflict("the microphone goes to a trainee", code="not_a_trainee")
        self._not_sterile("the trainee microphone")
        self._rate(grant, "moderate")
        holder = {"id": target.id, "name": target.name}
        if self.mic_holder != holder:
            self._set_mic(holder, grant)
        hand = self.hands.pop(target.id, None)
        if hand is not None:
            self._send({"type": "hand", "participant": hand["participant"], "raised": False},
                       self._hand_audience(target.id))
        return {"type": "ok", "mic": self.mic_holder}

    def _mic_revoke(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self.release_mic(grant)
        return {"type": "ok", "mic": self.mic_holder}

    def _set_mic(self, holder: dict[str, str] | None, grant: Grant | None) -> None:
        had = self.mic_holder is not None
        self.mic_holder = holder
        if had:
            # The previous holder's Feed closes now, not after a grace period.
            self._close_mic()
        by = self._who(grant) if grant is not None else None
        self._send({"type": "mic", "holder": holder,
                    "by": {"id": by["id"], "name": by["name"]} if by else None})

    # -- sterile focus -----------------------------------------------------------------------
    def _sterile(self, grant: Grant, message: dict[str, Any]) -> dict[str, Any]:
        self._require(grant, MODERATORS, "switch sterile focus")
        on = self._flag(message, "on")
        self._rate(grant, "moderate")
        if on == self.sterile:
            return {"type": "ok", "sterile": on}
        who = self._who(grant)
        self.sterile = on
        self._send({"type": "sterile", "on": on, "by": {"id": who["id"], "name": who["name"]}})
        if on and self.mic_holder is not None:
            self._set_mic(None, grant)
        if not on:
            for question in self.questions.values():
                question.held = False
            # Votes and questions kept quiet meanwhile: everyone gets the list.
            self._send({"type": "questions",
                        "questions": [q.describe() for q in self.questions.values()]})
        return {"type": "ok", "sterile": on}


def _unit(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0.0 <= value <= 1.0)
