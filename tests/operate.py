"""
Helpers for tests of operating a server: processes the server starts itself (its successors),
found by pid and reaped at the end of the test, and waiting on a log or a pidfile.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from tests.procs import Processes, ctl

_PR_SET_CHILD_SUBREAPER = 36


def becomeSubreaper() -> None:
    """
    Make this (the test) process the parent of orphaned descendants, so that a successor
    started by a server the test started can be reaped by the test once that server exits.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class Spawned:
    """
    A process the test did not start directly (a successor started by a server): killed by pid
    and reaped (or, if it is not our child, waited for until it is gone) when the test ends.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    return
            except ChildProcessError:
                if _gone(self.pid):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {self.pid} still there 10 s after SIGKILL")
            time.sleep(0.02)

    def alive(self) -> bool:
        try:
            if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                return False
        except ChildProcessError:
            pass
        return not _gone(self.pid)


def track(procs: Processes, pid: int) -> Spawned:
    """
    Have C{procs} kill and reap C{pid} at the end of the test.
    """
    spawned = Spawned(pid)
    procs.servers.append(spawned)  # type: ignore[arg-type]
    return spawned


def waitForText(path: Path, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    """
    Wait until the file at C{path} matches C{pattern} (whoever writes it), bounded.
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        match = regex.search(text)
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never matched {pattern!r}:\n{text[-4000:]}")
        time.sleep(0.02)


def waitForPid(path: Path, other: int, timeout: float = 30.0) -> int:
    """
    Wait until the pidfile at C{path} names a pid other than C{other}; that pid.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text.isdigit() and int(text) != other:
            return int(text)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still names {text or 'nothing'}")
        time.sleep(0.02)


def status(directory: Path, control: str = "c.sock") -> dict[str, object]:
    """
    The serving generation's status, from ``graceful-ctl status --json``.
    """
    result = ctl(directory, "--control", control, "status", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def openDownload(port: int, size: int = 1024 * 1024 * 1024) -> socket.socket:
    """
    A connection in the middle of a huge download that the test reads no further: a session
    that stays live until the server closes it (or the test does).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    return sock


def readToEnd(sock: socket.socket, limit: int) -> int:
    """
    Read until the server ends the connection; how many bytes came (bounded by C{limit}).
    """
    total = 0
    try:
        while total < limit:
            data = sock.recv(1024 * 1024)
            if not data:
                break
            total += len(data)
    except ConnectionResetError:
        pass
    return total


def waitForExit(pid: int, timeout: float = 30.0) -> None:
    """
    Wait until C{pid}, not necessarily our child, has exited.
    """
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} did not exit within {timeout} s")
        time.sleep(0.02)
