"""
The private link between a leader and each of its workers: AMP over a socketpair, one command
class per operation.

The worker says when it is ready and how many sessions it has; the leader tells it to pause,
resume, release, drain or stop, and each of those is answered once done.  A worker gets its
listening sockets at spawn (C{childFDs}); the only descriptors the link carries are the idle
connections a draining worker hands its leader, for the successor
(L{graceful_plugin.control.AdoptConnection}, L{graceful_plugin.handover}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols import amp

#: Connections a process of a group accepts per wake-up, at most (see L{shareAccepts}).  One
#: per wake-up spread bursts but cost a reactor iteration per connection: with 2 workers on 2
#: cores, 151-213 us of CPU per fresh-connection request against 137-154 us with 16 (measured
#: with perf, 3 interleaved rounds); the balance now does the spreading.
ACCEPT_BATCH = 16

#: Bumped whenever a command changes incompatibly; a worker is always started by a leader of the
#: same installation, so this only guards against a mix-up.
WORKER_PROTOCOL_VERSION = 1


class WorkerReady(amp.Command):
    """
    Worker to leader: every listener is adopted (not accepting) and the application is ready.
    """

    arguments = [(b"version", amp.Integer()), (b"pid", amp.Integer())]
    response = []


class WorkerSessions(amp.Command):
    """
    Worker to leader: its live session count changed (sent at most every few tenths of a
    second).
    """

    arguments = [(b"sessions", amp.Integer())]
    response = []
    requiresAnswer = False


class Pause(amp.Command):
    """
    Leader to worker: stop accepting (the sockets stay open); answered once paused.
    """

    arguments = []
    response = []


class Resume(amp.Command):
    """
    Leader to worker: accept; answered once accepting.
    """

    arguments = []
    response = []


class Release(amp.Command):
    """
    Leader to worker: stop accepting and close this worker's copy of every listening socket
    (never shutdown, never unlink); answered once released.
    """

    arguments = []
    response = []


class Drain(amp.Command):
    """
    Leader to worker: ask every session to finish and exit when the last one has (or at the
    drain deadline); answered at once, the exit comes later.
    """

    arguments = []
    response = []


class StopWorker(amp.Command):
    """
    Leader to worker: release and drain, then exit (a graceful stop of the whole generation).
    """

    commandName = b"Stop"
    arguments = []
    response = []


#: The group commands of L{graceful_plugin.workers.COMMANDS}, by name.
COMMANDS: dict[str, type[amp.Command]] = {
    "pause": Pause,
    "resume": Resume,
    "release": Release,
    "drain": Drain,
    "stop": StopWorker,
}


class OneProtocol(Factory):
    """
    The factory of one connection whose protocol exists already (each end of a worker link is
    adopted with C{IReactorSocket.adoptStreamConnection}, which asks a factory).
    """

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def shareAccepts(ports: list[Any]) -> None:
    """
    Accept at most L{ACCEPT_BATCH} connections per wake-up on C{ports}: every process of a
    group wakes for a new connection, and the first one would otherwise take a whole burst
    before the group's balance (L{graceful_plugin.balance}) could hold it.
    """
    for port in ports:
        if hasattr(port, "acceptBatch"):
            port.acceptBatch = ACCEPT_BATCH
