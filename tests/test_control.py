"""
The AMP control channel between a L{GracefulServer} (on a L{MemoryReactorClock}, with fake
ports) and a client L{ControlProtocol}, connected in memory with L{iosim}.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.control import (
    CONTROL_KIND,
    PROTOCOL_VERSION,
    TAKEOVER_BATCH,
    Abort,
    Accepting,
    ClientHandler,
    Commit,
    ControlProtocol,
    Counters,
    HandoffBusy,
    Hello,
    IControlHandler,
    NoHandoff,
    ReportSessions,
    RolledBack,
    Status,
    Stop,
    TakeOver,
    VersionMismatch,
    peerCredentials,
)
from graceful_plugin.machine import IGenerationEffects
from graceful_plugin.server import GracefulServer, Settings
from graceful_plugin.sessions import SessionTracker


class FakePort:
    """
    A listening port as L{GracefulServer} sees it, holding a real descriptor (on /dev/null) so
    that it can be sent.
    """

    connected = True

    def __init__(self, name: str, kind: str = "tcp", port: int = 8080) -> None:
        self.name = name
        self.kind = kind
        self.port = port
        self.fd = os.open(os.devnull, os.O_RDONLY)
        self.sessions = SessionTracker()
        self.accepting = False
        self.events: list[str] = []

    def fileno(self) -> int:
        return self.fd

    def getHost(self) -> Any:
        if self.kind == CONTROL_KIND:
            return UNIXAddress(b"/tmp/control.sock")
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def pauseAccepting(self) -> None:
        self.events.append("pause")
        self.accepting = False

    def resumeAccepting(self) -> None:
        self.events.append("resume")
        self.accepting = True

    def release(self) -> None:
        self.events.append("release")
        self.accepting = False
        self.connected = False

    def close(self) -> None:
        self.events.append("close")
        self.accepting = False
        self.connected = False

    def dispose(self) -> None:
        os.close(self.fd)


class FDTransport(FakeTransport):
    """
    An in-memory transport that also passes descriptors: each one sent is duplicated and handed
    to the peer at once (ahead of the bytes that name it, as with C{SCM_RIGHTS}).
    """

    def __init__(self, protocol: Any, isServer: bool, peer: ControlProtocol) -> None:
        super().__init__(protocol, isServer)
        self.peer = peer
        self.delivered: list[int] = []

    def sendFileDescriptor(self, fd: int) -> None:
        copy = os.dup(fd)
        self.delivered.append(copy)
        self.peer.fileDescriptorReceived(copy)


def isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ControlTestCase(SynchronousTestCase):
    """
    A serving generation with fake ports, and connections to it.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.settings = Settings(
            listeners=[],
            controlPath="/tmp/control.sock",
            handoffTimeout=30.0,
            confirmTimeout=10.0,
            drainTimeout=60.0,
        )
        self.server = GracefulServer(self.settings, Factory(), reactor=self.reactor)
        self.web = FakePort("web", port=8080)
        self.api = FakePort("api", port=8081)
        self.control = FakePort("control", kind=CONTROL_KIND)
        self.server.ports = [self.web, self.api]
        self.server.controlPort = self.control
        self.server.beginServing()
        self.toClose: list[int] = []
        self.addCleanup(self._closeAll)

    def _closeAll(self) -> None:
        for port in self.server.ports + [self.control]:
            port.dispose()  # type: ignore[union-attr]
        for fd in self.toClose:
            if isOpen(fd):
                os.close(fd)

    def connect(self, handler: Any = None) -> tuple[ControlProtocol, ControlProtocol, IOPump]:
        """
        A client control connection to the server.
        """
        client = ControlProtocol(handler or ClientHandler())
        serverSide = ControlProtocol(self.server.responder)

        def serverTransport(p: Any) -> FDTransport:
            t = FDTransport(p, True, client)
            self.transports.append(t)
            return t

        self.transports: list[FDTransport] = getattr(self, "transports", [])
        c, s, pump = connectedServerAndClient(
            lambda: serverSide,
            lambda: client,
            serverTransportFactory=serverTransport,
            clientTransportFactory=lambda p: FDTransport(p, False, serverSide),
            clock=self.reactor,
        )
        return c, s, pump

    def call(self, pump: IOPump, client: ControlProtocol, command: Any, **kw: Any) -> Any:
        d = client.callRemote(command, **kw)
        pump.flush()
        return self.successResultOf(d)

    def fail_(self, pump: IOPump, client: ControlProtocol, command: Any, **kw: Any) -> Failure:
        """
        Call C{command}, expecting an error (AMP drops the connection on an error that has no
        errback by the time the answer arrives, so one is added at once).
        """
        return self.failed(client.callRemote(command, **kw), pump)

    def failed(self, d: Any, pump: IOPump) -> Failure:
        results: list[Any] = []
        d.addBoth(results.append)
        pump.flush()
        [result] = results
        self.assertIsInstance(result, Failure)
        return result  # type: ignore[no-any-return]

    def hello(self, pump: IOPump, client: ControlProtocol) -> dict[str, Any]:
        return self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242)

    def state(self) -> str:
        return self.server.responder.status(None)["state"]  # type: ignore[arg-type]

    def takeAll(self, pump: IOPump, client: ControlProtocol) -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        start = 0
        while start >= 0:
            answer = self.call(pump, client, TakeOver, start=start)
            received.extend(answer["listeners"])
            start = answer["next"]
        self.toClose.extend(entry["fd"] for entry in received)
        return received


