#!/usr/bin/python3
"""GStreamer webrtcbin as a WHIP publisher or a WHEP player: an independent WebRTC stack
(libnice ICE, GStreamer's DTLS with an RSA certificate, GStreamer's RTP) for the interop
tests. Runs under Debian's /usr/bin/python3 with python3-gst-1.0, never the project's venv,
and under the lo_only.so shim so libnice offers 127.0.0.1 only.

    gst_client.py publish URL TOKEN --codec vp8|h264 --y4m FILE
    gst_client.py play URL TOKEN --codec vp8|h264 [--profile 42e01f]
                  [--packetization-mode 1|0|none] [--audio] --seconds S --out FILE.gray

Prints one JSON line per event ("status", "connected", "done", "error") on stdout; the
test reads them. A refused POST exits 3 after printing its status and body.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

VIDEO_PT = {"vp8": 96, "h264": 102}
ENCODERS = {
    "vp8": ("vp8enc deadline=1 keyframe-max-dist=30 target-bitrate=600000 ! rtpvp8pay pt=96 "
            "! application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000"),
    # No B-frames: WebRTC forbids them; constrained-baseline is what browsers decode.
    # ultrafast leaves out CABAC and 8x8 transforms, so x264 writes Constrained Baseline
    # whatever profile is asked for; superfast keeps them (a real High stream).
    "h264": ("x264enc tune=zerolatency speed-preset={preset} key-int-max=30 bframes=0 "
             "bitrate=600 ! video/x-h264,profile={profile} "
             "! rtph264pay pt=102 config-interval=-1 aggregate-mode=zero-latency "
             "! application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000"),
}
DECODERS = {
    "vp8": "rtpvp8depay ! vp8dec",
    "h264": "rtph264depay ! h264parse ! avdec_h264",
}


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = GLib.MainLoop()
        self.resource: str | None = None
        self.exit_code = 0
        if args.mode == "publish":
            preset = "ultrafast" if args.h264_profile == "constrained-baseline" else "superfast"
            description = (
                f"filesrc location={args.y4m} ! y4mdec ! clocksync ! videoconvert "
                "! video/x-raw,format=I420 ! queue "
                f"! {ENCODERS[args.codec].format(profile=args.h264_profile, preset=preset)} "
                f"! webrtcbin name=w bundle-policy=max-bundle "
                "audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample "
                "! opusenc ! rtpopuspay pt=111 "
                "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 "
                "! w.")
            self.pipeline = Gst.parse_launch(description)
            self.webrtc = self.pipeline.get_by_name("w")
        else:
            self.pipeline = Gst.Pipeline.new("player")
            self.webrtc = Gst.ElementFactory.make("webrtcbin", "w")
            self.webrtc.set_property("bundle-policy", "max-bundle")
            self.pipeline.add(self.webrtc)
        self.webrtc.connect("on-negotiation-needed", self.on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self.on_gathering)
        self.webrtc.connect("notify::connection-state", self.on_connection_state)
        if args.mode == "play":
            self.webrtc.connect("pad-added", self.on_pad_added)
            caps = (f"application/x-rtp,media=video,encoding-name={args.codec.upper()},"
                    f"payload={VIDEO_PT[args.codec]},clock-rate=90000")
            if args.codec == "h264":
                caps += f",profile-level-id=(string){args.profile}"
                if args.mode_h264 is not None:
                    caps += f",packetization-mode=(string){args.mode_h264}"
            self.webrtc.emit("add-transceiver",
                             GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
                             Gst.Caps.from_string(caps))
            if args.audio:
                self.webrtc.emit("add-transceiver",
                                 GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
                                 Gst.Caps.from_string(
                                     "application/x-rtp,media=audio,encoding-name=OPUS,"
                                     "payload=111,clock-rate=48000"))
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self.on_message)
        self.frames = 0
        self.audio_buffers = 0
        self.offered = False

    # -- signalling ------------------------------------------------------------
    def on_negotiation_needed(self, element: Any) -> None:
        if self.args.mode == "publish":
            for index in range(2):
                transceiver = element.emit("get-transceiver", index)
                if transceiver is not None:
                    transceiver.set_property(
                        "direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        promise = Gst.Promise.new_with_change_func(self.on_offer_created, element, None)
        element.emit("create-offer", None, promise)

    def on_offer_created(self, promise: Gst.Promise, element: Any, _: Any) -> None:
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        if offer is None:
            say("error", message=f"no offer: {reply.to_string()}")
            self.exit_code = 5
            GLib.idle_add(self.loop.quit)
            return
        element.emit("set-local-description", offer, Gst.Promise.new())

    def on_gathering(self, element: Any, _: Any) -> None:
        state = element.get_property("ice-gathering-state")
        if state == GstWebRTC.WebRTCICEGatheringState.COMPLETE and not self.offered:
            self.offered = True
            sdp = element.get_property("local-description").sdp.as_text()
            # urllib blocks: keep it off the GLib main loop.
            threading.Thread(target=self.post, args=(sdp,), daemon=True).start()

    def post(self, sdp: str) -> None:
        request = urllib.request.Request(
            self.args.url, data=sdp.encode(), method="POST",
            headers={"Authorization": f"Bearer {self.args.token}",
                     "Content-Type": "application/sdp"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = response.read().decode()
                self.resource = urllib.parse.urljoin(self.args.url,
                                                     response.headers["Location"])
                say("status", status=response.status, sdp=answer)
        except urllib.error.HTTPError as exc:
            say("status", status=exc.code, body=exc.read().decode())
            self.exit_code = 3
            GLib.idle_add(self.loop.quit)
            return
        GLib.idle_add(self.apply_answer, answer)

    def apply_answer(self, text: str) -> bool:
        _, message = GstSdp.SDPMessage.new_from_text(text)
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        GLib.timeout_add(int(self.args.seconds * 1000), self.finish)
        return False

    def on_connection_state(self, element: Any, _: Any) -> None:
        state = element.get_property("connection-state")
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED:
            say("connected")
        elif state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            say("error", message="peer connection failed")
            self.exit_code = 4
            self.loop.quit()

    # -- playing ---------------------------------------------------------------
    def on_pad_added(self, element: Any, pad: Gst.Pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        caps = pad.get_current_caps().to_string()
        if "media=(string)video" not in caps:
            # Sound is decoded too: a player that cannot decode it would notice.
            branch = Gst.parse_bin_from_description(
                "queue ! rtpopusdepay ! opusdec ! identity name=count ! fakesink", True)
            self.pipeline.add(branch)
            branch.sync_state_with_parent()
            pad.link(branch.get_static_pad("sink"))
            branch.get_by_name("count").connect("handoff", self.on_audio)
            return
        branch = Gst.parse_bin_from_description(
            # Plain GRAY8 rows at a fixed size (decoders' buffers may carry padded strides,
            # which GStreamer 1.22's y4menc writes as they are).
            f"queue ! {DECODERS[self.args.codec]} ! videoconvert ! videoscale "
            f"! video/x-raw,format=GRAY8,width={self.args.width},height={self.args.height} "
            f"! identity name=count ! filesink location={self.args.out}", True)
        self.pipeline.add(branch)
        branch.sync_state_with_parent()
        pad.link(branch.get_static_pad("sink"))
        branch.get_by_name("count").connect("handoff", self.on_frame)

    def on_frame(self, *_: Any) -> None:
        self.frames += 1

    def on_audio(self, *_: Any) -> None:
        self.audio_buffers += 1

    # -- ending ----------------------------------------------------------------
    def on_message(self, bus: Gst.Bus, message: Gst.Message) -> None:
        if message.type == Gst.MessageType.ERROR:
            error, debug = message.parse_error()
            say("error", message=f"{error.message} ({debug})")
            self.exit_code = 5
            self.loop.quit()
        elif message.type == Gst.MessageType.EOS:
            self.finish()

    def finish(self) -> bool:
        if self.resource is not None:
            request = urllib.request.Request(
                self.resource, method="DELETE",
                headers={"Authorization": f"Bearer {self.args.token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    deleted = response.status
            except urllib.error.HTTPError as exc:
                deleted = exc.code
            self.resource = None
            say("done", frames=self.frames, audio=self.audio_buffers, delete=deleted)
        self.loop.quit()
        return False

    def run(self) -> int:
        self.pipeline.set_state(Gst.State.PLAYING)
        GLib.timeout_add(int((self.args.seconds + 20) * 1000), self.timeout)
        self.loop.run()
        self.pipeline.set_state(Gst.State.NULL)
        return self.exit_code

    def timeout(self) -> bool:
        say("error", message="timed out")
        self.exit_code = 6
        self.loop.quit()
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["publish", "play"])
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--codec", choices=sorted(VIDEO_PT), required=True)
    parser.add_argument("--y4m", help="publish: the video to send (paced in real time)")
    parser.add_argument("--profile", default="42e01f", help="play: H.264 profile-level-id")
    parser.add_argument("--h264-profile", default="constrained-baseline",
                        help="publish: x264's profile (high: as hardware encoders send)")
    parser.add_argument("--packetization-mode", dest="mode_h264", default="1",
                        help="play: H.264 packetization-mode ('none' leaves it out)")
    parser.add_argument("--audio", action="store_true",
                        help="play: receive sound too (WHEP per camera slot)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="/dev/null",
                        help="play: decoded frames, raw GRAY8 at --width x --height")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    if args.mode_h264 == "none":
        args.mode_h264 = None
    Gst.init(None)
    return Client(args).run()


if __name__ == "__main__":
    sys.exit(main())
