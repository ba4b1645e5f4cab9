"""`scrubin export` (a Recording's directory → MP4 or contact sheet, offline) and
`scrubin recording list|delete|hold|release` (the review API of a running Node)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from recorder import deidentified
from recorder.export import ExportError, contact_sheet, export_feed

from .admin_cli import ApiError, call
from .audit import JsonlAuditTrail
from .config import load_config
from .deidentified import options_from

COMMANDS = ("export", "recording")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export", help="one Feed of a Recording as an MP4 with its sound (narration, trainee "
                       "microphone) and drawings and steps burned in, or a contact sheet of "
                       "its steps")
    export.add_argument("directory", type=Path, help="the Recording's directory "
                        "(<recording.root>/<id>, with manifest.json)")
    export.add_argument("--feed", default="", help="video Feed id, e.g. room.video "
                        "(contact sheet: default the main camera)")
    export.add_argument("--out", type=Path, help="the MP4 to write")
    export.add_argument("--contact-sheet", type=Path, help="a JPEG of the steps to write")
    export.add_argument("--no-burn-in", action="store_true",
                        help="the pictures only, without drawings and step titles (H.264 "
                             "is then copied as recorded)")
    export.add_argument("--no-audio", action="store_true", help="the picture only")
    export.add_argument("--audio", action="append", default=[], metavar="FEED",
                        help="mix only this audio Feed (repeat for more); default all")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    deid = export.add_argument_group(
        "de-identified export", "a copy for teaching reuse, kept in the recording's directory "
        "(deidentified/ID/), pending review until an admin signs it off in the player "
        "(library page); only then may it be shared")
    deid.add_argument("--deidentify", action="store_true",
                      help="masks, faces blurred, no names, no metadata: every camera (or "
                           "--feed), per the [deidentify] section of --config")
    deid.add_argument("--config", type=Path,
                      help="the Node's configuration: its [deidentify] regions and settings, "
                           "and its audit trail (needed with --deidentify)")
    deid.add_argument("--conservative", action=argparse.BooleanOptionalAction, default=None,
                      help="also blur everything outside the regions of interest on the "
                           "cameras that see people (default: [deidentify] conservative)")
    deid.add_argument("--keep-narration", action="store_true",
                      help="keep the narration's sound (dropped by default; other sound is "
                           "never kept)")

    recording = sub.add_parser("recording", help="list, delete or hold Recordings (review API)")
    rsub = recording.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "a Session's Recordings"),
                           ("delete", "delete a Recording: parts, events, thumbnail, index "
                                      "(prints each file removed and its sha256)"),
                           ("hold", "put a Recording on legal hold: never deleted, by hand "
                                    "or by retention, until released"),
                           ("release", "release a Recording's legal hold")):
        p = rsub.add_parser(name, help=helptext)
        p.add_argument("--server", default=os.environ.get("SCRUBIN_SERVER",
                                                          "http://127.0.0.1:8080"),
                       help="the Node's base URL (env SCRUBIN_SERVER)")
        p.add_argument("--token", default=os.environ.get("SCRUBIN_ADMIN_TOKEN", ""),
                       help="admin token (node-wide or of the Session; env SCRUBIN_ADMIN_TOKEN)")
        if name == "list":
            p.add_argument("--session", required=True)
        else:
            p.add_argument("recording", help="the Recording's id")
        if name == "hold":
            p.add_argument("--reason", required=True,
                           help="why it is held (a claim, an inquiry...), for the audit trail")


class _ProgressBar:
    """A terminal progress bar (stderr) in seconds of the recording."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, done: float, total: float) -> None:
        if self._bar is None:
            self._bar = tqdm(total=round(total, 1), unit="s", desc="export", file=sys.stderr,
                             dynamic_ncols=True, bar_format="{desc}: {percentage:5.1f}%|{bar}| "
                             "{n:.1f}/{total:.1f} s [{elapsed}<{remaining}]")
        self._bar.update(round(done, 1) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def export(args: argparse.Namespace) -> int:
    if args.deidentify:
        return deidentify(args)
    if not args.out and not args.contact_sheet:
        print("export: give --out FILE.mp4 (with --feed) and/or --contact-sheet FILE.jpg",
              file=sys.stderr)
        return 2
    bar = None if args.quiet else _ProgressBar()
    try:
        if args.out:
            if not args.feed:
                print("export: --out needs --feed (e.g. room.video)", file=sys.stderr)
                return 2
            audio: bool | list[str] = False if args.no_audio else (args.audio or True)
            try:
                result = export_feed(args.directory, args.feed, args.out, progress=bar,
                                     burn=not args.no_burn_in, audio=audio)
            finally:
                if bar is not None:
                    bar.close()
            sound = ", ".join(result.audio) if result.audio else "no sound"
            print(f"wrote {result.path}: {result.frames} frames, {result.duration:.1f} s, "
                  f"{result.width}x{result.height}, "
                  f"{'video as recorded' if result.video_copied else 'H.264'}, sound: {sound}")
        if args.contact_sheet:
            tiles = contact_sheet(args.directory, args.contact_sheet, feed_id=args.feed or None)
            print(f"wrote {args.contact_sheet}: {len(tiles)} pictures")
            for tile in tiles:
                print(f"  {tile.label}")
    except ExportError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    return 0


def deidentify(args: argparse.Namespace) -> int:
    """``scrubin export DIR --deidentify``: a new export artefact in the
    recording, made here, audited in the Node's trail, pending review."""
    if args.out or args.contact_sheet:
        print("export: a de-identified export stays in the recording until an admin signs it "
              "off in the player; fetch it from the library then (no --out, --contact-sheet)",
              file=sys.stderr)
        return 2
    if not args.config:
        print("export: --deidentify needs --config (the Node's [deidentify] regions and audit "
              "trail)", file=sys.stderr)
        return 2
    config = load_config(args.config)
    options = options_from(config.deidentify, conservative=args.conservative,
                           narration=args.keep_narration, drawings=not args.no_burn_in)
    by = {"id": f"cli:{getpass.getuser()}", "name": getpass.getuser(), "role": "operator"}
    audit = JsonlAuditTrail(config.audit.path, node_id=config.server.node_id or "cli",
                            max_bytes=config.audit.max_bytes, backups=config.audit.backups)
    bar = None if args.quiet else _ProgressBar()
    try:
        record, claim = deidentified.create(args.directory, options, requested_by=by,
                                            via="cli", feeds=[args.feed] if args.feed else None)
        fields = {"session": record["session"], "recording": record["recording"],
                  "export": record["id"]}
        audit.record("deidentified_requested", **fields, by=by, feeds=record["feeds"],
                     options=record["options"], via="cli")
        try:
            record = deidentified.make(args.directory, claim, options, progress=bar)
        except BaseException as exc:
            audit.record("deidentified_failed", **fields, error=str(exc) or repr(exc))
            raise
        finally:
            if bar is not None:
                bar.close()
        audit.record("deidentified_finished", **fields, duration=record.get("duration"),
                     files=[{k: f.get(k) for k in ("file", "bytes", "sha256", "faces")}
                            for f in record["files"]])
    except ExportError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    finally:
        audit.close()
    where = Path(args.directory) / deidentified.EXPORTS / record["id"]
    print(f"de-identified export {record['id']} of recording {record['recording']}: "
          f"{record['duration']:.1f} s, pending review (an admin signs it off in the player; "
          f"until then it is not shared)\n  {where}")
    for item in record["files"]:
        faces = item["faces"]
        found = (f"faces in {faces['with_faces']} of {faces['detections']} pictures searched, "
                 f"blurred in {faces['frames_blurred']} frames" if faces["searched"]
                 else "not searched for faces")
        print(f"  {item['file']}: {item['width']}x{item['height']}, {item['frames']} frames, "
              f"{'narration' if item['audio'] else 'no sound'}, {found}"
              f"{', conservative' if item['conservative'] else ''}")
    return 0


def _when(value: Any) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


async def _remote(args: argparse.Namespace) -> int:
    if not args.token:
        print("recording: give --token (or SCRUBIN_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            body = await call(args.server, args.token, "GET",
                              f"/api/sessions/{args.session}/recordings")
            for entry in body["recordings"]:
                duration = entry.get("duration")
                held = "  HOLD" if entry.get("hold") else ""
                print(f"{entry['id']}  {_when(entry.get('started'))}  "
                      f"{'-' if duration is None else f'{duration:.0f} s':>7}  "
                      f"{entry.get('state')}  {entry.get('consent_scope')}  {entry.get('title')}"
                      f"{held}")
            if not body["recordings"]:
                print("(no recordings)")
        elif args.action == "delete":
            body = await call(args.server, args.token, "DELETE",
                              f"/api/recordings/{args.recording}")
            for item in body.get("files", []):
                print(f"  {item.get('sha256', '-'):64}  {item.get('bytes', 0):>10}  "
                      f"{item['file']}")
            print(f"deleted recording {args.recording}: {len(body.get('files', []))} files"
                  f"{', checked' if body.get('verified') else ''}")
        elif args.action == "hold":
            await call(args.server, args.token, "PUT", f"/api/recordings/{args.recording}/hold",
                       {"reason": args.reason})
            print(f"recording {args.recording} is on legal hold")
        else:
            await call(args.server, args.token, "DELETE",
                       f"/api/recordings/{args.recording}/hold")
            print(f"recording {args.recording}: legal hold released")
    except ApiError as exc:
        print(f"recording: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "export":
        return export(args)
    return asyncio.run(_remote(args))
