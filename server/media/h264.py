"""H.264 facts read from the stream itself, and which players can take it.

A Feed's SDP label (the publisher's ``profile-level-id``) says what the publisher
*may* send; its SPS says what it *does* send. GStreamer and FFmpeg label Constrained
Baseline streams ``42001f`` (Baseline), browsers' players ask for ``42e01f``
(Constrained Baseline): matching labels refuses players that decode the stream fine.
So viewers are matched against the SPS (RFC 6184 section 8.1; profile_idc and the
constraint_set flags), falling back to the label until the first SPS arrives.

Frames are forwarded as the Feed packetized them once, with FU-A fragments and
STAP-A aggregates: a player must accept ``packetization-mode=1``.

B-frames are refused: WebRTC players decode in arrival order and have no reorder
delay to show them (RFC 7742 section 6.2 leaves them out of WebRTC).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from aiortc import sdp as aiortc_sdp

from .sdp import h264_payloads, keep_one_h264, relabel_h264, section_index

_P = aiortc_sdp.H264Profile
#: Which players' profiles decode a stream of a given profile (CB is a subset of all).
_DECODABLE_BY: dict[aiortc_sdp.H264Profile, set[aiortc_sdp.H264Profile]] = {
    _P.PROFILE_CONSTRAINED_BASELINE: {
        _P.PROFILE_CONSTRAINED_BASELINE, _P.PROFILE_BASELINE, _P.PROFILE_MAIN,
        _P.PROFILE_CONSTRAINED_HIGH, _P.PROFILE_HIGH},
    _P.PROFILE_BASELINE: {_P.PROFILE_BASELINE},
    _P.PROFILE_MAIN: {_P.PROFILE_MAIN, _P.PROFILE_HIGH},
    _P.PROFILE_CONSTRAINED_HIGH: {_P.PROFILE_CONSTRAINED_HIGH, _P.PROFILE_HIGH},
    _P.PROFILE_HIGH: {_P.PROFILE_HIGH},
}

PROFILE_NAMES = {
    _P.PROFILE_CONSTRAINED_BASELINE: "Constrained Baseline",
    _P.PROFILE_BASELINE: "Baseline",
    _P.PROFILE_MAIN: "Main",
    _P.PROFILE_CONSTRAINED_HIGH: "Constrained High",
    _P.PROFILE_HIGH: "High",
}

#: The label RFC 6184 assumes when an offer leaves profile-level-id out.
DEFAULT_PROFILE_LEVEL_ID = "42001f"

_SLICE_NALS = (1, 5)
_B_SLICE_TYPES = (1, 6)


@dataclass(frozen=True)
class H264Stream:
    """What an H.264 stream is, from its SPS (or, until one arrives, its label)."""

    profile_idc: int
    constraints: int  # constraint_set0..5 flags, as the profile-iop byte
    level_idc: int

    @classmethod
    def from_label(cls, profile_level_id: str) -> H264Stream:
        value = int(profile_level_id, 16)
        return cls(value >> 16, (value >> 8) & 0xFF, value & 0xFF)

    @property
    def profile_level_id(self) -> str:
        return f"{self.profile_idc:02x}{self.constraints:02x}{self.level_idc:02x}"

    @property
    def profile(self) -> aiortc_sdp.H264Profile | None:
        try:
            return aiortc_sdp.parse_h264_profile_level_id(self.profile_level_id)[0]
        except ValueError:
            return None

    def describe(self) -> str:
        profile = self.profile
        name = PROFILE_NAMES.get(profile, "an unsupported profile") if profile is not None \
            else "an unsupported profile"
        return f"{name} ({self.profile_level_id})"

    def decodable_by(self, profile_level_id: str) -> bool:
        """True if a player offering ``profile_level_id`` decodes this stream."""
        mine = self.profile
        try:
            theirs = aiortc_sdp.parse_h264_profile_level_id(profile_level_id)[0]
        except ValueError:
            return False
        return mine is not None and theirs in _DECODABLE_BY.get(mine, set())


def nal_headers(data: bytes, size: int = 16) -> Iterator[bytes]:
    """The first ``size`` bytes of each NAL unit in an Annex-B buffer (aiortc's
    depayloader emits Annex-B): enough for NAL and slice headers, no copy of the rest."""
    index = data.find(b"\x00\x00\x01")
    while index != -1:
        start = index + 3
        index = data.find(b"\x00\x00\x01", start)
        end = start + size if index == -1 else min(start + size, index)
        yield data[start:end]


class _Bits:
    """Exp-Golomb reader over an RBSP (emulation prevention bytes removed)."""

    def __init__(self, payload: bytes) -> None:
        self._data = payload.replace(b"\x00\x00\x03", b"\x00\x00")
        self._pos = 0

    def bit(self) -> int:
        byte = self._data[self._pos >> 3]  # IndexError at the end: the caller's stop
        value = (byte >> (7 - (self._pos & 7))) & 1
        self._pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        value = 1
        for _ in range(zeros):
            value = (value << 1) | self.bit()
        return value - 1


def parse_sps(data: bytes) -> H264Stream | None:
    """The stream description from the first SPS in ``data``, if any."""
    for nal in nal_headers(data):
        if nal and nal[0] & 0x1F == 7 and len(nal) >= 4:
            return H264Stream(nal[1], nal[2], nal[3])
    return None


def has_b_slices(data: bytes) -> bool:
    """True if any slice in the frame is a B slice."""
    return inspect_frame(data)[1]


def inspect_frame(data: bytes) -> tuple[H264Stream | None, bool]:
    """One pass over a frame's NAL headers: (its SPS if it has one, any B slice)."""
    sps: H264Stream | None = None
    for nal in nal_headers(data):
        if not nal:
            continue
        nal_type = nal[0] & 0x1F
        if nal_type == 7 and sps is None and len(nal) >= 4:
            sps = H264Stream(nal[1], nal[2], nal[3])
        elif nal_type in _SLICE_NALS:
            try:
                bits = _Bits(nal[1:])
                bits.ue()  # first_mb_in_slice
                if bits.ue() in _B_SLICE_TYPES:
                    return sps, True
            except (IndexError, ValueError):
                continue
    return sps, False


