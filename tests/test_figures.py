"""
The figures a generation counts and hands over (L{graceful_plugin.figures}), the Counters
command that carries them, and their Prometheus exposition (L{graceful_plugin.metrics}).
"""

from __future__ import annotations

import pytest

from graceful_plugin.control import (
    Abort,
    Commit,
    Counters,
    HandoffBusy,
    Hello,
    NoHandoff,
    ReportSessions,
)
from graceful_plugin.figures import COUNTERS_BATCH, DRAIN_BUCKETS, Figures, Histogram
from tests.test_control import ControlTestCase


def test_histogramBucketsAndSum() -> None:
    """
    Observations land in the first bucket whose bound they do not exceed (or above the last),
    and the cumulative buckets end with +Inf holding them all.
    """
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 9.0):
        h.observe(v)
    assert h.counts == [2, 1, 1]
    assert h.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert h.total == 12.0
    assert h.count == 4


def test_histogramAddsOnlyTheSameBuckets() -> None:
    """
    A predecessor's histogram is added when its buckets are ours, and refused (nothing added)
    when they differ or hold negative counts.
    """
    h = Histogram((1.0, 2.0))
    assert h.add([1.0, 2.0], [1, 2, 3], 7.5)
    assert not h.add([1.0, 5.0], [1, 1, 1], 1.0)
    assert not h.add([1.0, 2.0], [1, -1, 1], 1.0)
    assert h.counts == [1, 2, 3]
    assert h.total == 7.5


class _Port:
    def __init__(self, name: str, accepted: int) -> None:
        self.name = name
        self.sessions = type("S", (), {"accepted": accepted})()


def test_handedOverFiguresContinue() -> None:
    """
    Figures handed over in batches and taken by a successor continue: its connections are the
    predecessor's plus its own (also on listeners it no longer has), its handoffs and
    histograms include the predecessor's.
    """
    old = Figures()
    old.inherited = {"gone": 4}
    ports = [_Port(f"l{i:03}", i) for i in range(COUNTERS_BATCH + 10)]
    old.count("committed")
    old.count("refused")
    old.observe("drain", 3.0)
    answers = []
    start = 0
    while start >= 0:
        answer = old.batch(ports, start)
        answers.append(answer)
        start = answer["next"]
    assert len(answers) == 2
    assert "handoffs" not in answers[1]
    new = Figures()
    new.inherit(answers, generation=4)
    assert new.inheritedFrom == 4
    mine = [_Port("l005", 2)]
    totals = new.connections(mine)
    assert totals["gone"] == 4
    assert totals["l005"] == 5 + 2
    assert totals[f"l{COUNTERS_BATCH + 9:03}"] == COUNTERS_BATCH + 9
    assert new.handoffs == {"committed": 1, "rolled_back": 0, "refused": 1}
    assert new.histograms["drain"].count == 1
    assert new.histograms["drain"].bounds == DRAIN_BUCKETS


def test_handedOverConnectionsAreCountedOverEveryGeneration() -> None:
    """
    The connections handed over to the generations so far go to the successor with the first
    batch of figures, and it adds those it takes itself; a predecessor that does not count
    them (its answer has C{None}, as AMP fills in an optional field not sent) adds nothing.
    """
    old = Figures()
    for _ in range(3):
        old.tookHandedOver()
    new = Figures()
    new.inherit([old.batch([], 0)], generation=2)
    assert new.handedOver == 3
    new.tookHandedOver()
    assert new.handedOver == 4
    third = Figures()
    third.inherit([new.batch([], 0)], generation=3)
    assert third.handedOver == 4
    older = {**old.batch([], 0), "handedOver": None}
    fresh = Figures()
    fresh.inherit([older], generation=2)
    assert fresh.handedOver == 0


def test_takeoverCountedWithItsPhases() -> None:
    """
    A confirmed takeover counts one committed handoff and one observation of its total and of
    each phase.
    """
    figures = Figures()
    figures.observeTakeover(0.012, {"fds": 0.001, "adopt": 0.002, "ready": 0.0, "commit": 0.004})
    assert figures.handoffs["committed"] == 1
    assert figures.histograms["handoff"].total == 0.012
    assert figures.histograms["phase:commit"].count == 1
    assert figures.histograms["phase:confirm"].count == 0


