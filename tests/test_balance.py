"""
The group's balance (L{graceful_plugin.balance}), with fake ports on a real shared table and a
L{Clock}: a process over the mean holds while another accepts, never the last one accepting,
and reads again once it is no longer over; the ports' hold keeps out of pause and resume.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from graceful_plugin.balance import (
    ACCEPTING,
    CHECK,
    HOLDING,
    IDLE,
    Balancer,
    Board,
    balancedPorts,
    balanceWanted,
    over,
)
from graceful_plugin.listeners import adoptListener
from graceful_plugin.sessions import SessionTracker


class FakePort:
    """
    A shared listening port: its sessions, whether it accepts, and whether it is held.
    """

    kind = "tcp"
    role = ""

    def __init__(self, accepting: bool = True) -> None:
        self.sessions = SessionTracker()
        self.accepting = accepting
        self.held = False
        self._live: list[object] = []

    def hold(self, held: bool) -> None:
        self.held = held

    def reading(self) -> bool:
        return self.accepting and not self.held

    def open(self, count: int = 1) -> None:
        for _ in range(count):
            connection = object()
            self._live.append(connection)
            self.sessions.opened(connection)

    def close(self, count: int = 1) -> None:
        for _ in range(count):
            self.sessions.closed(self._live.pop())


@pytest.fixture
def board() -> Any:
    table = Board.create(3)
    yield table
    table.close()


def group(board: Board, clock: Clock, count: int = 2) -> list[tuple[Balancer, FakePort]]:
    """
    C{count} processes on one table, each with one accepting port.
    """
    members = []
    for index in range(count):
        port = FakePort()
        members.append((Balancer(board, index, [port], clock), port))
    return members


def test_overMeansClearlyMoreThanTheMeanOfThoseAccepting() -> None:
    """
    A process is over when it holds more than the mean plus the margin (or the slack, once the
    mean is large); processes that do not accept are left out of the mean.
    """
    table = [(0, ACCEPTING), (0, ACCEPTING)]
    assert not over(4, 0, table, margin=2, slack=0.1)  # mean 2: 4 is within 2 of it
    assert over(5, 0, table, margin=2, slack=0.1)  # mean 2.5: 5 is more than 2 over
    many = [(0, ACCEPTING), (100, HOLDING)]
    assert over(100, 1, many, margin=2, slack=0.1)  # mean 50: 100 is more than 5 over
    assert not over(54, 1, [(46, ACCEPTING)], margin=2, slack=0.1)  # mean 50, within 5
    assert over(61, 1, [(40, ACCEPTING), (0, IDLE)], margin=2, slack=0.1)  # mean 50.5
    assert not over(55, 1, [(45, ACCEPTING), (0, IDLE)], margin=2, slack=0.1)  # 55 < 55.5
    assert not over(50, 0, [(0, IDLE), (0, IDLE)], margin=2, slack=0.1)  # alone: never over


def test_aProcessOverTheMeanHoldsWhileAnotherAccepts(board: Board) -> None:
    """
    Connections piling onto one process make it hold (stop reading, still accepting) once it is
    clearly over the mean, while the other process reads on; the table shows both.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    portA.open(4)
    assert not a.holding and portA.reading()
    portA.open()
    assert a.holding and not portA.reading() and portA.accepting
    assert portB.reading() and not b.holding
    assert board.read()[:2] == [(5, HOLDING), (0, ACCEPTING)]


