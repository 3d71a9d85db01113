"""
The fork server's parts without processes: what it checks on disk, which commands it can run as
a fork, the launcher's choice between a fork and a full start (on a L{Clock}, with a fake link),
the takeover command line that makes a start-up idle, and the redacted form of a logged command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.forkclient import ForkFailed, ForkLauncher
from graceful_plugin.forkserver import NotForkable, Snapshot, addressFor, program
from graceful_plugin.priority import isTakeoverCommand
from graceful_plugin.restart import redactCommand


class _Module:
    def __init__(self, path: str) -> None:
        self.__file__ = path


@pytest.mark.parametrize("watch", [False, True])
def test_snapshotSeesChangedSizeMtimeAndRemovedFiles(tmp_path: Path, watch: bool) -> None:
    """
    A snapshot of imported files reports a file whose mtime or size changed, or that is gone,
    and nothing while they are as they were; with a watch on their directory as without, and
    on every later look too.
    """
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    snapshot = Snapshot.take([_Module(str(a)), _Module(str(b))], watch=watch)
    assert (snapshot.watch is not None) == watch
    assert snapshot.changed() is None
    assert snapshot.changed() is None
    later = a.stat().st_mtime_ns + 5_000_000_000
    os.utime(a, ns=(later, later))
    assert snapshot.changed() == f"{a} changed on disk"
    assert snapshot.changed() == f"{a} changed on disk"
    snapshot = Snapshot.take([_Module(str(a)), _Module(str(b))], watch=watch)
    b.write_text("y = 22\n")
    os.utime(b, ns=(later, later))
    assert snapshot.changed() == f"{b} changed on disk"  # size differs, mtime kept
    snapshot = Snapshot.take([_Module(str(a)), _Module(str(b))], watch=watch)
    a.unlink()
    assert snapshot.changed() == f"{a} is gone"


def test_watchedSnapshotLooksOnlyAfterSomethingHappened(tmp_path: Path) -> None:
    """
    With a watch, the files are looked at again only after something happened in a watched
    directory: a file of an unwatched directory (planted in the snapshot here to show it) can
    change unseen, until anything happens in a watched one; a new file beside the watched ones
    means a look that finds nothing.
    """
    watched, elsewhere = tmp_path / "watched", tmp_path / "elsewhere"
    watched.mkdir()
    elsewhere.mkdir()
    a, b = watched / "a.py", elsewhere / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    snapshot = Snapshot.take([_Module(str(a))], watch=True)
    assert snapshot.watch is not None
    st = b.stat()
    snapshot.files[str(b)] = (st.st_size, st.st_mtime_ns)
    (watched / "new.py").write_text("")
    assert snapshot.changed() is None
    b.write_text("y = 22\n")
    assert snapshot.changed() is None  # nothing happened where we watch: not looked at
    os.utime(a)  # something happens in the watched directory (a's size stays)
    snapshot.files[str(a)] = (a.stat().st_size, a.stat().st_mtime_ns)
    assert snapshot.changed() == f"{b} changed on disk"


def test_unwatchableDirectoriesAreLookedAtEveryTime(tmp_path: Path) -> None:
    """
    A directory that cannot be watched is named by the watch, and the files the snapshot holds
    there are looked at on every check, though nothing happened where it does watch.
    """
    from graceful_plugin.dirwatch import DirectoryWatch

    watched = tmp_path / "watched"
    watched.mkdir()
    watch = DirectoryWatch.of([str(watched), str(tmp_path / "gone")])
    assert watch is not None and watch.missed == {str(tmp_path / "gone")}
    b = tmp_path / "b.py"  # stands for a file in a directory the watch missed
    b.write_text("y = 2\n")
    st = b.stat()
    snapshot = Snapshot({str(b): (st.st_size, st.st_mtime_ns)}, {}, watch, unwatched=[str(b)])
    assert snapshot.changed() is None
    b.write_text("y = 22\n")
    assert snapshot.changed() == f"{b} changed on disk"


def test_everyDirectoryOfAPreloadIsWatched() -> None:
    """
    The fork server's own snapshot (every module loaded here, some with a relative path)
    watches every directory: nothing is left to look at on each check.
    """
    snapshot = Snapshot.take(watch=True)
    assert snapshot.watch is not None
    assert snapshot.watch.missed == frozenset() and snapshot.unwatched == []


def test_snapshotSeesTheInterpreterAndPythonVariables() -> None:
    """
    The interpreter binary is part of the snapshot, and a successor whose PYTHON* variables
    differ from the fork server's is reported as needing a fresh one.
    """
    snapshot = Snapshot.take([])
    assert sys.executable in snapshot.files
    env = dict(os.environ)
    assert snapshot.changed(env) is None
    env["PYTHONPATH"] = "/elsewhere"
    assert snapshot.changed(env) == "the successor's PYTHON* environment differs"


def test_snapshotOfEveryModuleIsCheapEnough() -> None:
    """
    Checking every loaded module's file takes milliseconds (printed; the benchmark measures the
    fork server's).
    """
    import time

    snapshot = Snapshot.take()
    started = time.perf_counter()
    assert snapshot.changed() is None
    elapsed = (time.perf_counter() - started) * 1000
    print(f"checked {len(snapshot.files)} files in {elapsed:.2f} ms")


def test_programOfACommand(tmp_path: Path) -> None:
    """
    A command runs as a fork when it is this interpreter with a script or -m module (or a
    script whose #! names this interpreter); other interpreters, options and programs do not.
    """
    exe = sys.executable
    assert program([exe, "/bin/twistd", "-n", "graceful"], exe) == (
        "script",
        "/bin/twistd",
        ["-n", "graceful"],
    )
    assert program([exe, "-m", "twisted", "graceful"], exe) == ("module", "twisted", ["graceful"])
    script = tmp_path / "twistd"
    script.write_text(f"#!{exe}\nprint(1)\n")
    assert program([str(script), "-n"], exe) == ("script", str(script), ["-n"])
    real = os.path.realpath(exe)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "other" / "bin").mkdir(parents=True)
    python, python3 = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "python3"
    elsewhere = tmp_path / "other" / "bin" / "python3"
    for link in (python, python3, elsewhere):
        link.symlink_to(real)
    # The same binary in the same directory (python and python3 of one virtualenv) is the same
    # interpreter; the same binary linked from another virtualenv is not.
    assert program([str(python), "/bin/twistd"], str(python3))[0] == "script"
    with pytest.raises(NotForkable, match="not this fork server's interpreter"):
        program([str(elsewhere), "/bin/twistd"], str(python3))
    for command, reason in [
        (["/usr/bin/env", "twistd"], "not this fork server's interpreter"),
        ([exe, "-X", "dev", "/bin/twistd"], "the option -X"),
        ([exe], "without a script"),
        ([], "empty"),
    ]:
        with pytest.raises(NotForkable, match=reason):
            program(command, exe)


def test_addressIsAbstractAndPerControlSocket(tmp_path: Path) -> None:
    """
    The fork server's address is an abstract socket name, the same for one control socket
    however it is spelled, and different for another one or another uid.
    """
    one = addressFor(str(tmp_path / "c.sock"))
    assert one.startswith("@graceful-fork-")
    assert addressFor(str(tmp_path / "." / "c.sock")) == one
    assert addressFor(str(tmp_path / "d.sock")) != one
    assert addressFor(str(tmp_path / "c.sock"), uid=12345) != one
    assert len(one) < 100


def test_takeoverCommandLine() -> None:
    """
    Only twistd's graceful subcommand with --takeover counts as a successor's command line.
    """
    assert isTakeoverCommand(["twistd", "-n", "graceful", "--takeover", "c.sock"])
    assert isTakeoverCommand(["twistd", "graceful", "--port", "80", "--takeover=c.sock"])
    assert not isTakeoverCommand(["twistd", "-n", "graceful", "--port", "8080"])
    assert not isTakeoverCommand(["twistd", "--takeover", "x", "web"])
    assert not isTakeoverCommand(["pytest", "-k", "takeover"])


@pytest.mark.parametrize(
    ("argv", "idle"),
    [(["twistd", "-n", "graceful", "--takeover", "c.sock"], True), (["twistd", "graceful"], False)],
)
def test_importingGracefulGoesIdleOnlyForATakeover(argv: list[str], idle: bool) -> None:
    """
    Importing graceful (as twistd's plugin discovery does, through the dropin) makes the
    process idle when, and only when, its command line takes over.
    """
    from graceful_plugin.priority import canRestorePriority

    if not canRestorePriority():
        pytest.skip("this user may not leave SCHED_IDLE, so nothing is lowered")
    script = (
        f"import sys, os; sys.argv = {argv!r}; import twisted.plugins.graceful_plugin;"
        " print(os.sched_getscheduler(0))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == str(os.SCHED_IDLE if idle else os.SCHED_OTHER), done.stderr


def test_redactedCommand() -> None:
    """
    The logged form of a restart command hides env values and secret-looking options' values
    (both --opt=value and --opt value), and leaves everything else as it is.
    """
    command = [
        "env",
        "-u",
        "HOME",
        "API_TOKEN=s3cret",
        "DEBUG=1",
        "/venv/bin/python",
        "/venv/bin/twistd",
        "-n",
        "graceful",
        "--password=hunter2",
        "--api-token",
        "t0k3n",
        "--port",
        "web=tcp:8080",
        "--db-secret-file",
        "/run/db",
        "--takeover",
        "/srv/a b/c.sock",
    ]
    shown = redactCommand(command)
    for secret in ("s3cret", "hunter2", "t0k3n", "/run/db"):
        assert secret not in shown
    assert shown == (
        "env -u HOME API_TOKEN=*** DEBUG=*** /venv/bin/python /venv/bin/twistd -n graceful"
        " --password=*** --api-token *** --port web=tcp:8080 --db-secret-file ***"
        " --takeover '/srv/a b/c.sock'"
    )
    assert command[3] == "API_TOKEN=s3cret"  # the command itself is untouched
    assert redactCommand(["twistd", "--keepalive", "--author", "me"]) == (
        "twistd --keepalive --author me"
    )


# -- the launcher: a fork, or a full start -------------------------------------------------


class FakeLink:
    """
    A connected link to a fork server whose answers the test gives.
    """

    def __init__(self) -> None:
        self.connected = True
        self.requests: list[tuple[list[str], str, bool]] = []
        self.answers: list[Deferred[Any]] = []
        self.transport = self
        self.lost = False

    def fork(
        self,
        argv: Sequence[str],
        cwd: str,
        env: dict[str, str],
        fresh: bool,
        fds: Any = None,
        name: str | None = None,
    ) -> Any:
        # A successor gets the fork server's stdio defaults: no descriptors, no name of its own.
        assert fds is None and name is None
        self.requests.append((list(argv), cwd, fresh))
        d: Deferred[Any] = Deferred()
        self.answers.append(d)
        return d

    def loseConnection(self) -> None:
        self.lost = True


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> None:
        return None


class LauncherTests(SynchronousTestCase):
    """
    L{ForkLauncher.launch}: forked when the fork server answers, a full start with a log line
    saying why otherwise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.launcher = ForkLauncher(self.clock, "/srv/c.sock", address="@test", forkTimeout=5)
        self.launcher.log = Logger(observer=self.events.append)
        self.full: list[tuple[list[str], str | None]] = []

    def fallback(self, command: Sequence[str], cwd: str | None) -> FakeProcess:
        self.full.append((list(command), cwd))
        return FakeProcess(999)

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_noForkServer(self) -> None:
        """
        Without a fork server, the successor is started in full at once and the log says why.
        """
        self.launcher.unavailable = "the fork server (pid 7) has gone (killed)"
        process = self.launcher.launch(["py", "twistd"], "/srv", False, self.fallback)
        self.assertEqual(process.pid, 999)
        self.assertEqual(self.full, [(["py", "twistd"], "/srv")])
        self.assertIn(
            "restart: starting the successor in full: the fork server (pid 7) has gone (killed)",
            self.logged(),
        )

    def test_forked(self) -> None:
        """
        With a fork server, the request carries the command, directory and fresh flag; its
        answer is the successor, and a replacement it made first is logged.
        """
        link = FakeLink()
        self.launcher.link = link  # type: ignore[assignment]
        self.launcher.serverPid = 42
        d = self.launcher.launch(["py", "twistd"], "/srv", True, self.fallback)
        self.assertEqual(link.requests, [(["py", "twistd"], "/srv", True)])
        self.assertNoResult(d)
        link.answers[0].callback({"process": FakeProcess(77), "refreshed": "x.py changed"})
        self.assertEqual(self.successResultOf(d).pid, 77)
        self.assertEqual(self.full, [])
        self.assertIn(
            "fork server pid 42 replaced itself with a fresh one before forking: x.py changed",
            self.logged(),
        )

    def test_refusedMeansAFullStart(self) -> None:
        """
        A fork server that refuses (a command it cannot run as a fork) means a full start, with
        its reason in the log.
        """
        link = FakeLink()
        self.launcher.link = link  # type: ignore[assignment]
        d = self.launcher.launch(["sh", "-c", "x"], "/srv", False, self.fallback)
        link.answers[0].errback(ForkFailed("the command runs sh, not this interpreter"))
        self.assertEqual(self.successResultOf(d).pid, 999)
        self.assertIn(
            "restart: starting the successor in full: the fork server did not fork:"
            " the command runs sh, not this interpreter",
            self.logged(),
        )

    def test_silentMeansAFullStart(self) -> None:
        """
        A fork server that does not answer in time is dropped and the successor started in full.
        """
        link = FakeLink()
        self.launcher.link = link  # type: ignore[assignment]
        d = self.launcher.launch(["py"], None, False, self.fallback)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d).pid, 999)
        self.assertTrue(link.lost)
        self.assertIn(
            "restart: starting the successor in full: the fork server did not fork:"
            " it did not answer within 5 s",
            self.logged(),
        )


