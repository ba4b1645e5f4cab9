"""FFmpeg's WHIP muxer (FFmpeg 8, inside PyAV) publishing framecoded H.264 and Opus, as
`ffmpeg -f whip` would. Runs in its own process: PyAV holds the GIL while FFmpeg does
its ICE/DTLS handshake, which would stall a server in the same process.

    python ffmpeg_whip.py URL TOKEN SECONDS [option=value ...]

Options go to the muxer as given (e.g. cert_file=…, key_file=…); without them FFmpeg
uses its defaults. Exit status 0 when the whole clip was sent.
"""

from __future__ import annotations

import logging
import sys
import time
from fractions import Fraction

import av
import av.logging
import numpy as np

from server.publish.synthetic import TheatreRenderer

WIDTH, HEIGHT, FPS = 320, 240, 30


def main() -> int:
    # FFmpeg's own errors (e.g. "DTLS session failed") on stderr, for the test to read.
    logging.basicConfig(level=logging.ERROR)
    av.logging.set_level(av.logging.ERROR)
    url, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    out = av.open(url, "w", format="whip", options={"authorization": token, **options})
    # What FFmpeg users pass for WebRTC: no B-frames, a keyframe a second.
    video = out.add_stream("libx264", rate=FPS, options={
        "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "bf": "0",
        "g": str(FPS)})
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.time_base = Fraction(1, FPS)
    audio = out.add_stream("libopus", rate=48000)
    renderer = TheatreRenderer(WIDTH, HEIGHT, label="ffmpeg")
    silence = np.zeros((1, 960 * 2), np.int16)  # 20 ms, stereo interleaved
    samples = 0
    start = time.monotonic()
    for n in range(int(seconds * FPS)):
        frame = av.VideoFrame.from_ndarray(renderer.render(n), format="bgr24")
        frame.pts = n
        for packet in video.encode(frame):
            out.mux(packet)
        while samples < (n + 1) * 48000 // FPS:
            sound = av.AudioFrame.from_ndarray(silence, format="s16", layout="stereo")
            sound.sample_rate = 48000
            sound.pts = samples
            samples += 960
            for packet in audio.encode(sound):
                out.mux(packet)
        delay = start + (n + 1) / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    for packet in video.encode():
        out.mux(packet)
    out.close()  # sends the WHIP DELETE
    print("sent", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
