"""
The leader's side of its worker processes: start each one, follow it to its end, and wire a
L{graceful_plugin.workers.WorkerGroup} of them into a generation.

A worker is never forked from this process (its reactor runs: the epoll descriptor and the
thread pool would be shared).  When the generation is connected to the fork server
(L{graceful_plugin.forkclient}), a worker is a fork of it, given the same descriptors at the
same numbers (stdio, the AMP link's socketpair, the listening sockets, the balance table) and
the same environment and argument as a full start: the interpreter, Twisted and graceful are
imported already, and the worker loads the application itself.  Otherwise (no fork server yet,
as for a first generation's first workers, or the fork failed: the log says why) it is started
the Twisted way, C{reactor.spawnProcess} with the descriptors in C{childFDs}.  Either way the
leader hears of its end with its exit status, and can signal it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
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
        if self.worker.link is self:
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
        #: Whether it was told to die (before its process was there, perhaps).
        self._killed = False

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
        self.end(describeStatus(reason))

    def end(self, status: str) -> None:
        """
        The process has ended (or was never started), as C{status} says.
        """
        if self.ended.called:
            return
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()
        if not self.ready.called:
            self.ready.errback(WorkerFailed(status))
        self.ended.callback(status)

    def forked(self, process: Any) -> None:
        """
        The fork server forked us as C{process} (a L{graceful_plugin.forkclient.ForkedProcess}:
        it signals the process, and tells its exit status).
        """
        self.pid = process.pid
        self.makeConnection(process)
        process.whenExited().addCallback(lambda code: self.end(describeExitCode(code)))
        if self._killed:
            self.kill()

    def command(self, name: str) -> Deferred[None]:
        link = self.link
        if link is None or link.transport is None:
            return fail(WorkerFailed(f"worker {self.index} (pid {self.pid}) has no link"))
        return link.callRemote(COMMANDS[name]).addCallback(lambda _: None)

    def kill(self) -> None:
        self._killed = True
        if self.transport is None:
            return  # (being forked: killed once it is)
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


def describeExitCode(code: int | None) -> str:
    """
    An exit status as the fork server reports it (negative: the signal) in the words of
    L{describeStatus}.
    """
    if code is None:
        return "exit status unknown (the fork server had gone)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


#: The process name of a worker forked by the fork server (C{ps -o comm}, C{pgrep}).
FORKED_NAME = "graceful-worker"

#: The environment variable that has workers started in full even with a fork server
#: (C{off}), to compare.
ENV_FORK_WORKERS = "GRACEFUL_FORK_WORKERS"


def forkWorkers(env: Mapping[str, str] | None = None) -> bool:
    """
    Whether workers are forked from the fork server when there is one (unless
    C{GRACEFUL_FORK_WORKERS=off}).
    """
    value = (os.environ if env is None else env).get(ENV_FORK_WORKERS, "")
    return value.strip().lower() not in ("off", "0", "no", "false")


def spawnWorker(
    reactor: Any,
    index: int,
    report: Callable[[int], None],
    listeners: list[dict[str, Any]],
    application: list[str] | None,
    generation: int,
    drainTimeout: float,
    board: Board | None = None,
    forker: Any = None,
) -> WorkerProcess:
    """
    Start worker C{index} (at idle priority; it restores its own before it says it is ready):
    a fork of the fork server when C{forker} is connected to one, else a full start.

    @param listeners: one entry per listening socket: C{fd} (ours, duplicated into the
        worker), C{kind}, C{name} and C{spec}.
    @param board: the group's balance table, shared with the worker (or C{None}).
    @param forker: the generation's L{graceful_plugin.forkclient.ForkLauncher}, or C{None}.
    """
    worker = WorkerProcess(index, report)
    start = _WorkerStart(reactor, worker, listeners, application, generation, drainTimeout, board)
    link = getattr(forker, "link", None)
    if link is None or not link.connected or not forkWorkers():
        why = getattr(forker, "unavailable", "") or "there is no fork server"
        if link is not None and link.connected:
            why = f"{ENV_FORK_WORKERS}=off"
        if forker is not None:
            log.info("worker {index}: started in full: {reason}", index=index, reason=why)
        start.spawn()
        return worker
    start.fork(forker)
    return worker


log = Logger()


class _WorkerStart:
    """
    Starting one worker: its descriptors, its configuration, a fork or a full start.
    """

    def __init__(
        self,
        reactor: Any,
        worker: WorkerProcess,
        listeners: list[dict[str, Any]],
        application: list[str] | None,
        generation: int,
        drainTimeout: float,
        board: Board | None,
    ) -> None:
        self.reactor = reactor
        self.worker = worker
        self.listeners = listeners
        self.application = application
        self.generation = generation
        self.drainTimeout = drainTimeout
        self.board = board

    def _prepare(self, forked: bool) -> tuple[dict[int, int], WorkerConfig, socket.socket]:
        """
        The worker's descriptors (its number -> ours; its end of a new link is the caller's to
        close), its configuration, and our end of the link (adopted as the worker's link).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs: dict[int, int] = {1: 1, 2: 2, 3: theirs.detach()}
        entries = []
        for number, entry in enumerate(self.listeners, FIRST_LISTENER_FD):
            childFDs[number] = entry["fd"]
            entries.append({**entry, "fd": number})
        boardFD = None
        board = self.board
        if board is not None:
            boardFD = FIRST_LISTENER_FD + len(self.listeners)
            childFDs[boardFD] = board.fileno()
        config = WorkerConfig(
            index=self.worker.index,
            leader=os.getpid(),
            link=3,
            listeners=entries,
            application=self.application,
            generation=self.generation,
            drainTimeout=self.drainTimeout,
            board=boardFD,
            boardSize=board.size if board is not None else 0,
            forked=forked,
        )
        return childFDs, config, ours

    def _adopt(self, ours: socket.socket) -> None:
        worker = self.worker
        worker.link = LeaderLink(worker)
        try:
            self.reactor.adoptStreamConnection(
                ours.fileno(), socket.AF_UNIX, OneProtocol(worker.link)
            )
        finally:
            ours.close()

    def spawn(self) -> None:
        """
        A full start (C{reactor.spawnProcess}).
        """
        from graceful_plugin.takeover import idleChildren

        childFDs, config, ours = self._prepare(forked=False)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            with idleChildren():
                transport = self.reactor.spawnProcess(
                    self.worker,
                    sys.executable,
                    [sys.executable, "-m", "graceful_plugin.worker", config.toJSON()],
                    env=dict(os.environ),
                    path=os.getcwd(),
                    childFDs={**childFDs, 0: devnull},
                )
            self.worker.pid = transport.pid
            self._adopt(ours)
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(devnull)
            os.close(childFDs[3])

    def fork(self, forker: Any) -> None:
        """
        A fork of the fork server; a full start if it does not fork (the log says why).
        """
        childFDs, config, ours = self._prepare(forked=True)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self._adopt(ours)
            # (The fork server runs at idle priority: so does what it forks, until it is ready.)
            d = forker.forkProcess(
                [sys.executable, "-m", "graceful_plugin.worker", config.toJSON()],
                os.getcwd(),
                dict(os.environ),
                {**childFDs, 0: devnull},
                name=FORKED_NAME,
            )
        finally:
            # (The fork server's link holds copies until they have been sent.)
            os.close(devnull)
            os.close(childFDs[3])
        worker = self.worker

        def forked(process: Any) -> None:
            log.info(
                "worker {index} (pid {pid}) forked by the fork server pid {server}",
                index=worker.index,
                pid=process.pid,
                server=forker.serverPid,
            )
            worker.forked(process)

        def failed(failure: Failure) -> None:
            # Its link goes (a worker forked after all, late, finds it closed and exits).
            link, worker.link = worker.link, None
            if link is not None and link.transport is not None:
                link.transport.loseConnection()
            if worker._killed:
                worker.end("stopped before it was started")
                return
            log.warn(
                "worker {index}: started in full: the fork server did not fork it: {reason}",
                index=worker.index,
                reason=failure.getErrorMessage(),
            )
            try:
                self.spawn()
            except OSError as e:
                worker.end(f"could not be started: {e}")

        d.addCallbacks(forked, failed)


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
        forker: Any = None,
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
        #: The generation's fork server client (L{graceful_plugin.forkclient.ForkLauncher}):
        #: workers are forks of the fork server when it is connected.
        self.forker = forker
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

        extra = {"forker": self.forker} if self.forker is not None else {}

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
                **extra,
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

    def startService(self) -> None:
        super().startService()
        if self.forker is not None and self.count != 1:
            # A successor's fork server is there already (its predecessor's): connected by the
            # time the workers start, they are forks of it.  (A first generation finds none:
            # its first workers are started in full.)
            self.forker.attach()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if self.group is None and not self._retired:
            return None
        return self.abandon()