def test_preloadLeavesASuccessorNothingOfOursToImport(tmp_path: Path) -> None:
    """
    After the fork server's preload, a successor's start-up (twistd's options for a takeover,
    the service) imports no module of graceful or Twisted but the reactor it installs: each
    import there would cost every takeover its CPU and its page faults.
    """
    control = tmp_path / "c.sock"
    script = (
        "import socket, sys\n"
        "from graceful_plugin.forkserver import preload\n"
        "preload()\n"
        "before = set(sys.modules)\n"
        "listener = socket.socket(socket.AF_UNIX)\n"
        f"listener.bind({str(control)!r}); listener.listen(1)\n"
        "from twisted.scripts._twistd_unix import ServerOptions\n"
        "from twisted.internet import epollreactor\n"
        "epollreactor.install()\n"
        "options = ServerOptions()\n"
        f"options.parseOptions(['-n', 'graceful', '--path', {str(tmp_path)!r},"
        f" '--control', {str(control)!r}, '--takeover', {str(control)!r}])\n"
        "options.subOptions.parent = options\n"
        "from graceful_plugin.tap import makeService\n"
        "makeService(options.subOptions)\n"
        "ours = ('graceful_plugin', 'twisted', 'zope', 'automat', 'attr', 'attrs')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ours))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['twisted.internet.reactor']", done.stdout + done.stderr
