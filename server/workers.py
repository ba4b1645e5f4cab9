"""`scrubin serve --workers N`: N Node processes on one machine, one deployment.

One Python process uses one core; workers are separate Nodes (each its own
event loop, peer connections and Sessions) that share live state only through
Redis, exactly like Nodes on separate machines. Without ``[store].redis_url``
there is nothing to share through: more than one worker is refused.

Worker ``i`` of ``N`` (``worker_config``):

- node id ``<node id>-w<i>`` (stable across restarts: the supervisor restarts
  a worker that dies under the same id, and it takes its leases back);
- TCP: listens on ``server.port`` together with every other worker
  (SO_REUSEPORT: the kernel spreads new connections over them; pages, the API
  and the first WHIP/WHEP POST arrive there), and on its own port
  ``server.port + 1 + i``, which is its URL in the Node registry: a page moves
  its websocket there when worker ``i`` holds its Session, a WHIP/WHEP client
  is redirected there (307) and its resource (DELETE) lives there;
- UDP: the ``i``-th of N equal parts of ``ice.udp_ports`` for the host
  candidates of its peer connections.

So a firewall opens TCP ``server.port`` … ``server.port + N`` and UDP
``ice.udp_ports`` (README, "Ports").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from urllib.parse import urlsplit, urlunsplit

from .config import Config, ConfigError, udp_port_range
from .nodes import default_node_id

logger = logging.getLogger("scrubin.workers")

#: A worker that exits with this code stopped on a configuration error: the
#: others stop too (restarting would fail the same way).
EXIT_CONFIG = 2
#: Seconds workers get to stop after SIGTERM before they are killed.
STOP_GRACE_S = 20.0


def worker_count(config: Config, asked: int | None) -> int:
    """How many workers: ``--workers``, else ``[cluster].workers``, else one
    per core with Redis and one without. ConfigError for more than one
    without Redis."""
    count = asked if asked is not None else config.cluster.workers
    if not count:
        count = (os.cpu_count() or 1) if config.store.redis_url else 1
    if count < 1:
        raise ConfigError("--workers: at least 1")
    if count > 1 and not config.store.redis_url:
        raise ConfigError(f"{count} workers need [store].redis_url (SCRUBIN_STORE_REDIS_URL): "
                          "workers are separate Nodes and share live state only through "
                          "Redis. Without Redis, run one process (--workers 1).")
    return count


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", "")).rstrip("/")


def worker_config(config: Config, index: int, count: int) -> Config:
    """The configuration of worker ``index`` (0-based) of ``count``."""
    if not 0 <= index < count:
        raise ConfigError(f"worker {index} of {count}")
    own_port = config.server.port + 1 + index
    if own_port > 65535:
        raise ConfigError(f"[server].port {config.server.port} leaves no port for worker "
                          f"{index}")
    udp = config.ice.udp_ports
    if udp:
        low, high = udp_port_range(udp)
        size = (high - low + 1) // count
        if size < 1:
            raise ConfigError(f"[ice].udp_ports {udp} has fewer ports than {count} workers")
        udp = f"{low + index * size}-{low + (index + 1) * size - 1}"
    server = dataclasses.replace(
        config.server, node_id=f"{default_node_id(config)}-w{index}", port=own_port,
        public_url=_with_port(config.base_url, own_port))
    return dataclasses.replace(config, server=server,
                               ice=dataclasses.replace(config.ice, udp_ports=udp))


def parse_worker(value: str) -> tuple[int, int]:
    """"i/N" (the supervisor's argument to its workers)."""
    index, _, count = value.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise ConfigError(f"--worker {value!r}: expected i/N") from None


async def supervise(command: list[str], count: int) -> int:
    """Run ``command --worker i/N`` for every worker until SIGINT/SIGTERM;
    restart a worker that dies (1 s, doubling to 30 s while it keeps dying)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running: dict[int, asyncio.subprocess.Process] = {}
    failed: list[int] = []

    async def keep(index: int) -> None:
        backoff = 1.0
        while not stop.is_set():
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *command, "--worker", f"{index}/{count}")
            running[index] = process
            waiting = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                return
            code = waiting.result()
            if code == EXIT_CONFIG:
                logger.error("worker %d stopped on a configuration error; stopping all",
                             index)
                failed.append(index)
                stop.set()
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            logger.warning("worker %d exited (%s); restarting in %.0f s", index, code, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)

    keepers = [asyncio.ensure_future(keep(i)) for i in range(count)]
    print(f"ScrubIn: {count} workers (Ctrl-C to stop)", flush=True)
    await stop.wait()
    await asyncio.gather(*keepers, return_exceptions=True)
    for process in running.values():
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    waits = [p.wait() for p in running.values() if p.returncode is None]
    if waits:
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE_S)
        except TimeoutError:
            for process in running.values():
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
    return EXIT_CONFIG if failed else 0


def worker_command(config_path: str | None, log_level: str) -> list[str]:
    """How the supervisor starts a worker: this Python, this CLI."""
    command = [sys.executable, "-m", "server.cli", "--log-level", log_level, "serve"]
    if config_path:
        command += ["--config", config_path]
    return command
