"""Peers in their own process, so a test can kill them the way a laptop lid or a
Wi-Fi drop does: SIGKILL, no DELETE, no DTLS close, no RTCP BYE.

    python -m tests.peer_process viewers BASE_URL SESSION FEED TOKEN COUNT
    python -m tests.peer_process publish BASE_URL SESSION SLOT TOKEN

Prints ``ready`` once every viewer has received a frame (or the publisher is
connected), then runs until killed. Viewers never decode: a tapped receiver
counts whole encoded frames, so ten of them cost little.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from server.media.hooks import advertise_host_addresses, tap_receiver
from server.publish.synthetic import SyntheticTheatreCamera

LOOPBACK = ["127.0.0.1"]


async def _exchange(http: aiohttp.ClientSession, url: str, token: str,
                    pc: RTCPeerConnection) -> None:
    advertise_host_addresses(pc, LOOPBACK)
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(url, data=pc.localDescription.sdp,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/sdp"}) as response:
        body = await response.text()
        if response.status != 201:
            raise SystemExit(f"{url}: {response.status} {body}")
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))


async def viewers(base: str, session: str, feed: str, token: str, count: int) -> None:
    kind = feed.rsplit(".", 1)[-1]
    got: list[asyncio.Event] = []
    pcs = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pcs.append(pc)
            transceiver = pc.addTransceiver(kind, direction="recvonly")
            event = asyncio.Event()
            got.append(event)
            tap_receiver(transceiver.receiver, kind,
                         lambda data, ts, event=event: event.set())
            await _exchange(http, f"{base}/whep/{session}/{feed}", token, pc)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in got)), 20)
        print("ready", flush=True)
        await asyncio.Event().wait()


async def publish(base: str, session: str, slot: str, token: str) -> None:
    async with aiohttp.ClientSession() as http:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(SyntheticTheatreCamera(320, 180, 15, label=slot), direction="sendonly")
        connected = asyncio.Event()
        pc.on("connectionstatechange",
              lambda: pc.connectionState == "connected" and connected.set())
        await _exchange(http, f"{base}/whip/{session}/{slot}", token, pc)
        await asyncio.wait_for(connected.wait(), 20)
        print("ready", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "viewers":
        base, session, feed, token, count = args
        asyncio.run(viewers(base, session, feed, token, int(count)))
    elif command == "publish":
        base, session, slot, token = args
        asyncio.run(publish(base, session, slot, token))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
