"""
``graceful-ctl`` against real servers: restart (the server starts its own successor), watch,
stop, and the sentences it answers with when something is wrong.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graceful_plugin.ctl import CtlError, checkVersion, formatStatus
from graceful_plugin.restart import successorCommand
from tests.operate import (
    becomeSubreaper,
    openDownload,
    readToEnd,
    status,
    track,
    waitForExit,
    waitForPid,
    waitForText,
)
from tests.procs import CTL, Load, Processes, ctl, freePort, httpGet, waitForSessions

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    becomeSubreaper()


def _portArgs(port: int, *extra: str) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock", *extra]


def _noTraceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_restartStartsTheSuccessorAndReportsTheHandoff(procs: Processes, workdir: Path) -> None:
    """
    ``graceful-ctl restart`` makes the server start its successor from its own command line:
    the ctl prints each phase and exits 0 once the successor serves, the pidfile and status
    name the successor as generation 2, the old process exits 0, and requests are answered by
    the new one.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
    successor = waitForPid(workdir / "app.pid", first.pid)
    track(procs, successor)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for phase in ("spawned", "hello", "committed", "accepting"):
        assert f" {phase} " in out, out
    assert f"restarted: pid {successor} (generation 2) serves" in out
    assert first.wait(30) == 0
    now = status(workdir)
    assert (now["pid"], now["generation"], now["state"]) == (successor, 2, "serving")
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and f"pid {successor}, generation 2".encode() in body


