"""
A generation's side of the fork server (L{graceful_plugin.forkserver}): find it or start it once
serving, keep a connection to it for as long as the generation lives, and have it fork
successors; fall back to a full start, saying why, whenever it cannot.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from graceful_plugin.forkserver import ENV_ADDRESS, MAX_MESSAGE, addressFor, sockaddr
from graceful_plugin.priority import idleChildren

#: Seconds the fork server has to answer a fork request (it may first replace itself, at idle
#: priority, on a busy machine) before the successor is started in full instead.
FORK_TIMEOUT = 30.0

#: Seconds a fork server we started has to say it is ready.
READY_TIMEOUT = 60.0


class ForkedProcess:
    """
    A successor forked by the fork server: its pid, and its exit status once the fork server
    has reaped it (L{poll}, as L{subprocess.Popen.poll}).
    """

    def __init__(self, pid: int, link: ForkServerLink) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._link = link

    def poll(self) -> int | None:
        if self.returncode is None and not self._link.connected:
            # The fork server has gone: it can no longer tell us, so look for the pid.
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = 255
            except PermissionError:
                pass
        return self.returncode


class ForkServerLink(Int32StringReceiver):
    """
    The connection to the fork server: requests out, answers and exit statuses in.
    """

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, launcher: ForkLauncher) -> None:
        self.launcher = launcher
        self.connected = False
        self.pending: dict[int, tuple[Deferred[Any], list[int]]] = {}
        self.children: dict[int, ForkedProcess] = {}
        self._next = 0

    def connectionMade(self) -> None:
        self.connected = True

    def fork(
        self, argv: Sequence[str], cwd: str, env: dict[str, str], fresh: bool
    ) -> Deferred[Any]:
        """
        Ask for a fork; fires with the answer (C{pid}, C{refreshed}), fails with the reason.
        """
        assert self.transport is not None
        self._next += 1
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # stdin from /dev/null, our stdout and stderr, as a full start has them.  Our copies stay
        # open until the answer: the descriptors are sent when the transport writes, later.
        for fd in (devnull, 1, 2):
            self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
        request = {
            "op": "fork",
            "id": self._next,
            "argv": list(argv),
            "cwd": cwd,
            "env": env,
            "fresh": fresh,
        }
        d: Deferred[Any] = Deferred()
        self.pending[self._next] = (d, [devnull])
        self.sendString(json.dumps(request).encode())
        return d

    def stringReceived(self, string: bytes) -> None:
        try:
            message = json.loads(string)
        except ValueError:
            self.launcher.log.warn("the fork server sent something that is not JSON: dropped it")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        op = message.get("op")
        if op == "exited":
            child = self.children.pop(message["pid"], None)
            if child is not None:
                child.returncode = message["status"]
            return
        entry = self.pending.pop(message.get("id"), None)
        if entry is None:
            return
        d, toClose = entry
        for fd in toClose:
            os.close(fd)
        if d.called:
            return  # timed out: the full start runs already
        if op == "forked":
            child = ForkedProcess(message["pid"], self)
            self.children[child.pid] = child
            d.callback(
                {
                    "process": child,
                    "refreshed": message.get("refreshed"),
                    "ahead": message.get("ahead"),
                }
            )
        else:
            d.errback(ForkFailed(message.get("reason") or "the fork server refused"))

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.connected = False
        pending, self.pending = self.pending, {}
        for d, toClose in pending.values():
            for fd in toClose:
                os.close(fd)
            if not d.called:
                d.errback(ForkFailed("the fork server closed the connection"))
        self.launcher.linkLost(self, reason or Failure(ConnectionError("closed")))


class ForkFailed(Exception):
    """
    The fork server did not fork the successor: the message says why.
    """


class _ServerProcess(ProcessProtocol):
    """
    A fork server we started: tells when it is ready (a line on descriptor 3).
    """

    def __init__(self) -> None:
        self.ready: Deferred[str] = Deferred()
        self._line = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._line += data

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 3 and not self.ready.called:
            self.ready.callback(self._line.decode(errors="replace").strip())

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(ForkFailed(f"it exited: {reason.getErrorMessage()}"))


class ForkLauncher:
    """
    Starts successors as forks of the fork server, or in full when it cannot.

    @ivar address: the fork server's address (the C{GRACEFUL_FORKSERVER} environment variable,
        else derived from the control socket), given on to successors in their environment.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        controlPath: str,
        address: str | None = None,
        spawnServer: bool = True,
        forkTimeout: float = FORK_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.address = address or os.environ.get(ENV_ADDRESS) or addressFor(controlPath)
        self.spawnServer = spawnServer
        self.forkTimeout = forkTimeout
        self.link: ForkServerLink | None = None
        self.serverPid = 0
        #: Why there is no fork server to use, when there is none.
        self.unavailable = "the fork server is not started yet"
        self._starting = False
        self._stopping = False

    # -- finding or starting the fork server ------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect to the fork server, starting one first if none answers (once per generation).
        """
        if self._starting or self.link is not None:
            return succeed(None)
        self._starting = True
        os.environ[ENV_ADDRESS] = self.address
        # Our connection ends with us: that is no news.
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shuttingDown)
        d = self._connect()

        def noServer(failure: Failure) -> Any:
            failure.trap(ConnectError)
            if not self.spawnServer:
                self.unavailable = f"no fork server answers at {self.address}"
                return None
            return self._spawnServer().addCallback(lambda _: self._connect())

        d.addErrback(noServer)
        d.addErrback(self._cannotStart)
        d.addBoth(self._started)
        return d

    def _started(self, result: Any) -> None:
        self._starting = False

    def _cannotStart(self, failure: Failure) -> None:
        self.unavailable = f"the fork server could not be started: {failure.getErrorMessage()}"
        if self._stopping:
            return  # (we stopped before it was ready: no news)
        self.log.warn(
            "fork server: {reason}; successors will be started in full", reason=self.unavailable
        )

    def _connect(self) -> Deferred[None]:
        endpoint = UNIXClientEndpoint(self.reactor, sockaddr(self.address), timeout=5)
        d = connectProtocol(endpoint, ForkServerLink(self))

        def connected(link: ForkServerLink) -> None:
            from graceful_plugin.forkserver import peerUid

            assert link.transport is not None
            handle = link.transport.getHandle()  # type: ignore[attr-defined]
            uid = peerUid(handle)
            if uid != os.getuid():
                link.transport.loseConnection()
                raise ForkFailed(f"the process at {self.address} runs as uid {uid}, not ours")
            import socket
            import struct

            creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.serverPid = struct.unpack("3i", creds)[0]
            self.link = link
            self.unavailable = ""
            self.log.info(
                "fork server pid {pid} at {address}: successors are forked from it",
                pid=self.serverPid,
                address=self.address,
            )

        return d.addCallback(connected)

    def _spawnServer(self) -> Deferred[str]:
        protocol = _ServerProcess()
        devnull = os.open(os.devnull, os.O_RDONLY)
        argv = [
            sys.executable,
            "-P",
            "-m",
            "graceful_plugin.forkserver",
            "--address",
            self.address,
            "--ready-fd",
            "3",
        ]
        try:
            with idleChildren():
                # Its own directory is /, so that it holds no directory of ours open.
                self.reactor.spawnProcess(
                    protocol,
                    sys.executable,
                    argv,
                    env=dict(os.environ),
                    path="/",
                    childFDs={0: devnull, 1: 1, 2: 2, 3: "r"},
                )
        finally:
            os.close(devnull)
        protocol.ready.addTimeout(READY_TIMEOUT, self.reactor)

        def answered(line: str) -> str:
            if not (line.startswith("ready") or line.startswith("exists")):
                raise ForkFailed(f"it said {line!r}" if line else "it exited before it was ready")
            return line

        return protocol.ready.addCallback(answered)

    def _shuttingDown(self) -> None:
        self._stopping = True

    def linkLost(self, link: ForkServerLink, reason: Failure) -> None:
        if link is not self.link:
            return
        self.link = None
        if self._stopping:
            return
        self.unavailable = (
            f"the fork server (pid {self.serverPid}) has gone ({reason.getErrorMessage()})"
        )
        self.log.warn("{reason}; successors will be started in full", reason=self.unavailable)

    # -- starting a successor ---------------------------------------------------------------

    def launch(
        self,
        command: Sequence[str],
        cwd: str | None,
        fresh: bool,
        fallback: Callable[[Sequence[str], str | None], Any],
    ) -> Any:
        """
        Start a successor: a fork of the fork server, or C{fallback(command, cwd)} (a full
        start) when there is none or it fails, with a log line saying why.

        @return: the process (full start, at once) or a L{Deferred} firing with it.
        @raise OSError: the full start failed at once.
        """
        link = self.link
        if link is None or not link.connected:
            return self._full(command, cwd, fallback, self.unavailable or "no fork server")
        d = link.fork(command, cwd or os.getcwd(), dict(os.environ), fresh)
        d.addTimeout(self.forkTimeout, self.reactor)

        def forked(answer: dict[str, Any]) -> Any:
            if answer.get("refreshed"):
                self.log.info(
                    "fork server pid {pid} replaced itself with a fresh one before forking:"
                    " {reason}",
                    pid=self.serverPid,
                    reason=answer["refreshed"],
                )
            ahead = answer.get("ahead")
            self.log.info(
                "fork server pid {server} forked the successor pid {pid}{how}",
                server=self.serverPid,
                pid=answer["process"].pid,
                how="" if ahead is None else f" (its spare, forked {ahead:g} s ahead)",
            )
            return answer["process"]

        def failed(failure: Failure) -> Any:
            reason = failure.getErrorMessage() or failure.type.__name__
            if failure.check(ForkFailed) is None:
                reason = f"it did not answer within {self.forkTimeout:g} s"
                # Whatever it forks late meets a handoff in progress and exits.
                if link.transport is not None:
                    link.transport.loseConnection()
            return self._full(command, cwd, fallback, f"the fork server did not fork: {reason}")

        return d.addCallbacks(forked, failed)

    def _full(
        self,
        command: Sequence[str],
        cwd: str | None,
        fallback: Callable[[Sequence[str], str | None], Any],
        reason: str,
    ) -> Any:
        self.log.warn("restart: starting the successor in full: {reason}", reason=reason)
        return fallback(command, cwd)
