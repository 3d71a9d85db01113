"""
Idle keep-alive connections move to the successor (graceful_plugin.handover), with real
processes and raw sockets on loopback: the client never sees its connection closed, and its next
request, whenever it sends it, is answered by the new generation on the same connection.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.procs import Processes, freePort

_GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


class KeepAlive:
    """
    One persistent connection, used by hand: each request's answer, and whether the server ever
    said ``Connection: close`` or closed it.
    """

    def __init__(self, family: int, address: object) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(address)
        self.pids: list[int] = []
        self.toldToClose = 0

    def closedWhileIdle(self) -> bool:
        if not select.select([self.sock], [], [], 0)[0]:
            return False
        return self.sock.recv(1, socket.MSG_PEEK) == b""

    def request(self) -> int:
        """
        One request on this connection; the pid that answered.

        @raise ConnectionError: closed (or reset) before the whole answer arrived.
        """
        self.sock.sendall(_GET)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after the request was sent ({data!r})")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the middle of the body")
            body += chunk
        if re.search(rb"(?i)\r\nconnection: *close", head):
            self.toldToClose += 1
        pid = int(re.search(rb"pid (\d+)", body).group(1))  # type: ignore[union-attr]
        self.pids.append(pid)
        return pid

    def close(self) -> None:
        self.sock.close()


def _listener(kind: str, workdir: Path) -> tuple[str, int, object]:
    if kind == "unix":
        path = str(workdir / "web.sock")
        return f"unix:{path}", socket.AF_UNIX, path
    if kind == "tcp6":
        port = freePort("::1")
        return f"tcp6:{port}:interface=::1", socket.AF_INET6, ("::1", port)
    port = freePort()
    return f"tcp:{port}:interface=127.0.0.1", socket.AF_INET, ("127.0.0.1", port)


@pytest.mark.parametrize("kind", ["tcp", "tcp6", "unix"])
def test_idleConnectionsMoveToTheSuccessorAndNeverClose(
    procs: Processes, workdir: Path, kind: str
) -> None:
    """
    Sixteen keep-alive connections, each idle after one answer from generation 1, send their
    next request at moments spread over the takeover (before the drain, while the connections
    are being handed over, and long after the moment the old drain would have closed them):
    every request is answered, none with Connection: close, no connection is ever closed, the
    old generation exits at once (nothing left to drain) having handed them over, and after it
    has gone every connection is answered by the new generation.
    """
    spec, family, address = _listener(kind, workdir)
    gen1 = procs.server(["--port", spec, "--control", "c.sock"], "gen1").start()
    gen1.waitServing()
    clients = [KeepAlive(family, address) for _ in range(16)]
    errors: list[str] = []
    try:
        for client in clients:
            assert client.request() == gen1.pid
        started = time.monotonic()
        gen2 = procs.server(["--takeover", "c.sock"], "gen2").start()

        def later(client: KeepAlive, delay: float) -> None:
            time.sleep(max(0.0, started + delay - time.monotonic()))
            try:
                client.request()
            except OSError as e:
                errors.append(repr(e))

        threads = [
            threading.Thread(target=later, args=(client, 0.15 * n), daemon=True)
            for n, client in enumerate(clients)
        ]
        for t in threads:
            t.start()
        gen2.waitFor(r"took over from pid %d" % gen1.pid)
        assert gen1.wait(30) == 0
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert [c.toldToClose for c in clients] == [0] * len(clients)
        assert [c.closedWhileIdle() for c in clients] == [False] * len(clients)
        for client in clients:
            assert client.request() == gen2.pid
        handed = re.search(r"handed (\d+) idle connection\(s\) over", gen1.text())
        assert handed is not None and int(handed.group(1)) >= 1, gen1.text()[-3000:]
        assert "drain deadline passed" not in gen1.text()
    finally:
        for client in clients:
            client.close()


def test_anOlderSuccessorLeavesTheIdleCloseAsBefore(procs: Processes, workdir: Path) -> None:
    """
    A successor that does not know AdoptConnection (an older version answers it UNHANDLED):
    the idle connection is read again and closed politely while idle, as before, and the old
    generation exits cleanly.
    """
    spec, family, address = _listener("tcp", workdir)
    gen1 = procs.server(["--port", spec, "--control", "c.sock"], "gen1").start()
    gen1.waitServing()
    client = KeepAlive(family, address)
    try:
        assert client.request() == gen1.pid
        procs.fakeSuccessor("c.sock", "real:older")
        gen1.waitFor(r"adopts no connections: closing idle connections politely")
        assert gen1.wait(30) == 0
        assert client.closedWhileIdle()
        assert "drain deadline passed" not in gen1.text()
    finally:
        client.close()


def test_aWorkersIdleConnectionsMoveThroughItsLeader(procs: Processes, workdir: Path) -> None:
    """
    With --workers 2, idle keep-alive connections held by the worker as well as by the leader
    move to the successor (a worker hands them to its leader, which passes them on): none is
    ever closed or told to close, and each is answered by the new leader afterwards.
    """
    spec, family, address = _listener("tcp", workdir)
    gen1 = procs.server(["--port", spec, "--control", "c.sock", "--workers", "2"], "gen1")
    gen1.start().waitFor(r"1 workers? accepting")
    clients: list[KeepAlive] = []
    try:
        for _ in range(64):
            client = KeepAlive(family, address)
            clients.append(client)
            client.request()
            byWorker = [c for c in clients if c.pids[-1] != gen1.pid]
            if len(byWorker) >= 2 and len(clients) - len(byWorker) >= 2:
                break
        assert byWorker, "no connection was accepted by the worker"
        gen2 = procs.server(["--takeover", "c.sock"], "gen2").start()
        gen2.waitFor(r"took over from pid %d" % gen1.pid)
        assert gen1.wait(30) == 0
        assert [c.closedWhileIdle() for c in clients] == [False] * len(clients)
        assert [c.request() for c in clients] == [gen2.pid] * len(clients)
        assert [c.toldToClose for c in clients] == [0] * len(clients)
        assert "drain deadline passed" not in gen1.text()
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_aResponseInFlightAtTheDrainKeepsItsConnection(
    procs: Processes, workdir: Path, kind: str
) -> None:
    """
    A download whose headers went out (promising a persistent connection) before the takeover
    finishes on the old generation; the client's next request on that connection, sent the
    moment the body is complete, is answered: the connection is handed over (or answered with
    Connection: close), never closed under that request.
    """
    spec, family, address = _listener(kind, workdir)
    gen1 = procs.server(["--port", spec, "--control", "c.sock"], "gen1").start()
    gen1.waitServing()
    size = 8 * 1024 * 1024
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.connect(address)
        sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: test\r\n\r\n" % size)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"connection: close" not in head.lower()
        # The response is in flight (the rest does not fit in the socket buffers) as the
        # successor takes over and the old generation starts draining.
        gen2 = procs.server(["--takeover", "c.sock"], "gen2").start()
        gen2.waitFor(r"took over from pid %d" % gen1.pid)
        gen1.waitFor(r"draining \d+ session")
        while len(body) < size:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(body)} of {size} bytes"
            body += chunk
        assert len(body) == size
        sock.sendall(_GET)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, "the connection was closed under the next request"
            answer += chunk
        assert b" 200 " in answer.split(b"\r\n")[0]
        assert gen1.wait(30) == 0
        assert "drain deadline passed" not in gen1.text()
    finally:
        sock.close()
