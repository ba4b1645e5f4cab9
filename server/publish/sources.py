"""Where `scrubin publish` gets media: synthetic, file, RTSP or V4L2.

H.264 from files and IP cameras is forwarded as encoded packets (no decode,
no encode) when ``passthrough`` is on; aiortc's sender only packetizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack

from .synthetic import SyntheticTheatreCamera, SyntheticTone


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
    probe = MediaPlayer(spec, options=options, decode=True)
    h264 = bool(probe.video) and _stream_codec(probe) == "h264"
    probe_tracks = [t for t in (probe.video, probe.audio if audio else None) if t is not None]
    if not (passthrough and h264):
        return Source(probe_tracks, player=probe)
    for track in probe_tracks:
        track.stop()
    # Encoded H.264 goes through as packets; audio in such containers (AAC)
    # cannot, so it is dropped rather than transcoded.
    player = MediaPlayer(spec, options=options, decode=False)
    return Source([player.video] if player.video else [], video_codec="video/H264",
                  player=player)


def _stream_codec(player: MediaPlayer) -> str:
    container = getattr(player, "_MediaPlayer__container", None)
    if container is None:
        return ""
    for stream in container.streams:
        if stream.type == "video":
            return str(stream.codec_context.name)
    return ""
