"""Prometheus metrics of one Node, in its own registry (no process-global state).

Live counts (Sessions, Feeds, Subscriptions by state; bytes and frames) are
read from the Registry at scrape time, so the media path does no metric work
per frame. Events (first frames, join failures, auth denials, keyframe
requests) are counted where they happen through narrow callables.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import Registry

FIRST_FRAME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.first_frame = Histogram(
            "scrubin_first_frame_seconds",
            "Time from a Subscription's creation to its first forwarded frame",
            registry=self.registry, buckets=FIRST_FRAME_BUCKETS)
        self.join_failures = Counter(
            "scrubin_join_failures_total", "Refused publish/subscribe/join attempts",
            ["code"], registry=self.registry)
        self.auth_denials = Counter(
            "scrubin_auth_denials_total", "Requests refused for a missing, invalid or "
            "out-of-scope token", ["code"], registry=self.registry)

        self.feed_transitions = Counter(
            "scrubin_feed_transitions_total", "Feeds entering a state (live, stalled, down, "
            "closed)", ["state"], registry=self.registry)
        self.subscription_transitions = Counter(
            "scrubin_subscription_transitions_total", "Subscriptions entering a state",
            ["state"], registry=self.registry)
        self.downstream_drops = Counter(
            "scrubin_downstream_drops_total", "Downstreams a Feed let go because they failed, "
            "blocked, fell behind or lost their transport", ["reason"], registry=self.registry)
        self.layer_switches = Counter(
            "scrubin_layer_switches_total", "Viewers moved to a camera's layer", ["layer"],
            registry=self.registry)
        self.peers_gone = Counter(
            "scrubin_peers_gone_total", "Peer connections that failed or went quiet",
            ["role"], registry=self.registry)

    def count_media(self, what: str, label: str) -> None:
        """The Registry's ``on_media_count``: one media-plane event."""
        counter = {"feed": self.feed_transitions, "subscription": self.subscription_transitions,
                   "drop": self.downstream_drops, "peer_gone": self.peers_gone,
                   "layer": self.layer_switches}.get(what)
        if counter is not None:
            counter.labels(label).inc()

    def watch(self, registry: Registry) -> None:
        self.registry.register(_LiveCollector(registry))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        sessions: Tally[str] = Tally()
        feeds: Tally[str] = Tally()
        subscriptions: Tally[str] = Tally()
        layers: Tally[str] = Tally()
        totals = self._registry.totals.copy()
        for session in self._registry.sessions.values():
            sessions[session.state] += 1
            for feed in session.feeds.values():
                feeds[feed.state] += 1
                totals["frames_received"] += feed.frames_received
                totals["bytes_received"] += feed.bytes_received
                totals["keyframe_requests"] += feed.keyframe_requests_sent
            for sub in session.subscriptions.values():
                subscriptions[sub.state] += 1
                if sub.kind == "video" and sub.state in ("waiting", "flowing"):
                    layers[sub.layer] += 1
                totals["frames_forwarded"] += sub.frames_forwarded
                totals["bytes_forwarded"] += sub.bytes_forwarded
        yield _gauge("scrubin_sessions", "Sessions on this Node by state", sessions,
                     ("live", "ended"))
        yield _gauge("scrubin_feeds", "Feeds by state", feeds, ("live", "stalled", "down"))
        yield _gauge("scrubin_subscriptions", "Subscriptions by state", subscriptions,
                     ("waiting", "flowing", "paused"))
        rates = GaugeMetricFamily("scrubin_feed_bitrate_bps", "Bits per second each Feed (and "
                                  "each layer of a camera) receives: what a viewer of that "
                                  "layer is sent", labels=["session", "feed"])
        for session in self._registry.sessions.values():
            for feed in session.feeds.values():
                for one in (feed, feed.low):
                    if one is not None and one.state != "closed":
                        rates.add_metric([session.id, one.id], one.bitrate_bps)
        yield rates
        layer_family = GaugeMetricFamily("scrubin_video_subscriptions_by_layer",
                                         "Video Subscriptions receiving each layer",
                                         labels=["layer"])
        for layer in ("full", "low"):
            layer_family.add_metric([layer], layers[layer])
        yield layer_family
        for name, help_text in (
            ("frames_received", "Encoded frames received from publishers"),
            ("bytes_received", "Encoded bytes received from publishers"),
            ("frames_forwarded", "Encoded frames forwarded to viewers"),
            ("bytes_forwarded", "Encoded bytes forwarded to viewers"),
            ("keyframe_requests", "Keyframe requests sent upstream to publishers"),
        ):
            family = CounterMetricFamily(f"scrubin_{name}", help_text)
            family.add_metric([], totals[name])
            yield family


def _gauge(name: str, help_text: str, tally: Tally[str], states: tuple[str, ...]
           ) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["state"])
    for state in sorted(set(states) | set(tally)):
        family.add_metric([state], tally[state])
    return family
