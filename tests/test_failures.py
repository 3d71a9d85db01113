"""
Bad days, each under continuous client load: successors that die, hang, race or aim at the wrong
thing, predecessors that die while draining, and clients that never close.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.procs import TWISTD, Load, Processes, Server, ctl, freePort, httpGet

ROLLED_BACK = r"handoff to pid %d rolled back: %s"


def _portArgs(port: int, *extra: str) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock", *extra]


def _status(workdir: Path) -> dict:
    result = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _lightLoad(port: int) -> Load:
    return Load(port, clients=4, size=1024, downloaders=1, downloadSize=2 * 1024 * 1024).start()


def _assertServesAlone(workdir: Path, server: Server, port: int) -> None:
    status = _status(workdir)
    assert status["pid"] == server.pid
    assert (workdir / "app.pid").read_text().strip() == str(server.pid)
    assert status["state"] == "serving"
    assert all(item["accepting"] for item in status["listeners"])
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {server.pid}".encode() in body


@pytest.mark.parametrize(
    "step, reason",
    [
        ("connected", None),
        ("hello", "the successor disconnected"),
        ("fds", "the successor disconnected"),
        ("adopted", "the successor disconnected"),
        ("commit", "the successor disconnected"),
        ("real:accepting", "the successor disconnected"),
    ],
)
def test_successorKilledAtEachStep(
    procs: Processes, workdir: Path, step: str, reason: str | None
) -> None:
    """
    A successor killed with SIGKILL after connecting, after hello, after receiving the
    descriptors, after adopting them, right after commit, or once accepting but before it
    confirmed, leaves the predecessor serving and accepting with zero client failures.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = _lightLoad(port)
    try:
        doomed = procs.fakeSuccessor("c.sock", step)
        doomed.waitFor(r"reached %s" % step.partition(":")[2] or step)
        if step in ("commit", "real:accepting"):
            first.waitFor(r"committed .* paused accepting")
        doomed.kill()
        if reason is not None:
            first.waitFor(ROLLED_BACK % (doomed.pid, reason))
        _assertServesAlone(workdir, first, port)
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.ok > 0


def test_successorStoppedBeforeCommitIsRolledBackAndExitsWhenResumed(
    procs: Processes, workdir: Path
) -> None:
    """
    A successor stopped (SIGSTOP) before commit is rolled back at the handoff deadline with
    zero client failures; resumed (SIGCONT), it exits non-zero with a clear message instead of
    serving.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--handoff-timeout", "1"), "gen1").start()
    first.waitServing()
    load = _lightLoad(port)
    try:
        stopped = procs.fakeSuccessor("c.sock", "real:ready")
        stopped.waitFor(r"reached ready")
        first.waitFor(ROLLED_BACK % (stopped.pid, "the successor did not commit within 1 s"))
        stopped.signal(signal.SIGCONT)
        assert stopped.wait(30) == 1
        stopped.waitFor(r"takeover from .* failed: the predecessor closed the control connection")
        _assertServesAlone(workdir, first, port)
    finally:
        result = load.stop()
    assert "Traceback" not in stopped.text()
    assert result.errors == {}, result.examples
    assert (workdir / "c.sock").exists()


def test_successorStoppedAfterCommitIsRolledBackAndExitsWhenResumed(
    procs: Processes, workdir: Path
) -> None:
    """
    A successor stopped (SIGSTOP) right after the commit answer arrives is rolled back at the
    confirm deadline (the predecessor resumes accepting) with zero client failures; resumed, it
    never accepts and exits non-zero saying the commit answer came late.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--confirm-timeout", "1"), "gen1").start()
    first.waitServing()
    load = _lightLoad(port)
    try:
        stopped = procs.fakeSuccessor("c.sock", "real:committed")
        stopped.waitFor(r"reached committed")
        first.waitFor(
            ROLLED_BACK % (stopped.pid, "the successor did not confirm accepting within 1 s")
        )
        stopped.signal(signal.SIGCONT)
        assert stopped.wait(30) == 1
        stopped.waitFor(r"failed: the commit answer came \d+\.\d s late")
        _assertServesAlone(workdir, first, port)
    finally:
        result = load.stop()
    assert "serving on" not in stopped.text()
    assert "Traceback" not in stopped.text()
    assert result.errors == {}, result.examples
    assert (workdir / "c.sock").exists()


