"""SDP checks before anything reaches aiortc, and answer adjustments.

aiortc accepts garbage as "a session with no media" and raises on truncated
input; a WHIP/WHEP endpoint must instead refuse with a reason and keep nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aioice import Candidate
from aiortc import sdp as aiortc_sdp

from ..errors import BadRequest, PayloadTooLarge, Unprocessable
from .codecs import FORWARDABLE
from .hooks import remote_candidate_allowed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OfferSummary:
    text: str
    kinds: list[str]
    directions: list[str]
    #: kind -> lower-case MIME types offered (forwardable ones only).
    codecs: dict[str, set[str]]


def _parse_allowed(text: str, *, max_bytes: int, allowed_networks: list[Network],
                   ) -> tuple[str, aiortc_sdp.SessionDescription]:
    """Size, shape and candidates: the SDP without remote candidates we must
    never contact, and aiortc's parse of it."""
    if len(text.encode("utf-8", "replace")) > max_bytes:
        raise PayloadTooLarge(f"SDP is larger than {max_bytes} bytes", code="sdp_too_large")
    stripped = text.strip()
    if not stripped.startswith("v=0"):
        raise BadRequest("body is not an SDP offer (must start with v=0)", code="sdp_malformed")
    kept = []
    dropped = False
    for line in stripped.splitlines():
        if line.startswith("a=candidate:"):
            try:
                candidate = Candidate.from_sdp(line[len("a=candidate:"):])
            except (ValueError, IndexError):
                raise BadRequest(f"malformed ICE candidate: {line[:80]}", code="sdp_malformed") \
                    from None
            if not remote_candidate_allowed(candidate, allowed_networks):
                dropped = True
                continue
        kept.append(line)
    if dropped:
        # With candidates taken out, "that was all of them" would leave ICE with
        # nothing to try and no hope of more: let the remote's checks (peer-
        # reflexive candidates) connect instead.
        kept = [line for line in kept if line.strip() != "a=end-of-candidates"]
    clean = "\r\n".join(kept) + "\r\n"
    try:
        parsed = aiortc_sdp.SessionDescription.parse(clean)
    except Exception as exc:  # aiortc raises assorted errors on truncated input
        raise BadRequest(f"malformed SDP: {exc}", code="sdp_malformed") from None
    return clean, parsed


def check_datachannel_offer(text: str, *, max_bytes: int,
                            allowed_networks: list[Network]) -> str:
    """An offer of one data channel section and nothing else (connection
    checks, server/http/preflight.py); the SDP to hand to aiortc."""
    clean, parsed = _parse_allowed(text, max_bytes=max_bytes, allowed_networks=allowed_networks)
    if [m.kind for m in parsed.media] != ["application"]:
        raise Unprocessable("a connection check offers one data channel section only",
                            code="sdp_not_datachannel")
    media = parsed.media[0]
    if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
        raise BadRequest("data channel section lacks ICE credentials", code="sdp_malformed")
    if not media.dtls or not media.dtls.fingerprints:
        raise BadRequest("data channel section lacks a DTLS fingerprint", code="sdp_malformed")
    return clean


def check_offer(
    text: str,
    *,
    max_bytes: int,
    max_media: int,
    allowed_networks: list[Network],
    want_direction: str,
) -> OfferSummary:
    """Validate an SDP offer and drop remote candidates we must never contact.

    ``want_direction`` is what the remote must do: "send" for a publisher,
    "recv" for a viewer.
    """
    clean, parsed = _parse_allowed(text, max_bytes=max_bytes, allowed_networks=allowed_networks)
    media = [m for m in parsed.media if m.kind in ("audio", "video")]
    if not media:
        raise Unprocessable("SDP offer has no audio or video section", code="sdp_no_media")
    if len(parsed.media) > max_media:
        raise Unprocessable(
            f"SDP offer has {len(parsed.media)} media sections; at most {max_media} allowed",
            code="sdp_too_many_media",
        )
    directions = []
    codecs: dict[str, set[str]] = {}
    for m in media:
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise BadRequest(f"{m.kind} section lacks ICE credentials", code="sdp_malformed")
        if not m.dtls or not m.dtls.fingerprints:
            raise BadRequest(f"{m.kind} section lacks a DTLS fingerprint", code="sdp_malformed")
        direction = m.direction or "sendrecv"
        if want_direction == "send" and direction not in ("sendonly", "sendrecv"):
            raise Unprocessable(f"{m.kind} section is {direction}; a publisher must send",
                                code="sdp_direction")
        if want_direction == "recv" and direction not in ("recvonly", "sendrecv"):
            raise Unprocessable(f"{m.kind} section is {direction}; a viewer must receive",
                                code="sdp_direction")
        usable = {c.mimeType.lower() for c in m.rtp.codecs} & FORWARDABLE
        if not usable:
            offered = ", ".join(sorted({c.mimeType for c in m.rtp.codecs})) or "none"
            raise Unprocessable(
                f"{m.kind} section offers no codec ScrubIn forwards (offered: {offered}; "
                "supported: VP8, H264, Opus)", code="sdp_no_codec")
        directions.append(direction)
        codecs.setdefault(m.kind, set()).update(usable)
    # An offer may be left with no candidate the server may use: browsers hide
    # their addresses behind mDNS names. ICE still connects through the
    # browser's checks (peer-reflexive candidates); the server only answers
    # those and never contacts an address it was not allowed to.
    return OfferSummary(text=clean, kinds=[m.kind for m in media], directions=directions,
                        codecs=codecs)


