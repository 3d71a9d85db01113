"""
A generation of several processes, for real: ``--workers N`` starts N-1 worker processes that
accept on the leader's sockets; a killed worker is replaced; the leader's end (SIGTERM or
SIGKILL) ends every worker.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from graceful_plugin.tap import Options
from tests.operate import becomeSubreaper, status, track, waitForExit, waitForPid
from tests.procs import (
    Load,
    Processes,
    Server,
    childProcesses,
    ctl,
    forkedWorkers,
    freePort,
    httpGet,
    waitForStatus,
)


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


#: The checkout, for the test applications (tests.apps) that twistd imports.
_ROOT = Path(__file__).resolve().parent.parent


def _args(port: int, workers: str) -> list[str]:
    return [
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--control",
        "c.sock",
        "--workers",
        workers,
    ]


def _workerChildren(leader: int) -> list[tuple[int, str]]:
    """
    The leader's worker processes (its fork server, also a child, is not one).
    """
    found = []
    for pid, state in childProcesses(leader):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"graceful_plugin.worker" in argv:
            found.append((pid, state))
    return found


def _workerPids(procs: Processes, leader: int) -> list[int]:
    """
    The leader's live workers: its children, and those the fork server forked for it (named in
    its log: its own, or, for a successor that graceful-ctl restart started, every log).
    """
    pids = [pid for pid, state in _workerChildren(leader) if state != "Z"]
    logs = [s for s in procs.servers if isinstance(s, Server) and s.process is not None]
    own = [s for s in logs if s.pid == leader]
    pids += forkedWorkers("".join(s.text() for s in own or logs))
    for pid in pids:
        track(procs, pid)
    return pids


def _servedBy(port: int, wanted: int, attempts: int = 400, path: str = "/") -> set[int]:
    """
    The pids that answered, asking until C{wanted} distinct ones did (bounded).
    """
    seen: set[int] = set()
    for _ in range(attempts):
        code, body = httpGet("127.0.0.1", port, path)
        assert code == 200
        seen.add(int(body.split(b"pid ")[1].split(b",")[0].split(b"\n")[0]))
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


@pytest.mark.slow
def test_workersShareTheSocketsAndStopTogether(procs: Processes, workdir: Path) -> None:
    """
    With --workers 3 three processes answer on one port; status lists each with its pid and
    sessions; SIGTERM to the leader stops all three, exit status 0.
    """
    port = freePort()
    leader = procs.server(_args(port, "3"), "gen1").start()
    leader.waitFor(r"2 workers accepting")
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
    assert _workerChildren(leader.pid) == []
    assert [e["pid"] for e in status(workdir)["workers"]] == [leader.pid]  # type: ignore[index]


@pytest.mark.slow
def test_connectionsOpenedTogetherSpreadOverTheGroup(procs: Processes, workdir: Path) -> None:
    """
    32 connections opened one after another and kept open are held by both processes of a
    group of two, neither holding more than three quarters of them (without the balance the
    first process to wake took nearly all: 99% in benchmarks/workers.py).
    """
    port = freePort()
    leader = procs.server(_args(port, "2"), "gen1").start()
    leader.waitFor(r"1 workers accepting")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
    try:
        now = waitForStatus(
            workdir,
            lambda s: sum(w["sessions"] for w in s["workers"]) == 32,
            "every connection counted",
        )
        held = sorted(w["sessions"] for w in now["workers"])
        assert held[0] >= 8, held
        # Status says, for each process, whether it holds now and how many times it held.
        assert all(isinstance(w["holding"], bool) for w in now["workers"]), now["workers"]
        assert all(isinstance(w["holds"], int) for w in now["workers"]), now["workers"]
    finally:
        for sock in socks:
            sock.close()


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


def _groupSessions(status: dict[str, Any]) -> int:
    return sum(int(w["sessions"]) for w in status["workers"])


def _waitTookOver(successor: Server, n: int) -> None:
    successor.waitFor(r"took over from pid \d+ as generation %d" % n, 60)


@pytest.mark.slow
def test_chainedGroupTakeoversUnderLoadLoseNothing(procs: Processes, workdir: Path) -> None:
    """
    Ten chained takeovers of a group of two processes under load (16 clients on fresh
    connections, 4 slow 8 MB downloads in flight) refuse, reset or cut short no request; every
    old leader exits 0 and every old worker is gone; each successor keeps the count (one worker
    besides its leader);
    the serving leader's descriptor count after the last handoff equals the one after the first.
    """
    port = freePort()
    first = procs.server(_args(port, "2"), "gen1").start()
    first.waitFor(r"1 workers accepting")
    old = _workerPids(procs, first.pid)
    load = Load(port, clients=16, size=2048, downloaders=4, downloadSize=8 * 1024 * 1024).start()
    current = first
    fdCounts: list[int] = []
    try:
        for n in range(2, 12):
            successor = procs.server(["--takeover", "c.sock"], f"gen{n}").start()
            _waitTookOver(successor, n)
            assert current.wait(90) == 0, current.text()[-3000:]
            for worker in old:
                waitForExit(worker, 30)
            old = _workerPids(procs, successor.pid)
            assert len(old) == 1
            if n in (2, 11):
                load.pause()
                waitForStatus(
                    workdir,
                    lambda s: _groupSessions(s) == 0 and not s["draining"],
                    "no session left",
                )
                fdCounts.append(successor.fdCount())
                load.resume()
            current = successor
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.downloads >= 4
    assert result.ok > 100
    assert fdCounts[1] == fdCounts[0], fdCounts
    assert _servedBy(port, 2) == {current.pid, *old}


@pytest.mark.slow
def test_restartOfAGroupKeepsItsCount(procs: Processes, workdir: Path) -> None:
    """
    graceful-ctl restart of a group of three starts a successor group of three; the old leader
    and both its workers exit.
    """
    port = freePort()
    first = procs.server(_args(port, "3"), "gen1").start()
    first.waitFor(r"2 workers accepting")
    old = _workerPids(procs, first.pid)
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert first.wait(60) == 0
    for worker in old:
        waitForExit(worker, 30)
    leader = waitForPid(workdir / "app.pid", first.pid)
    track(procs, leader)
    now = waitForStatus(workdir, lambda s: len(s["workers"]) == 3, "three processes")
    assert now["generation"] == 2 and now["pid"] == leader
    workers = _workerPids(procs, leader)
    assert _servedBy(port, 3) == {leader, *workers}


@pytest.mark.slow
def test_twoToThreeAcrossATakeover(procs: Processes, workdir: Path) -> None:
    """
    A successor naming --workers 3 takes over from a group of two with three processes.
    """
    port = freePort()
    first = procs.server(_args(port, "2"), "gen1").start()
    first.waitFor(r"1 workers accepting")
    old = _workerPids(procs, first.pid)
    second = procs.server(["--takeover", "c.sock", "--workers", "3"], "gen2").start()
    _waitTookOver(second, 2)
    assert first.wait(60) == 0
    for worker in old:
        waitForExit(worker, 30)
    workers = _workerPids(procs, second.pid)
    assert len(workers) == 2
    assert _servedBy(port, 3) == {second.pid, *workers}


@pytest.mark.slow
def test_newWorkerKilledDuringTheHandoffRollsBackEverything(
    procs: Processes, workdir: Path
) -> None:
    """
    A new worker killed while the successor's group gets ready rolls the whole handoff back
    under load with zero client failures: the successor stops all its workers and exits
    non-zero, and the predecessor's leader and worker serve on.
    """
    port = freePort()
    (workdir / "ready1").write_text("")
    app = ["--resource", "tests.apps.slow_ready.slowDemo"]
    first = procs.server([*_args(port, "2"), *app], "gen1").start(
        {"GRACEFUL_TEST_READY_FILE": str(workdir / "ready1"), "PYTHONPATH": str(_ROOT)}
    )
    first.waitFor(r"1 workers accepting")
    old = _workerPids(procs, first.pid)
    load = Load(port, clients=8, size=1024, downloaders=2, downloadSize=2 * 1024 * 1024).start()
    try:
        second = procs.server(["--takeover", "c.sock", "--workers", "3", *app], "gen2").start(
            {"GRACEFUL_TEST_READY_FILE": str(workdir / "ready2"), "PYTHONPATH": str(_ROOT)}
        )
        # The leader and both its workers warm up, waiting for ready2.
        second.waitFor(r"(?s)(warming up until .*){3}", 60)
        newWorkers = _workerPids(procs, second.pid)
        assert len(newWorkers) == 2
        os.kill(newWorkers[0], signal.SIGKILL)
        assert second.wait(60) != 0
        for worker in newWorkers:
            waitForExit(worker, 30)
        first.waitFor(r"handoff to pid %d rolled back" % second.pid, 30)
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.ok > 0
    assert re.search(
        r"takeover from .* failed: worker \d \(pid %d\) could not get ready: killed by SIGKILL"
        % newWorkers[0],
        second.text(),
    ), second.text()[-3000:]
    assert status(workdir)["pid"] == first.pid
    assert _servedBy(port, 2) == {first.pid, *old}


def _unixPid(path: Path) -> int:
    """
    The pid that answers C{GET /} on the Unix listener at C{path}.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b"pid ")[1].split(b",")[0])


