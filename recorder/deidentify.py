"""De-identifying one camera of a Recording for teaching reuse: an MP4 in which
nobody can be recognised and no patient data can be read.

On top of :func:`recorder.export.export_feed` (the recording's own clock, the
sound mixed as AAC, its ``picture`` hook on every frame):

* **Masks**: configured regions of a camera slot (a patient monitor, the
  endoscope's on-screen text) are painted over solid on every frame.
* **Faces**: on the cameras that see people (``face_slots``: room, overhead)
  faces are found with OpenCV's Haar cascades, the models inside its wheel
  (frontal, and at every other search profile facing either way; nothing is
  downloaded), on a picture at most ``detect_height`` lines high,
  ``detect_hz`` times per second of video, in a first pass over the Feed.
  Each frame is then blurred wherever a face was found within ``hold_s``
  before or after it, each box widened by a margin: a face is covered from
  before it was first found to after it was last found, and through a missed
  detection or two.
* **Conservative mode**: frontal and profile detectors miss masked, capped and
  turned-away faces, so on those cameras everything outside the slot's regions
  of interest (``keep``; none: the whole picture) is blurred as well.
* **Drawings** the expert made are burned in as shapes; their free text
  (labels) and the step titles are not: typed during the Session, they may
  name people.
* **Sound**: only the narration Feeds (``narration_slots``), and only when
  asked; room microphones and trainees' questions never.
* **Metadata**: none (``export_feed(strip_metadata=True)``).

Blurring is irreversible by construction: a face box is averaged down to a few
cells before it is scaled back up (pixelation smoothed), a masked region is a
solid colour.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from .export import (
    ExportError,
    Image,
    Progress,
    RecordingFiles,
    draw_shape,
    export_feed,
    feed_pictures,
    recording_span,
)
from .replay import annotations_at

#: A face found: x, y, width, height as fractions of the picture.
Box = tuple[float, float, float, float]
#: The colour masked regions are painted (BGR).
MASK_BGR = (32, 32, 32)
#: A face box is averaged down to this many cells across before it is scaled back up.
FACE_CELLS = 5
#: Outside the regions of interest (conservative mode) the picture is averaged
#: down by this factor: shapes stay, nobody is recognisable.
CONSERVATIVE_FACTOR = 24
#: The face pass costs about this much of the encoding pass (progress weights).
FACE_PASS_WEIGHT = 0.35
FRONTAL = "haarcascade_frontalface_alt2.xml"
PROFILE = "haarcascade_profileface.xml"


@dataclass(frozen=True)
class Region:
    """A rectangle as fractions of the picture: x, y from its top left corner."""

    x: float
    y: float
    w: float
    h: float

    @classmethod
    def of(cls, value: Sequence[float]) -> Region:
        """``[x, y, width, height]``, each in [0, 1], inside the picture."""
        if isinstance(value, (str, bytes)) or len(value) != 4:
            raise ValueError(f"a region is [x, y, width, height], got {value!r}")
        try:
            x, y, w, h = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"a region is four numbers, got {value!r}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or min(x, y) < 0 or min(w, h) <= 0 \
                or x + w > 1 + 1e-6 or y + h > 1 + 1e-6:
            raise ValueError(f"a region is fractions of the picture (0 to 1, inside it), "
                             f"got {value!r}")
        return cls(x, y, w, h)

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in a width × height picture, covering every pixel the
        region touches."""
        x0 = max(0, math.floor(self.x * width))
        y0 = max(0, math.floor(self.y * height))
        x1 = min(width, math.ceil((self.x + self.w) * width))
        y1 = min(height, math.ceil((self.y + self.h) * height))
        return x0, y0, x1, y1

    def describe(self) -> list[float]:
        return [self.x, self.y, self.w, self.h]


def regions(value: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, tuple[Region, ...]]:
    """Regions per camera slot, from configuration (``{"room": [[x, y, w, h], …]}``)."""
    return {str(slot): tuple(Region.of(r) for r in items) for slot, items in value.items()}


def slot_of(feed_id: str) -> str:
    return feed_id.split(".", 1)[0]


