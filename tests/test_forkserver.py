"""
The fork server with real processes: successors forked from it take over, it replaces itself
when the code on disk changed (or when asked to), a dead one means a full start, and it goes
away with the last generation.  A successor started by hand runs idle until it connects.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graceful_plugin.priority import canRestorePriority
from tests.operate import becomeSubreaper, track, waitForPid, waitForText
from tests.procs import Processes, ctl, freePort, httpGet, parentOf

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


def _args(port: int) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]


def _forkServer(server: object, after: int = 0) -> int:
    """
    The pid of the fork server a generation logged it uses (the first one after C{after}
    characters of the log).
    """
    text = ""
    deadline = time.monotonic() + 30
    import re

    while time.monotonic() < deadline:
        text = server.text()  # type: ignore[attr-defined]
        match = re.search(r"fork server pid (\d+) at @", text[after:])
        if match:
            return int(match[1])
        time.sleep(0.02)
    raise AssertionError(f"no fork server was logged:\n{text[-3000:]}")


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if parentOf(pid) == 0:
                return True
        time.sleep(0.02)
    return False


def _restart(workdir: Path, first_pid: int) -> int:
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return waitForPid(workdir / "app.pid", first_pid)


def test_forkedSuccessorTakesOverAndForksItsOwn(procs: Processes, workdir: Path) -> None:
    """
    graceful-ctl restart has the fork server fork the successor (its child), which takes over
    and serves; the successor's own restart is forked by the same fork server; the fork server
    exits once the last generation has.
    """
    port = freePort()
    first = procs.server(_args(port), "gen1").start()
    first.waitServing()
    forkServer = _forkServer(first)
    track(procs, forkServer)
    # In the generation's process group (systemd and a terminal see one job), and idle: what
    # it forks starts idle (the successor restores normal priority when it connects).
    assert os.getpgid(forkServer) == os.getpgid(first.pid)
    if canRestorePriority():
        assert _policy(forkServer) == os.SCHED_IDLE
    second = _restart(workdir, first.pid)
    track(procs, second)
    assert first.wait(30) == 0
    assert _policy(second) == os.SCHED_OTHER
    log = first.text()
    # It was the fork server's spare, forked before the restart was asked for.
    assert f"fork server pid {forkServer} forked the successor pid {second} (its spare" in log
    assert parentOf(second) == forkServer
    # Named as its program (ps -o comm, pgrep, top), not as the fork server.
    assert Path(f"/proc/{second}/comm").read_text().strip() == "twistd"
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {second}, generation 2".encode() in body
    # The successor found the same fork server and uses it for its own successor.
    third = _restart(workdir, second)
    track(procs, third)
    assert f"fork server pid {forkServer} forked the successor pid {third}" in first.text()
    assert parentOf(third) == forkServer
    assert _gone(second)
    os.kill(third, signal.SIGTERM)
    assert _gone(third)
    assert _gone(forkServer), "the fork server outlived the last generation"


def test_changedModuleMakesItReplaceItself(procs: Processes, workdir: Path) -> None:
    """
    When a module the fork server imported changes on disk (a copy of graceful on PYTHONPATH,
    touched), it replaces itself with a fresh one (same pid) before the next fork and the log
    says why; with nothing changed, it does not.
    """
    lib = workdir / "lib"
    shutil.copytree(
        ROOT / "graceful_plugin", lib / "graceful_plugin", ignore=shutil.ignore_patterns("*.pyc")
    )
    port = freePort()
    first = procs.server(_args(port), "gen1")
    first.start({"PYTHONPATH": str(lib)})
    first.waitServing()
    forkServer = _forkServer(first)
    track(procs, forkServer)
    second = _restart(workdir, first.pid)
    track(procs, second)
    assert "replaced itself" not in first.text()
    touched = lib / "graceful_plugin" / "web.py"
    later = touched.stat().st_mtime + 10
    os.utime(touched, (later, later))
    third = _restart(workdir, second)
    track(procs, third)
    log = first.text()
    assert (
        f"fork server pid {forkServer} replaced itself with a fresh one before forking:"
        f" {touched} changed on disk"
    ) in log
    # Not the spare forked before the change: a fork of the fresh fork server.
    assert f"fork server pid {forkServer} forked the successor pid {third}\n" in log
    assert parentOf(third) == forkServer
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {third}, generation 3".encode() in body


def test_deadForkServerMeansAFullStart(procs: Processes, workdir: Path) -> None:
    """
    With its fork server killed, a generation says so, restarts with a full start (the
    successor is not a fork) and logs why; that successor starts a new fork server.
    """
    port = freePort()
    first = procs.server(_args(port), "gen1").start()
    first.waitServing()
    forkServer = _forkServer(first)
    os.kill(forkServer, signal.SIGKILL)
    first.waitFor(rf"the fork server \(pid {forkServer}\) has gone")
    before = len(first.text())
    second = _restart(workdir, first.pid)
    track(procs, second)
    log = first.text()
    assert (
        f"restart: starting the successor in full: the fork server (pid {forkServer}) has gone"
    ) in log
    assert parentOf(second) != forkServer
    assert first.wait(30) == 0
    fresh = _forkServer(first, after=before)
    track(procs, fresh)
    assert fresh != forkServer


def _ampCall(path: Path, command: str, timeout: float = 60, **arguments: str) -> dict[str, str]:
    """
    One AMP command over a plain socket (AMP's wire format: length-prefixed keys and values),
    and its answer box.
    """
    box = b""
    for key, value in [("_command", command), ("_ask", "1"), *arguments.items()]:
        for part in (key.encode(), value.encode()):
            box += struct.pack("!H", len(part)) + part
    box += b"\0\0"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(box)
        buffer = b""
        while True:
            answer: dict[str, str] = {}
            offset = 0
            complete = False
            while offset + 2 <= len(buffer):
                (size,) = struct.unpack_from("!H", buffer, offset)
                if size == 0:
                    complete = True
                    offset += 2
                    break
                if offset + 2 + size + 2 > len(buffer):
                    break
                key = buffer[offset + 2 : offset + 2 + size].decode()
                offset += 2 + size
                (vsize,) = struct.unpack_from("!H", buffer, offset)
                if offset + 2 + vsize > len(buffer):
                    break
                answer[key] = buffer[offset + 2 : offset + 2 + vsize].decode("latin-1")
                offset += 2 + vsize
            if complete:
                if "_answer" in answer or "_error" in answer:
                    return answer
                buffer = buffer[offset:]
                continue
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"the connection closed before an answer: {buffer!r}")
            buffer += data


def test_freshForkServerOnRequest(procs: Processes, workdir: Path) -> None:
    """
    A Restart command with fresh=True (a raw AMP call) has the fork server replace itself
    before forking, though nothing changed, and the restart succeeds.
    """
    port = freePort()
    first = procs.server(_args(port), "gen1").start()
    first.waitServing()
    forkServer = _forkServer(first)
    track(procs, forkServer)
    answer = _ampCall(workdir / "c.sock", "Restart", fresh="True")
    assert "_error" not in answer, answer
    second = int(answer["pid"])
    track(procs, second)
    assert answer["generation"] == "2"
    log = first.text()
    assert "restart requested over the control socket (with a fresh fork server)" in log
    assert (
        f"fork server pid {forkServer} replaced itself with a fresh one before forking:"
        " a fresh fork server was asked for"
    ) in log
    assert f"fork server pid {forkServer} forked the successor pid {second}\n" in log
    assert parentOf(second) == forkServer


PROBE = """
import os, time
import twisted.plugins.graceful_plugin  # as twistd's plugin discovery imports it
with open(os.environ["PROBE_OUT"], "w") as f:
    f.write(str(os.sched_getscheduler(0)))
deadline = time.monotonic() + 20
while not os.path.exists(os.environ["PROBE_RELEASE"]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def _policy(pid: int) -> int:
    with open(f"/proc/{pid}/sched") as f:
        for line in f:
            if line.startswith("policy"):
                return int(line.split(":")[1])
    raise AssertionError(f"no policy in /proc/{pid}/sched")


@pytest.mark.skipif(not canRestorePriority(), reason="this user may not leave SCHED_IDLE")
def test_successorByHandIsIdleUntilItConnects(procs: Processes, workdir: Path) -> None:
    """
    twistd graceful --takeover started by hand is at SCHED_IDLE as soon as twistd's plugin
    discovery has imported graceful's dropin (read in /proc while it is held there), and at
    normal scheduling once it serves; the first generation never was idle.
    """
    probe = workdir / "probe" / "twisted" / "plugins"
    probe.mkdir(parents=True)
    (probe / "zz_graceful_probe.py").write_text(PROBE)
    out, release = workdir / "policy", workdir / "release"
    port = freePort()
    first = procs.server(_args(port), "gen1").start()
    first.waitServing()
    forkServer = _forkServer(first)
    track(procs, forkServer)
    assert _policy(first.pid) == 0
    byHand = procs.server(["--takeover", "c.sock"], "byhand")
    byHand.start(
        {
            "PYTHONPATH": str(workdir / "probe"),
            "PROBE_OUT": str(out),
            "PROBE_RELEASE": str(release),
        }
    )
    waitForText(out, r"\d")
    assert out.read_text() == str(os.SCHED_IDLE)
    assert _policy(byHand.pid) == os.SCHED_IDLE  # SCHED_IDLE is 5 in /proc too
    release.touch()
    byHand.waitFor(r"took over from pid")
    assert _policy(byHand.pid) == os.SCHED_OTHER
    # Started by hand, it found the fork server from the control socket's path alone.
    byHand.waitFor(rf"fork server pid {forkServer} at @")
    assert first.wait(30) == 0


def test_forkedSuccessorsExitStatusReachesTheRestart(procs: Processes, workdir: Path) -> None:
    """
    A forked successor that exits before taking over (its new application fails to import)
    fails the restart with its exit status, which the fork server reaped and passed on; the
    server serves on.
    """
    from tests.procs import TWISTD

    port = freePort()
    successor = f"{sys.executable} {TWISTD} -n graceful --takeover c.sock"
    successor += " --wsgi tests.apps.broken_import.app"
    first = procs.server([*_args(port), "--restart-command", successor], "gen1")
    first.start({"PYTHONPATH": str(ROOT)})
    first.waitServing()
    forkServer = _forkServer(first)
    track(procs, forkServer)
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exited with status 1 before taking over" in result.stderr
    log = first.text()
    assert f"fork server pid {forkServer} forked the successor pid" in log
    assert "RuntimeError: this release is broken" in log
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {first.pid}, generation 1".encode() in body


def test_forkServerFreezesItsObjectsBeforeForking(tmp_path: Path) -> None:
    """
    A child of the fork server starts with every object the fork server preloaded frozen out of
    the collector (C{gc.freeze}), so that its first collections neither walk nor dirty the
    pages it shares with the fork server (measured: 31 ms of CPU and 3,100 page faults more
    per successor without it).
    """
    from graceful_plugin.forkserver import addressFor, encode, sockaddr

    script = tmp_path / "child.py"
    script.write_text("import gc\nprint(gc.get_freeze_count(), flush=True)\n")
    address = addressFor(str(tmp_path / "c.sock"))
    readyR, readyW = os.pipe()
    outR, outW = os.pipe()
    server = subprocess.Popen(
        [sys.executable, "-m", "graceful_plugin.forkserver", "--address", address]
        + ["--ready-fd", str(readyW)],
        pass_fds=[readyW],
        cwd=ROOT,
    )
    os.close(readyW)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with os.fdopen(readyR, "rb") as ready:
            assert ready.readline().startswith(b"ready"), "the fork server did not start"
        conn.settimeout(60)
        conn.connect(sockaddr(address))
        request = {
            "op": "fork",
            "id": 1,
            "argv": [sys.executable, str(script)],
            "cwd": str(tmp_path),
            "env": dict(os.environ),
        }
        socket.send_fds(conn, [encode(request)], [0, outW, 2])
        os.close(outW)
        outW = -1
        with os.fdopen(outR, "rb") as out:
            outR = -1
            frozen = int(out.read().strip())
        assert frozen > 10000, f"only {frozen} objects were frozen"
    finally:
        conn.close()
        for fd in (outR, outW):
            if fd >= 0:
                os.close(fd)
        # With its only connection closed and its child gone, it exits by itself.
        try:
            assert server.wait(60) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