def test_aHoldingProcessReadsAgainOnceTheOthersCaughtUp(board: Board) -> None:
    """
    A holding process looks again every CHECK seconds and reads again as soon as the others'
    sessions brought the mean near its own; the look stops with the hold.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    portA.open(6)
    assert a.holding
    portB.open(1)
    clock.advance(CHECK)
    assert a.holding  # 6 against a mean of 3.5: still more than 2 over
    portB.open(1)
    assert a.holding  # (B's sessions are not A's: A sees them at its next look)
    clock.advance(CHECK)
    assert not a.holding and portA.reading()  # 6 against a mean of 4
    assert clock.getDelayedCalls() == []


def test_closingItsOwnSessionsEndsTheHold(board: Board) -> None:
    """
    A holding process whose own sessions end reads again at once, without waiting for a look.
    """
    clock = Clock()
    (a, portA), _ = group(board, clock)
    portA.open(5)
    assert a.holding
    portA.close(2)
    assert not a.holding and portA.reading()


def test_theLastProcessAcceptingNeverHolds(board: Board) -> None:
    """
    However many sessions a process holds, it keeps reading when no other process of the group
    accepts (paused, starting, gone), or when every other one holds.
    """
    clock = Clock()
    (a, portA), (b, portB), (c, portC) = group(board, clock, count=3)
    portB.accepting = False
    b.changed()
    portC.accepting = False
    c.changed()
    portA.open(50)
    assert not a.holding and portA.reading()
    # C accepts again and takes one: A, far over, holds at its next connection; C never does
    # while A holds, however many it takes.
    portC.accepting = True
    portC.open(1)
    portA.open(1)
    assert a.holding
    portC.open(40)
    assert not c.holding and portC.reading()


def test_aHolderReadsAgainWhenTheOthersStopAccepting(board: Board) -> None:
    """
    When the process it left the connections to stops accepting (the group pauses it, it is
    gone), a holding process reads again at its next look.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    portA.open(5)
    assert a.holding
    board.clear(1)  # the leader saw worker 1 end
    clock.advance(CHECK)
    assert not a.holding and portA.reading()


def test_pausedProcessShowsIdleAndDoesNotHold(board: Board) -> None:
    """
    A process that stops accepting shows as idle on the table (out of the mean) and lets go of
    a hold; stopping the balance does the same, and a stopped balance changes nothing more.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    portA.open(5)
    assert a.holding
    portA.accepting = False
    a.changed()
    assert not a.holding and not portA.held
    assert board.read()[0] == (5, IDLE)
    portA.accepting = True
    b.stop()
    assert board.read()[1] == (0, IDLE)
    portB.open(20)
    assert board.read()[1] == (0, IDLE) and not portB.held


def test_theBoardIsSharedWithAnotherProcess() -> None:
    """
    The table lives in a memfd: a child process that maps the inherited descriptor reads what
    this one wrote, and what it writes is read here.
    """
    board = Board.create(2)
    try:
        board.publish(0, 7, ACCEPTING)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            child = Board(os.dup(board.fileno()), 2)
            ok = child.read()[0] == (7, ACCEPTING)
            child.publish(1, 3, HOLDING)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert board.read() == [(7, ACCEPTING), (3, HOLDING)]
    finally:
        board.close()


def test_balancedPortsAreTheApplicationsStreamListeners() -> None:
    """
    UDP listeners (no sessions) and the metrics listener are left out of the balance.
    """
    web, udp, metrics = FakePort(), FakePort(), FakePort()
    udp.kind = "udp"
    metrics.role = "metrics"
    assert balancedPorts([web, udp, metrics, object()]) == [web]


def test_portHoldStaysOutOfPauseAndResume() -> None:
    """
    A held port stops reading but stays accepting; resuming keeps the hold; letting go of the
    hold while paused does not start reading, and a release is never undone by it.
    """
    reactor = MemoryReactorClock()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = adoptListener(reactor, sock.fileno(), "tcp", Factory.forProtocol(Protocol))
    try:
        port.resumeAccepting()
        port.hold(True)
        assert port.accepting and port not in reactor.getReaders()
        port.pauseAccepting()
        port.resumeAccepting()
        assert port.accepting and port not in reactor.getReaders()
        port.hold(False)
        assert port in reactor.getReaders()
        port.hold(True)
        port.pauseAccepting()
        port.hold(False)
        assert not port.accepting and port not in reactor.getReaders()
        port.resumeAccepting()
        port.release()
        port.hold(True)
        port.hold(False)
        assert port not in reactor.getReaders()
    finally:
        reactor.advance(0)
        sock.close()


def test_aProcessOverTheMeanMayHoldWhenTheHolderIsNoLongerOver(board: Board) -> None:
    """
    When the process holding is no longer over (the others caught up) and another one now is,
    that one holds too: the first reads again at its next look, so the second does not run
    away with the rest of a burst.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    portA.open(5)
    assert a.holding
    portB.open(12)  # B takes the burst while A holds: 12 against a mean of 8.5
    assert b.holding and a.holding
    clock.advance(CHECK)
    assert not a.holding and portA.reading()  # 5 against 8.5: A reads again
    assert b.holding  # while A reads, B holds
    portA.open(6)  # 11 and 12
    clock.advance(CHECK)
    assert not b.holding and portB.reading()


