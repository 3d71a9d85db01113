"""
The fork server: a process that has imported the interpreter's, Twisted's and graceful's modules
once, so that a successor is a fork of it instead of a whole new interpreter.

It is started by a generation (L{graceful_plugin.forkclient}) with C{reactor.spawnProcess} of
C{python -m graceful_plugin.forkserver}: it holds no listening socket of the server, never
imports or runs a reactor, and never imports the application.  A generation connects to it (a
Unix socket in the abstract namespace, named after the control socket and the uid) and keeps the
connection for as long as it lives; the fork server exits when no generation is connected and no
child of its runs.

On a L{fork request<ForkServer._fork>} (the command's argv, cwd and environment, with the
descriptors it gets passed along with C{SCM_RIGHTS}: its stdin, stdout and stderr, or any others
at the numbers the request's C{targets} name, as a worker gets its link and listeners; one
request at a time on a connection) it first checks that what it imported
is still what is on disk: the size and mtime of every loaded module's file and of the
interpreter, and the C{PYTHON*} variables of the request.  When anything differs, or a fresh one
was asked for, it replaces itself (C{exec} of itself, keeping its pid, its children and its
connections) and then forks.  The child starts a session of its own, takes the stdio it was
given, and runs the command's script (twistd) as the interpreter would: it imports the
application from disk, installs its reactor and takes over.  The fork server reaps its children
and tells the connection that asked for one how it exited.

Standard library only at import time: L{main} does the preloading.
"""

from __future__ import annotations

import array
import atexit
import fcntl
import hashlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graceful_plugin import spare as spares
from graceful_plugin.dirwatch import DirectoryWatch

#: The environment variable that gives a generation (and its successors) the fork server's
#: address; without it, the address derives from the control socket (L{addressFor}).
ENV_ADDRESS = "GRACEFUL_FORKSERVER"

#: Seconds a new fork server waits for its first connection before it gives up.
FIRST_CONNECTION_TIMEOUT = 60.0

#: The largest message (a fork request holds a whole environment).
MAX_MESSAGE = 4 * 1024 * 1024

_HEADER = struct.Struct("!I")

#: The most descriptors one C{sendmsg} may carry on Linux (C{SCM_MAX_FD}).
SCM_MAX_FD = 253

#: The descriptors a fork request passes when it names no C{targets}: stdin, stdout, stderr.
STDIO = (0, 1, 2)

#: What the fork server imports once, for every successor (the application is never one).
PRELOAD = (
    "twisted.scripts.twistd",
    "twisted.scripts._twistd_unix",
    "twisted.application.app",
    "twisted.application.reactors",
    "twisted.internet.default",
    "twisted.internet.epollreactor",
    "twisted.internet.posixbase",
    "twisted.internet.tcp",
    "twisted.internet.unix",
    "twisted.internet.udp",
    "twisted.internet.process",
    "twisted.internet.endpoints",
    "twisted.internet.threads",
    "twisted.python.threadpool",
    "twisted.logger",
    "twisted.protocols.amp",
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.web.static",
    "twisted.web.wsgi",
    "twisted.web.http",
    "graceful_plugin.tap",
    "graceful_plugin.server",
    "graceful_plugin.takeover",
    "graceful_plugin.restart",
    "graceful_plugin.forkclient",
    "graceful_plugin.web",
    "graceful_plugin.apps",
    "graceful_plugin.jsonlog",
    "graceful_plugin.lifecycle",
    "graceful_plugin.websocket",
    "graceful_plugin.workerspawn",
    "pkgutil",
)

#: Imported when they can be (an optional dependency may be missing).
PRELOAD_OPTIONAL = ("twisted.internet.ssl", "twisted.web._http2")


def addressFor(controlPath: str, uid: int | None = None) -> str:
    """
    The fork server's address for the server whose control socket is C{controlPath}: a name in
    the abstract namespace (C{@...}), so no file is left behind and no path is too long.
    """
    uid = os.getuid() if uid is None else uid
    digest = hashlib.sha256(f"{uid}\0{os.path.realpath(controlPath)}".encode()).hexdigest()
    return f"@graceful-fork-{uid}-{digest[:32]}"


def sockaddr(address: str) -> str:
    """
    The address as the socket module takes it (C{@name}: abstract, C{\\0name}).
    """
    return "\0" + address[1:] if address.startswith("@") else address


