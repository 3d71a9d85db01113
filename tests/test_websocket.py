"""
WebSockets on a draining generation, over a L{StringTransport}: an open autobahn WebSocket is
found by drainableOf and closed with 1001 going away.
"""

from __future__ import annotations

import base64
import os
import struct

import pytest

pytest.importorskip("autobahn", reason="the WebSocket drain needs autobahn (test extra)")

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.testing import StringTransport  # noqa: E402
from zope.interface.verify import verifyObject  # noqa: E402

from graceful_plugin.sessions import IDrainable, drainableOf  # noqa: E402
from graceful_plugin.websocket import GOING_AWAY, WebSocketDrain, registerDrainAdapters  # noqa: E402


def _openWebSocket() -> tuple[WebSocketServerProtocol, StringTransport]:
    factory = WebSocketServerFactory("ws://t/")
    factory.protocol = WebSocketServerProtocol
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16))
    protocol.dataReceived(
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return protocol, transport


def test_openWebSocketIsSentGoingAwayOnDrain() -> None:
    """
    With autobahn importable, an open WebSocket server protocol is L{IDrainable} through an
    adapter, and draining it sends a Close frame with code 1001 and starts the closing
    handshake (the connection stays open for the client's Close).
    """
    assert registerDrainAdapters()
    protocol, transport = _openWebSocket()
    drainable = drainableOf(protocol)
    assert isinstance(drainable, WebSocketDrain)
    assert verifyObject(IDrainable, drainable)
    drainable.drain()
    frame = transport.value()
    assert frame[0] == 0x88  # FIN + opcode 8 (Close), unmasked from the server
    length = frame[1] & 0x7F
    code = struct.unpack("!H", frame[2:4])[0]
    assert code == GOING_AWAY == 1001
    assert frame[4 : 2 + length] == b"server restarting"
    assert protocol.state == protocol.STATE_CLOSING
    assert not transport.disconnecting
    if protocol.closeHandshakeTimeoutCall is not None:
        protocol.closeHandshakeTimeoutCall.cancel()


def test_drainTwiceSendsOneClose() -> None:
    """
    A WebSocket already closing is not sent a second Close.
    """
    registerDrainAdapters()
    protocol, transport = _openWebSocket()
    drainable = drainableOf(protocol)
    assert drainable is not None
    drainable.drain()
    sent = transport.value()
    drainable.drain()
    assert transport.value() == sent
    if protocol.closeHandshakeTimeoutCall is not None:
        protocol.closeHandshakeTimeoutCall.cancel()


def test_noAdapterUntilTheApplicationImportsAutobahn() -> None:
    """
    The drain adapter is registered only when autobahn's Twisted WebSocket module has been
    imported (by the application): without it, nothing is registered and nothing is imported.
    """
    assert not registerDrainAdapters(modules={})
    assert registerDrainAdapters(modules={"autobahn.twisted.websocket": _websocketModule()})


def _websocketModule() -> object:
    import autobahn.twisted.websocket

    return autobahn.twisted.websocket


def test_aClientHasSecondsToAnswerTheClose() -> None:
    """
    autobahn's closing-handshake timeout (1 s by default) is armed on a timer that truncates the
    deadline to the whole second: sent just before a second ends, our Close would be followed
    by an abort within milliseconds, resetting a client that answers at once.  Our Close gives
    the client at least CLOSE_WAIT - 1 seconds; a client that never answers is still dropped.
    """
    from twisted.internet.task import Clock
    from txaio._common import _BatchedTimer

    from graceful_plugin.websocket import CLOSE_WAIT

    registerDrainAdapters()
    protocol, transport = _openWebSocket()
    # (autobahn drops the connection through unregisterProducer, which StringTransport refuses
    # when nothing was registered.)
    transport.unregisterProducer = lambda: None  # type: ignore[method-assign]
    assert protocol.closeHandshakeTimeout == 1  # autobahn's default
    clock = Clock()
    clock.advance(100.95)  # just before a whole second
    protocol.factory._batched_timer = _BatchedTimer(
        200.0, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater
    )
    drainable = drainableOf(protocol)
    assert drainable is not None
    drainable.drain()
    assert protocol.closeHandshakeTimeout == CLOSE_WAIT
    clock.advance(CLOSE_WAIT - 1.05)
    assert protocol.state == protocol.STATE_CLOSING and not transport.disconnecting
    clock.advance(1.3)
    assert transport.disconnecting  # dropped: it never answered


def test_aClosingHandshakeTurnedOffStaysOff() -> None:
    """
    An application that turned autobahn's closing-handshake timeout off (0) keeps it off, and
    one that set a longer one keeps it.
    """
    registerDrainAdapters()
    for configured in (0, 30):
        protocol, transport = _openWebSocket()
        protocol.closeHandshakeTimeout = configured
        drainable = drainableOf(protocol)
        assert drainable is not None
        drainable.drain()
        assert protocol.closeHandshakeTimeout == configured
        if protocol.closeHandshakeTimeoutCall is not None:
            protocol.closeHandshakeTimeoutCall.cancel()
