"""
The handoff for real: ``twistd graceful`` processes on loopback under bounded load.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.procs import (
    TWISTD,
    Load,
    Processes,
    ctl,
    freePort,
    httpGet,
    liveSessions,
    waitForSessions,
    waitForStatus,
)


def _portArgs(port: int) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]


def test_chainedTakeoversUnderLoadLoseNothing(procs: Processes, workdir: Path) -> None:
    """
    Ten chained takeovers under load (16 clients on fresh connections, 4 slow 8 MB downloads in
    flight) refuse, reset or cut short no request; every predecessor exits 0 by itself; the
    newest process's fd count after the tenth handoff equals its count after the first; the
    pidfile names the serving process.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = Load(port, clients=16, size=2048, downloaders=4, downloadSize=8 * 1024 * 1024).start()
    current = first
    fdCounts: list[int] = []
    try:
        for n in range(2, 12):
            successor = procs.server(["--takeover", "c.sock"], f"gen{n}").start()
            successor.waitFor(r"took over from pid \d+ as generation %d" % n)
            assert current.wait(90) == 0, current.text()[-3000:]
            if n in (2, 11):
                load.pause()
                waitForSessions(workdir, 0)
                fdCounts.append(successor.fdCount())
                load.resume()
            assert (workdir / "app.pid").read_text().strip() == str(successor.pid)
            current = successor
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.downloads >= 4
    assert result.ok > 100
    assert fdCounts[1] == fdCounts[0], fdCounts
    status, body = httpGet("127.0.0.1", port, "/")
    assert status == 200
    assert f"pid {current.pid}, generation 11".encode() in body


def test_successorKilledBeforeCommitRollsBack(procs: Processes, workdir: Path) -> None:
    """
    A successor killed with SIGKILL after it received the descriptors but before commit leaves
    the predecessor serving with zero client errors, and a later takeover succeeds.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = Load(port, clients=8, size=1024, downloaders=2, downloadSize=4 * 1024 * 1024).start()
    try:
        doomed = procs.fakeSuccessor("c.sock", "fds")
        doomed.waitFor(r"reached fds 2")
        doomed.kill()
        first.waitFor(r"rolled back: the successor disconnected")
        ok = procs.server(["--takeover", "c.sock"], "gen2").start()
        ok.waitFor(r"took over from pid %d as generation 2" % first.pid)
        assert first.wait(60) == 0
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.ok > 20


def test_statusReportsSessionsWhileDownloadsAreInFlight(procs: Processes, workdir: Path) -> None:
    """
    ``graceful-ctl status`` reports the live sessions of the serving generation and, after a
    takeover, those of the draining predecessor.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = Load(port, clients=0, downloaders=3, downloadSize=64 * 1024 * 1024, downloadDelay=0.01)
    load.start()
    try:
        status = waitForStatus(workdir, lambda s: liveSessions(s) == 3, "3 downloads in flight")
        assert status["pid"] == first.pid
        second = procs.server(["--takeover", "c.sock"], "gen2").start()
        second.waitFor(r"took over from pid %d" % first.pid)
        status = waitForStatus(
            workdir, lambda s: s["pid"] == second.pid and s["draining"], "generation 1 draining"
        )
        assert status["generation"] == 2
        assert [
            (d["pid"], d["generation"], d["state"], d["sessions"]) for d in status["draining"]
        ] == [(first.pid, 1, "draining", 3)]
        assert status["draining"][0]["listeners"] == [
            {"name": f"tcp:127.0.0.1:{port}", "sessions": 3}
        ]
        human = ctl(workdir, "--control", "c.sock", "status").stdout
        assert f"pid {first.pid}, generation 1, draining: 3 sessions" in human
    finally:
        first.signal(signal.SIGKILL)
        load.stop()


def test_twistdListsThePlugin() -> None:
    """
    ``twistd --help`` lists the graceful plugin in the test environment.
    """
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "graceful" in out
    assert "zero-downtime" in out


def test_sigtermDrainsAndExitsZero(procs: Processes, workdir: Path) -> None:
    """
    SIGTERM stops accepting, lets an in-flight download finish, exits 0 and removes the control
    socket and the pidfile of the last generation.
    """
    port = freePort()
    server = procs.server(_portArgs(port), "gen1").start()
    server.waitServing()
    load = Load(port, clients=0, downloaders=1, downloadSize=8 * 1024 * 1024, downloadDelay=0.005)
    load.start()
    waitForStatus(workdir, lambda s: liveSessions(s) == 1, "the download in flight")
    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0
    result = load.stop()
    assert result.downloads >= 1
    assert result.errors.get("short", 0) == 0
    assert not (workdir / "c.sock").exists()
    assert not (workdir / "app.pid").exists()


def test_takeoverOfNothingFailsClearly(workdir: Path) -> None:
    """
    ``--takeover`` at a path with no server exits non-zero with one clear sentence.
    """
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile", "", "graceful", "--takeover", "nothing.sock"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "there is no control socket at" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_secondServerOnSamePidfileIsRefused(procs: Processes, workdir: Path) -> None:
    """
    Starting a second server with the pidfile of a live one is refused with a hint to use
    --takeover, and the first keeps serving.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile", "app.pid", "graceful", *_portArgs(freePort())],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"a server is already running (pid {first.pid}" in result.stdout
    assert httpGet("127.0.0.1", port, "/")[0] == 200
    assert os.path.exists(workdir / "app.pid")
