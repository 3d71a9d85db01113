"""
Balance between the processes of a group: a process that holds clearly more live sessions than
the group's mean stops calling C{accept()} for a moment, so that connections opened together (a
client's connection pool, a burst) spread over the processes instead of going to whichever one
woke first, and stay spread (a keep-alive connection stays where it was accepted).

Every process of a group writes its own live session count, and whether it accepts, into one
small table shared by the group (L{Board}: a memfd the leader creates and hands to each worker at
spawn, mapped by every process), and reads the others' there: a few memory reads per session
change, no message per connection.  The rule (L{Balancer}), applied by each process to itself on
each change of its own session count:

 - a process is I{over} when its count exceeds the mean over the processes that accept by more
   than C{max(margin, mean * slack)};
 - a process that is over I{holds} (stops reading its listening sockets, which stay open and keep
   queueing, and stays in the accepting state), but only if another process of the group reads
   on: one that accepts and does not hold, or one that holds but is no longer over (it reads
   again at its next look).  So one process always reads, but for at most C{check} seconds
   (a millisecond) while a holder gives way to another, and a connect is never refused: it waits
   in the kernel's queue;
 - a holding process looks again on each change of its own count and every C{check} seconds, and
   reads again once it is no longer over, or when no other process reads on.

Decisions to hold are taken one at a time, under a lock on the table (C{flock}), each on the
others' latest counts and states: two processes never both hold on the belief that the other
reads on.  A process never waits for that lock: while another decides, it reads on (the
process holding the lock may be descheduled mid-decision, and an accept must not wait on it).
Reading again takes no lock: one more reader is always safe.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from twisted.internet.interfaces import IReactorTime

#: A slot's state: the process does not accept (starting, paused, released, gone).
IDLE = 0
#: The process accepts.
ACCEPTING = 1
#: The process accepts but holds for a moment: it is over the mean.
HOLDING = 2

#: Sessions over the mean a process may hold before it is over, at least.
MARGIN = 2
#: ... or this fraction of the mean, when that is more.
SLACK = 0.1
#: Seconds between two looks of a holding process.
CHECK = 0.001


class Board:
    """
    The group's shared table: one slot per process (its index), each a live session count, a
    state (L{IDLE}, L{ACCEPTING}, L{HOLDING}) and how many times that place of the group held,
    written only by its own process (and cleared by the leader when that process has gone).

    @ivar size: how many slots.
    """

    _CELLS = 3

    def __init__(self, fd: int, size: int) -> None:
        """
        Map the table in C{fd} (which this board owns from now on: L{close} closes it).
        """
        self.size = size
        self._fd = fd
        self._map = mmap.mmap(fd, size * self._CELLS * 8)
        self._cells = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, size: int) -> Board:
        """
        A new table of C{size} slots, every one idle (its descriptor is close-on-exec: it is
        handed to a worker explicitly).
        """
        fd = os.memfd_create("graceful-balance", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size * cls._CELLS * 8)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def publish(self, index: int, sessions: int, state: int) -> None:
        """
        Slot C{index} now holds C{sessions} and is in C{state}.
        """
        base = index * self._CELLS
        self._cells[base] = sessions
        self._cells[base + 1] = state

    def countHold(self, index: int) -> None:
        """
        Slot C{index}'s process holds once more.
        """
        self._cells[index * self._CELLS + 2] += 1

    def holds(self) -> list[int]:
        """
        How many times each slot's processes held since the group started (a replacement
        continues its place's count).
        """
        return self._cells.tolist()[2 :: self._CELLS]

    def clear(self, index: int) -> None:
        """
        Slot C{index}'s process has gone.
        """
        if self._fd >= 0:
            self.publish(index, 0, IDLE)

    def others(self, index: int) -> tuple[int, int]:
        """
        The live sessions of the processes other than slot C{index}'s that accept (holding or
        not), and how many they are.
        """
        cells = self._cells
        own = index * self._CELLS
        total = count = 0
        for i in range(0, len(cells), self._CELLS):
            if i != own and cells[i + 1] != IDLE:
                total += cells[i]
                count += 1
        return total, count

    def read(self) -> list[tuple[int, int]]:
        """
        Every slot's (sessions, state).
        """
        cells = self._cells.tolist()
        step = self._CELLS
        return list(zip(cells[0::step], cells[1::step], strict=True))

    @contextmanager
    def locked(self) -> Iterator[bool]:
        """
        Take the group's lock on the table if no other process has it: yields whether it was
        taken (never waits: a process that holds the lock may be descheduled mid-decision, and
        a connection's path must not wait on that).
        """
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._cells.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1


def over(
    sessions: int, index: int, table: list[tuple[int, int]], margin: float, slack: float
) -> bool:
    """
    Whether the process in slot C{index}, with C{sessions} live sessions, holds clearly more than
    the mean of the processes of C{table} that accept (itself counted as one of them).
    """
    counts = [s for i, (s, state) in enumerate(table) if state != IDLE and i != index]
    counts.append(sessions)
    mean = sum(counts) / len(counts)
    return sessions > mean + max(margin, mean * slack)


def othersAccept(index: int, table: list[tuple[int, int]], margin: float, slack: float) -> bool:
    """
    Whether a process other than slot C{index}'s accepts and does not hold, or holds but is no
    longer over (it reads again at its next look, within L{CHECK} seconds).
    """
    return any(
        state == ACCEPTING or (state == HOLDING and not over(sessions, i, table, margin, slack))
        for i, (sessions, state) in enumerate(table)
        if i != index
    )


class Balancer:
    """
    One process's side of the rule: it publishes its own count and state on the L{Board} and
    holds its listening ports (C{hold(True)}) while it is over the mean and another reads on.

    L{changed} runs on every accepted and every closed connection, so it does as little as it
    can: a count, a state and two stores into the table, and a look at the others only when
    the count grew past the margin (a count that falls never makes a process over).  Only the
    decision to hold takes the table's lock: reading again is always safe (it adds a reader),
    so a holder that is no longer over, or finds nobody else reading, reads again at once.

    @ivar holding: whether this process holds now.
    @ivar holds: how many times this process held, since it started.
    """

    def __init__(
        self,
        board: Any,
        index: int,
        ports: list[Any],
        clock: IReactorTime,
        margin: float = MARGIN,
        slack: float = SLACK,
        check: float = CHECK,
    ) -> None:
        """
        @param board: a L{Board} (or anything with its C{publish}, C{countHold}, C{others},
            C{read} and C{locked}).
        @param ports: the listening ports this process shares with the group: each has
            C{sessions} (a L{graceful_plugin.sessions.SessionTracker}), C{accepting} and
            C{hold(bool)}.
        """
        self.board = board
        self.index = index
        self.ports = ports
        self.clock = clock
        self.margin = margin
        self.slack = slack
        self.check = check
        self.holding = False
        self.holds = 0
        self._trackers = tuple(port.sessions for port in ports)
        self._previous = 0
        self._call: Any = None
        self._stopped = False
        for tracker in self._trackers:
            tracker.observe(self.changed)
        self.changed()

    def _sessions(self) -> int:
        trackers = self._trackers
        if len(trackers) == 1:
            return trackers[0].count
        return sum(tracker.count for tracker in trackers)

    def _accepting(self) -> bool:
        for port in self.ports:
            if port.accepting:
                return True
        return False

    def _publish(self, sessions: int) -> None:
        if self._stopped:
            return
        state = IDLE if not self._accepting() else HOLDING if self.holding else ACCEPTING
        self.board.publish(self.index, sessions, state)

    def _over(self, sessions: int) -> bool:
        total, count = self.board.others(self.index)
        mean = (total + sessions) / (count + 1)
        return sessions > mean + max(self.margin, mean * self.slack)

    def changed(self) -> None:
        """
        Our session count changed, or whether we accept did: publish it and apply the rule.
        """
        if self._stopped:
            return
        trackers = self._trackers
        if len(trackers) == 1:
            sessions = trackers[0].count
        else:
            sessions = sum(tracker.count for tracker in trackers)
        grew = sessions > self._previous
        self._previous = sessions
        for port in self.ports:
            if port.accepting:
                break
        else:
            self.board.publish(self.index, sessions, IDLE)
            if self.holding:
                self._setHolding(False, sessions)
            return
        if self.holding:
            self.board.publish(self.index, sessions, HOLDING)
            if not self._over(sessions):
                self._setHolding(False, sessions)
            return
        self.board.publish(self.index, sessions, ACCEPTING)
        if grew and sessions > self.margin and self._over(sessions):
            self._decide()

    def _decide(self) -> None:
        """
        We look over the mean: hold if we still are under the table's lock and another
        process reads on (the others decide one at a time on the latest table; while one
        decides, the others do not wait: they read on).
        """
        with self.board.locked() as taken:
            if not taken:
                # Another process is deciding: we read on (always safe), and look again at
                # our next connection.
                return
            sessions = self._sessions()
            table = self.board.read()
            if (
                self._accepting()
                and over(sessions, self.index, table, self.margin, self.slack)
                and othersAccept(self.index, table, self.margin, self.slack)
            ):
                self._setHolding(True, sessions)

    def _setHolding(self, hold: bool, sessions: int) -> None:
        self.holding = hold
        if hold:
            self.holds += 1
            self.board.countHold(self.index)
        for port in self.ports:
            port.hold(hold)
        self._publish(sessions)
        if hold and self._call is None:
            self._call = self.clock.callLater(self.check, self._look)
        elif not hold and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _look(self) -> None:
        """
        A holder's look, every C{check} seconds: read again once no longer over, or when no
        other process reads on (no lock: reading again is always safe).
        """
        self._call = None
        if self._stopped or not self.holding:
            return
        sessions = self._sessions()
        table = self.board.read()
        if not (
            self._accepting()
            and over(sessions, self.index, table, self.margin, self.slack)
            and othersAccept(self.index, table, self.margin, self.slack)
        ):
            self._setHolding(False, sessions)
            return
        self._call = self.clock.callLater(self.check, self._look)

    def stop(self) -> None:
        """
        Leave the group's balance: read again if holding, and show this process as idle.
        """
        if self._stopped:
            return
        if self.holding:
            self._setHolding(False, self._sessions())
        self._stopped = True
        self.board.publish(self.index, 0, IDLE)


def balancedPorts(ports: list[Any]) -> list[Any]:
    """
    The ports whose connections the balance counts and holds: stream listeners that serve the
    application (not UDP, whose datagrams have no sessions, nor the metrics listener).
    """
    return [
        port
        for port in ports
        if hasattr(port, "hold")
        and getattr(port, "kind", None) != "udp"
        and not getattr(port, "role", "")
    ]


def balanceWanted(environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether a group balances its connections: yes, unless C{GRACEFUL_BALANCE=off} is in the
    environment (to measure what the balance does; see ``benchmarks/workers.py``).
    """
    return environ.get("GRACEFUL_BALANCE", "").strip().lower() != "off"
