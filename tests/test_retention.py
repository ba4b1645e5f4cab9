"""Retention (``[recording] retention_days``) on Nodes that share one recordings
root: one sweep at a time per deployment, under the retention lease in the
store, and deletion that tolerates files or whole recordings vanishing under it
(another Node, or a person).

Real parts: a real redis-server shared by two Nodes in this process (the
cluster tests' pattern), real recordings made by the recorder in one root;
the single-Node cases on the memory store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_redis.executor import RedisExecutor

from recorder import Recording
from server.http.common import AUDIT, STORE
from server.http.review import RECORDINGS
from server.recordings import RETENTION_LEASE
from server.roles import Role

from .conftest import Server, make_config, start_server, wait_for
from .recording_helpers import age_recording, build_recording
from .test_cluster import (  # noqa: F401  (fixtures)
    cluster_redis,
    node_config,
    running_nodes,
)

pytestmark = pytest.mark.slow

SESSION = "or1-live"


def deleted(servers: list[Server]) -> list[str]:
    """The recordings deleted by retention, as every Node's audit trail says."""
    return [e["recording"] for s in servers for e in s.app[AUDIT].read(session=SESSION)
            if e["event"] == "recording_deleted" and e["reason"] == "retention"]


def complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors from anywhere, warnings from the recordings' code."""
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or (r.levelno >= logging.WARNING
                                              and r.name.startswith(("server.recordings",
                                                                     "recorder")))]


async def plant(root: Path, *, expired: int, kept: int) -> tuple[list[Recording],
                                                                  list[Recording]]:
    """``expired`` recordings made 40 days ago and ``kept`` made now."""
    old = [await build_recording(root, SESSION, seconds=1, thumbnail=False)
           for _ in range(expired)]
    for recording in old:
        age_recording(recording.directory, days=40)
    new = [await build_recording(root, SESSION, seconds=1, thumbnail=False)
           for _ in range(kept)]
    return old, new


@asynccontextmanager
async def two_nodes(redis: RedisExecutor, root: Path, **recording: Any
                    ) -> AsyncIterator[list[Server]]:
    """Two Nodes, one Redis, one recordings root, started at the same moment."""
    prefix = f"retention-{time.monotonic_ns()}:"
    configs = [node_config(redis, n, prefix) for n in ("node-a", "node-b")]
    configs = [dataclasses.replace(c, recording=dataclasses.replace(
        c.recording, root=str(root), retention_days=30.0, **recording)) for c in configs]
    async with running_nodes(configs) as servers:
        yield servers


