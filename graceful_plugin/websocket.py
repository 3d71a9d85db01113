"""
WebSockets (autobahn|Twisted, when the application uses it): a draining generation closes its
open WebSocket connections with 1001 "going away", the code RFC 6455 gives a server going down, and
waits for the closing handshake, so that clients reconnect at once, to the new generation.

Nothing here imports autobahn: graceful does not depend on it, and an application that serves
WebSockets has imported it already (importing it costs about 40 ms of CPU, which every successor
would otherwise pay before it serves, WebSockets or not).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from graceful_plugin.sessions import IDrainable

#: RFC 6455, 7.4.1: "an endpoint is going away, such as a server going down".
GOING_AWAY = 1001
REASON = b"server restarting"

#: Seconds a client has, at least, to answer our Close before autobahn drops the connection.
#: autobahn arms that timeout (C{closeHandshakeTimeout}, 1 s by default) on a batched timer that
#: truncates the deadline to the whole second, so 1 s means anything between 0 and 1 s: a client
#: that answered within milliseconds was sometimes reset.  Raised for our Close only, never
#: lowered, and left off where the application turned it off (0).
CLOSE_WAIT = 5.0

_registered = False


def sendGoingAway(protocol: Any) -> bool:
    """
    Start the closing handshake of an open autobahn WebSocket with code 1001.

    autobahn's public C{sendClose} accepts only 1000 and 3000-4999 (the codes an application
    may send); 1001 is the server's own, so this goes one level down, to C{sendCloseFrame}, the
    method C{sendClose} itself ends in (wrapped here and nowhere else).  autobahn then waits for
    the client's Close (up to its C{closeHandshakeTimeout}, raised to L{CLOSE_WAIT}) and drops
    the TCP connection.

    @return: whether a Close frame was sent (only an open connection gets one).
    """
    if protocol.state != protocol.STATE_OPEN:
        return False
    timeout = getattr(protocol, "closeHandshakeTimeout", 0) or 0
    if 0 < timeout < CLOSE_WAIT:
        protocol.closeHandshakeTimeout = CLOSE_WAIT
    protocol.sendCloseFrame(code=GOING_AWAY, reasonUtf8=REASON, isReply=False)
    return True


@implementer(IDrainable)
class WebSocketDrain:
    """
    L{IDrainable} for an autobahn WebSocket server protocol: close it with 1001 on drain.  A
    connection still in its opening handshake is left alone (it becomes open, or fails, soon;
    the drain deadline closes what is left).
    """

    log = Logger()

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def drain(self) -> None:
        if sendGoingAway(self.protocol):
            self.log.debug("sent 1001 going away to {peer}", peer=self.protocol.peer)


def registerDrainAdapters(modules: Any = None) -> bool:
    """
    Make autobahn's WebSocket server protocols L{IDrainable} (through a zope adapter, so that
    L{graceful_plugin.sessions.drainableOf} finds them), if the application has imported
    autobahn's Twisted WebSocket module (call this once the application's factory is built).

    @param modules: the imported modules (L{sys.modules} when L{None}).
    @return: whether autobahn's WebSocket module is there.
    """
    global _registered
    module = (sys.modules if modules is None else modules).get("autobahn.twisted.websocket")
    if module is None:
        return False
    WebSocketServerProtocol = module.WebSocketServerProtocol
    if not _registered:
        from twisted.python.components import registerAdapter

        registerAdapter(WebSocketDrain, WebSocketServerProtocol, IDrainable)
        _registered = True
    return True
