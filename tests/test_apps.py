"""
Applications named on the command line (``--wsgi``, ``--resource``, ``--factory``, ``--path``),
loaded anew by every successor, and their readiness awaited before a handoff commits.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.procs import TWISTD, Processes, ctl, freePort, httpGet

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
ENV = {"PYTHONPATH": str(ROOT)}


def _listen(port: int) -> list[str]:
    return ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]


class _Poller:
    """
    One thread making requests on fresh connections until stopped, counting the bodies' first
    words and every failure.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: Counter[bytes] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stop.is_set():
                return
            try:
                status, body = httpGet("127.0.0.1", self.port, "/poll", timeout=20)
                if status != 200:
                    raise AssertionError(f"status {status}")
                self.seen[b" ".join(body.split()[:2])] += 1
            except Exception as e:
                self.errors.append(repr(e))

    def __enter__(self) -> _Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_wsgiAppIsLoadedAnewBySuccessor(procs: Processes, workdir: Path) -> None:
    """
    A successor started with the same ``--wsgi`` name after the module changed on disk serves the
    new code, and requests made throughout the takeover all succeed.
    """
    shutil.copy(APPS / "wsgi_v1.py", workdir / "site_app.py")
    port = freePort()
    first = procs.server([*_listen(port), "--wsgi", "site_app.app"], "gen1").start(ENV)
    first.waitServing()
    assert httpGet("127.0.0.1", port, "/a")[1].startswith(b"wsgi v1 pid %d" % first.pid)
    shutil.copy(APPS / "wsgi_v2.py", workdir / "site_app.py")
    with _Poller(port) as poller:
        second = procs.server(["--takeover", "c.sock", "--wsgi", "site_app.app"], "gen2")
        second.start(ENV).waitFor(r"took over from pid %d" % first.pid)
        assert first.wait(60) == 0
        status, body = httpGet("127.0.0.1", port, "/b")
    assert poller.errors == []
    assert poller.seen[b"wsgi v1"] > 0
    assert status == 200
    assert body.startswith(b"wsgi v2 pid %d path /b" % second.pid)


