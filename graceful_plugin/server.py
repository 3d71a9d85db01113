"""
A generation: the service that owns the listeners, the control socket and the state machine, and
that either starts serving from scratch or takes over from a running predecessor.
"""

from __future__ import annotations

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
    TAKEOVER_BATCH,
    ControlProtocol,
    HandoffBusy,
    IControlHandler,
    NoHandoff,
    RestartFailed,
    RolledBack,
    VersionMismatch,
)
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
    confirmTimeout: float = 10.0
    drainTimeout: float = 60.0
    connectTimeout: float = 5.0
    #: How many generations may be draining at once; past it a new takeover is refused.
    maxDraining: int = 4
    #: The command that starts a successor (L{graceful_plugin.restart.successorCommand}), and
    #: the directory to start it in.
    restartCommand: list[str] | None = None
    restartDirectory: str = ""
    #: Whether successors are forked from a fork server (L{graceful_plugin.forkserver}).
    forkServer: bool = False
    #: Sockets systemd passed (socket activation), for the first generation's listeners.
    activated: list[Any] = field(default_factory=list)


class TakeoverFailed(Exception):
    """
    A takeover could not be completed; the predecessor serves on.
    """


@dataclass
class _Predecessor:
    """
    What we know of a generation still draining behind us.
    """

    entries: list[dict[str, Any]] = field(default_factory=list)


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
        self._predecessors: dict[ControlProtocol, _Predecessor] = {}
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
                    ports.append(
                        adoptListener(self.reactor, sock.fd, sock.kind, self.factory, name=name)
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
            self.controlPort = self._bindAndAdopt(
                ListenerSpec(
                    name="control", kind="unix", path=self.settings.controlPath, mode=0o600
                ),
                self._controlFactory(),
                kind=CONTROL_KIND,
            )
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
        return Factory.forProtocol(lambda: ControlProtocol(self, checkPeer=True))

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
        self.machine.stop()
        return self._terminated

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
        for port in self._allPorts():
            if port.name in self._dropped and port is not self.controlPort:
                self.log.info(
                    "closing listener {name} ({address}): the successor dropped it",
                    name=port.name,
                    address=portAddress(port),
                )
                self._closing.append(port.close())
            else:
                self._closing.append(port.release())

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
        return sum(port.sessions.count for port in self.ports)

    def beginDrain(self) -> None:
        self._draining = True
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
        elapsed = (time.monotonic() - successor.openedAt) * 1000 if successor else 0.0
        self.log.info(
            "handoff to pid {pid} confirmed {ms:.1f} ms after it connected; draining",
            pid=self._successorPid,
            ms=elapsed,
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

    def _ownEntry(self) -> dict[str, Any]:
        assert self.machine is not None
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "state": self.machine.describe(),
            "sessions": self.liveSessions(),
        }

    def _drainingEntries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for predecessor in self._predecessors.values():
            entries.extend(predecessor.entries)
        return entries

    def drainingGenerations(self) -> int:
        """
        How many generations behind us are still draining (one that has not reported yet counts
        as one).
        """
        return sum(len(p.entries) or 1 for p in self._predecessors.values())

    def adoptPredecessorLink(self, protocol: ControlProtocol) -> None:
        """
        Keep the connection to the predecessor we took over from, to hear its session counts.
        """
        self._predecessors[protocol] = _Predecessor()

    # -- IControlHandler --------------------------------------------------------------------

    def connectionOpened(self, protocol: ControlProtocol) -> None:
        pass

    def connectionClosed(self, protocol: ControlProtocol, reason: Failure) -> None:
        if protocol in self._predecessors:
            del self._predecessors[protocol]
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

    def hello(self, protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        if protocol in self._predecessors:
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
        return {"version": PROTOCOL_VERSION, "pid": os.getpid(), "generation": self.generation}

    def _requireSuccessor(self, protocol: ControlProtocol) -> GenerationInputs:
        if protocol is not self._successor or self.machine is None:
            raise NoHandoff("no handoff in progress on this connection; send Hello first")
        return self.machine

    def takeOver(self, protocol: ControlProtocol, start: int) -> dict[str, Any]:
        self._requireSuccessor(protocol)
        ports = self._allPorts()
        batch = ports[start : start + TAKEOVER_BATCH]
        nextStart = start + len(batch)
        return {
            "listeners": [
                {
                    "name": port.name,
                    "kind": port.kind,
                    "address": portAddress(port),
                    "fd": port.fileno(),
                    "spec": _specText(port),
                }
                for port in batch
            ],
            "next": nextStart if nextStart < len(ports) else -1,
        }

    def commit(self, protocol: ControlProtocol, dropped: list[str] | None = None) -> dict[str, Any]:
        machine = self._requireSuccessor(protocol)
        # Listeners the successor does not keep: closed for good once it accepts.
        self._dropped = set(dropped or [])
        if not machine.commit():
            raise NoHandoff(f"nothing to commit: server {machine.describe()}")
        elapsed = (time.monotonic() - protocol.openedAt) * 1000
        self.log.info(
            "handoff to pid {pid} committed {ms:.1f} ms after it connected; paused accepting",
            pid=self._successorPid,
            ms=elapsed,
            generation=self.generation,
        )
        self._tell("handoffPaused", self._successorPid)
        return {"confirmWithin": self.settings.confirmTimeout}

    def accepting(self, protocol: ControlProtocol) -> dict[str, Any]:
        if protocol is not self._successor or self.machine is None:
            raise RolledBack("the handoff was rolled back; the predecessor serves on")
        if not self.machine.successorAccepting() and not self._handedOver:
            raise RolledBack(f"the handoff was rolled back: server {self.machine.describe()}")
        return {}

    def abort(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        machine = self._requireSuccessor(protocol)
        machine.successorLost(f"the successor gave up: {reason}")
        return {}

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        predecessor = self._predecessors.get(protocol)
        if predecessor is None:
            return
        predecessor.entries = generations
        # Pass the news on if we are draining ourselves.
        self._sessionsChanged()

    def status(self, protocol: ControlProtocol, start: int = 0) -> dict[str, Any]:
        ports = [port for port in self.ports if port.connected]
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
                }
                for port in batch
            ],
            "draining": self._drainingEntries(),
            "next": nextStart if nextStart < len(ports) else -1,
        }

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
