"""
The hot standby: a generation whose successor confirmed it accepts keeps paused copies of its
listening sockets (and of the control listener) until it exits, and resumes serving if that
successor is lost.

Two sides:

- the predecessor's (L{Standby}): watch the successor's pid (the server also sees the control
  link close), and when the successor is lost take back what the serving generation owns: the
  pidfile, and a control path that reaches us;
- the successor's (L{tellStandDown}): a generation that stops on purpose, or commits a handoff
  to a successor of its own, tells the predecessor standing by for it that it will not be needed.

Who stands by: only the direct predecessor of the serving generation.  When generation N+1
commits a handoff to N+2 it tells N to stand down, and waits (briefly) for the answer, before
it pauses and answers the commit; so at most one generation stands by at any moment, and no
generation resumes while a newer one may accept.  A stopped generation tells its predecessor
before it closes its listeners: the operator wants the service down, and nothing resumes.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from graceful_plugin import pidfile
from graceful_plugin.control import ControlProtocol, StandDown

#: How often a standing-by generation checks that its successor's pid is still alive (the
#: control link closing usually tells first).
WATCH_INTERVAL = 0.5

#: How long a generation waits for its predecessor to answer L{StandDown} (it answers in about
#: a millisecond).  Waiting longer buys nothing: once our write left, the predecessor reads the
#: StandDown before it could see our link close, however late it runs.
STAND_DOWN_TIMEOUT = 0.2

log = Logger()


class Standby:
    """
    The predecessor's side of the hot standby: which successor we stand by for, and what we take
    back when it is lost.

    @ivar pid: the successor's pid (0: not standing by).
    @ivar pidfilePath: the pidfile to claim again if we resume (empty: none).
    """

    def __init__(
        self,
        clock: IReactorTime,
        alive: Callable[[int], bool] = pidfile.alive,
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self.clock = clock
        self.alive = alive
        self.interval = interval
        self.pid = 0
        self.pidfilePath = ""
        self._lost: Callable[[str], object] | None = None
        self._call: IDelayedCall | None = None

    def watch(self, pid: int, pidfilePath: str, lost: Callable[[str], object]) -> None:
        """
        Stand by for successor C{pid}: call C{lost} with the reason once its pid has died.
        """
        self.unwatch()
        self.pid = pid
        self.pidfilePath = pidfilePath
        self._lost = lost
        self._call = self.clock.callLater(self.interval, self._check)

    def unwatch(self) -> None:
        """
        No longer stand by (released, resumed, or exiting).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._lost = None

    def _check(self) -> None:
        self._call = None
        if self.alive(self.pid):
            self._call = self.clock.callLater(self.interval, self._check)
            return
        lost, self._lost = self._lost, None
        if lost is not None:
            lost(f"the successor (pid {self.pid}) exited")

    def reclaim(self, controlPort: Any, controlPath: str, rebind: Callable[[], Any]) -> Any:
        """
        We serve again: own the pidfile, and make sure the control path reaches us.

        The control listener we kept is the very socket at the path, unless somebody removed or
        replaced the path meanwhile.  We listen() on it again (which makes us the process that
        C{SO_PEERCRED} names to a client) and connect to the path: if that reaches another
        listener, or none, the path is bound anew (a stale or missing socket), or left alone
        with a warning (another live server's).

        @param rebind: binds a new control listener at the path, not accepting yet.
        @return: the control listener that serves the path now (C{controlPort} or a new one).
        """
        self.unwatch()
        if self.pidfilePath:
            try:
                pidfile.claim(self.pidfilePath, os.getpid())
            except OSError as e:
                log.warn(
                    "cannot claim the pidfile {path} again: {error}",
                    path=self.pidfilePath,
                    error=str(e),
                )
        relisten(controlPort)
        problem = controlPathProblem(controlPath, os.getpid())
        if problem is None:
            return controlPort
        if problem.startswith("served by"):
            log.warn(
                "the control path {path} is {problem}: not replacing it; our control socket is"
                " out of reach",
                path=controlPath,
                problem=problem,
            )
            return controlPort
        log.warn(
            "the control path {path} does not reach us ({problem}): binding it again",
            path=controlPath,
            problem=problem,
        )
        try:
            port = rebind()
        except OSError as e:
            log.warn("cannot bind the control path {path}: {error}", path=controlPath, error=str(e))
            return controlPort
        # Our old copy no longer has a path: release it (never unlink the new one).
        controlPort.release()
        return port


def relisten(port: Any) -> None:
    """
    Call listen() again on a Unix listener (same backlog): Linux then gives this process's
    credentials to every client that connects (C{SO_PEERCRED}).
    """
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    try:
        sock.listen(getattr(port, "backlog", 50))
    except OSError:
        pass


def controlPathProblem(path: str, pid: int, timeout: float = 1.0) -> str | None:
    """
    Whether connecting to C{path} reaches a listener of process C{pid}; L{None} when it does,
    else what does answer there, in words: ``missing``, ``not a socket``, ``stale`` (nobody
    listens), or ``served by pid N``.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be checked ({e.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
        raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (ConnectionRefusedError, FileNotFoundError):
        return "stale"
    except OSError as e:
        return f"cannot be checked ({e.strerror})"
    finally:
        probe.close()
    peer = struct.unpack("3i", raw)[0]
    return None if peer == pid else f"served by pid {peer}"


def tellStandDown(
    links: Iterable[ControlProtocol],
    reason: str,
    clock: IReactorTime,
    timeout: float = STAND_DOWN_TIMEOUT,
) -> Deferred[None]:
    """
    Tell every predecessor on C{links} that it will not be needed; fires when each one answered,
    its link closed, or C{timeout} passed (an older predecessor answers UNHANDLED: the same).
    """
    calls: list[Deferred[Any]] = []
    for link in links:
        transport = link.transport
        # (AMP never sets Protocol.connected: look at the transport.)
        if transport is None or getattr(transport, "disconnecting", True):
            continue
        d = link.callRemote(StandDown, reason=reason)
        d.addTimeout(timeout, clock)
        d.addErrback(lambda _: None)
        calls.append(d)
    if not calls:
        return succeed(None)
    return DeferredList(calls, consumeErrors=True).addCallback(lambda _: None)


__all__ = [
    "STAND_DOWN_TIMEOUT",
    "WATCH_INTERVAL",
    "Standby",
    "controlPathProblem",
    "tellStandDown",
]
