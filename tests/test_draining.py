"""
The view of draining generations (L{graceful_plugin.draining}): deterministic, on a L{Clock}, and
through a L{GracefulServer} on a memory reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from graceful_plugin.control import (
    PROTOCOL_VERSION,
    Accepting,
    Commit,
    Hello,
    ReportSessions,
    StandDown,
    Status,
)
from graceful_plugin.draining import PRUNE_INTERVAL, DrainingView
from tests.test_control import ControlTestCase


def entry(pid: int, generation: int, sessions: int = 1, since: float | None = None) -> dict:
    found: dict[str, Any] = {
        "pid": pid,
        "generation": generation,
        "state": "draining",
        "sessions": sessions,
    }
    if since is not None:
        found["since"] = since
    return found


class View:
    def __init__(self) -> None:
        self.clock = Clock()
        self.live = {1, 2, 3}
        self.gone: list[tuple[int, float]] = []
        self.view = DrainingView(
            self.clock,
            alive=lambda pid: pid in self.live,
            onGone=lambda e, seconds: self.gone.append((e["pid"], seconds)),
            ownPid=99,
        )


def test_olderGenerationStaysWhenTheMiddleOneExits() -> None:
    """
    When the link of a middle generation closes, the generation that reported through it is
    still listed (and counted) while its process lives, and leaves the view once it is dead.
    """
    v = View()
    middle = object()
    v.view.addLink(middle)
    v.view.report(middle, [entry(2, 2, 0), entry(1, 1, 1)])
    assert v.view.count() == 2
    v.live.discard(2)
    assert v.view.linkClosed(middle)
    assert v.view.entries() == [entry(1, 1, 1)]
    assert v.view.count() == 1
    assert [pid for pid, _ in v.gone] == [2]
    v.live.discard(1)
    v.clock.advance(PRUNE_INTERVAL)
    assert v.view.entries() == []
    assert v.view.count() == 0
    assert [pid for pid, _ in v.gone] == [2, 1]


def test_directReportReplacesTheRememberedEntry() -> None:
    """
    A remembered generation that reports on a link of its own is listed once, with what it
    reports now, and is not lost when it is no longer remembered.
    """
    v = View()
    middle, direct = object(), object()
    v.view.report(middle, [entry(2, 2, 0), entry(1, 1, 5)])
    v.view.linkClosed(middle)
    v.view.report(direct, [entry(1, 1, 4)])
    assert v.view.entries() == [entry(1, 1, 4)]
    assert v.view.count() == 1
    v.clock.advance(PRUNE_INTERVAL * 3)
    assert v.view.entries() == [entry(1, 1, 4)]
    assert [pid for pid, _ in v.gone] == [2]


def test_unreportedLinkCountsAsOne() -> None:
    """
    A predecessor link that has not reported yet counts as one draining generation (so that
    --max-draining holds from the first moment), and lists nothing.
    """
    v = View()
    v.view.addLink(object())
    assert v.view.count() == 1
    assert v.view.entries() == []


def test_ownPidAndMissingOptionalFieldsLeftOut() -> None:
    """
    Our own pid is never listed (a report that loops back), and optional fields an older
    generation did not send (None) are left out of the entries.
    """
    v = View()
    link = object()
    v.view.report(link, [{**entry(3, 3), "since": None, "listeners": None}, entry(99, 9)])
    assert v.view.entries() == [entry(3, 3)]


def test_drainTimeFromTheReportedStartOfTheDrain() -> None:
    """
    A generation that leaves the view drained for what it last reported plus the time since
    that report.
    """
    v = View()
    link = object()
    v.view.report(link, [entry(3, 3, since=2.5)])
    v.clock.advance(4.0)
    v.view.linkClosed(link)
    assert v.gone == [(3, 6.5)]


def test_drainTimeWithoutReportedStart() -> None:
    """
    From a generation that does not say since when it drains (an older version), the drain
    time runs from its first report.
    """
    v = View()
    link = object()
    v.view.report(link, [entry(3, 3)])
    v.clock.advance(1.0)
    v.view.report(link, [entry(3, 3, sessions=0)])
    v.clock.advance(2.0)
    v.view.report(link, [])
    assert v.gone == [(3, 3.0)]


class ServerViewTests(ControlTestCase):
    """
    The serving generation's view, fed over its control socket.
    """

    def test_farGenerationReportsDirectly(self) -> None:
        """
        A draining generation that connects to the control socket and reports is listed in
        Status and counted by --max-draining; its link gone, it is still listed while its
        process lives.
        """
        alive = {7}
        self.server.draining.alive = lambda pid: pid in alive
        far, _, pump = self.connect()
        far.callRemote(ReportSessions, generations=[entry(7, 1, 2, since=3.0)])
        pump.flush()
        status = self.call(pump, far, Status)
        self.assertEqual(
            [(d["pid"], d["sessions"]) for d in status["draining"]],
            [(7, 2)],
        )
        self.assertEqual(status["drainingGenerations"], 1)
        self.assertEqual(self.server.drainingGenerations(), 1)
        far.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(self.server.drainingGenerations(), 0)

    def test_drainingGenerationReportsToTheControlPathWhenItsSuccessorGoes(self) -> None:
        """
        After a confirmed handoff, a draining generation told to stand down (a newer one took
        over from its successor) that then loses its successor's link connects to the control
        path, to report to whoever serves now.
        """
        self.web.sessions.opened(object())  # a session keeps us draining
        successor, _, pump = self.connect()
        self.call(pump, successor, Hello, version=PROTOCOL_VERSION, pid=4242, standby=True)
        self.takeAll(pump, successor)
        self.call(pump, successor, Commit)
        self.call(pump, successor, Accepting)
        self.assertEqual(self.state(), "draining")
        self.call(pump, successor, StandDown, reason="generation 3 takes over")
        self.assertEqual(self.state(), "retiring")
        before = len(self.reactor.unixClients)
        successor.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.unixClients), before + 1)
        self.assertEqual(self.reactor.unixClients[-1][0], self.settings.controlPath)

    def test_lastReportSaysTerminatedAndHowLong(self) -> None:
        """
        A draining generation whose last session ends tells its successor one last time, in
        state terminated, with how long it drained and the generations still draining behind
        it.
        """
        # A link that has closed already (nothing to tell it when we hand over in turn).
        older = _ClosedLink()
        self.server.draining.alive = lambda pid: True
        self.server.adoptPredecessorLink(older)  # type: ignore[arg-type]
        self.server.responder.reportSessions(older, [entry(5, 0, 1)])  # type: ignore[arg-type]
        reports: list[list[dict[str, Any]]] = []

        session = object()
        self.web.sessions.opened(session)
        successor, _, pump = self.connect()
        original = successor.locateResponder

        def locate(name: bytes) -> Any:
            if name == b"ReportSessions":

                def responder(box: Any) -> Any:
                    parsed = ReportSessions.parseArguments(box, successor)
                    reports.append(parsed["generations"])
                    return {}

                return responder
            return original(name)

        successor.locateResponder = locate  # type: ignore[method-assign]
        self.hello(pump, successor)
        self.takeAll(pump, successor)
        self.call(pump, successor, Commit)
        self.call(pump, successor, Accepting)
        self.reactor.advance(0.5)
        pump.flush()
        self.web.sessions.closed(session)
        pump.flush()
        self.assertEqual(reports[-1][0]["state"], "terminated")
        self.assertGreaterEqual(reports[-1][0]["since"], 0.0)
        self.assertEqual(reports[-1][0]["sessions"], 0)
        self.assertEqual([e["pid"] for e in reports[-1][1:]], [5])


class _ClosedLink:
    """
    A predecessor's link that has closed already.
    """

    transport = None


class _Reporter:
    """
    A draining generation as L{Upstream} sees it.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.reporting = True
        self.links: list[Any] = []

    def stillReporting(self) -> bool:
        return self.reporting

    def reportTo(self, link: Any) -> None:
        self.links.append(link)