@dataclass(frozen=True)
class DeidentifyOptions:
    """What a de-identified export hides and keeps (see the module docstring)."""

    masks: Mapping[str, tuple[Region, ...]] = field(default_factory=dict)
    face_slots: tuple[str, ...] = ("room", "overhead")
    conservative: bool = False
    keep: Mapping[str, tuple[Region, ...]] = field(default_factory=dict)
    narration: bool = False
    narration_slots: tuple[str, ...] = ("narration",)
    drawings: bool = True
    profile_faces: bool = True
    detect_hz: float = 4.0
    detect_height: int = 360
    hold_s: float = 0.5
    crf: int = 23
    preset: str = "veryfast"

    def searches_faces(self, slot: str) -> bool:
        return slot in self.face_slots or "*" in self.face_slots

    def describe(self) -> dict[str, Any]:
        """What export.json records of the options (JSON)."""
        return {
            "conservative": self.conservative, "narration": self.narration,
            "drawings": self.drawings, "face_slots": list(self.face_slots),
            "masks": {s: [r.describe() for r in rs] for s, rs in self.masks.items()},
            "keep": {s: [r.describe() for r in rs] for s, rs in self.keep.items()},
            "narration_slots": list(self.narration_slots),
            "profile_faces": self.profile_faces, "detect_hz": self.detect_hz,
            "detect_height": self.detect_height, "hold_s": self.hold_s,
        }


# -- faces ------------------------------------------------------------------------------

