"""
The predecessor's side of a group handoff, in memory: a serving generation with fake ports and a
L{WorkerSupervisor} of fake workers, driven over the AMP control channel.  Commit is answered only
once every worker paused; a worker that cannot pause rolls the handoff back and every worker
accepts again; a confirmed handoff releases and drains every worker.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory

from graceful_plugin.balance import ACCEPTING, HOLDING, IDLE, Board
from graceful_plugin.control import PROTOCOL_VERSION, Abort, Accepting, Commit, Hello, NoHandoff
from graceful_plugin.server import GracefulServer
from graceful_plugin.workerspawn import WorkerSupervisor
from tests.test_control import ControlTestCase
from tests.test_workers import FakeWorker, Spawner


class GroupTestCase(ControlTestCase):
    """
    A serving generation of three processes: the leader and two fake workers, all accepting.
    """

    def setUp(self) -> None:
        super().setUp()
        self.spawner = Spawner()

        def spawn(reactor: Any, index: int, report: Any, *args: Any) -> FakeWorker:
            self.spawnedWith = args
            return self.spawner(index, report)

        self.supervisor = WorkerSupervisor(
            3,
            None,
            60.0,
            self.reactor,
            spawn=spawn,
            sessionsChanged=self.server.workersChanged,
        )
        self.server.workers = self.supervisor
        self.server.observers.append(self.supervisor)
        self.server.settings.workers = 3
        started = self.supervisor.startWith(self.server.ports, 1)
        for worker in self.spawner.started:
            worker.ready.callback(None)
        self.successResultOf(started)
        resumed = self.supervisor.resume()
        for worker in self.spawner.started:
            worker.ack("resume")
        self.successResultOf(resumed)
        self.workers = list(self.spawner.started)

    def committing(self) -> tuple[Any, Any, Deferred[Any]]:
        client, _, pump = self.connect()
        hello = self.hello(pump, client)
        self.assertEqual(hello["workers"], 3)
        self.takeAll(pump, client)
        d = client.callRemote(Commit)
        results: list[Any] = []
        d.addBoth(results.append)
        pump.flush()
        return client, pump, results  # type: ignore[return-value]


class GroupCommitTests(GroupTestCase):
    def test_workersGetTheListeners(self) -> None:
        """
        Each worker is started with every listener of the leader (descriptor, kind, name).
        """
        listeners = self.spawnedWith[0]
        self.assertEqual(
            [(e["fd"], e["kind"], e["name"]) for e in listeners],
            [(self.web.fd, "tcp", "web"), (self.api.fd, "tcp", "api")],
        )

    def test_commitAnsweredOnlyOnceEveryWorkerPaused(self) -> None:
        """
        Commit pauses the leader's ports and sends pause to every worker; the answer comes only
        after the last acknowledgement.
        """
        client, pump, results = self.committing()
        self.assertFalse(self.web.accepting)
        self.assertEqual([w.pending() for w in self.workers], [["pause"], ["pause"]])
        self.workers[0].ack("pause")
        pump.flush()
        self.assertEqual(results, [])
        self.workers[1].ack("pause")
        pump.flush()
        self.assertEqual([r["confirmWithin"] for r in results], [10.0])
        self.assertEqual(self.state(), "committed")

    def test_workerDyingBeforePausingRollsBack(self) -> None:
        """
        A worker that dies before acknowledging its pause fails the Commit; the leader resumes
        accepting and the surviving worker is told to accept again.
        """
        client, pump, results = self.committing()
        self.workers[0].ack("pause")
        self.workers[1].die("killed by signal 9")
        pump.flush()
        [failure] = results
        failure.trap(NoHandoff)
        self.assertIn("killed by signal 9", failure.getErrorMessage())
        self.assertEqual(self.state(), "serving")
        self.assertTrue(self.web.accepting)
        self.assertEqual(self.workers[0].pending(), ["resume"])

    def test_workerMissingThePauseDeadlineRollsBack(self) -> None:
        """
        A worker that does not acknowledge its pause in time fails the Commit and the group
        resumes.
        """
        client, pump, results = self.committing()
        self.workers[0].ack("pause")
        self.reactor.advance(10.0)
        pump.flush()
        [failure] = results
        failure.trap(NoHandoff)
        self.assertEqual(self.state(), "serving")
        self.assertIn("resume", self.workers[0].pending())

    def test_abortAfterCommitResumesEveryWorker(self) -> None:
        """
        An Abort after the group paused resumes the leader and every worker.
        """
        client, pump, results = self.committing()
        for worker in self.workers:
            worker.ack("pause")
        pump.flush()
        self.assertEqual(self.call(pump, client, Abort, reason="a new worker died"), {})
        self.assertTrue(self.web.accepting)
        self.assertEqual([w.pending() for w in self.workers], [["resume"], ["resume"]])

    def test_acceptingReleasesThenDrainsEveryWorker(self) -> None:
        """
        Once the successor confirms, every worker is told to release, then to drain.
        """
        client, pump, results = self.committing()
        for worker in self.workers:
            worker.ack("pause")
        pump.flush()
        self.web.sessions.opened(object())
        self.assertEqual(self.call(pump, client, Accepting), {})
        self.assertEqual([w.pending() for w in self.workers], [["release"], ["release"]])
        for worker in self.workers:
            worker.ack("release")
        self.assertEqual([w.pending() for w in self.workers], [["drain"], ["drain"]])

    def test_resumedStandbyStartsANewGroup(self) -> None:
        """
        A group standing by for a successor that confirmed and is then lost serves again with
        all its processes: the leader resumes at once, a new group of workers is started on the
        same listeners and told to accept once ready, and the old workers drain out (their
        sessions still counted).
        """
        client, pump, results = self.committing_(standby=True)
        for worker in self.workers:
            worker.ack("pause")
        pump.flush()
        self.web.sessions.opened(object())
        self.call(pump, client, Accepting)
        for worker in self.workers:
            worker.ack("release")
        self.workers[0].report(2)
        client.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(self.state(), "serving")
        fresh = self.spawner.started[len(self.workers) :]
        self.assertEqual(len(fresh), 2)
        for worker in fresh:
            worker.ready.callback(None)
        self.assertEqual([w.pending() for w in fresh], [["resume"], ["resume"]])
        self.assertEqual(self.server.liveSessions(), 1 + 2)
        self.assertEqual([w.pending() for w in self.workers], [["drain"], ["drain"]])

    def test_resumedStandbyGetsANewBalanceTable(self) -> None:
        """
        The new group of a standby that serves again shares a new table with the leader (the old
        workers still write to theirs while they drain), and the old table is closed once the
        last old worker has ended.
        """
        old = self.spawnedWith[-1]
        client, pump, results = self.committing_(standby=True)
        for worker in self.workers:
            worker.ack("pause")
        pump.flush()
        self.web.sessions.opened(object())  # (so that the old generation drains, standing by)
        self.call(pump, client, Accepting)
        for worker in self.workers:
            worker.ack("release")
        client.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        new = self.spawnedWith[-1]
        self.assertIsNot(new, old)
        assert self.supervisor.balancer is not None
        self.assertIs(self.supervisor.balancer.board, new)
        self.assertNotEqual(old.fileno(), -1)
        for worker in self.workers:
            worker.die("exit status 0")
        self.assertEqual(old.fileno(), -1)
        self.assertNotEqual(new.fileno(), -1)

    def committing_(self, standby: bool) -> tuple[Any, Any, list[Any]]:
        client, _, pump = self.connect()
        self.call(pump, client, Hello, version=PROTOCOL_VERSION, pid=4242, standby=standby)
        self.takeAll(pump, client)
        d = client.callRemote(Commit)
        results: list[Any] = []
        d.addBoth(results.append)
        pump.flush()
        return client, pump, results


class GroupSessionsTests(GroupTestCase):
    def test_sessionsAreTheGroupsSum(self) -> None:
        """
        The generation's live sessions are its own and every worker's; status lists each.
        """
        self.web.sessions.opened(object())
        self.workers[0].report(2)
        self.workers[1].report(3)
        self.assertEqual(self.server.liveSessions(), 6)
        entries = self.server.responder.status(None, 0)["workers"]  # type: ignore[arg-type]
        self.assertEqual([e["sessions"] for e in entries], [1, 2, 3])
        self.assertEqual([e["pid"] for e in entries[1:]], [w.pid for w in self.workers])

    def test_drainEndsWhenTheLastWorkerSessionEnds(self) -> None:
        """
        A draining generation terminates only when the workers' sessions are gone too.
        """
        self.workers[0].report(1)
        client, pump, results = self.committing()
        for worker in self.workers:
            worker.ack("pause")
        pump.flush()
        self.call(pump, client, Accepting)
        # (This successor says no standby in its Hello: draining with nothing to resume.)
        self.assertEqual(self.server.machine.describe(), "retiring")  # type: ignore[union-attr]
        self.workers[0].report(0)
        self.assertEqual(self.server.machine.describe(), "terminated")  # type: ignore[union-attr]


class DrainingGroupTests(GroupTestCase):
    def test_drainingGenerationReportsItsWorkers(self) -> None:
        """
        A draining group's report to its successor carries every process of it (and the
        group's session sum), and the successor's status shows them; a single process's report
        carries no workers field.
        """
        from twisted.test.iosim import connectedServerAndClient

        from graceful_plugin.control import ClientHandler, ControlProtocol, ReportSessions

        self.workers[0].report(2)
        entry = self.server.ownEntry()
        self.assertEqual(entry["sessions"], 2)
        self.assertEqual(
            [w["pid"] for w in entry["workers"]], [os.getpid()] + [w.pid for w in self.workers]
        )
        # As another process would report it (a report naming our own pid is never listed).
        entry = dict(entry, pid=os.getppid())
        successor = GracefulServer(self.settings, Factory(), reactor=self.reactor)
        link = ControlProtocol(successor.responder)
        predecessor = ControlProtocol(ClientHandler())
        c, p, pump = connectedServerAndClient(lambda: predecessor, lambda: link)
        successor.adoptPredecessorLink(link)
        single = {"pid": 7, "generation": 0, "state": "draining", "sessions": 1}
        predecessor.callRemote(ReportSessions, generations=[entry, single])
        pump.flush()
        draining = successor.responder.status(link, 0)["draining"]
        self.assertEqual([len(e.get("workers", [])) for e in draining], [3, 0])
        self.assertEqual(draining[1], single)


class GroupMetricsTests(GroupTestCase):
    def setUp(self) -> None:
        pytest.importorskip("prometheus_client")
        super().setUp()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        from graceful_plugin.metrics import makeRegistry

        text = generate_latest(makeRegistry(self.server)).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def test_workersInTheMetrics(self) -> None:
        """
        The metrics count the group's processes, each one's open connections (worker 0: the
        leader) and the workers replaced after dying while serving, by generation.
        """
        self.web.sessions.opened(object())
        self.workers[0].report(2)
        self.workers[1].report(3)
        samples = self.scrape()
        self.assertEqual(samples[("graceful_workers", ())], 3)
        self.assertEqual(
            [samples[("graceful_worker_sessions", (("worker", str(i)),))] for i in range(3)],
            [1, 2, 3],
        )
        self.assertEqual(samples[("graceful_worker_restarts_total", (("generation", "1"),))], 0)
        self.workers[1].die()
        self.reactor.advance(60)
        replacement = self.spawner.started[-1]
        self.assertNotIn(replacement, self.workers)
        samples = self.scrape()
        self.assertEqual(samples[("graceful_worker_restarts_total", (("generation", "1"),))], 1)


class GroupBalanceTests(GroupTestCase):
    def test_theGroupSharesOneBalanceTable(self) -> None:
        """
        Every worker is started with the group's balance table, one slot per process, the
        leader's own balance on slot 0.
        """
        board = self.spawnedWith[-1]
        self.assertIsInstance(board, Board)
        self.assertEqual(board.size, 3)
        assert self.supervisor.balancer is not None
        self.assertIs(self.supervisor.balancer.board, board)
        self.assertEqual(self.supervisor.balancer.index, 0)

    def test_statusShowsEachProcesssBalance(self) -> None:
        """
        Status lists, for the leader and each worker, whether it holds accepting now and how
        many times it held, as the group's balance table says.
        """
        board = self.spawnedWith[-1]
        board.publish(2, 9, HOLDING)  # as worker 2 would, holding for the third time
        for _ in range(3):
            board.countHold(2)
        board.countHold(0)
        entries = self.server.responder.status(None, 0)["workers"]  # type: ignore[arg-type]
        self.assertEqual(
            [(e["index"], e["holding"], e["holds"]) for e in entries],
            [(0, False, 1), (1, False, 0), (2, True, 3)],
        )

    def test_aWorkerThatEndedIsClearedFromTheTable(self) -> None:
        """
        When a worker ends, the leader clears its slot: the others no longer count on it to
        accept, nor its sessions in the mean.
        """
        board = self.spawnedWith[-1]
        board.publish(2, 5, ACCEPTING)  # as worker 2 would
        self.workers[1].die("killed by SIGKILL")
        self.assertEqual(board.read()[2], (0, IDLE))

    def test_stoppingClosesTheTable(self) -> None:
        """
        Once every worker of a stopped group has ended, the table is closed (its descriptor
        too: descriptor counts stay flat).
        """
        board = self.spawnedWith[-1]
        fd = board.fileno()
        stopped = self.supervisor.abandon()
        for worker in self.workers:
            worker.die("exit status 0")
        self.successResultOf(stopped)
        self.assertEqual(board.fileno(), -1)
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_oneProcessHasNoBalance(self) -> None:
        """
        A generation of one process (no workers) has no table and no balance: nothing changes.
        """
        alone = WorkerSupervisor(1, None, 60.0, self.reactor, spawn=lambda *a: None)
        self.successResultOf(alone.startWith(self.server.ports, 1))
        self.assertIsNone(alone.balancer)
