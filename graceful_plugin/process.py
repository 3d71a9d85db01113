"""
What a generation does to its whole process, in one place: the signal handlers, the status pipe
a daemonizing twistd's parent waits on, the pidfile, the exit code, and the scheduling priority
and heap of a successor.

The service (L{graceful_plugin.server.GracefulServer}) and its generation
(L{graceful_plugin.generation.Generation}) call it; no other module of a generation installs a
signal handler, writes the status pipe or exits the process.  The functions it calls are
arguments, so that tests run it without touching their own process.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from graceful_plugin import heap, pidfile, priority


class ProcessEffects:
    """
    The process-wide effects of the generation that runs in this process.

    @ivar exitCode: what the process exits with once the reactor has stopped (0: as twistd
        would).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        installSignal: Callable[[int, Any], Any] = signal.signal,
        write: Callable[[int, bytes], int] = os.write,
        close: Callable[[int], None] = os.close,
        exit: Callable[[int], Any] = os._exit,
        pid: Callable[[], int] = os.getpid,
        settleHeap: Callable[[], None] = heap.settle,
        restorePriority: Callable[[], None] = priority.restorePriority,
    ) -> None:
        self.reactor = reactor
        self.exitCode = 0
        self._installSignal = installSignal
        self._write = write
        self._close = close
        self._exit = exit
        self._pid = pid
        self._statusPipe: int | None = None
        self._settleHeap = settleHeap
        self._restorePriority = restorePriority

    # -- signals ----------------------------------------------------------------------------

    def installRestartSignals(self, restart: Callable[[str], None]) -> None:
        """
        SIGHUP and SIGUSR2 (for nginx and gunicorn habits) call C{restart} with the signal's
        name in the reactor's thread, as `graceful-ctl restart` does.  SIGUSR1 stays twistd's
        log rotation.

        Call it as soon as the service starts, before the reactor runs: a server that says it
        serves must not die of a SIGHUP's default action.  The reactor handles neither signal,
        and a call from a handler before it runs waits for it.
        """

        def onRestart(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(restart, signal.Signals(signum).name)

        self._installSignal(signal.SIGHUP, onRestart)
        self._installSignal(signal.SIGUSR2, onRestart)

    def installStopSignal(self, stop: Callable[[], None]) -> None:
        """
        SIGTERM calls C{stop} (a graceful stop that exits 0) in the reactor's thread.

        Call it once the reactor runs: it installs its own SIGTERM handler when it starts.
        """

        def onTerm(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(stop)

        self._installSignal(signal.SIGTERM, onTerm)

    # -- twistd's status pipe ---------------------------------------------------------------

    def takeStatusPipe(self, twistdConfig: dict[str, Any] | None) -> None:
        """
        Daemonized, twistd's parent process waits on a pipe: keep it from twistd, to be answered
        when the takeover is decided (not when start-up ends), so that its exit status tells.
        """
        config = twistdConfig
        self._statusPipe = config.pop("statusPipe", None) if config is not None else None

    def tellParent(self, message: bytes) -> None:
        """
        Answer a daemonizing twistd's parent process: C{b"0"} for success, else C{b"1 "} and a
        reason (it prints up to 100 bytes).  Only the first answer is written.
        """
        pipe, self._statusPipe = self._statusPipe, None
        if pipe is None:
            return
        try:
            self._write(pipe, message[:100])
            self._close(pipe)
        except OSError:
            pass

    # -- the pidfile ------------------------------------------------------------------------

    def claimPidfile(self, path: str) -> None:
        """
        Put our pid in the pidfile at C{path} (L{graceful_plugin.pidfile.claim}).
        """
        pidfile.claim(path, self._pid())

    # -- exiting ----------------------------------------------------------------------------

    def stop(self) -> None:
        """
        Stop the reactor: twistd stops the service (a generation drains there first), and the
        process exits with L{exitCode}.
        """
        self.reactor.stop()

    def fail(self) -> None:
        """
        Stop the reactor (now, or once it runs) and exit with status 1.
        """
        self.exitCode = 1
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def exitAfterShutdown(self, pidfilePath: Callable[[], str]) -> None:
        """
        Once the reactor has shut down: answer the status pipe if nobody did, remove the
        pidfile at C{pidfilePath()} if it holds our pid, and exit with L{exitCode} if it is not
        0 (twistd would exit 0).
        """

        def atShutdown() -> None:
            self.tellParent(b"1 stopped before the takeover was decided")
            path = pidfilePath()
            if path:
                pidfile.release(path, self._pid())
            if self.exitCode:
                sys.stdout.flush()
                sys.stderr.flush()
                self._exit(self.exitCode)

        self.reactor.addSystemEventTrigger("after", "shutdown", atShutdown)

    # -- a successor's start ----------------------------------------------------------------

    def settleForHandoff(self) -> None:
        """
        Before a successor connects: collect what start-up left behind and keep it out of later
        collections (no long collection pauses the first requests), and take back the normal
        scheduling priority its start-up ran without.
        """
        self._settleHeap()
        self._restorePriority()


def lowerPriority() -> None:
    """
    Run this process's start-up at idle priority (L{graceful_plugin.priority.lowerPriority}),
    until L{ProcessEffects.settleForHandoff}.
    """
    priority.lowerPriority()
