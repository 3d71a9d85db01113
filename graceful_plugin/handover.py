"""
Handing idle HTTP/1.x connections to the successor instead of closing them, so that a pooling
client never finds its connection closed under a request it just sent.

Closing an idle persistent connection races with its client: the client may send its next
request just as the server closes (nginx and HAProxy have the same race when they reload).  A
draining generation therefore moves every connection that is idle when it starts draining to
the process that serves now, with the descriptor, over the control link (the very socket moves:
the client sees nothing at all).

Two sides:

- the predecessor's (L{HandoverSender}): offered each live connection when draining starts, it
  takes those of plain TCP and Unix listeners whose protocol says it is idle (L{IHandOver}),
  that have nothing unsent and no request waiting unread in the kernel (that one is answered
  here at once, with C{Connection: close}), stops reading each one at once (what the client
  sends from then on waits in the kernel's receive buffer), sends a duplicate of its descriptor
  (L{control.AdoptConnection}), and once the successor answers that it serves it, drops its own
  copy without C{shutdown()} (L{dropCopy}).  If the successor refuses, is an older version
  (UNHANDLED) or its link closes, it reads the connection again and drains it politely, as
  before.  There is no timeout: a connection whose answer never came may be served by the
  successor, so it is never read again here unless the link closed (then the successor either
  never took it or has died, and with it its copy);
- the successor's (L{adoptHandedOver}): checks the descriptor (a connected stream socket of
  that listener) and serves it on its own port of the listener as if it had accepted it.

TLS connections are never handed over: their TLS state lives in this process.  Nor are HTTP/2
connections (they get GOAWAY), connections switched to another protocol (a WebSocket gets its
Close), or those with a request in progress (answered with C{Connection: close}).  A worker
process of a generation (C{--workers}) hands its idle connections to its leader, which passes
them on to the successor (L{relay}).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionClosed, ConnectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from graceful_plugin.control import AdoptConnection, BadArgument, NoHandoff
from graceful_plugin.listeners import probeSocket
from graceful_plugin.sessions import IHandOver, unreadBytes, unsentBytes

#: The listener kinds whose connections can move to another process (no TLS state in ours).
KINDS = ("tcp", "tcp6", "unix")

#: Connections whose descriptor is on its way at once, once the successor has adopted one (the
#: first goes alone: an older successor strands only that one descriptor until its link closes).
WINDOW = 32

log = Logger()


class ConnectionHandedOver(ConnectionDone):
    """
    The connection was handed over to the successor: this process no longer serves it, and the
    client was told nothing, since it did not notice.
    """


def canHandOver(transport: Any) -> bool:
    """
    Whether the connection on C{transport} can move to another process now: open, of a plain
    TCP or Unix listener, nothing unsent, its protocol itself (not one wrapped in TLS) says it
    is idle, and nothing of a next request is waiting in the kernel for us to read.
    """
    port = getattr(transport, "server", None)
    if getattr(port, "kind", None) not in KINDS or getattr(transport, "TLS", False):
        return False
    if not getattr(transport, "connected", False) or transport.disconnecting:
        return False
    if getattr(transport, "_aborting", False) or unsentBytes(transport):
        return False
    idle = IHandOver(getattr(transport, "protocol", None), None)
    if idle is None or not idle.idleForHandover():
        return False
    # A request already waiting in the kernel is answered here, at once, with Connection:
    # close: handed over, it would wait until the successor, busiest just after it took over,
    # got round to the handoff and then to the request (30-57 ms measured under load).
    return not unreadBytes(transport)


def dropCopy(transport: Any) -> None:
    """
    Let go of our copy of a connection the successor now serves: close our descriptor without
    C{shutdown()} (which would end the connection for the successor too) and without
    C{SO_LINGER} (a reset), and run the protocol's C{connectionLost} so that our sessions count
    down.

    C{tcp.Connection.connectionLost} closes the socket through C{_SocketCloser._closeSocket}:
    C{shutdown(2)} first when the close is orderly and C{_shouldShutdown} is true (its default),
    C{SO_LINGER} of 0 when the reason is C{ConnectionAborted}.  So C{_shouldShutdown} is turned
    off (the private flag our listening ports turn off too) and the reason is a clean
    L{ConnectionHandedOver}.  Nothing is left to write and nothing is read (the sender checked
    and paused), so losing the connection now loses nothing; it is done at once rather than
    through C{loseConnection}, which would wait for the reactor to report the socket writable.
    """
    transport._shouldShutdown = False
    if getattr(transport, "disconnected", False) or not hasattr(transport, "socket"):
        return
    transport.connectionLost(Failure(ConnectionHandedOver("handed over to the successor")))


class HandoverSender:
    """
    The draining predecessor's side: hands every connection it takes (L{offer}) to the
    successor on C{link}, a few at a time, and drains politely those it cannot hand over.

    @ivar handedOver: connections the successor took.
    @ivar fellBack: connections taken but drained here after all (refused, older successor,
        link lost).
    """

    def __init__(
        self,
        link: amp.AMP,
        draining: Callable[[], bool],
        window: int = WINDOW,
    ) -> None:
        """
        @param link: the control link to the successor, which confirmed it accepts (or a
            worker's link to its leader, which passes each connection on).
        @param draining: whether this generation still drains (a connection that cannot be
            handed over is drained politely then; after a resume it is simply served on).
        """
        self.link = link
        self.draining = draining
        self.window = window
        self._queue: deque[Any] = deque()
        self._inFlight = 0
        self._proven = False
        self._refused = False
        self._warned = False
        self._reported = (0, 0)
        self.handedOver = 0
        self.fellBack = 0

    def offer(self, transport: Any) -> bool:
        """
        Take the connection on C{transport} if it can be handed over (L{canHandOver}): it stops
        being read at once, and is handed over or drained here.  For
        L{graceful_plugin.sessions.SessionTracker.drain}.

        @return: whether it was taken (it must not be drained by the caller then).
        """
        if self._refused or not canHandOver(transport):
            return False
        # From here no byte of this connection reaches our process, and nothing of ours shuts
        # the socket down (a close of our copy now leaves the successor's alone).
        transport.stopReading()
        transport._shouldShutdown = False
        self._queue.append(transport)
        self._pump()
        return True

    def _pump(self) -> None:
        while self._queue and self._inFlight < (self.window if self._proven else 1):
            self._send(self._queue.popleft())
        done = (self.handedOver, self.fellBack)
        if not self._queue and not self._inFlight and any(done) and done != self._reported:
            self._reported = done
            log.info(
                "handed {handedOver} idle connection(s) over to the successor; {fellBack} closed"
                " politely instead",
                handedOver=self.handedOver,
                fellBack=self.fellBack,
            )

    def _send(self, transport: Any) -> None:
        if self._refused or not canHandOver(transport):
            # Closed meanwhile (the drain deadline, a timeout), or an older successor.
            self._fallBack(transport)
            return
        port = transport.server
        try:
            fd = os.dup(transport.fileno())
        except OSError:
            self._fallBack(transport)
            return
        self._inFlight += 1
        # The duplicate stays open until the answer: the descriptor leaves with a later write.
        d: Deferred[Any] = maybeDeferred(
            self.link.callRemote,
            AdoptConnection,
            listener=port.name,
            address=localAddress(transport),
            fd=fd,
        )

        def answered(result: object) -> None:
            os.close(fd)
            self._inFlight -= 1
            if isinstance(result, Failure):
                self._notAdopted(transport, result)
            else:
                self._adopted(transport)

        d.addBoth(answered)

    def _adopted(self, transport: Any) -> None:
        self._proven = True
        self.handedOver += 1
        # The next ones go first (and the summary is logged before our last session ends).
        self._pump()
        dropCopy(transport)

    def _notAdopted(self, transport: Any, failure: Failure) -> None:
        if failure.check(amp.UnhandledCommand):
            if not self._refused:
                log.info(
                    "the successor (an older version) adopts no connections: closing idle"
                    " connections politely"
                )
            self._refused = True
        elif failure.check(ConnectionClosed, NoHandoff):
            # Nothing more can go (the link is lost, or the other end takes no connections now:
            # a leader whose successor has gone): the rest is drained here.
            self._refused = True
        elif not self._warned:
            self._warned = True
            log.warn(
                "the successor did not adopt an idle connection ({error}): closing it politely",
                error=failure.getErrorMessage(),
            )
        self._fallBack(transport)
        self._pump()

    def _fallBack(self, transport: Any) -> None:
        """
        Serve the connection here again, and drain it as before if we still drain.
        """
        self.fellBack += 1
        if not getattr(transport, "connected", False) or getattr(transport, "disconnected", False):
            return
        transport._shouldShutdown = True
        transport.startReading()
        if self.draining():
            transport.server.sessions.drainOne(transport)


def relay(link: amp.AMP | None, listener: str, address: str, fd: int) -> Deferred[Any]:
    """
    The leader's part for a worker's connection (C{--workers}): pass C{fd}, which the worker
    handed over, on to the successor on C{link}, and answer as the successor did.  C{fd} is
    closed once the successor answered (or at once, without a successor).  Whatever keeps the
    successor from taking connections at all (none, an older version, a lost link) is
    L{NoHandoff}, so that the worker stops offering them.
    """
    if link is None:
        os.close(fd)
        return fail(NoHandoff("no successor takes connections now"))
    d: Deferred[Any] = maybeDeferred(
        link.callRemote, AdoptConnection, listener=listener, address=address, fd=fd
    )

    def answered(result: object) -> object:
        os.close(fd)
        if isinstance(result, Failure) and result.check(amp.UnhandledCommand, ConnectionClosed):
            reason = f"the successor takes no connections ({result.type.__name__})"
            return Failure(NoHandoff(reason))
        return result

    return d.addBoth(answered).addCallback(lambda _: {})


def connectionProblem(fd: int) -> str | None:
    """
    What is wrong with C{fd} as a connection, in words; L{None} when it is a connected stream
    socket (not a listening one).  C{fd} is left open.
    """
    probe = probeSocket(fd)
    if isinstance(probe, str):
        return probe
    with probe:
        if probe.type != socket.SOCK_STREAM:
            return "it is not a stream socket"
        if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "it is a listening socket"
        try:
            probe.getpeername()
        except OSError as e:
            return f"it is not connected ({e.strerror})"
    return None


def _accepts(port: Any, family: int, local: Any) -> bool:
    """
    Whether a connection of C{family} whose local end is C{local} can have been accepted on the
    listening C{port}: the same family, and the port's path (Unix), or its port number and its
    address or a wildcard one (TCP).
    """
    sock = getattr(port, "socket", None)
    if sock is None or sock.family != family:
        return False
    listening = sock.getsockname()
    if family == socket.AF_UNIX:
        return bool(local == listening)
    return bool(local[1] == listening[1] and listening[0] in (local[0], "0.0.0.0", "::"))


def portFor(ports: Iterable[Any], fd: int) -> Any:
    """
    The plain TCP or Unix listening port among C{ports} that the connection C{fd} belongs to
    (found by its local end, which is the listener's: the connection was accepted on the very
    socket we adopted), or L{None}.
    """
    probe = socket.socket(fileno=os.dup(fd))
    with probe:
        family, local = probe.family, probe.getsockname()
    for port in ports:
        if port.kind in KINDS and port.connected and _accepts(port, family, local):
            return port
    return None


def adoptHandedOver(ports: Iterable[Any], listener: str, address: str, fd: int) -> Any:
    """
    The successor's side: serve the connection C{fd}, handed over by the predecessor (accepted
    on its listener C{listener}, local address C{address}), on our port of that listener, as if
    that port had accepted it.  C{fd} is closed in every case.

    @return: the connection's transport.
    @raise BadArgument: with a sentence, when C{fd} is no connection, or no plain TCP or Unix
        listener of ours is the one it came in on.
    """
    try:
        problem = connectionProblem(fd)
        if problem is not None:
            raise BadArgument(f"a connection handed over on {listener} is no connection: {problem}")
        port = portFor(ports, fd)
        if port is None:
            raise BadArgument(
                f"no plain TCP or Unix listener of ours is the one the connection handed over"
                f" on {listener} ({address}) came in on"
            )
        # (The flag belongs to the socket, which the predecessor's reactor read: set already.)
        os.set_blocking(fd, False)
        transport = port.adoptConnection(fd)
        if transport is None:
            raise BadArgument(f"the application of {listener} refused the connection")
        return transport
    finally:
        os.close(fd)


def localAddress(transport: Any) -> str:
    """
    A connection's local address, as people read it (for the successor's messages).
    """
    try:
        host = transport.getHost()
    except Exception:
        return "?"
    name = getattr(host, "name", None)
    if name is not None or not hasattr(host, "host"):
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"


__all__ = [
    "KINDS",
    "WINDOW",
    "ConnectionHandedOver",
    "HandoverSender",
    "adoptHandedOver",
    "canHandOver",
    "connectionProblem",
    "localAddress",
    "portFor",
    "dropCopy",
    "relay",
    "unsentBytes",
]
