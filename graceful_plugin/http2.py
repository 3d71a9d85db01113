"""
HTTP/2 (with C{twisted[http2]}, that is when C{h2} is importable): a connection that drains with
GOAWAY.

On drain the connection waits for the streams in flight to finish, sends GOAWAY (error
NO_ERROR, last stream id = the highest stream it accepted), ignores any stream the client opened
after it (the GOAWAY tells the client that stream was not processed, so it retries it on a new
connection, which reaches the new generation), keeps reading for L{idleLinger} seconds so that
frames that crossed the GOAWAY are read rather than answered with a reset, and closes.

Why GOAWAY when the connection is idle and not at once: Python's HTTP/2 clients (httpx over
httpcore, and anything built on the C{h2} library) fail every stream still in flight when a
GOAWAY arrives, whatever its last stream id, so a GOAWAY sent in the middle of a response breaks
it.  A connection that stays busy for L{busyGrace} seconds gets its GOAWAY anyway (as RFC 9113
6.8 has it: streams up to the last id finish, which browsers and curl honour).
"""

from __future__ import annotations

from typing import Any

from hyperframe.frame import GoAwayFrame
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from zope.interface import implementer

from graceful_plugin.drainhooks import DrainCallbacks
from graceful_plugin.sessions import IDrainable


@implementer(IDrainable)
class DrainableH2Connection(DrainCallbacks, H2Connection):  # type: ignore[misc]
    """
    Twisted's HTTP/2 connection, made L{IDrainable}: GOAWAY once idle, then close.
    """

    #: Seconds a busy connection may go on after draining starts before it gets its GOAWAY.
    busyGrace = 5.0
    #: Seconds the connection keeps reading after the GOAWAY before it closes.
    idleLinger = 1.0

    _draining = False
    #: The last stream id the GOAWAY named, once it is sent.
    lastStreamID: int | None = None
    _busyCall: Any = None
    _closeCall: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ignored: set[int] = set()

    def drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        if not self.streams:
            self._goAway()
        else:
            self._busyCall = self.callLater(self.busyGrace, self._goAway)
        self._fireDrainCallbacks()

    def _goAway(self) -> None:
        if self.lastStreamID is not None or self.transport is None:
            return
        if self._busyCall is not None and self._busyCall.active():
            self._busyCall.cancel()
        self._busyCall = None
        self.lastStreamID = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.lastStreamID, error_code=0)
        # h2's own close_connection() moves its state machine to CLOSED, after which every frame
        # the client still sends (window updates, data of the streams that are to finish, a
        # stream that crossed the GOAWAY) is a protocol error that kills the connection.  So
        # the frame is queued in h2's outgoing buffer (private: this is the one place) and
        # written through Twisted's ordered control-frame path, while the state stays open.
        self.conn._data_to_send += frame.serialize()
        self._tryToWriteControlData()
        if not self.streams:
            self._lingerThenClose()

    def _lingerThenClose(self) -> None:
        if self._closeCall is None and self.transport is not None:
            self._closeCall = self.callLater(self.idleLinger, self.transport.loseConnection)

    def _ignoring(self, streamID: int) -> bool:
        return streamID in self._ignored

    def _requestReceived(self, event: Any) -> None:
        if self.lastStreamID is not None and event.stream_id > self.lastStreamID:
            # Opened after our GOAWAY: not processed, the client retries it elsewhere.
            self._ignored.add(event.stream_id)
            return
        super()._requestReceived(event)

    def _requestDataReceived(self, event: Any) -> None:
        if not self._ignoring(event.stream_id):
            super()._requestDataReceived(event)

    def _requestEnded(self, event: Any) -> None:
        if not self._ignoring(event.stream_id):
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if not self._ignoring(event.stream_id):
            super()._requestAborted(event)

    def _handlePriorityUpdate(self, event: Any) -> None:
        if not self._ignoring(event.stream_id):
            super()._handlePriorityUpdate(event)

    def _requestDone(self, streamID: int) -> None:
        super()._requestDone(streamID)
        if self._draining and not self.streams:
            if self.lastStreamID is None:
                self._goAway()
            else:
                self._lingerThenClose()

    def connectionLost(
        self, reason: Failure = connectionDone, _cancelTimeouts: bool = True
    ) -> None:
        for call in (self._busyCall, self._closeCall):
            if call is not None and call.active():
                call.cancel()
        self._busyCall = self._closeCall = None
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)
