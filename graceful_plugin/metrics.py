"""
Prometheus metrics (C{--metrics SPEC}): the serving generation's figures in prometheus_client's
exposition formats, on a listener of its own that is handed over like every other one.

The figures are plain numbers kept by the generation (L{graceful_plugin.figures}, the session
trackers, the view of draining generations) and read here at scrape time by a custom collector,
so that counting costs nothing on the per-connection path.  prometheus_client is needed only
where a metrics listener is served (the C{metrics} extra).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from twisted.web import resource, server

from graceful_plugin.control import METRICS_ROLE
from graceful_plugin.figures import PHASES
from graceful_plugin.listeners import ListenerSpec, findMatch, parseListener

#: The states a generation reports in C{graceful_state} (C{starting}: not serving yet).
STATES = (
    "starting",
    "serving",
    "handing_off",
    "committed",
    "draining",
    "retiring",
    "terminated",
)

#: The listener kinds that can serve the metrics.
METRICS_KINDS = ("tcp", "tcp6", "unix")

#: The label of a draining generation's sessions when it did not say by listener.
ALL_LISTENERS = "*"


class MetricsUnavailable(Exception):
    """
    Metrics were asked for, but prometheus_client is not installed.
    """


def requirePrometheus() -> None:
    """
    @raise MetricsUnavailable: with a sentence, when prometheus_client cannot be imported.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsUnavailable(
            "--metrics needs prometheus_client, which is not installed"
            " (pip install 'graceful[metrics]')"
        ) from None


def parseMetrics(text: str) -> ListenerSpec:
    """
    Parse a C{--metrics} value: a TCP or Unix listener in C{--port}'s grammar, named
    C{metrics} unless it names itself.

    @raise ValueError: with a sentence.
    """
    spec = parseListener(text)
    if spec.kind not in METRICS_KINDS:
        raise ValueError(
            f"{text!r}: the metrics are served over tcp, tcp6 or unix, not {spec.kind}"
        )
    if spec.name == f"{spec.kind}:{spec.address}":
        spec = dataclasses.replace(spec, name="metrics")
    return spec


class GenerationCollector:
    """
    The serving generation's figures, collected at scrape time.
    """

    def __init__(self, generation: Any) -> None:
        self.generation = generation

    def describe(self) -> list[Any]:
        # Nothing to check at registration: the names are ours alone.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        g = self.generation
        figures = g.figures
        yield GaugeMetricFamily(
            "graceful_generation", "The serving generation's number.", value=g.generation
        )
        state = g.machine.describe() if g.machine is not None else "starting"
        states = GaugeMetricFamily(
            "graceful_state", "1 for the generation's current state.", labels=["state"]
        )
        for name in STATES:
            states.add_metric([name], 1.0 if name == state else 0.0)
        yield states
        yield GaugeMetricFamily(
            "graceful_uptime_seconds",
            "Seconds since this generation started.",
            value=time.monotonic() - g.startedAt,
        )
        ports = g.ports + ([g.controlPort] if g.controlPort is not None else [])
        connections = CounterMetricFamily(
            "graceful_connections",
            "Connections accepted, by listener, over every generation.",
            labels=["listener"],
        )
        for name, total in sorted(figures.connections(ports).items()):
            connections.add_metric([name], total)
        yield connections
        yield CounterMetricFamily(
            "graceful_connections_handed_over",
            "Idle keep-alive connections a draining generation handed over to its successor,"
            " over every generation.",
            value=figures.handedOver,
        )
        sessions = GaugeMetricFamily(
            "graceful_sessions",
            "Open connections, by generation, listener and the generation's state, draining"
            " generations included.",
            labels=["generation", "listener", "state"],
        )
        for port in g.ports:
            sessions.add_metric([str(g.generation), port.name, state], port.sessions.count)
        for entry in g.draining.entries():
            labels = [str(entry["generation"]), ALL_LISTENERS, entry["state"]]
            byListener = entry.get("listeners")
            if byListener is None:
                sessions.add_metric(labels, entry["sessions"])
                continue
            for item in byListener:
                labels[1] = item["name"]
                sessions.add_metric(labels, item["sessions"])
        yield sessions
        yield GaugeMetricFamily(
            "graceful_draining_generations",
            "Generations still draining behind the serving one.",
            value=g.drainingGenerations(),
        )
        handoffs = CounterMetricFamily(
            "graceful_handoffs", "Handoffs by outcome, over every generation.", labels=["outcome"]
        )
        for outcome, total in figures.handoffs.items():
            handoffs.add_metric([outcome], total)
        yield handoffs
        handoff = figures.histograms["handoff"]
        yield HistogramMetricFamily(
            "graceful_handoff_seconds",
            "Takeovers from the successor's connect to its commit.",
            buckets=handoff.cumulative(),
            sum_value=handoff.total,
        )
        phases = HistogramMetricFamily(
            "graceful_handoff_phase_seconds",
            "Phases of a takeover: fds, adopt, ready, commit, confirm.",
            labels=["phase"],
        )
        for phase in PHASES:
            histogram = figures.histograms[f"phase:{phase}"]
            phases.add_metric([phase], histogram.cumulative(), histogram.total)
        yield phases
        drain = figures.histograms["drain"]
        yield HistogramMetricFamily(
            "graceful_drain_seconds",
            "Generations from the start of their drain to their exit.",
            buckets=drain.cumulative(),
            sum_value=drain.total,
        )
        # Every process of the serving generation: the leader (worker 0) and its workers.
        processes = g.workerEntries()
        yield GaugeMetricFamily(
            "graceful_workers",
            "Processes serving in the serving generation, the leader included.",
            value=len(processes),
        )
        restarts = CounterMetricFamily(
            "graceful_worker_restarts",
            "Workers of a generation replaced after they died while serving (one series a"
            " generation: a successor starts its own).",
            labels=["generation"],
        )
        restarts.add_metric([str(g.generation)], sum(p["restarts"] for p in processes))
        yield restarts
        perWorker = GaugeMetricFamily(
            "graceful_worker_sessions",
            "Open connections of each process of the serving generation (worker 0: the leader).",
            labels=["worker"],
        )
        for process in processes:
            perWorker.add_metric([str(process["index"])], process["sessions"])
        yield perWorker


