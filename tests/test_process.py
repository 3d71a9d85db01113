"""
The process-wide effects of a generation (L{graceful_plugin.process}), run against fakes.
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from graceful_plugin import pidfile
from graceful_plugin.process import ProcessEffects


class _Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.fromThread: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.fromThread.append((f, args))


def _shutDown(reactor: _Reactor) -> None:
    for f, args, kwargs in reactor.triggers.get("after", {}).get("shutdown", []):
        f(*args, **kwargs)


def _effects(**kwargs: Any) -> tuple[ProcessEffects, _Reactor, dict[str, list[Any]]]:
    reactor = _Reactor()
    seen: dict[str, list[Any]] = {"signal": [], "write": [], "close": [], "exit": []}
    effects = ProcessEffects(
        reactor,
        installSignal=lambda signum, handler: seen["signal"].append((signum, handler)),
        write=lambda fd, data: seen["write"].append((fd, data)) or len(data),
        close=lambda fd: seen["close"].append(fd),
        exit=lambda code: seen["exit"].append(code),
        pid=lambda: 4242,
        **kwargs,
    )
    return effects, reactor, seen


def test_signalsCallStopAndRestartInTheReactorThread() -> None:
    """
    SIGTERM asks for a graceful stop and SIGHUP and SIGUSR2 for a restart naming the signal,
    each through the reactor's thread; SIGUSR1 (twistd's log rotation) is left alone.
    """
    effects, reactor, seen = _effects()
    stops: list[None] = []
    restarts: list[str] = []
    effects.installRestartSignals(restarts.append)
    effects.installStopSignal(lambda: stops.append(None))
    handlers = dict(seen["signal"])
    assert set(handlers) == {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2}
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):
        handlers[signum](signum, None)
    for f, args in reactor.fromThread:
        f(*args)
    assert stops == [None]
    assert restarts == ["SIGHUP", "SIGUSR2"]


def test_statusPipeAnsweredOnce() -> None:
    """
    The status pipe taken from twistd's config is written once (at most 100 bytes) and
    closed; later answers, the one at shutdown included, write nothing.
    """
    effects, reactor, seen = _effects()
    config: dict[str, Any] = {"statusPipe": 7}
    effects.takeStatusPipe(config)
    assert "statusPipe" not in config
    effects.tellParent(b"1 " + b"x" * 200)
    effects.tellParent(b"0")
    assert seen["write"] == [(7, (b"1 " + b"x" * 200)[:100])]
    assert seen["close"] == [7]


def test_failStopsTheReactorAndExitsOne() -> None:
    """
    A failure stops the reactor once it runs, and the process exits 1 after shutdown, after
    telling a waiting twistd parent why and removing our own pidfile.
    """
    effects, reactor, seen = _effects()
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "app.pid")
    try:
        effects.takeStatusPipe({"statusPipe": 9})
        effects.claimPidfile(path)
        assert pidfile.read(path) == 4242
        effects.exitAfterShutdown(lambda: path)
        effects.fail()
        assert effects.exitCode == 1
        assert seen["exit"] == []
        reactor.run()
        assert reactor.hasStopped
        _shutDown(reactor)
        assert seen["exit"] == [1]
        assert seen["write"] == [(9, b"1 stopped before the takeover was decided")]
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def test_cleanExitLeavesTheExitToTwistd() -> None:
    """
    With exit code 0 the process is not exited by us (twistd exits 0 itself), and a pidfile
    holding another pid is left in place.
    """
    effects, reactor, seen = _effects()
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "app.pid")
    try:
        pidfile.claim(path, 1)
        effects.exitAfterShutdown(lambda: path)
        _shutDown(reactor)
        assert seen["exit"] == []
        assert pidfile.read(path) == 1
    finally:
        os.unlink(path)
        os.rmdir(directory)