class InterfaceTests(SynchronousTestCase):
    def test_providers(self) -> None:
        """
        The server's responder provides IControlHandler and its generation IGenerationEffects, the
        client handler IControlHandler.
        """
        server = GracefulServer(
            Settings(listeners=[], controlPath="x"), Factory(), reactor=MemoryReactorClock()
        )
        self.assertTrue(verifyObject(IControlHandler, server.responder))
        self.assertTrue(verifyObject(IGenerationEffects, server.gen))
        self.assertTrue(verifyObject(IControlHandler, ClientHandler()))


class HelloTests(ControlTestCase):
    def test_helloStartsHandoff(self) -> None:
        """
        Hello with our version is answered with the version, our pid and generation, and starts a
        handoff.
        """
        client, _, pump = self.connect()
        answer = self.hello(pump, client)
        self.assertEqual(
            answer,
            {"version": PROTOCOL_VERSION, "pid": os.getpid(), "generation": 1, "workers": 1},
        )
        self.assertEqual(self.state(), "handing_off")

    def test_versionMismatch(self) -> None:
        """
        Hello with another protocol version fails with VersionMismatch and starts nothing.
        """
        client, _, pump = self.connect()
        failure = self.fail_(pump, client, Hello, version=PROTOCOL_VERSION + 1, pid=1)
        failure.trap(VersionMismatch)
        self.assertIn(f"speaks control protocol {PROTOCOL_VERSION}", failure.getErrorMessage())
        self.assertEqual(self.state(), "serving")

    def test_secondSuccessorBusy(self) -> None:
        """
        A second successor's Hello during a handoff fails with HandoffBusy; the first keeps its
        handoff.
        """
        first, _, pump1 = self.connect()
        self.hello(pump1, first)
        second, _, pump2 = self.connect()
        self.fail_(pump2, second, Hello, version=PROTOCOL_VERSION, pid=2).trap(HandoffBusy)
        self.assertEqual(self.state(), "handing_off")
        self.assertEqual(self.call(pump1, first, Commit), {"confirmWithin": 10.0, "waited": 0.0})

    def test_helloWhileDrainingBusy(self) -> None:
        """
        Hello to a generation that is draining fails with HandoffBusy.
        """
        self.server.machine.stop()  # type: ignore[union-attr]
        client, _, pump = self.connect()
        self.fail_(pump, client, Hello, version=PROTOCOL_VERSION, pid=2).trap(HandoffBusy)


