"""`scrubin demo`: its links survive a restart (a signing key kept under its state
directory, mode 0600) unless the demo Session was ended."""

from __future__ import annotations

import asyncio
import re
import signal
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

pytestmark = pytest.mark.slow


class Demo:
    def __init__(self, cwd: Path, state: Path) -> None:
        self.cwd = cwd
        self.state = state
        self.port = unused_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.printed = ""
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Demo:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "--log-level", "WARNING", "demo", "--port",
            str(self.port), "--size", "160x120", "--fps", "5", "--state-dir", str(self.state),
            cwd=self.cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert self.process.stdout is not None
        while "Open the trainee link" not in self.printed:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            assert line, f"demo exited: {self.printed}"
            self.printed += line.decode()
        return self

    def token(self, page: str) -> str:
        match = re.search(rf"/{page}\.html#token=(\S+)", self.printed)
        assert match, self.printed
        return match[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(self.process.wait(), 30)
        assert self.process.returncode == 0


async def status(http: aiohttp.ClientSession, demo: Demo, token: str) -> int:
    async with http.get(f"{demo.base}/api/sessions/demo",
                        headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status


async def test_demo_links_survive_a_restart_until_the_session_is_ended(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with aiohttp.ClientSession() as http:
        async with Demo(tmp_path, state) as first:
            trainee, expert = first.token("watch"), first.token("broadcast")
            admin = first.token("admin")
            assert await status(http, first, trainee) == 200
        key = state / "demo-signing-key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (state / "audit" / "audit.jsonl").is_file(), "the audit trail lives there too"
        secret = key.read_text()

        key.chmod(0o644)  # e.g. restored from a backup: tightened again on start
        async with Demo(tmp_path, state) as second:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            assert key.read_text() == secret
            assert await status(http, second, trainee) == 200, "trainee link of the last run"
            async with http.get(f"{second.base}/api/admin/sessions",
                                headers={"Authorization": f"Bearer {admin}"}) as response:
                assert response.status == 200, "admin link of the last run"
            async with http.post(f"{second.base}/api/sessions/demo/end",
                                 headers={"Authorization": f"Bearer {expert}"}) as response:
                assert response.status == 200
        assert not key.exists(), "ending the Session forgets the key"

        async with Demo(tmp_path, state) as third:
            async with http.get(f"{third.base}/api/sessions/demo",
                                headers={"Authorization": f"Bearer {trainee}"}) as response:
                assert response.status == 401
                assert (await response.json())["code"] == "token_invalid"
            assert await status(http, third, third.token("watch")) == 200
            assert key.read_text() != secret
