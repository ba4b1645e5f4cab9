"""A theatre camera's picture with a real face and a patient's name on a
monitor, and Recordings of it, for the de-identification tests.

The face is scikit-image's sample photograph (``skimage.data.astronaut``, in
its wheel), scaled to 360x360 at the left of a 640x360 picture; the monitor at
the top right shows a name and a record number in white; the rest is a
textured background (blocks of random grey on a gradient, fixed seed), so
that blurring anything is measurable."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from skimage import data

from recorder import Recording

from .recording_helpers import CONSENT, build_recording

W, H = 640, 360
#: Where the astronaut's face is (eyes to mouth), x0, y0, x1, y1: what must be blurred.
FACE = (128, 52, 186, 108)
#: Around the face: where blurring may reach (the detector's box widened, and its jitter).
FACE_AREA = (88, 8, 232, 156)
#: The patient monitor (x0, y0, x1, y1) and the region that masks it (fractions).
MONITOR = (400, 20, 620, 120)
MONITOR_REGION = [0.62, 0.05, 0.35, 0.30]
#: A region of interest (conservative mode): the bottom right quarter.
ROI_REGION = [0.6, 0.5, 0.4, 0.5]
#: The names written on the monitor.
NAME = "DOE, JANE"
#: The [deidentify] configuration of these tests.
CONFIG: dict[str, Any] = {"masks": {"room": [MONITOR_REGION]}, "keep": {"room": [ROI_REGION]},
                          "face_slots": ["room"]}


@functools.lru_cache(maxsize=1)
def theatre_picture() -> np.ndarray:
    rng = np.random.default_rng(16)
    blocks = rng.integers(40, 200, size=(H // 8, W // 8), dtype=np.uint8)
    texture = cv2.resize(blocks, (W, H), interpolation=cv2.INTER_NEAREST)
    gradient = np.linspace(0, 50, W, dtype=np.float32)[None, :]
    picture = np.stack([texture, np.clip(texture * 0.8 + gradient, 0, 255),
                        np.clip(texture * 0.6 + 40, 0, 255)], axis=-1).astype(np.uint8)
    astronaut = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    picture[:, :360] = cv2.resize(astronaut, (360, 360), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = MONITOR
    cv2.rectangle(picture, (x0, y0), (x1, y1), (12, 12, 12), -1)
    cv2.putText(picture, NAME, (x0 + 10, y0 + 40), cv2.FONT_HERSHEY_SIMPLEX, 0.9,
                (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(picture, "MRN 0042-17", (x0 + 10, y0 + 80), cv2.FONT_HERSHEY_SIMPLEX, 0.9,
                (255, 255, 255), 2, cv2.LINE_AA)
    picture.setflags(write=False)
    return picture


async def face_recording(root: str | Path, session_id: str = "or1-live", *,
                         seconds: float = 2.0, consent: dict[str, str] | None = None,
                         audio: tuple[tuple[str, tuple[float, ...], float], ...] = (),
                         events: list[dict[str, Any]] = (),  # type: ignore[assignment]
                         recording_id: str | None = None) -> Recording:
    """A stopped Recording of the room camera showing :func:`theatre_picture`
    from Session time 0.5 s (consent at 0)."""
    return await build_recording(root, session_id, seconds=seconds, start_t=0.5,
                                 consent=consent or CONSENT, audio=audio, events=events,
                                 recording_id=recording_id,
                                 pictures={"room.video": np.array(theatre_picture())})


def decoded(path: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(float(f.time or 0.0), f.to_ndarray(format="bgr24"))
                for f in container.decode(video=0)]


def box(image: np.ndarray, area: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = area
    return image[y0:y1, x0:x1]


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel, the mean absolute difference over the colour channels."""
    return np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)), axis=2)


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian: detail (edges) in a picture."""
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def outside(shape: tuple[int, ...], *areas: tuple[int, int, int, int]) -> np.ndarray:
    """A mask of the pixels outside every area."""
    keep = np.ones(shape[:2], bool)
    for x0, y0, x1, y1 in areas:
        keep[max(0, y0):y1, max(0, x0):x1] = False
    return keep


def pixels(region: list[float], margin: int = 0) -> tuple[int, int, int, int]:
    x, y, w, h = region
    return (int(x * W) - margin, int(y * H) - margin, int((x + w) * W) + 1 + margin,
            int((y + h) * H) + 1 + margin)