def test_successorStoppedBeforeConfirmingStepsBackWhenResumed(
    procs: Processes, workdir: Path
) -> None:
    """
    A successor stopped (SIGSTOP) after it started accepting but before it confirmed is rolled
    back at the confirm deadline; resumed, it steps back and exits non-zero, leaving the
    predecessor serving, the control socket in place and clients without a failure.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--confirm-timeout", "1"), "gen1").start()
    first.waitServing()
    load = _lightLoad(port)
    try:
        stopped = procs.fakeSuccessor("c.sock", "real:accepting")
        stopped.waitFor(r"reached accepting")
        first.waitFor(
            ROLLED_BACK % (stopped.pid, "the successor did not confirm accepting within 1 s")
        )
        stopped.signal(signal.SIGCONT)
        assert stopped.wait(30) == 1
        stopped.waitFor(r"failed: the predecessor (dropped the connection too late|rolled back)")
        _assertServesAlone(workdir, first, port)
    finally:
        result = load.stop()
    assert "Traceback" not in stopped.text()
    assert result.errors == {}, result.examples
    assert (workdir / "c.sock").exists()


def _holdSession(port: int) -> socket.socket:
    """
    A client that sends half a request and never finishes it: a session no drain closes.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")
    return s


def _waitForStatus(workdir: Path, predicate, what: str, attempts: int = 200) -> dict:
    """
    Poll status (bounded) until C{predicate} holds.
    """
    for _ in range(attempts):
        status = _status(workdir)
        if predicate(status):
            return status
        subprocess.run(["sleep", "0.05"])
    raise AssertionError(f"status never showed {what}: {status}")


def test_predecessorKilledWhileDrainingLeavesSuccessorServing(
    procs: Processes, workdir: Path
) -> None:
    """
    A predecessor killed (SIGKILL) while draining leaves the successor serving with zero client
    failures, and the successor's status no longer lists it as draining.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    load = Load(port, clients=4, size=1024, downloaders=0).start()
    try:
        second = procs.server(["--takeover", "c.sock"], "gen2").start()
        second.waitFor(r"took over from pid %d as generation 2" % first.pid)
        _waitForStatus(
            workdir,
            lambda s: (
                [(d["pid"], d["generation"], d["state"], d["sessions"]) for d in s["draining"]]
                == [(first.pid, 1, "draining", 1)]
            ),
            "the predecessor draining one session",
        )
        first.kill()
        second.waitFor(r"a draining predecessor has gone")
        status = _status(workdir)
        assert status["draining"] == []
        _assertServesAlone(workdir, second, port)
    finally:
        held.close()
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.ok > 0


def test_twoSuccessorsRacingOnlyOneTakesOver(procs: Processes, workdir: Path) -> None:
    """
    While one successor is mid-handoff, a second one is refused and exits non-zero with
    "handoff already in progress"; the first then completes, so exactly one takes over, with
    zero client failures.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = _lightLoad(port)
    try:
        winner = procs.fakeSuccessor("c.sock", "real:ready")
        winner.waitFor(r"reached ready")
        loser = procs.server(["--takeover", "c.sock"], "loser").start()
        assert loser.wait(60) != 0
        loser.waitFor(r"takeover from .* failed: handoff already in progress")
        winner.signal(signal.SIGCONT)
        winner.waitFor(r"took over from pid %d as generation 2" % first.pid)
        assert first.wait(60) == 0
        status = _status(workdir)
        assert status["pid"] == winner.pid
        assert status["generation"] == 2
    finally:
        result = load.stop()
    assert "Traceback" not in loser.text()
    assert result.errors == {}, result.examples


class _EchoServer:
    """
    A plain Unix-socket echo server on a thread: something that is not a graceful server.
    """

    def __init__(self, path: Path) -> None:
        import threading

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(60)
        self.echoed = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(60)
                try:
                    while data := conn.recv(65536):
                        self.echoed += len(data)
                        conn.sendall(data)
                except OSError:
                    pass

    def ping(self, path: Path) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(path))
            c.sendall(b"ping")
            return c.recv(4)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


def _takeover(workdir: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile", "", "graceful", "--takeover", path],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "target, message",
    [
        ("stale", "nothing listens at .*stale.sock \\(a stale socket"),
        ("file", "is not a socket"),
        ("missing", "there is no control socket at"),
    ],
)
def test_takeoverAimedAtNoServerFailsClearly(workdir: Path, target: str, message: str) -> None:
    """
    A takeover aimed at a stale socket file, a plain file or a missing path exits non-zero with
    one clear sentence and leaves the path as it was.
    """
    import re

    path = workdir / f"{target}.sock"
    if target == "stale":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(path))
    elif target == "file":
        path.write_text("not a socket\n")
    before = path.lstat().st_mode if target != "missing" else None
    result = _takeover(workdir, path.name)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(message, output), output
    assert "Traceback" not in output
    assert (path.lstat().st_mode if target != "missing" else None) == before


