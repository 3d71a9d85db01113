"""
HTTP keep-alive across takeovers: a pool of persistent connections sees no error, busy
connections are told ``Connection: close``, and idle ones move to the successor (or, where they
cannot, are closed between requests).
"""

from __future__ import annotations

import random
import re
import select
import socket
import threading
from collections import Counter
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from graceful_plugin.web import DrainableHTTPChannel, demoSite
from tests.procs import Processes, freePort


class PooledConnection:
    """
    One persistent HTTP/1.1 connection, as a pooling client uses it: reused until the server
    says ``Connection: close`` or closes it while idle.

    The only failure not counted as an error is the one a pooling client may rightly retry: the
    server closed the connection cleanly while it was idle, seen before a request was sent on it.
    Everything else (refused, reset, closed after the request was sent, a short body) is an
    error.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.idleClosed = 0
        self.toldToClose = 0
        self.reused = 0
        #: Answers on a reused connection from another process than the answer before.
        self.moved = 0
        self.pids: list[int] = []
        self._lastPid: int | None = None

    def _usable(self) -> bool:
        if self.sock is None:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return True
        # Readable while idle: the server closed it (anything else is a protocol error).
        data = self.sock.recv(1, socket.MSG_PEEK)
        if data:
            raise AssertionError(f"unsolicited data on an idle connection: {data!r}")
        self.idleClosed += 1
        self.close()
        return False

    def request(self, path: str) -> bytes:
        if self._usable():
            self.reused += 1
        else:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
            self._lastPid = None
        assert self.sock is not None
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        reader = self.sock.makefile("rb")
        try:
            status = reader.readline()
            if not status:
                raise ConnectionError("closed after the request was sent")
            if not status.startswith(b"HTTP/1.1 200"):
                raise AssertionError(f"bad status line {status!r}")
            length, close = None, False
            while True:
                line = reader.readline()
                if not line:
                    raise ConnectionError("closed in the middle of the headers")
                if line == b"\r\n":
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                if name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                    close = True
            assert length is not None, "no Content-Length"
            body = reader.read(length)
            if len(body) != length:
                raise ConnectionError(f"body of {len(body)} bytes, expected {length}")
        finally:
            reader.close()
        found = re.search(rb"pid (\d+)", body)
        if found:
            pid = int(found.group(1))
            if self._lastPid is not None and pid != self._lastPid:
                self.moved += 1
            self._lastPid = pid
            self.pids.append(pid)
        if close:
            self.toldToClose += 1
            self.close()
        return body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Pool:
    """
    C{busy} threads each reusing one connection with a short random pause between requests, and
    C{idle} connections that make one request, sit idle until L{wake}, then make one more.
    """

    def __init__(self, port: int, busy: int, idle: int) -> None:
        self.busy = [PooledConnection(port) for _ in range(busy)]
        self.idle = [PooledConnection(port) for _ in range(idle)]
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.busy
        ]

    def _one(self, connection: PooledConnection, path: str) -> None:
        try:
            connection.request(path)
            with self._lock:
                self.ok += 1
        except Exception as e:
            connection.close()
            with self._lock:
                self.errors[type(e).__name__] += 1
                if len(self.examples) < 10:
                    self.examples.append(repr(e))

    def _run(self, connection: PooledConnection) -> None:
        rng = random.Random()
        for _ in range(1_000_000):
            if self._stop.wait(rng.uniform(0, 0.02)):
                break
            self._one(connection, "/")
        connection.close()

    def start(self) -> Pool:
        for connection in self.idle:
            self._one(connection, "/")
        for t in self._threads:
            t.start()
        return self

    def wake(self) -> None:
        """
        Use every idle connection once more (the pool picks a connection for a new request).
        """
        for connection in self.idle:
            self._one(connection, "/")
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads)


def test_persistentConnectionPoolSeesNoErrorAcrossTakeovers(
    procs: Processes, workdir: Path
) -> None:
    """
    Across three takeovers, a pool of persistent connections (16 busy ones reused back to back,
    8 idle ones) fails no request: a connection answering a request when its generation drains
    is told Connection: close, one idle then moves to the successor (none is closed while idle:
    the idle ones' next answers come from the successor on the same connection), and every
    predecessor drains without waiting for its deadline.
    """
    port = freePort()
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]
    current = procs.server([*args, "--drain-timeout", "300"], "gen1").start()
    current.waitServing()
    pool = Pool(port, busy=16, idle=8).start()
    try:
        for n in (2, 3, 4):
            successor = procs.server(["--takeover", "c.sock", "--drain-timeout", "300"], f"gen{n}")
            successor.start().waitFor(r"took over from pid %d" % current.pid)
            assert current.wait(120) == 0
            assert "drain deadline passed" not in current.text()
            if n == 2:
                pool.wake()
                idleClosed = sum(c.idleClosed for c in pool.idle)
                movedToSuccessor = [c.moved == 1 and c.pids[-1] == successor.pid for c in pool.idle]
                for connection in pool.idle:
                    connection.request("/")
            current = successor
    finally:
        pool.stop()
    assert pool.errors == {}, pool.examples
    assert pool.ok > 200
    assert idleClosed == 0
    assert all(movedToSuccessor), movedToSuccessor
    # At each takeover a busy connection was either told to close or moved.
    assert sum(c.toldToClose + c.moved for c in pool.busy) >= len(pool.busy)
    assert sum(c.moved for c in pool.busy) > 0
    assert sum(c.reused for c in pool.busy) > pool.ok / 2


def _channel() -> tuple[DrainableHTTPChannel, StringTransport, Clock]:
    switch = demoSite(lambda: 1).buildProtocol(None)
    clock = Clock()
    switch.callLater = clock.callLater
    transport = StringTransport()
    switch.makeConnection(transport)
    channel = switch._channel
    assert isinstance(channel, DrainableHTTPChannel)
    return channel, transport, clock


_GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def test_reuseWithinGraceIsAnsweredWithClose() -> None:
    """
    A persistent connection idle when draining starts and reused within the idle grace is not
    closed under the new request: the request is answered with Connection: close.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    transport.clear()
    channel.drain()
    clock.advance(channel.idleGrace / 2)
    channel.dataReceived(_GET)
    clock.advance(channel.idleGrace)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 200")
    assert b"\r\nConnection: close\r\n" in response
    assert transport.disconnecting


def test_freshConnectionIsNeverClosedAsIdle() -> None:
    """
    A connection that has not sent its first request when draining starts is not closed as idle
    however long it waits; its request, when it comes, is answered with Connection: close.
    """
    channel, transport, clock = _channel()
    channel.drain()
    clock.advance(channel.idleGrace * 10)
    assert not transport.disconnecting
    channel.dataReceived(_GET)
    assert b"\r\nConnection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_quietConnectionIsClosedAfterGrace() -> None:
    """
    A persistent connection that stays quiet after draining starts is open until the idle grace
    has passed, and closed then.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    channel.drain()
    clock.advance(channel.idleGrace * 0.99)
    assert not transport.disconnecting
    clock.advance(channel.idleGrace * 0.02)
    assert transport.disconnecting


def test_clientAtItsOwnPaceIsAnsweredNotClosed() -> None:
    """
    A connection whose client has paused 1.5 s between requests is not closed one idle grace
    after draining starts: it stays open for twice that pause, so the client's next request,
    1.5 s after its last, is answered with Connection: close (the EOF wrk counted as an error).
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    clock.advance(1.5)
    channel.dataReceived(_GET)
    clock.advance(0.1)
    transport.clear()
    channel.drain()
    clock.advance(channel.idleGrace + 0.3)
    assert not transport.disconnecting
    channel.dataReceived(_GET)
    assert b"\r\nConnection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_pacedConnectionIsClosedAfterTwiceItsPause() -> None:
    """
    A connection whose client paused 1.5 s between requests and does not come back is closed
    once it has been quiet for twice that pause.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    clock.advance(1.5)
    channel.dataReceived(_GET)
    channel.drain()
    clock.advance(2.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_unreadRequestIsNotClosedUnder() -> None:
    """
    An idle connection whose next request has reached the kernel but not been read yet when its
    idle check runs is not closed.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    ours, theirs = socket.socketpair()
    try:
        transport.socket = ours  # type: ignore[attr-defined]
        channel.drain()
        theirs.sendall(_GET)
        clock.advance(channel.idleGrace * 1.1)
        assert not transport.disconnecting
        channel.dataReceived(ours.recv(1024))
        assert b"\r\nConnection: close\r\n" in transport.value()
    finally:
        ours.close()
        theirs.close()


def test_emptyLineAfterDrainDoesNotKeepIdleConnectionOpen() -> None:
    """
    An idle connection whose client sends only an empty line (which HTTP/1.1 ignores between
    requests) after draining starts is still closed once it has stayed quiet for the grace.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(_GET)
    channel.drain()
    clock.advance(channel.idleGrace / 2)
    channel.dataReceived(b"\r\n")
    clock.advance(channel.idleGrace)
    assert transport.disconnecting


def test_connectionClosedAfterItsResponseIsNotWatchedWhenDraining() -> None:
    """
    A connection whose only request asked for Connection: close is closed after its response
    and leaves no idle check behind when its generation drains.
    """
    channel, transport, clock = _channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting
    channel.drain()
    assert clock.getDelayedCalls() == []
