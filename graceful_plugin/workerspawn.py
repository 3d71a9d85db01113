"""
The leader's side of its worker processes: start each one the Twisted way
(C{reactor.spawnProcess}, the listening sockets in C{childFDs}, a private socketpair for the AMP
link), follow it to its end, and wire a L{graceful_plugin.workers.WorkerGroup} of them into a
generation.

A worker is never forked from this process (its reactor runs: the epoll descriptor and the
thread pool would be shared); it is a new interpreter that loads the application itself.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin.balance import HOLDING, Balancer, Board, balancedPorts, balanceWanted
from graceful_plugin.control import AdoptConnection, NoHandoff
from graceful_plugin.handover import relay
from graceful_plugin.lifecycle import Observer
from graceful_plugin.worker import WorkerConfig
from graceful_plugin.workercontrol import (
    COMMANDS,
    WORKER_PROTOCOL_VERSION,
    OneProtocol,
    WorkerReady,
    WorkerSessions,
    shareAccepts,
)
from graceful_plugin.workers import IWorker, WorkerFailed, WorkerGroup

#: The first descriptor number a worker's listeners get (0-2 are stdio, 3 is the link).
FIRST_LISTENER_FD = 4


def describeStatus(reason: Failure) -> str:
    """
    A process's end (from C{processEnded}) in words: C{exit status 0}, C{killed by SIGKILL}.
    """
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {getattr(value, 'exitCode', None) or 0}"


class LeaderLink(amp.AMP):
    """
    The leader's end of the link to one worker.
    """

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__()
        self.worker = worker

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.worker.linkLost(reason)

    @WorkerReady.responder
    def _ready(self, version: int, pid: int) -> dict[str, Any]:
        self.worker.readyReceived(version)
        return {}

    @WorkerSessions.responder
    def _sessions(self, sessions: int) -> dict[str, Any]:
        self.worker.report(sessions)
        return {}

    @AdoptConnection.responder
    def _adoptConnection(self, listener: str, address: str, fd: int) -> Deferred[Any]:
        # An idle connection of the worker's, for our successor (graceful_plugin.handover).
        relay = self.worker.relay
        if relay is None:
            os.close(fd)
            return fail(NoHandoff("this leader passes no connections on"))
        return relay(listener, address, fd)


@implementer(IWorker)
class WorkerProcess(ProcessProtocol):
    """
    One worker process: its link, its readiness and its end.
    """

    def __init__(self, index: int, report: Callable[[int], None]) -> None:
        self.index = index
        self.report = report
        self.pid = 0
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()
        self.link: LeaderLink | None = None
        #: Passes a connection the worker hands over on to our successor (L{handover.relay}).
        self.relay: Callable[[str, str, int], Deferred[Any]] | None = None

    def readyReceived(self, version: int) -> None:
        if self.ready.called:
            return
        if version != WORKER_PROTOCOL_VERSION:
            self.ready.errback(
                WorkerFailed(f"the worker speaks protocol {version}, we {WORKER_PROTOCOL_VERSION}")
            )
            return
        self.ready.callback(None)

    def linkLost(self, reason: Failure) -> None:
        # A worker that closes its link before it is ready is about to exit: its readiness
        # fails with its exit status (or at the group's ready deadline, if it does not exit).
        self.link = None

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()
        status = describeStatus(reason)
        if not self.ready.called:
            self.ready.errback(WorkerFailed(status))
        self.ended.callback(status)

    def command(self, name: str) -> Deferred[None]:
        link = self.link
        if link is None or link.transport is None:
            return fail(WorkerFailed(f"worker {self.index} (pid {self.pid}) has no link"))
        return link.callRemote(COMMANDS[name]).addCallback(lambda _: None)

    def kill(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


def spawnWorker(
    reactor: Any,
    index: int,
    report: Callable[[int], None],
    listeners: list[dict[str, Any]],
    application: list[str] | None,
    generation: int,
    drainTimeout: float,
    board: Board | None = None,
) -> WorkerProcess:
    """
    Start worker C{index} (at idle priority; it restores its own before it says it is ready).

    @param listeners: one entry per listening socket: C{fd} (ours, duplicated into the
        worker), C{kind}, C{name} and C{spec}.
    @param board: the group's balance table, shared with the worker (or C{None}).
    """
    from graceful_plugin.takeover import idleChildren

    worker = WorkerProcess(index, report)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        childFDs: dict[int, Any] = {0: devnull, 1: 1, 2: 2, 3: theirs.fileno()}
        entries = []
        for number, entry in enumerate(listeners, FIRST_LISTENER_FD):
            childFDs[number] = entry["fd"]
            entries.append({**entry, "fd": number})
        boardFD = None
        if board is not None:
            boardFD = FIRST_LISTENER_FD + len(listeners)
            childFDs[boardFD] = board.fileno()
        config = WorkerConfig(
            index=index,
            leader=os.getpid(),
            link=3,
            listeners=entries,
            application=application,
            generation=generation,
            drainTimeout=drainTimeout,
            board=boardFD,
            boardSize=board.size if board is not None else 0,
        )
        with idleChildren():
            transport = reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "graceful_plugin.worker", config.toJSON()],
                env=dict(os.environ),
                path=os.getcwd(),
                childFDs=childFDs,
            )
        worker.pid = transport.pid
        worker.link = LeaderLink(worker)
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocol(worker.link))
    finally:
        os.close(devnull)
        ours.close()
        theirs.close()
    return worker


def listenerEntries(ports: list[Any]) -> list[dict[str, Any]]:
    """
    What a worker needs of each of our listeners: its descriptor, kind, name and ``--port``
    text (a TLS listener's key files are read by each worker itself).
    """
    entries = []
    for port in ports:
        spec = getattr(port, "spec", None)
        entries.append(
            {
                "fd": port.fileno(),
                "kind": port.kind,
                "name": port.name,
                "spec": spec.text if spec is not None else None,
            }
        )
    return entries


class WorkerSupervisor(Observer, service.Service):
    """
    The workers 1 .. N-1 of a generation, wired to it.

    A first generation starts them once it serves and tells them to accept once all are ready
    (one that cannot start them stops, exit status 1: it was asked for N processes).  A
    successor starts them with the listeners it received (L{startWith}), commits only once all
    are ready, and tells them to accept after the commit (L{resume}).  As a predecessor, the
    generation pauses them before it answers Commit (L{pause}), resumes them if the handoff is
    rolled back, and releases and drains them once the successor confirmed.  A stop stops them
    all, and the generation's process waits for them to exit.

    @ivar count: how many processes serve in the generation, the leader included.
    @ivar group: the L{WorkerGroup}, once started.
    """

    log = Logger()

    def __init__(
        self,
        count: int,
        application: list[str] | None,
        drainTimeout: float,
        reactor: Any = None,
        spawn: Callable[..., Any] = spawnWorker,
        sessionsChanged: Callable[[], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.count = count
        self.application = application
        self.drainTimeout = drainTimeout
        self.reactor = reactor
        self._spawn = spawn
        self._onSessions = sessionsChanged
        self.group: WorkerGroup | None = None
        #: This process's side of the group's balance (L{graceful_plugin.balance}), if any.
        self.balancer: Balancer | None = None
        self._boards: list[Board] = []
        #: Groups that let go of the listeners and drain out (a standby resumed without them).
        self._retired: list[WorkerGroup] = []
        self._stopped: Deferred[None] | None = None
        self._stopping = False
        #: The generation (ours) whose successor our workers' idle connections go to.
        self._handedTo: Any = None

    @property
    def active(self) -> bool:
        """
        Whether this generation has worker processes besides its leader.
        """
        return self.group is not None and len(self.group) > 0

    def startWith(self, ports: list[Any], generation: int) -> Deferred[None]:
        """
        Start the N-1 workers on C{ports} (our own listeners, not accepting).

        @return: fires when every worker is ready (none accepts yet); fails with
            L{WorkerFailed} when one cannot get ready, every worker stopped.
        """
        assert self.group is None, "a generation starts its workers once"
        listeners = listenerEntries(ports)
        board: Board | None = None
        if self.count > 1:
            shareAccepts(ports)
        if self.count > 1 and balanceWanted():
            # Each group its own table: a retired group's workers still write to theirs.
            board = Board.create(self.count)
            self._boards.append(board)
            if self.balancer is not None:
                self.balancer.stop()
            self.balancer = Balancer(board, 0, balancedPorts(ports), self.reactor)

        def spawn(index: int, report: Callable[[int], None]) -> Any:
            worker = self._spawn(
                self.reactor,
                index,
                report,
                listeners,
                self.application,
                generation,
                self.drainTimeout,
                board,
            )
            worker.relay = self.relayConnection
            ended = getattr(worker, "ended", None)
            if board is not None and ended is not None:
                # A worker that has gone neither accepts nor holds sessions any more.
                def gone(status: str) -> str:
                    board.clear(index)
                    return status

                ended.addCallback(gone)
            return worker

        def changed() -> None:
            if self._onSessions is not None:
                self._onSessions()

        self.group = WorkerGroup(
            max(self.count - 1, 0),
            spawn,
            self.reactor,
            stopTimeout=self.drainTimeout + 10.0,
            sessionsChanged=changed,
        )
        if self.count > 1:
            self.log.info("starting {count} workers", count=self.count - 1)
        return self.group.start()

    def resume(self) -> Deferred[None]:
        """
        Every worker accepts; fires once each acknowledged.
        """
        if self.group is None:
            return succeed(None)
        d = self.group.command("resume")
        self._balanceChanged()
        if self.active:
            d.addCallback(
                lambda _: self.log.info("{count} workers accepting", count=len(self.group or ()))
            )
        return d

    def pause(self) -> Deferred[None]:
        """
        No worker accepts; fires once each acknowledged, fails if one died or did not answer.
        """
        if self.group is None:
            return succeed(None)
        self._balanceChanged()
        return self.group.command("pause")

    def _balanceChanged(self) -> None:
        # Whether the leader accepts changed (no session did): the others read it on the board.
        if self.balancer is not None:
            self.balancer.changed()

    def serving(self, server: Any) -> None:
        if self.group is not None or self.count <= 1 or self._stopping:
            return
        d = self.startWith(server.ports, server.generation)
        d.addCallback(lambda _: self.resume())
        d.addErrback(lambda failure: self._cannotStart(server, failure))

    def _cannotStart(self, server: Any, failure: Failure) -> None:
        if self._stopping:
            return
        self.log.critical(
            "cannot start the workers: {reason}; stopping", reason=failure.getErrorMessage()
        )
        server.exitCode = 1
        server.stopGracefully()

    def handoffAborted(self, server: Any, pid: int, reason: str) -> None:
        # Rolled back, maybe after our workers paused for the commit: they accept again.
        if self.active and not self._stopping:
            self.resume().addErrback(
                lambda f: self.log.warn("after the rollback: {reason}", reason=f.getErrorMessage())
            )

    def relayConnection(self, listener: str, address: str, fd: int) -> Deferred[Any]:
        """
        Pass an idle connection a worker hands over on to the successor that took over from us
        (L{graceful_plugin.handover.relay}); refused when there is none.
        """
        server = self._handedTo
        return relay(server.successorLink() if server is not None else None, listener, address, fd)

    def handoffCommitted(self, server: Any, pid: int) -> None:
        # The successor accepts: every worker lets go of the listeners and drains (handing its
        # idle connections over through us).
        self._handedTo = server
        if not self.active:
            return
        if self.balancer is not None:
            self.balancer.stop()
        group = self.group
        assert group is not None
        d = group.command("release")
        d.addBoth(lambda _: group.command("drain"))
        d.addErrback(
            lambda f: self.log.warn("draining the workers: {reason}", reason=f.getErrorMessage())
        )

    def resumed(self, server: Any, reason: str) -> None:
        # We stood by for a successor that confirmed and is now lost: we serve again.  Our
        # workers let go of the listeners and drain since the confirmation, so a new group takes
        # their place (the old one drains out); the leader accepts alone meanwhile.
        if self.group is None or self._stopping or self.count <= 1:
            return
        retired = self.group
        self._retired.append(retired)
        self.group = None
        if self._boards:
            # Its table goes once its last worker has (they write to it until then).
            board = self._boards.pop()
            retired.whenEnded().addCallback(lambda _: board.close())
        self.log.info("serving again: starting {count} workers", count=self.count - 1)
        d = self.startWith(server.ports, server.generation)
        d.addCallback(lambda _: self.resume())
        d.addErrback(
            lambda f: self.log.warn(
                "serving again without workers: {reason}", reason=f.getErrorMessage()
            )
        )

    def describe(self) -> list[dict[str, Any]]:
        """
        One entry per worker besides the leader (see L{WorkerGroup.describe}), each with its
        L{balanceOf}.
        """
        if self.group is None:
            return []
        entries = self.group.describe()
        for entry in entries:
            entry.update(self.balanceOf(entry["index"]))
        return entries

    def balanceOf(self, index: int) -> dict[str, Any]:
        """
        What the group's balance table says of the process at C{index} (0: the leader):
        C{holding}, whether it holds accepting now, and C{holds}, how many times its place of
        the group held; empty when the group does not balance (one process, or
        C{GRACEFUL_BALANCE=off}).
        """
        if self.group is None or not self._boards or not 0 <= index < self._boards[-1].size:
            return {}
        board = self._boards[-1]
        _, state = board.read()[index]
        return {"holding": state == HOLDING, "holds": board.holds()[index]}

    @property
    def sessions(self) -> int:
        """
        The live sessions of every worker but the leader.
        """
        current = self.group.sessions if self.group is not None else 0
        return current + sum(group.sessions for group in self._retired)

    def abandon(self) -> Deferred[None]:
        """
        Stop every worker (a successor stepping back); fires when all have ended.
        """
        if self.balancer is not None:
            self.balancer.stop()
        groups = [group for group in [self.group, *self._retired] if group is not None]
        if not groups:
            self._closeBoards()
            return succeed(None)
        if self._stopped is None:
            self._stopped = DeferredList([group.stop() for group in groups]).addCallback(
                lambda _: self._closeBoards()
            )
        return self._stopped

    def _closeBoards(self) -> None:
        boards, self._boards = self._boards, []
        for board in boards:
            board.close()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if self.group is None and not self._retired:
            return None
        return self.abandon()
