"""Attendance and certificates of attendance over HTTP (docs/openapi.yaml,
docs/protocol.md "Attendance and certificates").

Attendance and certificate management: admins (node-wide or of the Session)
and the Session's expert. A trainee fetches their own certificate with their
own token. Verification is public and rate-limited per address.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from .. import attendance, certificates
from ..errors import BadRequest, Conflict, Forbidden, Gone, NotFound, TooManyRequests
from ..roles import MODERATORS, Role
from ..store import AttendanceRecord, CertificateRecord, SessionRecord
from ..tokens import Grant
from .common import AUDIT, CLOCK, CONFIG, REGISTRY, STORE, authenticate, read_json

routes = web.RouteTableDef()

#: Verification lookups per address are counted under this key prefix.
VERIFY_RATE_KEY = "verify:"


# -- who may call -----------------------------------------------------------------

async def moderator(request: web.Request) -> Grant:
    """An admin (node-wide or of this Session) or this Session's expert."""
    grant = await authenticate(request)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    if grant.role not in MODERATORS:
        raise Forbidden("only the Session's expert and admins read attendance",
                        code="wrong_role")
    return grant


async def _record(request: web.Request) -> SessionRecord:
    session_id = request.match_info["session"]
    registry = request.app[REGISTRY]
    await registry.flush()
    record = await request.app[STORE].sessions.get_session(session_id)
    if record is None:
        raise NotFound(f"no session {session_id!r}", code="unknown_session")
    return record


# -- attendance ---------------------------------------------------------------------

async def _records(app: web.Application, session_id: str) -> list[AttendanceRecord]:
    tracker = app[attendance.TRACKERS].get(session_id)
    if tracker is not None:
        # Held here and live: fresher than the store.
        tracker.sample()
        return tracker.records()
    return await app[STORE].training.list_attendance(session_id)


async def attendance_view(app: web.Application, record: SessionRecord) -> dict[str, Any]:
    now = app[CLOCK]()
    start = record.started_at
    end = record.ended_at or now
    length = max(0.0, end - start) if start is not None else 0.0
    issued = {c.participant_id: c for c in
              await app[STORE].training.list_certificates(record.id) if c.revoked_at is None}
    rows = []
    for row in await _records(app, record.id):
        present = attendance.present_s(row, start, end)
        cert = issued.get(row.participant_id)
        rows.append({
            "participant": row.participant_id, "role": row.role.value, "name": row.name,
            "intervals": [list(i) for i in row.intervals],
            "present_s": round(present, 1), "main_camera_s": round(row.main_camera_s, 1),
            "present_min": round(present / 60, 2),
            "main_camera_min": round(row.main_camera_s / 60, 2),
            "share": round(present / length, 3) if length else 0.0,
            "steps": list(row.steps), "questions": list(row.questions),
            "certificate": cert.id if cert is not None else None,
        })
    return {"session": record.id, "title": record.title, "state": record.state,
            "started_at": start, "ended_at": record.ended_at,
            "length_min": round(length / 60, 1),
            "main_camera": "the video Feed of the Theatre's first camera slot",
            "min_share": app[CONFIG].training.certificate_min_share,
            "participants": rows}


@routes.get("/api/sessions/{session}/attendance")
async def get_attendance(request: web.Request) -> web.StreamResponse:
    await moderator(request)
    view = await attendance_view(request.app, await _record(request))
    if request.query.get("format") == "csv":
        return web.Response(
            text=attendance.to_csv(view["participants"]), content_type="text/csv",
            headers={"Content-Disposition":
                     f'attachment; filename="attendance-{view["session"]}.csv"'})
    return web.json_response(view)


# -- certificates ---------------------------------------------------------------------

def _certificate_view(request: web.Request, cert: CertificateRecord) -> dict[str, Any]:
    return {**certificates.public_fields(cert), "session": cert.session_id,
            "participant": cert.participant_id, "issued_at": cert.issued_at,
            "issued_by": cert.issued_by, "revoked": cert.revoked_at is not None,
            "pdf": f"/api/sessions/{cert.session_id}/certificates/{cert.id}/pdf",
            "verify": _verify_url(request, cert.id)}


def _verify_url(request: web.Request, cert_id: str) -> str:
    return f"{request.app[CONFIG].base_url}/verify.html#id={cert_id}"


@routes.post("/api/sessions/{session}/certificates")
async def confirm_attendance(request: web.Request) -> web.Response:
    """Confirm attendance after the Session: a certificate for every trainee
    present at least the minimum share (or for those named, each of whom must
    reach it). Trainees who have one keep it."""
    grant = await moderator(request)
    record = await _record(request)
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) - {"participants"}:
        raise BadRequest("body is {\"participants\": [ids]} or empty", code="bad_request")
    named = body.get("participants")
    if named is not None and (not isinstance(named, list)
                              or not all(isinstance(p, str) for p in named)):
        raise BadRequest("participants is a list of participant ids", code="bad_request")
    if record.state != "ended":
        raise Conflict("attendance is confirmed after the Session has ended",
                       code="session_not_ended")
    view = await attendance_view(request.app, record)
    minimum = view["min_share"]
    rows = {r["participant"]: r for r in view["participants"]
            if r["role"] == Role.TRAINEE.value}
    if named is not None:
        unknown = [p for p in named if p not in rows]
        if unknown:
            raise NotFound(f"no trainee {', '.join(unknown)[:200]} attended this Session",
                           code="unknown_participant")
        short = [rows[p]["name"] for p in named if rows[p]["share"] < minimum]
        if short:
            raise Conflict(f"present less than {minimum:.0%} of the Session: "
                           f"{', '.join(short)[:200]}", code="below_minimum_share")
        chosen = [rows[p] for p in named]
    else:
        chosen = [r for r in rows.values() if r["share"] >= minimum]
    store = request.app[STORE].training
    now = request.app[CLOCK]()
    issued = []
    for row in chosen:
        if row["certificate"] is not None:
            continue
        cert = CertificateRecord(
            id=certificates.new_id(), session_id=record.id, participant_id=row["participant"],
            name=row["name"], title=record.title, procedure=record.procedure,
            expert=record.expert, date=certificates.session_date(record.started_at, now),
            minutes=round(row["present_min"]), issued_at=now,
            issued_by=grant.name or grant.participant_id)
        await store.put_certificate(cert)
        issued.append(cert)
        request.app[AUDIT].record("certificate_issued", session=record.id, certificate=cert.id,
                                  participant=cert.participant_id, minutes=cert.minutes,
                                  by=grant.participant_id, address=request.remote)
    listed = await store.list_certificates(record.id)
    return web.json_response({"issued": [c.id for c in issued],
                              "certificates": [_certificate_view(request, c) for c in listed]},
                             status=201 if issued else 200)


