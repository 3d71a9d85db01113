"""
HTTP: the channel that drains politely, and the demo application, over L{StringTransport}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface.verify import verifyObject

from graceful_plugin.sessions import IDrainable, drainableOf
from graceful_plugin.web import (
    DrainableChannelSwitch,
    DrainableHTTPChannel,
    demoSite,
    drainableSite,
    whenDraining,
)


def connect(site: server.Site) -> tuple[DrainableHTTPChannel, StringTransport]:
    """
    Connect a site's protocol to a L{StringTransport}: the HTTP/1.1 channel inside the switch.
    """
    switch = site.buildProtocol(None)
    transport = StringTransport()
    switch.makeConnection(transport)
    channel = switch._channel
    assert isinstance(channel, DrainableHTTPChannel)
    return channel, transport


def get(path: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: test\r\n" + extra + b"\r\n"


def pullProducer(channel: DrainableHTTPChannel) -> Any:
    """
    The pull producer a response registered.  The channel wraps it in Twisted's pull-to-push
    adapter, which pulls from the global cooperator (not running here), so the test pulls.
    """
    adapter = channel._requestProducer
    return None if adapter is None else adapter._producer


def pump(channel: DrainableHTTPChannel, limit: int = 10000) -> None:
    """
    Act as the network for a pull producer: ask it for more until it unregisters.
    """
    for _ in range(limit):
        producer = pullProducer(channel)
        if producer is None:
            return
        producer.resumeProducing()
    raise AssertionError("the producer never finished")


def parse(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


class Slow(resource.Resource):
    """
    A resource that answers when the test says so.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        self.pending.append(request)
        return server.NOT_DONE_YET


def test_channelIsDrainable() -> None:
    """
    The demo site's channels provide IDrainable and are found by drainableOf.
    """
    channel, _ = connect(demoSite(lambda: 1))
    assert isinstance(channel, DrainableHTTPChannel)
    assert verifyObject(IDrainable, channel)
    assert drainableOf(channel) is channel


def test_rootNamesPidAndGeneration() -> None:
    """
    GET / answers plain text with this process's pid and the current generation.
    """
    generation = [4]
    channel, transport = connect(demoSite(lambda: generation[0]))
    channel.dataReceived(get(b"/"))
    status, headers, body = parse(transport.value())
    assert status == 200
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert b"pid %d, generation 4" % os.getpid() in body
    assert not transport.disconnecting


def test_bytesStreamsExactlyN() -> None:
    """
    GET /bytes/N streams exactly N bytes with a pull producer, a chunk at a time.
    """
    n = 3 * 65536 + 123
    channel, transport = connect(demoSite(lambda: 1))
    channel.dataReceived(get(b"/bytes/%d" % n))
    producer = pullProducer(channel)
    assert producer is not None
    # One chunk at a time, each when the consumer asks for more.
    assert transport.value() == b""
    producer.resumeProducing()
    assert len(parse(transport.value())[2]) == 65536
    pump(channel)
    status, headers, body = parse(transport.value())
    assert status == 200
    assert headers[b"content-length"] == b"%d" % n
    assert body == b"x" * n


def test_bytesZero() -> None:
    """
    GET /bytes/0 answers an empty body.
    """
    channel, transport = connect(demoSite(lambda: 1))
    channel.dataReceived(get(b"/bytes/0"))
    status, headers, body = parse(transport.value())
    assert (status, headers[b"content-length"], body) == (200, b"0", b"")


def test_bytesBadN() -> None:
    """
    GET /bytes/N with N not a number, negative or too large answers 400.
    """
    for bad in (b"abc", b"-1", b"%d" % (1 << 40), b"1.5"):
        channel, transport = connect(demoSite(lambda: 1))
        channel.dataReceived(get(b"/bytes/" + bad))
        status, _, body = parse(transport.value())
        assert status == 400, bad
        assert b"Bad Request" in body


def test_bytesStopsWhenClientGoes() -> None:
    """
    A download whose client disconnects stops producing.
    """
    channel, transport = connect(demoSite(lambda: 1))
    channel.dataReceived(get(b"/bytes/%d" % (100 * 65536)))
    producer = pullProducer(channel)
    producer.resumeProducing()
    written = len(transport.value())
    channel.connectionLost(Failure(ConnectionDone()))
    producer.resumeProducing()
    assert len(transport.value()) == written
    assert producer.stopped is True


