"""
One generation of a graceful server, apart from the twistd service that runs it: its state
machine and the machine's effects (L{IGenerationEffects}), the link to its successor during and
after a handoff, its figures, the view of the generations draining behind it, and the session
reports it sends.

It makes no call on the process: stopping the reactor, claiming the pidfile and the exit code
go through the process effects it is given (L{ProcessCalls}, a
L{graceful_plugin.process.ProcessEffects} in a server), its sockets through its listener set and
its hot standby.  The service (L{graceful_plugin.server.GracefulServer}) builds it and starts
it; the control responder (L{graceful_plugin.responder}) and the observers
(L{graceful_plugin.lifecycle.IGenerationObserver}) see it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from graceful_plugin import control
from graceful_plugin.control import ControlProtocol
from graceful_plugin.controlconn import DEFAULT_CAP, DEFAULT_IDLE_TIMEOUT
from graceful_plugin.draining import DrainingView, Upstream, fitEntries
from graceful_plugin.figures import Figures
from graceful_plugin.handover import HandoverSender
from graceful_plugin.listeners import ListenerSpec
from graceful_plugin.listenerset import ListenerSet, Port
from graceful_plugin.machine import (
    GenerationCore,
    GenerationInputs,
    IGenerationEffects,
    makeGeneration,
)
from graceful_plugin.standby import Standby, tellStandDown

__all__ = ["REPORT_INTERVAL", "Generation", "ProcessCalls", "Settings"]

#: How often a draining generation reports its session count to its successor, at most.
REPORT_INTERVAL = 0.2


@dataclass
class Settings:
    """
    What one generation was started with.

    @ivar listeners: the listeners named on the command line (none: adopt what the predecessor
        has).
    @ivar controlPath: the control socket's path.
    @ivar takeover: whether to take over from the server at C{controlPath}.
    @ivar pidfile: the pidfile to own once serving (empty: none).
    """

    listeners: list[ListenerSpec]
    controlPath: str
    takeover: bool = False
    pidfile: str = ""
    handoffTimeout: float = 30.0
    #: Measured: a successor confirms 3 ms (median) to 90 ms (max, under load on 2 busy cores)
    #: after the commit answer (benchmarks/confirm.py).  New connections wait this long behind
    #: a successor stalled after its commit.
    confirmTimeout: float = 0.5
    drainTimeout: float = 60.0
    connectTimeout: float = 5.0
    #: How many generations may be draining at once; past it a new takeover is refused.
    maxDraining: int = 4
    #: Control connections open at once, and seconds one may go without a complete command
    #: (L{graceful_plugin.controlconn}).
    maxControlConnections: int = DEFAULT_CAP
    controlIdleTimeout: float = DEFAULT_IDLE_TIMEOUT
    #: The command that starts a successor (L{graceful_plugin.restart.successorCommand}), and
    #: the directory to start it in.
    restartCommand: list[str] | None = None
    restartDirectory: str = ""
    #: Whether successors are forked from a fork server (L{graceful_plugin.forkserver}).
    forkServer: bool = False
    #: Sockets systemd passed (socket activation), for the first generation's listeners.
    activated: list[Any] = field(default_factory=list)
    #: The listener that serves the metrics (C{--metrics}), if any of our own.
    metrics: ListenerSpec | None = None
    #: How many processes serve in this generation (the leader and workers 1 .. N-1); 0 for a
    #: successor that keeps its predecessor's count.
    workers: int = 1


class ProcessCalls(Protocol):
    """
    What a generation asks of its process (L{graceful_plugin.process.ProcessEffects}).
    """

    #: What the process exits with once the reactor has stopped.
    exitCode: int

    def claimPidfile(self, path: str) -> None:
        """
        Put our pid in the pidfile at C{path}.
        """

    def stop(self) -> None:
        """
        Stop the reactor: the service stops, and the process exits with L{exitCode}.
        """


@implementer(IGenerationEffects)
class Generation:
    """
    One generation: the machine's inputs (L{machine}, once serving) and its effects.

    @ivar generation: 1 for a server started from scratch, one more than its predecessor's for a
        successor.
    @ivar successor: the successor's control link, during a handoff and while we drain after it.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        listeners: ListenerSet,
        process: ProcessCalls,
        standby: Standby,
        makeLink: Callable[[], ControlProtocol],
    ) -> None:
        """
        @param makeLink: a new control protocol, for the connection on which a draining
            generation reports to whoever serves once its successor's link has gone.
        """
        self.settings = settings
        self.reactor = reactor
        self.listeners = listeners
        self.process = process
        #: Our hot standby for a successor that confirmed (L{graceful_plugin.standby}).
        self.standby = standby
        self.generation = 1
        self.startedAt = time.monotonic()
        self.machine: GenerationInputs | None = None
        self._core: GenerationCore | None = None
        self.successor: ControlProtocol | None = None
        self.successorPid = 0
        #: What this generation counted, and its predecessors before it.
        self.figures = Figures()
        #: Every generation still draining behind us.
        self.draining = DrainingView(reactor, onGone=self._drained, ownPid=os.getpid())
        #: Where we report our sessions once our successor's link has gone.
        self.upstream = Upstream(self, makeLink, settings.controlPath)
        self._drainingSince: float | None = None
        self._reportCall: Any = None
        self._draining = False
        self._terminated: Deferred[None] = Deferred()
        self.stopping = False
        #: The reactor's stop, pending once we drained, until the successor link has flushed.
        self.exitCall: Any = None
        self.handedOver = False
        self.committedAt = 0.0
        #: Starts our successor on request (L{graceful_plugin.restart.Restarter}): the
        #: service's.
        self.restarter: Any = None
        #: Told of every transition (L{graceful_plugin.lifecycle.IGenerationObserver}).
        self.observers: list[Any] = []
        #: The generation's other worker processes, if any
        #: (L{graceful_plugin.workerspawn.WorkerSupervisor}): C{describe()}, C{balanceOf()} and
        #: C{sessions}.
        self.workers: Any = None

    def tell(self, event: str, *args: Any) -> None:
        """
        Tell every observer of C{event}; an observer that fails is logged and changes nothing.
        """
        for observer in list(self.observers):
            try:
                getattr(observer, event)(self, *args)
            except Exception:
                self.log.failure(
                    "observer {observer!r} failed on {event}", observer=observer, event=event
                )

    @property
    def ports(self) -> list[Port]:
        """
        The generation's listeners (L{ListenerSet.ports}).
        """
        return self.listeners.ports

    @ports.setter
    def ports(self, ports: list[Port]) -> None:
        self.listeners.ports = ports

    @property
    def controlPort(self) -> Port | None:
        """
        The control listener (L{ListenerSet.controlPort}).
        """
        return self.listeners.controlPort

    @controlPort.setter
    def controlPort(self, port: Port | None) -> None:
        self.listeners.controlPort = port

    @property
    def exitCode(self) -> int:
        """
        What the process exits with (L{ProcessCalls.exitCode}).
        """
        return self.process.exitCode

    @exitCode.setter
    def exitCode(self, code: int) -> None:
        self.process.exitCode = code

    # -- serving and stopping ---------------------------------------------------------------

    def beginServing(self) -> None:
        """
        Accept on every listener and the control socket, as the serving generation.
        """
        self._core = GenerationCore(
            clock=self.reactor,
            effects=self,
            handoffTimeout=self.settings.handoffTimeout,
            confirmTimeout=self.settings.confirmTimeout,
            drainTimeout=self.settings.drainTimeout,
        )
        self.machine = makeGeneration(self._core)
        self.listeners.observe(self.sessionsChanged)
        self.listeners.resume()
        if self.settings.pidfile and not self.settings.takeover:
            # A successor claims the pidfile only once its predecessor confirmed (takeover.py):
            # one that steps back must not leave its own pid there.
            self.process.claimPidfile(self.settings.pidfile)
        self.log.info(
            "generation {generation} (pid {pid}) serving on {listeners}",
            generation=self.generation,
            pid=os.getpid(),
            listeners=self.listeners.describe(),
        )
        self.tell("serving")

    def stop(self) -> Deferred[None]:
        """
        Stop for good (the service stops): drain, and fire once drained and every listener has
        closed.
        """
        if self.machine is None:
            if not self.settings.takeover:
                # A first generation stopped while its application gets ready: nobody else
                # holds these sockets, so close them for good (Unix paths unlinked).
                self.closeListeners()
                return self.listeners.closed().addCallback(lambda _: None)
            return succeed(None)
        self.stopping = True
        machine = self.machine
        # The operator wants the service down: the predecessor standing by for us must not
        # resume.  Tell it (and hear it answer, briefly) before our listeners close.
        told = tellStandDown(
            self.draining.links(),
            f"generation {self.generation} (pid {os.getpid()}) is stopping",
            self.reactor,
        )
        told.addCallback(lambda _: machine.stop())
        return told.addCallback(lambda _: self._terminated)

    def stopGracefully(self, drainTimeout: float | None = None) -> None:
        """
        Stop as if by SIGTERM, optionally with a shorter drain deadline.
        """
        if drainTimeout is not None:
            # The machine reads its deadline from the core when draining starts.
            self.settings.drainTimeout = drainTimeout
            if self._core is not None:
                self._core.drainTimeout = drainTimeout
        self.process.stop()

    # -- IGenerationEffects -----------------------------------------------------------------

    def pauseAccepting(self) -> None:
        self.listeners.pause()

    def resumeAccepting(self) -> None:
        self.listeners.resume()

    def releaseListeners(self) -> None:
        self.standby.unwatch()
        self.listeners.release()

    def standBy(self) -> None:
        self.listeners.closeDropped()
        # The kernel's word for its pid (SO_PEERCRED, in our pid namespace), not its Hello's.
        peer = self.successor.peer if self.successor is not None else None
        self.standby.watch(
            peer[0] if peer else self.successorPid,
            self.settings.pidfile,
            lambda reason: self.machine.successorLost(reason) if self.machine else None,
        )

    def resumed(self, reason: str) -> None:
        successor, self.successor = self.successor, None
        self._draining = False
        self.handedOver = False
        self.listeners.dropped = set()
        self.settings.pidfile = self.standby.pidfilePath
        if self.controlPort is not None:
            kept = self.controlPort
            controlPort = self.standby.reclaim(kept, self.settings.controlPath, self._rebindControl)
            self.listeners.install(self.ports, controlPort)
            if controlPort is not kept:
                controlPort.resumeAccepting()
        self.log.warn(
            "generation {generation} (pid {pid}) resumed serving: {reason}; the successor"
            " (pid {successor}) is lost",
            generation=self.generation,
            pid=os.getpid(),
            reason=reason,
            successor=self.successorPid,
        )
        if successor is not None and successor.transport is not None:
            self.reactor.callLater(0, successor.transport.loseConnection)
        self.tell("resumed", reason)

    def _rebindControl(self) -> Port:
        # (bindListener replaces a stale socket file, and refuses a live one.)
        port = self.listeners.bindControl(self.settings.controlPath)
        port.sessions.observe(self.sessionsChanged)
        return port

    def closeListeners(self) -> None:
        # Only a stop closes listeners for good (a handoff releases them).
        self.log.info(
            "generation {generation} (pid {pid}) stopping: no longer accepting",
            generation=self.generation,
            pid=os.getpid(),
            sessions=self.liveSessions(),
        )
        self.tell("stopping")
        self.listeners.close()

    def beginDrain(self) -> None:
        self._draining = True
        self._drainingSince = time.monotonic()
        live = self.liveSessions()
        self.log.info(
            "generation {generation} draining {sessions} sessions",
            generation=self.generation,
            sessions=live,
            pid=os.getpid(),
            drainTimeout=self.settings.drainTimeout,
        )
        offer = None
        link = self.successorLink()
        if link is not None:
            # Idle HTTP/1.x connections move to the successor instead of closing (handover.py).
            offer = HandoverSender(link, lambda: self._draining).offer
        self.listeners.drain(offer)
        if self.successor is not None:
            # Report at once (not inside this transition: the report asks the machine), so
            # the successor's status shows us draining from its first moments.
            if self._reportCall is not None and self._reportCall.active():
                self._reportCall.cancel()
            self._reportCall = self.reactor.callLater(0, self._report)
        self.sessionsChanged()

    def abortSessions(self) -> None:
        aborted = self.listeners.abortSessions()
        self.log.warn(
            "drain deadline passed: closed {sessions} sessions still open",
            sessions=aborted,
            generation=self.generation,
            pid=os.getpid(),
        )

    def handoffStarted(self) -> None:
        self.log.info(
            "handoff to pid {pid} started", pid=self.successorPid, generation=self.generation
        )
        self.tell("handoffStarted", self.successorPid)

    def handoffAborted(self, reason: str) -> None:
        successor, self.successor = self.successor, None
        self.figures.count("rolled_back")
        self.log.warn(
            "handoff to pid {pid} rolled back: {reason}; serving on",
            pid=self.successorPid,
            reason=reason,
            generation=self.generation,
        )
        if successor is not None and successor.transport is not None:
            # Not now: we may be inside a responder (Abort) whose answer is still to be written.
            self.reactor.callLater(0, successor.transport.loseConnection)
        self.tell("handoffAborted", self.successorPid, reason)

    def handoffCommitted(self) -> None:
        # From here on the successor's confirmation is answered yes, even if a stop completed
        # the handoff before the confirmation arrived.
        self.handedOver = True
        successor = self.successor
        now = time.monotonic()
        elapsed = (now - successor.openedAt) * 1000 if successor else 0.0
        self.log.info(
            "handoff to pid {pid} confirmed {ms:.1f} ms after it connected, {confirmMs:.1f} ms"
            " after we paused; draining",
            pid=self.successorPid,
            ms=elapsed,
            confirmMs=(now - self.committedAt) * 1000,
            generation=self.generation,
            sessions=self.liveSessions(),
        )
        if self.settings.pidfile:
            # The successor owns the pidfile now; never remove it on our way out.
            self.settings.pidfile = ""
        self.tell("handoffCommitted", self.successorPid)

    def terminated(self) -> None:
        self.log.info(
            "generation {generation} (pid {pid}) drained; exiting",
            generation=self.generation,
            pid=os.getpid(),
        )
        if self._reportCall is not None and self._reportCall.active():
            self._reportCall.cancel()
        self.draining.stop()
        self.upstream.stop()
        link = self.successor
        if link is not None and not getattr(link.transport, "disconnecting", True):
            # A last word (the machine is in the middle of this transition: name the state),
            # so that the serving generation knows how long we drained, and of the generations
            # still draining behind us (it remembers them once our link has gone).
            entries = [self.ownEntry(state="terminated")] + self.drainingEntries()
            link.callRemote(control.ReportSessions, generations=entries)
        # Ports finish closing (and a last generation unlinks its paths) a moment later.
        closed = self.listeners.closed()
        closed.addBoth(lambda _: self._terminated.callback(None))
        if not self.stopping:
            self.stopping = True
            # Not now: we may be inside the responder whose answer is still to be written.
            self.reactor.callLater(0, self._exitAfterGoodbye)

    def _exitAfterGoodbye(self) -> None:
        """
        Stop the reactor once the successor link has flushed what we wrote to it (the answer to
        its L{control.Accepting} may still be in the buffer), or after a short while.
        """
        link = self.successor
        # Not link.connected: amp.AMP never sets it, so we never waited for the flush.
        if link is None or link.transport is None or getattr(link.transport, "disconnecting", True):
            self._terminated.addCallback(lambda _: self.process.stop())
            return
        self.exitCall = self.reactor.callLater(2.0, self.process.stop)
        link.transport.loseConnection()

    def successorLinkLost(self) -> None:
        """
        The successor's control link closed: a handoff in progress is rolled back, a standby
        resumes; once we drained, the process exits now (nothing is left to flush); while we
        drain after the handoff, we report to whoever serves now on a link of our own.
        """
        assert self.machine is not None
        self.machine.successorLost("the successor disconnected")
        self.successor = None
        if self.exitCall is not None and self.exitCall.active():
            self.exitCall.cancel()
            self.process.stop()
        elif self.stillReporting():
            # Whoever serves now hears from us directly.
            self.upstream.lost()

    # -- sessions and reports ---------------------------------------------------------------

    def liveSessions(self) -> int:
        """
        The live sessions of the whole generation: ours and every worker's.
        """
        own = self.listeners.sessions()
        return own + (self.workers.sessions if self.workers is not None else 0)

    def workersChanged(self) -> None:
        """
        A worker's session count changed (or a worker ended).
        """
        self.sessionsChanged()

    def sessionsChanged(self) -> None:
        """
        Called on every accepted and every closed connection: keep it cheap.  Draining ends the
        moment the last session goes; reports and observers hear of changes at most every
        L{REPORT_INTERVAL}.
        """
        if self._draining and self.machine is not None and self.liveSessions() == 0:
            self.machine.sessionsDrained()
        if self._reportCall is None:
            self._reportCall = self.reactor.callLater(REPORT_INTERVAL, self._report)

    def _report(self) -> None:
        self._reportCall = None
        self.tell("sessionsChanged")
        successor = self.successor
        if successor is None or self.machine is None:
            return
        entries = [self.ownEntry()] + self.drainingEntries()
        successor.callRemote(control.ReportSessions, generations=entries)

    def ownEntry(self, state: str | None = None) -> dict[str, Any]:
        """
        What we report of ourselves to the generation that serves after us.
        """
        assert self.machine is not None
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "state": state or self.machine.describe(),
            "sessions": self.liveSessions(),
            "since": None
            if self._drainingSince is None
            else time.monotonic() - self._drainingSince,
            "listeners": self.listeners.busiest(),
            "workers": self.workerEntries() if self.workers is not None else None,
        }

    def drainingEntries(self) -> list[dict[str, Any]]:
        """
        The generations draining behind us, as many as fit one answer.
        """
        return fitEntries(self.draining.entries())

    def drainingGenerations(self) -> int:
        """
        How many generations behind us are still draining (one that has not reported yet counts
        as one), however many links away.
        """
        return self.draining.count()

    def _drained(self, entry: dict[str, Any], seconds: float) -> None:
        self.figures.observe("drain", seconds)

    def adoptPredecessorLink(self, protocol: ControlProtocol) -> None:
        """
        Keep the connection to the predecessor we took over from, to hear its session counts.
        """
        self.draining.addLink(protocol)

    def reportTo(self, link: ControlProtocol) -> None:
        """
        Report our sessions on C{link} (to the serving generation, our successor having gone).
        """
        self.successor = link
        if self._reportCall is not None and self._reportCall.active():
            self._reportCall.cancel()
        self._reportCall = self.reactor.callLater(0, self._report)

    def stillReporting(self) -> bool:
        """
        Whether we drain after a handoff (and so report our sessions to whoever serves).
        """
        return self._draining and self.handedOver and not self.stopping

    def isDraining(self) -> bool:
        """
        Whether this generation drains (for whatever reason: a handoff, a stop).
        """
        return self._draining

    def successorLink(self) -> ControlProtocol | None:
        """
        The link to the successor that took over from us (it confirmed, or we stopped after
        its commit), while it lasts: where our idle connections go (L{HandoverSender}).
        """
        return self.successor if self.handedOver else None

    def workerEntries(self) -> list[dict[str, Any]]:
        """
        Every process serving in this generation: the leader (index 0), then its workers.
        """
        own = {
            "index": 0,
            "pid": os.getpid(),
            "sessions": self.listeners.sessions(),
            "restarts": 0,
            "uptime": time.monotonic() - self.startedAt,
        }
        if self.workers is None:
            return [own]
        own.update(self.workers.balanceOf(0))
        return [own] + self.workers.describe()
