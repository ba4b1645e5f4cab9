"""Where `scrubin publish` gets media: synthetic, file, RTSP or V4L2.

H.264 from files and IP cameras is forwarded as encoded packets (no decode,
no encode) when ``passthrough`` is on; aiortc's sender only packetizes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import av
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack

from .passthrough import BFramesError, EncodedVideoTrack, SourceError
from .synthetic import SyntheticTheatreCamera, SyntheticTone

logger = logging.getLogger(__name__)


@dataclass
class Source:
    tracks: list[MediaStreamTrack]
    #: Set when the video is forwarded encoded: the offer must use this codec.
    video_codec: str | None = None
    player: MediaPlayer | None = None

    def close(self) -> None:
        for track in self.tracks:
            track.stop()


def open_source(spec: str, *, label: str, width: int = 1280, height: int = 720,
                fps: float = 30, audio: bool = True, passthrough: bool = True) -> Source:
    """``spec``: ``synthetic``, a file path, ``rtsp://…``, or ``v4l2:/dev/videoN``."""
    if spec == "synthetic":
        tracks: list[MediaStreamTrack] = [SyntheticTheatreCamera(width, height, fps, label=label)]
        if audio:
            tracks.append(SyntheticTone())
        return Source(tracks)
    if spec.startswith("v4l2:"):
        player = MediaPlayer(spec[len("v4l2:"):], format="v4l2",
                             options={"video_size": f"{width}x{height}", "framerate": str(fps)})
        return Source([t for t in (player.video,) if t is not None], player=player)
    options = {"rtsp_transport": "tcp"} if spec.startswith(("rtsp://", "rtsps://")) else {}
    if passthrough:
        try:
            track = EncodedVideoTrack(spec, options=options, loop=not _is_stream(spec))
        except BFramesError:
            raise  # decoding would hide it: the operator chooses --transcode
        except SourceError as exc:
            logger.info("%s; decoding instead", exc)
        else:
            codec = "video/H264" if track.codec == "h264" else "video/VP8"
            # Audio beside forwarded video (AAC, usually) would need transcoding:
            # the narration slot is the place for sound.
            return Source([track], video_codec=codec)
    player = MediaPlayer(spec, options=options, loop=not _is_stream(spec))
    tracks = [t for t in (player.video, player.audio if audio else None) if t is not None]
    # Re-encoded, an H.264 camera stays H.264 (players and recordings set up for it).
    keep = "video/H264" if _video_codec(spec, options) == "h264" else None
    return Source(tracks, video_codec=keep, player=player)


def _video_codec(spec: str, options: dict[str, str]) -> str | None:
    try:
        with av.open(spec, options=options, timeout=5) as container:
            videos = [s for s in container.streams if s.type == "video"]
            return str(videos[0].codec_context.name) if videos else None
    except (av.FFmpegError, OSError):
        return None


def _is_stream(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")