def makeRegistry(generation: Any) -> Any:
    """
    A registry with the generation's figures and the standard process figures of this process.
    """
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GenerationCollector(generation))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsResource(resource.Resource):
    """
    Any path: the metrics, in the format the scraper asks for (text or OpenMetrics), rendered
    by prometheus_client in the reactor's thread (the figures are read where they are kept).
    """

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", contentType.encode("latin-1"))
        return bytes(encoder(self.registry))


def metricsFactory(generation: Any) -> server.Site:
    """
    The site that serves C{generation}'s metrics (its channels drain like the application's).

    @raise MetricsUnavailable: prometheus_client is not installed.
    """
    requirePrometheus()
    from graceful_plugin.web import drainableSite

    site = drainableSite(MetricsResource(makeRegistry(generation)))
    # No access log line for every scrape.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


# -- the metrics listener in a generation's life ---------------------------------------------


def bindMetrics(generation: Any) -> Any:
    """
    Bind the first generation's metrics listener (not accepting yet).

    @raise OSError: with a sentence, when it cannot listen.
    """
    spec = generation.settings.metrics
    port = generation.listeners.bind(spec, metricsFactory(generation))
    port.role = METRICS_ROLE
    return port


def keepMetrics(wanted: ListenerSpec | None, entry: dict[str, Any]) -> tuple[bool, Any]:
    """
    Whether a successor keeps the metrics listener its predecessor hands over, and with which
    spec: always when it names no C{--metrics} of its own, else when its own is at the same
    address.
    """
    if wanted is None:
        text = entry.get("spec")
        return True, parseListener(text) if text else None
    match = findMatch([wanted], wanted.name, entry["kind"], entry["address"])
    if match is None:
        match = findMatch([wanted], entry["name"], entry["kind"], entry["address"])
    return match is not None, match


def adoptMetrics(generation: Any, entry: dict[str, Any], fd: int) -> Any:
    """
    Adopt the metrics listener a predecessor handed over (not accepting yet), or L{None} when
    our own C{--metrics} moves it elsewhere.

    @raise MetricsUnavailable: prometheus_client is not installed.
    """
    from graceful_plugin.listeners import adoptListener

    keep, spec = keepMetrics(generation.settings.metrics, entry)
    if not keep:
        return None
    name = spec.name if spec is not None else entry["name"]
    port = adoptListener(
        generation.reactor, fd, entry["kind"], metricsFactory(generation), name, spec=spec
    )
    port.role = METRICS_ROLE
    return port


def openMetrics(generation: Any, ports: list[Any]) -> Any:
    """
    Bind our own C{--metrics} listener when the predecessor handed over none at its address;
    L{None} when there is nothing to bind.
    """
    if generation.settings.metrics is None or any(
        getattr(port, "role", "") == METRICS_ROLE for port in ports
    ):
        return None
    return bindMetrics(generation)


def holdMetrics(ports: list[Any]) -> None:
    """
    A successor does not answer scrapes until its predecessor has confirmed the handoff and
    handed its counters over: a scraper never sees the figures of a successor that is rolled
    back (the scrapes wait in the socket's queue meanwhile, a millisecond or so).
    """
    for port in ports:
        if getattr(port, "role", "") == METRICS_ROLE:
            port.pauseAccepting()


def releaseMetrics(ports: list[Any]) -> None:
    """
    Answer scrapes: the handoff is confirmed and the counters continue.
    """
    for port in ports:
        if getattr(port, "role", "") == METRICS_ROLE:
            port.resumeAccepting()
