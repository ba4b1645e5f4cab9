"""Certificates of attendance (docs/protocol.md, "Attendance and certificates").

After a Session has ended its expert or an admin confirms attendance: every
trainee present for at least ``[training] certificate_min_share`` of the
Session (or those named, each of whom must reach it) gets a certificate: a
record in the store (``CertificateRecord``) with a verification id of 160
random bits, rendered on demand as a one-page PDF (fpdf2, the DejaVu Sans
TrueType font from Debian's fonts-dejavu-core embedded, so any name prints).

The public verification (``GET /api/verify/{id}``, rate-limited per address)
answers for a valid id with exactly the fields the PDF shows, and nothing
else; a revoked certificate is ``410 certificate_revoked``, an unknown id
``404 unknown_certificate``.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fpdf import FPDF

from .store import CertificateRecord

#: 160 random bits, hex: never guessed, never enumerated.
ID_BYTES = 20
ID_PATTERN = re.compile(r"^[0-9a-f]{40}$")
#: Debian's fonts-dejavu-core (.ci/install); a deployment may point elsewhere.
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
FONT = "DejaVuSans.ttf"
FONT_BOLD = "DejaVuSans-Bold.ttf"


class FontMissing(RuntimeError):
    """The Unicode font is not installed (apt-get install fonts-dejavu-core)."""


def new_id() -> str:
    return secrets.token_hex(ID_BYTES)


def is_certificate_id(value: str) -> bool:
    return bool(ID_PATTERN.match(value))


def public_fields(record: CertificateRecord) -> dict[str, Any]:
    """What the certificate says, exactly: the PDF and the verification."""
    return {"id": record.id, "name": record.name, "title": record.title,
            "procedure": record.procedure, "expert": record.expert, "date": record.date,
            "minutes": record.minutes}


def session_date(started_at: float | None, fallback: float) -> str:
    return datetime.fromtimestamp(started_at or fallback, UTC).strftime("%Y-%m-%d")


def _font(name: str) -> Path:
    for folder in FONT_DIRS:
        path = folder / name
        if path.is_file():
            return path
    raise FontMissing(f"the font {name} is not installed (fonts-dejavu-core)")


def render_pdf(record: CertificateRecord, verify_url: str) -> bytes:
    """The certificate as a one-page A4 PDF."""
    pdf = FPDF(format="A4")
    pdf.set_title("Certificate of attendance")
    pdf.set_author("ScrubIn")
    pdf.set_creation_date(datetime.fromtimestamp(record.issued_at, UTC))
    pdf.add_font("DejaVu", "", str(_font(FONT)))
    pdf.add_font("DejaVu", "B", str(_font(FONT_BOLD)))
    pdf.add_page()
    pdf.set_margins(20, 25, 20)
    width = pdf.w - 40

    def line(text: str, size: float, *, bold: bool = False, gap: float = 4) -> None:
        pdf.set_font("DejaVu", "B" if bold else "", size)
        pdf.multi_cell(width, size * 0.55, text, align="C")
        pdf.ln(gap)

    pdf.set_y(35)
    line("Certificate of attendance", 24, bold=True, gap=12)
    line("This certifies that", 12)
    line(record.name, 20, bold=True, gap=8)
    line("attended the live surgical training session", 12)
    line(record.title, 16, bold=True)
    if record.procedure:
        line(f"Procedure: {record.procedure}", 12)
    if record.expert:
        line(f"Expert: {record.expert}", 12)
    line(f"Date: {record.date}", 12)
    line(f"Minutes attended: {record.minutes}", 12, gap=16)
    line(f"Verification id: {record.id}", 10)
    line(f"Verify at {verify_url}", 9)
    return bytes(pdf.output())