def test_rawFactoryIsLoadedAnewBySuccessor(procs: Processes, workdir: Path) -> None:
    """
    A raw protocol factory named with ``--factory`` is replaced by the successor's: new
    connections greet with the new version while a connection opened before the takeover keeps
    talking to the old code until it closes, and then the predecessor exits 0.
    """
    port = freePort()
    first = procs.server([*_listen(port), "--factory", "tests.apps.echo_v1.factory"], "gen1")
    first.start(ENV).waitServing()
    old = socket.create_connection(("127.0.0.1", port), timeout=20)
    oldFile = old.makefile("rwb")
    try:
        assert oldFile.readline() == b"echo v1\n"
        second = procs.server(["--takeover", "c.sock", "--factory", "tests.apps.echo_v2.Echo"])
        second.start(ENV).waitFor(r"took over from pid %d" % first.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as new:
            newFile = new.makefile("rwb")
            assert newFile.readline() == b"echo v2\n"
            newFile.write(b"hello\n")
            newFile.flush()
            assert newFile.readline() == b"v2: hello\n"
        oldFile.write(b"still here\n")
        oldFile.flush()
        assert oldFile.readline() == b"v1: still here\n"
        first.waitFor(r"draining 1 sessions")
    finally:
        oldFile.close()
        old.close()
    assert first.wait(60) == 0


@pytest.mark.parametrize(
    ("option", "name", "sentence"),
    [
        (
            "--wsgi",
            "tests.apps.no_such_module.app",
            "there is no module 'tests.apps.no_such_module'",
        ),
        ("--wsgi", "tests.apps.wsgi_v1.notAnApp", "not a WSGI application"),
        ("--factory", "tests.apps.wsgi_v1.VERSION", "not a protocol factory"),
        ("--resource", "tests.apps.echo_v1.missing", "has no attribute 'missing'"),
        ("--wsgi", "tests.apps.broken_import.app", "RuntimeError: this release is broken"),
        ("--path", "no/such/dir", "no such directory"),
        ("--wsgi", "tests.apps.exits_at_import.app", "it called sys.exit(3)"),
    ],
)
def test_badApplicationStopsStartup(workdir: Path, option: str, name: str, sentence: str) -> None:
    """
    An application that does not import or is not of the kind named stops start-up with one
    clear sentence, no traceback, and a non-zero exit.
    """
    port = freePort()
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile", "", "graceful", *_listen(port), option, name],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, **ENV},
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert sentence in output
    assert "Traceback" not in output
    assert not (workdir / "c.sock").exists()


def test_twoApplicationsAreRefused(workdir: Path) -> None:
    """
    Naming two applications is refused with one sentence.
    """
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile", "", "graceful", "--port", "0", "--path", ".", "--wsgi", "a.b"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "name one application only" in result.stdout + result.stderr


def test_takeoverWithBrokenAppLeavesPredecessorServing(procs: Processes, workdir: Path) -> None:
    """
    A successor whose application fails to import exits non-zero before it ever says hello, and
    the predecessor serves on undisturbed; a good successor then takes over.
    """
    port = freePort()
    first = procs.server([*_listen(port), "--wsgi", "tests.apps.wsgi_v1.app"], "gen1")
    first.start(ENV).waitServing()
    with _Poller(port) as poller:
        bad = procs.server(["--takeover", "c.sock", "--wsgi", "tests.apps.broken_import.app"])
        bad.start(ENV)
        assert bad.wait(60) != 0
        assert "this release is broken" in bad.text()
        assert "Traceback" not in bad.text()
        good = procs.server(["--takeover", "c.sock", "--wsgi", "tests.apps.wsgi_v2.app"], "good")
        good.start(ENV).waitFor(r"took over from pid %d" % first.pid)
        assert first.wait(60) == 0
    assert "handoff to pid %d" % bad.pid not in first.text()
    assert poller.errors == []
    assert poller.seen[b"wsgi v1"] > 0
    assert httpGet("127.0.0.1", port, "/")[1].startswith(b"wsgi v2 pid %d" % good.pid)


def test_badSuccessorsLeavePredecessorServing(procs: Processes, workdir: Path) -> None:
    """
    Successors whose application is not WSGI, lacks the attribute named, or calls sys.exit()
    at import each exit non-zero with one sentence in their log (no traceback, not the
    application's own status), and the predecessor serves on throughout.
    """
    port = freePort()
    first = procs.server([*_listen(port), "--wsgi", "tests.apps.wsgi_v1.app"], "gen1")
    first.start(ENV).waitServing()
    with _Poller(port) as poller:
        for n, (name, sentence) in enumerate(
            [
                ("tests.apps.wsgi_v1.notAnApp", "not a WSGI application"),
                ("tests.apps.wsgi_v1.missing", "has no attribute 'missing'"),
                ("tests.apps.exits_at_import.app", "it called sys.exit(3)"),
            ]
        ):
            bad = procs.server(["--takeover", "c.sock", "--wsgi", name], f"bad{n}")
            bad.start(ENV)
            status = bad.wait(60)
            assert status not in (0, 3), (name, status)
            assert sentence in bad.text(), name
            assert "Traceback" not in bad.text()
    assert "handoff" not in first.text()
    assert poller.errors == []
    assert httpGet("127.0.0.1", port, "/")[1].startswith(b"wsgi v1 pid %d" % first.pid)


def test_failedReadinessRollsBack(procs: Processes, workdir: Path) -> None:
    """
    A successor whose application's ready() fails rolls the handoff back before commit: it exits
    non-zero and the predecessor serves on.
    """
    port = freePort()
    first = procs.server([*_listen(port), "--wsgi", "tests.apps.wsgi_v1.app"], "gen1")
    first.start(ENV).waitServing()
    bad = procs.server(["--takeover", "c.sock", "--wsgi", "tests.apps.slow_ready.broken"], "bad")
    bad.start(ENV)
    assert bad.wait(60) != 0
    assert "the database is down" in bad.text()
    first.waitFor(r"rolled back: the successor gave up: .*the database is down")
    assert "committed" not in first.text()
    assert httpGet("127.0.0.1", port, "/")[1].startswith(b"wsgi v1 pid %d" % first.pid)


def test_slowReadinessDelaysCommit(procs: Processes, workdir: Path) -> None:
    """
    While the successor's application is not ready, the handoff does not commit and the
    predecessor alone answers; once it is ready, the successor commits and serves.
    """
    port = freePort()
    readyFile = workdir / "ready"
    first = procs.server(_listen(port), "gen1").start(ENV)
    first.waitServing()
    second = procs.server(["--takeover", "c.sock", "--wsgi", "tests.apps.slow_ready.app"], "gen2")
    second.start({**ENV, "GRACEFUL_TEST_READY_FILE": str(readyFile)})
    second.waitFor(r"warming up until")
    for _ in range(20):
        status, body = httpGet("127.0.0.1", port, "/")
        assert body.startswith(b"graceful demo: pid %d" % first.pid)
    status_ = ctl(workdir, "--control", "c.sock", "status", "--json")
    assert f'"pid": {first.pid}' in status_.stdout
    assert "committed" not in first.text()
    assert "took over" not in second.text()
    readyFile.touch()
    second.waitFor(r"took over from pid %d" % first.pid)
    assert first.wait(60) == 0
    assert httpGet("127.0.0.1", port, "/")[1] == b"slow app pid %d\n" % second.pid


def test_firstGenerationAcceptsOnlyWhenReady(procs: Processes, workdir: Path) -> None:
    """
    A first generation whose application is not ready yet listens without serving: a request
    sent meanwhile waits in the queue (it is not refused) and is answered once the application
    is ready.
    """
    port = freePort()
    readyFile = workdir / "ready"
    server = procs.server([*_listen(port), "--wsgi", "tests.apps.slow_ready.app"], "gen1")
    server.start({**ENV, "GRACEFUL_TEST_READY_FILE": str(readyFile)})
    server.waitFor(r"warming up until")
    early = socket.create_connection(("127.0.0.1", port), timeout=30)
    with early:
        early.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert "serving on" not in server.text()
        readyFile.touch()
        server.waitServing()
        response = b""
        while chunk := early.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"slow app pid %d\n" % server.pid)