def test_restartJsonAndChainedRestarts(procs: Processes, workdir: Path) -> None:
    """
    ``restart --json`` prints one JSON object naming the successor, its generation and the
    phases; three restarts in a row each hand over to a new pid, under load, with no failed
    request.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    load = Load(port, clients=4, size=1024, downloaders=1, downloadSize=1024 * 1024).start()
    previous = first.pid
    try:
        for generation in (2, 3, 4):
            result = ctl(workdir, "--control", "c.sock", "restart", "--json", timeout=60)
            successor = waitForPid(workdir / "app.pid", previous)
            track(procs, successor)
            assert result.returncode == 0, result.stdout + result.stderr
            answer = json.loads(result.stdout)
            assert answer["ok"] is True
            assert (answer["pid"], answer["generation"]) == (successor, generation)
            assert answer["previous"] == {"pid": previous, "generation": generation - 1}
            assert [p["phase"] for p in answer["phases"]][:3] == ["spawned", "hello", "committed"]
            waitForExit(previous)
            previous = successor
    finally:
        result = load.stop()
    assert result.errors == {}, result.examples
    assert result.ok > 0


def test_restartRollsBackWhenTheSuccessorFails(procs: Processes, workdir: Path) -> None:
    """
    A successor that exits non-zero before taking over makes ``restart`` exit 1 with the
    reason (its exit status), and the same process serves on.
    """
    port = freePort()
    command = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    first = procs.server(_portArgs(port, "--restart-command", command), "gen1").start()
    first.waitServing()
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
    assert result.returncode == 1
    assert "restart failed: the successor (pid" in result.stderr
    assert "exited with status 3 before taking over" in result.stderr
    _noTraceback(result)
    assert status(workdir)["pid"] == first.pid
    assert httpGet("127.0.0.1", port, "/")[0] == 200
    answer = json.loads(ctl(workdir, "-c", "c.sock", "restart", "--json", timeout=60).stdout)
    assert answer["ok"] is False and "status 3" in answer["error"]


def test_restartRollsBackWhenTheSuccessorNeverCommits(procs: Processes, workdir: Path) -> None:
    """
    A successor that says hello but never commits is rolled back at the handoff deadline:
    ``restart`` exits 1 naming the deadline, and the old process serves on.
    """
    port = freePort()
    env = f"PYTHONPATH={REPO}"
    command = f"env {env} {sys.executable} -m tests.fake_successor c.sock hello"
    args = _portArgs(port, "--handoff-timeout", "1", "--restart-command", command)
    first = procs.server(args, "gen1").start()
    first.waitServing()
    result = ctl(workdir, "--control", "c.sock", "restart", timeout=60)
    fake = waitForText(first.log, r"restart: started successor pid (\d+)")
    track(procs, int(fake.group(1)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "was rolled back: the successor did not commit within 1 s" in result.stderr
    assert status(workdir)["pid"] == first.pid
    assert httpGet("127.0.0.1", port, "/")[0] == 200


def test_restartClientWaitsAtIdlePriority(procs: Processes, workdir: Path) -> None:
    """
    ``graceful-ctl restart`` goes to idle priority before it asks (it only waits from then on),
    so its CPU does not compete with the serving process; the restart still completes.
    """
    port = freePort()
    env = f"PYTHONPATH={REPO}"
    command = f"env {env} {sys.executable} -m tests.fake_successor c.sock hello"
    args = _portArgs(port, "--handoff-timeout", "3", "--restart-command", command)
    first = procs.server(args, "gen1").start()
    first.waitServing()
    client = subprocess.Popen(
        [CTL, "--control", "c.sock", "restart"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The fake successor said hello and never commits: the client is waiting now.
        fake = waitForText(first.log, r"restart: hello after [\d.]+ ms successor pid (\d+)")
        track(procs, int(fake.group(1)))
        assert os.sched_getscheduler(client.pid) == os.SCHED_IDLE
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate(timeout=10)
    assert client.returncode == 1, out + err
    assert "the successor did not commit within 3 s" in err


def test_watchFollowsTheDrainingGeneration(procs: Processes, workdir: Path) -> None:
    """
    ``graceful-ctl watch`` shows the draining predecessor with its live session while a slow
    download is in flight, and exits 0 once no generation drains.
    """
    port = freePort()
    first = procs.server(_portArgs(port, "--drain-timeout", "3"), "gen1").start()
    first.waitServing()
    download = openDownload(port)
    try:
        waitForSessions(workdir, 1)
        assert ctl(workdir, "-c", "c.sock", "restart", timeout=60).returncode == 0
        successor = waitForPid(workdir / "app.pid", first.pid)
        track(procs, successor)
        watched = ctl(workdir, "-c", "c.sock", "watch", "--interval", "0.2", timeout=60)
    finally:
        download.close()
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert f"generation 1 (pid {first.pid}) 1 sessions" in lines[0], lines
    assert f"generation 2 (pid {successor}) serving" in lines[-1]
    assert lines[-1].endswith("draining: none")
    assert first.wait(30) == 0


def test_watchGivesUpAtItsTimeout(procs: Processes, workdir: Path) -> None:
    """
    ``watch --timeout`` exits 1 with a sentence while a generation still drains.
    """
    port = freePort()
    first = procs.server(_portArgs(port), "gen1").start()
    first.waitServing()
    download = openDownload(port)
    try:
        waitForSessions(workdir, 1)
        assert ctl(workdir, "-c", "c.sock", "restart", timeout=60).returncode == 0
        track(procs, waitForPid(workdir / "app.pid", first.pid))
        watched = ctl(workdir, "-c", "c.sock", "watch", "--timeout", "0.5", "--json")
    finally:
        download.close()
    assert watched.returncode == 1
    assert "still draining after 0.5 s" in watched.stderr
    assert json.loads(watched.stdout.splitlines()[0])["draining"][0]["pid"] == first.pid


def test_stopWithDrainTimeoutClosesWhatIsLeft(procs: Processes, workdir: Path) -> None:
    """
    ``graceful-ctl stop --drain-timeout 1`` stops accepting, closes a download still in
    flight at that deadline (not the server's 60 s one), and the server exits 0 and removes
    its control socket.
    """
    port = freePort()
    server = procs.server(_portArgs(port), "gen1").start()
    server.waitServing()
    download = openDownload(port)
    try:
        waitForSessions(workdir, 1)
        result = ctl(workdir, "-c", "c.sock", "stop", "--drain-timeout", "1")
        assert result.returncode == 0
        assert "stopping the server at" in result.stdout
        assert server.wait(30) == 0
        received = readToEnd(download, 1024 * 1024 * 1024)
    finally:
        download.close()
    assert "drain deadline passed: closed 1 sessions still open" in server.text()
    assert received < 1024 * 1024 * 1024
    assert not (workdir / "c.sock").exists()


def test_noServerStaleSocketAndBadInput(workdir: Path) -> None:
    """
    No socket, a stale socket nobody listens on, and a bad option each give one sentence and a
    non-zero exit, never a traceback.
    """
    missing = ctl(workdir, "-c", "nothing.sock", "restart")
    assert missing.returncode == 1
    assert "no server at" in missing.stderr and "no such socket" in missing.stderr
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "stale.sock"))
    stale.close()
    refused = ctl(workdir, "-c", "stale.sock", "watch")
    assert refused.returncode == 1
    assert "nothing listens at" in refused.stderr
    bad = ctl(workdir, "-c", "c.sock", "stop", "--drain-timeout", "soon")
    assert bad.returncode == 2
    assert "expected a number of seconds, not 'soon'" in bad.stderr
    for result in (missing, refused, bad):
        _noTraceback(result)


def test_protocolMismatchIsNamed(workdir: Path) -> None:
    """
    A server speaking another control protocol version is refused with a sentence naming both
    versions.
    """
    server = subprocess.Popen(
        [sys.executable, "-c", _FAKE_SERVER, str(workdir / "c.sock")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        result = ctl(workdir, "-c", "c.sock", "status")
    finally:
        server.kill()
        server.wait(10)
    assert result.returncode == 1
    assert "the server speaks control protocol 99, this client 1" in result.stderr
    _noTraceback(result)
    with pytest.raises(CtlError):
        checkVersion(99)


_FAKE_SERVER = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from graceful_plugin.control import ClientHandler, ControlProtocol

    class Handler(ClientHandler):
        def status(self, protocol, start=0):
            return {"version": 99, "pid": 1, "generation": 1, "state": "serving",
                    "uptime": 0.0, "listeners": [], "draining": []}

    reactor.listenUNIX(sys.argv[1], Factory.forProtocol(lambda: ControlProtocol(Handler())))
    reactor.callWhenRunning(print, "listening", flush=True)
    reactor.run()
    """
)


