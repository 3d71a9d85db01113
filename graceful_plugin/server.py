"""
A generation: the service that owns the listeners, the control socket and the state machine, and
that either starts serving from scratch or takes over from a running predecessor.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin import control, pidfile
from graceful_plugin.control import (
    CONTROL_KIND,
    PROTOCOL_VERSION,
    REPORT_LISTENERS,
    TAKEOVER_BATCH,
    ControlProtocol,
    HandoffBusy,
    IControlHandler,
    NoHandoff,
    RestartFailed,
    RolledBack,
    VersionMismatch,
)
from graceful_plugin.controlconn import DEFAULT_CAP, DEFAULT_IDLE_TIMEOUT, ControlConnections
from graceful_plugin.draining import DrainingView, Upstream, fitEntries
from graceful_plugin.figures import Figures
from graceful_plugin.listeners import (
    AdoptedTCPPort,
    AdoptedUNIXPort,
    ListenerSpec,
    adoptListener,
    bindListener,
    portAddress,
)
from graceful_plugin.machine import (
    GenerationCore,
    GenerationInputs,
    IGenerationEffects,
    makeGeneration,
)
from graceful_plugin.standby import Standby, tellStandDown

Port = AdoptedTCPPort | AdoptedUNIXPort

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


class TakeoverFailed(Exception):
    """
    A takeover could not be completed; the predecessor serves on.
    """


@implementer(IGenerationEffects, IControlHandler)
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
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self.factory = factory
        self.reactor = reactor
        self._ready = ready
        self.generation = 1
        self.startedAt = time.monotonic()
        self.ports: list[Port] = []
        self.controlPort: Port | None = None
        self.machine: GenerationInputs | None = None
        self._core: GenerationCore | None = None
        self.exitCode = 0
        self._successor: ControlProtocol | None = None
        self._successorPid = 0
        #: What this generation counted, and its predecessors before it.
        self.figures = Figures()
        #: Every generation still draining behind us.
        self.draining = DrainingView(reactor, onGone=self._drained, ownPid=os.getpid())
        #: Where we report our sessions once our successor's link has gone.
        self.upstream = Upstream(self, lambda: ControlProtocol(self), settings.controlPath)
        self._drainingSince: float | None = None
        self._reportCall: Any = None
        self._draining = False
        self._terminated: Deferred[None] = Deferred()
        self._stopping = False
        self._exitCall: Any = None
        self._closing: list[Deferred[None] | None] = []
        self._dropped: set[str] = set()
        #: twistd's own options, when run by twistd (for a daemon's status pipe).
        self.twistdConfig: dict[str, Any] | None = None
        self._statusPipe: int | None = None
        self._handedOver = False
        self._committedAt = 0.0
        from graceful_plugin.restart import Restarter

        launcher = None
        if settings.forkServer:
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

    def _tell(self, event: str, *args: Any) -> None:
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

    # -- starting ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exitWithCode)
        # After the reactor's own handlers are in place: SIGTERM is a graceful stop that exits 0.
        self.reactor.callWhenRunning(self._installSignalHandlers)
        if self.settings.takeover:
            from graceful_plugin.takeover import takeOver

            # Daemonized, twistd's parent process waits on this pipe: answer it when the
            # handoff is decided (not when start-up ends), so its exit status tells.
            config = self.twistdConfig
            self._statusPipe = config.pop("statusPipe", None) if config is not None else None
            d = Deferred.fromCoroutine(takeOver(self))
            d.addCallbacks(lambda _: self._tellParent(b"0"), self._takeoverFailed)
        else:
            try:
                self._startFromScratch()
            except OSError as e:
                self.log.critical("cannot start: {error}", error=str(e))
                self.exitCode = 1
                self.reactor.callWhenRunning(self.reactor.stop)

    def _startFromScratch(self) -> None:
        from graceful_plugin.lifecycle import closeActivated, planActivation

        # As a successor does before its handoff (takeover.py): collect start-up's garbage and
        # keep what is left (modules, the application) out of every later collection.
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
                ports.append(self._bindAndAdopt(spec, self.factory))
            if self.settings.metrics is not None:
                from graceful_plugin.metrics import bindMetrics

                ports.append(bindMetrics(self))
            self.controlPort = self._bindControl()
        except OSError:
            closeActivated(activated)
            for port in ports:
                port.close()
            raise
        self.ports = ports
        # The sockets listen (connections wait in the queue) while the application gets ready.
        ready = maybeReady(self._ready)
        ready.addCallbacks(lambda _: self.beginServing(), self._notReady)

    def _notReady(self, failure: Failure) -> None:
        self.log.failure("the application is not ready", failure)
        self.log.critical(
            "cannot start: the application is not ready: {error}",
            error=failure.getErrorMessage(),
        )
        for port in self._allPorts():
            port.close()
        self.exitCode = 1
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _bindAndAdopt(self, spec: ListenerSpec, factory: Any, kind: str | None = None) -> Port:
        try:
            sock = bindListener(spec)
        except OSError as e:
            raise OSError(f"cannot listen on {spec.name} ({spec.address}): {e}") from None
        try:
            port = adoptListener(
                self.reactor,
                sock.fileno(),
                "unix" if kind == CONTROL_KIND else spec.kind,
                factory,
                name=spec.name,
                backlog=spec.backlog,
                spec=spec,
            )
        finally:
            sock.close()
        if kind is not None:
            port.kind = kind
        return port

    def _controlFactory(self) -> Factory:
        return Factory.forProtocol(
            lambda: ControlProtocol(self, checkPeer=True, limits=self.controlLimits)
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
        for port in self._allPorts():
            port.sessions.observe(self._sessionsChanged)
            port.resumeAccepting()
        if self.settings.pidfile and not self.settings.takeover:
            # A successor claims the pidfile only once its predecessor confirmed (takeover.py):
            # one that steps back must not leave its own pid there.
            pidfile.claim(self.settings.pidfile, os.getpid())
        self.log.info(
            "generation {generation} (pid {pid}) serving on {listeners}",
            generation=self.generation,
            pid=os.getpid(),
            listeners=", ".join(f"{p.name}={portAddress(p)}" for p in self.ports),
        )
        self._tell("serving")

    def _allPorts(self) -> list[Port]:
        return self.ports + ([self.controlPort] if self.controlPort is not None else [])

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
        self._tellParent(f"1 takeover failed: {reason}".encode(errors="replace"))
        self.exitCode = 1
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _installSignalHandlers(self) -> None:
        def onTerm(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.stopGracefully)

        signal.signal(signal.SIGTERM, onTerm)

        # SIGHUP (and SIGUSR2, for nginx and gunicorn habits) restart, as `graceful-ctl
        # restart` does; SIGUSR1 stays twistd's log rotation.
        def onRestart(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.restartBySignal, signal.Signals(signum).name)

        signal.signal(signal.SIGHUP, onRestart)
        signal.signal(signal.SIGUSR2, onRestart)

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

    def _tellParent(self, message: bytes) -> None:
        """
        Answer a daemonizing twistd's parent process: C{b"0"} for success, else C{b"1 "} and a
        reason (it prints up to 100 bytes).
        """
        pipe, self._statusPipe = self._statusPipe, None
        if pipe is None:
            return
        try:
            os.write(pipe, message[:100])
            os.close(pipe)
        except OSError:
            pass

    def _exitWithCode(self) -> None:
        self._tellParent(b"1 stopped before the takeover was decided")
        if self.settings.pidfile:
            pidfile.release(self.settings.pidfile, os.getpid())
        if self.exitCode:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exitCode)

    # -- stopping ---------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.machine is None:
            if not self.settings.takeover:
                # A first generation stopped while its application gets ready: nobody else
                # holds these sockets, so close them for good (Unix paths unlinked).
                self.closeListeners()
                return DeferredList([d for d in self._closing if d is not None]).addCallback(
                    lambda _: None
                )
            return succeed(None)
        self._stopping = True
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
        for port in self._allPorts():
            port.pauseAccepting()

    def resumeAccepting(self) -> None:
        for port in self._allPorts():
            port.resumeAccepting()

    def releaseListeners(self) -> None:
        self.standby.unwatch()
        for port in self._allPorts():
            if not port.connected:
                continue  # closed already (dropped by the successor, at standBy)
            if port.name in self._dropped and port is not self.controlPort:
                self.log.info(
                    "closing listener {name} ({address}): the successor dropped it",
                    name=port.name,
                    address=portAddress(port),
                )
                self._closing.append(port.close())
            else:
                self._closing.append(port.release())

    def standBy(self) -> None:
        for port in self.ports:
            if port.name in self._dropped:
                self.log.info(
                    "closing listener {name} ({address}): the successor dropped it",
                    name=port.name,
                    address=portAddress(port),
                )
                self._closing.append(port.close())
        # The kernel's word for its pid (SO_PEERCRED, in our pid namespace), not its Hello's.
        peer = self._successor.peer if self._successor is not None else None
        self.standby.watch(
            peer[0] if peer else self._successorPid,
            self.settings.pidfile,
            lambda reason: self.machine.successorLost(reason) if self.machine else None,
        )

    def resumed(self, reason: str) -> None:
        successor, self._successor = self._successor, None
        self._draining = False
        self._handedOver = False
        self._dropped = set()
        self.settings.pidfile = self.standby.pidfilePath
        if self.controlPort is not None:
            kept = self.controlPort
            self.controlPort = self.standby.reclaim(
                kept, self.settings.controlPath, self._rebindControl
            )
            if self.controlPort is not kept:
                self.controlPort.resumeAccepting()
        self.log.warn(
            "generation {generation} (pid {pid}) resumed serving: {reason}; the successor"
            " (pid {successor}) is lost",
            generation=self.generation,
            pid=os.getpid(),
            reason=reason,
            successor=self._successorPid,
        )
        if successor is not None and successor.transport is not None:
            self.reactor.callLater(0, successor.transport.loseConnection)
        self._tell("resumed", reason)

    def _rebindControl(self) -> Port:
        # (bindListener replaces a stale socket file, and refuses a live one.)
        port = self._bindControl()
        port.sessions.observe(self._sessionsChanged)
        return port

    def _bindControl(self) -> Port:
        """
        Bind our control socket at its path (mode 0600), not accepting yet.
        """
        return self._bindAndAdopt(
            ListenerSpec(name="control", kind="unix", path=self.settings.controlPath, mode=0o600),
            self._controlFactory(),
            kind=CONTROL_KIND,
        )

    def closeListeners(self) -> None:
        # Only a stop closes listeners for good (a handoff releases them).
        self.log.info(
            "generation {generation} (pid {pid}) stopping: no longer accepting",
            generation=self.generation,
            pid=os.getpid(),
            sessions=self.liveSessions(),
        )
        self._tell("stopping")
        for port in self._allPorts():
            self._closing.append(port.close())

    def liveSessions(self) -> int:
        """
        The live sessions of the whole generation: ours and every worker's.
        """
        own = sum(port.sessions.count for port in self.ports)
        return own + (self.workers.sessions if self.workers is not None else 0)

    def workersChanged(self) -> None:
        """
        A worker's session count changed (or a worker ended).
        """
        self._sessionsChanged()

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
        for port in self.ports:
            port.sessions.drain()
        if self._successor is not None:
            # Report at once (not inside this transition: the report asks the machine), so
            # the successor's status shows us draining from its first moments.
            if self._reportCall is not None and self._reportCall.active():
                self._reportCall.cancel()
            self._reportCall = self.reactor.callLater(0, self._report)
        self._sessionsChanged()

    def abortSessions(self) -> None:
        aborted = sum(port.sessions.abortAll() for port in self.ports)
        self.log.warn(
            "drain deadline passed: closed {sessions} sessions still open",
            sessions=aborted,
            generation=self.generation,
            pid=os.getpid(),
        )

    def handoffStarted(self) -> None:
        self.log.info(
            "handoff to pid {pid} started", pid=self._successorPid, generation=self.generation
        )
        self._tell("handoffStarted", self._successorPid)

    def handoffAborted(self, reason: str) -> None:
        successor, self._successor = self._successor, None
        self.figures.count("rolled_back")
        self.log.warn(
            "handoff to pid {pid} rolled back: {reason}; serving on",
            pid=self._successorPid,
            reason=reason,
            generation=self.generation,
        )
        if successor is not None and successor.transport is not None:
            # Not now: we may be inside a responder (Abort) whose answer is still to be written.
            self.reactor.callLater(0, successor.transport.loseConnection)
        self._tell("handoffAborted", self._successorPid, reason)

    def handoffCommitted(self) -> None:
        # From here on the successor's confirmation is answered yes, even if a stop completed
        # the handoff before the confirmation arrived.
        self._handedOver = True
        successor = self._successor
        now = time.monotonic()
        elapsed = (now - successor.openedAt) * 1000 if successor else 0.0
        self.log.info(
            "handoff to pid {pid} confirmed {ms:.1f} ms after it connected, {confirmMs:.1f} ms"
            " after we paused; draining",
            pid=self._successorPid,
            ms=elapsed,
            confirmMs=(now - self._committedAt) * 1000,
            generation=self.generation,
            sessions=self.liveSessions(),
        )
        if self.settings.pidfile:
            # The successor owns the pidfile now; never remove it on our way out.
            self.settings.pidfile = ""
        self._tell("handoffCommitted", self._successorPid)

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
        link = self._successor
        if link is not None and not getattr(link.transport, "disconnecting", True):
            # A last word (the machine is in the middle of this transition: name the state),
            # so that the serving generation knows how long we drained, and of the generations
            # still draining behind us (it remembers them once our link has gone).
            entries = [self._ownEntry(state="terminated")] + self._drainingEntries()
            link.callRemote(control.ReportSessions, generations=entries)
        # Ports finish closing (and a last generation unlinks its paths) a moment later.
        closed = DeferredList([d for d in self._closing if d is not None])
        closed.addBoth(lambda _: self._terminated.callback(None))
        if not self._stopping:
            self._stopping = True
            # Not now: we may be inside the responder whose answer is still to be written.
            self.reactor.callLater(0, self._exitAfterGoodbye)

    def _exitAfterGoodbye(self) -> None:
        """
        Stop the reactor once the successor link has flushed what we wrote to it (the answer to
        its L{control.Accepting} may still be in the buffer), or after a short while.
        """
        link = self._successor
        # Not link.connected: amp.AMP never sets it, so we never waited for the flush.
        if link is None or link.transport is None or getattr(link.transport, "disconnecting", True):
            self._terminated.addCallback(lambda _: self.reactor.stop())
            return
        self._exitCall = self.reactor.callLater(2.0, self.reactor.stop)
        link.transport.loseConnection()

    # -- sessions and reports ---------------------------------------------------------------

    def _sessionsChanged(self) -> None:
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
        self._tell("sessionsChanged")
        successor = self._successor
        if successor is None or self.machine is None:
            return
        entries = [self._ownEntry()] + self._drainingEntries()
        successor.callRemote(control.ReportSessions, generations=entries)

    def _ownEntry(self, state: str | None = None) -> dict[str, Any]:
        assert self.machine is not None
        busiest = sorted(
            (port for port in self.ports if port.sessions.count),
            key=lambda port: -port.sessions.count,
        )[:REPORT_LISTENERS]
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "state": state or self.machine.describe(),
            "sessions": self.liveSessions(),
            "since": None
            if self._drainingSince is None
            else time.monotonic() - self._drainingSince,
            "listeners": [{"name": p.name, "sessions": p.sessions.count} for p in busiest],
            "workers": self.workerEntries() if self.workers is not None else None,
        }

    def _drainingEntries(self) -> list[dict[str, Any]]:
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
        self._successor = link
        if self._reportCall is not None and self._reportCall.active():
            self._reportCall.cancel()
        self._reportCall = self.reactor.callLater(0, self._report)

    def stillReporting(self) -> bool:
        """
        Whether we drain after a handoff (and so report our sessions to whoever serves).
        """
        return self._draining and self._handedOver and not self._stopping

    # -- IControlHandler --------------------------------------------------------------------

    def connectionOpened(self, protocol: ControlProtocol) -> None:
        pass

    def connectionClosed(self, protocol: ControlProtocol, reason: Failure) -> None:
        if self.draining.linkClosed(protocol):
            if self.machine is not None:
                # (A takeover that failed before serving closes this link too: no news then.)
                self.log.info("a draining predecessor has gone")
            # Pass the news on if we are draining ourselves.
            self._sessionsChanged()
        if protocol is self._successor and self.machine is not None:
            self.machine.successorLost("the successor disconnected")
            self._successor = None
            if self._exitCall is not None and self._exitCall.active():
                self._exitCall.cancel()
                self.reactor.stop()
            elif self.stillReporting():
                # Whoever serves now hears from us directly.
                self.upstream.lost()

    def hello(self, protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        try:
            return self._hello(protocol, version, pid)
        except (HandoffBusy, VersionMismatch):
            self.figures.count("refused")
            raise

    def _hello(self, protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        if self.draining.isLink(protocol):
            # Our own Hello came back on the link we took over on: whatever answers there (an
            # echo server, say) is no graceful server.
            raise NoHandoff("a Hello arrived on a successor's own handoff link")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"this server speaks control protocol {PROTOCOL_VERSION}, the successor {version}"
            )
        if self.machine is None or self._successor is not None:
            raise HandoffBusy("handoff already in progress")
        draining = self.drainingGenerations()
        if draining >= self.settings.maxDraining:
            raise HandoffBusy(
                f"{draining} generation(s) still draining (--max-draining"
                f" {self.settings.maxDraining}); try again when they have finished"
            )
        if protocol.peer is not None and protocol.peer[0] != pid:
            self.log.warn(
                "successor says it is pid {claimed} but its socket belongs to pid {actual}",
                claimed=pid,
                actual=protocol.peer[0],
            )
        self._successorPid = pid
        self._successor = protocol
        if not self.machine.requestHandoff():
            self._successor = None
            raise HandoffBusy(f"handoff already in progress or server {self.machine.describe()}")
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "generation": self.generation,
            "workers": max(self.settings.workers, 1),
        }

    def _requireSuccessor(self, protocol: ControlProtocol) -> GenerationInputs:
        if protocol is not self._successor or self.machine is None:
            raise NoHandoff("no handoff in progress on this connection; send Hello first")
        return self.machine

    def takeOver(self, protocol: ControlProtocol, start: int) -> dict[str, Any]:
        self._requireSuccessor(protocol)
        ports = self._allPorts()
        # Sized by encoded bytes (one AMP value), whatever the lengths of paths and specs.
        batch = control.takeoverBatch(
            [
                {
                    "name": port.name,
                    "kind": port.kind,
                    "address": portAddress(port),
                    "fd": port.fileno(),
                    "spec": _specText(port),
                    "role": getattr(port, "role", "") or None,
                }
                for port in ports[start : start + TAKEOVER_BATCH]
            ]
        )
        nextStart = start + len(batch)
        return {"listeners": batch, "next": nextStart if nextStart < len(ports) else -1}

    def commit(
        self, protocol: ControlProtocol, dropped: list[str] | None = None
    ) -> Deferred[dict[str, Any]]:
        self._requireSuccessor(protocol)
        # A newer generation takes over: the one standing by for us will not be needed, and
        # must not resume should we die before our successor confirms.  It hears so (briefly
        # awaited) before we pause, so that the wait costs nothing of the confirm window.
        told = tellStandDown(
            self.draining.links(),
            f"generation {self.generation + 1} (pid {self._successorPid}) takes over from"
            f" generation {self.generation}",
            self.reactor,
        )
        asked = self.reactor.seconds()
        return told.addCallback(lambda _: self._commitNow(protocol, dropped, asked))

    def _commitNow(self, protocol: ControlProtocol, dropped: list[str] | None, asked: float) -> Any:
        machine = self._requireSuccessor(protocol)
        # Listeners the successor does not keep: closed for good once it accepts.
        self._dropped = set(dropped or [])
        if not machine.commit():
            raise NoHandoff(f"nothing to commit: server {machine.describe()}")
        self._committedAt = time.monotonic()
        self.log.info(
            "handoff to pid {pid} committed {ms:.1f} ms after it connected; paused accepting",
            pid=self._successorPid,
            ms=(self._committedAt - protocol.openedAt) * 1000,
            generation=self.generation,
        )
        answer = {
            "confirmWithin": self.settings.confirmTimeout,
            "waited": self.reactor.seconds() - asked,
        }
        workers = self.workers
        if workers is None or not workers.active:
            self._tell("handoffPaused", self._successorPid)
            return answer

        # At most one generation accepts: answer only once every worker has paused too.
        def paused(_: object) -> dict[str, Any]:
            self.log.info("every worker paused", generation=self.generation)
            self._tell("handoffPaused", self._successorPid)
            return answer

        def notPaused(failure: Failure) -> dict[str, Any]:
            reason = f"a worker did not pause: {failure.getErrorMessage()}"
            if self.machine is not None:
                self.machine.successorLost(reason)
            raise NoHandoff(f"the handoff was rolled back: {reason}")

        return workers.pause().addCallbacks(paused, notPaused)

    def accepting(self, protocol: ControlProtocol) -> dict[str, Any]:
        if protocol is not self._successor or self.machine is None:
            raise RolledBack("the handoff was rolled back; the predecessor serves on")
        if self.machine.successorAccepting():
            if not protocol.sendsStandDown:
                # An older successor never says when it stops: standing by for it could resume
                # a service the operator stopped.
                self.log.info(
                    "not standing by: the successor (an older version) does not send StandDown"
                )
                self.machine.standDown()
        elif not self._handedOver:
            raise RolledBack(f"the handoff was rolled back: server {self.machine.describe()}")
        return {}

    def standDown(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        if protocol is self._successor and self.machine is not None:
            self.log.info(
                "no longer standing by: {reason}", reason=reason, generation=self.generation
            )
            self.machine.standDown()
        return {}

    def abort(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        machine = self._requireSuccessor(protocol)
        machine.successorLost(f"the successor gave up: {reason}")
        return {}

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        # From our predecessor's link, or from a generation draining further behind that
        # connected to us directly once the generation it reported to had gone.  (AMP fills an
        # optional field it did not get with None: drop those, as never said.)
        self.draining.report(
            protocol,
            [
                {key: value for key, value in entry.items() if value is not None}
                for entry in generations
            ],
        )
        # Pass the news on if we are draining ourselves.
        self._sessionsChanged()

    def status(self, protocol: ControlProtocol, start: int = 0) -> dict[str, Any]:
        ports = [port for port in self.ports if port.connected]
        connections = self.figures.connections(self.ports)
        batch = ports[start : start + control.STATUS_BATCH]
        nextStart = start + len(batch)
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "generation": self.generation,
            "state": self.machine.describe() if self.machine is not None else "starting",
            "uptime": time.monotonic() - self.startedAt,
            "listeners": [
                {
                    "name": port.name,
                    "kind": port.kind,
                    "address": portAddress(port),
                    "accepting": port.accepting,
                    "sessions": port.sessions.count,
                    "connections": connections.get(port.name, 0),
                }
                for port in batch
            ],
            "draining": self._drainingEntries(),
            "next": nextStart if nextStart < len(ports) else -1,
            "drainingGenerations": self.drainingGenerations(),
            "workers": self.workerEntries(),
            **self.figures.totals(),
        }

    def counters(self, protocol: ControlProtocol, start: int) -> dict[str, Any]:
        self._requireSuccessor(protocol)
        return self.figures.batch(self._allPorts(), start)

    def workerEntries(self) -> list[dict[str, Any]]:
        """
        Every process serving in this generation: the leader (index 0), then its workers.
        """
        own = {
            "index": 0,
            "pid": os.getpid(),
            "sessions": sum(port.sessions.count for port in self.ports),
            "restarts": 0,
            "uptime": time.monotonic() - self.startedAt,
        }
        return [own] + (self.workers.describe() if self.workers is not None else [])

    def stop(self, protocol: ControlProtocol, drainTimeout: float | None) -> dict[str, Any]:
        self.reactor.callLater(0, self.stopGracefully, drainTimeout)
        return {}

    def restart(
        self, protocol: ControlProtocol, progress: bool, fresh: bool = False
    ) -> Deferred[dict[str, Any]]:
        def report(phase: str, ms: float, detail: str) -> None:
            # (AMP never sets Protocol.connected: look at the transport.)
            transport = protocol.transport
            if transport is not None and not getattr(transport, "disconnecting", True):
                protocol.callRemote(control.RestartProgress, phase=phase, ms=ms, detail=detail)

        self.log.info(
            "restart requested over the control socket{fresh}",
            fresh=" (with a fresh fork server)" if fresh else "",
            generation=self.generation,
        )
        return self.restarter.start(report if progress else None, fresh=fresh)


def _specText(port: Any) -> str | None:
    """
    A listener as a --port value, for a successor that names no listeners of its own.
    """
    spec = getattr(port, "spec", None)
    return spec.text if spec is not None else None


def maybeReady(ready: Callable[[], Any] | None) -> Deferred[Any]:
    """
    Wait for an application's readiness hook, if it has one.
    """
    if ready is None:
        return succeed(None)
    return maybeDeferred(ready)
