"""
The server under systemd's protocols, for real: ``sd_notify`` datagrams to a Unix datagram
socket standing in for systemd's (with each sender's pid, as systemd sees it), socket activation
under ``systemd-socket-activate``, and JSON-lines logs through a handoff.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operate import becomeSubreaper, track, waitForPid, waitForText
from tests.procs import TWISTD, Processes, Server, ctl, freePort, httpGet

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


class Command(Server):
    """
    A server process started with exactly the command line given.
    """

    def __init__(self, directory: Path, argv: list[str], name: str) -> None:
        super().__init__(directory, [], name)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv


class NotifySocket:
    """
    A datagram socket in place of systemd's notification socket, receiving each message with
    the pid of the process that sent it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.received: list[tuple[int, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> tuple[int, dict[str, str]]:
        self.sock.settimeout(timeout)
        size = socket.CMSG_SPACE(struct.calcsize("3i"))
        data, ancillary, _, _ = self.sock.recvmsg(4096, size)
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append((pid, fields))
        return pid, fields

    def waitFor(self, key: str, timeout: float = 30.0) -> tuple[int, dict[str, str]]:
        """
        The next message that sets C{key}, skipping others (such as C{STATUS=} updates).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}= within {timeout} s: {self.received}")
            try:
                pid, fields = self._receive(left)
            except TimeoutError:
                continue
            if key in fields:
                return pid, fields


@pytest.fixture
def notify(workdir: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(workdir / "notify.sock")
    try:
        yield receiver
    finally:
        receiver.close()


def _portArgs(port: int, *extra: str) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock", *extra]


def test_notifySequenceAcrossARestart(
    procs: Processes, workdir: Path, notify: NotifySocket
) -> None:
    """
    The first generation says READY=1 once serving; on ``graceful-ctl restart`` it says
    RELOADING=1 with MONOTONIC_USEC, then MAINPID=<the successor's pid> with READY=1 (both from
    the predecessor, before it exits); a graceful stop of the successor says STOPPING=1.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start({"NOTIFY_SOCKET": str(notify.path)})
    sender, ready = notify.waitFor("READY")
    assert sender == first.pid
    assert ready["STATUS"].startswith(f"generation 1 (pid {first.pid}) serving")
    assert httpGet("127.0.0.1", port, "/")[0] == 200
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    successor = waitForPid(workdir / "app.pid", first.pid)
    track(procs, successor)
    sender, reloading = notify.waitFor("RELOADING")
    assert sender == first.pid
    assert reloading["RELOADING"] == "1"
    assert 0 < int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    sender, switched = notify.waitFor("MAINPID")
    assert sender == first.pid
    assert switched["MAINPID"] == str(successor)
    assert switched["READY"] == "1"
    assert first.wait(30) == 0
    os.kill(successor, 15)
    sender, stopping = notify.waitFor("STOPPING")
    assert sender == successor
    assert stopping["STOPPING"] == "1"
    keys = [next(iter(k for k in fields if k != "STATUS"), "STATUS") for _, fields in
            notify.received]  # fmt: skip
    assert [k for k in keys if k != "STATUS"] == ["READY", "RELOADING", "MAINPID", "STOPPING"]


def test_notifyReadyAgainOnRollback(procs: Processes, workdir: Path, notify: NotifySocket) -> None:
    """
    A handoff rolled back (a successor that never commits) is followed by READY=1 from the
    process that serves on, and no MAINPID=.
    """
    port = freePort()
    command = f"env PYTHONPATH={REPO} {sys.executable} -m tests.fake_successor c.sock hello"
    args = _portArgs(port, "--handoff-timeout", "1", "--restart-command", command)
    first = procs.server(args, "gen1").start({"NOTIFY_SOCKET": str(notify.path)})
    notify.waitFor("READY")
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    fake = waitForText(first.log, r"restart: started successor pid (\d+)")
    track(procs, int(fake.group(1)))
    assert result.returncode == 1
    assert notify.waitFor("RELOADING")[0] == first.pid
    sender, ready = notify.waitFor("READY")
    assert sender == first.pid
    assert "MAINPID" not in ready
    assert "rolled back" in ready["STATUS"]
    assert all("MAINPID" not in fields for _, fields in notify.received)


def _socketActivate() -> str:
    binary = shutil.which("systemd-socket-activate")
    if binary is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package 'systemd')")
    return binary


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_socketActivationServesAndHandsOver(procs: Processes, workdir: Path, named: bool) -> None:
    """
    Under ``systemd-socket-activate``, the connection that starts the server is answered on
    the socket systemd passed (matched by its --port name, or taken as it comes without
    --port), and a restart hands that socket to a successor that serves it.
    """
    binary = _socketActivate()
    port = freePort()
    graceful = ["--control", "c.sock"]
    activate = [binary, "-l", f"127.0.0.1:{port}", "-E", "PYTHONUNBUFFERED=1"]
    if named:
        activate.append("--fdname=web")
        graceful += ["--port", f"web=tcp:{port}:interface=127.0.0.1"]
    argv = [*activate, TWISTD, "-n", "--pidfile", "app.pid", "graceful", *graceful]
    server = Command(workdir, argv, "activated")
    procs.servers.append(server)
    server.start()
    server.waitFor(r"as 3\.")
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {server.pid}, generation 1".encode() in body
    name = "web" if named else f"tcp:127.0.0.1:{port}"
    assert f"socket activation: adopted {name} (127.0.0.1:{port}) from fd 3" in server.text()
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    successor = waitForPid(workdir / "app.pid", server.pid)
    track(procs, successor)
    assert server.wait(30) == 0
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {successor}, generation 2".encode() in body


def test_jsonLogsThroughARestart(procs: Processes, workdir: Path) -> None:
    """
    With ``twistd --logger graceful_plugin.jsonlog.stdoutObserver``, both generations write
    only JSON lines, and the successor's takeover event carries the handoff duration and the
    pids as fields.
    """
    port = freePort()
    argv = [TWISTD, "-n", "--pidfile", "app.pid", "--logger",
            "graceful_plugin.jsonlog.stdoutObserver", "graceful", *_portArgs(port)]  # fmt: skip
    first = Command(workdir, argv, "gen1")
    procs.servers.append(first)
    first.start()
    first.waitFor(r'"generation": 1')
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    successor = waitForPid(workdir / "app.pid", first.pid)
    track(procs, successor)
    waitForText(first.log, r"took over from pid")
    events = [json.loads(line) for line in first.text().splitlines() if line.strip()]
    tookOver = [e for e in events if e.get("log_format", "").startswith("took over from pid")]
    assert len(tookOver) == 1
    event = tookOver[0]
    assert event["pid"] == first.pid
    assert event["generation"] == 2
    assert isinstance(event["ms"], float) and event["ms"] > 0
    assert "handoff" in event["text"]
    committed = [
        e for e in events if e.get("log_format", "").startswith("handoff to pid {pid} confirmed")
    ]
    assert committed and committed[0]["pid"] == successor and committed[0]["generation"] == 1
