"""
Deterministic tests of L{graceful_plugin.restart.Restarter} (on a L{Clock}, with a fake
spawn), and of L{graceful_plugin.lifecycle}: the sd_notify messages each transition sends and
how socket-activated sockets are matched with C{--port} listeners.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from graceful_plugin.control import HandoffBusy, RestartFailed
from graceful_plugin.lifecycle import (
    IGenerationObserver,
    SystemdNotifications,
    planActivation,
)
from graceful_plugin.listeners import parseListener
from graceful_plugin.restart import Restarter, parseRestartCommand
from graceful_plugin.systemd import ActivatedSocket, Notifier


@dataclass
class FakeProcess:
    pid: int
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class FakeSettings:
    restartCommand: list[str] | None = field(default_factory=lambda: ["successor", "--takeover"])
    restartDirectory: str = "/srv/app"
    handoffTimeout: float = 30.0
    takeover: bool = False
    maxDraining: int = 4


class FakeMachine:
    def __init__(self, state: str = "serving") -> None:
        self.state = state

    def describe(self) -> str:
        return self.state


class FakeServer:
    """
    What a L{Restarter} and L{SystemdNotifications} read of a server.
    """

    def __init__(self) -> None:
        self.reactor = Clock()
        self.settings = FakeSettings()
        self.machine = FakeMachine()
        self.generation = 3
        self.sessions = 2
        self.draining: list[dict[str, Any]] = []
        self.stopping = False

    def liveSessions(self) -> int:
        return self.sessions

    def drainingEntries(self) -> list[dict[str, Any]]:
        return self.draining

    def drainingGenerations(self) -> int:
        return len(self.draining)


class RestarterTests(SynchronousTestCase):
    """
    L{Restarter}: starting a successor and following its handoff.
    """

    def setUp(self) -> None:
        self.server = FakeServer()
        self.spawned: list[tuple[list[str], str | None]] = []
        self.processes: list[FakeProcess] = []
        self.killed: list[tuple[int, int]] = []
        self.progress: list[tuple[str, str]] = []
        self.restarter = Restarter(
            self.server,  # type: ignore[arg-type]
            spawn=self.spawn,
            killGroup=lambda pid, sig: self.killed.append((pid, sig)),
        )

    def spawn(self, command: Sequence[str], cwd: str | None) -> FakeProcess:
        self.spawned.append((list(command), cwd))
        process = FakeProcess(pid=1000 + len(self.processes))
        self.processes.append(process)
        return process

    def start(self) -> Any:
        return self.restarter.start(lambda phase, ms, detail: self.progress.append((phase, detail)))

    def test_observer(self) -> None:
        """
        A restarter provides L{IGenerationObserver}.
        """
        self.assertTrue(verifyObject(IGenerationObserver, self.restarter))

    def test_committed(self) -> None:
        """
        The successor is started with the configured command in the configured directory;
        the result names its pid and generation once it confirms it accepts, after the phases
        spawned, hello, committed, accepting.
        """
        d = self.start()
        self.assertEqual(self.spawned, [(["successor", "--takeover"], "/srv/app")])
        self.assertNoResult(d)
        self.restarter.handoffStarted(self.server, 1000)
        self.restarter.handoffPaused(self.server, 1000)
        self.restarter.handoffCommitted(self.server, 1000)
        result = self.successResultOf(d)
        self.assertEqual((result["pid"], result["generation"]), (1000, 4))
        self.assertEqual(
            [p for p, _ in self.progress], ["spawned", "hello", "committed", "accepting"]
        )
        self.assertEqual([p["phase"] for p in result["phases"]], [p for p, _ in self.progress])
        self.assertIn("we drain 2 sessions", self.progress[-1][1])

    def test_exitBeforeHello(self) -> None:
        """
        A successor that exits non-zero before its handoff began fails the restart with its
        exit status; one killed by a signal is named by the signal.
        """
        d = self.start()
        self.processes[0].code = 3
        self.server.reactor.advance(1)
        self.assertIn(
            "exited with status 3 before taking over",
            str(self.failureResultOf(d, RestartFailed).value),
        )
        d = self.start()
        self.processes[1].code = -signal.SIGKILL
        self.server.reactor.advance(1)
        self.assertIn("was killed by SIGKILL", str(self.failureResultOf(d, RestartFailed).value))
        self.assertEqual(self.server.reactor.getDelayedCalls(), [])

    def test_wrapperExitingZero(self) -> None:
        """
        A successor command that exits 0 before hello (a wrapper that started the real one) is
        not a failure: the next handoff decides.
        """
        d = self.start()
        self.processes[0].code = 0
        self.server.reactor.advance(1)
        self.assertNoResult(d)
        self.restarter.handoffStarted(self.server, 2222)
        self.restarter.handoffCommitted(self.server, 2222)
        self.assertEqual(self.successResultOf(d)["pid"], 2222)

    def test_noHello(self) -> None:
        """
        A successor that does not say hello within the start timeout is killed (its whole
        process group) and the restart fails saying so.
        """
        d = self.start()
        self.server.reactor.advance(self.restarter.startTimeout)
        self.assertEqual(self.killed, [(1000, signal.SIGKILL)])
        self.assertIn(
            "did not connect within 60 s", str(self.failureResultOf(d, RestartFailed).value)
        )

    def test_rolledBack(self) -> None:
        """
        A handoff rolled back after hello fails the restart with the reason, and the successor's
        exit status when it is known.
        """
        d = self.start()
        self.restarter.handoffStarted(self.server, 1000)
        self.processes[0].code = 1
        self.restarter.handoffAborted(self.server, 1000, "the successor disconnected")
        message = str(self.failureResultOf(d, RestartFailed).value)
        self.assertIn(
            "the handoff to pid 1000 was rolled back: the successor disconnected", message
        )
        self.assertIn("exited with status 1", message)
        self.assertEqual(self.progress[-1][0], "rolled_back")

    def test_busy(self) -> None:
        """
        A second restart while one is in progress, a restart while not serving, and one while
        too many generations drain are refused as busy, without starting anything.
        """
        self.start()
        self.assertRaises(HandoffBusy, self.start)
        self.restarter.handoffStarted(self.server, 1000)
        self.restarter.handoffCommitted(self.server, 1000)
        self.server.machine.state = "draining"
        self.assertRaises(HandoffBusy, self.start)
        self.server.machine.state = "serving"
        self.server.draining = [{}] * 4
        error = self.assertRaises(HandoffBusy, self.start)
        self.assertIn("--max-draining 4", str(error))
        self.assertEqual(len(self.spawned), 1)

    def test_cannotSpawn(self) -> None:
        """
        A command that cannot be started fails at once, with the program and the reason.
        """

        def fail(command: Sequence[str], cwd: str | None) -> Any:
            raise FileNotFoundError(2, "No such file or directory")

        self.restarter.spawn = fail
        error = self.assertRaises(RestartFailed, self.start)
        self.assertEqual(
            str(error), "cannot start the successor 'successor': No such file or directory"
        )
        self.server.settings.restartCommand = None
        self.assertRaises(RestartFailed, self.start)

    def test_forkedThroughALauncher(self) -> None:
        """
        With a launcher, the successor is asked of it (the fresh flag passed on); the phases
        begin with spawned once it answers with the process, and a second restart meanwhile is
        busy.
        """
        launched: list[tuple[list[str], str | None, bool]] = []
        answer: Deferred[Any] = Deferred()

        class Launcher:
            def launch(self, command: Any, cwd: Any, fresh: bool, fallback: Any) -> Any:
                launched.append((list(command), cwd, fresh))
                return answer

            def start(self) -> None:
                pass

        self.restarter.launcher = Launcher()
        d = self.restarter.start(
            lambda phase, ms, detail: self.progress.append((phase, detail)), fresh=True
        )
        self.assertEqual(launched, [(["successor", "--takeover"], "/srv/app", True)])
        self.assertEqual(self.progress, [])
        error = self.assertRaises(HandoffBusy, self.start)
        self.assertIn("already in progress (starting)", str(error))
        answer.callback(FakeProcess(pid=4242))
        self.assertEqual(self.progress[0][0], "spawned")
        self.assertIn("pid 4242", self.progress[0][1])
        self.restarter.handoffStarted(self.server, 4242)
        self.restarter.handoffCommitted(self.server, 4242)
        self.assertEqual(self.successResultOf(d)["pid"], 4242)

    def test_helloBeforeTheForkAnswer(self) -> None:
        """
        A successor's hello that arrives before the launcher's answer with its pid still comes
        after "spawned" in the phases.
        """
        answer: Deferred[Any] = Deferred()

        class Launcher:
            def launch(self, command: Any, cwd: Any, fresh: bool, fallback: Any) -> Any:
                return answer

        self.restarter.launcher = Launcher()
        d = self.start()
        self.restarter.handoffStarted(self.server, 4242)
        self.assertEqual(self.progress, [])
        answer.callback(FakeProcess(pid=4242))
        self.restarter.handoffPaused(self.server, 4242)
        self.restarter.handoffCommitted(self.server, 4242)
        self.assertEqual(
            [p for p, _ in self.progress], ["spawned", "hello", "committed", "accepting"]
        )
        self.assertEqual(self.successResultOf(d)["pid"], 4242)

    def test_launcherFailureFailsTheRestart(self) -> None:
        """
        When the launcher's start fails (its full start could not run either), the restart
        fails with the reason and nothing is left pending.
        """

        class Launcher:
            def launch(self, command: Any, cwd: Any, fresh: bool, fallback: Any) -> Any:
                return fail(FileNotFoundError(2, "No such file or directory"))

        self.restarter.launcher = Launcher()
        d = self.start()
        self.assertEqual(
            str(self.failureResultOf(d, RestartFailed).value),
            "cannot start the successor 'successor': No such file or directory",
        )
        self.assertEqual(self.server.reactor.getDelayedCalls(), [])

    def test_loggedCommandIsRedacted(self) -> None:
        """
        The command in the log and in the spawned phase has its secrets hidden; the command
        started is the one configured, secrets and all.
        """
        events: list[dict[str, Any]] = []
        self.restarter.log = Logger(observer=events.append)
        self.server.settings.restartCommand = ["env", "API_TOKEN=abc", "app", "--password=pw"]
        self.start()
        self.assertEqual(self.spawned[0][0], ["env", "API_TOKEN=abc", "app", "--password=pw"])
        text = "\n".join(formatEvent(e) for e in events) + self.progress[0][1]
        self.assertNotIn("abc", text)
        self.assertNotIn("pw", text.replace("--password", ""))
        self.assertIn("env API_TOKEN=*** app --password=***", text)

    def test_parseRestartCommand(self) -> None:
        """
        C{--restart-command} is split like a shell would; an empty or unbalanced one is refused
        with a sentence.
        """
        self.assertEqual(
            parseRestartCommand("/srv/app/bin/start --takeover '/run/app/c.sock'"),
            ["/srv/app/bin/start", "--takeover", "/run/app/c.sock"],
        )
        self.assertRaises(ValueError, parseRestartCommand, "  ")
        self.assertRaises(ValueError, parseRestartCommand, "start 'unbalanced")


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__("/run/fake-notify")
        self.sent: list[dict[str, str]] = []

    def send(self, lines: Any) -> bool:
        self.sent.append(dict(line.split("=", 1) for line in lines))
        return True


class SystemdNotificationsTests(SynchronousTestCase):
    """
    L{SystemdNotifications}: the messages each transition sends.
    """

    def setUp(self) -> None:
        self.server = FakeServer()
        self.notifier = RecordingNotifier()
        self.observer = SystemdNotifications(self.notifier, self.server.reactor)

    def test_observer(self) -> None:
        """
        It provides L{IGenerationObserver}.
        """
        self.assertTrue(verifyObject(IGenerationObserver, self.observer))

    def test_sequence(self) -> None:
        """
        A first generation says READY=1 with its status; a handoff RELOADING=1 with
        MONOTONIC_USEC; the confirmed successor MAINPID= and READY=1 in one message; a graceful
        stop STOPPING=1.
        """
        self.observer.serving(self.server)
        self.observer.handoffStarted(self.server, 77)
        self.observer.handoffCommitted(self.server, 77)
        self.observer.stopping(self.server)
        sent = self.notifier.sent
        self.assertEqual(sent[0]["READY"], "1")
        self.assertRegex(sent[0]["STATUS"], r"^generation 3 \(pid \d+\) serving, 2 sessions$")
        self.assertEqual(sent[1]["RELOADING"], "1")
        self.assertTrue(int(sent[1]["MONOTONIC_USEC"]) > 0)
        self.assertEqual((sent[2]["MAINPID"], sent[2]["READY"]), ("77", "1"))
        self.assertEqual(list(sent[2])[:2], ["MAINPID", "READY"])
        self.assertEqual(sent[3]["STOPPING"], "1")

    def test_successorWaitsForItsPredecessor(self) -> None:
        """
        A successor says nothing when it starts serving: its predecessor announces it.
        """
        self.server.settings.takeover = True
        self.observer.serving(self.server)
        self.assertEqual(self.notifier.sent, [])

    def test_rollback(self) -> None:
        """
        A rolled-back handoff says READY=1 again, unless the server is stopping.
        """
        self.observer.handoffAborted(self.server, 77, "gone")
        self.assertEqual(self.notifier.sent[-1]["READY"], "1")
        self.server.stopping = True
        self.observer.handoffAborted(self.server, 78, "stopping")
        self.assertEqual(len(self.notifier.sent), 1)

    def test_statusThrottled(self) -> None:
        """
        Session changes send one STATUS= per interval, with the draining generations, and only
        from a serving generation.
        """
        self.server.draining = [{"pid": 5, "generation": 2, "sessions": 7}]
        for _ in range(3):
            self.observer.sessionsChanged(self.server)
        self.assertEqual(self.notifier.sent, [])
        self.server.reactor.advance(self.observer.interval)
        self.assertEqual(len(self.notifier.sent), 1)
        self.assertTrue(
            self.notifier.sent[0]["STATUS"].endswith("draining: generation 2 (pid 5) 7 sessions")
        )
        self.server.machine.state = "draining"
        self.observer.sessionsChanged(self.server)
        self.server.reactor.advance(self.observer.interval)
        self.assertEqual(len(self.notifier.sent), 1)


def _activated(name: str, kind: str = "tcp", address: str = "127.0.0.1:8080", fd: int = 3) -> Any:
    family, type_ = {
        "tcp": (socket.AF_INET, socket.SOCK_STREAM),
        "udp": (socket.AF_INET, socket.SOCK_DGRAM),
        "unix": (socket.AF_UNIX, socket.SOCK_STREAM),
    }[kind]
    return ActivatedSocket(name=name, fd=fd, family=family, type=type_, address=address)


class PlanActivationTests(SynchronousTestCase):
    """
    L{planActivation}: which passed socket serves which C{--port}.
    """

    def test_byNameThenAddress(self) -> None:
        """
        A C{--port} takes the socket of its name, else the one at its address; a C{--port}
        nothing matches is bound anew; a socket nothing wants is unused, as is any datagram one.
        """
        web = _activated("web", address="0.0.0.0:80", fd=3)
        other = _activated("tcp:127.0.0.1:8081", address="127.0.0.1:8081", fd=4)
        spare = _activated("spare", address="127.0.0.1:9999", fd=5)
        udp = _activated("dns", kind="udp", address="127.0.0.1:53", fd=6)
        specs = [
            parseListener("web=tcp:8080"),
            parseListener("api=tcp:8081:interface=127.0.0.1"),
            parseListener("admin=tcp:9000"),
        ]
        plan = planActivation(specs, [web, other, spare, udp])
        self.assertEqual(plan.adopt, [("web", web), ("api", other)])
        self.assertEqual([s.name for s in plan.bind], ["admin"])
        self.assertEqual(plan.unused, [udp, spare])

    def test_noPorts(self) -> None:
        """
        Without C{--port}, every stream socket is taken under its own name.
        """
        a = _activated("web", fd=3)
        b = _activated("/run/app.sock", kind="unix", address="/run/app.sock", fd=4)
        plan = planActivation([], [a, b])
        self.assertEqual(plan.adopt, [("web", a), ("/run/app.sock", b)])
        self.assertEqual((plan.bind, plan.unused), ([], []))
