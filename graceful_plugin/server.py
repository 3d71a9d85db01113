"""
The twistd service of one generation: a thin facade that builds the generation's rooms (its
listener set, process effects, the generation itself, its control responder, restarter and hot
standby) from L{Settings}, starts from scratch or takes over in C{startService}, and stops in
C{stopService}.  What the generation does is L{graceful_plugin.generation.Generation}'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from graceful_plugin import heap
from graceful_plugin.control import ControlProtocol, HandoffBusy, RestartFailed
from graceful_plugin.controlconn import ControlConnections
from graceful_plugin.generation import REPORT_INTERVAL, Generation, Settings
from graceful_plugin.lifecycle import closeActivated, planActivation
from graceful_plugin.listeners import adoptListener
from graceful_plugin.listenerset import ListenerSet, Port
from graceful_plugin.metrics import bindMetrics
from graceful_plugin.process import ProcessEffects
from graceful_plugin.responder import ControlResponder
from graceful_plugin.restart import Restarter
from graceful_plugin.standby import Standby
from graceful_plugin.takeover import TakeoverFailed, maybeReady, takeOver

__all__ = ["REPORT_INTERVAL", "GracefulServer", "Settings", "TakeoverFailed", "maybeReady"]


class _OnGeneration:
    """
    An attribute of the service's generation (L{GracefulServer.gen}), read and set through the
    service under the same name: what code that knew one object by the service's name uses.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, server: Any, owner: type | None = None) -> Any:
        if server is None:
            return self
        return getattr(server.gen, self.name)

    def __set__(self, server: Any, value: Any) -> None:
        setattr(server.gen, self.name, value)


class GracefulServer(service.Service):
    """
    One generation of a graceful server, as a twistd service.

    @ivar gen: the generation (L{Generation}); the service forwards its attributes (its
        number C{generation}, C{machine}, C{exitCode}, C{stopGracefully}, ...) under the same
        names.
    """

    log = Logger()

    # The generation's, through the service (L{_OnGeneration}): what the successor's side
    # (takeover.py), tap.py, the metrics (metrics.py) and the tests use.
    generation = _OnGeneration()
    startedAt = _OnGeneration()
    machine = _OnGeneration()
    exitCode = _OnGeneration()
    ports = _OnGeneration()
    controlPort = _OnGeneration()
    figures = _OnGeneration()
    draining = _OnGeneration()
    standby = _OnGeneration()
    observers = _OnGeneration()
    workers = _OnGeneration()
    stopping = _OnGeneration()
    stopGracefully = _OnGeneration()
    beginServing = _OnGeneration()
    liveSessions = _OnGeneration()
    workersChanged = _OnGeneration()
    ownEntry = _OnGeneration()
    drainingGenerations = _OnGeneration()
    workerEntries = _OnGeneration()
    adoptPredecessorLink = _OnGeneration()
    pauseAccepting = _OnGeneration()
    releaseListeners = _OnGeneration()
    beginDrain = _OnGeneration()

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
        #: The generation's listeners and its control listener.
        self.listeners = ListenerSet(reactor, self._controlFactory)
        #: The effects on the whole process: signals, status pipe, pidfile, exit code.
        self.process = ProcessEffects(reactor)
        #: The machine, its effects, the successor link, figures, draining view and reports.
        self.gen = Generation(
            settings,
            reactor,
            self.listeners,
            self.process,
            # Our hot standby for a successor that confirmed (L{graceful_plugin.standby}).
            Standby(reactor),
            lambda: ControlProtocol(self.responder),
        )
        #: Answers our control socket and the links to other generations.
        self.responder = ControlResponder(self.gen)
        #: twistd's own options, when run by twistd (for a daemon's status pipe).
        self.twistdConfig: dict[str, Any] | None = None
        launcher = None
        if settings.forkServer:
            # (Start-up cost: only a generation that forks its successors loads the client.)
            from graceful_plugin.forkclient import ForkLauncher

            launcher = ForkLauncher(reactor, settings.controlPath)
        #: Starts our successor on request (L{restart}, SIGHUP, SIGUSR2): forked by the fork
        #: server when there is one.
        self.restarter = Restarter(self.gen, launcher=launcher)
        self.gen.restarter = self.restarter
        self.gen.observers.append(self.restarter)
        #: The cap and idle timeout of our control listener's connections.
        self.controlLimits = ControlConnections(
            reactor, settings.maxControlConnections, settings.controlIdleTimeout
        )

    # -- starting ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        process = self.process
        process.exitAfterShutdown(lambda: self.settings.pidfile)
        # SIGHUP and SIGUSR2 at once (a restart asked before the reactor runs waits for it);
        # SIGTERM, a graceful stop that exits 0, after the reactor's own handler is in place.
        process.installRestartSignals(self.restartBySignal)
        self.reactor.callWhenRunning(process.installStopSignal, self.stopGracefully)
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
        # teardown at exit (55 ms of CPU at the first takeover without); malloc's heap padded.
        heap.settle()
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
                ports.append(bindMetrics(self.gen))
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
        return self.gen.stop()
