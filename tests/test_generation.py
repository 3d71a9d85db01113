"""
The generation alone (L{graceful_plugin.generation.Generation}): its machine's effects on a
listener set of fake ports, on a clock, with fake process effects that record every call, and
with no service, responder or real socket around it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from graceful_plugin.control import CONTROL_KIND, ClientHandler, ControlProtocol
from graceful_plugin.generation import Generation, Settings
from graceful_plugin.listenerset import ListenerSet
from graceful_plugin.machine import GenerationInputs, IGenerationEffects
from graceful_plugin.process import ProcessEffects
from graceful_plugin.standby import Standby
from tests.test_control import FakePort

PIDFILE = "/nonexistent/generation-test.pid"
SUCCESSOR = 4242


class FakeProcess:
    """
    Process effects that do nothing but record what the generation asked of its process.
    """

    def __init__(self) -> None:
        self.exitCode = 0
        self.calls: list[tuple[Any, ...]] = []

    def claimPidfile(self, path: str) -> None:
        self.calls.append(("claimPidfile", path))

    def stop(self) -> None:
        self.calls.append(("stop",))


class GenerationTestCase(SynchronousTestCase):
    """
    A first generation serving on one fake listener and a fake control listener.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.settings = Settings(
            listeners=[],
            controlPath="/nonexistent/control.sock",
            pidfile=PIDFILE,
            confirmTimeout=10.0,
            drainTimeout=60.0,
        )
        self.process = FakeProcess()
        self.alive = {SUCCESSOR: True}
        self.standby = Standby(self.reactor, alive=lambda pid: self.alive.get(pid, False))
        self.listeners = ListenerSet(self.reactor, Factory)
        self.web = FakePort("web")
        self.control = FakePort("control", kind=CONTROL_KIND)
        self.addCleanup(self.web.dispose)
        self.addCleanup(self.control.dispose)
        self.listeners.install([self.web], self.control)
        self.gen = Generation(
            self.settings,
            self.reactor,
            self.listeners,
            self.process,
            self.standby,
            lambda: ControlProtocol(ClientHandler()),
        )
        self.gen.beginServing()

    @property
    def machine(self) -> GenerationInputs:
        assert self.gen.machine is not None
        return self.gen.machine

    def openSession(self) -> StringTransport:
        transport = StringTransport()
        self.web.sessions.opened(transport)
        return transport

    def commitHandoff(self) -> None:
        """
        What the responder does on a successor's Hello and Commit.
        """
        self.gen.successorPid = SUCCESSOR
        self.assertTrue(self.machine.requestHandoff())
        self.assertTrue(self.machine.commit())

    def released(self) -> list[str]:
        """
        What happened to the listeners' sockets beyond pausing and resuming.
        """
        return [
            f"{port.name}:{event}"
            for port in (self.web, self.control)
            for event in port.events
            if event not in ("pause", "resume")
        ]