def test_successorCommandKeepsOptionsAndAddsTakeover() -> None:
    """
    The successor's command line is the server's own, with the interpreter in front, any
    earlier --takeover dropped and --takeover CONTROL at the end (the subcommand's options).
    """
    argv = [
        "python3",
        "/venv/bin/twistd",
        "-n",
        "graceful",
        "--port",
        "8080",
        "--takeover",
        "/old.sock",
        "--takeover=/older.sock",
        "--wsgi",
        "app.wsgi",
    ]
    assert successorCommand(argv, "/run/c.sock", executable="/venv/bin/python") == [
        "/venv/bin/python", "/venv/bin/twistd", "-n", "graceful", "--port", "8080", "--wsgi",
        "app.wsgi", "--takeover", "/run/c.sock",
    ]  # fmt: skip


def test_successorInheritsNoDescriptor(workdir: Path) -> None:
    """
    A successor is started with stdin from /dev/null, in a session of its own, and with no
    descriptor beyond 0-2, even one left inheritable.
    """
    from graceful_plugin.restart import spawnDetached

    leaked = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    out = workdir / "fds.json"
    probe = (
        "import json, os; fds = sorted(int(f) for f in os.listdir('/proc/self/fd'));"
        " json.dump({'fds': fds, 'sid': os.getsid(0), 'pid': os.getpid(),"
        f" 'stdin': os.readlink('/proc/self/fd/0')}}, open({str(out)!r}, 'w'))"
    )
    try:
        child = spawnDetached([sys.executable, "-c", probe], str(workdir))
        assert child.wait(30) == 0
    finally:
        os.close(leaked)
    seen = json.loads(out.read_text())
    assert leaked not in seen["fds"]
    assert max(seen["fds"]) <= 3  # 0-2, and the descriptor listdir itself opened
    assert seen["sid"] == seen["pid"]
    assert seen["stdin"] == "/dev/null"


