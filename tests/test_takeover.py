"""
The successor's side of a handoff (L{graceful_plugin.takeover.takeOver}), run in memory: a
scripted predecessor answers over L{iosim}, every deadline is on a L{MemoryReactorClock}, and
the listeners handed over are real listening sockets of this process.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.control import (
    CONTROL_KIND,
    PROTOCOL_VERSION,
    ControlProtocol,
    HandoffBusy,
    IControlHandler,
    NoHandoff,
    RolledBack,
)
from graceful_plugin.process import ProcessEffects
from graceful_plugin.server import GracefulServer, Settings
from graceful_plugin.takeover import TakeoverFailed, takeOver
from tests.test_control import FDTransport, isOpen


class _PeerSocket:
    """
    What C{SO_PEERCRED} says of the predecessor: this process's own pid and uid.
    """

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("3i", os.getpid(), os.getuid(), os.getgid())


class _PeerTransport(FDTransport):
    def getHandle(self) -> _PeerSocket:
        return _PeerSocket()


Answer = Callable[[], Any]


@implementer(IControlHandler)
class Predecessor:
    """
    A predecessor whose answers the test scripts: each answer is a value, an exception to
    raise, or a callable returning either (a L{Deferred} that never fires: no answer).
    """

    def __init__(self, listeners: list[dict[str, Any]]) -> None:
        self.calls: list[str] = []
        self.aborted: list[str] = []
        self.closed = False
        self.answers: dict[str, Any] = {
            "hello": {
                "version": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "generation": 1,
                "workers": 1,
            },
            "takeOver": {"listeners": listeners, "next": -1},
            "commit": {"confirmWithin": 0.5, "waited": 0.0},
            "accepting": {},
            "counters": NoHandoff("no counters here"),
        }

    def _answer(self, name: str) -> Any:
        self.calls.append(name)
        answer = self.answers[name]
        if callable(answer):
            answer = answer()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def connectionOpened(self, protocol: ControlProtocol) -> None:
        pass

    def connectionClosed(self, protocol: ControlProtocol, reason: Failure) -> None:
        self.closed = True

    def hello(self, protocol: ControlProtocol, version: int, pid: int) -> Any:
        return self._answer("hello")

    def takeOver(self, protocol: ControlProtocol, start: int) -> Any:
        return self._answer("takeOver")

    def commit(self, protocol: ControlProtocol, dropped: list[str] | None = None) -> Any:
        return self._answer("commit")

    def accepting(self, protocol: ControlProtocol) -> Any:
        return self._answer("accepting")

    def abort(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        self.aborted.append(reason)
        return {}

    def standDown(self, protocol: ControlProtocol, reason: str) -> dict[str, Any]:
        return {}

    def reportSessions(self, protocol: ControlProtocol, generations: list[dict[str, Any]]) -> None:
        pass

    def status(self, protocol: ControlProtocol, start: int = 0) -> dict[str, Any]:
        raise NoHandoff("not asked here")

    def counters(self, protocol: ControlProtocol, start: int) -> Any:
        return self._answer("counters")

    def stop(self, protocol: ControlProtocol, drainTimeout: float | None) -> dict[str, Any]:
        raise NoHandoff("not asked here")

    def restart(self, protocol: ControlProtocol, progress: bool, fresh: bool = False) -> Any:
        raise NoHandoff("not asked here")


class TakeoverTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        directory = tempfile.mkdtemp(prefix="gr-")
        self.addCleanup(os.rmdir, directory)
        self.controlPath = os.path.join(directory, "c.sock")
        # The predecessor's listening sockets, as it would hand them over.
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.bind(self.controlPath)
        control.listen(8)
        self.addCleanup(os.unlink, self.controlPath)
        self.addCleanup(control.close)
        web = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        web.bind(("127.0.0.1", 0))
        web.listen(8)
        self.addCleanup(web.close)
        self.webSocket = web
        host, port = web.getsockname()
        self.predecessor = Predecessor(
            [
                {"name": "web", "kind": "tcp", "address": f"{host}:{port}", "fd": web.fileno()},
                {
                    "name": "control",
                    "kind": CONTROL_KIND,
                    "address": self.controlPath,
                    "fd": control.fileno(),
                },
            ]
        )
        self.settings = Settings(
            listeners=[], controlPath=self.controlPath, takeover=True, handoffTimeout=30.0
        )
        self.ready: Deferred[None] | None = None
        self.server = GracefulServer(
            self.settings, Factory(), reactor=self.reactor, ready=lambda: self.ready
        )
        # (Never this test process's own heap and scheduling.)
        self.server.process = ProcessEffects(
            self.reactor, settleHeap=lambda: None, restorePriority=lambda: None
        )
        self.pump: IOPump | None = None
        self.transports: list[FDTransport] = []

    def connect(self, protocol: ControlProtocol) -> Deferred[Any]:
        predecessorSide = ControlProtocol(self.predecessor)

        def serverTransport(p: Any) -> FDTransport:
            t = _PeerTransport(p, True, protocol)
            self.transports.append(t)
            return t

        _, _, self.pump = connectedServerAndClient(
            lambda: predecessorSide,
            lambda: protocol,
            serverTransportFactory=serverTransport,
            clientTransportFactory=lambda p: _PeerTransport(p, False, predecessorSide),
            clock=self.reactor,
        )
        self.predecessorSide = predecessorSide
        return succeed(protocol)

    def start(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(takeOver(self.server, connect=self.connect))
        self.flush()
        return d

    def flush(self) -> None:
        """
        Deliver everything both ends wrote, and run what is due now.
        """
        for _ in range(20):
            assert self.pump is not None
            self.pump.flush()
            self.reactor.advance(0)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def failureOf(self, d: Deferred[None]) -> Failure:
        self.flush()
        return self.failureResultOf(d)

    def assertDescriptorsClosed(self) -> None:
        """
        Every descriptor the predecessor sent us was closed (adopted ports hold their own).
        """
        received = [fd for t in self.transports for fd in t.delivered]
        self.assertTrue(received)
        self.assertEqual([fd for fd in received if isOpen(fd)], [])

    def assertSteppedBack(self) -> None:
        """
        We hold no listener: every one adopted was released (never closed: the control path is
        still there for the predecessor), and nothing accepts.
        """
        self.reactor.advance(0)
        for port in self.server.listeners.all():
            self.assertFalse(port.accepting)
            self.assertFalse(port.connected)
        self.assertTrue(os.path.exists(self.controlPath))


class ConfirmedTests(TakeoverTestCase):
    def test_confirmed(self) -> None:
        """
        A predecessor that answers every step in time: the successor adopts both listeners,
        serves as generation 2 and accepts on them, and closes the received descriptors.
        """
        verifyObject(IControlHandler, self.predecessor)
        self.ready = succeed(None)
        d = self.start()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(
            self.predecessor.calls, ["hello", "takeOver", "commit", "counters", "accepting"]
        )
        self.assertEqual(self.server.generation, 2)
        self.assertEqual(self.server.machine.describe(), "serving")  # type: ignore[union-attr]
        self.assertEqual([p.name for p in self.server.ports], ["web"])
        self.assertTrue(all(p.accepting for p in self.server.listeners.all()))
        self.assertEqual(self.predecessor.aborted, [])
        self.assertDescriptorsClosed()
        for port in self.server.listeners.all():
            port.release()
        self.reactor.advance(0)

    def test_commitWaitsForTheApplication(self) -> None:
        """
        Nothing is committed (and nothing accepts) until the application is ready.
        """
        self.ready = Deferred()
        d = self.start()
        self.assertEqual(self.predecessor.calls, ["hello", "takeOver"])
        self.assertFalse(any(p.accepting for p in self.server.listeners.all()))
        self.advance(29.0)
        self.assertNoResult(d)
        self.ready.callback(None)
        self.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertIn("commit", self.predecessor.calls)
        for port in self.server.listeners.all():
            port.release()
        self.reactor.advance(0)


class RefusedTests(TakeoverTestCase):
    def test_busy(self) -> None:
        """
        A predecessor busy with another handoff refuses Hello: the takeover fails with its
        sentence, nothing is adopted, and the connection is closed.
        """
        self.predecessor.answers["hello"] = HandoffBusy("handoff already in progress")
        failure = self.failureOf(self.start())
        failure.trap(TakeoverFailed)
        self.assertEqual(str(failure.value), "handoff already in progress")
        self.assertEqual(self.predecessor.calls, ["hello"])
        self.assertTrue(self.predecessor.closed)
        self.assertEqual(self.server.listeners.all(), [])

    def test_commitRefused(self) -> None:
        """
        A predecessor that refuses the commit serves on: we release what we adopted, close
        every received descriptor, and fail with its reason.
        """
        self.ready = succeed(None)
        self.predecessor.answers["commit"] = NoHandoff("nothing to commit: server serving")
        failure = self.failureOf(self.start())
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value), "the predecessor refused: nothing to commit: server serving"
        )
        self.assertDescriptorsClosed()
        self.assertTrue(os.path.exists(self.controlPath))


class DeadlineTests(TakeoverTestCase):
    def test_helloUnanswered(self) -> None:
        """
        A predecessor that never answers Hello is given up on at the handoff deadline.
        """
        self.predecessor.answers["hello"] = lambda: Deferred()
        d = self.start()
        self.advance(29.9)
        self.assertNoResult(d)
        self.advance(0.1)
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value),
            f"the process at {self.controlPath} did not answer Hello within 30 s",
        )
        self.assertTrue(self.predecessor.closed)

    def test_takeOverUnanswered(self) -> None:
        """
        A predecessor that never hands its listeners over is told why we give up (Abort) at the
        handoff deadline.
        """
        self.predecessor.answers["takeOver"] = lambda: Deferred()
        d = self.start()
        self.advance(29.9)
        self.assertNoResult(d)
        self.advance(0.1)
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        late = "the predecessor did not hand its listeners over within 30 s"
        self.assertEqual(str(failure.value), late)
        self.assertEqual(self.predecessor.aborted, [late])
        self.assertTrue(self.predecessor.closed)

    def test_secondBatchUnanswered(self) -> None:
        """
        The descriptors of the batches that did arrive are closed when a later batch never
        does.
        """
        listeners = self.predecessor.answers["takeOver"]["listeners"]
        batches = iter([{"listeners": listeners[:1], "next": 1}, Deferred()])
        self.predecessor.answers["takeOver"] = lambda: next(batches)
        d = self.start()
        self.advance(30.0)
        self.failureOf(d).trap(TakeoverFailed)
        self.assertEqual(self.predecessor.calls, ["hello", "takeOver", "takeOver"])
        self.assertDescriptorsClosed()

    def test_applicationNeverReady(self) -> None:
        """
        An application that is not ready by the handoff deadline: the adopted listeners are
        released (the control path stays), the received descriptors closed, and the predecessor
        told (Abort).
        """
        self.ready = Deferred()
        d = self.start()
        self.advance(30.0)
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        self.assertEqual(str(failure.value), "the application was not ready within 30 s")
        self.assertNotIn("commit", self.predecessor.calls)
        self.assertEqual(self.predecessor.aborted, [str(failure.value)])
        self.assertDescriptorsClosed()
        self.assertTrue(os.path.exists(self.controlPath))

    def test_commitUnanswered(self) -> None:
        """
        A commit never answered is given up on at the handoff deadline, without accepting.
        """
        self.ready = succeed(None)
        self.predecessor.answers["commit"] = lambda: Deferred()
        d = self.start()
        self.advance(29.9)
        self.assertNoResult(d)
        self.advance(0.1)
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value), "the predecessor did not answer the commit within 30 s"
        )
        self.assertFalse(any(p.accepting for p in self.server.listeners.all()))
        self.assertEqual(self.predecessor.aborted, [str(failure.value)])
        self.assertDescriptorsClosed()

    def test_acceptingUnanswered(self) -> None:
        """
        A predecessor, still alive, that never answers Accepting has resumed long ago (its
        confirm window is far shorter): at the handoff deadline we stop accepting and let go.
        """
        self.ready = succeed(None)
        self.predecessor.answers["accepting"] = lambda: Deferred()
        d = self.start()
        self.assertTrue(all(p.accepting for p in self.server.listeners.all()))
        self.advance(30.0)
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value),
            "the predecessor did not answer Accepting within 30 s; it serves on",
        )
        self.assertSteppedBack()

    def test_commitAnswerTooLate(self) -> None:
        """
        A commit answer that arrives after half the confirm window: the predecessor may have
        resumed already, so we step back rather than accept, and say so.
        """
        self.ready = succeed(None)
        answer: Deferred[dict[str, Any]] = Deferred()
        self.predecessor.answers["commit"] = lambda: answer
        d = self.start()
        self.reactor.advance(0.3)
        answer.callback({"confirmWithin": 0.5, "waited": 0.0})
        failure = self.failureOf(d)
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value),
            "the commit answer came 0.3 s late; the predecessor may already have resumed",
        )
        self.assertNotIn("accepting", self.predecessor.calls)
        self.assertEqual(len(self.predecessor.aborted), 1)
        self.assertFalse(any(p.accepting for p in self.server.listeners.all()))

    def test_commitAnswerInTime(self) -> None:
        """
        The predecessor's own wait before pausing is not counted against the window: an answer
        0.3 s after asking, 0.2 s of which it waited, is in time.
        """
        self.ready = succeed(None)
        answer: Deferred[dict[str, Any]] = Deferred()
        self.predecessor.answers["commit"] = lambda: answer
        d = self.start()
        self.reactor.advance(0.3)
        answer.callback({"confirmWithin": 0.5, "waited": 0.2})
        self.flush()
        self.assertIsNone(self.successResultOf(d))
        for port in self.server.listeners.all():
            port.release()
        self.reactor.advance(0)


class RollbackTests(TakeoverTestCase):
    def test_rolledBackBeforeConfirm(self) -> None:
        """
        A predecessor that rolled back (it resumed: our confirmation came too late) answers
        Accepting with RolledBack: we stop accepting and release every listener.
        """
        self.ready = succeed(None)
        self.settings.pidfile = "app.pid"
        self.predecessor.answers["accepting"] = RolledBack("the handoff was rolled back")
        failure = self.failureOf(self.start())
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value),
            "the predecessor rolled back: the handoff was rolled back; it serves on",
        )
        self.assertSteppedBack()
        # We never claimed the pidfile, and never remove it on our way out.
        self.assertEqual(self.settings.pidfile, "")

    def test_lostLateAfterCommit(self) -> None:
        """
        A predecessor that is alive but drops the connection after half its confirm window
        resumes on its own: we step back.
        """
        self.ready = succeed(None)

        def dropLate() -> Deferred[dict[str, Any]]:
            self.reactor.advance(0.3)
            assert self.predecessorSide.transport is not None
            self.predecessorSide.transport.loseConnection()
            return Deferred()

        self.predecessor.answers["accepting"] = dropLate
        failure = self.failureOf(self.start())
        failure.trap(TakeoverFailed)
        self.assertEqual(
            str(failure.value),
            "the predecessor dropped the connection too late to confirm; it serves on",
        )
        self.assertSteppedBack()

    def test_lostAtCommit(self) -> None:
        """
        A predecessor that drops the connection at once after the commit has exited (or died)
        there: we serve on.
        """
        self.ready = succeed(None)

        def dropNow() -> Deferred[dict[str, Any]]:
            assert self.predecessorSide.transport is not None
            self.predecessorSide.transport.loseConnection()
            return Deferred()

        self.predecessor.answers["accepting"] = dropNow
        d = self.start()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(all(p.accepting for p in self.server.listeners.all()))
        for port in self.server.listeners.all():
            port.release()
        self.reactor.advance(0)
