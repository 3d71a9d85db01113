"""
One worker process of a generation: ``python -m graceful_plugin.worker CONFIG``, started by its
leader with L{graceful_plugin.workerspawn.spawnWorker} (never forked from a running reactor).

It adopts the listening sockets it was given (not accepting), loads the application itself,
tells its leader it is ready over their private AMP link, and then does what the leader says.
When the leader is gone (the link closes, or, for a worker its leader started itself rather than
the fork server, C{PR_SET_PDEATHSIG} delivers SIGTERM) it releases its listeners, drains its
sessions and exits: a worker never serves on without its leader.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from graceful_plugin import heap
from graceful_plugin.handover import HandoverSender
from graceful_plugin.workercontrol import (
    WORKER_PROTOCOL_VERSION,
    Drain,
    OneProtocol,
    Pause,
    Release,
    Resume,
    StopWorker,
    WorkerReady,
    WorkerSessions,
    shareAccepts,
)

#: How often a worker reports its session count to its leader, at most.
REPORT_INTERVAL = 0.2

#: prctl(2)'s option to get a signal when the parent dies.
PR_SET_PDEATHSIG = 1


@dataclass
class WorkerConfig:
    """
    What a worker is started with, passed as one JSON argument.

    @ivar index: the worker's place in the group (1 .. N-1; the leader is 0).
    @ivar leader: the leader's pid (a worker the leader started itself exits at once if its
        parent is not this).
    @ivar link: the descriptor of the worker's end of the socketpair to its leader.
    @ivar listeners: one entry per listening socket: C{fd}, C{kind}, C{name} and C{spec} (the
        listener as a ``--port`` value, or C{None}).
    @ivar application: the application's kind and name (as L{graceful_plugin.apps}), or
        C{None} for the demo application.
    @ivar generation: the generation's number (the demo application shows it).
    @ivar drainTimeout: seconds sessions have to finish once draining.
    @ivar board: the descriptor of the group's balance table (L{graceful_plugin.balance.Board}),
        or C{None}.
    @ivar boardSize: how many slots that table has (the group's process count).
    @ivar forked: whether the worker is a fork of the fork server (its parent is that, not
        the leader: only the link closing tells it the leader has gone).
    """

    index: int
    leader: int
    link: int
    listeners: list[dict[str, Any]] = field(default_factory=list)
    application: list[str] | None = None
    generation: int = 1
    drainTimeout: float = 60.0
    board: int | None = None
    boardSize: int = 0
    forked: bool = False

    def toJSON(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def fromJSON(cls, text: str) -> WorkerConfig:
        """
        @raise ValueError: with a sentence, when C{text} is not a worker's configuration.
        """
        try:
            return cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a worker configuration: {e}") from None


def dieWithLeader(leader: int) -> bool:
    """
    Ask the kernel for SIGTERM when our parent dies, and check it has not died already.

    @return: whether our parent is still C{leader}.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the closing link is noticed all the same
    return os.getppid() == leader


class Worker:
    """
    A worker's own side: its listeners, its sessions, and its way out.

    @ivar exitCode: what the process exits with.
    """

    log = Logger()

    def __init__(self, reactor: Any, ports: list[Any], index: int, drainTimeout: float) -> None:
        self.reactor = reactor
        self.ports = ports
        self.index = index
        self.drainTimeout = drainTimeout
        self.link: WorkerLink | None = None
        #: The group's balance for this process (L{graceful_plugin.balance.Balancer}), if any.
        self.balancer: Any = None
        self.exitCode = 0
        self._draining = False
        self._released = False
        self._exiting = False
        self._reportCall: Any = None
        self._drainCall: Any = None
        self._stopCall: Any = None
        for port in ports:
            port.sessions.observe(self._sessionsChanged)

    def liveSessions(self) -> int:
        return sum(port.sessions.count for port in self.ports)

    def pause(self) -> None:
        for port in self.ports:
            port.pauseAccepting()
        self._balanceChanged()

    def resume(self) -> None:
        if self._released:
            return
        for port in self.ports:
            port.resumeAccepting()
        self._balanceChanged()

    def _balanceChanged(self) -> None:
        if self.balancer is not None:
            self.balancer.changed()

    def release(self) -> None:
        """
        Stop accepting and close our copy of every listener (never shutdown, never unlink).
        """
        if self._released:
            return
        self._released = True
        if self.balancer is not None:
            self.balancer.stop()
        for port in self.ports:
            port.release()

    def drain(self) -> None:
        """
        Ask every session to finish; exit once the last has, or at the drain deadline.
        """
        if self._draining:
            return
        self._draining = True
        self.log.info(
            "worker {index} (pid {pid}) draining {sessions} sessions",
            index=self.index,
            pid=os.getpid(),
            sessions=self.liveSessions(),
        )
        # Idle HTTP/1.x connections go to the successor through the leader (handover.py).
        link = self.link
        offer = HandoverSender(link, lambda: True).offer if link is not None else None
        for port in self.ports:
            port.sessions.drain(offer)
        self._drainCall = self.reactor.callLater(self.drainTimeout, self._deadline)
        self._checkDrained()

    def stop(self) -> None:
        """
        Release, drain and exit: a graceful stop.
        """
        self.release()
        self.drain()

    def leaderGone(self) -> None:
        """
        The link to our leader closed: nobody will tell us anything any more.
        """
        self.link = None
        if self._exiting:
            if self._stopCall is not None and self._stopCall.active():
                self._stopCall.cancel()
                self.reactor.stop()
            return
        if not self._exiting:
            self.log.info(
                "worker {index} (pid {pid}): the leader has gone; stopping",
                index=self.index,
                pid=os.getpid(),
            )
            self.stop()

    def fail(self, reason: str) -> None:
        """
        Exit non-zero at once (we never accepted): C{reason} is logged.
        """
        self.log.critical(
            "worker {index} (pid {pid}) cannot start: {reason}",
            index=self.index,
            pid=os.getpid(),
            reason=reason,
        )
        self.exitCode = 1
        self.release()
        self._exit()

    def _deadline(self) -> None:
        self._drainCall = None
        aborted = sum(port.sessions.abortAll() for port in self.ports)
        self.log.warn(
            "worker {index} (pid {pid}): drain deadline passed, closed {sessions} sessions",
            index=self.index,
            pid=os.getpid(),
            sessions=aborted,
        )
        self._exit()

    def _sessionsChanged(self) -> None:
        self._checkDrained()
        if self._reportCall is None and not self._exiting:
            self._reportCall = self.reactor.callLater(REPORT_INTERVAL, self._report)

    def _report(self) -> None:
        self._reportCall = None
        link = self.link
        if link is not None and link.transport is not None:
            link.callRemote(WorkerSessions, sessions=self.liveSessions())

    def _checkDrained(self) -> None:
        if self._draining and not self._exiting and self.liveSessions() == 0:
            self._exit()

    def _exit(self) -> None:
        if self._exiting:
            return
        self._exiting = True
        for call in (self._drainCall, self._reportCall):
            if call is not None and call.active():
                call.cancel()
        self.log.info("worker {index} (pid {pid}) exiting", index=self.index, pid=os.getpid())
        link = self.link
        if link is None or link.transport is None:
            self.reactor.callLater(0, self.reactor.stop)
            return
        # Not now: we may be inside a responder whose answer is still to be written.  Closing
        # the link flushes it; the reactor stops once it is closed, or after a short while.
        self._stopCall = self.reactor.callLater(2.0, self.reactor.stop)
        self.reactor.callLater(0, link.transport.loseConnection)


class WorkerLink(amp.AMP):
    """
    The worker's end of the link to its leader.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.worker.leaderGone()

    @Pause.responder
    def _pause(self) -> dict[str, Any]:
        self.worker.pause()
        return {}

    @Resume.responder
    def _resume(self) -> dict[str, Any]:
        self.worker.resume()
        return {}

    @Release.responder
    def _release(self) -> dict[str, Any]:
        self.worker.release()
        return {}

    @Drain.responder
    def _drain(self) -> dict[str, Any]:
        self.worker.drain()
        return {}

    @StopWorker.responder
    def _stop(self) -> dict[str, Any]:
        self.worker.stop()
        return {}


def adoptListeners(reactor: Any, entries: list[dict[str, Any]], factory: Any) -> list[Any]:
    """
    Adopt every listener we were given, not accepting; every given descriptor is closed.

    @raise ValueError: with a sentence, when one cannot be adopted.
    """
    from graceful_plugin.listeners import adoptListener, parseListener

    ports: list[Any] = []
    try:
        for entry in entries:
            spec = parseListener(entry["spec"]) if entry.get("spec") else None
            ports.append(
                adoptListener(
                    reactor, entry["fd"], entry["kind"], factory, name=entry["name"], spec=spec
                )
            )
    except (OSError, ValueError) as e:
        for port in ports:
            port.release()
        raise ValueError(f"cannot adopt the listeners: {e}") from None
    finally:
        for entry in entries:
            try:
                os.close(entry["fd"])
            except OSError:
                pass
    return ports


def run(config: WorkerConfig, reactor: Any = None) -> int:
    """
    Serve as worker C{config.index} until told to stop or the leader is gone.

    @return: the exit code.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from graceful_plugin.apps import ApplicationError, loadApplication

    log = Logger(namespace="graceful_plugin.worker")
    try:
        app = loadApplication(*config.application) if config.application else None
    except ApplicationError as e:
        log.critical("worker {index} cannot start: {reason}", index=config.index, reason=str(e))
        return 1
    if app is None:
        from graceful_plugin.web import demoSite

        factory: Any = demoSite(lambda: config.generation)
        ready = None
    else:
        factory = app.factory(reactor)
        ready = app.ready()
    try:
        ports = adoptListeners(reactor, config.listeners, factory)
    except ValueError as e:
        log.critical("worker {index} cannot start: {reason}", index=config.index, reason=str(e))
        return 1
    shareAccepts(ports)
    worker = Worker(reactor, ports, config.index, config.drainTimeout)
    if config.board is not None:
        from graceful_plugin.balance import Balancer, Board, balancedPorts

        worker.balancer = Balancer(
            Board(config.board, config.boardSize), config.index, balancedPorts(ports), reactor
        )
    worker.link = WorkerLink(worker)
    reactor.adoptStreamConnection(config.link, socket.AF_UNIX, OneProtocol(worker.link))
    os.close(config.link)

    def onTerm(signum: int, frame: Any) -> None:
        reactor.callFromThread(worker.stop)

    def started() -> None:
        # After the reactor's own handlers: SIGTERM (the leader's death, too) and SIGINT are a
        # graceful stop; SIGHUP belongs to the leader (a restart), not to us.
        signal.signal(signal.SIGTERM, onTerm)
        signal.signal(signal.SIGINT, onTerm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        d = maybeDeferred(ready) if ready is not None else maybeDeferred(lambda: None)
        d.addCallback(lambda _: _ready())
        d.addErrback(lambda f: worker.fail(f"the application is not ready: {f.getErrorMessage()}"))

    def _ready() -> None:
        from graceful_plugin.takeover import restorePriority

        restorePriority()
        # As the leader and every successor do before they serve: collect start-up's garbage,
        # keep what is left (modules, the application) out of every later collection, and pad
        # malloc's heap.
        heap.settle()
        link = worker.link
        if link is None:
            worker.stop()
            return
        link.callRemote(WorkerReady, version=WORKER_PROTOCOL_VERSION, pid=os.getpid())

    reactor.callWhenRunning(started)
    reactor.run()
    return worker.exitCode


def main(argv: list[str] | None = None) -> int:
    """
    The entry point of ``python -m graceful_plugin.worker CONFIG``.
    """
    argv = sys.argv if argv is None else argv
    try:
        config = WorkerConfig.fromJSON(argv[1])
    except (IndexError, ValueError) as e:
        print(f"graceful worker: {e}", file=sys.stderr)
        return 2
    # A fork of the fork server has that for its parent: C{PR_SET_PDEATHSIG} would follow the
    # fork server, not the leader.  The link closing tells it (already closed: it stops at once).
    if not config.forked and not dieWithLeader(config.leader):
        print(f"graceful worker {config.index}: the leader has gone already", file=sys.stderr)
        return 1
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    return run(config)


if __name__ == "__main__":
    # Run as graceful_plugin.worker, not __main__: log namespaces and classes keep their names.
    from graceful_plugin.worker import main as _main

    sys.exit(_main())
