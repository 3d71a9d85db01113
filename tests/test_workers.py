"""
The leader's view of its workers (L{graceful_plugin.workers.WorkerGroup}), driven by fake
workers and a L{Clock}: starting together, group commands acknowledged by every worker, failures
at every step, replacement with backoff, and the session sum.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.workers import IWorker, WorkerFailed, WorkerGroup

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult


@implementer(IWorker)
class FakeWorker:
    """
    A worker whose readiness, acknowledgements and end the test decides.
    """

    def __init__(self, pid: int, index: int, report: Callable[[int], None]) -> None:
        self.pid = pid
        self.index = index
        self.report = report
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self.commands: list[tuple[str, Deferred[None]]] = []
        self.killed = False

    def command(self, name: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.commands.append((name, d))
        return d

    def kill(self) -> None:
        self.killed = True
        if not self.ended.called:
            self.ended.callback("killed by signal 9")

    def ack(self, name: str) -> None:
        """
        Acknowledge the oldest unanswered C{name}.
        """
        for n, d in self.commands:
            if n == name and not d.called:
                d.callback(None)
                return
        raise AssertionError(f"no {name} pending in {self.commands}")

    def die(self, status: str = "exit status 1") -> None:
        self.ended.callback(status)

    def pending(self) -> list[str]:
        return [n for n, d in self.commands if not d.called]


class Spawner:
    """
    Starts fake workers, numbering their pids from 100.
    """

    def __init__(self) -> None:
        self.started: list[FakeWorker] = []

    def __call__(self, index: int, report: Callable[[int], None]) -> FakeWorker:
        worker = FakeWorker(100 + len(self.started), index, report)
        self.started.append(worker)
        return worker

    def live(self) -> list[FakeWorker]:
        return [w for w in self.started if not w.ended.called]


def makeGroup(count: int = 3, **kwargs: float) -> tuple[WorkerGroup, Spawner, Clock]:
    clock = Clock()
    spawner = Spawner()
    group = WorkerGroup(count, spawner, clock, **kwargs)  # type: ignore[arg-type]
    return group, spawner, clock


def startedGroup(count: int = 3, **kwargs: float) -> tuple[WorkerGroup, Spawner, Clock]:
    """
    A group whose workers are all ready and accepting.
    """
    group, spawner, clock = makeGroup(count, **kwargs)
    d = group.start()
    for worker in spawner.started:
        worker.ready.callback(None)
    successResultOf(d)
    resumed = group.command("resume")
    for worker in spawner.started:
        worker.ack("resume")
    successResultOf(resumed)
    return group, spawner, clock


def test_fakeProvidesTheInterface() -> None:
    """
    The fake worker provides L{IWorker}.
    """
    assert verifyObject(IWorker, FakeWorker(1, 1, lambda n: None))


def test_startSpawnsEveryWorkerAtOnce() -> None:
    """
    Starting spawns every worker before any is ready, and completes only when the last is ready.
    """
    group, spawner, clock = makeGroup(3)
    d = group.start()
    assert [w.index for w in spawner.started] == [1, 2, 3]
    spawner.started[0].ready.callback(None)
    spawner.started[2].ready.callback(None)
    assertNoResult(d)
    spawner.started[1].ready.callback(None)
    assert successResultOf(d) is None
    assert all(w.commands == [] for w in spawner.started), "nobody accepts before told to"


def test_emptyGroupStartsAtOnce() -> None:
    """
    A group of no workers (--workers 1) is ready at once and spawns nothing.
    """
    group, spawner, clock = makeGroup(0)
    successResultOf(group.start())
    successResultOf(group.command("pause"))
    successResultOf(group.stop())
    assert spawner.started == []


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_startFailsWhenAnyWorkerDiesAndStopsTheOthers(failing: int) -> None:
    """
    A worker that dies before it is ready fails the start, and every other worker is stopped
    (killed if it is not ready yet, told to stop if it is).
    """
    group, spawner, clock = makeGroup(3)
    d = group.start()
    others = [w for i, w in enumerate(spawner.started) if i != failing]
    others[0].ready.callback(None)
    spawner.started[failing].die("exit status 3")
    failure = failureResultOf(d, WorkerFailed)
    assert "exit status 3" in failure.getErrorMessage()
    assert others[0].pending() == ["stop"]
    assert others[1].killed
    ended = group.whenEnded()
    assertNoResult(ended)
    others[0].ack("stop")
    others[0].die("exit status 0")
    successResultOf(ended)
    assert len(spawner.started) == 3, "no replacement for a failed start"


def test_startFailsWhenAWorkersApplicationIsNotReady() -> None:
    """
    A worker whose readiness fails fails the start; it is killed.
    """
    group, spawner, clock = makeGroup(2)
    d = group.start()
    spawner.started[1].ready.errback(RuntimeError("no database"))
    failure = failureResultOf(d, WorkerFailed)
    assert "no database" in failure.getErrorMessage()
    assert spawner.started[1].killed
    assert spawner.started[0].killed


def test_startFailsAtTheReadyDeadline() -> None:
    """
    A worker not ready within the deadline fails the start and is killed.
    """
    group, spawner, clock = makeGroup(2, readyTimeout=5.0)
    d = group.start()
    spawner.started[0].ready.callback(None)
    clock.advance(4.9)
    assertNoResult(d)
    clock.advance(0.2)
    failure = failureResultOf(d, WorkerFailed)
    assert "within 5 s" in failure.getErrorMessage()
    assert spawner.started[1].killed
    assert not clock.getDelayedCalls() or all(
        c.getTime() > clock.seconds() for c in clock.getDelayedCalls()
    )


@pytest.mark.parametrize("name", ["pause", "resume", "release", "drain", "stop"])
def test_commandCompletesWhenEveryWorkerAcknowledged(name: str) -> None:
    """
    A group command is sent to every worker and completes only after the last acknowledgement.
    """
    group, spawner, clock = startedGroup(3)
    d = group.command(name)
    for worker in spawner.started:
        assert worker.pending() == [name]
    spawner.started[2].ack(name)
    spawner.started[0].ack(name)
    assertNoResult(d)
    spawner.started[1].ack(name)
    assert successResultOf(d) is None


@pytest.mark.parametrize("name", ["pause", "resume", "release", "drain"])
def test_commandFailsWhenAWorkerDiesBeforeAcknowledging(name: str) -> None:
    """
    A worker that dies before acknowledging fails the command at once, with its exit status.
    """
    group, spawner, clock = startedGroup(2)
    d = group.command(name)
    spawner.started[0].ack(name)
    spawner.started[1].die("killed by signal 9")
    failure = failureResultOf(d, WorkerFailed)
    assert "killed by signal 9" in failure.getErrorMessage()
    assert f"pid {spawner.started[1].pid}" in failure.getErrorMessage()


def test_commandFailsAtTheDeadline() -> None:
    """
    A worker that does not acknowledge in time fails the command.
    """
    group, spawner, clock = startedGroup(2, commandTimeout=2.0)
    d = group.command("pause")
    spawner.started[0].ack("pause")
    clock.advance(2.1)
    failure = failureResultOf(d, WorkerFailed)
    assert "did not acknowledge pause within 2 s" in failure.getErrorMessage()


def test_commandFailsWhenAWorkerRefuses() -> None:
    """
    A worker answering a command with an error fails the group command.
    """
    group, spawner, clock = startedGroup(2)
    d = group.command("release")
    spawner.started[0].commands[-1][1].errback(RuntimeError("confused"))
    failure = failureResultOf(d, WorkerFailed)
    assert "confused" in failure.getErrorMessage()


def test_pauseWhileAWorkerIsBeingReplacedKeepsTheReplacementPaused() -> None:
    """
    A pause while a worker is being replaced completes with the others' acknowledgements, and
    the replacement, once ready, is not told to accept.
    """
    group, spawner, clock = startedGroup(2, backoff=1.0)
    spawner.started[0].die()
    d = group.command("pause")
    spawner.started[1].ack("pause")
    successResultOf(d)
    clock.advance(1.0)
    spawner.started[2].ready.callback(None)
    assert spawner.started[2].commands == []
    resumed = group.command("resume")
    assert spawner.started[2].pending() == ["resume"]
    spawner.started[1].ack("resume")
    spawner.started[2].ack("resume")
    successResultOf(resumed)


def test_retiringKillsAWorkerStillStarting() -> None:
    """
    A release while a replacement is still starting kills it (it never accepted) and waits for
    no acknowledgement from it.
    """
    group, spawner, clock = startedGroup(2, backoff=1.0)
    spawner.started[0].die()
    clock.advance(1.0)
    starting = spawner.started[2]
    d = group.command("release")
    assert starting.killed
    spawner.started[1].ack("release")
    successResultOf(d)


def test_unknownCommandFails() -> None:
    """
    A command the workers do not know fails without reaching them.
    """
    group, spawner, clock = startedGroup(1)
    failureResultOf(group.command("explode"), ValueError)
    assert spawner.started[0].pending() == []


def test_workerDyingWhileServingIsReplacedAndResumed() -> None:
    """
    A worker that dies while serving is replaced after the first backoff; the replacement is
    told to accept once ready, and the restart is counted.
    """
    group, spawner, clock = startedGroup(2, backoff=0.5)
    spawner.started[1].die("killed by signal 9")
    assert group.describe()[1]["pid"] == 0
    clock.advance(0.4)
    assert len(spawner.started) == 2
    clock.advance(0.1)
    assert len(spawner.started) == 3
    replacement = spawner.started[2]
    assert replacement.index == 2
    replacement.ready.callback(None)
    assert replacement.pending() == ["resume"]
    replacement.ack("resume")
    assert group.restarts == 1
    assert [e["restarts"] for e in group.describe()] == [0, 1]
    assert group.describe()[1]["pid"] == replacement.pid


def test_pausedGroupsReplacementStaysPaused() -> None:
    """
    A replacement in a paused group is not told to accept.
    """
    group, spawner, clock = startedGroup(1)
    d = group.command("pause")
    spawner.started[0].ack("pause")
    successResultOf(d)
    spawner.started[0].die()
    clock.advance(1)
    spawner.started[1].ready.callback(None)
    assert spawner.started[1].commands == []


def test_backoffDoublesWhileWorkersKeepDying() -> None:
    """
    A place whose workers keep dying waits twice as long each time, up to the maximum.
    """
    group, spawner, clock = startedGroup(1, backoff=1.0, maxBackoff=4.0)
    delays = []
    for _ in range(5):
        spawner.live()[0].die()
        before = len(spawner.started)
        waited = 0.0
        while len(spawner.started) == before:
            clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
        spawner.started[-1].ready.callback(None)
        spawner.started[-1].ack("resume")
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert group.restarts == 5


def test_backoffStartsAnewAfterAWorkerServedAWhile() -> None:
    """
    A worker that served longer than C{stableAfter} before dying is replaced after the first
    backoff again.
    """
    group, spawner, clock = startedGroup(1, backoff=1.0, stableAfter=10.0)
    spawner.started[0].die()
    clock.advance(1.0)
    spawner.started[1].ready.callback(None)
    spawner.started[1].ack("resume")
    clock.advance(11.0)
    spawner.started[1].die()
    clock.advance(1.0)
    assert len(spawner.started) == 3


def test_replacementThatCannotStartIsTriedAgain() -> None:
    """
    A replacement dying before it is ready is itself replaced, after a longer backoff.
    """
    group, spawner, clock = startedGroup(1, backoff=1.0)
    spawner.started[0].die()
    clock.advance(1.0)
    spawner.started[1].die("exit status 2")
    clock.advance(1.9)
    assert len(spawner.started) == 2
    clock.advance(0.1)
    assert len(spawner.started) == 3


def test_noReplacementOnceRetiring() -> None:
    """
    After release (and drain, stop) a worker that ends is not replaced, and a pending
    replacement is cancelled.
    """
    group, spawner, clock = startedGroup(2)
    spawner.started[0].die()
    d = group.command("release")
    spawner.started[1].ack("release")
    successResultOf(d)
    clock.advance(60)
    assert len(spawner.started) == 2
    ended = group.whenEnded()
    assertNoResult(ended)
    spawner.started[1].die("exit status 0")
    successResultOf(ended)


def test_stopWaitsForEveryWorkerToExit() -> None:
    """
    Stopping tells every worker to stop and completes when the last one has exited.
    """
    group, spawner, clock = startedGroup(2)
    d = group.stop()
    assert [w.pending() for w in spawner.started] == [["stop"], ["stop"]]
    spawner.started[0].ack("stop")
    spawner.started[0].die("exit status 0")
    assertNoResult(d)
    spawner.started[1].die("exit status 0")
    successResultOf(d)
    assert clock.getDelayedCalls() == []


def test_stopKillsWorkersThatDoNotExitInTime() -> None:
    """
    A worker still running at the stop deadline is killed.
    """
    group, spawner, clock = startedGroup(2, stopTimeout=5.0)
    d = group.stop()
    spawner.started[0].die("exit status 0")
    clock.advance(5.0)
    assert spawner.started[1].killed
    successResultOf(d)


def test_sessionsAreTheSumOfReports() -> None:
    """
    The group's sessions are the sum of what each worker last reported; a dead worker's count
    goes, and the change is announced.
    """
    changes = []
    group, spawner, clock = makeGroup(2, backoff=1.0)
    group._sessionsChanged = lambda: changes.append(group.sessions)
    d = group.start()
    for worker in spawner.started:
        worker.ready.callback(None)
    successResultOf(d)
    spawner.started[0].report(3)
    spawner.started[1].report(4)
    spawner.started[0].report(2)
    assert group.sessions == 6
    assert [e["sessions"] for e in group.describe()] == [2, 4]
    spawner.started[1].die()
    assert group.sessions == 2
    assert changes == [3, 7, 6, 2]
    # A report from a worker that has been replaced counts no more.
    spawner.started[1].report(9)
    assert group.sessions == 2


def test_describeShowsUptime() -> None:
    """
    Each worker's entry says how long it has been ready.
    """
    group, spawner, clock = makeGroup(1)
    d = group.start()
    clock.advance(2)
    spawner.started[0].ready.callback(None)
    successResultOf(d)
    clock.advance(3)
    assert group.describe() == [
        {"index": 1, "pid": 100, "sessions": 0, "restarts": 0, "uptime": 3.0}
    ]


def test_startFailsWhenAWorkerCannotBeSpawned() -> None:
    """
    A worker that cannot even be spawned fails the start with the reason, and the workers
    already spawned are stopped.
    """
    clock = Clock()
    spawner = Spawner()

    def spawn(index: int, report: Callable[[int], None]) -> FakeWorker:
        if index == 2:
            raise OSError("no such interpreter")
        return spawner(index, report)

    group = WorkerGroup(2, spawn, clock)  # type: ignore[arg-type]
    failure = failureResultOf(group.start(), WorkerFailed)
    assert "worker 2 could not be started: no such interpreter" in failure.getErrorMessage()
    assert spawner.started[0].killed
    successResultOf(group.whenEnded())


def test_statesFollowTheTableThroughAGroupsLife() -> None:
    """
    Each place of the group moves through SLOT_TRANSITIONS as its worker gets ready,
    acknowledges commands, dies while serving and is replaced, and ends once the group retires.
    """
    group, spawner, clock = makeGroup(2)
    d = group.start()
    assert group.states() == ["starting", "starting"]
    spawner.started[0].ready.callback(None)
    assert group.states() == ["ready", "starting"]
    spawner.started[1].ready.callback(None)
    successResultOf(d)
    resumed = group.command("resume")
    spawner.started[0].ack("resume")
    assert group.states() == ["serving", "ready"]  # (moved by each acknowledgement)
    spawner.started[1].ack("resume")
    successResultOf(resumed)
    spawner.started[1].die("killed by SIGKILL")
    assert group.states() == ["serving", "ended"]
    clock.advance(group.backoff)
    assert group.states() == ["serving", "starting"]
    spawner.started[2].ready.callback(None)
    spawner.started[2].ack("resume")
    assert group.states() == ["serving", "serving"]
    paused = group.command("pause")
    for worker in spawner.live():
        worker.ack("pause")
    successResultOf(paused)
    assert group.states() == ["paused", "paused"]
    released = group.command("release")
    for worker in spawner.live():
        worker.ack("release")
    successResultOf(released)
    assert group.states() == ["released", "released"]
    drained = group.command("drain")
    for worker in spawner.live():
        worker.ack("drain")
    successResultOf(drained)
    assert group.states() == ["draining", "draining"]
    spawner.started[0].die("exit status 0")
    assert group.states() == ["gone", "draining"]
    spawner.started[2].die("exit status 0")
    assert group.states() == ["gone", "gone"]
    successResultOf(group.whenEnded())


def test_aPlaceWaitingForItsReplacementIsRetiredByAStop() -> None:
    """
    A place whose worker died while serving goes from ended to gone when the group is stopped
    before the replacement starts: nobody takes it again.
    """
    group, spawner, clock = startedGroup(2)
    spawner.started[0].die("killed by SIGKILL")
    assert group.states() == ["ended", "serving"]
    group.stop()
    assert group.states() == ["gone", "serving"]
    spawner.started[1].ack("stop")
    assert group.states() == ["gone", "stopping"]
    spawner.started[1].die("exit status 0")
    assert group.states() == ["gone", "gone"]
    clock.advance(60)
    assert len(spawner.started) == 2


def test_everyStateIsReachableAndCanEnd() -> None:
    """
    In SLOT_TRANSITIONS every state is reached from the first, every state but gone can reach
    gone, and gone leads nowhere: a place never gets stuck, and a retired one stays retired.
    """
    from graceful_plugin.workers import SLOT_INITIAL, SLOT_TRANSITIONS

    edges: dict[str, set[str]] = {}
    for (state, _), after in SLOT_TRANSITIONS.items():
        edges.setdefault(state, set()).add(after)
        edges.setdefault(after, set())

    def reach(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for after in edges[todo.pop()]:
                if after not in seen:
                    seen.add(after)
                    todo.append(after)
        return seen

    assert reach(SLOT_INITIAL) == set(edges)
    assert all("gone" in reach(state) for state in edges)
    assert edges["gone"] == set()
