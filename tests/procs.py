"""
Real processes for tests: start ``twistd graceful`` servers, wait on what they log, put bounded
load on them, and reap everything afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CTL = str(BIN / "graceful-ctl")


def freePort(host: str = "127.0.0.1") -> int:
    """
    A TCP port that nothing listens on right now.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Server:
    """
    One ``twistd -n graceful`` process, logging to its own file.
    """

    def __init__(self, directory: Path, args: list[str], name: str, pidfile: str = "app.pid"):
        self.directory = directory
        self.args = args
        self.name = name
        self.log = directory / f"{name}.log"
        self.pidfile = pidfile
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [TWISTD, "-n", "--pidfile", self.pidfile, "graceful", *self.args]

    def start(self, extraEnv: dict[str, str] | None = None) -> Server:
        env = dict(os.environ)
        env.update(extraEnv or {})
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def waitFor(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """
        Wait until the log matches C{pattern}; fail with the log when the process exits or the
        time runs out first.
        """
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                match = regex.search(self.text())
                if match:
                    return match
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}) before logging "
                    f"{pattern!r}:\n{self.text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r}:\n{self.text()[-4000:]}")
            time.sleep(0.02)

    def waitServing(self, timeout: float = 20.0) -> None:
        self.waitFor(r"generation \d+ \(pid \d+\) serving on", timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """
        Wait for the process to exit by itself; its exit code.
        """
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s:\n{self.text()[-4000:]}"
            ) from None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def fdCount(self) -> int:
        """
        How many descriptors the process holds, not counting accepted TCP connections (which
        come and go with the load): what must stay flat across handoffs.
        """
        connections = _tcpConnectionInodes(self.pid)
        count = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in connections:
                continue
            count += 1
        return count


