"""
One generation's listening ports: the application's listeners and the control listener.

A L{ListenerSet} binds or adopts them (never accepting yet), pauses and resumes accepting,
releases them for a successor (no C{shutdown()}, no unlink), closes them for good, counts their
sessions, and describes them for L{graceful_plugin.control.TakeOver} and
L{graceful_plugin.control.Status}.  It knows nothing of the state machine or of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from graceful_plugin import control
from graceful_plugin.control import CONTROL_KIND, REPORT_LISTENERS, TAKEOVER_BATCH
from graceful_plugin.listeners import (
    AdoptedTCPPort,
    AdoptedUNIXPort,
    ListenerSpec,
    adoptListener,
    bindListener,
    portAddress,
)

Port = AdoptedTCPPort | AdoptedUNIXPort


class ListenerSet:
    """
    The listeners of one generation and its control listener.

    @ivar ports: the application's listeners (and the metrics listener, if any).
    @ivar controlPort: the control listener, once bound or adopted.
    @ivar dropped: names of listeners the successor does not keep: closed for good (not
        released) once it accepts.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        controlFactory: Callable[[], IProtocolFactory],
    ) -> None:
        self.reactor = reactor
        #: Makes the factory of the control listener's connections (called at each bind/adopt).
        self.controlFactory = controlFactory
        self.ports: list[Port] = []
        self.controlPort: Port | None = None
        self.dropped: set[str] = set()
        self._closing: list[Deferred[None] | None] = []

    def all(self) -> list[Port]:
        """
        Every listener, the control listener last.
        """
        return self.ports + ([self.controlPort] if self.controlPort is not None else [])

    # -- binding and adopting -------------------------------------------------------------

    def bind(self, spec: ListenerSpec, factory: Any, kind: str | None = None) -> Port:
        """
        Bind C{spec} ourselves and adopt the socket, not accepting yet (the caller keeps it).

        @raise OSError: with a sentence naming the listener, when it cannot listen.
        """
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

    def bindControl(self, path: str) -> Port:
        """
        Bind our control socket at C{path} (mode 0600), not accepting yet.
        """
        return self.bind(
            ListenerSpec(name="control", kind="unix", path=path, mode=0o600),
            self.controlFactory(),
            kind=CONTROL_KIND,
        )

    def adoptControl(self, fd: int) -> Port:
        """
        Adopt the control listener a predecessor handed over (C{fd} stays the caller's).
        """
        port = adoptListener(self.reactor, fd, "unix", self.controlFactory(), name="control")
        port.kind = CONTROL_KIND
        return port

    def install(self, ports: list[Port], controlPort: Port | None) -> None:
        """
        Take C{ports} and C{controlPort} as this generation's listeners.
        """
        self.ports = ports
        self.controlPort = controlPort

    def observe(self, changed: Callable[[], None]) -> None:
        """
        Call C{changed} on every accepted and every closed connection, on every listener.
        """
        for port in self.all():
            port.sessions.observe(changed)

    # -- accepting ------------------------------------------------------------------------

    def pause(self) -> None:
        """
        Stop accepting on every listener; the sockets stay open and connections wait.
        """
        for port in self.all():
            port.pauseAccepting()

    def resume(self) -> None:
        """
        Accept on every listener.
        """
        for port in self.all():
            port.resumeAccepting()

    def release(self) -> None:
        """
        Let go of every listener for a successor: released (never shut down nor unlinked),
        except those it dropped, which are closed for good.
        """
        for port in self.all():
            if not port.connected:
                continue  # closed already (dropped by the successor, at standBy)
            if port.name in self.dropped and port is not self.controlPort:
                self._closeDropped(port)
            else:
                self._closing.append(port.release())

    def closeDropped(self) -> None:
        """
        Close for good the listeners the successor dropped (it accepts on the others).
        """
        for port in self.ports:
            if port.name in self.dropped:
                self._closeDropped(port)

    def _closeDropped(self, port: Port) -> None:
        self.log.info(
            "closing listener {name} ({address}): the successor dropped it",
            name=port.name,
            address=portAddress(port),
        )
        self._closing.append(port.close())

    def close(self) -> None:
        """
        Close every listener for good, as the last generation (Unix paths unlinked).
        """
        for port in self.all():
            self._closing.append(port.close())

    def closed(self) -> Deferred[Any]:
        """
        Fires once every listener released or closed so far has finished closing.
        """
        return DeferredList([d for d in self._closing if d is not None])

    # -- sessions -------------------------------------------------------------------------

    def sessions(self) -> int:
        """
        The live sessions on our listeners (this process's own).
        """
        return sum(port.sessions.count for port in self.ports)

    def drain(self, offer: Callable[[Any], bool] | None = None) -> None:
        """
        Ask every session to finish (L{graceful_plugin.sessions.IDrainable}); C{offer}, if
        given, may take an idle connection off our hands first (L{graceful_plugin.handover}).
        """
        for port in self.ports:
            port.sessions.drain(offer)

    def abortSessions(self) -> int:
        """
        Close every session still open; how many there were.
        """
        return sum(port.sessions.abortAll() for port in self.ports)

    def busiest(self) -> list[dict[str, Any]]:
        """
        The listeners with sessions, busiest first (at most L{REPORT_LISTENERS}), for a report.
        """
        busiest = sorted(
            (port for port in self.ports if port.sessions.count),
            key=lambda port: -port.sessions.count,
        )[:REPORT_LISTENERS]
        return [{"name": p.name, "sessions": p.sessions.count} for p in busiest]

    # -- describing -----------------------------------------------------------------------

    def describe(self) -> str:
        """
        C{name=address} of every listener, for the log.
        """
        return ", ".join(f"{p.name}={portAddress(p)}" for p in self.ports)

    def takeoverBatch(self, start: int) -> dict[str, Any]:
        """
        The answer to L{graceful_plugin.control.TakeOver} from index C{start}: a batch of
        listeners (the control listener last) with their descriptors, and where the next starts.
        """
        ports = self.all()
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

    def statusBatch(self, start: int, connections: dict[str, int]) -> dict[str, Any]:
        """
        The listeners part of a L{graceful_plugin.control.Status} answer from index C{start}:
        open listeners only, with C{connections} accepted by name.
        """
        ports = [port for port in self.ports if port.connected]
        batch = ports[start : start + control.STATUS_BATCH]
        nextStart = start + len(batch)
        return {
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
            "next": nextStart if nextStart < len(ports) else -1,
        }


def _specText(port: Any) -> str | None:
    """
    A listener as a --port value, for a successor that names no listeners of its own.
    """
    spec = getattr(port, "spec", None)
    return spec.text if spec is not None else None