@dataclass(frozen=True)
class ViewerChoice:
    """The payload type of a player's offer that carries the Feed, and its label."""

    payload_type: int
    profile_level_id: str


class H264Refusal(Exception):
    """No payload type in the player's offer can carry the stream; says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def choose_viewer_codec(stream: H264Stream, offered: Sequence[tuple[int, Mapping[str, object]]],
                        feed_id: str) -> ViewerChoice:
    """The first of a player's H.264 payload types (``(pt, fmtp parameters)`` in offer
    order) that can decode ``stream`` as the Feed sends it."""
    decodable = [(pt, str(params.get("profile-level-id", DEFAULT_PROFILE_LEVEL_ID)).lower(),
                  str(params.get("packetization-mode", "0")))
                 for pt, params in offered]
    decodable = [d for d in decodable if stream.decodable_by(d[1])]
    for pt, profile_level_id, mode in decodable:
        if mode == "1":
            return ViewerChoice(pt, profile_level_id)
    required = f"packetization-mode=1 and a profile that decodes {stream.describe()}"
    if decodable:
        raise H264Refusal(
            "h264_packetization_mode",
            f"the player offers H.264 for {feed_id} only in packetization-mode 0, which "
            f"cannot carry fragmented frames; it needs {required}")
    labels = ", ".join(sorted({
        f"{params.get('profile-level-id', DEFAULT_PROFILE_LEVEL_ID)}"
        f"/mode {params.get('packetization-mode', '0')}" for _, params in offered})) or "none"
    raise H264Refusal(
        "codec_mismatch",
        f"{feed_id} is H.264 {stream.describe()}; the player offers H.264 {labels}: "
        f"it needs {required}")


def fit_h264_publisher(offer: str, as_profile: str, nth: int = 0
                       ) -> tuple[str, Callable[[str], str], H264Stream | None]:
    """A publisher offering H.264 only in profiles aiortc does not list (Main, High:
    hardware encoders) is still received: aiortc forwards, never decodes, so only the
    label stands in the way. ``nth``: which video section (a camera's low layer is
    the second). Returns the offer as aiortc should see it (one payload type,
    labelled ``as_profile``), how to put the publisher's label back on the answer,
    and what that label says the stream is (None: nothing changed)."""
    unchanged: tuple[str, Callable[[str], str], None] = (offer, lambda text: text, None)
    section = section_index(offer, "video", nth)
    if section is None:
        return unchanged
    candidates: list[tuple[int, str, aiortc_sdp.H264Profile]] = []
    for pt, params in h264_payloads(offer, section):
        label = str(params.get("profile-level-id", DEFAULT_PROFILE_LEVEL_ID)).lower()
        profile = H264Stream.from_label(label).profile if _is_label(label) else None
        if profile is None or str(params.get("packetization-mode", "0")) != "1":
            continue
        if profile in (_P.PROFILE_CONSTRAINED_BASELINE, _P.PROFILE_BASELINE):
            return unchanged  # aiortc matches these itself
        candidates.append((pt, label, profile))
    if not candidates:
        return unchanged  # aiortc refuses it with sdp_rejected
    pt, label, _ = candidates[0]
    fitted = keep_one_h264(offer, section, pt, as_profile)
    return (fitted, lambda answer: relabel_h264(answer, section, pt, label),
            H264Stream.from_label(label))


def _is_label(label: str) -> bool:
    return len(label) == 6 and all(c in "0123456789abcdef" for c in label)