class TakeOverTests(ControlTestCase):
    def test_takeOverWithoutHello(self) -> None:
        """
        TakeOver from a connection that did not say Hello fails with NoHandoff and sends no
        descriptor.
        """
        client, _, pump = self.connect()
        self.fail_(pump, client, TakeOver, start=0).trap(NoHandoff)
        self.assertEqual(self.transports[-1].delivered, [])

    def test_everyListenerAndTheControlSocket(self) -> None:
        """
        TakeOver answers every listener's name, kind and address with a descriptor on the same
        open file, then the control listener, and says -1 after the last.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        answer = self.call(pump, client, TakeOver, start=0)
        self.toClose.extend(e["fd"] for e in answer["listeners"])
        self.assertEqual(answer["next"], -1)
        described = [(e["name"], e["kind"], e["address"]) for e in answer["listeners"]]
        self.assertEqual(
            described,
            [
                ("web", "tcp", "127.0.0.1:8080"),
                ("api", "tcp", "127.0.0.1:8081"),
                ("control", CONTROL_KIND, "/tmp/control.sock"),
            ],
        )
        for entry, port in zip(
            answer["listeners"], [self.web, self.api, self.control], strict=True
        ):
            self.assertNotEqual(entry["fd"], port.fd)
            self.assertEqual(os.fstat(entry["fd"]).st_ino, os.fstat(port.fd).st_ino)
        # The handoff goes on: nothing paused yet.
        self.assertTrue(self.web.accepting)

    def test_batches(self) -> None:
        """
        More listeners than TAKEOVER_BATCH come in batches of at most TAKEOVER_BATCH, each naming
        the next start index, the last -1; together they hold every listener once.
        """
        extra = [FakePort(f"l{i}", port=9000 + i) for i in range(TAKEOVER_BATCH + 10)]
        self.server.ports = self.server.ports + extra  # type: ignore[operator]
        client, _, pump = self.connect()
        self.hello(pump, client)
        first = self.call(pump, client, TakeOver, start=0)
        self.toClose.extend(e["fd"] for e in first["listeners"])
        self.assertEqual(len(first["listeners"]), TAKEOVER_BATCH)
        self.assertEqual(first["next"], TAKEOVER_BATCH)
        second = self.call(pump, client, TakeOver, start=first["next"])
        self.toClose.extend(e["fd"] for e in second["listeners"])
        self.assertEqual(second["next"], -1)
        names = [e["name"] for e in first["listeners"] + second["listeners"]]
        self.assertEqual(names, [p.name for p in self.server.ports] + ["control"])

    def test_strandedDescriptorsClosedOnConnectionLost(self) -> None:
        """
        Descriptors that arrived for a TakeOver answer the connection lost before it could be
        read are closed by ControlProtocol.connectionLost.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        results: list[Any] = []
        client.callRemote(TakeOver, start=0).addBoth(results.append)
        pump.pump()  # the request reaches the server; its answer and fds are sent
        serverTransport = self.transports[-1]
        self.assertEqual(len(serverTransport.delivered), 3)
        self.assertTrue(all(isOpen(fd) for fd in serverTransport.delivered))
        # The connection is lost before the answer's bytes are read.
        client.connectionLost(Failure(ConnectionDone()))
        [result] = results
        self.assertIsInstance(result, Failure)
        self.assertFalse(any(isOpen(fd) for fd in serverTransport.delivered))


