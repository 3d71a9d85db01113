"""
HTTP/2 on a draining generation, with the C{h2} library as the client over a L{StringTransport}:
h2 is negotiated as Twisted's own site negotiates it, and drain sends GOAWAY once the streams in
flight have finished, ignores streams opened after it, and closes.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("h2", reason="HTTP/2 needs graceful[http2] (twisted[http2])")

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402
from twisted.web import resource, server  # noqa: E402
from zope.interface.verify import verifyObject  # noqa: E402

from graceful_plugin.http2 import DrainableH2Connection  # noqa: E402
from graceful_plugin.sessions import IDrainable, drainableOf  # noqa: E402
from graceful_plugin.web import drainableSite, whenDraining  # noqa: E402


class Slow(resource.Resource):
    """
    ``GET /slow`` answers when the test says so; anything else at once.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        if request.path == b"/slow":
            self.pending.append(request)
            return server.NOT_DONE_YET
        return b"quick"


class Client:
    """
    An h2 client connection talking to a site's protocol through a StringTransport, as TLS
    with ALPN ``h2`` would present it.
    """

    def __init__(self, root: resource.Resource) -> None:
        self.reactor = MemoryReactorClock()
        self.site = drainableSite(root, reactor=self.reactor)
        self.switch = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.switch.makeConnection(self.transport)
        self.h2 = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            out = self.h2.data_to_send()
            if out:
                self.switch.dataReceived(out)
            self.reactor.advance(0)
            got = self.transport.value()
            self.transport.clear()
            if got:
                self.events += self.h2.receive_data(got)
            if not out and not got:
                return

    def get(self, path: str) -> int:
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream,
            [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "t")],
            end_stream=True,
        )
        return stream

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def body(self, stream: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived) if e.stream_id == stream)

    def ended(self, stream: int) -> bool:
        return any(e.stream_id == stream for e in self.of(h2.events.StreamEnded))


def test_h2IsNegotiatedAndDrainable() -> None:
    """
    A connection that negotiated h2 is served by the drainable HTTP/2 connection, found by
    drainableOf through the switch, and answers a request.
    """
    client = Client(Slow())
    channel = client.switch._channel
    assert isinstance(channel, DrainableH2Connection)
    assert verifyObject(IDrainable, channel)
    assert drainableOf(client.switch) is client.switch
    stream = client.get("/quick")
    client.pump()
    assert client.ended(stream) and client.body(stream) == b"quick"


def test_drainSendsGoAwayAfterStreamsInFlight() -> None:
    """
    Drain while a stream is in flight sends no GOAWAY until that stream has finished; then the
    GOAWAY names it as the last stream, a stream the client opened after it is not processed,
    and the connection closes after the linger.
    """
    root = Slow()
    client = Client(root)
    stream = client.get("/slow")
    client.pump()
    [request] = root.pending
    client.switch.drain()
    client.pump()
    assert client.of(h2.events.ConnectionTerminated) == []
    request.write(b"slow body")
    request.finish()
    client.pump()
    assert client.ended(stream) and client.body(stream) == b"slow body"
    [goAway] = client.of(h2.events.ConnectionTerminated)
    assert goAway.error_code == 0
    assert goAway.last_stream_id == stream
    assert not client.transport.disconnecting
    # A request that crossed the GOAWAY on the wire: sent as if the client had not read it yet.
    crossing = stream + 2
    client.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
    client.h2.send_headers(
        crossing,
        [(":method", "GET"), (":path", "/quick"), (":scheme", "https"), (":authority", "t")],
        end_stream=True,
    )
    client.pump()
    assert not any(getattr(e, "stream_id", None) == crossing for e in client.events), (
        "a stream opened after the GOAWAY was processed"
    )
    channel = client.switch._channel
    client.reactor.advance(channel.idleLinger * 0.9)
    assert not client.transport.disconnecting
    client.reactor.advance(channel.idleLinger * 0.2)
    assert client.transport.disconnecting


def test_idleConnectionGetsGoAwayAtOnce() -> None:
    """
    An idle HTTP/2 connection gets its GOAWAY as soon as draining starts.
    """
    client = Client(Slow())
    stream = client.get("/quick")
    client.pump()
    client.switch.drain()
    client.pump()
    [goAway] = client.of(h2.events.ConnectionTerminated)
    assert goAway.last_stream_id == stream


def test_busyConnectionGetsGoAwayAfterGraceAndFinishes() -> None:
    """
    A connection still busy L{DrainableH2Connection.busyGrace} seconds after draining starts
    gets its GOAWAY with the stream in flight as the last one, and that stream still finishes.
    """
    root = Slow()
    client = Client(root)
    stream = client.get("/slow")
    client.pump()
    client.switch.drain()
    channel = client.switch._channel
    client.reactor.advance(channel.busyGrace * 0.9)
    client.pump()
    assert client.of(h2.events.ConnectionTerminated) == []
    client.reactor.advance(channel.busyGrace * 0.2)
    client.pump()
    [goAway] = client.of(h2.events.ConnectionTerminated)
    assert goAway.last_stream_id == stream
    [request] = root.pending
    request.write(b"late")
    request.finish()
    # The h2 client library cannot take frames after a GOAWAY (its state machine closes), so
    # read the raw frames instead.
    client.reactor.advance(0)
    raw = client.transport.value()
    assert b"late" in raw
    client.reactor.advance(channel.idleLinger * 1.1)
    assert client.transport.disconnecting


def test_drainBeforeNegotiationReachesH2() -> None:
    """
    A connection drained before its first bytes arrived becomes HTTP/2 already draining: idle,
    it gets a GOAWAY at once.
    """
    reactor = MemoryReactorClock()
    site = drainableSite(Slow(), reactor=reactor)
    switch = site.buildProtocol(None)
    transport = StringTransport()
    transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    switch.makeConnection(transport)
    switch.drain()
    client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    switch.dataReceived(client.data_to_send())
    events = client.receive_data(transport.value())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    assert isinstance(switch._channel, DrainableH2Connection)


class Events(resource.Resource):
    """
    An endless response that ends itself when its connection drains.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        request.write(b"data: hello\n\n")

        def goodbye() -> None:
            request.write(b"retry: 0\n\n")
            request.finish()

        whenDraining(request, goodbye)
        return server.NOT_DONE_YET


def test_longStreamEndsItselfThenGoAway() -> None:
    """
    An HTTP/2 stream that registered with whenDraining ends itself when the connection drains,
    and the GOAWAY follows it at once, naming it as the last stream.
    """
    client = Client(Events())
    stream = client.get("/events")
    client.pump()
    assert client.body(stream) == b"data: hello\n\n"
    client.switch.drain()
    client.pump()
    assert client.ended(stream)
    assert client.body(stream) == b"data: hello\n\nretry: 0\n\n"
    [goAway] = client.of(h2.events.ConnectionTerminated)
    assert goAway.last_stream_id == stream
