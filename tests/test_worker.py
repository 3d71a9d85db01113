"""
A worker's own side (L{graceful_plugin.worker.Worker}) and the AMP link between a leader and a
worker, in-process: fake ports, a L{Clock}, and the two ends of the link connected with iosim.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from graceful_plugin.sessions import SessionTracker
from graceful_plugin.worker import Worker, WorkerConfig, WorkerLink
from graceful_plugin.workers import IWorker, WorkerFailed
from graceful_plugin.workerspawn import LeaderLink, WorkerProcess, describeStatus

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


class FakePort:
    """
    A listener that records what it was told.
    """

    def __init__(self) -> None:
        self.sessions = SessionTracker()
        self.accepting = False
        self.released = False
        self.held = False

    def hold(self, held: bool) -> None:
        self.held = held

    def pauseAccepting(self) -> None:
        self.accepting = False

    def resumeAccepting(self) -> None:
        if not self.released:
            self.accepting = True

    def release(self) -> None:
        self.accepting = False
        self.released = True


class FakeConnection:
    def __init__(self) -> None:
        self.aborted = False
        self.protocol = None

    def abortConnection(self) -> None:
        self.aborted = True


class StoppableClock(Clock):
    """
    A clock whose C{stop} is recorded, standing in for the reactor.
    """

    stopped = False

    def stop(self) -> None:
        self.stopped = True


def makeWorker(ports: int = 2, drainTimeout: float = 5.0) -> tuple[Worker, list[FakePort], Any]:
    clock = StoppableClock()
    fakes = [FakePort() for _ in range(ports)]
    return Worker(clock, fakes, 1, drainTimeout), fakes, clock


def test_configRoundTrips() -> None:
    """
    A worker's configuration survives its trip through the command line.
    """
    config = WorkerConfig(
        index=2,
        leader=10,
        link=3,
        listeners=[{"fd": 4, "kind": "tcp", "name": "web", "spec": None}],
        application=["wsgi", "shop.app"],
        generation=7,
        drainTimeout=3.0,
    )
    assert WorkerConfig.fromJSON(config.toJSON()) == config


@pytest.mark.parametrize("text", ["", "{", "[]", '{"index": 1}', '{"nonsense": 1}'])
def test_badConfigIsOneSentence(text: str) -> None:
    """
    A configuration that is not one raises ValueError with a sentence.
    """
    with pytest.raises(ValueError, match="not a worker configuration"):
        WorkerConfig.fromJSON(text)


def test_pauseAndResume() -> None:
    """
    Pause and resume reach every listener.
    """
    worker, ports, clock = makeWorker()
    worker.resume()
    assert all(p.accepting for p in ports)
    worker.pause()
    assert not any(p.accepting for p in ports)


def test_pauseResumeAndReleaseShowOnTheBalanceTable() -> None:
    """
    What the leader tells a worker shows at once in its slot of the group's balance table:
    accepting after resume, idle after pause, and idle for good once released.
    """
    from graceful_plugin.balance import ACCEPTING, IDLE, Balancer, Board

    worker, fakes, clock = makeWorker()
    board = Board.create(2)
    try:
        worker.balancer = Balancer(board, 1, fakes, clock)
        assert board.read()[1] == (0, IDLE)
        worker.resume()
        assert board.read()[1] == (0, ACCEPTING)
        worker.pause()
        assert board.read()[1] == (0, IDLE)
        worker.resume()
        fakes[0].sessions.opened(FakeConnection())
        assert board.read()[1] == (1, ACCEPTING)
        worker.release()
        fakes[0].sessions.opened(FakeConnection())
        assert board.read()[1] == (0, IDLE)
    finally:
        board.close()


def test_releaseNeverResumesAgain() -> None:
    """
    A released worker lets go of every listener and does not accept again when told to resume.
    """
    worker, ports, clock = makeWorker()
    worker.resume()
    worker.release()
    worker.resume()
    assert all(p.released and not p.accepting for p in ports)
    assert not clock.stopped


def test_stopWithoutSessionsExitsAtOnce() -> None:
    """
    A stop with no live session releases and exits (the reactor stops a turn later).
    """
    worker, ports, clock = makeWorker()
    worker.stop()
    assert all(p.released for p in ports)
    assert not clock.stopped
    clock.advance(0)
    assert clock.stopped
    assert worker.exitCode == 0


def test_drainWaitsForTheLastSession() -> None:
    """
    A draining worker exits when its last session ends, not before.
    """
    worker, ports, clock = makeWorker()
    a, b = FakeConnection(), FakeConnection()
    ports[0].sessions.opened(a)
    ports[1].sessions.opened(b)
    worker.stop()
    clock.advance(1)
    assert not clock.stopped
    ports[0].sessions.closed(a)
    clock.advance(1)
    assert not clock.stopped
    ports[1].sessions.closed(b)
    clock.advance(0)
    assert clock.stopped


def test_drainDeadlineAbortsWhatIsLeft() -> None:
    """
    At the drain deadline every session still open is aborted and the worker exits.
    """
    worker, ports, clock = makeWorker(drainTimeout=5.0)
    conn = FakeConnection()
    ports[0].sessions.opened(conn)
    worker.drain()
    clock.advance(4.9)
    assert not conn.aborted
    clock.advance(0.2)
    assert conn.aborted
    clock.advance(0)
    assert clock.stopped


def test_leaderGoneStopsTheWorker() -> None:
    """
    When the link to the leader closes, the worker releases, drains and exits.
    """
    worker, ports, clock = makeWorker()
    worker.resume()
    worker.leaderGone()
    assert all(p.released for p in ports)
    clock.advance(0)
    assert clock.stopped


def test_failExitsNonZero() -> None:
    """
    A worker that cannot start exits with status 1, having released its listeners.
    """
    worker, ports, clock = makeWorker()
    worker.fail("no database")
    clock.advance(0)
    assert clock.stopped and worker.exitCode == 1
    assert all(p.released for p in ports)


def linked(ports: int = 1) -> tuple[WorkerProcess, Worker, list[FakePort], Any, Any, list[int]]:
    """
    A leader's L{WorkerProcess} and a L{Worker} joined by their AMP link over iosim.
    """
    worker, fakes, clock = makeWorker(ports)
    reports: list[int] = []
    process = WorkerProcess(1, reports.append)
    process.pid = 4242
    leaderEnd, workerEnd, pump = connectedServerAndClient(
        lambda: WorkerLink(worker), lambda: LeaderLink(process)
    )
    worker.link = workerEnd
    process.link = leaderEnd
    return process, worker, fakes, clock, pump, reports


def test_workerProcessProvidesIWorker() -> None:
    """
    The leader's handle on a worker process provides L{IWorker}.
    """
    assert verifyObject(IWorker, WorkerProcess(1, lambda n: None))


@pytest.mark.parametrize(
    "name, accepting, released",
    [("pause", False, False), ("resume", True, False), ("release", False, True)],
)
def test_commandsOverTheLinkAreAcknowledged(name: str, accepting: bool, released: bool) -> None:
    """
    A command sent by the leader is carried out by the worker, and acknowledged after it.
    """
    process, worker, ports, clock, pump, reports = linked()
    if name == "pause":
        worker.resume()
    d = process.command(name)
    assertNoResult(d)
    pump.flush()
    successResultOf(d)
    assert ports[0].accepting is accepting
    assert ports[0].released is released


def test_stopOverTheLinkIsAcknowledgedThenExits() -> None:
    """
    Stop is acknowledged before the worker exits: it closes the link (flushing the answer) and
    stops once the link is closed.
    """
    process, worker, ports, clock, pump, reports = linked()
    d = process.command("stop")
    pump.flush()
    successResultOf(d)
    assert ports[0].released
    clock.advance(0)
    assert not clock.stopped
    pump.flush()
    assert process.link is None
    assert clock.stopped


def test_exitStopsAfterAWhileWhenTheLinkDoesNotClose() -> None:
    """
    A worker whose link never finishes closing stops all the same, two seconds later.
    """
    process, worker, ports, clock, pump, reports = linked()
    worker.stop()
    clock.advance(1.9)
    assert not clock.stopped
    clock.advance(0.1)
    assert clock.stopped


def test_readyAndSessionReportsReachTheLeader() -> None:
    """
    The worker's ready fires the leader's C{ready}; its session reports arrive, at most one
    every report interval.
    """
    from graceful_plugin.worker import REPORT_INTERVAL
    from graceful_plugin.workercontrol import WORKER_PROTOCOL_VERSION, WorkerReady

    process, worker, ports, clock, pump, reports = linked()
    worker.link.callRemote(WorkerReady, version=WORKER_PROTOCOL_VERSION, pid=1)
    pump.flush()
    successResultOf(process.ready)
    a, b = FakeConnection(), FakeConnection()
    ports[0].sessions.opened(a)
    ports[0].sessions.opened(b)
    clock.advance(REPORT_INTERVAL)
    pump.flush()
    assert reports == [2]


def test_readyFromAnotherVersionFails() -> None:
    """
    A worker speaking another link protocol version is not ready.
    """
    from graceful_plugin.workercontrol import WorkerReady

    process, worker, ports, clock, pump, reports = linked()
    worker.link.callRemote(WorkerReady, version=99, pid=1)
    pump.flush()
    failureResultOf(process.ready, WorkerFailed)


def test_linkLostBeforeReadyThenTheEndFailsReadyWithTheStatus() -> None:
    """
    A link that closes before the worker said ready fails its readiness once the process ends,
    with its exit status; commands fail at once; the worker side stops.
    """
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    process, worker, ports, clock, pump, reports = linked()
    process.link.transport.loseConnection()
    pump.flush()
    assertNoResult(process.ready)
    failureResultOf(process.command("pause"), WorkerFailed)
    process.processEnded(Failure(ProcessTerminated(signal=9)))
    assert "killed by SIGKILL" in failureResultOf(process.ready, WorkerFailed).getErrorMessage()
    assert successResultOf(process.ended) == "killed by SIGKILL"
    clock.advance(0)
    assert clock.stopped


def test_describeStatus() -> None:
    """
    A process's end is described as its exit status or the signal that killed it.
    """
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    assert describeStatus(Failure(ProcessDone(0))) == "exit status 0"
    assert describeStatus(Failure(ProcessTerminated(exitCode=3))) == "exit status 3"
    assert describeStatus(Failure(ProcessTerminated(signal=9))) == "killed by SIGKILL"


def test_sharedPortsAcceptABatchPerWakeUp() -> None:
    """
    A port of a group (L{shareAccepts}) accepts at most L{ACCEPT_BATCH} waiting connections per
    wake-up, leaving the rest of a burst to the other processes (and to its balance, which holds
    it once it has more than its share); a port of a single process takes them all.
    """
    import socket

    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock

    from graceful_plugin.listeners import adoptListener
    from graceful_plugin.workercontrol import ACCEPT_BATCH, shareAccepts

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(50)
    listening.setblocking(False)
    reactor = MemoryReactorClock()
    shared = adoptListener(reactor, listening.fileno(), "tcp", Factory.forProtocol(Protocol))
    alone = adoptListener(reactor, listening.fileno(), "tcp", Factory.forProtocol(Protocol))
    listening.close()
    clients = [
        socket.create_connection(("127.0.0.1", shared.getHost().port))
        for _ in range(ACCEPT_BATCH + 24)
    ]
    try:
        shareAccepts([shared])
        shared.doRead()
        assert shared.sessions.count == ACCEPT_BATCH
        alone.doRead()
        assert alone.sessions.count == 24
    finally:
        for client in clients:
            client.close()
        for port in (shared, alone):
            for transport in list(port.sessions._live):
                transport.abortConnection()
            port.release()
        reactor.advance(0)
