"""
The control responder: what a generation answers on its control socket (L{IControlHandler}).

Each command of L{graceful_plugin.control} becomes a call on the generation (its state machine's
inputs, its successor link, its figures) or on its listener set; the responder holds no state
of its own.  It knows the generation only through L{IGeneration}, so it imports nothing above
it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin import control
from graceful_plugin.control import (
    PROTOCOL_VERSION,
    ControlProtocol,
    HandoffBusy,
    IConnectionAdopter,
    IControlHandler,
    NoHandoff,
    RolledBack,
    VersionMismatch,
)
from graceful_plugin.draining import DrainingView
from graceful_plugin.figures import Figures
from graceful_plugin.handover import adoptHandedOver
from graceful_plugin.listenerset import ListenerSet, Port
from graceful_plugin.machine import GenerationInputs
from graceful_plugin.standby import tellStandDown


class IGeneration(Protocol):
    """
    What the responder needs of its generation (L{graceful_plugin.generation.Generation}).
    """

    reactor: Any
    settings: Any
    #: This generation's number.
    generation: int
    startedAt: float
    machine: GenerationInputs | None
    listeners: ListenerSet
    figures: Figures
    draining: DrainingView
    restarter: Any
    workers: Any
    #: The successor's control link and pid, during a handoff.
    successor: ControlProtocol | None
    successorPid: int
    committedAt: float
    handedOver: bool

    @property
    def ports(self) -> list[Port]: ...

    def tell(self, event: str, *args: Any) -> None: ...

    def sessionsChanged(self) -> None: ...

    def successorLinkLost(self) -> None: ...

    def drainingEntries(self) -> list[dict[str, Any]]: ...

    def drainingGenerations(self) -> int: ...

    def workerEntries(self) -> list[dict[str, Any]]: ...

    def stopGracefully(self, drainTimeout: float | None = None) -> None: ...

    def isDraining(self) -> bool: ...


@implementer(IControlHandler, IConnectionAdopter)
class ControlResponder:
    """
    Answers the control commands for one generation.
    """

    log = Logger()

    def __init__(self, generation: IGeneration) -> None:
        self.generation = generation

    def connectionOpened(self, protocol: ControlProtocol) -> None:
        pass

    def connectionClosed(self, protocol: ControlProtocol, reason: Failure) -> None:
        gen = self.generation
        if gen.draining.linkClosed(protocol):
            if gen.machine is not None:
                # (A takeover that failed before serving closes this link too: no news then.)
                self.log.info("a draining predecessor has gone")
            # Pass the news on if we are draining ourselves.
            gen.sessionsChanged()
        if protocol is gen.successor and gen.machine is not None:
            gen.successorLinkLost()

    def hello(self, protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        gen = self.generation
        try:
            return self._hello(protocol, version, pid)
        except (HandoffBusy, VersionMismatch):
            gen.figures.count("refused")
            raise

    def _hello(self, protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        gen = self.generation
        if gen.draining.isLink(protocol):
            # Our own Hello came back on the link we took over on: whatever answers there (an
            # echo server, say) is no graceful server.
            raise NoHandoff("a Hello arrived on a successor's own handoff link")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"this server speaks control protocol {PROTOCOL_VERSION}, the successor {version}"
            )
        if gen.machine is None or gen.successor is not None:
            raise HandoffBusy("handoff already in progress")
        draining = gen.drainingGenerations()
        if draining >= gen.settings.maxDraining:
            raise HandoffBusy(
                f"{draining} generation(s) still draining (--max-draining"
                f" {gen.settings.maxDraining}); try again when they have finished"
            )
        if protocol.peer is not None and protocol.peer[0] != pid:
            self.log.warn(
                "successor says it is pid {claimed} but its socket belongs to pid {actual}",
                claimed=pid,
                actual=protocol.peer[0],
            )
        gen.successorPid = pid
        gen.successor = protocol
        if not gen.machine.requestHandoff():
            gen.successor = None
            raise HandoffBusy(f"handoff already in progress or server {gen.machine.describe()}")
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "generation": gen.generation,
            "workers": max(gen.settings.workers, 1),
        }

    def _requireSuccessor(self, protocol: ControlProtocol) -> GenerationInputs:
        gen = self.generation
        if protocol is not gen.successor or gen.machine is None:
            raise NoHandoff("no handoff in progress on this connection; send Hello first")
        return gen.machine

    def takeOver(self, protocol: ControlProtocol, start: int) -> dict[str, Any]:
        gen = self.generation
        self._requireSuccessor(protocol)
        return gen.listeners.takeoverBatch(start)

    def commit(
        self, protocol: ControlProtocol, dropped: list[str] | None = None
    ) -> Deferred[dict[str, Any]]:
        gen = self.generation
        self._requireSuccessor(protocol)
        # A newer generation takes over: the one standing by for us will not be needed, and
        # must not resume should we die before our successor confirms.  It hears so (briefly
        # awaited) before we pause, so that the wait costs nothing of the confirm window.
        told = tellStandDown(
            gen.draining.links(),
            f"generation {gen.generation + 1} (pid {gen.successorPid}) takes over from"
            f" generation {gen.generation}",
            gen.reactor,
        )
        asked = gen.reactor.seconds()
        return told.addCallback(lambda _: self._commitNow(protocol, dropped, asked))

    def _commitNow(self, protocol: ControlProtocol, dropped: list[str] | None, asked: float) -> Any:
        gen = self.generation
        machine = self._requireSuccessor(protocol)
        # Listeners the successor does not keep: closed for good once it accepts.
        gen.listeners.dropped = set(dropped or [])
        if not machine.commit():
            raise NoHandoff(f"nothing to commit: server {machine.describe()}")
        gen.committedAt = time.monotonic()
        self.log.info(
            "handoff to pid {pid} committed {ms:.1f} ms after it connected; paused accepting",
            pid=gen.successorPid,
            ms=(gen.committedAt - protocol.openedAt) * 1000,
            generation=gen.generation,
        )
        answer = {
            "confirmWithin": gen.settings.confirmTimeout,
            "waited": gen.reactor.seconds() - asked,
        }
        workers = gen.workers
        if workers is None or not workers.active:
            # The answer leaves first (nobody accepts until the successor has read it); the
            # observers (the restart's progress to graceful-ctl, systemd) hear on the next turn.
            gen.reactor.callLater(0, gen.tell, "handoffPaused", gen.successorPid)
            return answer

        # At most one generation accepts: answer only once every worker has paused too.
        def paused(_: object) -> dict[str, Any]:
            self.log.info("every worker paused", generation=gen.generation)
            gen.tell("handoffPaused", gen.successorPid)
            return answer

        def notPaused(failure: Failure) -> dict[str, Any]:
            reason = f"a worker did not pause: {failure.getErrorMessage()}"
            if gen.machine is not None:
                gen.machine.successorLost(reason)
            raise NoHandoff(f"the handoff was rolled back: {reason}")

        return workers.pause().addCallbacks(paused, notPaused)

    def accepting(self, protocol: ControlProtocol) -> dict[str, Any]:
        gen = self.generation
        if protocol is not gen.successor or gen.machine is None:
            raise RolledBack("the handoff was rolled back; the predecessor serves on")
        if gen.machine.successorAccepting():
            if not protocol.sendsStandDown:
                # An older successor never says when it stops: standing by for it could resume
                # a service the operator stopped.
                self.log.info(
                    "not standing by: the successor (an older version) does not send StandDown"
                )
                gen.machine.standDown()
        elif not gen.handedOver:
            raise RolledBack(f"the handoff was rolled back: server {gen.machine.describe()}")
        return {}

    def standDown(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        gen = self.generation
        if protocol is gen.successor and gen.machine is not None:
            self.log.info(
                "no longer standing by: {reason}", reason=reason, generation=gen.generation
            )
            gen.machine.standDown()
        return {}

    def abort(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        machine = self._requireSuccessor(protocol)
        machine.successorLost(f"the successor gave up: {reason}")
        return {}

    def adoptConnection(
        self, protocol: ControlProtocol, listener: str, address: str, fd: int
    ) -> None:
        gen = self.generation
        # IConnectionAdopter: a connection our draining predecessor hands over (handover.py);
        # not once we drain ourselves (it would miss our drain: it drains where it is).
        if not gen.draining.isLink(protocol) or gen.machine is None or gen.isDraining():
            os.close(fd)
            raise NoHandoff("only a draining predecessor hands connections over, to a server")
        adoptHandedOver(gen.ports, listener, address, fd)
        gen.figures.tookHandedOver()

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        gen = self.generation
        # From our predecessor's link, or from a generation draining further behind that
        # connected to us directly once the generation it reported to had gone.  (AMP fills an
        # optional field it did not get with None: drop those, as never said.)
        gen.draining.report(
            protocol,
            [
                {key: value for key, value in entry.items() if value is not None}
                for entry in generations
            ],
        )
        # Pass the news on if we are draining ourselves.
        gen.sessionsChanged()

    def status(self, protocol: ControlProtocol, start: int = 0) -> dict[str, Any]:
        gen = self.generation
        listed = gen.listeners.statusBatch(start, gen.figures.connections(gen.ports))
        return {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "generation": gen.generation,
            "state": gen.machine.describe() if gen.machine is not None else "starting",
            "uptime": time.monotonic() - gen.startedAt,
            "listeners": listed["listeners"],
            "draining": gen.drainingEntries(),
            "next": listed["next"],
            "drainingGenerations": gen.drainingGenerations(),
            "workers": gen.workerEntries(),
            **gen.figures.totals(),
        }

    def counters(self, protocol: ControlProtocol, start: int) -> dict[str, Any]:
        gen = self.generation
        self._requireSuccessor(protocol)
        return gen.figures.batch(gen.listeners.all(), start)

    def stop(self, protocol: ControlProtocol, drainTimeout: float | None) -> dict[str, Any]:
        gen = self.generation
        gen.reactor.callLater(0, gen.stopGracefully, drainTimeout)
        return {}

    def restart(
        self, protocol: ControlProtocol, progress: bool, fresh: bool = False
    ) -> Deferred[dict[str, Any]]:
        gen = self.generation

        def report(phase: str, ms: float, detail: str) -> None:
            # (AMP never sets Protocol.connected: look at the transport.)
            transport = protocol.transport
            if transport is not None and not getattr(transport, "disconnecting", True):
                protocol.callRemote(control.RestartProgress, phase=phase, ms=ms, detail=detail)

        self.log.info(
            "restart requested over the control socket{fresh}",
            fresh=" (with a fresh fork server)" if fresh else "",
            generation=gen.generation,
        )
        return gen.restarter.start(report if progress else None, fresh=fresh)
