"""
``graceful-ctl`` against peers that are not a healthy graceful server: fakes that record the
bytes it sends (``restart --fresh``), a socket that never answers, a stopped server, a listener
of another uid, an echo server, an HTTP server, garbage, a server that closes at once, and a
control path too long for a Unix socket.  Every one ends with one sentence, never a traceback or
a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.protocols import amp

from graceful_plugin import control
from graceful_plugin.ampwire import BoxReader, encodeBox
from graceful_plugin.ctl import parser
from tests.procs import ctl

REPO = Path(__file__).resolve().parent.parent

STATUS = {
    "version": control.PROTOCOL_VERSION,
    "pid": 4242,
    "generation": 3,
    "state": "serving",
    "uptime": 12.5,
    "listeners": [
        {"name": "web", "kind": "tcp", "address": "127.0.0.1:8080", "accepting": True,
         "sessions": 2},
    ],
    "draining": [],
}  # fmt: skip

Handler = Callable[[socket.socket, "FakeServer"], None]


class FakeServer:
    """
    A Unix socket server in a thread: each connection goes to C{handler}, one at a time; every
    box received is kept in C{received} (as Twisted parses it).
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.received: list[dict[bytes, bytes]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(20)
                try:
                    self.handler(conn, self)
                except OSError:
                    pass

    def readBox(self, conn: socket.socket, reader: BoxReader) -> dict[bytes, bytes] | None:
        """
        The next box from C{conn}, or None at its end.  (The client sends one box and waits
        for its answer, so one read never holds two.)
        """
        while True:
            data = conn.recv(65536)
            if not data:
                return None
            boxes = reader.feed(data)
            if boxes:
                assert len(boxes) == 1, boxes
                # As Twisted reads it: the bytes must be AMP to Twisted too.
                parsed = amp.parseString(encodeBox(boxes[0]))
                assert len(parsed) == 1
                self.received.append(dict(parsed[0]))
                return boxes[0]

    def close(self) -> None:
        self.stopping = True
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def fake(workdir: Path) -> Iterator[Callable[[Handler], FakeServer]]:
    servers: list[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        server = FakeServer(workdir / "c.sock", handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _answer(box: dict[bytes, bytes], command: type[amp.Command], values: dict[str, Any]) -> bytes:
    reply = command.makeResponse(values, None)
    reply[b"_answer"] = box[b"_ask"]
    return bytes(reply.serialize())


def _progress(phase: str, ms: float, detail: str) -> bytes:
    box = control.RestartProgress.makeArguments({"phase": phase, "ms": ms, "detail": detail}, None)
    box[b"_command"] = b"RestartProgress"
    return bytes(box.serialize())


def _graceful(conn: socket.socket, server: FakeServer) -> None:
    """
    Answer Status as a graceful server does, and Restart with two progress reports first.
    """
    reader = BoxReader()
    while (box := server.readBox(conn, reader)) is not None:
        if box[b"_command"] == b"Status":
            conn.sendall(_answer(box, control.Status, STATUS))
        elif box[b"_command"] == b"Restart":
            conn.sendall(_progress("spawned", 0.5, "pid 4343: successor"))
            conn.sendall(_progress("accepting", 700.25, "the successor accepts"))
            phases = [{"phase": "spawned", "ms": 0.5, "detail": "pid 4343: successor"}]
            answer = {"pid": 4343, "generation": 4, "ms": 700.5, "phases": phases}
            conn.sendall(_answer(box, control.Restart, answer))


def _noTraceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_restartFreshSendsTheFlag(workdir: Path, fake: Callable[[Handler], FakeServer]) -> None:
    """
    ``restart --fresh`` sends Restart with C{fresh} true (and C{progress}); without it, no
    C{fresh} key at all.  The progress the server reports is printed as it comes.
    """
    server = fake(_graceful)
    result = ctl(workdir, "-c", "c.sock", "restart", "--fresh")
    assert result.returncode == 0, result.stderr
    assert "accepting    the successor accepts" in result.stdout
    assert "restarted: pid 4343 (generation 4) serves in 700.5 ms; pid 4242 drains" in result.stdout
    restarts = [box for box in server.received if box[b"_command"] == b"Restart"]
    assert [(b[b"fresh"], b[b"progress"]) for b in restarts] == [(b"True", b"True")]
    assert ctl(workdir, "-c", "c.sock", "restart").returncode == 0
    restarts = [box for box in server.received if box[b"_command"] == b"Restart"]
    assert len(restarts) == 2 and b"fresh" not in restarts[1]
    assert set(restarts[1]) == {b"_ask", b"_command", b"progress"}


def test_statusPassesEveryFieldThrough(
    workdir: Path, fake: Callable[[Handler], FakeServer]
) -> None:
    """
    ``status --json`` prints what the server sent, fields this client has no schema for
    included; the text output is as before.
    """
    extra = {"requests": 1234, "p99": 0.125}

    def newer(conn: socket.socket, server: FakeServer) -> None:
        box = server.readBox(conn, BoxReader())
        assert box is not None
        reply = control.Status.makeResponse(STATUS, None)
        reply.update({b"requests": b"1234", b"p99": b"0.125", b"_answer": box[b"_ask"]})
        conn.sendall(reply.serialize())

    fake(newer)
    result = ctl(workdir, "-c", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {**STATUS, **extra}
    text = ctl(workdir, "-c", "c.sock", "status")
    assert text.stdout.splitlines()[0] == "pid 4242, generation 3, serving, up 12.5 s"


def _mute(conn: socket.socket, server: FakeServer) -> None:
    """
    Accept, read, never answer (until the client goes).
    """
    while conn.recv(65536):
        pass


@pytest.mark.parametrize(
    "args, limit",
    [
        (["status", "--timeout", "1"], 1),
        (["restart", "--timeout", "2"], 2),
        (["watch", "--timeout", "2"], 2),
        (["stop", "--timeout", "1"], 1),
    ],
)
def test_aMuteServerCostsTheTimeout(
    workdir: Path, fake: Callable[[Handler], FakeServer], args: list[str], limit: float
) -> None:
    """
    Against a server that accepts and never answers, each command ends after its time limit
    with one sentence and exit status 1.
    """
    fake(_mute)
    started = time.monotonic()
    result = ctl(workdir, "-c", "c.sock", *args)
    took = time.monotonic() - started
    assert result.returncode == 1
    assert f"did not answer within {limit:g} s (is it stopped, or overloaded?)" in result.stderr
    _noTraceback(result)
    assert limit <= took < limit + 5


def test_aListenerThatNeverAccepts(workdir: Path) -> None:
    """
    A socket that listens but never accepts (connect succeeds into its queue) costs the
    timeout, too.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(workdir / "c.sock"))
        listener.listen(1)
        result = ctl(workdir, "-c", "c.sock", "status", "--timeout", "0.5")
    assert result.returncode == 1
    assert "did not answer within 0.5 s" in result.stderr
    _noTraceback(result)


def test_statusWaitsFiveSecondsByDefault() -> None:
    """
    ``status`` and ``stop`` give the server 5 s unless told otherwise.
    """
    assert parser().parse_args(["status"]).timeout == 5.0
    assert parser().parse_args(["stop"]).timeout == 5.0


_STOPPABLE = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from graceful_plugin.control import ClientHandler, ControlProtocol

    class Handler(ClientHandler):
        def status(self, protocol, start=0):
            return {"version": 1, "pid": 1, "generation": 2, "state": "serving",
                    "uptime": 0.0, "listeners": [],
                    "draining": [{"pid": 2, "generation": 1, "state": "draining",
                                  "sessions": 1}]}

    reactor.listenUNIX(sys.argv[1], Factory.forProtocol(lambda: ControlProtocol(Handler())))
    reactor.callWhenRunning(print, "listening", flush=True)
    reactor.run()
    """
)


def test_aStoppedServer(workdir: Path) -> None:
    """
    A server stopped with SIGSTOP (its socket accepts into the queue, nothing answers) makes
    ``status``, ``restart --timeout 2`` and ``watch --timeout 2`` end with a sentence and exit
    status 1; the same server answers once continued.
    """
    server = subprocess.Popen(
        [sys.executable, "-c", _STOPPABLE, str(workdir / "c.sock")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        assert ctl(workdir, "-c", "c.sock", "status").returncode == 0
        os.kill(server.pid, signal.SIGSTOP)
        try:
            results = [
                ctl(workdir, "-c", "c.sock", "status", "--timeout", "1"),
                ctl(workdir, "-c", "c.sock", "restart", "--timeout", "2"),
                ctl(workdir, "-c", "c.sock", "watch", "--timeout", "2"),
            ]
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert ctl(workdir, "-c", "c.sock", "status").returncode == 0
    finally:
        server.kill()
        server.wait(10)
    for result, limit in zip(results, (1, 2, 2), strict=True):
        assert result.returncode == 1
        assert f"did not answer within {limit} s" in result.stderr
        _noTraceback(result)


_OTHER_UID = textwrap.dedent(
    """
    import os, socket, sys
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    os.setuid(65534)
    listener.listen(1)   # SO_PEERCRED names who called listen()
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(10)
    print("received %d bytes" % len(conn.recv(65536)), flush=True)
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a listener as another uid")
def test_aServerOfAnotherUidIsRefused(workdir: Path) -> None:
    """
    A listener at the control path that runs as another uid (not ours, not root) is refused
    with a sentence naming its uid, and is sent nothing.
    """
    stranger = subprocess.Popen(
        [sys.executable, "-c", _OTHER_UID, str(workdir / "c.sock")],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert stranger.stdout is not None
        assert stranger.stdout.readline().strip() == "listening"
        result = ctl(workdir, "-c", "c.sock", "status")
        assert stranger.stdout.readline().strip() == "received 0 bytes"
    finally:
        stranger.kill()
        stranger.wait(10)
    assert result.returncode == 1
    assert f"(pid {stranger.pid}) runs as uid 65534, neither ours (0) nor root" in result.stderr
    _noTraceback(result)


def _echo(conn: socket.socket, server: FakeServer) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _http(conn: socket.socket, server: FakeServer) -> None:
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\nBad Request"
    )


def _garbage(conn: socket.socket, server: FakeServer) -> None:
    conn.sendall(bytes(range(255, 0, -1)))


_CUT_SHORT = b"\x00\x07_answer\x00\x011\x00\x07ver"


def _cutShort(conn: socket.socket, server: FakeServer) -> None:
    conn.recv(65536)
    conn.sendall(_CUT_SHORT)


def _closeAtOnce(conn: socket.socket, server: FakeServer) -> None:
    pass


def _wrongAnswer(conn: socket.socket, server: FakeServer) -> None:
    box = server.readBox(conn, BoxReader())
    assert box is not None
    conn.sendall(amp.AmpBox(_answer=box[b"_ask"], version=b"one").serialize())


def _unhandled(conn: socket.socket, server: FakeServer) -> None:
    box = server.readBox(conn, BoxReader())
    assert box is not None
    error = amp.AmpBox(
        _error=box[b"_ask"], _error_code=b"UNHANDLED", _error_description=b"Unhandled Command"
    )
    conn.sendall(error.serialize())


_PEERS = [
    (_echo, "does not speak graceful's control protocol (it sent a question instead"),
    (_http, "does not speak graceful's control protocol (it sent bytes that are not AMP"),
    (_garbage, "does not speak graceful's control protocol (it sent bytes that are not AMP"),
    (_cutShort, f"(it sent {len(_CUT_SHORT)} bytes that are not a whole AMP box)"),
    (_closeAtOnce, "the server closed the connection (only its own user or root may use it)"),
    (_wrongAnswer, "(it sent a malformed answer to Status: version: b'one' is not a valid"),
    (_unhandled, "the server does not know this command (an older version?)"),
]


@pytest.mark.parametrize(
    "handler, sentence, command",
    [
        (handler, sentence, command)
        for handler, sentence in _PEERS
        for command in ("status", "restart", "watch", "stop")
        # Stop's answer has no field: any _answer box is a valid one.
        if (handler, command) != (_wrongAnswer, "stop")
    ],
)
def test_notAGracefulServer(
    workdir: Path,
    fake: Callable[[Handler], FakeServer],
    handler: Handler,
    sentence: str,
    command: str,
) -> None:
    """
    Against an echo server, an HTTP server, garbage, a box cut short, a server closing at once,
    a malformed answer or an older server, every command exits 1 with one sentence saying so.
    """
    fake(handler)
    result = ctl(workdir, "-c", "c.sock", command, "--timeout", "5")
    assert result.returncode == 1
    assert sentence in result.stderr
    _noTraceback(result)


def test_aControlPathTooLongForAUnixSocket(workdir: Path) -> None:
    """
    A control path longer than a Unix socket address holds is reached through its shorter
    relative form when there is one, and is otherwise refused with a sentence saying so (not
    "no such socket").
    """
    deep = workdir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "c.sock"
    here = os.getcwd()
    os.chdir(deep)
    try:
        server = FakeServer(Path("c.sock"), _graceful)
    finally:
        os.chdir(here)
    try:
        near = ctl(deep, "-c", str(path), "status")
        far = ctl(Path("/"), "-c", str(path), "status")
    finally:
        server.close()
    assert len(os.fsencode(str(path))) > 108
    assert near.returncode == 0, near.stderr
    assert "pid 4242, generation 3" in near.stdout
    assert far.returncode == 1
    assert (
        f"the control path {path} is {len(os.fsencode(str(path)))} bytes long, more than a"
        " Unix socket address holds (108)"
    ) in far.stderr
    _noTraceback(far)


def test_aPathThatIsNotASocket(workdir: Path) -> None:
    """
    A control path naming a directory or a plain file says so, rather than calling it a stale
    socket.
    """
    (workdir / "plain").write_text("")
    for name, what in ((".", "a directory"), ("plain", "a file")):
        result = ctl(workdir, "-c", name, "status")
        assert result.returncode == 1
        assert f"it is {what}, not a socket (is this its --control path?)" in result.stderr
        _noTraceback(result)


def test_timesMustBeFinite(workdir: Path) -> None:
    """
    An infinite or absurd time limit is refused as a bad option (exit status 2), as a
    non-positive one is.
    """
    for args in (["status", "--timeout", "inf"], ["stop", "--drain-timeout", "1e300"]):
        result = ctl(workdir, "-c", "c.sock", *args)
        assert result.returncode == 2
        assert "expected at most 31536000 seconds (a year)" in result.stderr
        assert "Traceback" not in result.stderr


def _statusOnly(conn: socket.socket, server: FakeServer) -> None:
    """
    Answer Status; take Restart and never answer it.
    """
    reader = BoxReader()
    while (box := server.readBox(conn, reader)) is not None:
        if box[b"_command"] == b"Status":
            conn.sendall(_answer(box, control.Status, STATUS))
        else:
            conn.sendall(_progress("spawned", 0.5, "pid 4343: successor"))


def test_aRestartWithoutOutcomeEndsAtItsTimeout(
    workdir: Path, fake: Callable[[Handler], FakeServer]
) -> None:
    """
    A server that takes Restart and never decides it makes ``restart --timeout 2`` fail after
    2 s with the phases seen so far, in text and in JSON.
    """
    fake(_statusOnly)
    text = ctl(workdir, "-c", "c.sock", "restart", "--timeout", "2")
    assert text.returncode == 1
    assert " spawned      pid 4343: successor" in text.stdout
    assert "restart failed: no outcome within 2 s; see `graceful-ctl status`" in text.stderr
    _noTraceback(text)
    answer = json.loads(ctl(workdir, "-c", "c.sock", "restart", "--json", "--timeout", "1").stdout)
    assert answer["ok"] is False and answer["error"].startswith("no outcome within 1 s")
    assert [p["phase"] for p in answer["phases"]] == ["spawned"]


def test_permissionDeniedIsNamedEvenWhereThePathCannotBeSeen(workdir: Path) -> None:
    """
    C{EACCES} from connect() is "permission denied", also when the path's directory hides it
    from us (so that it does not look absent); a refused connect on a socket is "nothing
    listens".
    """
    from graceful_plugin.ctlclient import describeConnectFailure

    hidden = "/root/.nothing-here/c.sock"
    assert describeConnectFailure(hidden, PermissionError(13, "Permission denied")) == (
        f"permission denied on {hidden}: run as the server's user or root"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(workdir / "stale.sock"))
    refused = ConnectionRefusedError(111, "Connection refused")
    message = describeConnectFailure(str(workdir / "stale.sock"), refused)
    assert message.startswith("nothing listens")


def test_aFullListenQueue(workdir: Path) -> None:
    """
    A listener whose queue is full (a stopped or swamped server: connect() fails at once with
    EAGAIN) costs the time limit and the same sentence as a server that does not answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(workdir / "c.sock"))
        listener.listen(0)
        queued = []
        try:
            while True:  # fill the queue (a backlog of 0 holds one)
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                queued.append(client)
                client.connect(str(workdir / "c.sock"))
        except BlockingIOError:
            pass
        try:
            result = ctl(workdir, "-c", "c.sock", "status", "--timeout", "1")
        finally:
            for client in queued:
                client.close()
    assert result.returncode == 1
    assert "did not answer within 1 s (is it stopped, or overloaded?)" in result.stderr
    _noTraceback(result)