class FaceDetector:
    """OpenCV's Haar cascades (the XML models inside opencv-python's wheel):
    frontal faces, and profiles facing either way."""

    def __init__(self, *, profiles: bool = True, max_height: int = 360,
                 min_face: int = 20) -> None:
        self._frontal = _cascade(FRONTAL)
        self._profile = _cascade(PROFILE) if profiles else None
        self._max_height = max_height
        self._min = (min_face, min_face)

    def detect(self, image: Image, *, profiles: bool = True) -> list[Box]:
        """Faces in a picture (``profiles``: turned-away ones too, if this
        detector looks for them: three times the cost)."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        h, w = gray.shape[:2]
        if h > self._max_height:
            scale = self._max_height / h
            gray = cv2.resize(gray, (max(1, round(w * scale)), self._max_height),
                              interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        gh, gw = gray.shape[:2]
        found: list[tuple[int, int, int, int]] = list(self._find(self._frontal, gray))
        if self._profile is not None and profiles:
            found += self._find(self._profile, gray)
            # The profile model knows faces turned one way: the mirror finds the other.
            found += [(gw - x - bw, y, bw, bh)
                      for x, y, bw, bh in self._find(self._profile, cv2.flip(gray, 1))]
        return [(x / gw, y / gh, bw / gw, bh / gh) for x, y, bw, bh in found]

    def _find(self, cascade: Any, gray: Any) -> list[tuple[int, int, int, int]]:
        # minNeighbors 3, below OpenCV's default: a missed face costs more than
        # a blurred patch of wall. Scales 1.2 apart: 1.1 costs twice as much.
        found = cascade.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=3,
                                         minSize=self._min)
        return [(int(x), int(y), int(w), int(h)) for x, y, w, h in found]


def _cascade(name: str) -> Any:
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        raise ExportError(f"this OpenCV has no {name} (opencv-python-headless 4.x ships the "
                          "Haar cascades in cv2.data.haarcascades): faces cannot be found")
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise ExportError(f"OpenCV could not load {path}")
    return cascade


@dataclass
class FaceTrack:
    """Faces found through a Feed: the detections' times (export clock, rising)
    and boxes; :meth:`at` is what a frame blurs."""

    hold_s: float
    times: list[float] = field(default_factory=list)
    boxes: list[list[Box]] = field(default_factory=list)

    def add(self, t: float, boxes: list[Box]) -> None:
        self.times.append(t)
        self.boxes.append(boxes)

    def at(self, t: float) -> list[Box]:
        """Every face found within ``hold_s`` before or after ``t``."""
        lo = bisect.bisect_left(self.times, t - self.hold_s)
        hi = bisect.bisect_right(self.times, t + self.hold_s)
        return [box for found in self.boxes[lo:hi] for box in found]

    @property
    def detections(self) -> int:
        return len(self.times)

    @property
    def with_faces(self) -> int:
        return sum(1 for found in self.boxes if found)


def find_faces(files: RecordingFiles, feed: dict[str, Any], options: DeidentifyOptions,
               *, progress: Progress | None = None,
               detector: FaceDetector | None = None) -> FaceTrack:
    """The face pass: every picture decoded, ``detect_hz`` of them per second searched."""
    detector = detector or FaceDetector(profiles=options.profile_faces,
                                        max_height=options.detect_height)
    t0, t1 = recording_span(files)
    total = max(t1 - t0, 0.001)
    step = 1.0 / options.detect_hz
    # However sparse the detections, a frame sees the ones on either side.
    track = FaceTrack(hold_s=max(options.hold_s, 1.5 * step))
    next_at = -math.inf
    for count, (t, image) in enumerate(feed_pictures(files, feed), 1):
        at = t - t0
        if at >= next_at - 1e-6:
            # Profiles at every other search: they cost twice the frontal search,
            # and each sighting is held for hold_s either side.
            track.add(at, detector.detect(image, profiles=track.detections % 2 == 0))
            next_at = at + step
        if progress is not None and count % 15 == 0:
            progress(min(max(at, 0.0), total), total)
    if progress is not None:
        progress(total, total)
    return track


# -- pictures -----------------------------------------------------------------------------

def mask(image: Image, areas: Sequence[Region]) -> None:
    h, w = image.shape[:2]
    for region in areas:
        x0, y0, x1, y1 = region.pixels(w, h)
        image[y0:y1, x0:x1] = MASK_BGR


def pixelate(image: Image, x0: int, y0: int, x1: int, y1: int, cells: int = FACE_CELLS) -> None:
    """Average a box down to ``cells`` across and scale it back up, smoothly."""
    roi = image[y0:y1, x0:x1]
    h, w = roi.shape[:2]
    if h < 2 or w < 2:
        return
    small = cv2.resize(roi, (min(cells, w), min(cells, h)), interpolation=cv2.INTER_AREA)
    roi[:] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur_outside(image: Image, keep: Sequence[Region],
                 factor: int = CONSERVATIVE_FACTOR) -> None:
    """Everything but the regions of interest averaged down by ``factor``."""
    h, w = image.shape[:2]
    kept = [(r.pixels(w, h), image[y0:y1, x0:x1].copy())
            for r in keep for (x0, y0, x1, y1) in [r.pixels(w, h)]]
    small = cv2.resize(image, (max(1, w // factor), max(1, h // factor)),
                       interpolation=cv2.INTER_AREA)
    image[:] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    for (x0, y0, x1, y1), original in kept:
        image[y0:y1, x0:x1] = original


def face_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A face box in pixels, widened: a quarter of its width each side, its
    hair above and its chin below (Haar boxes are tight on eyes to mouth)."""
    x, y, w, h = box
    return (max(0, math.floor((x - 0.25 * w) * width)),
            max(0, math.floor((y - 0.35 * h) * height)),
            min(width, math.ceil((x + 1.25 * w) * width)),
            min(height, math.ceil((y + 1.25 * h) * height)))


Drawings = Callable[[float], list[tuple[dict[str, Any], float]]]


class Redactor:
    """The ``picture`` hook of one camera's export: conservative blur, faces,
    masks, then the drawings (shapes only)."""

    def __init__(self, options: DeidentifyOptions, slot: str, faces: FaceTrack | None,
                 drawings: Drawings | None) -> None:
        self._masks = options.masks.get(slot, ())
        self._keep = options.keep.get(slot, ())
        self._conservative = options.conservative and options.searches_faces(slot)
        self._faces = faces
        self._drawings = drawings
        self.frames = 0
        self.frames_blurred = 0

    def __call__(self, image: Image, at: float) -> None:
        h, w = image.shape[:2]
        self.frames += 1
        if self._conservative:
            blur_outside(image, self._keep)
        boxes = self._faces.at(at) if self._faces is not None else []
        for box in boxes:
            pixelate(image, *face_pixels(box, w, h))
        if boxes:
            self.frames_blurred += 1
        mask(image, self._masks)
        if self._drawings is not None:
            for shape, alpha in self._drawings(at):
                draw_shape(image, shape, alpha)


