"""``GET /metrics``: the destination relay's counters in Prometheus exposition format.

Every metric lives in a registry of its own per server (not prometheus-client's global
one), so two servers in one process (tests) never share counters.

Byte counters are read from the channels at scrape time: the data path keeps its own
plain integer counters (:attr:`Channel.bytes_sent`/``bytes_rcvd``) and is never slowed
by a metrics library. Closed channels' bytes are folded into per-target totals.

==========================================  =========  ==================================
name                                        type       labels
==========================================  =========  ==================================
migrelay_sessions_open                      gauge
migrelay_sessions_total                     counter    token (its name; "-" without tokens)
migrelay_channels_open                      gauge
migrelay_channels_total                     counter    target
migrelay_channels_closed_total              counter    target, code
migrelay_bytes_total                        counter    target, direction (to_destination,
                                                       to_source)
migrelay_refusals_total                     counter    status, reason
migrelay_handshake_seconds                  histogram  (connection accepted → answer sent)
==========================================  =========  ==================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from migrelay.aio.channel import Channel

#: Handshake latency buckets (s): a local upgrade takes ~1 ms, one that waits for the
#: destination socket up to --wait-target (30 s by default).
HANDSHAKE_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                              2.5, 5.0, 10.0, 30.0)  # fmt: skip
#: The Content-Type of the exposition.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

TO_DESTINATION: Final = "to_destination"
TO_SOURCE: Final = "to_source"


class _ByteCollector(Collector):
    """``migrelay_bytes_total``: closed channels' totals plus the open channels' counters."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "migrelay_bytes",
            "Payload bytes relayed, by target and direction.",
            labels=("target", "direction"),
        )
        totals = dict(self.metrics.closed_bytes)
        for channel, target in self.metrics.live.items():
            for direction, count in (
                (TO_DESTINATION, channel.bytes_rcvd),
                (TO_SOURCE, channel.bytes_sent),
            ):
                totals[target, direction] = totals.get((target, direction), 0) + count
        for (target, direction), count in sorted(totals.items()):
            family.add_metric((target, direction), count)
        yield family


class RelayMetrics:
    """The metrics of one :class:`~migrelay.aio.server.RelayServer`.

    Args:
        sessions: the server's open sessions (only its size is read).
        channels: the server's open channels (only its size is read).
    """

    def __init__(self, sessions: Sized, channels: Sized) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        #: Open channels and their target name, for the byte counters.
        self.live: dict[Channel, str] = {}
        #: Bytes of closed channels by (target, direction).
        self.closed_bytes: dict[tuple[str, str], int] = {}
        self.sessions_open = Gauge(
            "migrelay_sessions_open", "Migration sessions open now.", registry=registry
        )
        self.sessions_open.set_function(_length(sessions))
        self.sessions_total = Counter(
            "migrelay_sessions",
            "Migration sessions started, by token name (never the secret).",
            ("token",),
            registry=registry,
        )
        self.channels_open = Gauge(
            "migrelay_channels_open", "Channels (WebSockets) open now.", registry=registry
        )
        self.channels_open.set_function(_length(channels))
        self.channels_total = Counter(
            "migrelay_channels", "Channels opened, by target.", ("target",), registry=registry
        )
        self.channels_closed = Counter(
            "migrelay_channels_closed",
            "Channels closed, by target and close code.",
            ("target", "code"),
            registry=registry,
        )
        self.refusals = Counter(
            "migrelay_refusals",
            "Upgrades refused, by HTTP status and reason.",
            ("status", "reason"),
            registry=registry,
        )
        self.handshake_seconds = Histogram(
            "migrelay_handshake_seconds",
            "Seconds from accepting a connection to answering its upgrade.",
            buckets=HANDSHAKE_BUCKETS_S,
            registry=registry,
        )
        registry.register(_ByteCollector(self))

    def session_started(self, token: str) -> None:
        """Count a new migration session opened with the token named ``token``."""
        self.sessions_total.labels(token).inc()

    def channel_opened(self, channel: Channel, target: str) -> None:
        """Count ``channel`` and follow its byte counters until it closes."""
        self.channels_total.labels(target).inc()
        self.live[channel] = target

    def channel_closed(self, channel: Channel, code: int | None) -> None:
        """Fold a closed channel's bytes into its target's totals."""
        target = self.live.pop(channel, None)
        if target is None:
            return
        for direction, count in (
            (TO_DESTINATION, channel.bytes_rcvd),
            (TO_SOURCE, channel.bytes_sent),
        ):
            key = (target, direction)
            self.closed_bytes[key] = self.closed_bytes.get(key, 0) + count
        self.channels_closed.labels(target, str(code) if code is not None else "none").inc()

    def refused(self, status: int, reason: str) -> None:
        """Count a refusal; ``reason`` is a short fixed word, never request text."""
        self.refusals.labels(str(status), reason).inc()

    def exposition(self) -> bytes:
        """The current values in the text exposition format."""
        return generate_latest(self.registry)


def _length(collection: Sized) -> Callable[[], float]:
    return lambda: float(len(collection))
