"""
Restarting: the serving process starts its own successor and follows the handoff to its end.

The successor is the server's own command line with C{--takeover CONTROL_PATH} added (so it
loads the code and configuration on disk now, with the same options), or the command given with
C{--restart-command}.  It is started detached: in a session of its own (a Ctrl-C meant for us
does not reach it), stdin from C{/dev/null}, stdout and stderr where ours go, and no descriptor
but those three (every listening socket is close-on-exec anyway).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin.control import HandoffBusy, RestartFailed
from graceful_plugin.lifecycle import IGenerationObserver, Observer
from graceful_plugin.priority import idleChildren

#: How often a started successor is checked for having exited (and reaped).
POLL_INTERVAL = 0.1

#: Seconds a started successor has to say hello (its start-up runs at idle priority, so a busy
#: machine makes it slow); the handoff's own deadlines apply from then on.
START_TIMEOUT = 60.0

Progress = Callable[[str, float, str], Any]


def successorCommand(
    argv: Sequence[str], controlPath: str, executable: str | None = None
) -> list[str]:
    """
    The command line of a successor: C{argv} (the interpreter's own, L{sys.orig_argv}) with any
    C{--takeover} removed and C{--takeover controlPath} added at the end, where the graceful
    subcommand's options are.  twistd's options and the subcommand's (listeners, application)
    stay as they are, so the successor keeps the listeners and application it names.

    @param executable: the interpreter (L{sys.executable} when L{None}), in place of
        C{argv[0]}, which may be a bare name looked up in a C{PATH} that has changed since.
    """
    if not argv:
        raise ValueError("no command line to restart with")
    rest: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--takeover":
            skip = True
            continue
        if arg.startswith("--takeover="):
            continue
        rest.append(arg)
    return [executable or sys.executable, *rest, "--takeover", controlPath]


def parseRestartCommand(text: str) -> list[str]:
    """
    Split a C{--restart-command} like a shell would (no shell runs it).

    @raise ValueError: with a sentence, when it is empty or its quotes do not match.
    """
    try:
        command = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot split {text!r}: {e}") from None
    if not command:
        raise ValueError("the command is empty")
    return command


#: Words in an option's name that mark its value as a secret in the logged form of a command.
SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "secret", "token", "apikey", "credentials", "auth", "key"}
)

#: Longer words found anywhere in an option's name (C{--db-password}, C{--githubtoken}).
SECRET_PARTS = ("password", "passwd", "secret", "token", "apikey", "credential", "privatekey")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")

#: What a redacted value reads as.
REDACTED = "***"


def _secretOption(name: str) -> bool:
    bare = name.lstrip("-").lower()
    words = re.split(r"[-_.]", bare)
    flat = bare.replace("-", "").replace("_", "").replace(".", "")
    return any(w in SECRET_WORDS for w in words) or any(p in flat for p in SECRET_PARTS)


def redactCommand(command: Sequence[str]) -> str:
    """
    A command line as it may be logged: the values of environment assignments (C{env
    NAME=value ...}, and C{NAME=value} words before the program) and of options that look
    secret (C{--password=X}, C{--api-token X}) shown as C{***}.  Only the logged form changes:
    the command that runs is the one given.
    """
    shown: list[str] = []
    hideNext = False
    keepNext = False
    # Before the program: leading NAME=value words, env and its options and assignments.
    leading = True
    for index, arg in enumerate(command):
        if hideNext:
            shown.append(REDACTED)
            hideNext = False
            continue
        if keepNext:
            shown.append(shlex.quote(arg))
            keepNext = False
            continue
        if leading:
            if _ENV_NAME.match(arg):
                shown.append(shlex.quote(arg.split("=", 1)[0]) + "=" + REDACTED)
                continue
            if index == 0 and os.path.basename(arg) == "env":
                shown.append(shlex.quote(arg))
                continue
            if index > 0 and os.path.basename(command[0]) == "env" and arg.startswith("-"):
                shown.append(shlex.quote(arg))
                # env's options that take a value: -u NAME, -C DIR.
                keepNext = arg in ("-u", "--unset", "-C", "--chdir")
                continue
            leading = False
        if arg.startswith("-") and len(arg) > 1 and _secretOption(arg.partition("=")[0]):
            name, eq, _ = arg.partition("=")
            if eq:
                shown.append(shlex.quote(name) + "=" + REDACTED)
            else:
                shown.append(shlex.quote(arg))
                hideNext = True
            continue
        shown.append(shlex.quote(arg))
    return " ".join(shown)


def restartCommand(given: list[str] | None, controlPath: str) -> list[str]:
    """
    The command that starts a successor: the one given, or our own command line (read now,
    while it still means what it meant at start) with C{--takeover controlPath}.
    """
    if given:
        return list(given)
    return successorCommand(sys.orig_argv, controlPath)


def spawnDetached(command: Sequence[str], cwd: str | None) -> subprocess.Popen[bytes]:
    """
    Start C{command} detached: its own session, stdin from C{/dev/null}, our stdout and stderr,
    no other descriptor, at idle priority until it connects for the handoff.

    @raise OSError: when it cannot be started (no such program, not executable).
    """
    with idleChildren():
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )


def describeExit(code: int) -> str:
    """
    An exit status in words.
    """
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


@dataclass
class _Restart:
    """
    One restart in progress.
    """

    #: The successor (a L{subprocess.Popen} or a L{ForkedProcess}), once started.
    process: Any
    started: float
    progress: Progress | None
    done: Deferred[dict[str, Any]]
    phases: list[dict[str, Any]] = field(default_factory=list)
    helloPid: int = 0
    #: Hello came before the launcher said the successor was started (a fork's answer is late).
    helloPending: bool = False
    deadline: Any = None


@implementer(IGenerationObserver)
class Restarter(Observer):
    """
    Starts a generation's successor on request, and tells the requester how the handoff went.

    The next handoff that begins after the successor was started is taken to be its (a
    wrapper script may start the real successor under another pid).
    """

    log = Logger()

    def __init__(
        self,
        server: Any,
        spawn: Callable[[Sequence[str], str | None], Any] = spawnDetached,
        pollInterval: float = POLL_INTERVAL,
        startTimeout: float = START_TIMEOUT,
        killGroup: Callable[[int, int], None] = os.killpg,
        launcher: Any = None,
    ) -> None:
        self.server = server
        self.spawn = spawn
        #: Forks successors from the fork server (L{graceful_plugin.forkclient.ForkLauncher});
        #: without one, every successor is started in full with C{spawn}.
        self.launcher = launcher
        self.killGroup = killGroup
        self.pollInterval = pollInterval
        self.startTimeout = startTimeout
        self._current: _Restart | None = None
        self._children: list[Any] = []
        self._poller: Any = None

    @property
    def reactor(self) -> Any:
        return self.server.reactor

    def start(
        self, progress: Progress | None = None, fresh: bool = False
    ) -> Deferred[dict[str, Any]]:
        """
        Start a successor: forked by the fork server when there is one (L{ForkLauncher}), else
        in full.

        @param progress: called with (phase, milliseconds since the start, detail) at each
            phase.
        @param fresh: have the fork server replace itself with a fresh one first.
        @return: fires, once the successor confirmed it accepts, with its C{pid}, C{generation},
            C{ms} and C{phases}; fails with L{RestartFailed} and the reason when the handoff was
            rolled back or the successor exited first.
        @raise HandoffBusy: a restart or handoff is already in progress, or this generation no
            longer serves.
        @raise RestartFailed: the successor cannot be started at all.
        """
        server = self.server
        if self._current is not None:
            process = self._current.process
            raise HandoffBusy(
                "a restart is already in progress ("
                + (f"successor pid {process.pid})" if process is not None else "starting)")
            )
        state = server.machine.describe() if server.machine is not None else "starting"
        if state != "serving":
            raise HandoffBusy(f"cannot restart: this server is {state}")
        draining = getattr(server, "drainingGenerations", lambda: 0)()
        limit = getattr(server.settings, "maxDraining", None)
        if limit is not None and draining >= limit:
            raise HandoffBusy(
                f"cannot restart: {draining} generation(s) still draining (--max-draining"
                f" {limit}); try again when they have finished"
            )
        command = server.settings.restartCommand
        if not command:
            raise RestartFailed("this server has no command to start a successor with")
        cwd = server.settings.restartDirectory or None
        current = _Restart(
            process=None, started=time.monotonic(), progress=progress, done=Deferred()
        )
        self._current = current
        try:
            if self.launcher is not None:
                launched = self.launcher.launch(command, cwd, fresh, self.spawn)
            else:
                launched = self.spawn(command, cwd)
        except OSError as e:
            self._current = None
            raise RestartFailed(
                f"cannot start the successor {command[0]!r}: {e.strerror or e}"
            ) from None
        # Until it says hello, the successor is on our clock; from then on the handoff's.
        current.deadline = self.reactor.callLater(self.startTimeout, self._noHello, current)
        if isinstance(launched, Deferred):
            launched.addCallbacks(
                lambda process: self._spawned(current, process, command),
                lambda failure: self._spawnFailed(current, command, failure),
            )
        else:
            self._spawned(current, launched, command)
        return current.done

    def _spawned(self, current: _Restart, process: Any, command: Sequence[str]) -> None:
        self._children.append(process)
        if self._current is not current:
            return  # (it timed out meanwhile: the poller reaps it)
        current.process = process
        self.log.info(
            "restart: started successor pid {pid}: {command}",
            pid=process.pid,
            command=redactCommand(command),
            generation=self.server.generation,
        )
        self._phase("spawned", f"pid {process.pid}: {redactCommand(command)}")
        if current.helloPending:
            current.helloPending = False
            self._phase("hello", f"successor pid {current.helloPid} connected")
        if self._poller is None:
            self._poll()

    def _spawnFailed(self, current: _Restart, command: Sequence[str], failure: Failure) -> None:
        if self._current is not current:
            return
        error = failure.value
        why = (
            error.strerror or str(error)
            if isinstance(error, OSError)
            else failure.getErrorMessage()
        )
        self._finish(None, f"cannot start the successor {command[0]!r}: {why}")

    # -- following the successor ------------------------------------------------------------

    def _phase(self, phase: str, detail: str = "") -> None:
        current = self._current
        if current is None:
            return
        ms = (time.monotonic() - current.started) * 1000
        current.phases.append({"phase": phase, "ms": ms, "detail": detail})
        self.log.info(
            "restart: {phase} after {ms:.1f} ms {detail}",
            phase=phase,
            ms=ms,
            detail=detail,
            successor=current.process.pid if current.process is not None else None,
            generation=self.server.generation,
        )
        if current.progress is not None:
            try:
                current.progress(phase, ms, detail)
            except Exception:
                self.log.failure("restart: reporting progress failed")

    def _finish(self, result: dict[str, Any] | None, reason: str = "") -> None:
        current, self._current = self._current, None
        if current is None:
            return
        if current.deadline is not None and current.deadline.active():
            current.deadline.cancel()
        if result is None:
            self.log.warn(
                "restart failed: {reason}",
                reason=reason,
                successor=current.process.pid if current.process is not None else None,
                generation=self.server.generation,
                ms=(time.monotonic() - current.started) * 1000,
            )
            current.done.errback(RestartFailed(reason))
        else:
            current.done.callback(result)

    def _poll(self) -> None:
        """
        Reap every successor we started that has exited; a successor exiting before its handoff
        began fails the restart.
        """
        self._poller = None
        for child in list(self._children):
            code = child.poll()
            if code is None:
                continue
            self._children.remove(child)
            current = self._current
            if current is None or current.process is not child:
                continue
            if current.helloPid:
                continue  # the handoff decides; its end is near
            if code == 0:
                # A wrapper that started the real successor and exited: wait for its hello.
                self._phase("exited", f"pid {child.pid} exited with status 0")
                continue
            self._phase("exited", f"pid {child.pid} {describeExit(code)}")
            self._finish(
                None,
                f"the successor (pid {child.pid}) {describeExit(code)} before taking over;"
                " its output is in this server's log",
            )
        if self._children:
            self._poller = self.reactor.callLater(self.pollInterval, self._poll)

    def _noHello(self, current: _Restart) -> None:
        current.deadline = None
        if self._current is not current:
            return
        if current.process is None:
            self._finish(None, f"the successor was not started within {self.startTimeout:g} s")
            return
        try:
            self.killGroup(current.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self._finish(
            None,
            f"the successor (pid {current.process.pid}) did not connect within"
            f" {self.startTimeout:g} s; it was killed",
        )

    # -- IGenerationObserver ----------------------------------------------------------------

    def serving(self, server: Any) -> None:
        if self.launcher is not None:
            # Find the fork server (or start one) for our own successors.
            self.launcher.start()

    def handoffStarted(self, server: Any, pid: int) -> None:
        current = self._current
        if current is None:
            return
        current.helloPid = pid
        if current.deadline is not None and current.deadline.active():
            current.deadline.cancel()
        current.deadline = None
        if current.process is None:
            # The fork server's answer (the pid) is still on its way: "spawned" comes first.
            current.helloPending = True
            return
        self._phase("hello", f"successor pid {pid} connected")

    def handoffPaused(self, server: Any, pid: int) -> None:
        self._phase("committed", "the successor adopted every listener; we paused accepting")

    def handoffCommitted(self, server: Any, pid: int) -> None:
        current = self._current
        if current is None:
            return
        self._phase(
            "accepting", f"the successor accepts; we drain {server.liveSessions()} sessions"
        )
        self._finish(
            {
                "pid": pid,
                "generation": server.generation + 1,
                "ms": (time.monotonic() - current.started) * 1000,
                "phases": current.phases,
            }
        )

    def handoffAborted(self, server: Any, pid: int, reason: str) -> None:
        current = self._current
        if current is None or not current.helloPid:
            return
        code = current.process.poll() if current.process is not None else None
        if code is not None:
            reason = f"{reason} (the successor {describeExit(code)})"
        self._phase("rolled_back", reason)
        self._finish(None, f"the handoff to pid {pid} was rolled back: {reason}")
