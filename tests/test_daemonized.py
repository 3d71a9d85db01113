"""
Daemonized servers (twistd without ``-n``), started from different working directories.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful_plugin import pidfile
from tests.procs import TWISTD, childProcesses, ctl, freePort, httpGet


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """
    Pids of the daemons a test started (they are not our children: twistd forks twice), killed
    by pid when the test ends.
    """
    pids: list[int] = []
    before = {pid for pid, _ in childProcesses(os.getpid())}
    try:
        yield pids
    finally:
        for pid in pids:
            if pidfile.alive(pid):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        # twistd's double fork leaves its intermediate process (and the daemon, once it exits)
        # to us when the test process is a child subreaper: reap them.
        for pid, state in childProcesses(os.getpid()):
            if pid not in before and state == "Z":
                _reap(pid)


def _reap(pid: int) -> None:
    """
    Reap C{pid} if it became our child (a test process that is a child subreaper inherits the
    orphaned daemons), so no zombie is left behind.
    """
    try:
        os.waitpid(pid, 0 if not pidfile.alive(pid) else os.WNOHANG)
    except ChildProcessError:
        pass


def _gone(pid: int) -> bool:
    if pidfile.alive(pid):
        return False
    _reap(pid)
    return True


def _waitUntil(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


ROOT = Path(__file__).resolve().parent.parent


def _twistd(cwd: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [TWISTD, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_daemonizedTakeoverFromAnotherDirectory(workdir: Path, daemons: list[int]) -> None:
    """
    A daemonized server started with relative paths is taken over by a daemonized successor
    started from another working directory: the pidfile then names the successor and the old
    daemon exits by itself; a daemonized takeover that fails makes twistd exit 1 with the
    reason; a graceful stop removes the control socket and the pidfile.
    """
    port = freePort()
    pidPath = workdir / "app.pid"
    first = _twistd(
        workdir,
        "--pidfile",
        "app.pid",
        "--logfile",
        "gen1.log",
        "graceful",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--control",
        "c.sock",
    )
    assert first.returncode == 0, first.stdout + first.stderr
    _waitUntil(lambda: pidfile.read(str(pidPath)) is not None, "the first daemon's pidfile")
    firstPid = pidfile.read(str(pidPath))
    assert firstPid is not None
    daemons.append(firstPid)
    _waitUntil(lambda: (workdir / "c.sock").exists(), "the control socket")
    status, body = httpGet("127.0.0.1", port, "/")
    assert status == 200 and f"pid {firstPid}, generation 1".encode() in body

    second = _twistd(
        "/",
        "--pidfile",
        str(pidPath),
        "--logfile",
        str(workdir / "gen2.log"),
        "graceful",
        "--takeover",
        str(workdir / "c.sock"),
    )
    assert second.returncode == 0, second.stdout + second.stderr
    _waitUntil(
        lambda: pidfile.read(str(pidPath)) not in (None, firstPid), "the successor's pidfile"
    )
    secondPid = pidfile.read(str(pidPath))
    assert secondPid is not None
    daemons.append(secondPid)
    _waitUntil(lambda: _gone(firstPid), "the old daemon to exit")
    status, body = httpGet("127.0.0.1", port, "/")
    assert f"pid {secondPid}, generation 2".encode() in body
    assert (workdir / "c.sock").exists()
    assert "took over from pid %d as generation 2" % firstPid in (workdir / "gen2.log").read_text()

    # A daemonized takeover that fails after start-up (its application is never ready) makes
    # twistd itself exit non-zero with the reason, and the serving daemon serves on.
    failed = _twistd(
        "/",
        "--pidfile",
        str(pidPath),
        "--logfile",
        str(workdir / "bad.log"),
        "graceful",
        "--takeover",
        str(workdir / "c.sock"),
        "--wsgi",
        "tests.apps.slow_ready.broken",
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "takeover failed" in failed.stderr
    assert "the database is down" in (workdir / "bad.log").read_text()
    assert pidfile.read(str(pidPath)) == secondPid
    status, body = httpGet("127.0.0.1", port, "/")
    assert f"pid {secondPid}, generation 2".encode() in body

    stopped = ctl(workdir, "--control", "c.sock", "stop")
    assert stopped.returncode == 0, stopped.stderr
    _waitUntil(lambda: _gone(secondPid), "the successor to stop")
    _waitUntil(lambda: not (workdir / "c.sock").exists(), "the control socket to go")
    assert not pidPath.exists()


_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")


def test_generationsShareOneLogFileIntact(workdir: Path, daemons: list[int]) -> None:
    """
    A daemon with --logfile restarted three times by ``graceful-ctl restart`` (each successor a
    daemon writing the same file) leaves one log file holding every generation's start and exit
    lines, every line whole: one timestamp per line, each at its start.
    """
    port = freePort()
    pidPath = workdir / "app.pid"
    first = _twistd(
        workdir,
        "--pidfile",
        "app.pid",
        "--logfile",
        "app.log",
        "graceful",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--control",
        "c.sock",
    )
    assert first.returncode == 0, first.stdout + first.stderr
    _waitUntil(lambda: pidfile.read(str(pidPath)) is not None, "the first daemon's pidfile")
    pids = [pidfile.read(str(pidPath))]
    assert pids[0] is not None
    daemons.append(pids[0])
    for generation in (2, 3, 4):
        restarted = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        _waitUntil(
            lambda: pidfile.read(str(pidPath)) not in (None, *pids), "the successor's pidfile"
        )
        pid = pidfile.read(str(pidPath))
        assert pid is not None
        daemons.append(pid)
        pids.append(pid)
        _waitUntil(lambda: _gone(pids[-2]), "the old daemon to exit")
        status, body = httpGet("127.0.0.1", port, "/")
        assert f"pid {pid}, generation {generation}".encode() in body
    stopped = ctl(workdir, "--control", "c.sock", "stop")
    assert stopped.returncode == 0, stopped.stderr
    _waitUntil(lambda: _gone(pids[-1]), "the last generation to stop")

    assert sorted(p.name for p in workdir.glob("app.log*")) == ["app.log"]
    text = (workdir / "app.log").read_text()
    lines = text.splitlines()
    spliced = [line for line in lines if len(_STAMP.findall(line)) != 1 or not _STAMP.match(line)]
    assert spliced == [], spliced
    for generation, pid in enumerate(pids, start=1):
        assert f"generation {generation} (pid {pid}) serving on" in text
        assert f"generation {generation} (pid {pid}) drained; exiting" in text
        if generation > 1:
            assert f"took over from pid {pids[generation - 2]} as generation {generation}" in text
    assert text.count("starting up.") == 4
    assert text.count("Server Shut Down.") == 4
