"""
The admin client's end of the control channel, in the standard library alone: a blocking Unix
socket with a deadline on every exchange, the peer's credentials checked, and the admin
commands (L{Status}, L{Restart} with its L{RestartProgress} reports, L{Stop}) as schemas that
mirror L{graceful_plugin.control}'s C{amp.Command} definitions (the tests hold them equal).

No Twisted here: C{graceful-ctl} starts in a few milliseconds of CPU instead of a reactor's
200, so that a monitoring loop or a deploy script costs the server next to nothing.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time

from graceful_plugin.ampwire import (
    ANSWER,
    ASK,
    COMMAND,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    UNHANDLED_ERROR_CODE,
    UNKNOWN_ERROR_CODE,
    AmpList,
    Boolean,
    BoxReader,
    Float,
    Integer,
    Schema,
    Unicode,
    WireError,
    decodeValues,
    encodeBox,
    encodeValues,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: L{graceful_plugin.control.PROTOCOL_VERSION}, which the tests hold equal.
PROTOCOL_VERSION = 1

#: The longest path C{connect()} takes for a Unix socket (C{sun_path} is 108 bytes on Linux).
MAX_UNIX_PATH = 108


class Deadline:
    """
    A time limit: C{seconds} from now, or C{seconds} in all from the L{Deadline} C{within}
    (whichever ends first).
    """

    def __init__(self, seconds: float, within: Deadline | None = None) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        if within is not None and within.at < self.at:
            self.seconds, self.at = within.seconds, within.at

    def remaining(self) -> float:
        return self.at - time.monotonic()


class Command:
    """
    One AMP command as the client sees it: its name, arguments, answer, and error codes.
    """

    def __init__(
        self,
        name: bytes,
        arguments: Schema,
        response: Schema,
        errors: dict[bytes, str] | None = None,
        requiresAnswer: bool = True,
    ) -> None:
        self.name = name
        self.arguments = arguments
        self.response = response
        self.errors = errors or {}
        self.requiresAnswer = requiresAnswer


#: One process of a generation: the leader is index 0.
_workerEntry: Schema = (
    (b"index", Integer()),
    (b"pid", Integer()),
    (b"sessions", Integer()),
    (b"restarts", Integer()),
    (b"uptime", Float()),
    (b"holding", Boolean(optional=True)),
    (b"holds", Integer(optional=True)),
)

_generationEntry: Schema = (
    (b"pid", Integer()),
    (b"generation", Integer()),
    (b"state", Unicode()),
    (b"sessions", Integer()),
    # Optional: seconds spent draining so far, and the live sessions by listener.
    (b"since", Float(optional=True)),
    (b"listeners", AmpList(((b"name", Unicode()), (b"sessions", Integer())), optional=True)),
    # Every process of that generation, when it has workers.
    (b"workers", AmpList(_workerEntry, optional=True)),
)

_phaseEntry: Schema = (
    (b"phase", Unicode()),
    (b"ms", Float()),
    (b"detail", Unicode()),
)

Status = Command(
    b"Status",
    arguments=((b"start", Integer(optional=True)),),
    response=(
        (b"version", Integer()),
        (b"pid", Integer()),
        (b"generation", Integer()),
        (b"state", Unicode()),
        (b"uptime", Float()),
        (
            b"listeners",
            AmpList(
                (
                    (b"name", Unicode()),
                    (b"kind", Unicode()),
                    (b"address", Unicode()),
                    (b"accepting", Boolean()),
                    (b"sessions", Integer()),
                    (b"connections", Integer(optional=True)),
                )
            ),
        ),
        (b"draining", AmpList(_generationEntry)),
        (b"next", Integer(optional=True)),
        (b"drainingGenerations", Integer(optional=True)),
        (b"handoffs", AmpList(((b"outcome", Unicode()), (b"total", Integer())), optional=True)),
        (b"handedOver", Integer(optional=True)),
        (
            b"timings",
            AmpList(
                ((b"name", Unicode()), (b"count", Integer()), (b"sum", Float())), optional=True
            ),
        ),
        (b"workers", AmpList(_workerEntry, optional=True)),
    ),
)

Stop = Command(b"Stop", arguments=((b"drainTimeout", Float(optional=True)),), response=())

Restart = Command(
    b"Restart",
    # C{fresh} (force a fresh fork server) is sent only when asked for; a server that predates
    # it ignores the key, as AMP ignores every key a command does not declare.
    arguments=((b"progress", Boolean(optional=True)), (b"fresh", Boolean(optional=True))),
    response=(
        (b"pid", Integer()),
        (b"generation", Integer()),
        (b"ms", Float()),
        (b"phases", AmpList(_phaseEntry)),
    ),
    errors={b"BUSY": "HandoffBusy", b"RESTART_FAILED": "RestartFailed"},
)

RestartProgress = Command(b"RestartProgress", _phaseEntry, (), requiresAnswer=False)

#: Every command this client sends or takes, for the tests that hold them to control.py's.
COMMANDS = {c.name: c for c in (Status, Stop, Restart, RestartProgress)}


class CtlError(Exception):
    """
    An error to print as one line, exiting non-zero.
    """


class RemoteError(Exception):
    """
    The server answered a command with an error the command declares (C{kind}, the name of
    the exception in L{graceful_plugin.control}: C{HandoffBusy}, C{RestartFailed}).
    """

    def __init__(self, kind: str, description: str) -> None:
        super().__init__(description)
        self.kind = kind


class Unhandled(CtlError):
    """
    The server does not know the command (an older version).
    """


class Timeout(CtlError):
    """
    The server did not answer within the time given.
    """


class ConnectionClosed(CtlError):
    """
    The server closed the connection before it answered.
    """


def describeConnectFailure(path: str, error: OSError) -> str:
    """
    One sentence on why C{path} could not be reached.
    """
    if isinstance(error, PermissionError):
        return f"permission denied on {path}: run as the server's user or root"
    if isinstance(error, FileNotFoundError) or not os.path.lexists(path):
        return f"no server at {path}: there is no such socket (is this its --control path?)"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a file"
        return f"no server at {path}: it is {what}, not a socket (is this its --control path?)"
    if isinstance(error, ConnectionRefusedError):
        return f"nothing listens at {path} (a stale socket left by a server that died?)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"permission denied on {path}: run as the server's user or root"
    if error.errno is None:
        return f"cannot connect to {path}: {error}"
    return f"cannot connect to {path}: {os.strerror(error.errno)}"


def _connectPath(path: str) -> str:
    """
    The path to give C{connect()} for C{path} (absolute): itself, or the same socket relative
    to the working directory when only that is short enough.

    @raise CtlError: neither fits a Unix socket address.
    """
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return path
    relative = os.path.relpath(path)
    if len(os.fsencode(relative)) <= MAX_UNIX_PATH:
        return relative
    raise CtlError(
        f"the control path {path} is {len(os.fsencode(path))} bytes long, more than a Unix"
        f" socket address holds ({MAX_UNIX_PATH}): give a shorter or a relative path"
    )


class Connection:
    """
    One control connection to the server at C{path}, every exchange bounded by a deadline.
    """

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self.reader = BoxReader()
        self._tags = 0

    @classmethod
    def open(cls, path: str, deadline: Deadline) -> Connection:
        """
        Connect to C{path} before C{deadline} and check that the server
        runs as our uid or root.

        @raise CtlError: with a sentence when it cannot be reached or is not to be trusted.
        """
        target = _connectPath(path)
        pause = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(_remaining(path, deadline))
                try:
                    sock.connect(target)
                except TimeoutError:
                    raise _timeout(path, deadline) from None
                except BlockingIOError:
                    # A Unix listener whose queue is full refuses at once (EAGAIN), even in
                    # blocking mode: a stopped or swamped server.  Try again until the deadline.
                    sock.close()
                    time.sleep(min(pause, max(deadline.remaining(), 0)))
                    pause = min(pause * 2, 0.1)
                    continue
                except OSError as e:
                    raise CtlError(describeConnectFailure(path, e)) from None
                checkPeer(path, sock)
            except BaseException:
                sock.close()
                raise
            return cls(path, sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        command: Command,
        deadline: Deadline,
        onProgress: Callable[[dict[str, Any]], None] | None = None,
        /,
        **arguments: Any,
    ) -> dict[str, Any]:
        """
        Send C{command} with C{arguments} and wait, until C{deadline}, for its answer;
        L{RestartProgress} reports that arrive meanwhile go to C{onProgress}.  (The first
        three parameters are positional only, so that any name can be an argument's.)

        @raise RemoteError: the server answered with an error the command declares.
        @raise Timeout: no answer before C{deadline}.
        @raise ConnectionClosed: the server closed the connection first.
        @raise CtlError: any other failure, as a sentence (the server is not a graceful one,
            does not know the command, or failed).
        """
        self._tags += 1
        tag = b"%x" % self._tags
        box = encodeValues(command.arguments, arguments)
        box[COMMAND] = command.name
        box[ASK] = tag
        self._send(encodeBox(box), deadline)
        while True:
            for reply in self._receive(deadline):
                if COMMAND in reply:
                    self._commandReceived(reply, onProgress)
                    continue
                if reply.get(ANSWER) == tag:
                    try:
                        return decodeValues(command.response, reply)
                    except WireError as e:
                        raise self._notOurs(
                            f"a malformed answer to {command.name.decode()}: {e}"
                        ) from None
                if reply.get(ERROR) == tag:
                    raise self._error(command, reply)
                raise self._notOurs("a box that answers nothing this client asked")

    def _commandReceived(
        self, box: dict[bytes, bytes], onProgress: Callable[[dict[str, Any]], None] | None
    ) -> None:
        """
        The server sent a command: only L{RestartProgress} (which needs no answer) is one a
        graceful server sends; one that asks for an answer means the peer is something else
        (an echo server sends our own question back).
        """
        if ASK in box:
            raise self._notOurs("a question instead of an answer")
        if box[COMMAND] == RestartProgress.name and onProgress is not None:
            try:
                onProgress(decodeValues(RestartProgress.arguments, box))
            except WireError as e:
                raise self._notOurs(f"a malformed RestartProgress: {e}") from None
        # Any other report without _ask is from a newer server: nothing to do with it.

    def _error(self, command: Command, box: dict[bytes, bytes]) -> Exception:
        code = box.get(ERROR_CODE, b"")
        description = box.get(ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
        if code in command.errors:
            return RemoteError(command.errors[code], description)
        if code == UNHANDLED_ERROR_CODE:
            return Unhandled("the server does not know this command (an older version?)")
        if code == UNKNOWN_ERROR_CODE:
            return CtlError("the server failed to answer; its log says why")
        return CtlError(
            f"the server refused {command.name.decode()}:"
            f" {code.decode('ascii', 'replace')[:40]}: {description[:200]}"
        )

    def _notOurs(self, what: str) -> CtlError:
        return CtlError(
            f"the server at {self.path} does not speak graceful's control protocol (it sent {what})"
        )

    def _send(self, data: bytes, deadline: Deadline) -> None:
        try:
            self.sock.settimeout(_remaining(self.path, deadline))
            self.sock.sendall(data)
        except TimeoutError:
            raise _timeout(self.path, deadline) from None
        except OSError:
            # The server closed before reading us (EPIPE, ECONNRESET): what it sent before
            # that, if anything, still says who it is; the reads that follow tell.
            pass

    def _receive(self, deadline: Deadline) -> list[dict[bytes, bytes]]:
        """
        The boxes the next bytes from the server complete (perhaps none).
        """
        try:
            self.sock.settimeout(_remaining(self.path, deadline))
            data = self.sock.recv(65536)
        except TimeoutError:
            raise _timeout(self.path, deadline) from None
        except OSError:
            data = b""  # reset by the server: as a close
        if not data:
            if self.reader.pending():
                raise self._notOurs(f"{self.reader.pending()} bytes that are not a whole AMP box")
            raise _closed(self.path)
        try:
            return self.reader.feed(data)
        except WireError as e:
            raise self._notOurs(f"bytes that are not AMP: {e}") from None


def checkPeer(path: str, sock: socket.socket) -> None:
    """
    @raise CtlError: the process listening at C{path} runs as neither our uid nor root (it
        could be anyone's stand-in for the server, and would be told what we ask).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as e:
        raise CtlError(f"cannot tell who listens at {path}: {e.strerror}") from None
    pid, uid, _ = struct.unpack("3i", raw)
    if uid not in (os.getuid(), 0):
        raise CtlError(
            f"the process at {path} (pid {pid}) runs as uid {uid}, neither ours"
            f" ({os.getuid()}) nor root: not talking to it (if it is the server, run"
            " graceful-ctl as its user, e.g. with sudo -u)"
        )


def _remaining(path: str, deadline: Deadline) -> float:
    left = deadline.remaining()
    if left <= 0:
        raise _timeout(path, deadline)
    return left


def _timeout(path: str, deadline: Deadline) -> Timeout:
    return Timeout(
        f"the server at {path} did not answer within {deadline.seconds:g} s"
        " (is it stopped, or overloaded?)"
    )


def _closed(path: str) -> ConnectionClosed:
    return ConnectionClosed(
        "the server closed the connection (only its own user or root may use it)"
    )
