"""
HTTP: a channel that drains politely, and the demo application served when no other is named.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, pages, resource, server
from zope.interface import implementer

from graceful_plugin.drainhooks import DrainCallbacks
from graceful_plugin.sessions import IDrainable, IHandOver, IInFlight, unsentBytes


def whenDraining(request: Any, callback: Callable[[], object]) -> None:
    """
    Call C{callback} (with no arguments) when the generation serving C{request} starts draining,
    or at once if it already has: a long response (server-sent events, a long poll) ends itself
    politely then, instead of at the drain deadline.  Works for HTTP/1.x and HTTP/2 requests of a
    site graceful serves.

    @raise TypeError: if C{request} is not served by such a site.
    """
    channel = request.channel
    # An HTTP/2 request's channel is its stream; the callbacks live on the connection.
    target = getattr(channel, "_conn", channel)
    if not isinstance(target, DrainCallbacks):
        raise TypeError("the request is not served by a draining site of graceful")
    target.addDrainCallback(callback)


#: How often, and how long apart (seconds), a connection that became idle while draining is
#: offered again while its last response is still leaving for the kernel.
_UNSENT_TRIES = 100
_UNSENT_WAIT = 0.002


@implementer(IDrainable, IInFlight, IHandOver)
class DrainableHTTPChannel(DrainCallbacks, http.HTTPChannel):
    """
    An HTTP/1.x channel that, once its generation drains, answers with ``Connection: close`` and
    closes an idle persistent connection between requests only, never while a request may be
    arriving.

    A connection idle when draining starts is closed only once it has stayed quiet long
    enough: L{idleGrace} seconds after draining started, and twice the longest pause seen
    between two requests on one connection (its own, or any of its site's, which is all a
    connection that served one request can go by), counted from its last response.  A pooling
    client that comes back at its usual pace (its next request may already be on the wire)
    gets its answer, with ``Connection: close``, instead of a connection closed under its
    request or an EOF that a load generator such as wrk counts as a read error.  Nor is it
    closed while a byte it sent sits unread in the kernel.  A connection that has not sent its
    first request yet is never closed as idle.
    """

    #: Seconds an idle connection must stay quiet after draining starts before it is closed.
    idleGrace = 1.0

    _draining = False
    _idleCheck: Any = None
    # When the last response was sent on this connection, if the connection stayed open after
    # it (None until then: a fresh connection's first request may still be on its way, and a
    # client does not retry a request on a connection closed before any answer), and the
    # longest pause seen before a following request.  A connection that closes after its
    # response (Connection: close, as every request of a load generator such as wrk asks)
    # never reads the clock.
    _lastDone: float | None = None
    _longestPause = 0.0
    _drainStarted = 0.0
    # Where a connection that becomes idle while draining is offered (L{offerWhenIdle}).
    _offerLater: Callable[[], bool] | None = None
    # Set by the site that builds the channel.
    site: Any = None

    def drain(self) -> None:
        self._draining = True
        if self.requests:
            last = self.requests[-1]
            if not last.startedWriting:
                last.responseHeaders.setRawHeaders(b"connection", [b"close"])
                self.persistent = False
            # Otherwise its headers have already promised the client a persistent connection:
            # closing after the response would race with the next request the client sends
            # at once (it would see a reset).  The connection stays persistent, and once the
            # response is done it drains as an idle one (L{requestDone}).
        elif self._lastDone is not None and self._idle() and self._idleCheck is None:
            self._drainIdle()
        # Last: a response that ends itself now closes the connection after it.
        self._fireDrainCallbacks()

    def offerWhenIdle(self, offer: Callable[[], bool]) -> None:
        """
        Once idle while draining, offer this connection (L{IHandOver.offerWhenIdle}).
        """
        self._offerLater = offer

    def _drainIdle(self) -> None:
        # Idle while draining: closed once it has stayed quiet long enough.
        self._drainStarted = self._now()
        self._scheduleIdleCheck(self._quietLeft())

    def _idleWhileDraining(self, tries: int = 0) -> None:
        # The response that promised keep-alive before draining began is done.  Hand the
        # connection over (once its response has left for the kernel: a connection with bytes
        # still unsent cannot move), or drain it as an idle one.
        if not self.persistent or self.requests or not self._idle() or self._idleCheck:
            return  # the next request came (Connection: close), or it is closing already
        transport = self.transport
        if transport is None or getattr(transport, "disconnected", False):
            return
        offer = self._offerLater
        if offer is not None:
            if offer():
                self._offerLater = None
                return
            if unsentBytes(transport) and tries < _UNSENT_TRIES:
                self.callLater(_UNSENT_WAIT, lambda: self._idleWhileDraining(tries + 1))
                return
            self._offerLater = None
        self._drainIdle()

    def _quietLeft(self) -> float:
        # Seconds this idle connection must still stay quiet before it may be closed.  The pace
        # is read again at every check: the site learns it from every connection meanwhile.
        now = self._now()
        left = self._drainStarted + self.idleGrace - now
        if self._lastDone is not None:
            pause = max(self._longestPause, getattr(self.site, "longestPause", 0.0))
            left = max(left, self._lastDone + 2 * pause - now)
        return left

    def _scheduleIdleCheck(self, delay: float) -> None:
        self._idleCheck = self.callLater(delay, self._closeIfQuiet)

    def _closeIfQuiet(self) -> None:
        # A request that arrived since draining started is still arriving (not idle), or was
        # told Connection: close (not persistent), which closes the connection after it.
        self._idleCheck = None
        if not self.persistent or not self._idle() or self.requests:
            return
        left = self._quietLeft()
        if left > 0.001:
            self._scheduleIdleCheck(left)
            return
        if _unreadBytes(self.transport):
            # A request arrived after the reactor last looked: it is read and answered (with
            # Connection: close) rather than reset by a close.
            self._scheduleIdleCheck(self.idleGrace)
            return
        self.loseConnection()

    def _now(self) -> float:
        # The clock the channel's timers run on (the reactor, or a test's Clock).
        clock = getattr(self.callLater, "__self__", None)
        seconds = getattr(clock, "seconds", None)
        return float(seconds()) if seconds is not None else time.time()

    def dataReceived(self, data: bytes) -> None:
        if self._lastDone is not None and not self.requests and self._idle():
            # The first bytes of another request on this connection: how long was it idle?
            pause = self._now() - self._lastDone
            if pause > self._longestPause:
                self._longestPause = pause
            if pause > getattr(self.site, "longestPause", pause):
                self.site.longestPause = pause
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idleCheck is not None:
            if self._idleCheck.active():
                self._idleCheck.cancel()
            self._idleCheck = None
        super().connectionLost(reason)

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            self._lastDone = self._now()
        super().requestDone(request)
        if self._draining and self.persistent:
            self._idleWhileDraining()

    def _idle(self) -> bool:
        # Between requests: waiting for a request line, and no part of one received yet.
        return bool(self._HTTPChannel__first_line) and not self._buffer  # type: ignore[attr-defined]

    def idleForHandover(self) -> bool:
        """
        Whether this connection is between requests with nothing of the next one received: no
        request queued or being answered, no pipelined bytes held back, the parser waiting for a
        request line with nothing in its buffer (L{IHandOver}).
        """
        return (
            not self.requests
            and not self._handlingRequest
            and not self._dataBuffer
            and bool(self.line_mode)
            and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
            and not self._buffer
            and not self._receivedHeaderSize
        )

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self._draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def inFlight(self) -> list[dict[str, Any]]:
        """
        The requests not answered in full yet (L{IInFlight}): for the log, when the drain
        deadline cuts this connection.
        """
        found = []
        for request in self.requests:
            if request.finished:
                continue
            receiving = not request.startedWriting and request.uri == b"(no uri yet)"
            method, path = (
                (getattr(self, "_command", b"?"), getattr(self, "_path", b"?"))
                if receiving
                else (request.method, request.uri)
            )
            found.append(
                {
                    "method": method.decode("latin-1"),
                    "path": path.decode("latin-1"),
                    "sent": request.sentLength,
                    "receiving": receiving,
                }
            )
        return found


def _unreadBytes(transport: Any) -> int:
    """
    How many bytes wait unread in the kernel for C{transport}'s socket (looking through TLS);
    0 when there is no socket to ask.
    """
    for _ in range(4):
        sock = getattr(transport, "socket", None)
        if sock is not None:
            try:
                raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except (OSError, ValueError):
                return 0
            return int(struct.unpack("i", raw)[0])
        transport = getattr(transport, "transport", None)
    return 0


@implementer(IDrainable, IInFlight, IHandOver)
class DrainableChannelSwitch(http._GenericHTTPChannelProtocol):  # type: ignore[misc]
    """
    The protocol a L{server.Site} builds (Twisted's private C{_GenericHTTPChannelProtocol}: it
    starts as HTTP/1.1 and becomes an HTTP/2 connection when TLS negotiated C{h2} with ALPN),
    made L{IDrainable}: both channels it switches between drain politely.

    C{twisted.web.http} builds its HTTP/2 connection inside C{dataReceived}; this class does
    the same switch (the same steps, in the same order) to build
    L{graceful_plugin.http2.DrainableH2Connection} instead, settles HTTP/1.1 as Twisted does,
    and hands any other negotiated protocol to Twisted (which refuses it).
    """

    _draining = False

    def drain(self) -> None:
        self._draining = True
        drainable = IDrainable(self._channel, None)
        if drainable is not None:
            drainable.drain()

    def inFlight(self) -> list[dict[str, Any]]:
        """
        What the channel it switched to has in progress (L{IInFlight}; an HTTP/2 connection
        names nothing).
        """
        inFlight = IInFlight(self._channel, None)
        return inFlight.inFlight() if inFlight is not None else []

    def offerWhenIdle(self, offer: Callable[[], bool]) -> None:
        """
        The HTTP/1.x channel offers itself once idle (L{IHandOver.offerWhenIdle}); HTTP/2 never.
        """
        if self._negotiatedProtocol in (None, b"http/1.1") and isinstance(
            self._channel, DrainableHTTPChannel
        ):
            self._channel.offerWhenIdle(offer)

    def idleForHandover(self) -> bool:
        """
        Whether the HTTP/1.x channel is idle between requests (L{IHandOver}); never for HTTP/2.
        """
        channel = self._channel
        return (
            self._negotiatedProtocol in (None, b"http/1.1")
            and isinstance(channel, DrainableHTTPChannel)
            and channel.idleForHandover()
        )

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2" and http.H2_ENABLED:
                self._switchToHTTP2()
                self._channel.dataReceived(data)
                if self._draining:
                    # Drained before its first bytes: the GOAWAY goes after the client's
                    # preface and settings are answered (an h2 client takes no frame after a
                    # GOAWAY).
                    self._channel.drain()
                return
            if negotiated not in (None, b"http/1.1"):
                # Twisted's own answer to what it does not serve.
                super().dataReceived(data)
                return
            self._negotiatedProtocol = b"http/1.1"  # type: ignore[assignment]
        # (Straight to the channel: Twisted's dataReceived would ask the transport again.)
        self._channel.dataReceived(data)

    def _switchToHTTP2(self) -> None:
        from graceful_plugin.http2 import DrainableH2Connection

        networkProducer = self._channel._networkProducer
        networkProducer.unregisterProducer()
        self._channel.setTimeout(None)
        transport = self._channel.transport
        self._channel = DrainableH2Connection(reactor=getattr(self._factory, "reactor", None))
        self._channel.requestFactory = self._requestFactory
        self._channel.site = self._site
        self._channel.factory = self._factory
        self._channel.timeOut = self._timeOut
        self._channel.callLater = self._callLater
        self._channel.makeConnection(transport)
        networkProducer.registerProducer(self._channel, True)
        self._negotiatedProtocol = b"h2"  # type: ignore[assignment]


def _drainableChannel(factory: http.HTTPFactory) -> DrainableChannelSwitch:
    return DrainableChannelSwitch(DrainableHTTPChannel())


class DrainableSite(server.Site):
    """
    A L{server.Site} whose connections drain politely: HTTP/1.x with ``Connection: close`` and
    closing idle connections between requests, HTTP/2 (negotiated with ALPN on TLS, exactly as
    Twisted's own site does it) with GOAWAY.
    """

    protocol = _drainableChannel  # type: ignore[assignment]

    #: The longest pause seen between two requests on one connection of this site, in seconds:
    #: how long its clients may leave a persistent connection idle before they reuse it.
    longestPause = 0.0


def drainableSite(root: resource.IResource, **kwargs: Any) -> server.Site:
    """
    A L{server.Site} whose channels drain politely.
    """
    return DrainableSite(root, **kwargs)


_CHUNK = b"x" * 65536


@implementer(IPullProducer)
class _BytesProducer:
    """
    Writes exactly C{remaining} bytes to a request, one chunk each time the transport asks, so a
    large body never sits in memory.
    """

    def __init__(self, request: server.Request, remaining: int) -> None:
        self.request = request
        self.remaining = remaining
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.remaining <= 0:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        n = min(self.remaining, len(_CHUNK))
        self.remaining -= n
        self.request.write(_CHUNK if n == len(_CHUNK) else _CHUNK[:n])

    def stopProducing(self) -> None:
        self.stopped = True


class Bytes(resource.Resource):
    """
    ``GET /bytes/N``: exactly N bytes, streamed.
    """

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (self.size,))
        if self.size == 0:
            return b""
        producer = _BytesProducer(request, self.size)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        request.registerProducer(producer, False)
        return server.NOT_DONE_YET


class BytesDirectory(resource.Resource):
    """
    ``/bytes/``: the parent of L{Bytes} resources.
    """

    #: The largest body served, so that a typo cannot ask for a petabyte.
    maxSize = 1 << 34

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        try:
            size = int(path)
        except ValueError:
            return pages.errorPage(400, "Bad Request", "/bytes/N takes a number of bytes")
        if not 0 <= size <= self.maxSize:
            return pages.errorPage(400, "Bad Request", f"N must be from 0 to {self.maxSize}")
        return Bytes(size)


class DemoRoot(resource.Resource):
    """
    ``GET /``: which process and generation answered.
    """

    def __init__(self, generation: Callable[[], int]) -> None:
        super().__init__()
        self.generation = generation
        self.putChild(b"bytes", BytesDirectory())

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"graceful demo: pid %d, generation %d\n" % (os.getpid(), self.generation())


def demoSite(generation: Callable[[], int]) -> server.Site:
    """
    The demo application: ``GET /`` and ``GET /bytes/N``.
    """
    return drainableSite(DemoRoot(generation))
