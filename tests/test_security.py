"""
The control channel is the operator's alone: its socket is 0600 from the moment it exists, other
uids are refused, and malformed input or descriptors of the wrong kind only ever cost the
connection that sent them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from graceful_plugin import listeners
from graceful_plugin.listeners import ListenerSpec, bindListener
from tests.procs import TWISTD, Processes, ctl, freePort, httpGet

NOBODY = 65534

#: A Status command as raw AMP: what a client sends first.
STATUS_BOX = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x06Status\x00\x00"


def _portArgs(port: int) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]


def _assertServes(workdir: Path, port: int, pid: int) -> None:
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == pid
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {pid}".encode() in body


def _exchange(path: Path, data: bytes, untilClosed: bool = False) -> tuple[bytes, bool]:
    """
    Send C{data} on a fresh control connection and read until the server closes it or (unless
    C{untilClosed}) has answered one box; the bytes read and whether the server closed the
    connection.  A server that neither answers nor closes fails the test by the socket timeout.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(data)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
            if not untilClosed and received.endswith(b"\x00\x00"):
                return received, False


def test_bindCreatesUnixSocketWithItsModeUnderAPermissiveUmask(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Under umask 0, a 0600 Unix socket already has mode 0600 right after bind() returns (no
    moment with a wider mode), and keeps it once listening.
    """
    seen: list[int] = []

    class Spy(socket.socket):
        def bind(self, address: object) -> None:
            super().bind(address)  # type: ignore[arg-type]
            if isinstance(address, str):
                seen.append(stat.S_IMODE(os.stat(address).st_mode))

    monkeypatch.setattr(listeners.socket, "socket", Spy)
    old = os.umask(0)
    try:
        sock = bindListener(
            ListenerSpec(name="control", kind="unix", path=str(workdir / "c.sock"), mode=0o600)
        )
    finally:
        os.umask(old)
    sock.close()
    assert seen == [0o600]
    assert stat.S_IMODE(os.stat(workdir / "c.sock").st_mode) == 0o600


def test_servedControlSocketIsOwnerOnlyAcrossTakeovers(procs: Processes, workdir: Path) -> None:
    """
    A server started under umask 0 serves its control socket with mode 0600, and so does its
    successor after a takeover.
    """
    port = freePort()
    old = os.umask(0)
    try:
        first = procs.server(_portArgs(port), "gen1").start()
        first.waitServing()
        assert stat.S_IMODE(os.stat(workdir / "c.sock").st_mode) == 0o600
        second = procs.server(["--takeover", "c.sock"], "gen2").start()
        second.waitFor(r"took over from pid %d" % first.pid)
    finally:
        os.umask(old)
    assert first.wait(60) == 0
    assert stat.S_IMODE(os.stat(workdir / "c.sock").st_mode) == 0o600
    _assertServes(workdir, port, second.pid)


_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("permission denied at connect")
    sys.exit(0)
data = b""
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    while chunk := s.recv(65536):
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print("answered" if data else "closed without an answer")
"""


def _asNobody(path: Path) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None
    result = subprocess.run(
        [python, "-I", "-S", "-c", _AS_NOBODY, str(path), STATUS_BOX.hex()],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
def test_anotherUidIsRefused(procs: Processes, workdir: Path) -> None:
    """
    A process of another uid (nobody) cannot connect to the 0600 control socket; with the
    socket opened to everyone, SO_PEERCRED still refuses it, the refusal is logged with its
    uid, and the server serves on.
    """
    port = freePort()
    server = procs.server(_portArgs(port), "gen1").start()
    server.waitServing()
    os.chmod(workdir, 0o755)
    control = workdir / "c.sock"
    assert _asNobody(control) == "permission denied at connect"
    os.chmod(control, 0o666)
    try:
        assert _asNobody(control) == "closed without an answer"
    finally:
        os.chmod(control, 0o600)
    server.waitFor(r"control connection refused: peer \d+ runs as uid %d, not 0 or root" % NOBODY)
    _assertServes(workdir, port, server.pid)


@pytest.mark.parametrize(
    "name, data, closed, logged",
    [
        (
            "garbage",
            b"\xff\xfe not AMP at all \x00\x00",
            True,
            r"dropped: a frame of \d+ bytes is longer than AMP allows",
        ),
        (
            "oversized frame",
            b"\x01\x00" + b"k" * 256 + b"\x00\x00",
            True,
            r"dropped: a frame of 256 bytes is longer than AMP allows",
        ),
        (
            "box without a command",
            b"\x00\x03foo\x00\x03bar\x00\x00",
            True,
            r"dropped: malformed input \(NoEmptyBoxes",
        ),
        (
            "answer to nothing",
            b"\x00\x07_answer\x00\x0299\x00\x00",
            True,
            r"dropped: malformed input \(KeyError",
        ),
        (
            "command without its arguments",
            b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Hello\x00\x00",
            True,
            r"dropped: malformed Hello command \(KeyError: b'version'\)",
        ),
        (
            "unknown command",
            b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Nopez\x00\x00",
            False,
            r"unknown command 'Nopez'",
        ),
    ],
)
def test_malformedInputCostsOnlyItsConnection(
    procs: Processes, workdir: Path, name: str, data: bytes, closed: bool, logged: str
) -> None:
    """
    Garbage, an oversized frame, boxes that are neither command nor awaited answer and
    commands with missing arguments drop their connection with a one-line logged reason (an
    unknown command is answered UNHANDLED and logged); no traceback, and the server serves on.
    """
    port = freePort()
    server = procs.server(_portArgs(port), "gen1").start()
    server.waitServing()
    received, wasClosed = _exchange(workdir / "c.sock", data, untilClosed=closed)
    assert wasClosed == closed, received
    if not closed:
        assert b"UNHANDLED" in received
    server.waitFor(r"control connection from pid \d+:? " + logged)
    assert "Traceback" not in server.text()
    _assertServes(workdir, port, server.pid)


def test_floodOfControlConnections(procs: Processes, workdir: Path) -> None:
    """
    Three hundred control connections held open at once neither stop the server answering
    Status on another one nor serving HTTP; closing them leaves it serving.
    """
    port = freePort()
    server = procs.server(_portArgs(port), "gen1").start()
    server.waitServing()
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(s)
            s.connect(str(workdir / "c.sock"))
        answer, closed = _exchange(workdir / "c.sock", STATUS_BOX)
        assert not closed and b"_answer" in answer
        assert httpGet("127.0.0.1", port, "/")[0] == 200
    finally:
        for s in flood:
            s.close()
    _assertServes(workdir, port, server.pid)


@pytest.mark.parametrize(
    "kind, problem", [("pipe", "it is not a socket"), ("udp", "it is not a stream socket")]
)
def test_descriptorOfTheWrongKindIsRefusedBySuccessor(
    procs: Processes, workdir: Path, kind: str, problem: str
) -> None:
    """
    A successor handed a pipe or a UDP socket where a TCP listener is expected exits non-zero
    with a sentence naming what it got, tells the predecessor why (Abort), and never serves.
    """
    fake = procs.fakeSuccessor("old.sock", f"predecessor:{kind}")
    fake.waitFor(r"reached listening")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile", "", "graceful", "--takeover", "old.sock"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    message = f"the predecessor handed over 'web' as a tcp listener, but {problem}"
    assert message in output, output
    assert "Traceback" not in output
    assert "serving on" not in output
    fake.waitFor(r"successor gave up: " + message)
    assert fake.process is not None and fake.process.poll() is None
