"""
Limits on the control listener's connections: how many may be open at once, and how long one may
sit without sending a complete command.

The control socket is the operator's (mode 0600, peers of our uid or root), but a buggy script
or a hostile process of that uid can still open thousands of connections, or trickle one byte a
second.  L{ControlConnections} keeps that bounded without ever turning away what matters:

- at the cap, a new connection is admitted by closing the connection that has been idle longest,
  so a status query or a successor that connects now always gets in; only connections that are
  exempt (a successor that said Hello, a command still being answered, such as a restart) are
  never closed for room, and only if every open connection is exempt is the new one refused;
- a connection that has not completed a command for C{idleTimeout} seconds is closed (bytes
  that do not complete a command do not count: a half-sent command times out too), unless it is
  exempt.

Hitting the cap is logged once, and again only after the count has gone back below it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: At most this many control connections at once (graceful-ctl uses one at a time).
DEFAULT_CAP = 64

#: Seconds a control connection may go without completing a command (graceful-ctl watch asks
#: every 0.5 s by default).
DEFAULT_IDLE_TIMEOUT = 30.0


class _Entry:
    __slots__ = ("lastActive", "busy", "exempt", "timer")

    def __init__(self, now: float) -> None:
        self.lastActive = now
        self.busy = 0
        self.exempt = False
        self.timer: IDelayedCall | None = None


class ControlConnections:
    """
    The open control connections of one listener, with their cap and idle timeout.

    Each connection is a L{graceful_plugin.control.ControlProtocol} (anything with a
    C{transport} that can C{abortConnection}); it reports itself with L{opened}, L{activity},
    L{started}/L{finished} (a command being answered), L{exempt} and L{closed}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        cap: int = DEFAULT_CAP,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.cap = cap
        self.idleTimeout = idleTimeout
        self._open: dict[Any, _Entry] = {}
        self._capLogged = False

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, protocol: Any) -> bool:
        """
        A connection was made: admit it, making room if the cap is reached.

        @return: whether it was admitted (L{False}: it has been dropped).
        """
        if len(self._open) >= self.cap:
            victim = self._idlest()
            if not self._capLogged:
                self._capLogged = True
                self.log.warn(
                    "control connections reached the cap of {cap}: closing the longest idle one"
                    " for each new one (logged once)",
                    cap=self.cap,
                )
            if victim is None:
                _abort(protocol)
                return False
            self._drop(victim)
        entry = _Entry(self.clock.seconds())
        self._open[protocol] = entry
        self._arm(protocol, entry)
        return True

    def activity(self, protocol: Any) -> None:
        """
        A complete command (or answer) arrived on C{protocol}.
        """
        entry = self._open.get(protocol)
        if entry is not None:
            entry.lastActive = self.clock.seconds()
            self._arm(protocol, entry)

    def started(self, protocol: Any) -> None:
        """
        A command from C{protocol} is being answered (it may take long: a restart).
        """
        entry = self._open.get(protocol)
        if entry is not None:
            entry.busy += 1
            self._disarm(entry)

    def finished(self, protocol: Any) -> None:
        """
        The answer to a command from C{protocol} has been sent.
        """
        entry = self._open.get(protocol)
        if entry is not None:
            entry.busy = max(0, entry.busy - 1)
            entry.lastActive = self.clock.seconds()
            self._arm(protocol, entry)

    def exempt(self, protocol: Any) -> None:
        """
        C{protocol} carries a handoff (its peer said Hello): never time it out or close it for
        room.
        """
        entry = self._open.get(protocol)
        if entry is not None:
            entry.exempt = True
            self._disarm(entry)

    def closed(self, protocol: Any) -> None:
        """
        C{protocol}'s connection ended.
        """
        entry = self._open.pop(protocol, None)
        if entry is not None:
            self._disarm(entry)
        if len(self._open) < self.cap:
            self._capLogged = False

    # -- internals ---------------------------------------------------------------------------

    def _idlest(self) -> Any:
        candidates = [(e.lastActive, i, p) for i, (p, e) in enumerate(self._open.items())]
        candidates = [c for c in candidates if not self._open[c[2]].exempt]
        candidates = [c for c in candidates if not self._open[c[2]].busy]
        if not candidates:
            return None
        return min(candidates)[2]

    def _arm(self, protocol: Any, entry: _Entry) -> None:
        self._disarm(entry)
        if entry.exempt or entry.busy:
            return
        entry.timer = self.clock.callLater(self.idleTimeout, self._timedOut, protocol)

    def _disarm(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None

    def _timedOut(self, protocol: Any) -> None:
        entry = self._open.get(protocol)
        if entry is None:
            return
        entry.timer = None
        self.log.info(
            "control connection from pid {pid} closed: no complete command for {seconds:g} s",
            pid=getattr(protocol, "peer", None) and protocol.peer[0],
            seconds=self.idleTimeout,
        )
        self._drop(protocol)

    def _drop(self, protocol: Any) -> None:
        entry = self._open.pop(protocol, None)
        if entry is not None:
            self._disarm(entry)
        _abort(protocol)


def _abort(protocol: Any) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()
