"""
The leader's view of its workers: N processes started together, told together, replaced when
one dies while serving.

Nothing here starts a process or opens a socket: a worker is whatever the injected C{spawn}
returns (an L{IWorker}), and every deadline is a call on the injected clock, so that every path
(a worker dying while starting, while serving, while acknowledging a command) is tested with
fake workers and a L{twisted.internet.task.Clock}.  The processes themselves are started by
L{graceful_plugin.workerspawn}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

#: The commands a group obeys, each acknowledged by every worker.
COMMANDS = ("pause", "resume", "release", "drain", "stop")

#: What the leader knows of each place in its group, and what moves it from one state to the
#: next: C{(state, event): next state}.  The group follows this table and nothing else (an
#: event a state does not list leaves it as it is), and the docs draw the group's diagram from
#: it.  A worker acknowledging a command is the event named after the command (C{resumed},
#: C{paused}, C{released}, C{drained}, C{stopping}); C{ended} is the worker's process ending,
#: for whatever reason; an ended place is C{replaced} after a backoff while the group serves,
#: or C{retired} once the group releases, drains or stops (or never started).
SLOT_TRANSITIONS: dict[tuple[str, str], str] = {
    ("starting", "ready"): "ready",
    ("starting", "ended"): "ended",
    **{
        (state, event): after
        for state in ("ready", "serving", "paused")
        for event, after in (
            ("resumed", "serving"),
            ("paused", "paused"),
            ("released", "released"),
            ("drained", "draining"),
            ("stopping", "stopping"),
            ("ended", "ended"),
        )
        if after != state
    },
    ("released", "drained"): "draining",
    ("released", "stopping"): "stopping",
    ("released", "ended"): "ended",
    ("draining", "stopping"): "stopping",
    ("draining", "ended"): "ended",
    ("stopping", "ended"): "ended",
    ("ended", "replaced"): "starting",
    ("ended", "retired"): "gone",
}

#: The state of a new place.
SLOT_INITIAL = "starting"

#: The states of a worker that said it is ready and has not ended: it is told the group's
#: commands.
READY_STATES = frozenset({"ready", "serving", "paused", "released", "draining", "stopping"})

#: The event a worker's acknowledgement of each command is.
_ACKNOWLEDGED = {
    "resume": "resumed",
    "pause": "paused",
    "release": "released",
    "drain": "drained",
    "stop": "stopping",
}


class WorkerFailed(Exception):
    """
    A worker died, failed or missed its deadline; the message says which and why.
    """


class IWorker(Interface):
    """
    One worker process as its leader sees it.
    """

    pid = Attribute("The worker's process id.")
    ready = Attribute(
        "A Deferred that fires when the worker has adopted the listeners and its application is"
        " ready (it does not accept yet); it fails if the worker cannot get ready."
    )
    ended = Attribute(
        "A Deferred that fires with a description of the exit status (C{'exit status 0'},"
        " C{'killed by signal 9'}) when the process has ended; it never fails."
    )

    def command(name: str) -> Deferred[None]:
        """
        Send one of L{COMMANDS}; the Deferred fires when the worker acknowledged it.
        """

    def kill() -> None:
        """
        End the process at once (SIGKILL).
        """


#: What starts one worker: its index (1 .. N-1; the leader is 0) and the function to call
#: with its live session count whenever that changes.
Spawn = Callable[[int, Callable[[int], None]], IWorker]


@dataclass
class _Slot:
    """
    One place in the group, filled by successive worker processes.
    """

    index: int
    worker: Any = None
    #: Where this place is in L{SLOT_TRANSITIONS}.
    state: str = SLOT_INITIAL
    sessions: int = 0
    #: How many times this place's worker was replaced.
    restarts: int = 0
    #: Failures in a row, for the backoff (reset once a worker has served a while).
    failures: int = 0
    #: When the current worker became ready (the clock's seconds).
    since: float = 0.0
    replaceCall: Any = None
    readyCall: Any = None
    waiting: list[Deferred[None]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """
        Whether the worker said it is ready and has not ended.
        """
        return self.state in READY_STATES

    def move(self, event: str) -> str:
        """
        Follow C{event} in L{SLOT_TRANSITIONS} (an event the state does not list changes
        nothing); return the state now.
        """
        self.state = SLOT_TRANSITIONS.get((self.state, event), self.state)
        return self.state


class WorkerGroup:
    """
    The workers 1 .. N-1 of one generation (the leader itself is worker 0 and is not here).

    A group is started once (L{start}); it then obeys L{command}s, each complete only when every
    worker acknowledged it.  While the group serves, a worker that dies is replaced after an
    exponential backoff; once the group is told to release, drain or stop it replaces no one.

    @ivar restarts: how many workers were replaced in all.
    """

    log = Logger()

    def __init__(
        self,
        count: int,
        spawn: Spawn,
        clock: IReactorTime,
        readyTimeout: float = 30.0,
        commandTimeout: float = 10.0,
        stopTimeout: float = 70.0,
        backoff: float = 0.5,
        maxBackoff: float = 30.0,
        stableAfter: float = 10.0,
        sessionsChanged: Callable[[], None] | None = None,
    ) -> None:
        """
        @param count: how many workers besides the leader (0: an empty group).
        @param readyTimeout: seconds a worker has to get ready.
        @param commandTimeout: seconds each worker has to acknowledge a command.
        @param stopTimeout: seconds a stopped worker has to exit before it is killed.
        @param backoff: the first delay before replacing a dead worker; it doubles with each
            failure in a row, up to C{maxBackoff}.
        @param stableAfter: a worker that served this long before dying starts the backoff anew.
        @param sessionsChanged: called whenever a worker reports a new session count.
        """
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._spawn = spawn
        self._clock = clock
        self.readyTimeout = readyTimeout
        self.commandTimeout = commandTimeout
        self.stopTimeout = stopTimeout
        self.backoff = backoff
        self.maxBackoff = maxBackoff
        self.stableAfter = stableAfter
        self._sessionsChanged = sessionsChanged
        self.restarts = 0
        self._started = False
        #: Whether a replacement should accept once ready (the last of pause/resume).
        self._accepting = False
        #: Released, draining or stopping: nobody is replaced any more.
        self._retiring = False
        self._allEnded: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._slots)

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start every worker at once.

        @return: a Deferred that fires when every worker is ready (none accepts yet), or fails
            with L{WorkerFailed} as soon as one dies, fails or misses the deadline; then every
            other worker is stopped as well.
        """
        assert not self._started, "a group starts once"
        self._started = True
        waits = []
        for slot in self._slots:
            try:
                waits.append(self._fill(slot))
            except Exception as e:
                # (Nothing was started for this one: no interpreter to run, no descriptors.)
                waits.append(fail(WorkerFailed(f"worker {slot.index} could not be started: {e}")))
        if not waits:
            return succeed(None)
        done: Deferred[None] = Deferred()
        pending = [len(waits)]

        def oneReady(_: object) -> None:
            pending[0] -= 1
            if pending[0] == 0 and not done.called:
                self.log.info("{count} workers ready", count=len(self._slots))
                done.callback(None)

        def oneFailed(failure: Failure) -> None:
            if done.called:
                return
            self._retiring = True
            # The first failure is the one reported; stopping the others may end more.
            done.errback(failure)
            self.stop()

        for wait in waits:
            wait.addCallbacks(oneReady, oneFailed)
        return done

    def _fill(self, slot: _Slot) -> Deferred[None]:
        """
        Start a worker in C{slot}; the Deferred fires when it is ready.
        """
        worker = self._spawn(slot.index, lambda count: self._reported(slot, worker, count))
        slot.worker = worker
        slot.sessions = 0
        waiting: Deferred[None] = Deferred()

        def timedOut() -> None:
            slot.readyCall = None
            if not waiting.called:
                waiting.errback(
                    WorkerFailed(
                        f"worker {slot.index} (pid {worker.pid}) was not ready within"
                        f" {self.readyTimeout:g} s"
                    )
                )
                worker.kill()

        slot.readyCall = self._clock.callLater(self.readyTimeout, timedOut)

        def isReady(_: object) -> None:
            if slot.readyCall is not None:
                slot.readyCall.cancel()
                slot.readyCall = None
            if waiting.called or slot.worker is not worker:
                return
            slot.move("ready")
            slot.since = self._clock.seconds()
            self.log.info("worker {index} (pid {pid}) ready", index=slot.index, pid=worker.pid)
            waiting.callback(None)

        def notReady(failure: Failure) -> None:
            if slot.readyCall is not None:
                slot.readyCall.cancel()
                slot.readyCall = None
            if not waiting.called:
                waiting.errback(
                    WorkerFailed(
                        f"worker {slot.index} (pid {worker.pid}) could not get ready:"
                        f" {failure.getErrorMessage()}"
                    )
                )
                worker.kill()

        worker.ready.addCallbacks(isReady, notReady)
        worker.ended.addCallback(lambda status: self._ended(slot, worker, status, waiting))
        return waiting

    def _reported(self, slot: _Slot, worker: Any, count: int) -> None:
        if slot.worker is worker:
            slot.sessions = count
            if self._sessionsChanged is not None:
                self._sessionsChanged()

    # -- a worker ends ------------------------------------------------------------------------

    def _ended(self, slot: _Slot, worker: Any, status: str, waiting: Deferred[None]) -> None:
        if slot.readyCall is not None:
            slot.readyCall.cancel()
            slot.readyCall = None
        current = slot.worker is worker
        wasReady = slot.ready
        pending: list[Deferred[None]] = []
        if current:
            slot.worker = None
            slot.move("ended")
            slot.sessions = 0
            pending, slot.waiting = slot.waiting, []
        # The slot is empty before anyone hears of the end (a failed start stops the group).
        if not waiting.called:
            waiting.errback(
                WorkerFailed(
                    f"worker {slot.index} (pid {worker.pid}) ended before it was ready: {status}"
                )
            )
        if not current:
            return
        for d in pending:
            if not d.called:
                d.errback(WorkerFailed(f"worker {slot.index} (pid {worker.pid}) ended: {status}"))
        if self._sessionsChanged is not None:
            self._sessionsChanged()
        if self._retiring or not self._started:
            slot.move("retired")
            self.log.info(
                "worker {index} (pid {pid}) ended: {status}",
                index=slot.index,
                pid=worker.pid,
                status=status,
            )
            self._checkAllEnded()
            return
        served = self._clock.seconds() - slot.since if wasReady else 0.0
        if served >= self.stableAfter:
            slot.failures = 0
        slot.failures += 1
        delay = min(self.backoff * 2 ** (slot.failures - 1), self.maxBackoff)
        self.log.warn(
            "worker {index} (pid {pid}) died while serving: {status}; replacing it in {delay:g} s",
            index=slot.index,
            pid=worker.pid,
            status=status,
            delay=delay,
        )
        slot.replaceCall = self._clock.callLater(delay, self._replace, slot)

    def _replace(self, slot: _Slot) -> None:
        slot.replaceCall = None
        if self._retiring:
            slot.move("retired")
            self._checkAllEnded()
            return
        slot.move("replaced")
        slot.restarts += 1
        self.restarts += 1
        d = self._fill(slot)

        def joined(_: object) -> Deferred[None] | None:
            if self._accepting and not self._retiring:
                return self._tell(slot, "resume").addCallback(lambda _: accepting())
            return None

        def accepting() -> None:
            self.log.info(
                "worker {index} (pid {pid}) replaced: accepting",
                index=slot.index,
                pid=slot.worker.pid if slot.worker is not None else 0,
            )

        d.addCallback(joined)
        # A replacement that fails is replaced in turn (its end schedules the next try).
        d.addErrback(lambda f: self.log.warn("{reason}", reason=f.getErrorMessage()))

    # -- commands -----------------------------------------------------------------------------

    def command(self, name: str) -> Deferred[None]:
        """
        Tell every worker C{name} (one of L{COMMANDS}).

        @return: a Deferred that fires when every worker acknowledged, or fails with
            L{WorkerFailed} when one dies or does not answer within C{commandTimeout}.
        """
        if name not in COMMANDS:
            return fail(ValueError(f"unknown worker command {name!r}"))
        if name in ("pause", "resume"):
            self._accepting = name == "resume"
        else:
            self._retiring = True
            for slot in self._slots:
                if slot.replaceCall is not None:
                    slot.replaceCall.cancel()
                    slot.replaceCall = None
                    slot.move("retired")
        if name not in ("pause", "resume"):
            # A worker still starting never accepted: it has nothing to release or drain.
            for slot in self._slots:
                if slot.worker is not None and not slot.ready:
                    slot.worker.kill()
        # A worker still starting (or being replaced) accepts only once told to, and only if
        # the group accepts then: the command is for the ready ones.
        answers = [self._tell(slot, name) for slot in self._slots if slot.ready]
        result: Deferred[Any] = DeferredList(answers, fireOnOneErrback=True, consumeErrors=True)

        def firstError(failure: Failure) -> Failure:
            # DeferredList wraps the first failure: hand on the worker's own.
            return failure.value.subFailure  # type: ignore[no-any-return]

        return result.addCallbacks(lambda _: None, firstError)

    def _tell(self, slot: _Slot, name: str) -> Deferred[None]:
        worker = slot.worker
        done: Deferred[None] = Deferred()
        slot.waiting.append(done)

        def finished() -> None:
            if done in slot.waiting:
                slot.waiting.remove(done)
            if timer.active():
                timer.cancel()

        def timedOut() -> None:
            if not done.called:
                finished()
                done.errback(
                    WorkerFailed(
                        f"worker {slot.index} (pid {worker.pid}) did not acknowledge {name}"
                        f" within {self.commandTimeout:g} s"
                    )
                )

        timer = self._clock.callLater(self.commandTimeout, timedOut)

        # However it ends (an end of the worker errbacks it from outside), the timer goes.
        def untime(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(untime)

        def acknowledged(_: object) -> None:
            if not done.called:
                finished()
                if slot.worker is worker:
                    slot.move(_ACKNOWLEDGED[name])
                done.callback(None)

        def refused(failure: Failure) -> None:
            if not done.called:
                finished()
                done.errback(
                    WorkerFailed(
                        f"worker {slot.index} (pid {worker.pid}) failed {name}:"
                        f" {failure.getErrorMessage()}"
                    )
                )

        worker.command(name).addCallbacks(acknowledged, refused)
        return done

    # -- stopping -----------------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """
        Stop every worker gracefully (each releases its listeners, drains and exits); a worker
        still running after C{stopTimeout} is killed.

        @return: a Deferred that fires when every worker has ended.
        """
        self._retiring = True
        for slot in self._slots:
            if slot.replaceCall is not None:
                slot.replaceCall.cancel()
                slot.replaceCall = None
                slot.move("retired")
            worker = slot.worker
            if worker is None:
                continue
            if slot.ready:
                # Whether it acknowledges or not, its end is what we wait for.
                self._tell(slot, "stop").addErrback(lambda f: None)
            else:
                worker.kill()
        ended = self.whenEnded()
        live = [s.worker for s in self._slots if s.worker is not None]
        if live:
            killer = self._clock.callLater(self.stopTimeout, self._killAll)

            def allEnded(result: None) -> None:
                if killer.active():
                    killer.cancel()
                return result

            ended.addCallback(allEnded)
        return ended

    def _killAll(self) -> None:
        for slot in self._slots:
            if slot.worker is not None:
                self.log.warn(
                    "worker {index} (pid {pid}) did not exit within {timeout:g} s: killing it",
                    index=slot.index,
                    pid=slot.worker.pid,
                    timeout=self.stopTimeout,
                )
                slot.worker.kill()

    def whenEnded(self) -> Deferred[None]:
        """
        A Deferred that fires once no worker runs and none will be replaced.
        """
        d: Deferred[None] = Deferred()
        self._allEnded.append(d)
        self._checkAllEnded()
        return d

    def _checkAllEnded(self) -> None:
        if not self._allEnded:
            return
        if any(s.worker is not None or s.replaceCall is not None for s in self._slots):
            return
        if not self._retiring and self._started:
            return
        waiting, self._allEnded = self._allEnded, []
        for d in waiting:
            d.callback(None)

    # -- what status shows --------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        """
        The live sessions of every worker, as each last reported.
        """
        return sum(slot.sessions for slot in self._slots)

    def states(self) -> list[str]:
        """
        Where each place of the group is in L{SLOT_TRANSITIONS} (for the log and the tests).
        """
        return [slot.state for slot in self._slots]

    def describe(self) -> list[dict[str, Any]]:
        """
        One entry per worker: index, pid (0 while it is being replaced), sessions, restarts and
        how many seconds it has been ready (0 while it is not).
        """
        now = self._clock.seconds()
        return [
            {
                "index": slot.index,
                "pid": slot.worker.pid if slot.worker is not None else 0,
                "sessions": slot.sessions,
                "restarts": slot.restarts,
                "uptime": now - slot.since if slot.ready else 0.0,
            }
            for slot in self._slots
        ]
