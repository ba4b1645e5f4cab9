"""A process of count-only viewers ("load viewers"), driven over a Pipe.

Keeping them out of the process that measures latency means the latency
viewer's event loop is not also serving thirty other peer connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from .peers import Viewer, receive_losses

FIRST_FRAME_TIMEOUT = 10.0


def farm_main(conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.ERROR)
    asyncio.run(_farm(conn))


async def _inbound(viewer: Viewer) -> tuple[int, int, int]:
    if viewer.pc is None:
        return 0, 0, 0
    received, lost = receive_losses(viewer.pc)
    return received, lost, 0


async def _farm(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    viewers: list[Viewer] = []
    async with aiohttp.ClientSession() as http:
        conn.send(("ready", os.getpid()))
        while True:
            ready = await loop.run_in_executor(None, conn.poll, 0.5)
            if not ready:
                if os.getppid() == 1:
                    break
                continue
            try:
                cmd, args = conn.recv()
            except EOFError:
                break
            if cmd == "join":
                # (url, tokens) or (url, tokens, ices): per viewer {"servers", "relay_only"}.
                url, tokens, *more = args
                ices = more[0] if more else [{}] * len(tokens)
                new = [Viewer(f"farm{len(viewers) + i}", ice_servers=ice.get("servers"),
                              relay_only=bool(ice.get("relay_only")))
                       for i, ice in enumerate(ices)]
                viewers.extend(new)
                await asyncio.gather(*(v.join(http, url, t)
                                       for v, t in zip(new, tokens, strict=True)))
                deadline = time.time() + FIRST_FRAME_TIMEOUT
                while time.time() < deadline and any(  # noqa: ASYNC110 - bounded poll
                        v.t_first_frame is None and v.error is None for v in new):
                    await asyncio.sleep(0.05)
                conn.send([{"t_join": v.t_join, "t_ice": v.t_ice, "resource": v.resource,
                            "t_first_frame": v.t_first_frame, "error": v.error} for v in new])
            elif cmd == "counts":
                conn.send([(v.frames, v.bytes) for v in viewers])
            elif cmd == "inbound":
                stats = await asyncio.gather(*(_inbound(v) for v in viewers))
                conn.send(stats)
            elif cmd == "close":
                await asyncio.gather(*(v.close() for v in viewers))
                viewers.clear()
                conn.send("closed")
            elif cmd == "exit":
                break
        await asyncio.gather(*(v.close() for v in viewers))
    with contextlib.suppress(Exception):
        conn.send("bye")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [r["error"] for r in results if r["error"]]
    return {"joined": len(results) - len(errors), "errors": errors}
