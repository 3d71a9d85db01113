"""
Signals to a real server: SIGHUP and SIGUSR2 restart it as ``graceful-ctl restart`` does,
SIGUSR1 stays twistd's log rotation.  (SIGTERM's graceful stop is in test_handoff_e2e.)
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.operate import becomeSubreaper, status, track, waitForPid, waitForText
from tests.procs import Load, Processes, freePort, httpGet


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


def _portArgs(port: int) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR2], ids=["SIGHUP", "SIGUSR2"])
def test_signalRestarts(procs: Processes, workdir: Path, sig: signal.Signals) -> None:
    """
    SIGHUP or SIGUSR2 makes the server start its successor, which takes over under load with
    no failed request; the old process logs the outcome and exits 0, and the pidfile and
    status name the successor as generation 2.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = Load(port, clients=4, size=1024, downloaders=1, downloadSize=1024 * 1024).start()
    try:
        first.signal(sig)
        successor = waitForPid(workdir / "app.pid", first.pid)
        track(procs, successor)
        assert first.wait(30) == 0
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    log = first.text()
    assert f"{sig.name}: restarting" in log
    assert f"{sig.name}: restarted as pid {successor}, generation 2" in log
    now = status(workdir)
    assert (now["pid"], now["generation"]) == (successor, 2)
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {successor}, generation 2".encode() in body


def test_signalRestartFailureIsLoggedAndServesOn(procs: Processes, workdir: Path) -> None:
    """
    A SIGHUP whose successor fails logs why, and the same process serves on (a second SIGHUP
    is tried anew, not refused as busy).
    """
    port = freePort()
    args = [*_portArgs(port), "--restart-command", "/bin/sh -c 'exit 4'"]
    first = procs.server(args, "gen1").start()
    first.waitServing()
    for attempt in (1, 2):
        first.signal(signal.SIGHUP)
        failed = r"SIGHUP: restart failed: the successor \(pid \d+\) exited with status 4"
        waitForText(first.log, r"[\s\S]*".join([failed] * attempt))
    assert first.text().count("SIGHUP: not restarting") == 0
    assert status(workdir)["pid"] == first.pid
    assert httpGet("127.0.0.1", port, "/")[0] == 200


def test_sigusr1StillRotatesTheLog(procs: Processes, workdir: Path) -> None:
    """
    SIGUSR1 is left to twistd: it rotates the log file, and starts no successor.
    """
    port = freePort()
    server = procs.server(["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"])
    server.command = (
        lambda: [  # type: ignore[method-assign]
            *server.__class__.command(server)[:2],
            "--logfile",
            "twistd.log",
            *server.__class__.command(server)[2:],
        ]
    )
    server.start()
    waitForText(workdir / "twistd.log", r"generation 1 \(pid \d+\) serving")
    server.signal(signal.SIGUSR1)
    waitForText(workdir / "twistd.log.1", r"serving")
    assert "restart" not in (workdir / "twistd.log.1").read_text()
    assert "restart" not in (workdir / "twistd.log").read_text()
    assert status(workdir)["pid"] == server.pid
    assert (workdir / "app.pid").read_text().strip() == str(server.pid)