@routes.get("/api/sessions/{session}/certificates")
async def list_certificates(request: web.Request) -> web.Response:
    await moderator(request)
    record = await _record(request)
    listed = await request.app[STORE].training.list_certificates(record.id)
    return web.json_response({"certificates": [_certificate_view(request, c) for c in listed]})


async def _certificate(request: web.Request) -> CertificateRecord:
    cert_id = request.match_info["certificate"]
    cert = (await request.app[STORE].training.get_certificate(cert_id)
            if certificates.is_certificate_id(cert_id) else None)
    if cert is None or cert.session_id != request.match_info["session"]:
        raise NotFound("no such certificate", code="unknown_certificate")
    return cert


@routes.delete("/api/sessions/{session}/certificates/{certificate}")
async def revoke_certificate(request: web.Request) -> web.Response:
    grant = await moderator(request)
    cert = await _certificate(request)
    if cert.revoked_at is None:
        cert = dataclasses.replace(cert, revoked_at=request.app[CLOCK]())
        await request.app[STORE].training.put_certificate(cert)
        request.app[AUDIT].record("certificate_revoked", session=cert.session_id,
                                  certificate=cert.id, by=grant.participant_id,
                                  address=request.remote)
    return web.json_response({"certificate": _certificate_view(request, cert)})


@routes.get("/api/sessions/{session}/certificates/{certificate}/pdf")
async def certificate_pdf(request: web.Request) -> web.Response:
    """The PDF: for the Session's expert and admins, and for the trainee it names."""
    grant = await authenticate(request)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    cert = await _certificate(request)
    if grant.role not in MODERATORS and grant.participant_id != cert.participant_id:
        raise Forbidden("a certificate is for the trainee it names", code="wrong_participant")
    if cert.revoked_at is not None:
        raise Gone("this certificate has been revoked", code="certificate_revoked")
    body = certificates.render_pdf(cert, _verify_url(request, cert.id))
    return web.Response(body=body, content_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="certificate-{cert.session_id}.pdf"',
        "Cache-Control": "no-store"})


@routes.get("/api/sessions/{session}/certificate")
async def my_certificate(request: web.Request) -> web.Response:
    """The caller's own certificate of this Session (``null`` while there is none:
    the trainee's page asks now and then after the Session, and "not yet" is
    an answer, not an error)."""
    grant = await authenticate(request)
    if not grant.covers(request.match_info["session"]):
        raise Forbidden("token is for another session", code="wrong_session")
    for cert in await request.app[STORE].training.list_certificates(grant.session_id):
        if cert.participant_id == grant.participant_id and cert.revoked_at is None:
            return web.json_response({"certificate": _certificate_view(request, cert)})
    return web.json_response({"certificate": None}, headers={"Cache-Control": "no-store"})


async def _verified(request: web.Request) -> CertificateRecord:
    """The certificate a public verification id names, rate-limited per address."""
    app = request.app
    if not await app[STORE].rates.hit(f"{VERIFY_RATE_KEY}{request.remote}",
                                      app[CONFIG].training.verify_per_minute, 60.0):
        raise TooManyRequests("too many verifications from this address; try again in a "
                              "minute", code="rate_limited")
    cert_id = request.match_info["certificate"].strip().lower()
    cert = (await app[STORE].training.get_certificate(cert_id)
            if certificates.is_certificate_id(cert_id) else None)
    if cert is None:
        raise NotFound("no certificate has this verification id", code="unknown_certificate")
    if cert.revoked_at is not None:
        raise Gone("this certificate has been revoked", code="certificate_revoked")
    return cert


@routes.get("/api/verify/{certificate}")
async def verify(request: web.Request) -> web.Response:
    """Public: a certificate's own fields for a valid id, nothing else."""
    cert = await _verified(request)
    return web.json_response({"valid": True, "certificate": certificates.public_fields(cert)},
                             headers={"Cache-Control": "no-store"})


@routes.get("/api/verify/{certificate}/pdf")
async def verified_pdf(request: web.Request) -> web.Response:
    """Public: the PDF of a valid certificate. It says exactly what the
    verification shows, so anyone holding the id learns nothing more; and the
    trainee keeps their certificate after their token has expired (the id is
    printed on it, and the page that issued it links here)."""
    cert = await _verified(request)
    body = certificates.render_pdf(cert, _verify_url(request, cert.id))
    return web.Response(body=body, content_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="certificate-{cert.session_id}.pdf"',
        "Cache-Control": "no-store"})
