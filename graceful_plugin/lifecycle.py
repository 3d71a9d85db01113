"""
What happens to a generation, told to whoever needs to know: systemd (C{sd_notify}), a pending
restart, and the listeners systemd passed at start (socket activation).

The server calls every L{IGenerationObserver} it has at each transition; an observer never
changes what the server does, and an observer that fails is logged, never raised.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface, implementer

from graceful_plugin.listeners import ListenerSpec
from graceful_plugin.systemd import ActivatedSocket, Notifier, listenFds

#: At most one C{STATUS=} for session changes per this many seconds.
STATUS_INTERVAL = 1.0

#: The socket kinds a listener can adopt.
STREAM_KINDS = ("tcp", "tcp6", "unix")


class IGenerationObserver(Interface):
    """
    Told of each transition of one generation.  Each method gets the generation (a
    L{graceful_plugin.generation.Generation}).
    """

    def serving(server: Any) -> None:
        """
        The generation accepts connections for the first time (a takeover: after its commit,
        before its predecessor confirmed the switch).
        """

    def handoffStarted(server: Any, pid: int) -> None:
        """
        A successor, pid C{pid}, said hello.
        """

    def handoffPaused(server: Any, pid: int) -> None:
        """
        The successor committed: this generation paused accepting.
        """

    def handoffCommitted(server: Any, pid: int) -> None:
        """
        The successor confirmed it accepts: this generation only drains from now on.
        """

    def handoffAborted(server: Any, pid: int, reason: str) -> None:
        """
        The handoff to C{pid} was rolled back for C{reason}: this generation serves on (unless
        it is stopping).
        """

    def resumed(server: Any, reason: str) -> None:
        """
        The successor this generation stood by for was lost (C{reason}): it serves again, as
        its own generation, and owns the pidfile and the control path.
        """

    def stopping(server: Any) -> None:
        """
        A graceful stop: this generation stopped accepting for good and drains.
        """

    def sessionsChanged(server: Any) -> None:
        """
        The live session count changed, here or in a generation draining behind us.
        """


@implementer(IGenerationObserver)
class Observer:
    """
    An observer that ignores everything: subclass it and override what matters.
    """

    def serving(self, server: Any) -> None:
        pass

    def handoffStarted(self, server: Any, pid: int) -> None:
        pass

    def handoffPaused(self, server: Any, pid: int) -> None:
        pass

    def handoffCommitted(self, server: Any, pid: int) -> None:
        pass

    def handoffAborted(self, server: Any, pid: int, reason: str) -> None:
        pass

    def resumed(self, server: Any, reason: str) -> None:
        pass

    def stopping(self, server: Any) -> None:
        pass

    def sessionsChanged(self, server: Any) -> None:
        pass


def statusText(server: Any, state: str) -> str:
    """
    One line for C{systemctl status}: generation, pid, state, live sessions, draining ones.
    (Built without asking the state machine, which may be in the middle of a transition.)
    """
    text = (
        f"generation {server.generation} (pid {os.getpid()}) {state},"
        f" {server.liveSessions()} sessions"
    )
    draining = server.drainingEntries()
    if draining:
        text += "; draining: " + ", ".join(
            f"generation {d['generation']} (pid {d['pid']}) {d['sessions']} sessions"
            for d in draining
        )
    return text


@implementer(IGenerationObserver)
class SystemdNotifications(Observer):
    """
    Tell systemd what happens, in the order docs/systemd.md explains: C{READY=1} once the first
    generation serves; C{RELOADING=1} when a successor says hello; C{MAINPID=} with the
    successor's pid and C{READY=1} from the predecessor once the successor confirms it accepts;
    C{READY=1} again on rollback; C{STOPPING=1} on a graceful stop; C{STATUS=} along the way.

    A successor says nothing until its predecessor has named it the main process; then it keeps
    C{STATUS=} up to date.
    """

    log = Logger()

    def __init__(self, notifier: Notifier, clock: Any, interval: float = STATUS_INTERVAL) -> None:
        self.notifier = notifier
        self.clock = clock
        self.interval = interval
        self._statusCall: Any = None

    def _send(self, server: Any, state: str, **fields: object) -> None:
        fields["STATUS"] = statusText(server, state)
        self.notifier.notify(**fields)

    def serving(self, server: Any) -> None:
        if server.settings.takeover:
            # Our predecessor tells systemd about us once we confirmed we accept.
            return
        self._send(server, "serving", READY=1)

    def handoffStarted(self, server: Any, pid: int) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(server, f"handing off to pid {pid}", RELOADING=1, MONOTONIC_USEC=usec)

    def handoffCommitted(self, server: Any, pid: int) -> None:
        self.notifier.notify(
            MAINPID=pid,
            READY=1,
            STATUS=f"generation {server.generation + 1} (pid {pid}) serving;"
            f" generation {server.generation} (pid {os.getpid()}) draining",
        )

    def handoffAborted(self, server: Any, pid: int, reason: str) -> None:
        if server.stopping:
            return
        self._send(server, "serving (handoff rolled back)", READY=1)

    def resumed(self, server: Any, reason: str) -> None:
        # The main process is us again.
        self._send(server, "serving (successor lost)", MAINPID=os.getpid(), READY=1)

    def stopping(self, server: Any) -> None:
        self._send(server, "stopping", STOPPING=1)

    def sessionsChanged(self, server: Any) -> None:
        if not self.notifier.enabled or self._statusCall is not None:
            return
        self._statusCall = self.clock.callLater(self.interval, self._sendStatus, server)

    def _sendStatus(self, server: Any) -> None:
        self._statusCall = None
        # Only the generation that serves speaks for the service; a draining one's sessions are
        # in its successor's status.
        if server.machine is not None and server.machine.describe() == "serving":
            self.notifier.status(statusText(server, "serving"))


@dataclass
class ActivationPlan:
    """
    How the first generation gets its listeners when systemd passed some.

    @ivar adopt: (listener name, activated socket) pairs to adopt.
    @ivar bind: the C{--port} listeners no activated socket matched: bind them ourselves.
    @ivar unused: activated sockets nobody wants (closed, with a warning).
    @ivar specs: the C{--port} listener each adopted socket serves, by listener name (an
        ``ssl`` one is served through its TLS context, and handed on as ``ssl``).
    """

    adopt: list[tuple[str, ActivatedSocket]]
    bind: list[ListenerSpec]
    unused: list[ActivatedSocket]
    specs: dict[str, ListenerSpec] = field(default_factory=dict)


#: The kinds of activated socket each C{--port} kind can serve.
_SERVES = {
    "tcp": ("tcp", "tcp6"),
    "tcp6": ("tcp", "tcp6"),
    "ssl": ("tcp", "tcp6"),
    "unix": ("unix",),
}


def planActivation(
    specs: Sequence[ListenerSpec], activated: Sequence[ActivatedSocket]
) -> ActivationPlan:
    """
    Match the sockets systemd passed with the C{--port} listeners: by name (the socket unit's
    C{FileDescriptorName=} is the C{--port} name), else by address (an ``ssl`` listener by the
    address of a TCP socket).  Without any C{--port}, every stream socket is taken as it comes,
    under its own name.

    @raise ValueError: with a sentence, when the socket of a listener's name is of a kind that
        listener cannot serve (a Unix socket named like an ``ssl`` listener, say).
    """
    usable = [a for a in activated if a.kind in STREAM_KINDS]
    unused = [a for a in activated if a.kind not in STREAM_KINDS]
    if not specs:
        return ActivationPlan(adopt=[(a.name, a) for a in usable], bind=[], unused=unused)
    adopt: list[tuple[str, ActivatedSocket]] = []
    bind: list[ListenerSpec] = []
    served: dict[str, ListenerSpec] = {}
    for spec in specs:
        kinds = _SERVES.get(spec.kind, ())
        match = next((a for a in usable if a.name == spec.name), None)
        if match is not None and match.kind not in kinds:
            raise ValueError(
                f"--port {spec.name} is {spec.kind}, but the socket systemd passed under that"
                f" name is {match.kind} ({match.address or 'unbound'})"
            )
        if match is None:
            match = next((a for a in usable if a.kind in kinds and a.address == spec.address), None)
        if match is None:
            bind.append(spec)
            continue
        usable.remove(match)
        adopt.append((spec.name, match))
        served[spec.name] = spec
    return ActivationPlan(adopt=adopt, bind=bind, unused=unused + usable, specs=served)


def activatedSockets() -> list[ActivatedSocket]:
    """
    The listening sockets systemd passed us (socket activation), if any, with the variables
    removed from the environment so that our children do not see them.

    Importing C{twisted.internet.endpoints} consumes C{LISTEN_PID} and C{LISTEN_FDS} (its systemd
    endpoint parser reads them once, at import, and removes them), so when they are gone, the
    copy taken when C{graceful_plugin} was first imported is used, or else what that parser
    found.

    @raise ValueError: with a sentence naming the variable, when one is malformed.
    """
    if "LISTEN_FDS" not in os.environ:
        # (The package itself: the copy its __init__ took before Twisted's endpoints consumed it.)
        from graceful_plugin import _ACTIVATION

        environ = dict(_ACTIVATION) if "LISTEN_FDS" in _ACTIVATION else _consumedByTwisted()
        if environ is not None:
            os.environ.pop("LISTEN_FDNAMES", None)
            return listenFds(environ)
    return listenFds(unsetEnvironment=True)


def _consumedByTwisted() -> dict[str, str] | None:
    """
    The activation variables as Twisted's endpoint parser found them, if it found any.
    """
    endpoints = sys.modules.get("twisted.internet.endpoints")
    parser = getattr(endpoints, "_SystemdParser", None)
    found = getattr(parser, "_sddaemon", None)
    if found is None:
        return None
    descriptors = list(found.inheritedDescriptors())
    if not descriptors or descriptors != list(range(3, 3 + len(descriptors))):
        return None
    named = found.inheritedNamedDescriptors()
    names = sorted(named, key=named.__getitem__)
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(descriptors))}
    if len(names) == len(descriptors):
        environ["LISTEN_FDNAMES"] = ":".join(names)
    return environ


def closeActivated(sockets: Sequence[ActivatedSocket]) -> None:
    """
    Close our copies of sockets systemd passed (systemd keeps its own).
    """
    for sock in sockets:
        try:
            os.close(sock.fd)
        except OSError:
            pass