class CommitTests(ControlTestCase):
    def test_commitWithoutHello(self) -> None:
        """
        Commit from a connection that did not say Hello fails with NoHandoff; nothing pauses.
        """
        client, _, pump = self.connect()
        self.fail_(pump, client, Commit).trap(NoHandoff)
        self.assertTrue(self.web.accepting)
        self.assertEqual(self.state(), "serving")

    def test_commitFromAnotherConnection(self) -> None:
        """
        Commit from a connection other than the successor's fails with NoHandoff.
        """
        successor, _, pump1 = self.connect()
        self.hello(pump1, successor)
        other, _, pump2 = self.connect()
        self.fail_(pump2, other, Commit).trap(NoHandoff)
        self.assertEqual(self.state(), "handing_off")

    def test_commitPausesEveryPort(self) -> None:
        """
        Commit pauses accepting on every listener and the control socket, releases none, and
        answers the confirm deadline.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.takeAll(pump, client)
        self.assertEqual(self.call(pump, client, Commit), {"confirmWithin": 10.0, "waited": 0.0})
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause"])
            self.assertFalse(port.accepting)
        self.assertEqual(self.state(), "committed")

    def test_acceptingReleasesAndDrains(self) -> None:
        """
        Accepting after Commit releases every port (none closed) and the generation drains, then
        terminates with no session left.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.call(pump, client, Commit)
        self.assertEqual(self.call(pump, client, Accepting), {})
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause", "release"])
        self.assertEqual(self.server.machine.describe(), "terminated")  # type: ignore[union-attr]

    def test_stopAfterCommitStillConfirmsTheSuccessor(self) -> None:
        """
        A stop between Commit and Accepting completes the handoff: every port is released (none
        closed, none resumed), the successor's link stays open, and its Accepting is answered
        yes instead of RolledBack.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.call(pump, client, Commit)
        # A session still open keeps this generation draining (not exiting) meanwhile.
        self.web.sessions.opened(object())
        self.server.machine.stop()  # type: ignore[union-attr]
        self.assertFalse(self.transports[-1].disconnecting)
        self.assertEqual(self.call(pump, client, Accepting), {})
        for port in (self.web, self.api, self.control):
            self.assertEqual(port.events, ["resume", "pause", "release"])

    def test_acceptingWithoutCommitRolledBack(self) -> None:
        """
        Accepting before Commit fails with RolledBack and nothing is released.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.fail_(pump, client, Accepting).trap(RolledBack)
        self.assertNotIn("release", self.web.events)

    def test_acceptingAfterConfirmDeadlineRolledBack(self) -> None:
        """
        After the confirm deadline the predecessor has resumed accepting and serves on; an
        Accepting that still reaches it is answered RolledBack, and the successor's connection
        is dropped (so its Accepting fails either way, and it steps back).
        """
        client, serverSide, pump = self.connect()
        self.hello(pump, client)
        self.call(pump, client, Commit)
        self.reactor.advance(10.0)
        self.assertEqual(self.web.events, ["resume", "pause", "resume"])
        self.assertTrue(self.web.accepting)
        self.assertEqual(self.state(), "serving")
        self.assertTrue(self.transports[-1].disconnecting)
        self.assertRaises(RolledBack, self.server.responder.accepting, serverSide)
        self.fail_(pump, client, Accepting).trap(ConnectionDone)
        self.assertEqual(self.state(), "serving")

    def test_acceptingFromAStrangerRolledBack(self) -> None:
        """
        Accepting from a connection that is not the successor fails with RolledBack.
        """
        client, _, pump = self.connect()
        self.fail_(pump, client, Accepting).trap(RolledBack)


class RollbackTests(ControlTestCase):
    def test_abortAfterCommitResumes(self) -> None:
        """
        Abort after Commit is answered, then rolls back: accepting resumes, the successor is
        dropped, and a new successor may say Hello.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.call(pump, client, Commit)
        self.assertEqual(self.call(pump, client, Abort, reason="app failed"), {})
        self.assertEqual(self.web.events, ["resume", "pause", "resume"])
        self.assertTrue(self.web.accepting)
        self.assertEqual(self.state(), "serving")
        self.assertTrue(self.transports[-1].disconnecting)
        again, _, pump2 = self.connect()
        self.hello(pump2, again)

    def test_abortWithoutHello(self) -> None:
        """
        Abort from a connection that did not say Hello fails with NoHandoff.
        """
        client, _, pump = self.connect()
        self.fail_(pump, client, Abort, reason="x").trap(NoHandoff)

    def test_disconnectBeforeCommitRollsBack(self) -> None:
        """
        A successor that disconnects during the handoff leaves the generation serving and ready
        for another.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.state(), "serving")
        again, _, pump2 = self.connect()
        self.hello(pump2, again)

    def test_disconnectAfterCommitResumes(self) -> None:
        """
        A successor that disconnects after Commit but before Accepting makes the generation
        resume accepting.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.call(pump, client, Commit)
        client.transport.loseConnection()
        pump.flush()
        self.assertTrue(self.web.accepting)
        self.assertEqual(self.state(), "serving")

    def test_handoffDeadlineDropsSuccessor(self) -> None:
        """
        A successor that does not commit within the handoff timeout is disconnected and the
        generation serves on.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.reactor.advance(30.0)
        pump.flush()
        self.assertEqual(self.state(), "serving")
        self.assertTrue(self.transports[-1].disconnecting)


