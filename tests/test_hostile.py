"""
Hostile and broken peers (issue 13): a predecessor that hands over blocking sockets, a control
path served by another uid, and the like; each costs at most the handoff it spoils.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from graceful_plugin.listeners import adoptListener
from graceful_plugin.takeover import serverIdentityProblem
from tests.procs import TWISTD, Processes, freePort, httpGet

NOBODY = 65534


def test_adoptedDescriptorIsMadeNonBlocking() -> None:
    """
    A blocking listening socket adopted as a port becomes non-blocking (the flag is the
    socket's, so the adopted duplicate has it too).
    """
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    assert os.get_blocking(sock.fileno())
    try:
        port = adoptListener(MemoryReactor(), sock.fileno(), "tcp", Factory(), name="web")
        assert not os.get_blocking(sock.fileno())
        assert not os.get_blocking(port.fileno())
        port.socket.close()
    finally:
        sock.close()


@pytest.mark.slow
def test_successorServesABlockingListenerHandedOver(
    procs: Processes, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A successor handed blocking listening sockets by its predecessor serves many connections
    one after another and still stops on SIGTERM (it never sits in a blocking accept()).
    """
    port = freePort()
    monkeypatch.setenv("PORT", str(port))
    fake = procs.fakeSuccessor("old.sock", "predecessor:blocking")
    fake.waitFor(r"reached listening")
    successor = procs.server(["--takeover", "old.sock"], "successor")
    successor.pidfile = ""
    successor.start()
    fake.waitFor(r"successor accepting")
    successor.waitFor(r"took over from pid \d+")
    for _ in range(5):
        code, body = httpGet("127.0.0.1", port, "/", timeout=5)
        assert code == 200
    successor.signal(signal.SIGTERM)
    assert successor.wait(20) == 0
    assert "Traceback" not in successor.text()


def test_serverIdentityProblem() -> None:
    """
    Only a server of our own uid or root is taken over from; any other uid, or a server that
    cannot be identified, is named in one sentence.
    """
    assert serverIdentityProblem((10, 1000, 1000), ownUid=1000) is None
    assert serverIdentityProblem((10, 0, 0), ownUid=1000) is None
    assert serverIdentityProblem((10, 1001, 1001), ownUid=1000) == (
        "(pid 10) runs as uid 1001, not as uid 1000 or root"
    )
    assert serverIdentityProblem(None, ownUid=0) == "cannot be identified (no SO_PEERCRED)"


@pytest.mark.slow
def test_takeoverRefusesAServerOfAnotherUid(workdir: Path) -> None:
    """
    A successor whose control path is served by a process of another uid exits non-zero with
    one sentence naming that uid, before sending it anything (so nothing is handed over or
    adopted).
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to start a server under another uid")
    os.chmod(workdir, 0o755)
    shared = workdir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    path = shared / "c.sock"
    readEnd, writeEnd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.close(readEnd)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(4)
            os.write(writeEnd, b"listening\n")
            # Every connection (the option check probes the path too): how much it sent us.
            while True:
                conn, _ = listener.accept()
                conn.settimeout(5)
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                conn.close()
                os.write(writeEnd, f"received {len(data)}\n".encode())
        finally:
            os._exit(1)
    os.close(writeEnd)
    with os.fdopen(readEnd, "rb", buffering=0) as reports:
        try:
            assert reports.readline() == b"listening\n"
            result = subprocess.run(
                [TWISTD, "-n", "--pidfile", "", "graceful", "--takeover", str(path)],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=90,
                stdin=subprocess.DEVNULL,
            )
        finally:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(child, 0)
        received = reports.read().splitlines()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(
        rf"the server at \S*c.sock \(pid {child}\) runs as uid {NOBODY}, not as uid 0 or root;"
        " not taking over from it",
        output,
    ), output
    assert "Traceback" not in output
    assert "serving on" not in output
    assert received and set(received) == {b"received 0"}


@pytest.mark.slow
def test_successorStalledAfterCommitCostsHalfASecondByDefault(
    procs: Processes, workdir: Path
) -> None:
    """
    With the default --confirm-timeout (0.5 s, from the measured confirmation time of a few
    milliseconds), a successor stopped right after its commit is rolled back at 0.5 s and the
    predecessor answers the connection that waited; resumed, the successor gives up.
    """
    port = freePort()
    first = procs.server(
        ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"], "gen1"
    ).start()
    first.waitServing()
    stalled = procs.fakeSuccessor("c.sock", "real:committed")
    stalled.waitFor(r"reached committed")
    code, body = httpGet("127.0.0.1", port, "/", timeout=20)
    assert code == 200 and f"pid {first.pid}".encode() in body
    first.waitFor(
        rf"handoff to pid {stalled.pid} rolled back: the successor did not confirm accepting"
        r" within 0.5 s"
    )
    stalled.signal(signal.SIGCONT)
    assert stalled.wait(30) == 1
    assert "serving on" not in stalled.text()
