"""
The cap and the idle timeout of control connections (L{graceful_plugin.controlconn}), with a
L{Clock} and in-memory transports; and one real server holding 2,000 idle connections.
"""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import amp

from graceful_plugin.control import PROTOCOL_VERSION, ClientHandler, ControlProtocol
from graceful_plugin.controlconn import ControlConnections
from tests.procs import Processes, ctl, freePort


class _Handler(ClientHandler):
    """
    Answers Hello, Status at once and Restart never (until told), like a server would.
    """

    def __init__(self) -> None:
        self.restarting: Deferred[dict[str, Any]] = Deferred()

    def hello(self, protocol: Any, version: int, pid: int) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "pid": 1, "generation": 1}

    def status(self, protocol: Any, start: int) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "pid": 1,
            "generation": 1,
            "state": "serving",
            "uptime": 0.0,
            "listeners": [],
            "draining": [],
            "next": -1,
        }

    def restart(
        self, protocol: Any, progress: bool, fresh: bool = False
    ) -> Deferred[dict[str, Any]]:
        return self.restarting


def _box(command: bytes, **args: bytes) -> bytes:
    box = amp.AmpBox(_command=command, _ask=b"1", **args)
    return box.serialize()


class _Conn:
    """
    One server-side control connection on a StringTransport.
    """

    def __init__(self, limits: ControlConnections, handler: Any) -> None:
        self.protocol = ControlProtocol(handler, limits=limits)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    @property
    def dropped(self) -> bool:
        return bool(self.transport.disconnecting)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


def _make(cap: int = 3, idle: float = 10.0) -> tuple[ControlConnections, Clock, _Handler]:
    clock = Clock()
    return ControlConnections(clock, cap=cap, idleTimeout=idle), clock, _Handler()


def test_idleConnectionTimesOut() -> None:
    """
    A connection that sends nothing is closed after the idle timeout; a complete command resets
    the timer.
    """
    limits, clock, handler = _make()
    conn = _Conn(limits, handler)
    clock.advance(9)
    conn.send(_box(b"Status"))
    assert b"serving" in conn.transport.value()
    clock.advance(9)
    assert not conn.dropped
    clock.advance(1)
    assert conn.dropped
    assert len(limits) == 0


def test_halfSentCommandTimesOut() -> None:
    """
    Bytes that never complete a command (one byte a second) do not keep a connection open.
    """
    limits, clock, handler = _make()
    conn = _Conn(limits, handler)
    data = _box(b"Status")
    for i in range(len(data) - 1):
        if conn.dropped:
            break
        conn.send(data[i : i + 1])
        clock.advance(1)
    assert conn.dropped
    assert clock.seconds() <= 10


def test_capClosesTheIdlestForANewConnection() -> None:
    """
    At the cap, a new connection (a status query) gets in by closing the longest idle one,
    and the cap is logged once while it holds.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits, clock, handler = _make(cap=3)
        conns = []
        for _ in range(3):
            conns.append(_Conn(limits, handler))
            clock.advance(1)
        conns[0].send(_box(b"Status"))  # now the most recently active
        newcomers = [_Conn(limits, handler), _Conn(limits, handler)]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [c.dropped for c in conns] == [False, True, True]
    assert not any(c.dropped for c in newcomers)
    newcomers[0].send(_box(b"Status"))
    assert b"serving" in newcomers[0].transport.value()
    capped = [e for e in events if "cap of" in e.get("log_format", "")]
    assert len(capped) == 1 and capped[0]["log_level"] == LogLevel.warn


def test_successorAndBusyConnectionsAreNeverClosed() -> None:
    """
    A connection that said Hello (a successor) or awaits a long answer (a restart) is neither
    timed out nor closed for room; when all are so, a new connection is refused instead.
    """
    limits, clock, handler = _make(cap=2)
    successor = _Conn(limits, handler)
    successor.send(_box(b"Hello", version=str(PROTOCOL_VERSION).encode(), pid=b"42"))
    restarting = _Conn(limits, handler)
    restarting.send(_box(b"Restart"))
    clock.advance(100)
    assert not successor.dropped and not restarting.dropped
    refused = _Conn(limits, handler)
    assert refused.dropped
    assert not successor.dropped and not restarting.dropped
    handler.restarting.callback({"pid": 2, "generation": 2, "ms": 1.0, "phases": []})
    # Answered: idle again from now on, and closable for room.
    clock.advance(9)
    assert not restarting.dropped
    clock.advance(1)
    assert restarting.dropped


@pytest.mark.slow
def test_twoThousandIdleConnectionsDoNotTakeTwoThousandFds(procs: Processes, workdir: Path) -> None:
    """
    A real server with 2,000 idle control connections opened against it holds at most its cap
    of them (its descriptor count stays near where it started), still answers status, and logs
    the cap once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"the hard limit on open files ({hard}) is below 2,200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    port = freePort()
    server = procs.server(
        ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"], "gen1"
    ).start()
    server.waitServing()
    before = server.fdCount()
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(workdir / "c.sock"))
            idle.append(s)
        result = ctl(workdir, "--control", "c.sock", "status", "--json")
        assert result.returncode == 0, result.stderr
        # Connections still queued are accepted (and the oldest closed) as the server goes on.
        server.waitFor(r"control connections reached the cap of 64")
        count = server.fdCount()
        assert count <= before + 64 + 8, (before, count)
        assert server.text().count("reached the cap of") == 1
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.path.exists(workdir / "c.sock")
