"""
A generation's side of the fork server (L{graceful_plugin.forkserver}): find it or start it once
serving (a successor attaches to its predecessor's as it starts, for its workers), keep a
connection to it for as long as the generation lives, and have it fork successors and any
other command of this interpreter with the descriptors it is given (a worker:
L{ForkLauncher.forkProcess}); fall back to a full start, saying why, whenever it cannot.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from graceful_plugin.forkserver import ENV_ADDRESS, MAX_MESSAGE, addressFor, sockaddr
from graceful_plugin.priority import idleChildren

#: Seconds the fork server has to answer a fork request (it may first replace itself, at idle
#: priority, on a busy machine) before the successor is started in full instead.
FORK_TIMEOUT = 30.0

#: Seconds a fork server we started has to say it is ready.
READY_TIMEOUT = 60.0


class ForkedProcess:
    """
    A process forked by the fork server (a successor, a worker): its pid, and its exit status
    once the fork server has reaped it (L{poll}, as L{subprocess.Popen.poll}, or
    L{whenExited}); L{signalProcess} signals it as a Twisted process transport does.
    """

    def __init__(self, pid: int, link: ForkServerLink) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._link = link
        self._waiting: list[Deferred[int | None]] = []
        #: A descriptor for the process itself (C{pidfd_open}), once someone waits for its end:
        #: it signals the right process however late, and tells its end if the fork server
        #: cannot any more.
        self._pidfd: int | None = None
        self._watch: _ExitWatch | None = None

    def whenExited(self) -> Deferred[int | None]:
        """
        Fires with the exit status (negative: the signal that ended it, as
        L{os.waitstatus_to_exitcode}) once the fork server has reaped it; with L{None} when it
        ended after the fork server had gone (nobody can tell its status then).
        """
        d: Deferred[int | None] = Deferred()
        if self.returncode is not None:
            d.callback(self.returncode)
            return d
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):
                self._pidfd = None
        self._waiting.append(d)
        if not self._link.connected:
            self.orphaned()
        return d

    def signalProcess(self, signalID: str | int) -> None:
        """
        Send it a signal (C{"KILL"}, C{"TERM"}, C{"INT"} or a number).

        @raise ProcessExitedAlready: it has ended.
        """
        from twisted.internet.error import ProcessExitedAlready

        if self.returncode is not None:
            raise ProcessExitedAlready()
        number = signalID if isinstance(signalID, int) else getattr(signal, f"SIG{signalID}")
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, number)
            else:
                os.kill(self.pid, number)
        except ProcessLookupError:
            raise ProcessExitedAlready() from None

    def exited(self, status: int | None) -> None:
        """
        It has ended (the fork server reaped it, or, with L{None}, it ended after the fork
        server had gone).
        """
        if self.returncode is None:
            self.returncode = 255 if status is None else status
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(status)

    def orphaned(self) -> None:
        """
        The fork server has gone: watch for the end ourselves (its pidfd becomes readable).
        """
        if not self._waiting or self._watch is not None or self.returncode is not None:
            return
        if self._pidfd is None:
            self.exited(None)
            return
        self._watch = _ExitWatch(self._link.launcher.reactor, self._pidfd, self)

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


@implementer(IReadDescriptor)
class _ExitWatch:
    """
    A forked process's pidfd on the reactor: readable once the process has ended.
    """

    def __init__(self, reactor: Any, pidfd: int, process: ForkedProcess) -> None:
        self.reactor = reactor
        self.pidfd = pidfd
        self.process = process
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.pidfd

    def doRead(self) -> None:
        self.process.exited(None)

    def stop(self) -> None:
        self.reactor.removeReader(self)

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "ForkedProcess"


class ForkServerLink(Int32StringReceiver):
    """
    The connection to the fork server: requests out (one at a time, so that the descriptors
    passed since the last request are the next one's), answers and exit statuses in.
    """

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, launcher: ForkLauncher) -> None:
        self.launcher = launcher
        self.connected = False
        self.pending: dict[int, tuple[Deferred[Any], list[int]]] = {}
        #: Requests not sent yet (one is in flight at a time): id, message, descriptors.
        self.queued: list[tuple[int, bytes, list[int]]] = []
        self.children: dict[int, ForkedProcess] = {}
        self._next = 0
        #: The request sent and not answered yet.
        self._inFlight: int | None = None

    def connectionMade(self) -> None:
        self.connected = True

    def fork(
        self,
        argv: Sequence[str],
        cwd: str,
        env: dict[str, str],
        fresh: bool,
        fds: Mapping[int, int] | None = None,
        name: str | None = None,
    ) -> Deferred[Any]:
        """
        Ask for a fork; fires with the answer (C{process}, C{refreshed}, C{ahead}), fails with
        the reason.

        @param fds: the child's descriptors: number in the child -> our descriptor (duplicated
            at once: the caller may close its own).  Without, stdin from /dev/null and our
            stdout and stderr, as a full start has them.
        @param name: the child's process name (C{ps -o comm}), else its program's.
        """
        assert self.transport is not None
        self._next += 1
        if fds is None:
            targets = [0, 1, 2]
            passed = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), os.dup(1), os.dup(2)]
        else:
            targets = sorted(fds)
            passed = [os.dup(fds[target]) for target in targets]
        request: dict[str, Any] = {
            "op": "fork",
            "id": self._next,
            "argv": list(argv),
            "cwd": cwd,
            "env": env,
            "fresh": fresh,
        }
        if fds is not None:
            # (An old fork server ignores what it does not know, and takes three: stdio.)
            request["targets"] = targets
        if name is not None:
            request["name"] = name
        data = json.dumps(request).encode()
        # Each descriptor rides on one byte of the message (Twisted's Unix transport).
        data += b" " * max(0, len(passed) - len(data))
        d: Deferred[Any] = Deferred()
        # Our copies stay open until the answer: the descriptors are sent when the transport
        # writes, later.
        self.pending[self._next] = (d, passed)
        self.queued.append((self._next, data, passed))
        self._sendNext()
        return d

    def _sendNext(self) -> None:
        if self.transport is None or not self.connected:
            return
        while self.queued and self._inFlight is None:
            ident, data, passed = self.queued.pop(0)
            d, _ = self.pending[ident]
            if d.called:
                # Given up before it was sent (timed out): never sent, nothing to answer.
                del self.pending[ident]
                for fd in passed:
                    os.close(fd)
                continue
            for fd in passed:
                self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
            self.sendString(data)
            self._inFlight = ident

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
                child.exited(message["status"])
            return
        entry = self.pending.pop(message.get("id"), None)
        if entry is None:
            return
        d, toClose = entry
        for fd in toClose:
            os.close(fd)
        if message.get("id") == self._inFlight:
            self._inFlight = None
            self._sendNext()
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
        self.queued = []
        for d, toClose in pending.values():
            for fd in toClose:
                os.close(fd)
            if not d.called:
                d.errback(ForkFailed("the fork server closed the connection"))
        self.launcher.linkLost(self, reason or Failure(ConnectionError("closed")))
        # Nobody will tell us how our children end now: they tell us themselves.
        children, self.children = self.children, {}
        for child in children.values():
            child.orphaned()


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
        self._prepared = False
        self._attachWaiters: list[Deferred[None]] = []

    # -- finding or starting the fork server ------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        os.environ[ENV_ADDRESS] = self.address
        # Our connection ends with us: that is no news.
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shuttingDown)

    def attach(self) -> Deferred[None]:
        """
        Connect to the fork server if one answers, never starting one (a successor, for its
        workers, before it serves); fires once connected or not.
        """
        if self.link is not None or self._starting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._attachWaiters.append(d)
        if len(self._attachWaiters) == 1:
            self._prepare()

            def notThere(failure: Failure) -> None:
                self.unavailable = (
                    f"no fork server answers at {self.address} ({failure.getErrorMessage()})"
                )

            def done(_: object) -> None:
                waiters, self._attachWaiters = self._attachWaiters, []
                for waiter in waiters:
                    waiter.callback(None)

            self._connect().addErrback(notThere).addBoth(done)
        return d

    def start(self) -> Deferred[None]:
        """
        Connect to the fork server, starting one first if none answers (once per generation).
        """
        if self._attachWaiters:
            return self.attach().addCallback(lambda _: self.start())
        if self._starting or self.link is not None:
            return succeed(None)
        self._starting = True
        self.unavailable = "the fork server is starting"
        self._prepare()
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

    # -- forking any command ----------------------------------------------------------------

    def forkProcess(
        self,
        argv: Sequence[str],
        cwd: str,
        env: dict[str, str],
        fds: Mapping[int, int],
        name: str | None = None,
    ) -> Deferred[ForkedProcess]:
        """
        Have the fork server fork C{argv} (a module or script of this interpreter) with the
        descriptors C{fds} (number in the child -> ours; duplicated at once) and nothing else.

        @return: fires with the L{ForkedProcess}; fails with L{ForkFailed} saying why (no fork
            server, it refused, or it did not answer within C{forkTimeout}).
        """
        d = self._request(argv, cwd, env, False, fds=fds, name=name)
        return d.addCallback(lambda answer: answer["process"])

    def _request(
        self,
        argv: Sequence[str],
        cwd: str,
        env: dict[str, str],
        fresh: bool,
        fds: Mapping[int, int] | None = None,
        name: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        One fork request on our link (L{ForkServerLink.fork}), answered within C{forkTimeout}:
        fires with the answer (a fork server that replaced itself first is logged); fails with
        L{ForkFailed} saying why.  Without an answer in time the link is dropped: whatever the
        fork server forks late finds nobody waiting for it, or a handoff in progress, and exits.
        """
        link = self.link
        if link is None or not link.connected:
            return fail(ForkFailed(self.unavailable or "there is no fork server"))
        d = link.fork(argv, cwd, env, fresh, fds=fds, name=name)
        d.addTimeout(self.forkTimeout, self.reactor)

        def answered(answer: dict[str, Any]) -> dict[str, Any]:
            self._noteRefreshed(answer)
            return answer

        def failed(failure: Failure) -> Any:
            if failure.check(ForkFailed) is None:
                if link.transport is not None:
                    link.transport.loseConnection()
                raise ForkFailed(f"it did not answer within {self.forkTimeout:g} s")
            return failure

        return d.addCallbacks(answered, failed)

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
        d = self._request(command, cwd or os.getcwd(), dict(os.environ), fresh)

        def forked(answer: dict[str, Any]) -> Any:
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
            return self._full(command, cwd, fallback, f"the fork server did not fork: {reason}")

        return d.addCallbacks(forked, failed)

    def _noteRefreshed(self, answer: dict[str, Any]) -> None:
        if answer.get("refreshed"):
            self.log.info(
                "fork server pid {pid} replaced itself with a fresh one before forking: {reason}",
                pid=self.serverPid,
                reason=answer["refreshed"],
            )

    def _full(
        self,
        command: Sequence[str],
        cwd: str | None,
        fallback: Callable[[Sequence[str], str | None], Any],
        reason: str,
    ) -> Any:
        self.log.warn("restart: starting the successor in full: {reason}", reason=reason)
        return fallback(command, cwd)
