"""
Live sessions: counting the connections a listener accepted, telling them when their generation
drains, and closing what is left at the drain deadline.
"""

from __future__ import annotations

import array
import fcntl
import termios
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface


class IDrainable(Interface):
    """
    A protocol that can wind down politely when its generation starts draining.

    A drainable protocol finishes the work in progress and then closes its connection (an HTTP
    channel answers the request it is reading with ``Connection: close``; a chat protocol asks its
    client to reconnect).  The generation closes whatever is still open at the drain deadline.
    """

    def drain() -> None:
        """
        The generation this connection belongs to is draining: finish, then close.
        """


class IHandOver(Interface):
    """
    A protocol whose connection may move to another process while it is idle: the draining
    generation hands such a connection, on a plain TCP or Unix listener, to its successor
    instead of closing it (L{graceful_plugin.handover}).
    """

    def idleForHandover() -> bool:
        """
        Whether the connection is between requests, with nothing of the next one received or
        buffered: a process that starts reading its socket afresh loses nothing.
        """

    def offerWhenIdle(offer: Callable[[], bool]) -> None:
        """
        The generation drains and this connection is not idle: once it is (the response it was
        writing is done, and promised the client a persistent connection), call C{offer()}; it
        answers C{True} when it took the connection (to hand it over), C{False} when the
        connection must be drained here as an idle one.
        """


class IInFlight(Interface):
    """
    A protocol that can say what work it has in progress, for the log when the drain deadline
    cuts its connection (an HTTP channel names each request it is still answering).
    """

    def inFlight() -> list[dict[str, Any]]:
        """
        The work in progress: one dict per request, with C{method}, C{path}, C{sent} (bytes of
        the response body written to the connection so far) and C{receiving} (whether its
        request body was still arriving).
        """


def _provider(protocol: Any, interface: Any) -> Any:
    """
    The provider of C{interface} behind C{protocol}, looking through wrapping protocols (TLS,
    policies), or L{None}.
    """
    seen = 0
    while protocol is not None and seen < 8:
        found = interface(protocol, None)
        if found is not None:
            return found
        protocol = getattr(protocol, "wrappedProtocol", None)
        seen += 1
    return None


def _inFlightOf(protocol: Any) -> IInFlight | None:
    return _provider(protocol, IInFlight)


def unsentBytes(transport: Any) -> int:
    """
    The bytes written to C{transport} and not yet given to the kernel.

    C{abstract.FileDescriptor} keeps them in C{dataBuffer} (from C{offset}) and
    C{_tempDataBuffer} (C{_tempDataLen} bytes), with no public accessor; a connection with any
    cannot move (they would be lost with our copy).
    """
    buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return buffered + getattr(transport, "_tempDataLen", 0)


def unreadBytes(transport: Any) -> int:
    """
    The bytes the kernel holds for C{transport} that we have not read yet (C{FIONREAD}); 0 when
    it cannot say (no descriptor, closed).
    """
    try:
        fd = transport.fileno()
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count, True)
    except (AttributeError, OSError, ValueError):
        return 0
    return count[0]


def drainableOf(protocol: Any) -> IDrainable | None:
    """
    The L{IDrainable} behind C{protocol}, looking through wrapping protocols (TLS, policies).
    """
    return _provider(protocol, IDrainable)


class SessionTracker:
    """
    The live connections of one listener.

    Transports report themselves with L{opened} and L{closed}; observers hear the new count after
    every change.

    @ivar accepted: how many connections were accepted, ever (a plain integer: the metrics read
        it at scrape time, so counting costs one increment and no lock).
    @ivar adopted: how many live-or-gone connections came handed over by a draining predecessor
        (L{graceful_plugin.handover}) instead of being accepted.
    """

    log = Logger()

    def __init__(self) -> None:
        self._live: set[Any] = set()
        self.accepted = 0
        self.adopted = 0
        # A tuple, replaced (not changed) by observe(): a change may add an observer while the
        # observers are being told, and telling them copies nothing.
        self._observers: tuple[Callable[[], None], ...] = ()

    @property
    def count(self) -> int:
        """
        How many connections are open.
        """
        return len(self._live)

    def observe(self, observer: Callable[[], None]) -> None:
        """
        Call C{observer} (with no arguments) after every change in the count.
        """
        self._observers += (observer,)

    def opened(self, transport: Any) -> None:
        """
        A connection was accepted.
        """
        self.accepted += 1
        self._live.add(transport)
        for observer in self._observers:
            observer()

    def closed(self, transport: Any) -> None:
        """
        A connection ended.
        """
        self._live.discard(transport)
        for observer in self._observers:
            observer()

    def handedOverInstead(self, transport: Any) -> None:
        """
        The connection on C{transport}, just L{opened}, was handed over by the generation that
        accepted it (which counted it, and whose counters we continue): not one more accepted.
        """
        self.accepted -= 1
        self.adopted += 1

    def drain(self, handOver: Callable[[Any], bool] | None = None) -> None:
        """
        Tell every live connection whose protocol is L{IDrainable} to wind down; with
        C{handOver}, offer each connection to it first, and leave alone those it takes (it
        answers C{True}: it hands them to the successor, or drains them itself if that fails).
        """
        for transport in list(self._live):
            if handOver is not None:
                if handOver(transport):
                    continue
                # Busy now: offered again once idle (a response that promised keep-alive).
                later = _provider(getattr(transport, "protocol", None), IHandOver)
                if later is not None:
                    later.offerWhenIdle(lambda t=transport: handOver(t))
            self.drainOne(transport)

    def drainOne(self, transport: Any) -> None:
        """
        Tell the connection on C{transport} to wind down, if its protocol is L{IDrainable}.
        """
        drainable = drainableOf(getattr(transport, "protocol", None))
        if drainable is None:
            return
        try:
            drainable.drain()
        except Exception:
            self.log.failure("draining {protocol!r} failed", protocol=drainable)

    def abortAll(self) -> int:
        """
        Abort every connection still open (the drain deadline passed).

        @return: how many were aborted.
        """
        live = list(self._live)
        for transport in live:
            self._logCut(transport)
            transport.abortConnection()
        return len(live)

    def _logCut(self, transport: Any) -> None:
        """
        Log each request the connection on C{transport} was still answering.
        """
        inFlight = _inFlightOf(getattr(transport, "protocol", None))
        if inFlight is None:
            return
        try:
            requests = inFlight.inFlight()
        except Exception:
            self.log.failure(
                "listing the requests in flight on {peer} failed", peer=_peer(transport)
            )
            return
        for request in requests:
            if request.get("receiving"):
                self.log.warn(
                    "drain deadline: cut {method} {path} from {peer} while its request body"
                    " was arriving",
                    peer=_peer(transport),
                    **request,
                )
            else:
                self.log.warn(
                    "drain deadline: cut {method} {path} from {peer} after {sent} bytes of"
                    " its response",
                    peer=_peer(transport),
                    **request,
                )


def _peer(transport: Any) -> str:
    """
    The peer of a connection, as people read it.
    """
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"[{host}]:{peer.port}" if ":" in host else f"{host}:{peer.port}"
    name = getattr(peer, "name", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"unix:{name}" if name else "unix peer"
