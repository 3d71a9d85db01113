"""
The hot standby with real processes under load: a successor killed after it was confirmed,
while the predecessor still drains, is an undone handoff, not an outage.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.procs import Load, Processes, Server, ctl, freePort, httpGet


def _portArgs(port: int, *extra: str) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock", *extra]


def _status(workdir: Path) -> dict:
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _holdSession(port: int) -> socket.socket:
    """
    A client that sends half a request and never finishes it: the predecessor drains until its
    drain deadline.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")
    return s


def _firstAnswerAfter(port: int, timeout: float = 20.0) -> tuple[float, bytes]:
    """
    One request on a fresh connection, issued now: how long until it was answered, and the body.
    """
    started = time.monotonic()
    code, body = httpGet("127.0.0.1", port, "/", timeout=timeout)
    assert code == 200
    return time.monotonic() - started, body


def _killSuccessor(procs: Processes, first: Server, delay: float | None) -> tuple[Server, float]:
    """
    Start a successor and SIGKILL it C{delay} seconds after the predecessor confirmed it (None:
    the successor kills itself as the answer to its Accepting arrives).

    @return: the successor and the monotonic time of its death (or of the confirmation).
    """
    if delay is None:
        successor = procs.fakeSuccessor("c.sock", "real:confirmed")
        first.waitFor(rf"handoff to pid {successor.pid} confirmed")
        at = time.monotonic()
        assert successor.wait(20) == -signal.SIGKILL
        return successor, at
    successor = procs.server(["--takeover", "c.sock"], "gen2").start()
    first.waitFor(rf"handoff to pid {successor.pid} confirmed")
    # The scenario's own clock: the successor dies this long after it was confirmed.
    time.sleep(delay)
    successor.kill()
    return successor, time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [None, 0.1, 0.5, 2.0], ids=["at-confirm", "0.1s", "0.5s", "2s"])
def test_successorKilledAfterConfirmIsUndone(
    procs: Processes, workdir: Path, delay: float | None
) -> None:
    """
    A successor SIGKILLed right after it was confirmed (or 0.1, 0.5, 2 s after), while the
    predecessor still drains a held session: the predecessor resumes and answers new
    connections (no connection refused under load), the pidfile and the control socket name and
    reach it, and a later takeover succeeds.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    load = Load(port, clients=4, size=1024, downloaders=0).start()
    try:
        successor, diedAt = _killSuccessor(procs, first, delay)
        elapsed, body = _firstAnswerAfter(port)
        assert f"pid {first.pid}".encode() in body
        first.waitFor(
            rf"generation 1 \(pid {first.pid}\) resumed serving: the successor (disconnected|"
            rf"\(pid {successor.pid}\) exited)"
        )
        print(
            f"delay {delay}: first answer {elapsed * 1000:.0f} ms after the request, "
            f"{(time.monotonic() - diedAt) * 1000:.0f} ms after the successor died"
        )
        status = _status(workdir)
        assert status["pid"] == first.pid and status["state"] == "serving"
        assert all(item["accepting"] for item in status["listeners"])
        assert (workdir / "app.pid").read_text().strip() == str(first.pid)
    finally:
        result = load.stop()
    assert result.errors.get("refused", 0) == 0, result.examples
    assert result.ok > 0
    # A later takeover goes through, and the held session still drains on the old process.
    third = procs.server(["--takeover", "c.sock"], "gen3").start()
    third.waitFor(r"took over from pid %d" % first.pid)
    status = _status(workdir)
    assert status["pid"] == third.pid
    assert (workdir / "app.pid").read_text().strip() == str(third.pid)
    held.close()
    assert first.wait(30) == 0
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {third.pid}".encode() in body
    assert "Traceback" not in first.text()


@pytest.mark.slow
def test_successorStoppedOnPurposeDoesNotResumeThePredecessor(
    procs: Processes, workdir: Path
) -> None:
    """
    A successor stopped with SIGTERM while its predecessor stands by tells it so first: the
    predecessor stands down and drains on without resuming, the service is down (connections
    refused, the control socket gone), and the predecessor exits once its session ends.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    second = procs.server(["--takeover", "c.sock"], "gen2").start()
    first.waitFor(rf"handoff to pid {second.pid} confirmed")
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    first.waitFor(rf"no longer standing by: generation 2 \(pid {second.pid}\) is stopping")
    with pytest.raises(ConnectionRefusedError):
        httpGet("127.0.0.1", port, "/", timeout=5)
    assert not (workdir / "c.sock").exists()
    held.close()
    assert first.wait(30) == 0
    assert "resumed serving" not in first.text()


@pytest.mark.slow
def test_onlyTheDirectPredecessorStandsBy(procs: Processes, workdir: Path) -> None:
    """
    Over two handoffs (1 -> 2 -> 3), generation 1 is told to stand down when 3 commits; when 3
    is killed, generation 2 resumes and generation 1 does not (one generation accepts), and 1
    still drains its session.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    held1 = _holdSession(port)
    second = procs.server(["--takeover", "c.sock"], "gen2").start()
    first.waitFor(rf"handoff to pid {second.pid} confirmed")
    held2 = _holdSession(port)
    third = procs.server(["--takeover", "c.sock"], "gen3").start()
    second.waitFor(rf"handoff to pid {third.pid} confirmed")
    first.waitFor(r"no longer standing by: generation 3 \(pid %d\) takes over" % third.pid)
    third.kill()
    second.waitFor(r"generation 2 \(pid %d\) resumed serving" % second.pid)
    _, body = _firstAnswerAfter(port)
    assert f"pid {second.pid}".encode() in body
    status = _status(workdir)
    assert status["pid"] == second.pid and status["state"] == "serving"
    assert (workdir / "app.pid").read_text().strip() == str(second.pid)
    assert "resumed serving" not in first.text()
    assert first.process is not None and first.process.poll() is None
    held1.close()
    assert first.wait(30) == 0
    held2.close()


@pytest.mark.slow
def test_resumingOverAndOverKeepsDescriptorsFlat(procs: Processes, workdir: Path) -> None:
    """
    Five successors in a row, each killed right after it was confirmed: the predecessor resumes
    every time, and its descriptor count after each resume is what it was before the first
    handoff (every descriptor kept for the standby is reused, none leaks).
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    _firstAnswerAfter(port)
    before = first.fdCount()
    counts = []
    for _ in range(5):
        successor = procs.fakeSuccessor("c.sock", "real:confirmed")
        first.waitFor(rf"handoff to pid {successor.pid} confirmed")
        assert successor.wait(20) == -signal.SIGKILL
        first.waitFor(rf"resumed serving: .*\(pid {successor.pid}\) is lost")
        _, body = _firstAnswerAfter(port)
        assert f"pid {first.pid}".encode() in body
        counts.append(first.fdCount())
    held.close()
    assert counts == [before] * 5, (before, counts)
