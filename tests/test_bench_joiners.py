"""The live-path benchmark's joiners spread over worker processes come back as
reports and are rebuilt in the parent: their timings must survive the trip, and
their first frame's age must come from the parent's publisher stamps (a worker
has none)."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from bench.peers import Decoded, Viewer
from bench.stream import StampBook


def test_a_report_from_a_worker_rebuilds_the_viewer_with_its_age_from_this_process() -> None:
    stamps = StampBook()
    stamps.record(7, 100.0)
    stamps.record(7, 103.0)  # the counter repeats when the stream is replayed again
    # As a worker sees it: decoded counter 7 at 103.3, no publisher stamps, so no age.
    worker_side = Viewer(
        "farm3", resource="sub-1", t_join=102.0, t_answer=102.1, t_ice=102.2,
        t_connected=102.22, t_first_frame=103.25, first_frame_key=True, frames=3,
        arrivals=[(9000, 103.25), (12000, 103.26), (9000 + 27_000, 103.35)],
        reported_first=Decoded(7, 9000, 103.25, 103.3, None), reported_lost=2)

    rebuilt = Viewer.from_report(pickle.loads(pickle.dumps(worker_side.report())), stamps)

    assert (rebuilt.t_join, rebuilt.t_ice, rebuilt.t_first_frame) == (102.0, 102.2, 103.25)
    assert rebuilt.resource == "sub-1" and rebuilt.first_frame_key
    assert rebuilt.first_decoded_at() == 103.3
    first = rebuilt.first_decoded()
    assert first is not None and first.latency == pytest.approx(0.3)  # the 103.0 send
    # Frames arrive live (< 100 ms late) from the one sent 0.3 s after the first.
    assert rebuilt.caught_up_at(0.1) == 103.35
    assert asyncio.run(rebuilt.packets_lost()) == 2
    assert not rebuilt.awaiting_first()


def test_a_viewer_awaits_its_first_frame_until_it_has_one_or_an_error() -> None:
    viewer = Viewer("farm0")
    assert viewer.awaiting_first()
    viewer.t_first_frame = 1.0
    assert not viewer.awaiting_first()
    failed = Viewer("farm1", error="RuntimeError: POST 403")
    assert not failed.awaiting_first()
