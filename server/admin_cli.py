"""`scrubin theatre|session|invite|audit|attendance|certificate …`: the admin
API from a terminal.

Each command calls a running Node's admin API (docs/openapi.yaml) with a
node-wide admin token (``scrubin admin-token``), given as ``--token`` or in
``SCRUBIN_ADMIN_TOKEN``. ``--json`` prints the API's answer as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt

from .roles import PERSON_ROLES, Role

COMMANDS = ("theatre", "session", "invite", "audit", "revoke", "attendance", "certificate")


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"error {status}: {message}")
        self.status = status
        self.code = body.get("code") if isinstance(body, dict) else None


async def call(server: str, token: str, method: str, path: str,
               body: dict[str, Any] | None = None) -> Any:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(
            method, f"{server.rstrip('/')}{path}", json=body,
            headers={"Authorization": f"Bearer {token}"}) as response:
        if response.status < 400 and response.content_type in ("text/csv",
                                                               "application/pdf"):
            return await response.read()
        text = await response.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        if response.status >= 400:
            raise ApiError(response.status, data)
        return data


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=os.environ.get("SCRUBIN_SERVER",
                                                          "http://127.0.0.1:8080"),
                       help="the Node's base URL (env SCRUBIN_SERVER)")
        p.add_argument("--token", default=os.environ.get("SCRUBIN_ADMIN_TOKEN", ""),
                       help="node-wide admin token (env SCRUBIN_ADMIN_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the API's JSON answer")
        return p

    theatre = sub.add_parser("theatre", help="list or add Theatres (admin API)")
    tsub = theatre.add_subparsers(dest="action", required=True)
    common(tsub.add_parser("list", help="every Theatre"))
    add = common(tsub.add_parser("add", help="a Theatre and its camera slots"))
    add.add_argument("id")
    add.add_argument("--slots", required=True, help="comma-separated, e.g. room,endoscope")
    add.add_argument("--name", default="")

    session = sub.add_parser("session", help="schedule, list, start and end Sessions")
    ssub = session.add_subparsers(dest="action", required=True)
    ls = common(ssub.add_parser("list", help="every Session"))
    ls.add_argument("--state", choices=["scheduled", "live", "ended"])
    create = common(ssub.add_parser("create", help="schedule a Session"))
    create.add_argument("--theatre", required=True)
    create.add_argument("--title", required=True)
    create.add_argument("--id", default=None, help="default: generated")
    create.add_argument("--procedure", default="")
    create.add_argument("--expert", default="", help="display name of the leading expert")
    create.add_argument("--starts-at", default=None,
                        help="ISO 8601 (2026-05-01T08:30, local time unless an offset is "
                             "given) or epoch seconds")
    _schedule_args(create)
    update = common(ssub.add_parser(
        "update", help="reschedule or rename a Session (its invites' validity moves along)"))
    update.add_argument("session")
    update.add_argument("--title", default=None)
    update.add_argument("--procedure", default=None)
    update.add_argument("--expert", default=None)
    update.add_argument("--starts-at", default=None, help="ISO 8601 or epoch seconds")
    _schedule_args(update)
    for action, text in (("start", "bring it live on the Node"),
                         ("end", "end it (or cancel it if scheduled)")):
        p = common(ssub.add_parser(action, help=text))
        p.add_argument("session")

    invite = sub.add_parser("invite", help="create, list and revoke invites of a Session")
    isub = invite.add_subparsers(dest="action", required=True)
    ic = common(isub.add_parser("create", help="a signed invite link"))
    ic.add_argument("--session", required=True)
    ic.add_argument("--role", required=True, choices=[r.value for r in Role if r in PERSON_ROLES])
    ic.add_argument("--name", default="", help="display name (else asked on the join page)")
    ic.add_argument("--ttl", type=float, default=None,
                    help="seconds (default: until the Session's scheduled end plus "
                         "[training] invite_margin_min; reviewers: the review window)")
    ic.add_argument("--anyway", action="store_true",
                    help="make it even if it expires before the Session starts")
    ic.add_argument("--max-uses", type=int, default=None,
                    help="how many people (devices) may use it")
    il = common(isub.add_parser("list", help="a Session's invites"))
    il.add_argument("--session", required=True)
    _add_audit(sub, common)
    _add_training(sub, common)
    revoke = common(sub.add_parser(
        "revoke", help="revoke one token (and all derived from it), or every node-wide "
                       "admin token"))
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("token_or_id", nargs="?",
                      help="the token itself, or its id (jti, printed when it was minted)")
    what.add_argument("--admin-tokens", action="store_true",
                      help="every node-wide admin token issued until now (yours too)")
    ir = common(isub.add_parser("revoke", help="revoke one invite, or all of a Session"))
    ir.add_argument("--session", required=True)
    which = ir.add_mutually_exclusive_group(required=True)
    which.add_argument("--invite", help="the invite id")
    which.add_argument("--all", action="store_true",
                       help="every token of the Session issued until now")


def _add_training(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                  common: Any) -> None:
    attendance = sub.add_parser(
        "attendance", help="who attended a Session, how long, receiving the main camera "
                           "(admins and the Session's expert)")
    asub = attendance.add_subparsers(dest="action", required=True)
    for action, text in (("show", "a table"), ("csv", "as CSV, for a spreadsheet")):
        p = common(asub.add_parser(action, help=text))
        p.add_argument("session")
    cert = sub.add_parser("certificate", help="certificates of attendance of a Session")
    csub = cert.add_subparsers(dest="action", required=True)
    confirm = common(csub.add_parser(
        "confirm", help="after the Session: a certificate for each trainee present at least "
                        "the minimum share (or for those named)"))
    confirm.add_argument("session")
    confirm.add_argument("--participant", action="append", default=None,
                         help="a participant id (repeat); default: every trainee who qualifies")
    common(csub.add_parser("list", help="a Session's certificates")).add_argument("session")
    pdf = common(csub.add_parser("pdf", help="download one as PDF"))
    pdf.add_argument("session")
    pdf.add_argument("certificate")
    pdf.add_argument("--out", required=True, help="file to write")
    rv = common(csub.add_parser("revoke", help="revoke one (verification then says so)"))
    rv.add_argument("session")
    rv.add_argument("certificate")


def _schedule_args(p: argparse.ArgumentParser) -> None:
    end = p.add_mutually_exclusive_group()
    end.add_argument("--ends-at", default=None, help="scheduled end, ISO 8601 or epoch seconds")
    end.add_argument("--duration", type=float, default=None,
                     help="scheduled length in minutes (default: [training] "
                          "default_duration_min)")


def _add_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: Any) -> None:
    audit = common(sub.add_parser("audit", help="a Session's audit trail (admins)"))
    audit.add_argument("--session", required=True)
    audit.add_argument("--since", default="0", help="ISO 8601 or epoch seconds")
    audit.add_argument("--limit", type=int, default=1000)


def parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise SystemExit(f"--starts-at: {value!r} is neither ISO 8601 nor epoch seconds") \
            from None


def _when(value: float | None) -> str:
    return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M") if value else "-"


def run(args: argparse.Namespace) -> int:
    if not args.token:
        print("an admin token is needed: --token or SCRUBIN_ADMIN_TOKEN "
              "(mint one with `scrubin admin-token --config FILE`)", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_run(args))
    except ApiError as exc:
        print(str(exc), file=sys.stderr)
        if exc.code == "invite_expires_early":
            print("(--anyway makes it all the same)", file=sys.stderr)
        return 2
    except aiohttp.ClientError as exc:
        print(f"cannot reach {args.server}: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, bytes):
        sys.stdout.write(result.decode("utf-8"))
    elif args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(_format(args, result))
    return 0


async def _run(args: argparse.Namespace) -> Any:
    server, token = args.server, args.token

    async def api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await call(server, token, method, path, body)

    if args.command == "revoke":
        if args.admin_tokens:
            return await api("DELETE", "/api/admin/tokens")
        return await api("DELETE", f"/api/admin/tokens/{quote(token_id(args.token_or_id))}")
    if args.command == "audit":
        since = parse_time(args.since)
        return await api("GET", f"/api/sessions/{args.session}/audit"
                                f"?since={since}&limit={args.limit}")
    if args.command == "attendance":
        path = f"/api/sessions/{quote(args.session)}/attendance"
        return await api("GET", path + ("?format=csv" if args.action == "csv" else ""))
    if args.command == "certificate":
        base = f"/api/sessions/{quote(args.session)}/certificates"
        if args.action == "confirm":
            return await api("POST", base, {"participants": args.participant}
                             if args.participant else {})
        if args.action == "list":
            return await api("GET", base)
        if args.action == "revoke":
            return await api("DELETE", f"{base}/{quote(args.certificate)}")
        data = await api("GET", f"{base}/{quote(args.certificate)}/pdf")
        await asyncio.to_thread(Path(args.out).write_bytes, data)
        return {"written": args.out, "bytes": len(data)}
    if args.command == "theatre":
        if args.action == "list":
            return await api("GET", "/api/admin/theatres")
        body = {"id": args.id, "slots": [s.strip() for s in args.slots.split(",") if s.strip()]}
        if args.name:
            body["name"] = args.name
        return await api("POST", "/api/admin/theatres", body)
    if args.command == "session":
        if args.action == "list":
            return await api("GET", "/api/admin/sessions" + (
                f"?state={args.state}" if args.state else ""))
        if args.action == "create":
            fields: dict[str, Any] = {"theatre": args.theatre, "title": args.title,
                                      "procedure": args.procedure, "expert": args.expert}
            if args.id:
                fields["id"] = args.id
            if args.starts_at:
                fields["starts_at"] = parse_time(args.starts_at)
            fields.update(_schedule_fields(args))
            return await api("POST", "/api/admin/sessions", fields)
        if args.action == "update":
            changes: dict[str, Any] = {k: getattr(args, k) for k in ("title", "procedure",
                                                                      "expert")
                                       if getattr(args, k) is not None}
            if args.starts_at:
                changes["starts_at"] = parse_time(args.starts_at)
            changes.update(_schedule_fields(args))
            return await api("PATCH", f"/api/admin/sessions/{args.session}", changes)
        return await api("POST", f"/api/admin/sessions/{args.session}/{args.action}")
    base = f"/api/admin/sessions/{args.session}/invites"
    if args.action == "create":
        invite: dict[str, Any] = {"role": args.role, "name": args.name}
        if args.ttl is not None:
            invite["ttl_s"] = args.ttl
        if args.max_uses is not None:
            invite["max_uses"] = args.max_uses
        if args.anyway:
            invite["allow_expiring"] = True
        return await api("POST", base, invite)
    if args.action == "list":
        return await api("GET", base)
    if args.all:
        return await api("DELETE", base)
    return await api("DELETE", f"{base}/{args.invite}")


def _schedule_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.ends_at:
        return {"ends_at": parse_time(args.ends_at)}
    if args.duration is not None:
        return {"duration_min": args.duration}
    return {}


def span(seconds: float) -> str:
    """"2 h 5 min" (negative: "-2 h 5 min")."""
    sign = "-" if seconds < 0 else ""
    minutes = int(abs(seconds) // 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = ([f"{days} d"] if days else []) + ([f"{hours} h"] if hours else []) + [
        f"{minutes} min"]
    return sign + " ".join(parts)


def expiry(invite: dict[str, Any]) -> str:
    """When an invite expires, relative to its Session's start when it has one."""
    text = f"expires {_when(invite['expires_at'])}"
    after = invite.get("expires_after_start_s")
    if after is not None:
        text += (f" ({span(after)} after the start)" if after > 0
                 else f" — WARNING: {span(-after)} BEFORE the Session starts")
    return text


