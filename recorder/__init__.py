"""ScrubIn recorder: archives what the live path already carries, without transcoding.

The recorder is just another client of a Session: a :class:`Recording` attaches
a downstream to each of its Feeds through the media seam (``server.media.plane``,
from the next keyframe, never a cached frame) and a :class:`FeedWriter` per Feed
remuxes the encoded frames into short, crash-safe parts (VP8 and Opus in WebM,
H.264 in fragmented MP4), listed with their place on the Session clock in
``manifest.json``, beside ``events.jsonl``. ``recorder.repair`` finishes a
recording a crash or a full disk left unfinished; ``recorder.export`` makes the
MP4 (with its sound), the contact sheet and the thumbnail; ``recorder.deidentify``
a camera's de-identified copy for teaching, and ``recorder.deidentified`` keeps
such copies beside their recording, pending review until signed off.
"""

from .errors import RecordingError
from .recording import RecordableFeed, Recording, SessionInfo
from .writer import FeedWriter, PartInfo, WriterOptions

__all__ = [
    "FeedWriter",
    "PartInfo",
    "RecordableFeed",
    "Recording",
    "RecordingError",
    "SessionInfo",
    "WriterOptions",
]
