"""
A generation: the service that owns the listeners, the control socket and the state machine, and
that either starts serving from scratch or takes over from a running predecessor.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin import control
from graceful_plugin.control import (
    ControlProtocol,
    HandoffBusy,
    RestartFailed,
)
from graceful_plugin.controlconn import DEFAULT_CAP, DEFAULT_IDLE_TIMEOUT, ControlConnections
from graceful_plugin.draining import DrainingView, Upstream, fitEntries
from graceful_plugin.figures import Figures
from graceful_plugin.handover import HandoverSender
from graceful_plugin.lifecycle import closeActivated, planActivation
from graceful_plugin.listeners import ListenerSpec, adoptListener
from graceful_plugin.listenerset import ListenerSet, Port
from graceful_plugin.machine import (
    GenerationCore,
    GenerationInputs,
    IGenerationEffects,
    makeGeneration,
)
from graceful_plugin.metrics import bindMetrics
from graceful_plugin.process import ProcessEffects
from graceful_plugin.responder import ControlResponder
from graceful_plugin.restart import Restarter
from graceful_plugin.standby import Standby, tellStandDown
from graceful_plugin.takeover import TakeoverFailed, maybeReady, takeOver

__all__ = ["REPORT_INTERVAL", "GracefulServer", "Settings", "TakeoverFailed", "maybeReady"]

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


@implementer(IGenerationEffects)
class GracefulServer(service.Service):
    """
    One generation of a graceful server.

    @ivar generation: 1 for a server started from scratch, one more than its predecessor's for a
        successor.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        factory: IProtocolFactory,
        reactor: Any = None,
        ready: Callable[[], Any] | None = None,
    ) -> None:
        if reactor is None:
            # (Never at module level: importing it installs the default reactor.)
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.factory = factory
        self.reactor = reactor
        self.ready = ready
        self.generation = 1
        self.startedAt = time.monotonic()
        #: Answers our control socket and the links to other generations.
        self.responder = ControlResponder(self)
        #: The generation's listeners and its control listener.
        self.listeners = ListenerSet(reactor, self._controlFactory)
        self.machine: GenerationInputs | None = None
        self._core: GenerationCore | None = None
        #: The effects on the whole process: signals, status pipe, pidfile, exit code.
        self.process = ProcessEffects(reactor)
        self.successor: ControlProtocol | None = None
        self.successorPid = 0
        #: What this generation counted, and its predecessors before it.
        self.figures = Figures()
        #: Every generation still draining behind us.
        self.draining = DrainingView(reactor, onGone=self._drained, ownPid=os.getpid())
        #: Where we report our sessions once our successor's link has gone.
        self.upstream = Upstream(
            self, lambda: ControlProtocol(self.responder), settings.controlPath
        )
        self._drainingSince: float | None = None
        self._reportCall: Any = None
        self._draining = False
        self._terminated: Deferred[None] = Deferred()
        self.stopping = False
        self.exitCall: Any = None
        #: twistd's own options, when run by twistd (for a daemon's status pipe).
        self.twistdConfig: dict[str, Any] | None = None
        self.handedOver = False
        self.committedAt = 0.0
        launcher = None
        if settings.forkServer:
            # (Start-up cost: only a generation that forks its successors loads the client.)
            from graceful_plugin.forkclient import ForkLauncher

            launcher = ForkLauncher(reactor, settings.controlPath)
        #: Starts our successor on request (L{restart}, SIGHUP, SIGUSR2): forked by the fork
        #: server when there is one.
        self.restarter = Restarter(self, launcher=launcher)
        #: Told of every transition (L{graceful_plugin.lifecycle.IGenerationObserver}).
        self.observers: list[Any] = [self.restarter]
        #: Our hot standby for a successor that confirmed (L{graceful_plugin.standby}).
        self.standby = Standby(reactor)
        #: The cap and idle timeout of our control listener's connections.
        self.controlLimits = ControlConnections(
            reactor, settings.maxControlConnections, settings.controlIdleTimeout
        )
        #: The generation's other worker processes, if any
        #: (L{graceful_plugin.workerspawn.WorkerSupervisor}): C{describe()} and C{sessions}.
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
        What the process exits with (L{ProcessEffects.exitCode}).
        """
        return self.process.exitCode

    @exitCode.setter
    def exitCode(self, code: int) -> None:
        self.process.exitCode = code

    # -- starting ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        process = self.process
        process.exitAfterShutdown(lambda: self.settings.pidfile)
        # After the reactor's own handlers are in place: SIGTERM is a graceful stop that exits 0.
        self.reactor.callWhenRunning(
            process.installSignalHandlers, self.stopGracefully, self.restartBySignal
        )
        if self.settings.takeover:
            process.takeStatusPipe(self.twistdConfig)
            d = Deferred.fromCoroutine(takeOver(self))
            d.addCallbacks(lambda _: process.tellParent(b"0"), self._takeoverFailed)
        else:
            try:
                self._startFromScratch()
            except OSError as e:
                self.log.critical("cannot start: {error}", error=str(e))
                process.fail()

    def _startFromScratch(self) -> None:
        # As a successor does (takeover.py): what start-up left behind is collected once and kept
        # out of later collections, which otherwise walk it all, and of the interpreter's
        # teardown at exit (55 ms of CPU at the first takeover without).
        gc.collect()
        gc.freeze()
        ports: list[Port] = []
        specs = list(self.settings.listeners)
        activated, self.settings.activated = self.settings.activated, []
        try:
            if activated:
                plan = planActivation(specs, activated)
                specs = plan.bind
                for sock in plan.unused:
                    self.log.warn(
                        "socket activation: not using {name} ({address}): no --port names it",
                        name=sock.name,
                        address=sock.address,
                    )
                for name, sock in plan.adopt:
                    # systemd passes blocking sockets: the reactor's accept loop would hang.
                    os.set_blocking(sock.fd, False)
                    # Through the --port it matched: an ssl listener serves TLS.
                    ports.append(
                        adoptListener(
                            self.reactor,
                            sock.fd,
                            sock.kind,
                            self.factory,
                            name=name,
                            spec=plan.specs.get(name),
                        )
                    )
                    self.log.info(
                        "socket activation: adopted {name} ({address}) from fd {fd}",
                        name=name,
                        address=sock.address,
                        fd=sock.fd,
                    )
                closeActivated(activated)
                activated = []
            for spec in specs:
                ports.append(self.listeners.bind(spec, self.factory))
            if self.settings.metrics is not None:
                ports.append(bindMetrics(self))
            controlPort = self.listeners.bindControl(self.settings.controlPath)
        except OSError:
            closeActivated(activated)
            for port in ports:
                port.close()
            raise
        self.listeners.install(ports, controlPort)
        # The sockets listen (connections wait in the queue) while the application gets ready.
        ready = maybeReady(self.ready)
        ready.addCallbacks(lambda _: self.beginServing(), self._notReady)

    def _notReady(self, failure: Failure) -> None:
        self.log.failure("the application is not ready", failure)
        self.log.critical(
            "cannot start: the application is not ready: {error}",
            error=failure.getErrorMessage(),
        )
        self.listeners.close()
        self.process.fail()

    def _controlFactory(self) -> Factory:
        return Factory.forProtocol(
            lambda: ControlProtocol(self.responder, checkPeer=True, limits=self.controlLimits)
        )

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

    def _takeoverFailed(self, failure: Failure) -> None:
        reason = failure.getErrorMessage() if failure.check(TakeoverFailed) else None
        if reason is None:
            self.log.failure("takeover failed", failure)
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self.log.critical(
            "takeover from {path} failed: {reason}",
            path=self.settings.controlPath,
            reason=reason,
        )
        self.process.tellParent(f"1 takeover failed: {reason}".encode(errors="replace"))
        self.process.fail()

    def restartBySignal(self, name: str) -> None:
        """
        Start a successor because of signal C{name}; the outcome is logged.
        """
        self.log.info("{signal}: restarting", signal=name, generation=self.generation)
        try:
            d = self.restarter.start()
        except (HandoffBusy, RestartFailed) as e:
            self.log.warn("{signal}: not restarting: {reason}", signal=name, reason=str(e))
            return
        d.addCallbacks(
            lambda result: self.log.info(
                "{signal}: restarted as pid {pid}, generation {successorGeneration}",
                signal=name,
                pid=result["pid"],
                successorGeneration=result["generation"],
                ms=result["ms"],
            ),
            lambda failure: self.log.warn(
                "{signal}: restart failed: {reason}",
                signal=name,
                reason=failure.getErrorMessage(),
            ),
        )

    # -- stopping ---------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
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
        self.reactor.stop()

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
            self._terminated.addCallback(lambda _: self.reactor.stop())
            return
        self.exitCall = self.reactor.callLater(2.0, self.reactor.stop)
        link.transport.loseConnection()

    # -- sessions and reports ---------------------------------------------------------------

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
        return [own] + (self.workers.describe() if self.workers is not None else [])