def add_bitrate_hints(answer: str, min_kbps: int, start_kbps: int, max_kbps: int,
                      low_mids: frozenset[str] = frozenset(), low_max_kbps: int = 250) -> str:
    """Tell a browser publisher the bitrate range it may use.

    aiortc only sends REMB; without these hints Chrome stays at 200–400 kbit/s.
    A camera's low layer (the sections in ``low_mids``) is held at ``low_max_kbps``.
    """
    parsed = aiortc_sdp.SessionDescription.parse(answer)
    for media in parsed.media:
        if media.kind != "video":
            continue
        low = media.rtp.muxId in low_mids
        for codec in media.rtp.codecs:
            if codec.mimeType.lower().endswith("/rtx"):
                continue
            codec.parameters["x-google-min-bitrate"] = min(min_kbps, low_max_kbps // 2) \
                if low else min_kbps
            codec.parameters["x-google-start-bitrate"] = low_max_kbps if low else start_kbps
            codec.parameters["x-google-max-bitrate"] = low_max_kbps if low else max_kbps
    return str(parsed)


def _sections(text: str) -> tuple[list[str], list[list[str]]]:
    """(session lines, media sections' lines) of an SDP."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    head: list[str] = []
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            head.append(line)
    return head, sections


def _join(head: list[str], sections: list[list[str]]) -> str:
    return "\r\n".join(head + [line for section in sections for line in section]) + "\r\n"


def section_index(text: str, kind: str, nth: int) -> int | None:
    """Index among all m= sections of the ``nth`` section of ``kind``."""
    _, sections = _sections(text)
    found = [i for i, s in enumerate(sections) if s[0].startswith(f"m={kind} ")]
    return found[nth] if nth < len(found) else None


def h264_payloads(text: str, section: int) -> list[tuple[int, dict[str, object]]]:
    """``(payload type, fmtp parameters)`` of every H.264 payload type of a section,
    in the offer's order of preference."""
    _, sections = _sections(text)
    lines = sections[section]
    names = {}
    fmtp: dict[int, dict[str, object]] = {}
    for line in lines:
        if line.startswith("a=rtpmap:"):
            pt, _, codec = line[len("a=rtpmap:"):].partition(" ")
            names[int(pt)] = codec.split("/")[0].lower()
        elif line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:"):].partition(" ")
            fmtp[int(pt)] = dict(aiortc_sdp.parameters_from_sdp(params))
    order = [int(x) for x in lines[0].split()[3:] if x.isdigit()]
    return [(pt, fmtp.get(pt, {})) for pt in order if names.get(pt) == "h264"]


def keep_one_h264(text: str, section: int, payload_type: int, as_profile: str) -> str:
    """The offer as aiortc should see it: in ``section`` only ``payload_type`` (and its
    RTX) is left of the player's H.264 payload types, labelled ``as_profile`` (the
    label of the capability the answer prefers: aiortc matches labels, not streams)."""
    head, sections = _sections(text)
    lines = sections[section]
    h264 = {pt for pt, _ in h264_payloads(text, section)}
    drop = h264 - {payload_type}
    for line in lines:
        if line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:"):].partition(" ")
            if aiortc_sdp.parameters_from_sdp(params).get("apt") in drop:
                drop.add(int(pt))
    kept = []
    for line in lines:
        attribute = next((p for p in ("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")
                          if line.startswith(p)), None)
        if attribute is not None:
            pt_text = line[len(attribute):].split(" ", 1)[0]
            if pt_text.isdigit() and int(pt_text) in drop:
                continue
            if attribute == "a=fmtp:" and pt_text == str(payload_type):
                line = _with_parameter(line, "profile-level-id", as_profile)
        kept.append(line)
    fields = kept[0].split()
    kept[0] = " ".join(fields[:3] + [f for f in fields[3:] if not (f.isdigit() and
                                                                  int(f) in drop)])
    if not any(line.startswith(f"a=fmtp:{payload_type} ") for line in kept):
        kept.append(f"a=fmtp:{payload_type} profile-level-id={as_profile}")
    sections[section] = kept
    return _join(head, sections)


def relabel_h264(text: str, section: int, payload_type: int, profile_level_id: str) -> str:
    """Our answer, with the player's own label back on the payload type we send."""
    head, sections = _sections(text)
    sections[section] = [
        _with_parameter(line, "profile-level-id", profile_level_id)
        if line.startswith(f"a=fmtp:{payload_type} ") else line
        for line in sections[section]]
    return _join(head, sections)


def _with_parameter(fmtp_line: str, name: str, value: str) -> str:
    prefix, _, params = fmtp_line.partition(" ")
    parsed = aiortc_sdp.parameters_from_sdp(params)
    parsed[name] = value
    return f"{prefix} {aiortc_sdp.parameters_to_sdp(parsed)}"