def encode(message: dict[str, Any]) -> bytes:
    """
    One message on the wire: a 4-byte length, then JSON.
    """
    data = json.dumps(message).encode()
    return _HEADER.pack(len(data)) + data


def peerUid(sock: socket.socket) -> int:
    """
    The uid of the process at the other end of a Unix socket.
    """
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# -- what was imported, and whether it is still what is on disk ------------------------------


@dataclass
class Snapshot:
    """
    The files a fork server's code came from, with their size and mtime, the interpreter's, and
    the C{PYTHON*} variables it was started with.
    """

    files: dict[str, tuple[int, int]]
    pythonEnv: dict[str, str]
    #: A watch on the files' directories (L{graceful_plugin.dirwatch}): while nothing happened
    #: there, the files are not looked at again.  L{None}: they are, every time.
    watch: DirectoryWatch | None = None
    #: The last look at the files found a difference (it stays until we are replaced).
    stale: str | None = None
    #: Files in directories the watch could not watch: looked at every time.
    unwatched: list[str] = field(default_factory=list)

    @classmethod
    def take(cls, modules: Iterable[Any] | None = None, watch: bool = False) -> Snapshot:
        paths = [sys.executable]
        for module in list(sys.modules.values()) if modules is None else modules:
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                paths.append(path)
        # The watch begins before the files are looked at: a change after the look is seen.
        watching = (
            DirectoryWatch.of(os.path.dirname(os.path.abspath(p)) for p in paths) if watch else None
        )
        files: dict[str, tuple[int, int]] = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            files[path] = (st.st_size, st.st_mtime_ns)
        unwatched = (
            [p for p in files if os.path.dirname(os.path.abspath(p)) in watching.missed]
            if watching is not None
            else []
        )
        return cls(files, pythonVariables(os.environ), watching, unwatched=unwatched)

    def changed(self, env: dict[str, str] | None = None) -> str | None:
        """
        Why the code on disk is not what was imported (the first difference), or L{None}.
        """
        if self.stale is None:
            if self.watch is None or self.watch.happened():
                self.stale = self._differs(self.files)
            elif self.unwatched:
                self.stale = self._differs(self.unwatched)
        if self.stale is not None:
            return self.stale
        if env is not None and pythonVariables(env) != self.pythonEnv:
            return "the successor's PYTHON* environment differs"
        return None

    def _differs(self, paths: Iterable[str]) -> str | None:
        for path in paths:
            size, mtime = self.files[path]
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is gone"
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                return f"{path} changed on disk"
        return None


def pythonVariables(env: Mapping[str, str]) -> dict[str, str]:
    """
    The environment variables that change what the interpreter imports.
    """
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


# -- what a successor's command means ---------------------------------------------------------


class NotForkable(Exception):
    """
    The command cannot be run as a fork of this process (it must be started in full).
    """


def program(argv: Sequence[str], executable: str | None = None) -> tuple[str, str, list[str]]:
    """
    What the interpreter would run for C{argv}: C{("script", path, args)} or C{("module", name,
    args)}.

    @raise NotForkable: with the reason, when C{argv} is not this interpreter running a script
        or a module with no interpreter options (or a script whose C{#!} names it).
    """
    executable = executable or sys.executable
    argv = list(argv)
    if not argv:
        raise NotForkable("the command is empty")
    if not sameInterpreter(argv[0], executable):
        interpreter = _shebang(argv[0])
        if interpreter is None or not sameInterpreter(interpreter, executable):
            raise NotForkable(
                f"the command runs {argv[0]}, not this fork server's interpreter {executable}"
            )
        argv = [executable, *argv]
    if len(argv) < 2:
        raise NotForkable("the command runs the interpreter without a script")
    if argv[1] == "-m" and len(argv) > 2:
        return "module", argv[2], argv[3:]
    if argv[1].startswith("-"):
        raise NotForkable(f"the command gives the interpreter the option {argv[1]}")
    return "script", argv[1], argv[2:]