def seats(invite: dict[str, Any]) -> str:
    taken = invite.get("seats", {}).get("taken", invite["uses"])
    return f"seats {taken}/{invite['max_uses'] or '∞'} taken"


def _attendance_table(view: dict[str, Any]) -> str:
    lines = [f"{view['session']}  {view['title']}  ({view['state']}, {view['length_min']} min; "
             f"certificates from {view['min_share']:.0%} present)",
             f"{'participant':<14} {'role':<8} {'name':<24} {'present':>8} {'camera':>8} "
             f"{'share':>6}  steps / questions"]
    for row in view["participants"]:
        lines.append(f"{row['participant']:<14} {row['role']:<8} {row['name']:<24} "
                     f"{row['present_min']:>6} m {row['main_camera_min']:>6} m "
                     f"{row['share']:>6.0%}  {' › '.join(row['steps']) or '-'}"
                     + (f"  [cert {row['certificate'][:8]}…]" if row["certificate"] else ""))
        lines.extend(f"{'':<14} asked: {q}" for q in row["questions"])
    return "\n".join(lines)


def token_id(token_or_id: str) -> str:
    """The ``jti`` of a token given whole (read, not verified: the server
    decides), or the id itself."""
    if token_or_id.count(".") == 2:
        try:
            return str(jwt.decode(token_or_id, options={"verify_signature": False})["jti"])
        except (jwt.PyJWTError, KeyError):
            pass
    return token_or_id


