"""
The figures a generation counts and hands to its successor, so that no counter goes down at a
takeover: connections accepted by listener, handoffs by outcome, and the histograms of handoff
and drain times.  Plain numbers, no lock and no dependency: the Prometheus exposition
(L{graceful_plugin.metrics}) reads them at scrape time.

A listener counts its accepted connections itself, with one integer increment
(L{graceful_plugin.sessions.SessionTracker.accepted}); the figures add what the predecessors
counted before us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

#: The version of the figures a predecessor hands over (L{graceful_plugin.control.Counters}).
FIGURES_VERSION = 1

OUTCOMES = ("committed", "rolled_back", "refused")

#: The phases of a takeover, as the successor times them.
PHASES = ("fds", "adopt", "ready", "commit", "confirm")

#: Upper bounds of the handoff histograms, in seconds (a handoff proper takes milliseconds; a
#: slow application's readiness, seconds).
HANDOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Upper bounds of the drain histogram, in seconds.
DRAIN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

#: Listener entries per L{graceful_plugin.control.Counters} answer (one AMP value: 64 KiB).
COUNTERS_BATCH = 200


@dataclass
class Histogram:
    """
    Observations counted in buckets (each count is of its own bucket only; the last is above the
    last bound), with their sum.
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), -1)
        self.counts[index] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """
        The buckets as Prometheus has them: (upper bound, observations at or below it).
        """
        result: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound == math.inf else repr(bound), running))
        return result

    def add(self, bounds: list[float], counts: list[int], total: float) -> bool:
        """
        Add a predecessor's histogram of the same buckets.

        @return: whether it had the same buckets (else nothing is added).
        """
        if tuple(bounds) != self.bounds or len(counts) != len(self.counts):
            return False
        if any(c < 0 for c in counts) or not math.isfinite(total):
            return False
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total
        return True


def _histograms() -> dict[str, Histogram]:
    histograms = {"handoff": Histogram(HANDOFF_BUCKETS), "drain": Histogram(DRAIN_BUCKETS)}
    for phase in PHASES:
        histograms[f"phase:{phase}"] = Histogram(HANDOFF_BUCKETS)
    return histograms


class Figures:
    """
    What one generation counted, plus what its predecessors handed over.

    @ivar inherited: connections accepted before us, by listener name.
    @ivar handoffs: handoffs by outcome (inherited ones included).
    @ivar histograms: C{handoff}, C{phase:NAME} and C{drain}.
    @ivar handedOver: idle connections a draining predecessor handed over to us, and to the
        generations before us (each generation counts those it took).
    @ivar inheritedFrom: the generation whose figures we continue, if any.
    """

    log = Logger()

    def __init__(self) -> None:
        self.inherited: dict[str, int] = {}
        self.handoffs: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.histograms = _histograms()
        self.handedOver = 0
        self.inheritedFrom: int | None = None

    def count(self, outcome: str) -> None:
        self.handoffs[outcome] += 1

    def observe(self, name: str, seconds: float) -> None:
        self.histograms[name].observe(seconds)

    def tookHandedOver(self) -> None:
        """
        We serve one more connection our draining predecessor handed over.
        """
        self.handedOver += 1

    def observeTakeover(self, total: float, phases: dict[str, float]) -> None:
        """
        Our own takeover was confirmed: count it, with its times in seconds.
        """
        self.count("committed")
        self.observe("handoff", total)
        for phase, seconds in phases.items():
            self.observe(f"phase:{phase}", seconds)

    def connections(self, ports: list[Any]) -> dict[str, int]:
        """
        Connections accepted by listener: ours on C{ports} plus what our predecessors counted.
        """
        totals = dict(self.inherited)
        for port in ports:
            totals[port.name] = totals.get(port.name, 0) + getattr(port.sessions, "accepted", 0)
        return totals

    # -- handing over ---------------------------------------------------------------------

    def batch(self, ports: list[Any], start: int) -> dict[str, Any]:
        """
        The answer to L{graceful_plugin.control.Counters} from index C{start}: a batch of the
        connection counters; the first batch also carries the handoffs and histograms.
        """
        items = sorted(self.connections(ports).items())
        chunk = items[start : start + COUNTERS_BATCH]
        nextStart = start + len(chunk)
        answer: dict[str, Any] = {
            "version": FIGURES_VERSION,
            "connections": [{"listener": name, "total": total} for name, total in chunk],
            "next": nextStart if nextStart < len(items) else -1,
        }
        if start == 0:
            answer["handoffs"] = [{"outcome": o, "total": n} for o, n in self.handoffs.items()]
            answer["handedOver"] = self.handedOver
            answer["histograms"] = [
                {"name": name, "bounds": list(h.bounds), "counts": h.counts, "sum": h.total}
                for name, h in self.histograms.items()
            ]
        return answer

    def inherit(self, answers: list[dict[str, Any]], generation: int) -> None:
        """
        Continue the figures of the predecessor (generation C{generation}) from its
        L{graceful_plugin.control.Counters} answers.
        """
        for answer in answers:
            for item in answer.get("connections") or []:
                if item["total"] >= 0:
                    name = item["listener"]
                    self.inherited[name] = self.inherited.get(name, 0) + item["total"]
            for item in answer.get("handoffs") or []:
                if item["outcome"] in self.handoffs and item["total"] >= 0:
                    self.handoffs[item["outcome"]] += item["total"]
            # (None from a predecessor that does not count them: AMP fills in what was not said.)
            handedOver = answer.get("handedOver")
            if isinstance(handedOver, int) and handedOver >= 0:
                self.handedOver += handedOver
            for item in answer.get("histograms") or []:
                histogram = self.histograms.get(item["name"])
                if histogram is None or not histogram.add(
                    item["bounds"], item["counts"], item["sum"]
                ):
                    self.log.warn(
                        "not continuing the predecessor's histogram {name}: other buckets",
                        name=item["name"],
                    )
        self.inheritedFrom = generation

    def totals(self) -> dict[str, Any]:
        """
        The figures for a status answer (the connections go with each listener).
        """
        return {
            "handoffs": [{"outcome": o, "total": n} for o, n in self.handoffs.items()],
            "handedOver": self.handedOver,
            "timings": [
                {"name": name, "count": h.count, "sum": h.total}
                for name, h in self.histograms.items()
            ],
        }