class CountersTests(ControlTestCase):
    """
    The predecessor's side of the Counters command, and the outcomes it counts.
    """

    def test_countersAfterCommit(self) -> None:
        """
        Counters, sent right behind Commit, answers what every listener accepted (the control
        socket included) and the handoffs counted so far, a refused Hello among them.
        """
        for _ in range(3):
            self.web.sessions.opened(object())
        for _ in range(2):
            self.server.figures.tookHandedOver()
        successor, _, pump = self.connect()
        self.hello(pump, successor)
        other, _, pump2 = self.connect()
        self.fail_(pump2, other, Hello, version=1, pid=1).trap(HandoffBusy)
        self.takeAll(pump, successor)
        committing = successor.callRemote(Commit)
        counting = successor.callRemote(Counters, start=0)
        pump.flush()
        self.successResultOf(committing)
        answer = self.successResultOf(counting)
        self.assertEqual(answer["version"], 1)
        self.assertEqual(
            {c["listener"]: c["total"] for c in answer["connections"]},
            {"web": 3, "api": 0, "control": 0},
        )
        self.assertEqual(
            {h["outcome"]: h["total"] for h in answer["handoffs"]},
            {"committed": 0, "rolled_back": 0, "refused": 1},
        )
        self.assertEqual(answer["handedOver"], 2)
        self.assertEqual(answer["next"], -1)

    def test_countersOnlyForTheSuccessor(self) -> None:
        """
        Counters from a connection that is not the successor in a handoff is refused.
        """
        stranger, _, pump = self.connect()
        self.fail_(pump, stranger, Counters, start=0).trap(NoHandoff)

    def test_rollbackCounted(self) -> None:
        """
        A handoff the successor gives up on counts as rolled back, in Status as well.
        """
        successor, _, pump = self.connect()
        self.hello(pump, successor)
        self.call(pump, successor, Abort, reason="no")
        status = self.server.responder.status(None, 0)  # type: ignore[arg-type]
        self.assertEqual(
            {h["outcome"]: h["total"] for h in status["handoffs"]},
            {"committed": 0, "rolled_back": 1, "refused": 0},
        )


class ExpositionTests(ControlTestCase):
    """
    The serving generation's figures in prometheus_client's text format, parsed back.
    """

    def setUp(self) -> None:
        pytest.importorskip("prometheus_client")
        super().setUp()

    def scrape(self) -> dict:
        from prometheus_client import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        from graceful_plugin.metrics import makeRegistry

        text = generate_latest(makeRegistry(self.server)).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def test_sessionsOfEveryGeneration(self) -> None:
        """
        graceful_sessions has the serving generation's listeners and every draining
        generation's, by listener when it said, else under listener "*"; the accepted
        connections and the draining count are there too.
        """
        self.web.sessions.opened(object())
        far, _, pump = self.connect()
        far.callRemote(
            ReportSessions,
            generations=[
                {
                    "pid": 70,
                    "generation": 3,
                    "state": "draining",
                    "sessions": 2,
                    "listeners": [{"name": "web", "sessions": 2}],
                },
                {"pid": 60, "generation": 2, "state": "draining", "sessions": 5},
            ],
        )
        pump.flush()
        samples = self.scrape()
        self.assertEqual(
            samples[
                (
                    "graceful_sessions",
                    (("generation", "1"), ("listener", "web"), ("state", "serving")),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[
                (
                    "graceful_sessions",
                    (("generation", "3"), ("listener", "web"), ("state", "draining")),
                )
            ],
            2,
        )
        self.assertEqual(
            samples[
                (
                    "graceful_sessions",
                    (("generation", "2"), ("listener", "*"), ("state", "draining")),
                )
            ],
            5,
        )
        self.assertEqual(samples[("graceful_connections_total", (("listener", "web"),))], 1)
        self.assertEqual(samples[("graceful_draining_generations", ())], 2)
        self.assertEqual(samples[("graceful_state", (("state", "serving"),))], 1)
        self.assertEqual(samples[("graceful_handoff_seconds_count", ())], 0)
        self.assertIn(("process_cpu_seconds_total", ()), samples)


def test_metricsWithoutPrometheusClient(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    --metrics without prometheus_client installed is a usage error of one sentence saying what
    to install.
    """
    import sys

    from twisted.python import usage

    from graceful_plugin.tap import Options

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    options = Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["--port", "8080", "--metrics", "tcp:9100"])
    assert str(raised.value) == (
        "--metrics needs prometheus_client, which is not installed"
        " (pip install 'graceful[metrics]')"
    )


def test_metricsNameClash() -> None:
    """
    A --metrics listener may not share its name with a --port listener.
    """
    from twisted.python import usage

    from graceful_plugin.tap import Options

    pytest.importorskip("prometheus_client")
    with pytest.raises(usage.UsageError, match="also a --port's"):
        Options().parseOptions(["--port", "metrics=tcp:8080", "--metrics", "tcp:9100"])