@pytest.mark.slow
def test_unixListenerSharedAndHandedOverByAGroup(procs: Processes, workdir: Path) -> None:
    """
    A Unix listener is served by every process of a group, survives a group takeover (no old
    worker unlinks the path when it releases), and is unlinked when the last generation stops.
    """
    path = workdir / "web.sock"
    first = procs.server(
        ["--port", f"unix:{path}", "--control", "c.sock", "--workers", "2"], "gen1"
    ).start()
    first.waitFor(r"1 workers accepting")
    old = _workerPids(procs, first.pid)
    seen: set[int] = set()
    for _ in range(400):
        seen.add(_unixPid(path))
        if seen == {first.pid, *old}:
            break
    assert seen == {first.pid, *old}
    second = procs.server(["--takeover", "c.sock"], "gen2").start()
    _waitTookOver(second, 2)
    assert first.wait(60) == 0
    for worker in old:
        waitForExit(worker, 30)
    assert path.exists()
    new = _workerPids(procs, second.pid)
    seen.clear()
    for _ in range(400):
        seen.add(_unixPid(path))
        if seen == {second.pid, *new}:
            break
    assert seen == {second.pid, *new}
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    for worker in new:
        waitForExit(worker, 30)
    assert not path.exists()


@pytest.mark.slow
def test_tlsListenerServedByEveryProcess(procs: Processes, workdir: Path) -> None:
    """
    A TLS listener is served by every process of a group, each with the key and certificate it
    read itself.
    """
    from tests.test_listener_kinds import get, makeCertificate, tlsConnect

    port = freePort()
    key, cert = makeCertificate(workdir, "one")
    spec = f"secure=ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    leader = procs.server(["--port", spec, "--control", "c.sock", "--workers", "2"], "gen1")
    leader.start().waitFor(r"1 workers accepting")
    workers = _workerPids(procs, leader.pid)
    connect = tlsConnect(port)
    seen: set[int] = set()
    for _ in range(400):
        code, body = get(connect, "/")
        assert code == 200
        seen.add(int(body.split(b"pid ")[1].split(b",")[0]))
        if seen == {leader.pid, *workers}:
            break
    assert seen == {leader.pid, *workers}


@pytest.mark.slow
def test_udpListenerReadByEveryProcess(procs: Processes, workdir: Path) -> None:
    """
    A UDP listener's datagrams are read by every process of a group (one shared socket).
    """
    from tests.test_listener_kinds import ROOT

    port = freePort()
    leader = procs.server(
        [
            "--port",
            f"udp:{port}:interface=127.0.0.1",
            "--control",
            "c.sock",
            "--workers",
            "2",
            "--factory",
            "tests.apps.udp_pid.Echo",
        ],
        "gen1",
    )
    leader.start({"PYTHONPATH": str(ROOT)}).waitFor(r"1 workers accepting")
    workers = _workerPids(procs, leader.pid)
    seen: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for _ in range(2000):
            client.sendto(b"hello", ("127.0.0.1", port))
            seen.add(int(client.recv(100).split()[1]))
            if seen == {leader.pid, *workers}:
                break
    assert seen == {leader.pid, *workers}
