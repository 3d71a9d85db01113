"""
A worker as a fork of the fork server, without processes: L{spawnWorker} asks the generation's
fork server for it (the same argument, descriptors and environment as a full start, told it is a
fork), follows it to its end through the fork server's report and signals it through its handle;
it starts the worker in full, saying why, when there is no fork server or the fork fails; and
the link to the fork server sends one request at a time, each with its own descriptors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.forkclient import ForkedProcess, ForkFailed, ForkLauncher, ForkServerLink
from graceful_plugin.worker import WorkerConfig
from graceful_plugin.workers import WorkerFailed
from graceful_plugin.workerspawn import FIRST_LISTENER_FD, FORKED_NAME, spawnWorker


class _Reactor(MemoryReactorClock):
    """
    A memory reactor that records full starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        self.spawned.append({"protocol": protocol, "args": args, **kw})

        class Transport:
            pid = 4242

        return Transport()

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> None:
        self.adoptedStreamConnections.append((fileDescriptor, addressFamily, factory))


class _Forked:
    """
    A forked process whose end the test decides.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited: Deferred[int | None] = Deferred()
        self.signals: list[str | int] = []

    def whenExited(self) -> Deferred[int | None]:
        return self.exited

    def signalProcess(self, signalID: str | int) -> None:
        self.signals.append(signalID)


class _Link:
    connected = True


class _Forker:
    """
    A generation's fork server client whose answers the test gives.
    """

    def __init__(self, connected: bool = True) -> None:
        self.link = _Link() if connected else None
        self.unavailable = "" if connected else "the fork server is starting"
        self.serverPid = 77
        self.requests: list[dict[str, Any]] = []

    def forkProcess(
        self,
        argv: Sequence[str],
        cwd: str,
        env: dict[str, str],
        fds: Mapping[int, int],
        name: str | None = None,
    ) -> Deferred[Any]:
        # The descriptors are ours to use until the call returns (the real link dups them).
        identities = {number: os.fstat(fd).st_ino for number, fd in fds.items()}
        d: Deferred[Any] = Deferred()
        self.requests.append(
            {"argv": list(argv), "cwd": cwd, "env": env, "fds": identities, "name": name, "d": d}
        )
        return d


def _config(argv: list[str]) -> WorkerConfig:
    assert argv[1:3] == ["-m", "graceful_plugin.worker"]
    return WorkerConfig.fromJSON(argv[3])


class SpawnWorkerTests(SynchronousTestCase):
    """
    L{spawnWorker} with and without a fork server.
    """

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.listenerR, self.listenerW = os.pipe()
        self.addCleanup(os.close, self.listenerR)
        self.addCleanup(os.close, self.listenerW)
        self.listeners = [{"fd": self.listenerR, "kind": "tcp", "name": "web", "spec": None}]

    def spawn(self, forker: Any) -> Any:
        return spawnWorker(
            self.reactor, 1, lambda n: None, self.listeners, None, 3, 60.0, forker=forker
        )

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_forkedWithTheSameArgumentAndDescriptors(self) -> None:
        """
        With a connected fork server, the worker is forked (no full start) with a full start's
        module and environment, a configuration that says it is a fork, and its stdio, link and
        listeners at their numbers; the answer gives it its pid, and the log says who forked it.
        """
        forker = _Forker()
        worker = self.spawn(forker)
        self.assertEqual(self.reactor.spawned, [])
        [request] = forker.requests
        config = _config(request["argv"])
        self.assertTrue(config.forked)
        self.assertEqual(config.leader, os.getpid())
        self.assertEqual(config.link, 3)
        self.assertEqual([e["fd"] for e in config.listeners], [FIRST_LISTENER_FD])
        self.assertEqual(sorted(request["fds"]), [0, 1, 2, 3, FIRST_LISTENER_FD])
        self.assertEqual(request["fds"][FIRST_LISTENER_FD], os.fstat(self.listenerR).st_ino)
        self.assertEqual(request["fds"][1], os.fstat(1).st_ino)
        self.assertEqual(request["env"], dict(os.environ))
        self.assertEqual(request["name"], FORKED_NAME)
        # Its link is ours already, adopted as a full start's is.
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 1)
        process = _Forked(501)
        request["d"].callback(process)
        self.assertEqual(worker.pid, 501)
        self.assertIn("worker 1 (pid 501) forked by the fork server pid 77", self.logged())

    def test_forkedWorkerEndsWithTheReportedStatus(self) -> None:
        """
        The fork server's report of the end is the worker's end (a signal in words); a worker
        that never said it was ready fails its readiness with it.
        """
        forker = _Forker()
        worker = self.spawn(forker)
        process = _Forked(501)
        forker.requests[0]["d"].callback(process)
        process.exited.callback(-9)
        self.assertEqual(self.successResultOf(worker.ended), "killed by SIGKILL")
        self.failureResultOf(worker.ready, WorkerFailed)

    def test_killedBeforeTheForkIsKilledOnceForked(self) -> None:
        """
        A kill while the fork server forks (the group gave up) is sent to the process as soon
        as it is there, through its handle.
        """
        forker = _Forker()
        worker = self.spawn(forker)
        worker.kill()
        process = _Forked(501)
        forker.requests[0]["d"].callback(process)
        self.assertEqual(process.signals, ["KILL"])

    def test_failedForkMeansAFullStartOnANewLink(self) -> None:
        """
        When the fork server does not fork, the worker is started in full (told it is not a
        fork), on a link of its own, and the log says why.
        """
        forker = _Forker()
        worker = self.spawn(forker)
        forker.requests[0]["d"].errback(ForkFailed("3 descriptors were passed for 5 targets"))
        [spawned] = self.reactor.spawned
        self.assertIs(spawned["protocol"], worker)
        self.assertFalse(_config(spawned["args"]).forked)
        self.assertEqual(sorted(spawned["childFDs"]), [0, 1, 2, 3, FIRST_LISTENER_FD])
        self.assertEqual(worker.pid, 4242)
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 2)
        self.assertIn(
            "worker 1: started in full: the fork server did not fork it:"
            " 3 descriptors were passed for 5 targets",
            self.logged(),
        )

    def test_forkRefusedAtOnceLeavesTheFullStartsLink(self) -> None:
        """
        A fork refused at once (before the request returns) still leaves the worker on the link
        of its full start, not on the one its fork was to use.
        """

        adopted = self.reactor.adoptedStreamConnections
        linksWhenAsked = []

        class Refusing(_Forker):
            def forkProcess(self, *a: Any, **kw: Any) -> Deferred[Any]:
                linksWhenAsked.append(len(adopted))
                return fail(ForkFailed("the fork server closed the connection"))

        worker = self.spawn(Refusing())
        # The fork's link was ours before the request; the full start's came after it.
        self.assertEqual(linksWhenAsked, [1])
        [first, second] = adopted
        self.assertIs(second[2].buildProtocol(None), worker.link)
        self.assertIsNot(first[2].buildProtocol(None), worker.link)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_killedWhileAForkFailsIsNotStarted(self) -> None:
        """
        A worker killed while its fork was asked for and then refused is not started in full:
        it has ended.
        """
        forker = _Forker()
        worker = self.spawn(forker)
        worker.kill()
        forker.requests[0]["d"].errback(ForkFailed("the fork server closed the connection"))
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.successResultOf(worker.ended), "stopped before it was started")
        self.failureResultOf(worker.ready, WorkerFailed)

    def test_noForkServerMeansAFullStart(self) -> None:
        """
        Without a connected fork server (a first generation's first workers), the worker is
        started in full at once and the log says why.
        """
        worker = self.spawn(_Forker(connected=False))
        [spawned] = self.reactor.spawned
        self.assertIs(spawned["protocol"], worker)
        self.assertIn(
            "worker 1: started in full: the fork server is starting",
            self.logged(),
        )


class _FdTransport(StringTransport):
    """
    A transport that records the descriptors sent, in order, with what was written after each.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[int] = []

    def sendFileDescriptor(self, fd: int) -> None:
        os.fstat(fd)  # (open)
        self.sent.append(fd)


def _requests(transport: _FdTransport) -> list[dict[str, Any]]:
    data, found = transport.value(), []
    while data:
        size = int.from_bytes(data[:4], "big")
        found.append(json.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return found


class ForkServerLinkTests(SynchronousTestCase):
    """
    L{ForkServerLink}: one request in flight, descriptors with their targets, exit reports.
    """

    def setUp(self) -> None:
        self.launcher = ForkLauncher(MemoryReactorClock(), "/srv/c.sock", address="@test")
        self.link = ForkServerLink(self.launcher)
        self.transport = _FdTransport()
        self.link.makeConnection(self.transport)

    def answer(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        self.link.dataReceived(len(data).to_bytes(4, "big") + data)

    def test_oneRequestAtATimeEachWithItsDescriptors(self) -> None:
        """
        A second request waits until the first is answered; each passes its own descriptors
        (copies, closed once answered) with their targets in order, or stdio without any.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        first = self.link.fork(["py", "-m", "w"], "/", {}, False, fds={0: r, 1: 1, 2: 2, 5: w})
        second = self.link.fork(["py", "twistd"], "/", {}, False)
        [request] = _requests(self.transport)
        self.assertEqual(request["targets"], [0, 1, 2, 5])
        sentFirst = list(self.transport.sent)
        self.assertEqual(len(sentFirst), 4)
        self.assertEqual(os.fstat(sentFirst[3]).st_ino, os.fstat(w).st_ino)
        self.assertNotIn(w, sentFirst)  # (a copy: the caller closes its own)
        self.answer({"op": "forked", "id": request["id"], "pid": 10})
        process = self.successResultOf(first)["process"]
        self.assertIsInstance(process, ForkedProcess)
        for fd in sentFirst:
            self.assertRaises(OSError, os.fstat, fd)  # (closed once answered)
        requests = _requests(self.transport)
        self.assertEqual(len(requests), 2)
        self.assertNotIn("targets", requests[1])
        self.assertEqual(len(self.transport.sent), 7)
        self.answer({"op": "error", "id": requests[1]["id"], "reason": "no"})
        self.failureResultOf(second, ForkFailed)

    def test_exitReportEndsTheProcess(self) -> None:
        """
        The fork server's report of a child's end fires its L{ForkedProcess.whenExited} with
        the status, and signalling it afterwards says it has exited.
        """
        from twisted.internet.error import ProcessExitedAlready

        d = self.link.fork(["py", "-m", "w"], "/", {}, False, fds={0: 0, 1: 1, 2: 2})
        [request] = _requests(self.transport)
        self.answer({"op": "forked", "id": request["id"], "pid": os.getpid()})
        process = self.successResultOf(d)["process"]
        exited = process.whenExited()
        self.assertNoResult(exited)
        self.answer({"op": "exited", "pid": os.getpid(), "status": -15})
        self.assertEqual(self.successResultOf(exited), -15)
        self.assertRaises(ProcessExitedAlready, process.signalProcess, "KILL")

    def test_forkProcessWithoutAForkServerFails(self) -> None:
        """
        L{ForkLauncher.forkProcess} without a connected fork server fails at once with why.
        """
        self.launcher.unavailable = "the fork server is starting"
        failure = self.failureResultOf(self.launcher.forkProcess(["py"], "/", {}, {}), ForkFailed)
        self.assertEqual(failure.getErrorMessage(), "the fork server is starting")