async def test_nodes_sharing_a_root_sweep_one_at_a_time_and_delete_each_once(
        cluster_redis: RedisExecutor, tmp_path: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Both Nodes run the retention loop every 0.2 s from the same start, on
    the same recordings: each expired one is deleted once, by one Node, with
    nothing logged against it; the recent one stays, listed on both."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "recordings"
    old, new = await plant(root, expired=4, kept=1)
    async with two_nodes(cluster_redis, root, retention_check_s=0.2) as nodes:
        def swept() -> str:
            left = [r.id for r in old if r.directory.exists()
                    or any(r.id in n.app[RECORDINGS].index for n in nodes)]
            return "" if not left else f"not deleted everywhere yet: {left}"

        await wait_for(swept, timeout=20)
        # Several more passes of both Nodes, over what is left.
        await asyncio.sleep(1.5)
        assert sorted(deleted(nodes)) == sorted(r.id for r in old)
        [kept] = new
        assert kept.directory.is_dir()
        for node in nodes:
            node.app[RECORDINGS].rescan()
            assert set(node.app[RECORDINGS].index) == {kept.id}
        skipped = sum(1 for r in caplog.records if r.name == "server.recordings"
                      and "retention pass left to Node" in r.getMessage())
        print(f"deleted {len(old)} recordings; passes skipped while the other Node swept: "
              f"{skipped}")
        assert not complaints(caplog), complaints(caplog)


async def test_two_sweeps_at_once_one_deletes_and_the_other_skips(
        cluster_redis: RedisExecutor, tmp_path: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Recordings that expired after both Nodes listed the root: two sweeps
    started together, one takes the lease (looks at the root again, deletes
    them), the other is skipped. The lease is let go after."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "recordings"
    async with two_nodes(cluster_redis, root, retention_check_s=3600.0) as nodes:
        # The passes each Node makes when it starts are over (the lease is free).
        store = nodes[0].app[STORE]

        async def started() -> str:
            if any(n.app[RECORDINGS].retention_passes < 1 for n in nodes):
                return "a Node's first pass is not over"
            return "" if await store.leases.get_lease(RETENTION_LEASE) is None else "held"

        await wait_for_async(started)
        old, new = await plant(root, expired=3, kept=1)
        results = await asyncio.gather(*(n.app[RECORDINGS].sweep() for n in nodes))
        print(f"sweeps at once: {results}")
        assert results.count(None) == 1, results
        [done] = [r for r in results if r is not None]
        assert sorted(done) == sorted(r.id for r in old)
        assert sorted(deleted(nodes)) == sorted(r.id for r in old)
        assert not any(r.directory.exists() for r in old) and new[0].directory.is_dir()
        assert await store.leases.get_lease(RETENTION_LEASE) is None
        # Later passes, one after the other, find nothing left to delete.
        for node in nodes:
            assert await node.app[RECORDINGS].sweep() == []
        assert len(deleted(nodes)) == len(old)
        assert not complaints(caplog), complaints(caplog)


async def wait_for_async(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (reason := await check()) != "":
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(reason)
        await asyncio.sleep(0.05)


@pytest.fixture
async def lone_node() -> AsyncIterator[Server]:
    """One Node (memory store) keeping recordings 30 days, sweeping only when asked."""
    server, runner = await start_server(make_config(
        recording={"retention_days": 30, "retention_check_s": 3600}))
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_a_recording_removed_by_hand_is_forgotten_not_counted_as_deleted(
        lone_node: Server, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = lone_node
    recordings = server.app[RECORDINGS]
    root = Path(server.config.recording.root)
    (gone_before, gone_during, file_gone, _), _ = await plant(root, expired=4, kept=0)
    recordings.open()
    assert {gone_before.id, gone_during.id, file_gone.id} <= set(recordings.index)

    # A person removes one before the sweep; another as its deletion starts
    # (whole), and one file of a third.
    shutil.rmtree(gone_before.directory)
    removed_file = "events.jsonl"

    async def meanwhile(recording_id: str) -> None:
        if recording_id == gone_during.id:
            shutil.rmtree(gone_during.directory)
        elif recording_id == file_gone.id:
            (file_gone.directory / removed_file).unlink()

    recordings.before_delete.append(meanwhile)
    swept = await recordings.sweep()
    assert swept is not None
    assert gone_before.id not in swept and gone_during.id not in swept
    assert file_gone.id in swept and len(swept) == 2
    entries = [e for e in server.app[AUDIT].read(session=SESSION)
               if e["event"] == "recording_deleted"]
    assert sorted(e["recording"] for e in entries) == sorted(swept)
    [partial] = [e for e in entries if e["recording"] == file_gone.id]
    names = {f["file"] for f in partial["files"]}
    assert removed_file not in names and "manifest.json" in names
    assert all("error" not in f for f in partial["files"]), partial["files"]
    assert not set(recordings.index) & {gone_before.id, gone_during.id, file_gone.id}
    assert not complaints(caplog), complaints(caplog)

    # By hand through the API: a recording gone from the root is a 404, not a deletion.
    (vanishing,), _ = await plant(root, expired=1, kept=0)
    recordings.open()
    shutil.rmtree(vanishing.directory)
    admin = server.token(Role.ADMIN, name="Ms Admin")
    async with http.delete(f"{server.base_url}/api/recordings/{vanishing.id}",
                           headers={"Authorization": f"Bearer {admin}"}) as response:
        assert response.status == 404
        assert (await response.json())["code"] == "unknown_recording"
    assert vanishing.id not in recordings.index
