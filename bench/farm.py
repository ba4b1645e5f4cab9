"""A process of count-only viewers ("load viewers"), driven over a Pipe.

Keeping them out of the process that measures latency means the latency
viewer's event loop is not also serving thirty other peer connections. Asked
to, its viewers decode until their first frame instead (a share of a burst of
joiners spread over several such processes, as separate browsers would be).
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
from .stream import StampBook

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
                # (url, tokens[, ices[, options]]): ices per viewer {"servers", "relay_only"};
                # options {"decode": "first", "start_at": wall-clock time} for decoding
                # joiners that start together with other processes' (one clock for all).
                url, tokens, *more = args
                ices = (more[0] if more else None) or [{}] * len(tokens)
                options: dict[str, Any] = more[1] if len(more) > 1 else {}
                decode = options.get("decode")
                new = [Viewer(f"farm{len(viewers) + i}", ice_servers=ice.get("servers"),
                              relay_only=bool(ice.get("relay_only")), decode=decode,
                              stamps=StampBook() if decode else None)
                       for i, ice in enumerate(ices)]
                viewers.extend(new)
                start_at = options.get("start_at")
                if start_at is not None:
                    await asyncio.sleep(max(0.0, start_at - time.time()))
                await asyncio.gather(*(v.join(http, url, t)
                                       for v, t in zip(new, tokens, strict=True)))
                deadline = time.time() + FIRST_FRAME_TIMEOUT
                while time.time() < deadline and any(  # noqa: ASYNC110 - bounded poll
                        v.awaiting_first() for v in new):
                    await asyncio.sleep(0.01 if decode else 0.05)
                conn.send([v.report() for v in new])
            elif cmd == "reports":
                conn.send([v.report() for v in viewers])
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
