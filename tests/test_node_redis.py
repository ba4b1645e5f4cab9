"""A Node on Redis: media keeps flowing while Redis is gone, joins wait for it.

Real parts only: a redis-server of the test's own (pytest-redis, free port),
stopped and started again; a real server, publisher and viewers on loopback.
"""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest
from aiortc.mediastreams import VideoStreamTrack
from pytest_redis import factories
from pytest_redis.executor import RedisExecutor

from server.http.common import STORE
from server.roles import Role

from .conftest import make_config, start_server, wait_for, whep_subscribe, whip_publish

pytestmark = pytest.mark.slow

node_redis_proc = factories.redis_proc(  # type: ignore[arg-type]
    executable=shutil.which("redis-server") or "/usr/bin/redis-server", port=None)


async def test_redis_outage_keeps_media_and_refuses_joins_until_it_returns(
        node_redis_proc: RedisExecutor, http: aiohttp.ClientSession) -> None:
    assert node_redis_proc.port != 6379
    url = f"redis://{node_redis_proc.host}:{node_redis_proc.port}/0"
    server, runner = await start_server(make_config(store={"redis_url": url}))
    peers = []
    try:
        assert server.app[STORE].kind == "redis"
        publisher, _ = await whip_publish(http, server, "room", [VideoStreamTrack()])
        peers.append(publisher)
        session = server.session()
        await wait_for(lambda: "" if "room.video" in session.feeds else "no feed")
        viewer, _, track = await whep_subscribe(http, server, "room.video", "video")
        peers.append(viewer)
        await asyncio.wait_for(track, 10)
        sub = next(iter(session.subscriptions.values()))
        await wait_for(lambda: "" if sub.frames_forwarded > 5 else "no frames")

        node_redis_proc.stop()
        async with http.get(f"{server.base_url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["status"] == "degraded"
        # Media already flowing does not notice.
        before = sub.frames_forwarded
        await wait_for(lambda: "" if sub.frames_forwarded > before + 10
                       else f"{sub.frames_forwarded - before} frames since Redis stopped")
        # New joins get a clear error, whose fault is the server's.
        ws = await http.ws_connect(f"{server.base_url}/ws")
        await ws.send_json({"type": "hello", "token": server.token(Role.TRAINEE)})
        reply = await ws.receive_json()
        assert reply["type"] == "error"
        assert reply["error"]["status"] == 503 and reply["error"]["fault"] == "server"
        await ws.receive()
        assert ws.close_code == 1013
        async with http.post(f"{server.base_url}/whep/or1-live/room.video", data="v=0\r\n",
                             headers={"Authorization": f"Bearer {server.token(Role.TRAINEE)}",
                                      "Content-Type": "application/sdp"}) as response:
            assert response.status == 503
            assert (await response.json())["code"] == "store_unavailable"
        assert len(session.subscriptions) == 1

        node_redis_proc.start()

        async def ready() -> bool:
            async with http.get(f"{server.base_url}/readyz") as response:
                return response.status == 200

        for _ in range(50):
            if await ready():
                break
            await asyncio.sleep(0.2)
        assert await ready()
        viewer2, _, track2 = await whep_subscribe(http, server, "room.video", "video")
        peers.append(viewer2)
        await asyncio.wait_for(track2, 10)
        assert len(session.subscriptions) == 2
    finally:
        for pc in peers:
            await pc.close()
        await runner.cleanup()
