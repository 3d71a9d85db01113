"""
The hot standby (L{graceful_plugin.standby}): a generation keeps paused copies of its listeners
after its successor confirmed, resumes if the successor is lost, and stands down when told.
Driven in memory (L{MemoryReactorClock}, L{iosim}) with the fake ports of the control tests.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from graceful_plugin import pidfile
from graceful_plugin.control import (
    PROTOCOL_VERSION,
    Accepting,
    ClientHandler,
    Commit,
    ControlProtocol,
    Hello,
    StandDown,
)
from graceful_plugin.standby import (
    STAND_DOWN_TIMEOUT,
    Standby,
    controlPathProblem,
    tellStandDown,
)
from tests.test_control import ControlTestCase


class _Predecessor(ControlProtocol):
    """
    The far end of a link to our predecessor: records every StandDown it is told.
    """

    def __init__(self) -> None:
        super().__init__(ClientHandler())
        self.told: list[str] = []

    @StandDown.responder
    def _told(self, reason: str) -> dict[str, Any]:
        self.told.append(reason)
        return {}


class StandbyTestCase(ControlTestCase):
    def setUp(self) -> None:
        super().setUp()
        directory = tempfile.mkdtemp(prefix="gr-")
        self.addCleanup(os.rmdir, directory)
        self.pidfilePath = os.path.join(directory, "app.pid")
        self.addCleanup(lambda: os.path.exists(self.pidfilePath) and os.unlink(self.pidfilePath))
        self.settings.pidfile = self.pidfilePath
        pidfile.claim(self.pidfilePath, os.getpid())
        # The control path: a socket this process listens on, as the one we kept would be.
        self.settings.controlPath = os.path.join(directory, "c.sock")
        self.controlSocket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.controlSocket.bind(self.settings.controlPath)
        self.controlSocket.listen(8)
        self.addCleanup(self._closeControl)
        self.alive = {4242: True}
        self.server.standby = Standby(self.reactor, alive=lambda pid: self.alive.get(pid, False))

    def _closeControl(self) -> None:
        self.controlSocket.close()
        if os.path.exists(self.settings.controlPath):
            os.unlink(self.settings.controlPath)

    def confirmed(self, standby: bool = True) -> tuple[ControlProtocol, Any]:
        """
        A successor (pid 4242) that said hello, committed and confirmed it accepts.
        """
        client, _, pump = self.connect()
        self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242, standby=standby)
        self.call(pump, client, Commit)
        self.call(pump, client, Accepting)
        # The successor owns the pidfile now.
        pidfile.claim(self.pidfilePath, 4242)
        return client, pump


class StandingByTests(StandbyTestCase):
    def test_confirmKeepsPausedCopies(self) -> None:
        """
        After the successor confirmed, every listener (the control one too) is paused but
        neither released nor closed, and the generation says it drains.
        """
        self.web.sessions.opened(object())
        self.confirmed()
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause"])
            self.assertFalse(port.accepting)
        self.assertEqual(self.state(), "draining")

    def test_linkLostResumesAndReclaims(self) -> None:
        """
        The successor's link closing while we stand by resumes accepting on every listener,
        claims the pidfile with our pid, keeps the control listener that the path reaches, and
        the generation serves as its own generation.
        """
        self.web.sessions.opened(object())
        client, pump = self.confirmed()
        client.transport.loseConnection()
        pump.flush()
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause", "resume"])
        self.assertEqual(self.state(), "serving")
        self.assertEqual(pidfile.read(self.pidfilePath), os.getpid())
        self.assertIs(self.server.controlPort, self.control)
        self.assertEqual(self.server.generation, 1)
        # It exits owning the pidfile: its own pid is removed on the way out.
        self.assertEqual(self.settings.pidfile, self.pidfilePath)

    def test_pidDeathResumes(self) -> None:
        """
        The successor's pid dying while its link stays open resumes accepting within the watch
        interval.
        """
        self.web.sessions.opened(object())
        self.confirmed()
        self.reactor.advance(0.5)
        self.assertEqual(self.state(), "draining")
        self.alive[4242] = False
        self.reactor.advance(0.5)
        self.assertEqual(self.state(), "serving")
        self.assertTrue(all(p.accepting for p in (self.web, self.api, self.control)))

    def test_watchesTheKernelsPidNotTheHellos(self) -> None:
        """
        The pid watched is the one SO_PEERCRED gave for the successor's connection (in our pid
        namespace), not the one it claimed in Hello.
        """
        self.web.sessions.opened(object())
        client, serverSide, pump = self.connect()
        serverSide.peer = (5555, 0, 0)
        self.alive[5555] = True
        self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242, standby=True)
        self.call(pump, client, Commit)
        self.call(pump, client, Accepting)
        self.reactor.advance(0.5)
        self.assertEqual(self.state(), "draining")
        self.alive[5555] = False
        self.reactor.advance(0.5)
        self.assertEqual(self.state(), "serving")

    def test_laterTakeoverAfterResume(self) -> None:
        """
        A generation that resumed accepts the next handoff, and confirms it.
        """
        self.web.sessions.opened(object())
        client, pump = self.confirmed()
        client.transport.loseConnection()
        pump.flush()
        self.alive[4343] = True
        second, _, pump2 = self.connect()
        self.call(pump2, second, Hello, version=PROTOCOL_VERSION, pid=4343, standby=True)
        self.call(pump2, second, Commit)
        self.assertEqual(self.call(pump2, second, Accepting), {})
        self.assertEqual(self.state(), "draining")

    def test_standDownReleasesAndNothingResumes(self) -> None:
        """
        Told to stand down by its successor, the generation releases its copies (never closes
        them: no path unlinked) and does not resume when the successor goes.
        """
        self.web.sessions.opened(object())
        client, pump = self.confirmed()
        self.assertEqual(self.call(pump, client, StandDown, reason="stopping"), {})
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause", "release"])
        self.assertEqual(self.state(), "retiring")
        client.transport.loseConnection()
        pump.flush()
        self.alive[4242] = False
        self.reactor.advance(5)
        self.assertEqual(self.state(), "retiring")
        self.assertEqual(pidfile.read(self.pidfilePath), 4242)

    def test_standDownFromAnotherConnectionIgnored(self) -> None:
        """
        A StandDown from a connection that is not our successor's changes nothing.
        """
        self.web.sessions.opened(object())
        self.confirmed()
        other, _, pump = self.connect()
        self.assertEqual(self.call(pump, other, StandDown, reason="hostile"), {})
        self.assertEqual(self.state(), "draining")
        self.assertEqual(self.web.events, ["resume", "pause"])

    def test_olderSuccessorGetsNoStandby(self) -> None:
        """
        A successor that did not say standby in its Hello (an older version, which never sends
        StandDown) is not stood by for: our copies are released when it confirms.
        """
        self.web.sessions.opened(object())
        client, pump = self.confirmed(standby=False)
        self.assertEqual(self.web.events, ["resume", "pause", "release"])
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.state(), "retiring")

    def test_drainedReleasesAndExits(self) -> None:
        """
        The last session ending while we stand by releases our copies and terminates.
        """
        session = object()
        self.web.sessions.opened(session)
        self.confirmed()
        self.web.sessions.closed(session)
        self.assertEqual(self.web.events, ["resume", "pause", "release"])
        self.assertEqual(self.server.machine.describe(), "terminated")  # type: ignore[union-attr]


class ControlPathTests(StandbyTestCase):
    def test_missingPathBoundAgain(self) -> None:
        """
        A control path that was removed while we stood by is bound again (mode 0600) and
        served by a new control listener; the old copy is released, never closed.
        """
        self.web.sessions.opened(object())
        client, pump = self.confirmed()
        self._closeControl()
        client.transport.loseConnection()
        pump.flush()
        port = self.server.controlPort
        self.assertIsNot(port, self.control)
        self.addCleanup(port.socket.close)  # type: ignore[union-attr]
        self.assertEqual(self.control.events, ["resume", "pause", "resume", "release"])
        self.assertEqual(os.stat(self.settings.controlPath).st_mode & 0o777, 0o600)
        self.assertTrue(port.accepting)  # type: ignore[union-attr]
        self.assertIsNone(controlPathProblem(self.settings.controlPath, os.getpid()))

    def test_problems(self) -> None:
        """
        controlPathProblem names a missing path, a plain file, a stale socket and a socket of
        another process; None for our own.
        """
        directory = tempfile.mkdtemp(prefix="gr-")
        path = os.path.join(directory, "x.sock")
        try:
            self.assertEqual(controlPathProblem(path, os.getpid()), "missing")
            with open(path, "w") as f:
                f.write("x")
            self.assertEqual(controlPathProblem(path, os.getpid()), "not a socket")
            os.unlink(path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(path)
            self.assertEqual(controlPathProblem(path, os.getpid()), "stale")
            os.unlink(path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(path)
                s.listen(1)
                self.assertIsNone(controlPathProblem(path, os.getpid()))
                self.assertEqual(controlPathProblem(path, 1), f"served by pid {os.getpid()}")
        finally:
            if os.path.exists(path):
                os.unlink(path)
            os.rmdir(directory)


class TellingTests(StandbyTestCase):
    def predecessorLink(self) -> tuple[_Predecessor, Any]:
        link = ControlProtocol(self.server.responder)
        predecessor = _Predecessor()
        _, _, pump = connectedServerAndClient(lambda: predecessor, lambda: link)
        self.server.adoptPredecessorLink(link)
        return predecessor, pump

    def test_commitAnsweredOnceThePredecessorStoodDown(self) -> None:
        """
        When our own successor commits, the predecessor standing by for us is told to stand
        down, and the Commit is answered only once it has answered.
        """
        predecessor, linkPump = self.predecessorLink()
        client, _, pump = self.connect()
        self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242, standby=True)
        answers: list[Any] = []
        client.callRemote(Commit).addBoth(answers.append)
        pump.flush()
        self.assertEqual(answers, [])
        linkPump.flush()
        pump.flush()
        self.assertEqual(predecessor.told, ["generation 2 (pid 4242) takes over from generation 1"])
        self.assertEqual(answers, [{"confirmWithin": 10.0, "waited": 0.0}])

    def test_commitAnsweredWhenThePredecessorIsSilent(self) -> None:
        """
        A predecessor that never answers StandDown delays the Commit by the stand-down timeout
        at most, and the confirm deadline starts only when we pause.
        """
        self.predecessorLink()
        client, _, pump = self.connect()
        self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242, standby=True)
        answers: list[Any] = []
        client.callRemote(Commit).addBoth(answers.append)
        pump.flush()
        self.assertEqual(self.state(), "handing_off")
        self.assertEqual(self.web.events, ["resume"])
        self.reactor.advance(STAND_DOWN_TIMEOUT)
        pump.flush()
        self.assertEqual(answers, [{"confirmWithin": 10.0, "waited": STAND_DOWN_TIMEOUT}])
        self.assertEqual(self.state(), "committed")
        self.reactor.advance(10.0 - 0.01)
        self.assertEqual(self.state(), "committed")

    def test_stopTellsThePredecessorFirst(self) -> None:
        """
        A stopping generation tells its predecessor to stand down before it closes its own
        listeners.
        """
        predecessor, linkPump = self.predecessorLink()
        self.web.sessions.opened(object())
        stopped = self.server.stopService()
        self.assertEqual(self.web.events, ["resume"])
        linkPump.flush()
        self.assertEqual(predecessor.told, ["generation 1 (pid %d) is stopping" % os.getpid()])
        self.assertEqual(self.web.events, ["resume", "close"])
        self.assertNoResult(stopped)

    def test_oldPredecessorAnswersUnhandled(self) -> None:
        """
        A predecessor that does not know StandDown (an older version) answers UNHANDLED, and
        telling it still completes.
        """
        link = ControlProtocol(ClientHandler())
        old = amp.AMP()
        _, _, pump = connectedServerAndClient(lambda: old, lambda: link)
        done = tellStandDown([link], "why", Clock())
        pump.flush()
        self.assertIsNone(self.successResultOf(done))