def test_firstGenerationStoppedWhileGettingReady(procs: Processes, workdir: Path) -> None:
    """
    A first generation stopped (SIGTERM) while its application is still getting ready exits 0
    and removes its control socket and pidfile.
    """
    port = freePort()
    server = procs.server([*_listen(port), "--wsgi", "tests.apps.slow_ready.app"], "gen1")
    server.start({**ENV, "GRACEFUL_TEST_READY_FILE": str(workdir / "never")})
    server.waitFor(r"warming up until")
    assert (workdir / "c.sock").exists()
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert not (workdir / "c.sock").exists()
    assert not (workdir / "app.pid").exists()


def test_firstGenerationNotReadyExits(procs: Processes, workdir: Path) -> None:
    """
    A first generation whose application's ready() fails exits 1 with the reason, and removes
    its control socket.
    """
    port = freePort()
    server = procs.server([*_listen(port), "--wsgi", "tests.apps.slow_ready.broken"], "gen1")
    server.start(ENV)
    assert server.wait(60) == 1
    assert "cannot start: the application is not ready: the database is down" in server.text()
    assert not (workdir / "c.sock").exists()


def test_staticFilesThenResourceAcrossTakeover(procs: Processes, workdir: Path) -> None:
    """
    A generation serving a directory with ``--path`` is taken over by one serving a resource
    built by the callable ``--resource`` names: each serves its own application.
    """
    site = workdir / "site"
    site.mkdir()
    (site / "hello.txt").write_bytes(b"static hello\n")
    port = freePort()
    first = procs.server([*_listen(port), "--path", "site"], "gen1").start(ENV)
    first.waitServing()
    assert httpGet("127.0.0.1", port, "/hello.txt") == (200, b"static hello\n")
    second = procs.server(
        ["--takeover", "c.sock", "--resource", "tests.apps.resource_app.makeRoot"], "gen2"
    )
    second.start(ENV).waitFor(r"took over from pid %d" % first.pid)
    assert first.wait(60) == 0
    assert httpGet("127.0.0.1", port, "/hello.txt") == (200, b"resource pid %d\n" % second.pid)


def test_applicationWithoutWebSocketsDoesNotImportAutobahn(tmp_path: Path) -> None:
    """
    Building the factory of an application that does not use autobahn does not import it (it
    costs a successor about 40 ms of CPU before it serves), even where autobahn is installed.
    """
    script = (
        "import sys\n"
        "from graceful_plugin.apps import loadApplication\n"
        f"loadApplication('path', {str(tmp_path)!r}).factory()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'autobahn'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_firstGenerationFreezesWhatItsStartUpLeft(procs: Processes, workdir: Path) -> None:
    """
    A first generation collects and freezes the objects its start-up left (the application
    included) before it serves, as a successor does: later collections do not walk them, nor
    does the interpreter's teardown when it exits after a takeover (measured: 55 ms of CPU
    more at the first takeover without).
    """
    port = freePort()
    first = procs.server([*_listen(port), "--resource", "tests.apps.gc_probe.makeRoot"], "gen1")
    first.start(ENV).waitServing()
    code, body = httpGet("127.0.0.1", port, "/")
    assert code == 200 and int(body) > 10000, body
