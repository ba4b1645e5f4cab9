#!/usr/bin/python3
"""A real RTSP camera for the interop tests: GStreamer's RTSP server (Debian's
gir1.2-gst-rtsp-server-1.0) serving an H.264 file at rtsp://127.0.0.1:PORT/camera, paced
in real time and looped, as an IP camera streams. Runs under /usr/bin/python3.

    rtsp_server.py PORT FILE.mp4
"""

from __future__ import annotations

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    port, path = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    # multifilesrc loops the file; h264parse re-sends SPS/PPS with every IDR.
    factory.set_launch(
        f"( multifilesrc location={path} loop=true ! qtdemux ! h264parse config-interval=-1 "
        "! rtph264pay name=pay0 pt=96 config-interval=-1 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory("/camera", factory)
    if server.attach(None) == 0:
        print("cannot listen", flush=True)
        return 1
    print("listening", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