class StatusTests(ControlTestCase):
    def test_statusFields(self) -> None:
        """
        Status answers the version, pid, generation, state, uptime, and each listener (not the
        control socket) with whether it accepts, its session count and the connections it
        accepted.
        """
        self.web.sessions.opened(object())
        self.web.sessions.opened(object())
        client, _, pump = self.connect()
        status = self.call(pump, client, Status)
        self.assertEqual(status["version"], PROTOCOL_VERSION)
        self.assertEqual(status["pid"], os.getpid())
        self.assertEqual(status["generation"], 1)
        self.assertEqual(status["state"], "serving")
        self.assertGreaterEqual(status["uptime"], 0.0)
        self.assertEqual(
            status["listeners"],
            [
                {
                    "name": "web",
                    "kind": "tcp",
                    "address": "127.0.0.1:8080",
                    "accepting": True,
                    "sessions": 2,
                    "connections": 2,
                },
                {
                    "name": "api",
                    "kind": "tcp",
                    "address": "127.0.0.1:8081",
                    "accepting": True,
                    "sessions": 0,
                    "connections": 0,
                },
            ],
        )
        self.assertEqual(status["draining"], [])

    def test_statusDuringHandoff(self) -> None:
        """
        Status from another connection during a committed handoff says committed and shows the
        listeners paused.
        """
        successor, _, pump1 = self.connect()
        self.hello(pump1, successor)
        self.call(pump1, successor, Commit)
        admin, _, pump2 = self.connect()
        status = self.call(pump2, admin, Status)
        self.assertEqual(status["state"], "committed")
        self.assertEqual([entry["accepting"] for entry in status["listeners"]], [False, False])

    def test_reportedPredecessorsInStatus(self) -> None:
        """
        Session counts a draining predecessor reports on the link we took over with appear in
        our Status until that link closes.
        """
        # Here the server is the successor: its end of the link is the client side.
        link = ControlProtocol(self.server.responder)
        predecessor = ControlProtocol(ClientHandler())
        c, p, pump = connectedServerAndClient(lambda: predecessor, lambda: link)
        self.server.adoptPredecessorLink(link)
        entries = [{"pid": 7, "generation": 0, "state": "draining", "sessions": 3}]
        predecessor.callRemote(ReportSessions, generations=entries)
        pump.flush()
        self.assertEqual(self.server.responder.status(link)["draining"], entries)
        predecessor.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.server.responder.status(link)["draining"], [])

    def test_clientHandlerRefusesCommands(self) -> None:
        """
        The client end of a control connection answers no command (NoHandoff).
        """
        client, serverSide, pump = self.connect()
        self.fail_(pump, serverSide, Status).trap(amp.UnknownRemoteError)
        self.assertEqual(len(self.flushLoggedErrors(NoHandoff)), 1)