def test_takeoverAimedAtAnotherKindOfServerFailsClearly(workdir: Path) -> None:
    """
    A takeover aimed at a Unix socket served by something else (an echo server) exits non-zero
    saying it does not speak the control protocol, and the echo server still answers.
    """
    echo = _EchoServer(workdir / "echo.sock")
    try:
        result = _takeover(workdir, "echo.sock")
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "does not speak this protocol" in output, output
        assert "Traceback" not in output
        assert echo.ping(workdir / "echo.sock") == b"ping"
    finally:
        echo.close()


def test_takeoverFromAnotherProtocolVersionFailsClearly(procs: Processes, workdir: Path) -> None:
    """
    A takeover from a predecessor that answers Hello with a version error exits non-zero naming
    both versions, and the predecessor is not disturbed.
    """
    fake = procs.fakeSuccessor("old.sock", "predecessor:version")
    fake.waitFor(r"reached listening")
    result = _takeover(workdir, "old.sock")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "this server speaks control protocol 2, the successor 1" in output, output
    assert "Traceback" not in output
    assert fake.process is not None and fake.process.poll() is None
    assert (workdir / "old.sock").exists()


def test_drainDeadlineEndsClientsThatNeverClose(procs: Processes, workdir: Path) -> None:
    """
    A predecessor whose client never finishes its request still exits 0 at its --drain-timeout,
    closing that session, with zero failures among the other clients.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--drain-timeout", "1"), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    load = _lightLoad(port)
    try:
        second = procs.server(["--takeover", "c.sock"], "gen2").start()
        second.waitFor(r"took over from pid %d" % first.pid)
        assert first.wait(60) == 0
        first.waitFor(r"drain deadline passed: closed 1 sessions still open")
        _assertServesAlone(workdir, second, port)
    finally:
        held.close()
        result = load.stop()
    assert result.errors == {}, result.examples


def test_tooManyGenerationsDrainingRefusesTakeover(procs: Processes, workdir: Path) -> None:
    """
    With --max-draining 1 and one generation still draining, a new takeover is refused with a
    sentence naming the limit and exits non-zero; the server serves on, and once the draining
    generation is gone a takeover succeeds.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--max-draining", "1"), "gen1").start()
    first.waitServing()
    held = _holdSession(port)
    load = _lightLoad(port)
    try:
        second = procs.server(["--takeover", "c.sock", "--max-draining", "1"], "gen2").start()
        second.waitFor(r"took over from pid %d" % first.pid)
        refused = procs.server(["--takeover", "c.sock"], "gen3-refused").start()
        assert refused.wait(60) != 0
        refused.waitFor(
            r"failed: 1 generation\(s\) still draining \(--max-draining 1\); "
            r"try again when they have finished"
        )
        _assertServesAlone(workdir, second, port)
        held.close()
        assert first.wait(60) == 0
        _waitForStatus(workdir, lambda s: s["draining"] == [], "no generation draining")
        third = procs.server(["--takeover", "c.sock"], "gen3").start()
        third.waitFor(r"took over from pid %d as generation 3" % second.pid)
    finally:
        held.close()
        result = load.stop()
    assert "Traceback" not in refused.text()
    assert result.errors == {}, result.examples


def test_takeoverAimedAtASilentSocketFailsClearly(workdir: Path) -> None:
    """
    A takeover aimed at a socket that accepts connections but never answers gives up at its
    own --handoff-timeout, exits non-zero with one sentence, and leaves the socket in place.
    """
    path = workdir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(8)
        result = subprocess.run(
            [
                TWISTD,
                "-n",
                "--pidfile",
                "",
                "graceful",
                "--takeover",
                path.name,
                "--handoff-timeout",
                "1",
            ],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "did not answer Hello within 1 s" in output, output
    assert "Traceback" not in output
    assert path.exists()


def test_stepBackThenStopNeverUnlinksThePredecessorsSocket(workdir: Path) -> None:
    """
    A Unix listener released (a successor stepping back) and closed in the same reactor turn
    (the same successor stopping) keeps its path: only a close on its own may unlink it.
    """
    from twisted.internet.protocol import Factory
    from twisted.internet.selectreactor import SelectReactor

    from graceful_plugin.listeners import ListenerSpec, adoptListener, bindListener

    reactor = SelectReactor()
    path = workdir / "c.sock"
    sock = bindListener(ListenerSpec(name="control", kind="unix", path=str(path), mode=0o600))
    try:
        port = adoptListener(reactor, sock.fileno(), "unix", Factory(), name="control")
    finally:
        sock.close()
    released = port.release()
    closed = port.close()
    done: list[object] = []
    released.addBoth(done.append)
    for _ in range(10):
        if done:
            break
        reactor.iterate(0)
    assert done == [None]
    assert closed is released
    assert path.exists()
    reactor.disconnectAll()
