"""Files the Node serves or reads, found alike in a checkout and an installed wheel.

They are edited where a developer looks for them (``client_web/``, ``docs/``,
``configs/``); ``server/assets/`` holds symbolic links to them, which the wheel
build follows, so an installed ScrubIn carries its pages, its OpenAPI document
and the demo's configuration as package data.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: The browser pages: *.html, js/, css/.
CLIENT_DIR = ASSETS / "client_web"
#: Served as /api/openapi.json.
OPENAPI_PATH = ASSETS / "openapi.yaml"
#: The embedded configuration of ``scrubin demo``.
DEMO_CONFIG = ASSETS / "demo.toml"