def sameInterpreter(path: str, executable: str) -> bool:
    """
    Whether C{path} runs the interpreter C{executable} is, with the same prefix: the same
    binary in the same directory (C{python} and C{python3} of one virtualenv are; the same
    binary linked from two virtualenvs is not).
    """
    if os.path.dirname(os.path.abspath(path)) != os.path.dirname(os.path.abspath(executable)):
        return False
    return os.path.realpath(path) == os.path.realpath(executable)


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if len(words) == 1 else None


# -- the server -------------------------------------------------------------------------------


def _log(message: str) -> None:
    sys.stderr.write(f"graceful fork server (pid {os.getpid()}): {message}\n")
    sys.stderr.flush()


@dataclass
class _Connection:
    sock: socket.socket
    buffer: bytes = b""
    #: The descriptors passed since the last request: the next request's.
    fds: list[int] = field(default_factory=list)
    #: Some passed descriptors were lost (more in one message than we take): the next request
    #: cannot be served as asked.
    truncated: bool = False


class BadTargets(Exception):
    """
    A fork request's C{targets} do not fit the descriptors passed with it.
    """


def targetsOf(request: Mapping[str, Any], passed: int, limit: int | None = None) -> list[int]:
    """
    Where the child gets each descriptor passed with C{request}, in the order they were passed:
    the request's C{targets} (distinct numbers, 0, 1 and 2 among them, below the descriptor
    limit), or stdin, stdout and stderr when it names none (what every request was before).

    @raise BadTargets: with a sentence, when they do not fit the C{passed} descriptors.
    """
    targets = request.get("targets")
    if targets is None:
        targets = list(STDIO)
    elif not isinstance(targets, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in targets
    ):
        raise BadTargets("the targets are not a list of descriptor numbers")
    limit = _maxFd() if limit is None else limit
    if len(targets) != passed:
        raise BadTargets(f"{passed} descriptors were passed for {len(targets)} targets")
    if len(set(targets)) != len(targets):
        raise BadTargets("the targets name a descriptor twice")
    if any(t < 0 or t >= limit for t in targets):
        raise BadTargets(f"a target is not a descriptor number from 0 to {limit - 1}")
    if not set(STDIO) <= set(targets):
        raise BadTargets("the targets do not include stdin, stdout and stderr (0, 1, 2)")
    return list(targets)


def placeDescriptors(fds: Sequence[int], targets: Sequence[int]) -> None:
    """
    In a child: make each of C{fds} descriptor number C{targets[i]} (inheritable), then close
    every other descriptor.  Each is first moved above every target, so that a passed descriptor
    whose number is another's target is not overwritten before it has been placed.
    """
    top = max(targets) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in fds]
    for target, fd in zip(targets, moved, strict=True):
        os.dup2(fd, target)
    closeAllBut(targets)


def closeAllBut(keep: Iterable[int]) -> None:
    """
    Close every descriptor of this process but C{keep}.
    """
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _maxFd())