_APP = """
import os
import shlex

def app(environ, start_response):
    body = b"release %s pid %d" % ({release!r}, os.getpid())
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def test_restartLoadsTheCodeOnDiskAndRefusesBrokenCode(procs: Processes, workdir: Path) -> None:
    """
    ``restart`` re-runs the server's own command line, so the successor serves the code on disk
    now: a broken release is rolled back (exit 1, the old release serves on) and a good one
    takes over (exit 0, the new release answers).
    """
    port = freePort()
    release = workdir / "release.py"
    release.write_text(_APP.format(release=b"1"))
    env = {"PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    first = procs.server(_portArgs(port, "--wsgi", "release.app"), "gen1").start(env)
    first.waitServing()
    assert httpGet("127.0.0.1", port, "/")[1] == b"release 1 pid %d" % first.pid
    release.write_text("def app(:\n")
    broken = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert broken.returncode == 1
    assert "exited with status 1 before taking over" in broken.stderr
    assert httpGet("127.0.0.1", port, "/")[1] == b"release 1 pid %d" % first.pid
    release.write_text(_APP.format(release=b"2"))
    fixed = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    successor = waitForPid(workdir / "app.pid", first.pid)
    track(procs, successor)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert httpGet("127.0.0.1", port, "/")[1] == b"release 2 pid %d" % successor
    assert first.wait(30) == 0


def test_aRealRestartPassesNoListeningSocket(procs: Processes, workdir: Path) -> None:
    """
    The process a serving server starts for a restart holds no socket at all: the listening
    sockets reach a successor only through the control socket.
    """
    port = freePort()
    dump = workdir / "fds.json"
    probe = textwrap.dedent(
        f"""
        import json, os, sys
        targets = {{}}
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets[fd] = os.readlink(f"/proc/self/fd/{{fd}}")
            except OSError:
                pass  # the descriptor listdir used, closed by now
        json.dump(targets, open({str(dump)!r}, "w"))
        sys.exit(5)
        """
    )
    command = f"{sys.executable} -c {shlex.quote(probe)}"
    first = procs.server(_portArgs(port, "--restart-command", command), "gen1").start()
    first.waitServing()
    result = ctl(workdir, "-c", "c.sock", "restart", timeout=60)
    assert result.returncode == 1
    assert "exited with status 5" in result.stderr
    targets = json.loads(dump.read_text())
    assert not [t for t in targets.values() if t.startswith("socket:")], targets
    assert targets["0"] == "/dev/null"


def test_statusForPeopleCountsTheConnectionsHandedOver() -> None:
    """
    The human status says how many idle connections draining generations handed over so far,
    after the live sessions; with none, or from a server that does not say, there is no line.
    """
    status = {
        "pid": 10,
        "generation": 3,
        "state": "serving",
        "uptime": 3.0,
        "listeners": [],
        "draining": [],
        "handedOver": 40,
    }
    lines = formatStatus(status).splitlines()
    live = lines.index("live sessions: 0")
    assert lines[live + 1] == "idle connections handed over by draining generations: 40"
    for quiet in (0, None):
        text = formatStatus({**status, "handedOver": quiet})
        assert "handed over" not in text, text
    del status["handedOver"]
    assert "handed over" not in formatStatus(status)


def test_statusForPeopleShowsEachWorkersBalance() -> None:
    """
    The human status names, for each process of a balancing group, how many times it held
    and whether it holds now; a process without balance entries (older server, balance off)
    shows neither.
    """
    status = {
        "pid": 10,
        "generation": 1,
        "state": "serving",
        "uptime": 3.0,
        "listeners": [],
        "draining": [],
        "workers": [
            {"index": 0, "pid": 10, "sessions": 4, "restarts": 0, "holding": True, "holds": 7},
            {"index": 1, "pid": 11, "sessions": 2, "restarts": 1, "holding": False, "holds": 0},
            {"index": 2, "pid": 12, "sessions": 1, "restarts": 0, "holding": None, "holds": None},
        ],
    }
    text = formatStatus(status)
    assert (
        "workers: 3: pid 10 4 sessions, holding, held 7 times,"
        " pid 11 2 sessions (1 restarts), held 0 times, pid 12 1 sessions\n"
    ) in text, text