class StopTests(ControlTestCase):
    def test_stopShortensDrainAndStopsReactor(self) -> None:
        """
        Stop with a drain timeout is answered, then sets that drain deadline and stops the
        reactor (whose shutdown drains the generation).
        """
        client, _, pump = self.connect()
        self.assertEqual(self.call(pump, client, Stop, drainTimeout=2.5), {})
        self.reactor.advance(0)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(self.settings.drainTimeout, 2.5)
        self.server.machine.stop()  # type: ignore[union-attr]
        self.assertEqual(self.web.events, ["resume", "close"])


class PeerTests(SynchronousTestCase):
    def test_peerCredentialsOfARealSocket(self) -> None:
        """
        peerCredentials reads the pid, uid and gid at the other end of a real Unix socket.
        """
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return a

        self.assertEqual(peerCredentials(Transport()), (os.getpid(), os.getuid(), os.getgid()))

    def test_unknownPeerRefused(self) -> None:
        """
        A peer-checking control connection whose peer cannot be identified is aborted before its
        handler hears of it.
        """
        opened: list[ControlProtocol] = []

        class Handler(ClientHandler):
            def connectionOpened(self, protocol: ControlProtocol) -> None:
                opened.append(protocol)

        checking = ControlProtocol(Handler(), checkPeer=True)
        client = ControlProtocol(ClientHandler())
        transports: list[FakeTransport] = []

        def serverTransport(p: Any) -> FakeTransport:
            transports.append(FakeTransport(p, isServer=True))
            return transports[-1]

        connectedServerAndClient(
            lambda: checking, lambda: client, serverTransportFactory=serverTransport
        )
        self.assertEqual(opened, [])
        self.assertTrue(transports[0].disconnecting)


@implementer(IWriteDescriptor)
class _ReactorWrittenTransport(StringTransport):
    """
    A transport that, like a real one, writes only when the reactor calls L{doWrite}.
    """

    disconnected = 0

    def __init__(self) -> None:
        super().__init__()
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.held.append(data)

    def doWrite(self) -> None:
        for data in self.held:
            super().write(data)
        self.held = []

    def fileno(self) -> int:
        return -1

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "test"


class _AnsweringHandler(ClientHandler):
    def commit(self, protocol: ControlProtocol, dropped: list[str] | None = None) -> Any:
        return {"confirmWithin": 10.0, "waited": 0.0}

    def accepting(self, protocol: ControlProtocol) -> Any:
        return {}

    def counters(self, protocol: ControlProtocol, start: int) -> Any:
        return {"version": 1, "connections": [], "next": -1}


class CommitAnswerTests(SynchronousTestCase):
    """
    The answer to Commit is written at once, not on the reactor's next turn: nobody accepts
    until the successor has read it.
    """

    def _served(self, command: Any, **kw: Any) -> _ReactorWrittenTransport:
        transport = _ReactorWrittenTransport()
        assert verifyObject(IWriteDescriptor, transport)
        server = ControlProtocol(_AnsweringHandler())
        server.makeConnection(transport)
        client = ControlProtocol(ClientHandler())
        asked = StringTransport()
        client.makeConnection(asked)
        client.callRemote(command, **kw).addErrback(lambda _: None)
        server.dataReceived(asked.value())
        return transport

    def test_commitAnswerIsWrittenWithoutTheReactor(self) -> None:
        """
        Once Commit is answered, the answer is on the wire with nothing left for the reactor.
        """
        transport = self._served(Commit, dropped=[])
        self.assertEqual(transport.held, [])
        self.assertIn(b"_answer", transport.value())
        self.assertIn(b"confirmWithin", transport.value())

    def test_countersAnswerIsWrittenWithoutTheReactor(self) -> None:
        """
        The Counters answer too (the successor asks right behind Commit and waits for it
        before it accepts): on the wire at once.
        """
        transport = self._served(Counters, start=0)
        self.assertEqual(transport.held, [])
        self.assertIn(b"_answer", transport.value())
        self.assertIn(b"connections", transport.value())

    def test_otherAnswersWaitForTheReactor(self) -> None:
        """
        Any other answer is written as usual, when the reactor gets to it.
        """
        transport = self._served(Accepting)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(any(b"_answer" in data for data in transport.held))