class ForkServer:
    """
    The fork server's loop: accept generations, fork successors for them, reap, report.
    """

    def __init__(self, listener: socket.socket, snapshot: Snapshot) -> None:
        self.listener = listener
        self.snapshot = snapshot
        self.connections: dict[int, _Connection] = {}
        #: Our children, each with the connection that asked for it (None once it has gone).
        self.children: dict[int, int | None] = {}
        self.selector = selectors.PollSelector()
        self._wakeR, self._wakeW = os.pipe()
        os.set_blocking(self._wakeR, False)
        os.set_blocking(self._wakeW, False)
        self.everConnected = False
        self.startedAt = time.monotonic()
        #: The child forked ahead for the next request (L{graceful_plugin.spare}), and when the
        #: next one is due (None: none is, or spares are off).
        self.spare: spares.Spare | None = None
        self.spareAt: float | None = self.startedAt if spares.enabled() else None

    # state carried across a re-exec

    def state(self, pending: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "listener": self.listener.fileno(),
            "connections": list(self.connections),
            "children": {str(pid): conn for pid, conn in self.children.items()},
            "pending": pending,
        }

    @classmethod
    def fromState(cls, state: dict[str, Any], snapshot: Snapshot) -> ForkServer:
        listener = socket.socket(fileno=state["listener"])
        server = cls(listener, snapshot)
        server.everConnected = True
        for fd in state["connections"]:
            server.connections[fd] = _Connection(socket.socket(fileno=fd))
        server.children = {int(pid): conn for pid, conn in state["children"].items()}
        return server

    # the loop

    def serve(self, pending: dict[str, Any] | None = None) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wakeW)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self._wakeR, selectors.EVENT_READ)
        for conn in self.connections.values():
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ)
        self._reap()
        if pending is not None:
            request, fds = pending["request"], pending["fds"]
            try:
                # (An older fork server took the request: it may not have taken its targets.)
                request["targets"] = targetsOf(request, len(fds))
            except BadTargets as e:
                for passed in fds:
                    os.close(passed)
                answer = {"op": "error", "id": request.get("id"), "reason": str(e)}
                self._send(pending["connection"], answer)
            else:
                self._fork(pending["connection"], request, fds, pending["why"])
        try:
            return self._loop()
        finally:
            self._discardSpare()

    def _loop(self) -> int:
        while True:
            now = time.monotonic()
            if not self.connections and not self.children:
                if self.everConnected:
                    return 0
                if now - self.startedAt > FIRST_CONNECTION_TIMEOUT:
                    _log("nobody connected: exiting")
                    return 0
            if self.spareAt is not None and self.spare is None and now >= self.spareAt:
                self._forkSpare()
            timeout = 1.0
            if self.spareAt is not None and self.spare is None:
                timeout = max(0.0, min(timeout, self.spareAt - now))
            for key, _ in self.selector.select(timeout=timeout):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self._wakeR:
                    try:
                        os.read(self._wakeR, 512)
                    except BlockingIOError:
                        pass
                else:
                    assert isinstance(key.fileobj, socket.socket)
                    self._readable(key.fileobj.fileno())
            self._reap()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if peerUid(sock) not in (os.getuid(), 0):
            sock.close()
            return
        sock.setblocking(False)
        self.connections[sock.fileno()] = _Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ)
        self.everConnected = True

    def _drop(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is None:
            return
        self.selector.unregister(conn.sock)
        for passed in conn.fds:
            os.close(passed)
        conn.sock.close()
        for pid, owner in self.children.items():
            if owner == fd:
                self.children[pid] = None

    def _readable(self, fd: int) -> None:
        conn = self.connections[fd]
        try:
            data, ancdata, flags, _ = conn.sock.recvmsg(65536, socket.CMSG_SPACE(SCM_MAX_FD * 4))
        except BlockingIOError:
            return
        except OSError:
            data, ancdata, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC:
            conn.truncated = True
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                conn.fds.extend(fds)
        if not data:
            self._drop(fd)
            return
        conn.buffer += data
        while len(conn.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(conn.buffer)
            if size > MAX_MESSAGE:
                self._drop(fd)
                return
            if len(conn.buffer) < _HEADER.size + size:
                break
            body = conn.buffer[_HEADER.size : _HEADER.size + size]
            conn.buffer = conn.buffer[_HEADER.size + size :]
            try:
                request = json.loads(body)
            except ValueError:
                self._drop(fd)
                return
            self._request(fd, request)
            if fd not in self.connections:
                return

    def _send(self, fd: int | None, message: dict[str, Any]) -> None:
        conn = self.connections.get(fd) if fd is not None else None
        if conn is None:
            return
        try:
            conn.sock.setblocking(True)
            conn.sock.sendall(encode(message))
            conn.sock.setblocking(False)
        except OSError:
            self._drop(conn.sock.fileno())

    def _request(self, fd: int, request: dict[str, Any]) -> None:
        conn = self.connections[fd]
        if request.get("op") != "fork":
            self._send(fd, {"op": "error", "id": request.get("id"), "reason": "unknown request"})
            return
        # One request at a time on a connection: what was passed since the last one is its.
        fds, conn.fds = conn.fds, []
        truncated, conn.truncated = conn.truncated, False
        try:
            if truncated:
                raise BadTargets(f"more than {SCM_MAX_FD} descriptors came in one message")
            request["targets"] = targetsOf(request, len(fds))
        except BadTargets as e:
            for passed in fds:
                os.close(passed)
            self._send(fd, {"op": "error", "id": request.get("id"), "reason": str(e)})
            return
        why = "a fresh fork server was asked for" if request.get("fresh") else None
        why = why or self.snapshot.changed(request.get("env") or {})
        if why is not None:
            self._refresh(fd, request, fds, why)  # does not return unless the exec failed
        self._fork(fd, request, fds, None)

    def _refresh(self, fd: int, request: dict[str, Any], fds: list[int], why: str) -> None:
        """
        Replace ourselves with a fresh fork server (same pid, children and connections), which
        then serves C{request}.
        """
        _log(f"replacing itself with a fresh fork server before forking: {why}")
        state = self.state({"connection": fd, "request": request, "fds": fds, "why": why})
        memfd = os.memfd_create("graceful-forkserver-state", 0)
        os.write(memfd, json.dumps(state).encode())
        keep = [memfd, self.listener.fileno(), *self.connections, *fds]
        for conn in self.connections.values():
            keep.extend(conn.fds)
        for keepFd in keep:
            os.set_inheritable(keepFd, True)
        env = dict(os.environ)
        for name in pythonVariables(env):
            del env[name]
        env.update(pythonVariables(request.get("env") or {}))
        signal.set_wakeup_fd(-1)
        self._discardSpare()
        argv = [sys.executable, *interpreterOptions(), "-m", __name__, "--state-fd", str(memfd)]
        try:
            os.execve(sys.executable, argv, env)
        except OSError as e:
            _log(f"cannot replace itself ({e}): forking as it is")
            signal.set_wakeup_fd(self._wakeW)
            os.close(memfd)

    def _fork(self, fd: int, request: dict[str, Any], fds: list[int], why: str | None) -> None:
        try:
            kind, target, args = program(request["argv"])
        except NotForkable as e:
            for passed in fds:
                os.close(passed)
            self._send(fd, {"op": "error", "id": request.get("id"), "reason": str(e)})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if self._useSpare(fd, request, fds, kind, target, args, why):
            return
        # The child waits on this pipe until its pid has been sent, so that the generation
        # hears of the fork before it hears from the successor.
        goR, goW = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(goW)
            os.read(goR, 1)
            os.close(goR)
            self._child(request, fds, kind, target, args)
        os.close(goR)
        for passed in fds:
            os.close(passed)
        self.children[pid] = fd
        self._send(fd, {"op": "forked", "id": request.get("id"), "pid": pid, "refreshed": why})
        os.write(goW, b"x")
        os.close(goW)
        self._spareLater()

    # the spare

    def _useSpare(
        self,
        fd: int,
        request: dict[str, Any],
        fds: list[int],
        kind: str,
        target: str,
        args: list[str],
        why: str | None,
    ) -> bool:
        """
        Run the request in the spare, if there is one and it takes it (it waits for C{go} until
        the generation has been told its pid, as a fresh fork waits on its pipe).
        """
        ready, self.spare = self.spare, None
        if ready is None:
            return False
        work = {"request": request, "kind": kind, "target": target, "args": args}
        if not ready.hand(work, fds):
            ready.discard()
            return False
        for passed in fds:
            os.close(passed)
        self.children[ready.pid] = fd
        ahead = round(time.monotonic() - ready.forkedAt, 1)
        self._send(
            fd,
            {
                "op": "forked",
                "id": request.get("id"),
                "pid": ready.pid,
                "refreshed": why,
                "ahead": ahead,
            },
        )
        ready.go()
        self._spareLater()
        return True

    def _spareLater(self) -> None:
        if spares.enabled():
            self.spareAt = time.monotonic() + spares.SPARE_DELAY

    def _forkSpare(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.spare = spares.fork(self._spareChild)

    def _discardSpare(self) -> None:
        ready, self.spare = self.spare, None
        if ready is not None:
            ready.discard()

    def _spareChild(self, sock: socket.socket) -> None:
        spares.reset()
        _setProcessName(spares.NAME)
        for conn in self.connections.values():
            conn.sock.detach()
        self.listener.detach()
        closeAllBut((0, 1, 2, sock.fileno()))
        if spares.enabled(name=spares.ENV_PREFAULT):
            spares.prefault(stop=spares.readable(sock))
        work, fds = spares.waitForWork(sock)
        self._child(work["request"], fds, work["kind"], work["target"], work["args"])

    def _reap(self) -> None:
        while self.children or self.spare is not None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare.pid:
                # The spare died before it was used (killed by hand?): another one later.
                self.spare.sock.close()
                self.spare = None
                self._spareLater()
                continue
            owner = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            self._send(owner, {"op": "exited", "pid": pid, "status": code})

    # the child

    def _child(
        self, request: dict[str, Any], fds: list[int], kind: str, target: str, args: list[str]
    ) -> None:
        code = 1
        try:
            os.setsid()
            for signum in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR2):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(-1)
            # Forget our sockets without closing them twice, then take the descriptors we were
            # given at their numbers and close every other one.
            for conn in self.connections.values():
                conn.sock.detach()
            self.listener.detach()
            placeDescriptors(fds, request.get("targets") or STDIO)
            os.chdir(request.get("cwd") or "/")
            os.environ.clear()
            os.environ.update(request.get("env") or {})
            sys.orig_argv = list(request["argv"])
            _setProcessName(request.get("name") or os.path.basename(target))
            if kind == "script":
                sys.argv = [target, *args]
                sys.path.insert(0, os.path.dirname(os.path.realpath(target)))
                runpy.run_path(target, run_name="__main__")
            else:
                sys.argv = [target, *args]
                sys.path.insert(0, os.getcwd())
                # (A module we preloaded, as the worker's: runpy warns that it runs it again as
                # __main__, which is what a full start does too.)
                warnings.filterwarnings(
                    "ignore", "'.*' found in sys.modules after import of package", RuntimeWarning
                )
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exitCode(e.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                atexit._run_exitfuncs()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)


def _setProcessName(name: str) -> None:
    """
    Name the process as its program (what C{ps -o comm}, C{pgrep} and C{top} show); its
    C{/proc/PID/cmdline} stays the fork server's.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _exitCode(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _maxFd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


def interpreterOptions() -> list[str]:
    """
    Our interpreter's own options (C{-P} and the like), to run a fresh fork server the same way.
    """
    options: list[str] = []
    for arg in sys.orig_argv[1:]:
        if arg == "-m" or not arg.startswith("-"):
            break
        options.append(arg)
    return options


def preload() -> None:
    """
    Import everything a successor needs but its application, and run twistd's plugin
    discovery, without installing a reactor.
    """
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    for maker in getPlugins(IServiceMaker):
        if getattr(maker, "tapname", None) == "graceful":
            maker.options  # noqa: B018 (imports graceful's tap module, as twistd does)
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("preloading installed a reactor")


def main(argv: Sequence[str] | None = None) -> int:
    """
    C{python -m graceful_plugin.forkserver --address ADDRESS [--ready-fd FD]}, or (a fresh
    fork server replacing an old one) C{--state-fd FD}.
    """
    from graceful_plugin.priority import lowerPriority

    lowerPriority()
    args = list(sys.argv[1:] if argv is None else argv)
    options = dict(zip(args[::2], args[1::2], strict=False))
    try:
        started = time.process_time()
        preload()
        import gc

        gc.collect()
        gc.freeze()
        snapshot = Snapshot.take(watch=True)
        cpu = (time.process_time() - started) * 1000
    except Exception:
        _log("cannot preload:\n" + traceback.format_exc())
        return 1
    if "--state-fd" in options:
        memfd = int(options["--state-fd"])
        with os.fdopen(memfd, "rb") as f:
            f.seek(0)
            state = json.loads(f.read())
        server = ForkServer.fromState(state, snapshot)
        _log(f"fresh: {len(snapshot.files)} files imported in {cpu:.0f} ms of CPU")
        return server.serve(state.get("pending"))
    address = options.get("--address")
    if not address:
        _log("usage: python -m graceful_plugin.forkserver --address ADDRESS [--ready-fd FD]")
        return 2
    ready = int(options["--ready-fd"]) if "--ready-fd" in options else None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(sockaddr(address))
    except OSError as e:
        # Another generation's fork server holds the address: that one serves.
        listener.close()
        _tellReady(ready, f"exists {e.strerror}")
        return 0
    listener.listen(64)
    _tellReady(ready, f"ready {len(snapshot.files)} {cpu:.0f}")
    return ForkServer(listener, snapshot).serve()


def _tellReady(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, line.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    # Run as the module graceful_plugin.forkserver, not as __main__: a child's runpy replaces
    # __main__ with its own script.
    from graceful_plugin import forkserver

    sys.exit(forkserver.main())