def childProcesses(parent: int) -> list[tuple[int, str]]:
    """
    The (pid, state) of every process whose parent is C{parent} (state C{Z}: a zombie).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append((int(entry), fields[0]))
    return found


def _tcpConnectionInodes(pid: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] != "0A":  # not LISTEN
                        inodes.add(fields[9])
        except OSError:
            pass
    return inodes


class FakeSuccessor(Server):
    """
    L{tests.fake_successor}: the real control protocol, stopping at a chosen step.
    """

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.fake_successor", *self.args]

    def start(self, extraEnv: dict[str, str] | None = None) -> Server:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH", "")
        return super().start({"PYTHONPATH": root + (os.pathsep + path if path else "")})


class Processes:
    """
    Every server a test starts; all killed and reaped at the end of the test.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []
        self._before = {pid for pid, _ in childProcesses(os.getpid())}

    def server(self, args: list[str], name: str | None = None, pidfile: str = "app.pid") -> Server:
        server = Server(self.directory, args, name or f"server{len(self.servers) + 1}", pidfile)
        self.servers.append(server)
        return server

    def fakeSuccessor(self, controlPath: str, step: str) -> Server:
        fake = FakeSuccessor(self.directory, [controlPath, step], f"fake{len(self.servers) + 1}")
        self.servers.append(fake)
        return fake.start()

    def cleanup(self) -> None:
        # The fork servers our servers started (graceful_plugin.forkserver), found while their
        # servers still live (or handed to us, when the test process is a child subreaper):
        # killed and reaped after them.
        tracked = [s.pid for s in self.servers if getattr(s, "process", True) is not None]
        forkServers = forkServersOf([*tracked, os.getpid()])
        # The successors they forked, tracked or not (a test that failed early may not have
        # tracked its successor).
        forked = {child for pid in forkServers for child, _ in childProcesses(pid)}
        for server in self.servers:
            server.kill()
        for pid in sorted(forked) + sorted(forkServers):
            killAndReap(pid)
        # Whatever exited during the test after being handed to us (a fork server that went
        # away with its last generation): reaped, so that no zombie is left behind.
        for pid, state in childProcesses(os.getpid()):
            if state == "Z" and pid not in self._before:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def isForkServer(pid: int) -> bool:
    """
    Whether C{pid} runs graceful's fork server (and not a successor it forked).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return False
    return b"graceful_plugin.forkserver" in argv and comm not in ("twistd", "graceful-worker")


def forkedWorkers(text: str) -> list[int]:
    """
    The live workers forked by the fork server that a leader's log C{text} names.
    """
    found = []
    for match in re.finditer(r"worker \d+ \(pid (\d+)\) forked by the fork server pid (\d+)", text):
        pid, server = int(match[1]), int(match[2])
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == server and pid not in found:
            found.append(pid)
    return found


def parentOf(pid: int) -> int:
    """
    The parent pid of C{pid} (0 when it is gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def forkServersOf(pids: list[int]) -> set[int]:
    """
    The fork servers among the children and parents of C{pids}.
    """
    found = set()
    for pid in pids:
        for child, _ in childProcesses(pid):
            if isForkServer(child):
                found.add(child)
        parent = parentOf(pid)
        if parent and isForkServer(parent):
            found.add(parent)
    return found


def killAndReap(pid: int, timeout: float = 10.0) -> None:
    """
    SIGKILL C{pid}, and reap it if it is our child (else wait until it is gone), bounded.
    """
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            # Not our child: done once it is dead (its parent reaps it, or not: not ours to do).
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        return
            except OSError:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still there {timeout} s after SIGKILL")
        time.sleep(0.02)


def ctl(directory: Path, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """
    Run ``graceful-ctl`` in C{directory}.
    """
    return subprocess.run(
        [CTL, *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def waitForStatus(
    directory: Path,
    predicate: Callable[[dict[str, Any]], bool],
    what: str,
    control: str = "c.sock",
    timeout: float = 30,
) -> dict[str, Any]:
    """
    Poll ``graceful-ctl status --json`` (bounded) until C{predicate} holds for it.

    @return: the status that satisfied C{predicate}.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = ctl(directory, "--control", control, "status", "--json")
        if result.returncode == 0:
            status: dict[str, Any] = json.loads(result.stdout)
            if predicate(status):
                return status
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}: {result.stdout}{result.stderr}")
        time.sleep(0.05)


def liveSessions(status: dict[str, Any]) -> int:
    """
    The serving generation's live sessions in a status.
    """
    return sum(item["sessions"] for item in status["listeners"])


def waitForSessions(
    directory: Path, count: int, control: str = "c.sock", timeout: float = 30
) -> None:
    """
    Wait until the serving generation reports C{count} live sessions and nothing draining.
    """
    waitForStatus(
        directory,
        lambda status: liveSessions(status) == count and not status["draining"],
        f"{count} live sessions and nothing draining",
        control,
        timeout,
    )


def httpGet(
    host: str, port: int, path: str, timeout: float = 20.0, readDelay: float = 0.0
) -> tuple[int, bytes]:
    """
    One request on a fresh connection, read to the end.

    @return: the status code and the body.
    @raise OSError: refused, reset, timed out.
    @raise ShortResponse: the body ended before its Content-Length.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            if readDelay:
                time.sleep(readDelay)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ShortResponse(f"no complete header in {len(raw)} bytes")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is not None and len(body) != length:
        raise ShortResponse(f"body of {len(body)} bytes, expected {length}")
    return status, body


class ShortResponse(Exception):
    """
    A response ended before its announced length.
    """


def classify(error: BaseException) -> str:
    if isinstance(error, ShortResponse):
        return "short"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, socket.timeout | TimeoutError):
        return "timeout"
    if isinstance(error, OSError) and error.errno == errno.EPIPE:
        return "reset"
    return type(error).__name__


@dataclass
class LoadResult:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    downloads: int = 0
    examples: list[str] = field(default_factory=list)


class Load:
    """
    Bounded load: C{clients} threads each making requests on fresh connections, plus
    C{downloaders} threads reading C{downloadSize}-byte bodies slowly so that they are in flight
    across handoffs.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        clients: int = 16,
        size: int = 1024,
        downloaders: int = 4,
        downloadSize: int = 8 * 1024 * 1024,
        downloadDelay: float = 0.002,
        maxSeconds: float = 240.0,
    ) -> None:
        self.port = port
        self.host = host
        self.clients = clients
        self.size = size
        self.downloaders = downloaders
        self.downloadSize = downloadSize
        self.downloadDelay = downloadDelay
        self.maxSeconds = maxSeconds
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._active = 0
        self._threads: list[threading.Thread] = []

    def _begin(self) -> bool:
        """
        Wait while paused; count one request in flight (the caller ends it with L{_end}, also
        when this returns false).  False when the load is stopping.
        """
        while not self._running.wait(0.05) and not self._stop.is_set():
            pass
        with self._lock:
            self._active += 1
        return not self._stop.is_set()

    def _end(self) -> None:
        with self._lock:
            self._active -= 1

    def pause(self, timeout: float = 120.0) -> None:
        """
        Start no new request, and wait until those in flight are done.
        """
        self._running.clear()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._active == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError("requests still in flight after pausing the load")
            time.sleep(0.01)

    def resume(self) -> None:
        self._running.set()

    def _record(self, error: BaseException | None, download: bool = False) -> None:
        with self._lock:
            if error is None:
                self.result.ok += 1
                if download:
                    self.result.downloads += 1
            else:
                kind = classify(error)
                self.result.errors[kind] += 1
                if len(self.result.examples) < 10:
                    self.result.examples.append(f"{kind}: {error!r}")

    def _client(self) -> None:
        deadline = time.monotonic() + self.maxSeconds
        while self._begin() and time.monotonic() < deadline:
            try:
                status, body = httpGet(self.host, self.port, f"/bytes/{self.size}")
                if status != 200 or len(body) != self.size:
                    raise ShortResponse(f"status {status}, {len(body)} bytes")
                self._record(None)
            except Exception as e:
                self._record(e)
            finally:
                self._end()
        self._end()

    def _downloader(self) -> None:
        deadline = time.monotonic() + self.maxSeconds
        while self._begin() and time.monotonic() < deadline:
            try:
                status, body = httpGet(
                    self.host,
                    self.port,
                    f"/bytes/{self.downloadSize}",
                    readDelay=self.downloadDelay,
                    timeout=60,
                )
                if status != 200 or len(body) != self.downloadSize:
                    raise ShortResponse(f"status {status}, {len(body)} bytes")
                self._record(None, download=True)
            except Exception as e:
                self._record(e)
            finally:
                self._end()
        self._end()

    def start(self) -> Load:
        for _ in range(self.clients):
            self._threads.append(threading.Thread(target=self._client, daemon=True))
        for _ in range(self.downloaders):
            self._threads.append(threading.Thread(target=self._downloader, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 120.0) -> LoadResult:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = sum(t.is_alive() for t in self._threads)
        if alive:
            raise AssertionError(f"{alive} load threads did not finish within {timeout} s")
        return self.result
