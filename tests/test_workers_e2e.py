"""
A generation of several processes, for real: ``--workers N`` starts N-1 worker processes that
accept on the leader's sockets; a killed worker is replaced; the leader's end (SIGTERM or
SIGKILL) ends every worker.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from graceful_plugin.tap import Options
from tests.operate import becomeSubreaper, status, track, waitForExit
from tests.procs import Load, Processes, childProcesses, ctl, freePort, httpGet, waitForStatus


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


def _args(port: int, workers: str) -> list[str]:
    return [
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--control",
        "c.sock",
        "--workers",
        workers,
    ]


def _workerPids(procs: Processes, leader: int) -> list[int]:
    pids = [pid for pid, state in childProcesses(leader) if state != "Z"]
    for pid in pids:
        track(procs, pid)
    return pids


def _servedBy(port: int, wanted: int, attempts: int = 400) -> set[int]:
    """
    The pids that answered, asking until C{wanted} distinct ones did (bounded).
    """
    seen: set[int] = set()
    for _ in range(attempts):
        code, body = httpGet("127.0.0.1", port, "/")
        assert code == 200
        seen.add(int(body.split(b"pid ")[1].split(b",")[0]))
        if len(seen) >= wanted:
            break
    return seen


@pytest.mark.parametrize("value, count", [("2", 2), ("auto", len(os.sched_getaffinity(0)))])
def test_workersOption(value: str, count: int) -> None:
    """
    --workers takes a count or auto (one per CPU this process may run on).
    """
    options = Options()
    options.parseOptions(["--port", "1", "--workers", value])
    assert options["workers"] == count


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--workers", "many"], "--workers: takes a whole number or auto, not 'many'"),
    ],
)
def test_badWorkersRefusedWithASentence(args: list[str], words: str) -> None:
    """
    A --workers value that is not a count is refused with a sentence.
    """
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match=words):
        Options().parseOptions(["--port", "1", *args])


def test_takeoverWithWorkersRefused(procs: Processes, workdir: Path) -> None:
    """
    A takeover that asks for several workers is refused with a sentence: a group takeover is
    not supported yet.
    """
    port = freePort()
    first = procs.server(_args(port, "1"), "gen1").start()
    first.waitServing()
    second = procs.server(["--takeover", "c.sock", "--workers", "2"], "gen2").start()
    assert second.wait(30) != 0
    assert "a takeover of a group of worker processes is not supported yet" in second.text()
    assert status(workdir)["pid"] == first.pid


@pytest.mark.slow
def test_workersShareTheSocketsAndStopTogether(procs: Processes, workdir: Path) -> None:
    """
    With --workers 3 three processes answer on one port; status lists each with its pid and
    sessions; SIGTERM to the leader stops all three, exit status 0.
    """
    port = freePort()
    leader = procs.server(_args(port, "3"), "gen1").start()
    leader.waitFor(r"2 workers accepting on 1 listeners")
    workers = _workerPids(procs, leader.pid)
    assert len(workers) == 2
    assert _servedBy(port, 3) == {leader.pid, *workers}
    now = status(workdir)
    entries = now["workers"]
    assert isinstance(entries, list)
    assert entries[0]["pid"] == leader.pid
    assert {e["pid"] for e in entries} == {leader.pid, *workers}
    assert all(isinstance(e["sessions"], int) for e in entries)
    text = ctl(workdir, "--control", "c.sock", "status").stdout
    assert "workers: 3:" in text
    leader.signal(signal.SIGTERM)
    assert leader.wait(30) == 0
    for pid in workers:
        waitForExit(pid, 10)
    assert "worker 1" in leader.text() and "exit status 0" in leader.text()


def test_oneWorkerIsTodaysSingleProcess(procs: Processes, workdir: Path) -> None:
    """
    --workers 1 starts no other process, and status lists the one process.
    """
    port = freePort()
    leader = procs.server(_args(port, "1"), "gen1").start()
    leader.waitServing()
    assert _servedBy(port, 1) == {leader.pid}
    assert childProcesses(leader.pid) == []
    assert [e["pid"] for e in status(workdir)["workers"]] == [leader.pid]  # type: ignore[index]


@pytest.mark.slow
def test_killedWorkerIsReplacedAndNoConnectIsRefused(procs: Processes, workdir: Path) -> None:
    """
    A worker killed while serving under load is replaced (status counts the restart, and the
    new process serves); no connect is refused meanwhile (the other processes take the queue).
    """
    port = freePort()
    leader = procs.server(_args(port, "2"), "gen1").start()
    leader.waitFor(r"1 workers accepting")
    [worker] = _workerPids(procs, leader.pid)
    load = Load(port, clients=4, size=1024, downloaders=0).start()
    try:
        os.kill(worker, signal.SIGKILL)
        now = waitForStatus(
            workdir,
            lambda s: (
                s["workers"][1]["restarts"] == 1 and s["workers"][1]["pid"] not in (0, worker)
            ),
            "the worker replaced",
        )
        replacement = now["workers"][1]["pid"]
        track(procs, replacement)
        leader.waitFor(rf"worker 1 \(pid {replacement}\) replaced: accepting", 20)
    finally:
        result = load.stop()
    assert f"worker 1 (pid {worker}) died while serving: killed by SIGKILL" in leader.text()
    assert result.errors.get("refused", 0) == 0, result.examples
    assert result.ok > 0
    assert replacement in _servedBy(port, 2)


@pytest.mark.slow
def test_killedLeaderLeavesNoWorkerServing(procs: Processes, workdir: Path) -> None:
    """
    When the leader is killed (SIGKILL), every worker notices, drains and exits.
    """
    port = freePort()
    leader = procs.server(_args(port, "3"), "gen1").start()
    leader.waitFor(r"2 workers accepting")
    workers = _workerPids(procs, leader.pid)
    leader.kill()
    for pid in workers:
        waitForExit(pid, 10)


def test_restartOfAGroupRefusedWithASentence(procs: Processes, workdir: Path) -> None:
    """
    graceful-ctl restart of a server with workers fails with a sentence and the server serves
    on, every worker included.
    """
    port = freePort()
    leader = procs.server(_args(port, "2"), "gen1").start()
    leader.waitFor(r"1 workers accepting")
    workers = _workerPids(procs, leader.pid)
    result = ctl(workdir, "--control", "c.sock", "restart")
    assert result.returncode != 0
    assert "a takeover of a group of workers is not supported yet" in result.stdout + result.stderr
    assert _servedBy(port, 2) == {leader.pid, *workers}