class LockCountingBoard(Board):
    """
    A real table that counts how often its lock is taken.
    """

    taken = 0

    @contextmanager
    def locked(self) -> Iterator[bool]:
        self.taken += 1
        with super().locked() as taken:
            yield taken


def test_onlyTheDecisionToHoldTakesTheLock() -> None:
    """
    Holding is decided under the table's lock; reading again (own sessions ended, or at a look
    once no longer over) takes no lock, since another reader is always safe; connections that
    keep a process under the margin never take it either.
    """
    table = LockCountingBoard.create(2)
    try:
        clock = Clock()
        (a, portA), (b, portB) = group(table, clock)
        portA.open(2)
        portA.close(2)
        assert table.taken == 0
        portA.open(5)
        assert a.holding and table.taken == 1
        portA.close(1)  # 4 against a mean of 2: within the margin, reads again
        assert not a.holding and table.taken == 1
        portA.open(1)
        assert a.holding and table.taken == 2
        portB.open(3)  # 5 against a mean of 4: A reads again at its look
        clock.advance(CHECK)
        assert not a.holding and portA.reading() and table.taken == 2
    finally:
        table.close()


def test_aProcessNeverWaitsForTheLock(board: Board) -> None:
    """
    While another process holds the table's lock (deciding, or descheduled mid-decision), a
    process over the mean does not wait for it: it reads on, and holds at a later connection
    once the lock is free.
    """
    other = Board(os.open(f"/proc/self/fd/{board.fileno()}", os.O_RDWR), board.size)
    try:
        clock = Clock()
        (a, portA), _ = group(board, clock)
        with other.locked() as taken:
            assert taken
            portA.open(6)
            assert not a.holding and portA.reading()
        portA.open(1)
        assert a.holding and not portA.reading()
    finally:
        other.close()


def test_theTableCountsEachProcessHolds(board: Board) -> None:
    """
    Each time a process holds, its slot's hold count grows by one (and its balancer's); the
    count outlives the hold, and a cleared slot (its process gone) keeps its place's count.
    """
    clock = Clock()
    (a, portA), (b, portB) = group(board, clock)
    assert board.holds() == [0, 0, 0]
    portA.open(5)
    portA.close(2)
    portA.open(2)
    assert a.holding and a.holds == 2 and b.holds == 0
    assert board.holds() == [2, 0, 0]
    assert board.read()[0] == (5, HOLDING)
    board.clear(0)
    assert board.holds() == [2, 0, 0] and board.read()[0] == (0, IDLE)


def test_balanceCanBeTurnedOffToMeasureIt() -> None:
    """
    C{GRACEFUL_BALANCE=off} turns the balance off (to measure it); anything else leaves it on.
    """
    assert balanceWanted({})
    assert balanceWanted({"GRACEFUL_BALANCE": "on"})
    assert not balanceWanted({"GRACEFUL_BALANCE": "off"})
    assert not balanceWanted({"GRACEFUL_BALANCE": " OFF "})
