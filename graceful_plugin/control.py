"""
The control channel: AMP over a Unix socket.  Every command between two generations and every
admin command is defined here, one class each, with the protocol that carries them.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

#: Bumped whenever a command changes incompatibly; checked in L{Hello}.
PROTOCOL_VERSION = 1

#: Listener entries per L{TakeOver} answer: one AMP value holds at most 64 KiB.
TAKEOVER_BATCH = 50

#: The listener kind that marks the control socket itself in a L{TakeOver} answer.
CONTROL_KIND = "control"


class HandoffBusy(Exception):
    """
    Another handoff is in progress, or this generation no longer serves.
    """


class VersionMismatch(Exception):
    """
    The two sides speak different versions of the control protocol.
    """


class NoHandoff(Exception):
    """
    A handoff command came from a connection that is not the successor in the current handoff.
    """


class RolledBack(Exception):
    """
    The handoff was rolled back before the successor confirmed it accepts.
    """


class Hello(amp.Command):
    """
    A successor introduces itself and asks to take over; the first command on a handoff.
    """

    arguments = [(b"version", amp.Integer()), (b"pid", amp.Integer())]
    response = [
        (b"version", amp.Integer()),
        (b"pid", amp.Integer()),
        (b"generation", amp.Integer()),
    ]
    errors = {HandoffBusy: b"BUSY", VersionMismatch: b"VERSION", NoHandoff: b"NO_HANDOFF"}


class TakeOver(amp.Command):
    """
    Send a batch of listeners, each with its descriptor, starting at index C{start}.  The answer
    names the index of the next batch, or -1 after the last one.
    """

    arguments = [(b"start", amp.Integer())]
    response = [
        (
            b"listeners",
            amp.AmpList(
                [
                    (b"name", amp.Unicode()),
                    (b"kind", amp.Unicode()),
                    (b"address", amp.Unicode()),
                    (b"fd", amp.Descriptor()),
                    # The listener as a --port value, for a successor with no --port of its own.
                    (b"spec", amp.Unicode(optional=True)),
                ]
            ),
        ),
        (b"next", amp.Integer()),
    ]
    errors = {NoHandoff: b"NO_HANDOFF"}


class Commit(amp.Command):
    """
    The successor adopted every listener and its application is ready: the predecessor pauses
    accepting and answers how many seconds the successor has to confirm it accepts.

    C{dropped} names the listeners the successor did not keep: once it accepts, the predecessor
    closes those for good (a Unix path is unlinked) instead of leaving them to the successor.
    """

    arguments = [(b"dropped", amp.ListOf(amp.Unicode(), optional=True))]
    response = [(b"confirmWithin", amp.Float())]
    errors = {NoHandoff: b"NO_HANDOFF"}


class Accepting(amp.Command):
    """
    The successor accepts now: the predecessor only drains from here on.
    """

    arguments = []
    response = []
    errors = {NoHandoff: b"NO_HANDOFF", RolledBack: b"ROLLED_BACK"}


class Abort(amp.Command):
    """
    The successor gives up (its application failed to start): the predecessor rolls back.
    """

    arguments = [(b"reason", amp.Unicode())]
    response = []
    errors = {NoHandoff: b"NO_HANDOFF"}


_generationEntry = [
    (b"pid", amp.Integer()),
    (b"generation", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"sessions", amp.Integer()),
]


class ReportSessions(amp.Command):
    """
    A draining predecessor tells its successor how many sessions it (and any generation still
    draining behind it) has left.
    """

    arguments = [(b"generations", amp.AmpList(_generationEntry))]
    response = []
    requiresAnswer = False


#: Listener entries per L{Status} answer, for the same 64 KiB limit.
STATUS_BATCH = 200


class Status(amp.Command):
    """
    Who serves and what is live: pid, generation, state, listeners with their sessions, and the
    generations still draining.  The listeners come in batches from index C{start}; C{next} is
    the index of the next batch, or -1 after the last one.
    """

    arguments = [(b"start", amp.Integer(optional=True))]
    response = [
        (b"version", amp.Integer()),
        (b"pid", amp.Integer()),
        (b"generation", amp.Integer()),
        (b"state", amp.Unicode()),
        (b"uptime", amp.Float()),
        (
            b"listeners",
            amp.AmpList(
                [
                    (b"name", amp.Unicode()),
                    (b"kind", amp.Unicode()),
                    (b"address", amp.Unicode()),
                    (b"accepting", amp.Boolean()),
                    (b"sessions", amp.Integer()),
                ]
            ),
        ),
        (b"draining", amp.AmpList(_generationEntry)),
        (b"next", amp.Integer(optional=True)),
    ]


class Stop(amp.Command):
    """
    Stop gracefully: stop accepting, drain (within C{drainTimeout} seconds if given), exit.
    """

    arguments = [(b"drainTimeout", amp.Float(optional=True))]
    response = []


class RestartFailed(Exception):
    """
    A successor could not be started, or its handoff was rolled back: the message says why, and
    the server serves on.
    """


_phaseEntry = [
    (b"phase", amp.Unicode()),
    (b"ms", amp.Float()),
    (b"detail", amp.Unicode()),
]


class Restart(amp.Command):
    """
    Start a successor (the server's own command line with C{--takeover}, or its
    C{--restart-command}) and answer once its handoff is decided: the successor's pid and
    generation and the phases with their times (milliseconds since the successor was started);
    or the error C{RESTART_FAILED} with the reason when it was rolled back.  With C{progress},
    each phase is also sent as it happens, as a L{RestartProgress} on the same connection.
    With C{fresh}, the fork server (if any) replaces itself with a fresh one before forking the
    successor, whether or not the code on disk changed.
    """

    arguments = [(b"progress", amp.Boolean(optional=True)), (b"fresh", amp.Boolean(optional=True))]
    response = [
        (b"pid", amp.Integer()),
        (b"generation", amp.Integer()),
        (b"ms", amp.Float()),
        (b"phases", amp.AmpList(_phaseEntry)),
    ]
    errors = {HandoffBusy: b"BUSY", RestartFailed: b"RESTART_FAILED"}


class RestartProgress(amp.Command):
    """
    One phase of a restart, sent by the server to the client that asked for L{Restart} with
    C{progress}: C{spawned}, C{hello}, C{committed}, C{accepting}, C{rolled_back}, C{exited}.
    """

    arguments = _phaseEntry
    response = []
    requiresAnswer = False


class IControlHandler(Interface):
    """
    What answers the commands arriving on one control connection.  Each method gets the
    L{ControlProtocol} the command came on.
    """

    def connectionOpened(protocol: ControlProtocol) -> None:
        """
        A control connection was made.
        """

    def connectionClosed(protocol: ControlProtocol, reason: Failure) -> None:
        """
        A control connection ended.
        """

    def hello(protocol: ControlProtocol, version: int, pid: int) -> dict[str, Any]:
        """
        Answer L{Hello}.
        """

    def takeOver(protocol: ControlProtocol, start: int) -> dict[str, Any]:
        """
        Answer L{TakeOver}.
        """

    def commit(protocol: ControlProtocol, dropped: list[str] | None = None) -> dict[str, Any]:
        """
        Answer L{Commit}; C{dropped} names the listeners the successor did not keep.
        """

    def accepting(protocol: ControlProtocol) -> dict[str, Any]:
        """
        Answer L{Accepting}.
        """

    def abort(protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        """
        Answer L{Abort}.
        """

    def reportSessions(protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        """
        Take a L{ReportSessions}.
        """

    def status(protocol: ControlProtocol, start: int) -> dict[str, Any]:
        """
        Answer L{Status}, with the batch of listeners from index C{start}.
        """

    def stop(protocol: ControlProtocol, drainTimeout: float | None) -> dict[str, Any]:
        """
        Answer L{Stop}.
        """

    def restart(protocol: ControlProtocol, progress: bool, fresh: bool = False) -> Any:
        """
        Answer L{Restart} (a L{Deferred} firing once the handoff is decided); C{fresh} asks for
        a fresh fork server.
        """


def peerCredentials(transport: Any) -> tuple[int, int, int] | None:
    """
    The (pid, uid, gid) of the process at the other end of a Unix socket, from C{SO_PEERCRED}.
    """
    try:
        sock = transport.getHandle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class ControlProtocol(amp.AMP):
    """
    One control connection, either end.  Commands are answered by the L{IControlHandler} given;
    descriptors received but never claimed by a command are closed when the connection ends.
    """

    log = Logger()

    def __init__(self, handler: IControlHandler, checkPeer: bool = False) -> None:
        super().__init__()
        self.handler = handler
        self.checkPeer = checkPeer
        self.peer: tuple[int, int, int] | None = None
        self.openedAt = time.monotonic()

    def connectionMade(self) -> None:
        super().connectionMade()
        self.openedAt = time.monotonic()
        self.peer = peerCredentials(self.transport)
        if self.checkPeer:
            uid = self.peer[1] if self.peer else None
            if uid not in (os.getuid(), 0):
                self.log.warn(
                    "control connection refused: peer {peer} runs as uid {uid}, not {own} or root",
                    peer=self.peer[0] if self.peer else None,
                    uid=uid,
                    own=os.getuid(),
                )
                self._dropConnection()
                return
        self.handler.connectionOpened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        for fd in list(self._descriptors.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._descriptors.clear()
        super().connectionLost(reason)
        self.handler.connectionClosed(self, reason)

    # -- malformed input: one line in the log, and the connection dropped -------------------

    def _peerPid(self) -> int | None:
        return self.peer[0] if self.peer else None

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except Exception as e:
            # A box that is neither a command nor an answer we await (AMP raises from here).
            self.log.warn(
                "control connection from pid {pid} dropped: malformed input ({error})",
                pid=self._peerPid(),
                error=f"{e.__class__.__name__}: {e}"[:200],
            )
            self._dropConnection()

    def _dropConnection(self) -> None:
        """
        Drop this connection at once, unsent data and all.
        """
        transport = cast(ITCPTransport, self.transport)
        if transport is not None:
            transport.abortConnection()

    def unhandledError(self, failure: Failure) -> None:
        if not failure.check(amp.RemoteAmpError):
            super().unhandledError(failure)
            return
        # A command sent without _ask failed (unknown, say): nobody awaits the error.
        error = failure.value
        self.log.warn(
            "control connection from pid {pid} dropped: a command without _ask failed ({code}:"
            " {error})",
            pid=self._peerPid(),
            code=error.errorCode.decode("ascii", "replace"),
            error=str(error.description)[:200],
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.warn(
            "control connection from pid {pid} dropped: a frame of {length} bytes is longer than"
            " AMP allows",
            pid=self._peerPid(),
            length=length,
        )
        super().lengthLimitExceeded(length)

    def locateResponder(self, name: bytes) -> Any:
        responder = super().locateResponder(name)
        command = name.decode("ascii", "replace")[:64]
        if responder is None:
            # AMP answers UNHANDLED; the connection stays usable.
            self.log.warn(
                "control connection from pid {pid}: unknown command {command!r}",
                pid=self._peerPid(),
                command=command,
            )
            return None

        def parsed(box: amp.AmpBox) -> Any:
            try:
                # Only the parsing of the arguments raises here; the responder's own errors
                # arrive in its Deferred.
                return responder(box)
            except Exception as e:
                reason = f"malformed {command} command ({e.__class__.__name__}: {e})"[:200]
                self.log.warn(
                    "control connection from pid {pid} dropped: {reason}",
                    pid=self._peerPid(),
                    reason=reason,
                )
                raise amp.RemoteAmpError(b"MALFORMED", reason, fatal=True) from None

        return parsed

    @Hello.responder
    def _hello(self, version: int, pid: int) -> dict[str, Any]:
        return self.handler.hello(self, version, pid)

    @TakeOver.responder
    def _takeOver(self, start: int) -> dict[str, Any]:
        return self.handler.takeOver(self, start)

    @Commit.responder
    def _commit(self, dropped: list[str] | None = None) -> dict[str, Any]:
        return self.handler.commit(self, dropped or [])

    @Accepting.responder
    def _accepting(self) -> dict[str, Any]:
        return self.handler.accepting(self)

    @Abort.responder
    def _abort(self, reason: str) -> dict[str, Any]:
        return self.handler.abort(self, reason)

    @ReportSessions.responder
    def _reportSessions(self, generations: list[dict[str, Any]]) -> dict[str, Any]:
        self.handler.reportSessions(self, generations)
        return {}

    @Status.responder
    def _status(self, start: int | None = None) -> dict[str, Any]:
        return self.handler.status(self, start or 0)

    @Stop.responder
    def _stop(self, drainTimeout: float | None = None) -> dict[str, Any]:
        return self.handler.stop(self, drainTimeout)

    @Restart.responder
    def _restart(self, progress: bool = False, fresh: bool = False) -> Any:
        return self.handler.restart(self, progress, bool(fresh))


@implementer(IControlHandler)
class ClientHandler:
    """
    The handler of a connection we opened as a client (the admin tool): it answers nothing.
    """

    def connectionOpened(self, protocol: ControlProtocol) -> None:
        pass

    def connectionClosed(self, protocol: ControlProtocol, reason: Failure) -> None:
        pass

    def _refuse(self, *args: Any) -> dict[str, Any]:
        raise NoHandoff("this end of the control channel does not serve")

    hello = takeOver = commit = accepting = abort = status = stop = restart = _refuse

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        pass