def test_upstreamRetriesUntilItConnects() -> None:
    """
    L{Upstream} connects to the control path at once when its link is lost, tries again every
    interval while the connection fails (logging once), reports on the connection it gets, and
    stops trying when its generation no longer reports.
    """
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from graceful_plugin.control import ClientHandler, ControlProtocol
    from graceful_plugin.draining import Upstream

    reactor = MemoryReactorClock()
    reporter = _Reporter(reactor)
    upstream = Upstream(reporter, lambda: ControlProtocol(ClientHandler()), "/tmp/c.sock", 1.0)
    upstream.lost()
    reactor.advance(0)
    assert [c[0] for c in reactor.unixClients] == ["/tmp/c.sock"]
    factory = reactor.unixClients[0][1]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    reactor.advance(0.5)
    assert len(reactor.unixClients) == 1
    reactor.advance(0.5)
    assert len(reactor.unixClients) == 2
    factory = reactor.unixClients[1][1]
    protocol = factory.buildProtocol(None)
    from twisted.internet.testing import StringTransport

    protocol.makeConnection(StringTransport())
    assert reporter.links == [protocol._wrappedProtocol]
    assert isinstance(reporter.links[0], ControlProtocol)
    reporter.reporting = False
    upstream.lost()
    reactor.advance(5)
    assert len(reactor.unixClients) == 2


def test_listenerDetailFitsOneAMPValue() -> None:
    """
    Entries keep their sessions by listener while the detail fits the budget; past it they
    keep their totals only, so that a report or a status of many generations with many
    listeners still fits one AMP value.
    """
    from graceful_plugin.draining import fitEntries

    detail = [{"name": f"listener-{i:03}", "sessions": 1} for i in range(50)]
    entries = [{**entry(pid, pid, 50), "listeners": detail} for pid in range(1, 6)]
    fitted = fitEntries(entries, budget=2 * sum(len(d["name"]) + 40 for d in detail))
    assert [("listeners" in e) for e in fitted] == [True, True, False, False, False]
    assert [e["sessions"] for e in fitted] == [50] * 5
    assert "listeners" in entries[4]