def _format(args: argparse.Namespace, result: Any) -> str:
    if args.command == "revoke":
        if "revoked_before" in result:
            return (f"Every node-wide admin token issued before "
                    f"{_when(result['revoked_before'])} is revoked.")
        return f"Token {result['revoked']} is revoked, with every token derived from it."
    if args.command == "audit":
        lines = []
        for entry in result["entries"]:
            when = datetime.fromtimestamp(entry["ts"]).strftime("%Y-%m-%d %H:%M:%S")
            rest = {k: v for k, v in entry.items() if k not in ("ts", "event", "node")}
            lines.append(f"{when}  {entry['event']:<16} {json.dumps(rest, ensure_ascii=False)}")
        return "\n".join(lines) or "(no entries)"
    if args.command == "attendance":
        return _attendance_table(result)
    if args.command == "certificate":
        if "written" in result:
            return f"Wrote {result['written']} ({result['bytes']} bytes)."
        if "certificate" in result:
            return f"Certificate {result['certificate']['id']} revoked."
        lines = [f"{c['id']}  {c['name']:<24} {c['minutes']} min  {c['date']}"
                 + ("  REVOKED" if c["revoked"] else f"  {c['verify']}")
                 for c in result["certificates"]]
        if "issued" in result:
            lines.insert(0, f"{len(result['issued'])} certificate(s) issued.")
        return "\n".join(lines) or "(no certificates)"
    if args.command == "theatre":
        theatres = result["theatres"] if "theatres" in result else [result["theatre"]]
        return "\n".join(f"{t['id']:<16} {t['name']:<24} {', '.join(t['slots'])}"
                         for t in theatres) or "(no theatres)"
    if args.command == "session":
        sessions = result["sessions"] if "sessions" in result else [result["session"]]
        return "\n".join(
            f"{s['id']:<24} {s['state']:<10} {s['theatre']:<12} starts {_when(s['starts_at'])}"
            f" ends {_when(s.get('ends_at'))}"
            f"  {s['title']}" + (f" ({s['expert']})" if s["expert"] else "")
            for s in sessions) or "(no sessions)"
    if args.action == "create":
        invite = result["invite"]
        lines = [f"Invite {invite['id']} for {invite['role']} in {invite['session']}, "
                 f"{expiry(invite)}"
                 + (f", up to {invite['max_uses']} devices" if invite["max_uses"] else ""),
                 f"  Join link: {result['link']}"]
        if result.get("page"):
            lines.append(f"  Direct page link (one participant, no name asked): {result['page']}")
        lines.append(f"  Bearer token: {result['token']}")
        return "\n".join(lines)
    if args.action == "list":
        return "\n".join(
            f"{i['id']}  {i['role']:<8} {i['name'] or '(name asked)':<20} "
            f"{seats(i)}  {expiry(i)}"
            + ("  REVOKED" if i["revoked"] else f"\n    {i['link']}")
            for i in result["invites"]) or "(no invites)"
    if "revoked_before" in result:
        return (f"Every token of {result['session']} issued before "
                f"{_when(result['revoked_before'])} is revoked.")
    return f"Invite {result['invite']['id']} revoked."