def test_drainClosesIdleConnection() -> None:
    """
    A persistent connection idle between requests is closed when its generation drains, once
    it has stayed quiet for the channel's idle grace.
    """
    channel, transport = connect(demoSite(lambda: 1))
    clock = Clock()
    channel.callLater = clock.callLater
    channel.dataReceived(get(b"/"))
    assert not transport.disconnecting
    channel.drain()
    clock.advance(channel.idleGrace)
    assert transport.disconnecting


def test_drainWaitsForPartialRequest() -> None:
    """
    A connection in the middle of receiving a request is not closed by drain; the request is
    answered with Connection: close and only then closed.
    """
    channel, transport = connect(demoSite(lambda: 1))
    request = get(b"/")
    channel.dataReceived(request[:10])
    channel.drain()
    assert not transport.disconnecting
    channel.dataReceived(request[10:])
    status, headers, body = parse(transport.value())
    assert status == 200
    assert headers[b"connection"] == b"close"
    assert b"generation 1" in body
    assert transport.disconnecting


def test_drainBusyRequestAnswersConnectionClose() -> None:
    """
    A request being processed when drain comes is answered in full with Connection: close, and
    the connection closes only after the response is done.
    """
    slow = Slow()
    channel, transport = connect(drainableSite(slow))
    channel.dataReceived(get(b"/"))
    [request] = slow.pending
    channel.drain()
    assert not transport.disconnecting
    request.write(b"done")
    assert not transport.disconnecting
    request.finish()
    status, headers, body = parse(transport.value())
    assert status == 200
    assert headers[b"connection"] == b"close"
    assert transport.disconnecting


def _downloading(n: int) -> tuple[Any, Any, Clock]:
    """
    A connection to the demo site whose download of C{n} bytes has begun (its first chunk
    written), with a clock for the connection's timers.
    """
    channel, transport = connect(demoSite(lambda: 1))
    clock = Clock()
    channel.callLater = clock.callLater
    channel.dataReceived(get(b"/bytes/%d" % n))
    pullProducer(channel).resumeProducing()
    return channel, transport, clock


def test_drainDuringDownloadFinishesIt() -> None:
    """
    A download in flight when drain comes is not cut short: all N bytes arrive.  Its headers
    had promised a persistent connection, so the connection is not closed under the client's
    next request right after it: it drains as an idle one (closed once quiet, here; handed
    over where there is a successor, test_handover.py).
    """
    n = 5 * 65536
    channel, transport, clock = _downloading(n)
    channel.drain()
    assert not transport.disconnecting
    pump(channel)
    status, headers, body = parse(transport.value())
    assert status == 200
    assert b"connection" not in headers
    assert body == b"x" * n
    assert not transport.disconnecting
    clock.advance(channel.idleGrace)
    assert transport.disconnecting


def test_nextRequestAfterAPromisedKeepAliveIsAnswered() -> None:
    """
    A client whose response began before the drain (no Connection: close in it) sends its next
    request on the same connection at once: it is answered, with Connection: close, and the
    connection closes after it; it is never closed under that request.
    """
    n = 2 * 65536
    channel, transport, clock = _downloading(n)
    channel.drain()
    pump(channel)
    assert not transport.disconnecting
    first = transport.value()
    transport.clear()
    channel.dataReceived(get(b"/"))
    status, headers, _ = parse(transport.value())
    assert parse(first)[0] == 200 and status == 200
    assert headers[b"connection"] == b"close"
    assert transport.disconnecting


def test_promisedKeepAliveIsOfferedOnceIdle() -> None:
    """
    While draining, a connection whose response promised keep-alive is offered (to be handed
    over) once that response is done and has left for the kernel; one the offer takes is not
    closed here, one it declines drains as an idle one.
    """
    for takes in (True, False):
        channel, transport, clock = _downloading(65536)
        offers: list[int] = []

        def offer(
            takes: bool = takes, offers: list[int] = offers, transport: Any = transport
        ) -> bool:
            offers.append(len(transport.value()))
            return takes

        channel.offerWhenIdle(offer)
        channel.drain()
        pump(channel)
        assert offers, "never offered"
        assert offers[-1] == len(transport.value())  # offered after the whole response
        clock.advance(channel.idleGrace)
        assert transport.disconnecting is (not takes)