class GenerationTests(GenerationTestCase):
    def test_providesTheEffects(self) -> None:
        """
        The generation provides the machine's effects, and the fake process the calls the
        generation makes on its process (as the real process effects do).
        """
        self.assertTrue(verifyObject(IGenerationEffects, self.gen))
        real = ProcessEffects(self.reactor)
        for name in ("claimPidfile", "stop", "exitCode"):
            self.assertTrue(hasattr(real, name), name)
            self.assertTrue(hasattr(self.process, name), name)

    def test_servingClaimsThePidfileThroughTheProcess(self) -> None:
        """
        A first generation that serves accepts on every listener and claims its pidfile through
        its process effects, which it asks nothing else; it stops no reactor.
        """
        self.assertTrue(self.web.accepting)
        self.assertTrue(self.control.accepting)
        self.assertEqual(self.process.calls, [("claimPidfile", PIDFILE)])
        self.assertFalse(self.reactor.hasStopped)

    def test_committedThenConfirmedReleasesNothing(self) -> None:
        """
        After the commit every listener is paused and none released, through the confirm
        window; once the successor accepts (its Accepting) we stand by for it with the paused
        copies still open, and release them only when the last session has gone.
        """
        session = self.openSession()
        self.commitHandoff()
        self.assertFalse(self.web.accepting)
        self.assertFalse(self.control.accepting)
        self.reactor.advance(9.0)
        self.assertEqual(self.released(), [])
        self.assertTrue(self.machine.successorAccepting())
        self.assertEqual(self.released(), [])
        self.assertEqual(self.standby.pid, SUCCESSOR)
        # The successor owns the pidfile now: ours is never removed on our way out.
        self.assertEqual(self.settings.pidfile, "")
        self.assertEqual(self.machine.describe(), "draining")
        self.web.sessions.closed(session)
        self.assertEqual(self.released(), ["web:release", "control:release"])
        self.assertEqual(self.machine.describe(), "terminated")

    def test_terminatedExitsThroughTheProcess(self) -> None:
        """
        A generation drained after a handoff exits through its process effects (a moment later,
        once its answers are written), never by stopping the reactor itself.
        """
        self.commitHandoff()
        self.assertTrue(self.machine.successorAccepting())
        self.assertEqual(self.machine.describe(), "terminated")
        self.assertEqual(self.process.calls, [("claimPidfile", PIDFILE)])
        self.reactor.advance(0)
        self.assertEqual(self.process.calls, [("claimPidfile", PIDFILE), ("stop",)])
        self.assertFalse(self.reactor.hasStopped)

    def test_terminatedWaitsForTheSuccessorLink(self) -> None:
        """
        A drained generation with its successor's link still open closes it and exits through
        its process effects once the link has gone, or after 2 s at most.
        """
        link = ControlProtocol(ClientHandler())
        transport = StringTransport()
        link.makeConnection(transport)
        self.gen.successor = link
        self.commitHandoff()
        session = self.openSession()
        self.assertTrue(self.machine.successorAccepting())
        self.web.sessions.closed(session)
        self.reactor.advance(0)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(("stop",), self.process.calls)
        self.reactor.advance(1.9)
        self.assertNotIn(("stop",), self.process.calls)
        self.gen.successorLinkLost()
        self.assertEqual(self.process.calls[-1], ("stop",))
        self.reactor.advance(5)
        self.assertEqual(self.process.calls.count(("stop",)), 1)
        self.assertFalse(self.reactor.hasStopped)

    def test_stopGracefullyShortensTheDrain(self) -> None:
        """
        stopGracefully with a drain deadline stops through the process effects; the stop that
        follows drains for that long only, aborts what is left, and fires once terminated.
        """
        session = self.openSession()
        self.gen.stopGracefully(5.0)
        self.assertEqual(self.process.calls[-1], ("stop",))
        stopped = self.gen.stop()
        self.assertNoResult(stopped)
        self.assertEqual(self.released(), ["web:close", "control:close"])
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertTrue(session.disconnecting)
        self.successResultOf(stopped)
        self.assertEqual(self.machine.describe(), "terminated")
        # Stopped by the service, it does not stop the reactor once more.
        self.assertEqual(self.process.calls.count(("stop",)), 1)
        self.assertFalse(self.reactor.hasStopped)

    def test_exitCodeIsTheProcesses(self) -> None:
        """
        The exit code an observer sets on the generation is its process's.
        """
        self.gen.exitCode = 1
        self.assertEqual(self.process.exitCode, 1)
        self.assertEqual(self.gen.exitCode, 1)

    def test_rollbackResumes(self) -> None:
        """
        A successor lost after the commit: every listener accepts again, none was released,
        and the process was asked nothing more.
        """
        self.commitHandoff()
        self.machine.successorLost("the successor disconnected")
        self.assertTrue(self.web.accepting)
        self.assertTrue(self.control.accepting)
        self.assertEqual(self.released(), [])
        self.assertEqual(self.gen.figures.handoffs["rolled_back"], 1)
        self.assertEqual(self.process.calls, [("claimPidfile", PIDFILE)])


class FacadeTests(SynchronousTestCase):
    def test_theServiceWiresItsGeneration(self) -> None:
        """
        The service builds one generation on its own listener set and process effects; the
        responder, the restarter and the observers see that generation, and the names the
        service forwards read and set the generation's.
        """
        from graceful_plugin.server import GracefulServer

        server = GracefulServer(
            Settings(listeners=[], controlPath="x"), Factory(), reactor=MemoryReactorClock()
        )
        gen = server.gen
        self.assertIs(gen.listeners, server.listeners)
        self.assertIs(gen.process, server.process)
        self.assertIs(server.responder.generation, gen)
        self.assertIs(server.restarter.server, gen)
        self.assertEqual(gen.observers, [server.restarter])
        server.generation = 7
        self.assertEqual(gen.generation, 7)
        server.exitCode = 3
        self.assertEqual(server.process.exitCode, 3)
        workers = object()
        server.workers = workers
        self.assertIs(gen.workers, workers)
        self.assertIs(server.machine, None)
        self.assertEqual(server.stopGracefully, gen.stopGracefully)

    def test_restartSignalsBeforeTheReactorRunsStopSignalAfter(self) -> None:
        """
        Starting, the service takes SIGHUP and SIGUSR2 at once: a server that has said it serves
        does not die of SIGHUP's default action in the moment before its reactor runs (the
        restart asked then waits for the reactor).  SIGTERM is taken once the reactor runs,
        after the reactor's own handler.
        """
        import signal

        from graceful_plugin.server import GracefulServer

        reactor = MemoryReactorClock()
        server = GracefulServer(Settings(listeners=[], controlPath="x"), Factory(), reactor=reactor)
        installed: list[tuple[int, Any]] = []
        server.process._installSignal = lambda signum, handler: installed.append((signum, handler))
        server._startFromScratch = lambda: None  # type: ignore[method-assign]
        asked: list[str] = []
        server.restartBySignal = asked.append  # type: ignore[method-assign]
        server.startService()
        self.assertEqual([signum for signum, _ in installed], [signal.SIGHUP, signal.SIGUSR2])
        # (A real reactor queues a call from a handler until it runs.)
        queued: list[tuple[Any, tuple[Any, ...]]] = []
        reactor.callFromThread = lambda f, *args: queued.append((f, args))  # type: ignore[attr-defined]
        dict(installed)[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(asked, [])
        reactor.run()
        self.assertEqual(
            [signum for signum, _ in installed], [signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM]
        )
        for f, args in queued:
            f(*args)
        self.assertEqual(asked, ["SIGHUP"])
