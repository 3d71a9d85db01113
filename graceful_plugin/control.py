"""
The control channel: AMP over a Unix socket.  Every command between two generations and every
admin command is defined here, one class each, with the protocol that carries them.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport, IWriteDescriptor
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

#: Bumped whenever a command changes incompatibly; checked in L{Hello}.
PROTOCOL_VERSION = 1

#: Listener entries per L{TakeOver} answer, at most; a batch also stays within one AMP value
#: (L{takeoverBatch}).
TAKEOVER_BATCH = 50

#: The digits a descriptor's ordinal may take in an answer (an AMP integer), counted generously.
_DESCRIPTOR_DIGITS = 20

#: The listener kind that marks the control socket itself in a L{TakeOver} answer.
CONTROL_KIND = "control"

#: The role of the listener that serves the metrics (C{--metrics}) in a L{TakeOver} answer.
METRICS_ROLE = "metrics"


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


class BadArgument(Exception):
    """
    A command carried a value out of its range (a negative index, a drain deadline that is not
    a finite number of seconds, a pid that is no pid): nothing was done.
    """


#: The longest drain deadline a Stop may ask for (a year): longer ones overflow the reactor.
MAX_SECONDS = 365 * 24 * 3600.0


def checkIndex(name: str, value: int) -> int:
    """
    C{value} if it is a valid batch index (0 or more).

    @raise BadArgument: otherwise.
    """
    if value < 0:
        raise BadArgument(f"{name} must be 0 or more, not {value}")
    return value


def checkPid(name: str, value: int) -> int:
    """
    C{value} if it can be a process id (more than 0).

    @raise BadArgument: otherwise.
    """
    if value <= 0:
        raise BadArgument(f"{name} must be a process id (more than 0), not {value}")
    return value


def checkSeconds(name: str, value: float) -> float:
    """
    C{value} if it is a finite number of seconds from 0 to L{MAX_SECONDS}.

    @raise BadArgument: otherwise (NaN, infinite, negative or too long).
    """
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise BadArgument(
            f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g}, not {value!r}"
        )
    return value


class Hello(amp.Command):
    """
    A successor introduces itself and asks to take over; the first command on a handoff.

    C{standby} (optional, so that either side may be older) says that the successor will send
    L{StandDown} when it stops on purpose or hands over in turn: only then does the predecessor
    stand by (keep paused copies of the listeners, and resume if the successor is lost) once
    the successor confirmed.
    """

    arguments = [
        (b"version", amp.Integer()),
        (b"pid", amp.Integer()),
        (b"standby", amp.Boolean(optional=True)),
    ]
    response = [
        (b"version", amp.Integer()),
        (b"pid", amp.Integer()),
        (b"generation", amp.Integer()),
        # How many processes serve in the predecessor's generation (a successor that names no
        # --workers starts as many).
        (b"workers", amp.Integer(optional=True)),
    ]
    errors = {
        HandoffBusy: b"BUSY",
        VersionMismatch: b"VERSION",
        NoHandoff: b"NO_HANDOFF",
        BadArgument: b"BAD_ARGUMENT",
    }


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
                    # What the listener serves when not the application: METRICS_ROLE.  An
                    # older predecessor sends none.
                    (b"role", amp.Unicode(optional=True)),
                ]
            ),
        ),
        (b"next", amp.Integer()),
    ]
    errors = {NoHandoff: b"NO_HANDOFF", BadArgument: b"BAD_ARGUMENT"}


def takeoverEntrySize(entry: dict[str, Any]) -> int:
    """
    The bytes one listener entry takes in a L{TakeOver} answer's C{listeners} value: an AMP box
    of length-prefixed keys and values (the descriptor as its ordinal), then a 2-byte end.
    """
    size = 2
    for key, value in entry.items():
        if value is None:
            continue
        if key == "fd":
            length = _DESCRIPTOR_DIGITS
        elif isinstance(value, str):
            length = len(value.encode("utf-8"))
        else:
            length = len(str(value).encode())
        size += 2 + len(key.encode()) + 2 + length
    return size


def takeoverBatch(
    entries: list[dict[str, Any]],
    limit: int = amp.MAX_VALUE_LENGTH,
    count: int = TAKEOVER_BATCH,
) -> list[dict[str, Any]]:
    """
    The first entries of C{entries} that fit in one L{TakeOver} answer: at most C{count}, and
    at most C{limit} encoded bytes (one AMP value), however long their paths and specs are.

    @raise ValueError: with a sentence, when the first entry alone is larger than one value.
    """
    batch: list[dict[str, Any]] = []
    used = 0
    for entry in entries[:count]:
        size = takeoverEntrySize(entry)
        if used + size > limit:
            break
        batch.append(entry)
        used += size
    if entries and not batch:
        raise ValueError(
            f"listener {entries[0].get('name')!r} takes {takeoverEntrySize(entries[0])} bytes"
            f" to describe, more than one control message holds ({limit})"
        )
    return batch


class Commit(amp.Command):
    """
    The successor adopted every listener and its application is ready: the predecessor pauses
    accepting and answers how many seconds the successor has to confirm it accepts.

    C{dropped} names the listeners the successor did not keep: once it accepts, the predecessor
    closes those for good (a Unix path is unlinked) instead of leaving them to the successor.
    """

    arguments = [(b"dropped", amp.ListOf(amp.Unicode(), optional=True))]
    # waited: seconds the predecessor spent before pausing (telling its own predecessor to stand
    # down), which count in the successor's round trip but not against confirmWithin.
    response = [(b"confirmWithin", amp.Float()), (b"waited", amp.Float(optional=True))]
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


class StandDown(amp.Command):
    """
    A successor tells the predecessor standing by for it that it will not be needed: it stops
    on purpose (the operator wants the service down), or a newer generation has committed to
    take over from it.  The predecessor releases its paused copies of the listeners and drains
    on.  Sent only by a successor that said C{standby} in its L{Hello}; an older predecessor
    answers it UNHANDLED, which changes nothing.
    """

    arguments = [(b"reason", amp.Unicode())]
    response = []


class AdoptConnection(amp.Command):
    """
    A draining predecessor hands its successor one idle HTTP/1.x connection (plain TCP or Unix,
    between requests, nothing of a request received) accepted on its listener C{listener}:
    C{fd} is a duplicate of its descriptor, C{address} its local address (for messages).  The
    successor serves it on its own port of that listener (the one whose socket has the
    connection's local address), as if it had accepted it, and answers once it has; the
    predecessor then drops its copy without a word to the client (L{graceful_plugin.handover}).
    An addition to protocol version 1: an older successor answers UNHANDLED, and the
    predecessor closes the connection politely.
    """

    arguments = [
        (b"listener", amp.Unicode()),
        (b"address", amp.Unicode()),
        (b"fd", amp.Descriptor()),
    ]
    response = []
    errors = {NoHandoff: b"NO_HANDOFF", BadArgument: b"BAD_ARGUMENT"}


class IConnectionAdopter(Interface):
    """
    What takes the connections a draining predecessor hands over (L{AdoptConnection}); a
    control handler may provide it.
    """

    def adoptConnection(protocol: ControlProtocol, listener: str, address: str, fd: int) -> None:
        """
        Serve the connected socket C{fd} (accepted on the sender's listener C{listener}, its
        local address C{address}) on our port of that listener, or raise L{NoHandoff} or
        L{BadArgument}; C{fd} is closed either way.
        """


#: One process of a generation (graceful_plugin.workers): the leader is index 0.
_workerEntry = [
    (b"index", amp.Integer()),
    (b"pid", amp.Integer()),
    (b"sessions", amp.Integer()),
    (b"restarts", amp.Integer()),
    (b"uptime", amp.Float()),
    # Optional (a group without balance, and older generations, send neither): whether the
    # process holds accepting now, and how many times its place of the group held.
    (b"holding", amp.Boolean(optional=True)),
    (b"holds", amp.Integer(optional=True)),
]

_generationEntry = [
    (b"pid", amp.Integer()),
    (b"generation", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"sessions", amp.Integer()),
    # Optional (older generations send neither): seconds spent draining so far, and the live
    # sessions by listener (those with any, at most REPORT_LISTENERS).
    (b"since", amp.Float(optional=True)),
    (
        b"listeners",
        amp.AmpList([(b"name", amp.Unicode()), (b"sessions", amp.Integer())], optional=True),
    ),
    # Every process of that generation, when it has workers.
    (b"workers", amp.AmpList(_workerEntry, optional=True)),
]

#: At most this many listeners in a generation entry's C{listeners} (one AMP value: 64 KiB).
REPORT_LISTENERS = 50


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
                    # Connections accepted, predecessors' included (optional: older servers).
                    (b"connections", amp.Integer(optional=True)),
                ]
            ),
        ),
        (b"draining", amp.AmpList(_generationEntry)),
        (b"next", amp.Integer(optional=True)),
        # Optional figures (older servers send none): how many generations drain, handoffs by
        # outcome, and the count and sum of seconds of each timing (handoff, phase:NAME, drain).
        (b"drainingGenerations", amp.Integer(optional=True)),
        (
            b"handoffs",
            amp.AmpList([(b"outcome", amp.Unicode()), (b"total", amp.Integer())], optional=True),
        ),
        # Idle connections handed over to the generations so far (graceful_plugin.figures).
        (b"handedOver", amp.Integer(optional=True)),
        (
            b"timings",
            amp.AmpList(
                [(b"name", amp.Unicode()), (b"count", amp.Integer()), (b"sum", amp.Float())],
                optional=True,
            ),
        ),
        # Every process of this generation, the leader (index 0) first (graceful_plugin.workers).
        (b"workers", amp.AmpList(_workerEntry, optional=True)),
    ]
    errors = {BadArgument: b"BAD_ARGUMENT"}


class Counters(amp.Command):
    """
    The successor asks for the predecessor's counters, to continue them (an addition to
    protocol version 1: an older predecessor answers UNHANDLED, and the successor starts from
    zero).  Sent right after L{Commit}, so it is answered once the predecessor has paused
    accepting: the figures are final.  The connection counters come in batches from index
    C{start}; the first answer also carries the handoffs and histograms.
    """

    arguments = [(b"start", amp.Integer())]
    response = [
        (b"version", amp.Integer()),
        (
            b"connections",
            amp.AmpList([(b"listener", amp.Unicode()), (b"total", amp.Integer())]),
        ),
        (
            b"handoffs",
            amp.AmpList([(b"outcome", amp.Unicode()), (b"total", amp.Integer())], optional=True),
        ),
        # Idle connections handed over to the generations so far (an addition: optional).
        (b"handedOver", amp.Integer(optional=True)),
        (
            b"histograms",
            amp.AmpList(
                [
                    (b"name", amp.Unicode()),
                    (b"bounds", amp.ListOf(amp.Float())),
                    (b"counts", amp.ListOf(amp.Integer())),
                    (b"sum", amp.Float()),
                ],
                optional=True,
            ),
        ),
        (b"next", amp.Integer()),
    ]
    errors = {NoHandoff: b"NO_HANDOFF", BadArgument: b"BAD_ARGUMENT"}


class Stop(amp.Command):
    """
    Stop gracefully: stop accepting, drain (within C{drainTimeout} seconds if given), exit.
    """

    arguments = [(b"drainTimeout", amp.Float(optional=True))]
    response = []
    errors = {BadArgument: b"BAD_ARGUMENT"}


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

    def commit(protocol: ControlProtocol, dropped: list[str] | None = None) -> Any:
        """
        Answer L{Commit} (a L{Deferred} firing with the answer); C{dropped} names the listeners
        the successor did not keep.
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

    def standDown(protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        """
        Answer L{StandDown}.
        """

    def status(protocol: ControlProtocol, start: int) -> dict[str, Any]:
        """
        Answer L{Status}, with the batch of listeners from index C{start}.
        """

    def counters(protocol: ControlProtocol, start: int) -> dict[str, Any]:
        """
        Answer L{Counters}, with the batch of connection counters from index C{start}.
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


def writeNow(transport: Any) -> None:
    """
    Write what C{transport} holds now, not on the reactor's next turn.

    The answers to L{Commit} and to the L{Counters} behind it are the messages whose delay every
    client feels: once the predecessor has paused, nobody accepts until the successor has read
    them.  A
    transport only writes when the reactor next polls it, after every other descriptor that is
    ready in this turn and the next one (under load, a few milliseconds of serving requests).
    L{IWriteDescriptor.doWrite} writes as much as the socket takes, at once; whatever it cannot
    write (or an error) is left to the reactor as before.
    """
    if IWriteDescriptor.providedBy(transport) and not getattr(transport, "disconnected", True):
        transport.doWrite()


#: The commands whose answers leave at once (L{writeNow}): L{Commit}, and L{Counters}, which the
#: successor asks for right behind it and waits for before it accepts (so its answer, too, is
#: in the pause gap).
_FLUSHED = frozenset({Commit.commandName, Counters.commandName})


class ControlProtocol(amp.AMP):
    """
    One control connection, either end.  Commands are answered by the L{IControlHandler} given;
    descriptors received but never claimed by a command are closed when the connection ends.
    """

    log = Logger()

    def __init__(
        self, handler: IControlHandler, checkPeer: bool = False, limits: Any = None
    ) -> None:
        super().__init__()
        self.handler = handler
        self.checkPeer = checkPeer
        #: The listener's L{graceful_plugin.controlconn.ControlConnections}, if any.
        self.limits = limits
        self.peer: tuple[int, int, int] | None = None
        self.openedAt = time.monotonic()
        #: Whether the peer said in its Hello that it sends L{StandDown}.
        self.sendsStandDown = False
        #: The C{_ask} tags of the L{Commit}s whose answers are written the moment they are sent.
        self._flushAnswersTo: set[bytes] = set()

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
        if self.limits is not None and not self.limits.opened(self):
            return
        self.handler.connectionOpened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        for fd in list(self._descriptors.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._descriptors.clear()
        if self.limits is not None:
            self.limits.closed(self)
        super().connectionLost(reason)
        self.handler.connectionClosed(self, reason)

    # -- the Commit answer leaves at once ------------------------------------------------------

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if box.get(amp.COMMAND) in _FLUSHED and amp.ASK in box:
            self._flushAnswersTo.add(box[amp.ASK])
        return super().dispatchCommand(box)  # type: ignore[no-any-return]

    def sendBox(self, box: amp.AmpBox) -> None:
        super().sendBox(box)
        tag = box.get(amp.ANSWER, box.get(amp.ERROR))
        if tag is not None and tag in self._flushAnswersTo:
            self._flushAnswersTo.discard(tag)
            writeNow(self.transport)

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

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        # A complete command or answer: what keeps a connection from timing out (bytes that do
        # not complete one do not).
        if self.limits is not None:
            self.limits.activity(self)
        super().ampBoxReceived(box)

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
                answer = responder(box)
            except Exception as e:
                reason = f"malformed {command} command ({e.__class__.__name__}: {e})"[:200]
                self.log.warn(
                    "control connection from pid {pid} dropped: {reason}",
                    pid=self._peerPid(),
                    reason=reason,
                )
                raise amp.RemoteAmpError(b"MALFORMED", reason, fatal=True) from None
            limits = self.limits
            if limits is not None and isinstance(answer, Deferred) and not answer.called:
                # Being answered (a restart takes seconds): the connection is not idle.
                limits.started(self)

                def finished(result: Any) -> Any:
                    limits.finished(self)
                    return result

                answer.addBoth(finished)
            return answer

        return parsed

    @Hello.responder
    def _hello(self, version: int, pid: int, standby: bool | None = None) -> dict[str, Any]:
        answer = self.handler.hello(self, version, checkPid("pid", pid))
        self.sendsStandDown = bool(standby)
        if self.limits is not None:
            # A successor's link: never timed out or closed for room.
            self.limits.exempt(self)
        return answer

    @TakeOver.responder
    def _takeOver(self, start: int) -> dict[str, Any]:
        return self.handler.takeOver(self, checkIndex("start", start))

    @Commit.responder
    def _commit(self, dropped: list[str] | None = None) -> Any:
        return self.handler.commit(self, dropped or [])

    @Accepting.responder
    def _accepting(self) -> dict[str, Any]:
        return self.handler.accepting(self)

    @Abort.responder
    def _abort(self, reason: str) -> dict[str, Any]:
        return self.handler.abort(self, reason)

    @ReportSessions.responder
    def _reportSessions(self, generations: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            for entry in generations:
                checkPid("pid", entry["pid"])
                checkIndex("generation", entry["generation"])
                checkIndex("sessions", entry["sessions"])
        except BadArgument as e:
            # Nobody awaits an answer: the report is dropped, and nothing changes.
            self.log.warn(
                "control connection from pid {pid}: ignoring a session report: {error}",
                pid=self._peerPid(),
                error=str(e),
            )
            return {}
        if self.limits is not None:
            # A draining generation's link (it reports when its sessions change, which may be
            # seldom): never timed out or closed for room, like a successor's.
            self.limits.exempt(self)
        self.handler.reportSessions(self, generations)
        return {}

    @StandDown.responder
    def _standDown(self, reason: str) -> dict[str, Any]:
        return self.handler.standDown(self, reason)

    @AdoptConnection.responder
    def _adoptConnection(self, listener: str, address: str, fd: int) -> dict[str, Any]:
        adopter = IConnectionAdopter(self.handler, None)
        if adopter is None:
            os.close(fd)
            raise NoHandoff("this end of the control channel adopts no connections")
        adopter.adoptConnection(self, listener, address, fd)
        return {}

    @Status.responder
    def _status(self, start: int | None = None) -> dict[str, Any]:
        return self.handler.status(self, checkIndex("start", start or 0))

    @Counters.responder
    def _counters(self, start: int) -> dict[str, Any]:
        return self.handler.counters(self, checkIndex("start", start))

    @Stop.responder
    def _stop(self, drainTimeout: float | None = None) -> dict[str, Any]:
        if drainTimeout is not None:
            checkSeconds("drainTimeout", drainTimeout)
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

    hello = takeOver = commit = accepting = abort = status = stop = restart = standDown = _refuse
    counters = _refuse

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        pass
