"""What ``scrubin demo`` keeps between runs: its signing key, under its state directory.

Links the demo printed keep working after a restart because their tokens are
signed with a key kept on disk (mode 0600, like any secret). Ending the demo
Session forgets the key, so the next run signs new links and the old ones die
with the Session they were for.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_FILE = "demo-signing-key"
KID = "demo"


def signing_key(state_dir: Path) -> str:
    """The demo's ``kid:secret`` signing key, created on first use."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / KEY_FILE
    try:
        secret = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        secret = ""
    if len(secret) < 32:
        secret = secrets.token_urlsafe(48)
        # Created 0600 from the start: the secret is never readable by others,
        # not even between open() and chmod().
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secret + "\n")
    os.chmod(path, 0o600)  # a copied or restored file may have come with wider bits
    return f"{KID}:{secret}"


def forget_signing_key(state_dir: Path) -> None:
    """The demo Session ended: the links signed with this key must not come back."""
    try:
        (state_dir / KEY_FILE).unlink()
    except FileNotFoundError:
        return
    logger.info("demo session ended: its signing key is forgotten, the next run prints new links")
