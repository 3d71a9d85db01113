"""
A successor generation's workers as forks of the fork server, for real: after a ``--workers 2``
takeover the new worker is a child of the fork server and serves; killed while serving, it is
replaced by another fork; when its leader is killed it drains and exits; with the fork server
gone, its end is still seen and it is replaced by a full start, the log saying why.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.operate import becomeSubreaper, track, waitForExit
from tests.procs import Processes, Server, forkedWorkers, freePort, parentOf, waitForStatus
from tests.test_workers_e2e import _args, _servedBy, _waitTookOver, _workerPids

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


def _takenOver(procs: Processes) -> tuple[Server, int, int]:
    """
    A group of two, taken over by hand by a group of two: the successor, its forked worker and
    the fork server.
    """
    port = freePort()
    first = procs.server(_args(port, "2"), "gen1").start()
    first.waitFor(r"1 workers accepting")
    [old] = _workerPids(procs, first.pid)
    # The first generation's first worker has no fork server yet: a full start, its child.
    assert parentOf(old) == first.pid
    # (A successor that comes before the fork server is up starts its workers in full.)
    first.waitFor(r"fork server pid \d+ at @", 30)
    second = procs.server(["--takeover", "c.sock"], "gen2").start()
    _waitTookOver(second, 2)
    assert first.wait(60) == 0
    waitForExit(old, 30)
    match = second.waitFor(r"worker 1 \(pid (\d+)\) forked by the fork server pid (\d+)")
    worker, forkServer = int(match[1]), int(match[2])
    track(procs, worker)
    track(procs, forkServer)
    assert parentOf(worker) == forkServer
    assert Path(f"/proc/{worker}/comm").read_text().strip() == "graceful-worker"
    # (Whichever process wakes first takes a connection: on a loaded machine one may take
    # hundreds in a row.)
    assert _servedBy(port, 2, attempts=1500) == {second.pid, worker}
    return second, worker, port


def test_forkedWorkerServesIsReplacedAndEndsWithItsLeader(procs: Processes, workdir: Path) -> None:
    """
    The successor's worker is a fork of the fork server and serves; SIGKILLed, it is replaced
    by another fork that serves (the status counts the restart); when the leader is SIGKILLed,
    the forked worker notices (its link closes), drains and exits.
    """
    second, worker, port = _takenOver(procs)
    os.kill(worker, signal.SIGKILL)
    now = waitForStatus(
        workdir,
        lambda s: s["workers"][1]["restarts"] == 1 and s["workers"][1]["pid"] not in (0, worker),
        "the worker replaced",
    )
    replacement = now["workers"][1]["pid"]
    track(procs, replacement)
    second.waitFor(rf"worker 1 \(pid {replacement}\) replaced: accepting", 20)
    assert f"worker 1 (pid {worker}) died while serving: killed by SIGKILL" in second.text()
    assert forkedWorkers(second.text()) == [replacement]
    assert replacement in _servedBy(port, 2)
    second.kill()
    waitForExit(replacement, 15)


def test_withoutTheForkServerAWorkerIsStartedInFull(procs: Processes, workdir: Path) -> None:
    """
    When the fork server has gone, a forked worker's end is still noticed (its status cannot
    be told) and it is replaced by a full start, the log saying why.
    """
    second, worker, port = _takenOver(procs)
    forkServer = parentOf(worker)
    os.kill(forkServer, signal.SIGKILL)
    second.waitFor(rf"fork server \(pid {forkServer}\) has gone", 20)
    os.kill(worker, signal.SIGKILL)
    second.waitFor(
        rf"worker 1 \(pid {worker}\) died while serving: exit status unknown \(the fork server"
        r" had gone\)",
        20,
    )
    second.waitFor(r"worker 1: started in full: the fork server \(pid \d+\) has gone", 20)
    match = second.waitFor(r"worker 1 \(pid (\d+)\) replaced: accepting", 20)
    replacement = int(match[1])
    track(procs, replacement)
    assert parentOf(replacement) == second.pid
    assert replacement in _servedBy(port, 2)