def _shapes(files: RecordingFiles, feed_id: str, t0: float) -> Drawings:
    """The drawings on a Feed at an export time, without their free text."""
    def at(export_t: float) -> list[tuple[dict[str, Any], float]]:
        out = []
        for annotation, alpha in annotations_at(files.events, feed_id, export_t + t0):
            shape = annotation.get("shape")
            if isinstance(shape, dict) and shape.get("kind") != "label":
                out.append((shape, alpha))
        return out
    return at


# -- one camera ----------------------------------------------------------------------------

@dataclass
class FeedResult:
    feed: str
    path: Path
    frames: int
    duration: float
    width: int
    height: int
    audio: tuple[str, ...]  # the narration Feeds in its sound
    faces_searched: bool
    detections: int  # pictures searched for faces
    detections_with_faces: int
    frames_blurred: int  # frames in which a face was blurred
    conservative: bool

    def describe(self) -> dict[str, Any]:
        return {"feed": self.feed, "file": self.path.name, "frames": self.frames,
                "duration": self.duration, "width": self.width, "height": self.height,
                "audio": list(self.audio), "conservative": self.conservative,
                "faces": {"searched": self.faces_searched, "detections": self.detections,
                          "with_faces": self.detections_with_faces,
                          "frames_blurred": self.frames_blurred}}


def narration_feeds(files: RecordingFiles, options: DeidentifyOptions) -> list[str]:
    """The audio Feeds an export keeps: the narration's, when asked for."""
    if not options.narration:
        return []
    return [str(f["id"]) for f in files.manifest.get("feeds", [])
            if f.get("kind") == "audio" and slot_of(str(f.get("id", ""))) in
            options.narration_slots and files.parts(f)]


def work(files: RecordingFiles, feed_id: str, options: DeidentifyOptions) -> float:
    """How much a camera's export costs, in the units :func:`deidentify_feed`
    reports progress in (seconds of video, the face pass weighted)."""
    t0, t1 = recording_span(files)
    duration = max(t1 - t0, 0.001)
    face_pass = FACE_PASS_WEIGHT * duration if options.searches_faces(slot_of(feed_id)) else 0
    return duration + face_pass


def deidentify_feed(directory: str | os.PathLike[str], feed_id: str,
                    out: str | os.PathLike[str], options: DeidentifyOptions, *,
                    progress: Progress | None = None) -> FeedResult:
    """One camera de-identified (see the module docstring) into an MP4 at ``out``.
    ``progress(done, total)`` in :func:`work` units; it may raise to stop the
    export (nothing is left at ``out``)."""
    files = RecordingFiles.load(directory)
    feed = files.feed(feed_id)
    if feed.get("kind") != "video":
        raise ExportError(f"{feed_id} is {feed.get('kind')}; de-identify a video Feed")
    slot = slot_of(feed_id)
    t0, t1 = recording_span(files)
    search = options.searches_faces(slot)
    face_pass = FACE_PASS_WEIGHT * max(t1 - t0, 0.001) if search else 0.0
    total = work(files, feed_id, options)

    def report(offset: float, scale: float) -> Progress | None:
        if progress is None:
            return None
        reporter = progress
        return lambda done, _total: reporter(offset + done * scale, total)

    faces = None
    if search:
        faces = find_faces(files, feed, options, progress=report(0.0, FACE_PASS_WEIGHT))
    redactor = Redactor(options, slot, faces,
                        _shapes(files, feed_id, t0) if options.drawings else None)
    audio = narration_feeds(files, options)
    result = export_feed(directory, feed_id, out, progress=report(face_pass, 1.0), burn=False,
                         audio=audio or False, picture=redactor, crf=options.crf,
                         preset=options.preset, strip_metadata=True)
    return FeedResult(feed_id, result.path, result.frames, result.duration, result.width,
                      result.height, result.audio, faces is not None,
                      faces.detections if faces else 0, faces.with_faces if faces else 0,
                      redactor.frames_blurred, options.conservative and faces is not None)