def test_requestAfterDrainGetsConnectionClose() -> None:
    """
    A request that starts after drain (on a connection that was not idle yet) is answered with
    Connection: close.
    """
    slow = Slow()
    channel, transport = connect(drainableSite(slow))
    channel.dataReceived(get(b"/"))
    channel.drain()
    # A pipelined second request arrives while the first is still being answered.
    channel.dataReceived(get(b"/"))
    first = slow.pending[0]
    first.finish()
    _, headers, _ = parse(transport.value())
    assert headers[b"connection"] == b"close"


def test_notDrainingStaysPersistent() -> None:
    """
    Without drain, an HTTP/1.1 connection stays open after a response and serves another.
    """
    channel, transport = connect(demoSite(lambda: 1))
    channel.dataReceived(get(b"/"))
    channel.dataReceived(get(b"/"))
    assert transport.value().count(b"HTTP/1.1 200") == 2
    assert not transport.disconnecting


def test_drainSiteUsesDrainableChannel() -> None:
    """
    drainableSite builds a Site whose protocol is Twisted's HTTP/1.1-or-HTTP/2 switch, made
    drainable, around the drainable HTTP/1.1 channel; draining the switch drains that channel.
    """
    site = drainableSite(resource.Resource())
    switch = site.buildProtocol(None)
    assert isinstance(switch, DrainableChannelSwitch)
    assert verifyObject(IDrainable, switch)
    assert isinstance(switch._channel, DrainableHTTPChannel)
    assert site.acceptableProtocols() == server.Site(resource.Resource()).acceptableProtocols()
    transport = StringTransport()
    switch.makeConnection(transport)
    switch.drain()
    assert switch._channel._draining


def test_switchServesHTTP1WhenTLSNegotiatedIt() -> None:
    """
    A connection whose TLS negotiated http/1.1 with ALPN (or nothing) is served by the
    drainable HTTP/1.1 channel, request after request.
    """
    for negotiated in (b"http/1.1", None):
        switch = demoSite(lambda: 1).buildProtocol(None)
        transport = StringTransport()
        transport.negotiatedProtocol = negotiated  # type: ignore[attr-defined]
        switch.makeConnection(transport)
        switch.dataReceived(get(b"/"))
        switch.dataReceived(get(b"/"))
        assert isinstance(switch._channel, DrainableHTTPChannel)
        assert transport.value().count(b"HTTP/1.1 200") == 2
        switch.drain()
        assert switch._channel._draining


class Events(resource.Resource):
    """
    Server-sent events: an endless response that ends itself when its generation drains.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: hello\n\n")

        def goodbye() -> None:
            request.write(b"retry: 0\n\n")
            request.finish()

        whenDraining(request, goodbye)
        return server.NOT_DONE_YET


def test_longResponseEndsItselfOnDrain() -> None:
    """
    A long response that registered with whenDraining is told when its connection drains: it
    ends itself, and the connection (its headers promised keep-alive) then drains as an idle
    one, closed once quiet (or handed over), long before any deadline.
    """
    channel, transport = connect(drainableSite(Events()))
    clock = Clock()
    channel.callLater = clock.callLater
    channel.dataReceived(get(b"/events"))
    assert b"data: hello" in transport.value()
    assert not transport.disconnecting
    channel.drain()
    assert transport.value().endswith(b"retry: 0\n\n\r\n0\r\n\r\n")
    clock.advance(channel.idleGrace)
    assert transport.disconnecting


def test_whenDrainingAfterDrainCallsAtOnce() -> None:
    """
    A response that registers after its connection started draining is told at once.
    """
    channel, transport = connect(drainableSite(Events()))
    channel.drain()
    channel.dataReceived(get(b"/events"))
    assert transport.value().endswith(b"retry: 0\n\n\r\n0\r\n\r\n")


def test_whenDrainingRefusesOtherRequests() -> None:
    """
    whenDraining refuses, with a TypeError, a request that no draining site of graceful serves.
    """
    plain = http.HTTPChannel()
    plain.makeConnection(StringTransport())
    request = http.Request(plain)
    try:
        whenDraining(request, lambda: None)
    except TypeError as e:
        assert "not served by a draining site" in str(e)
    else:
        raise AssertionError("no TypeError")
