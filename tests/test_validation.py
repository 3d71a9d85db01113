"""
Every numeric argument of every control command is checked: a value out of range gets a clear
C{BAD_ARGUMENT} error and changes nothing.
"""

from __future__ import annotations

import math

from graceful_plugin.control import (
    MAX_SECONDS,
    PROTOCOL_VERSION,
    BadArgument,
    Hello,
    ReportSessions,
    Status,
    Stop,
    TakeOver,
    checkIndex,
    checkPid,
    checkSeconds,
)
from tests.test_control import ControlTestCase


class CheckTests(ControlTestCase):
    def test_checks(self) -> None:
        """
        The checks pass good values through and name the argument and the value otherwise.
        """
        self.assertEqual(checkIndex("start", 0), 0)
        self.assertEqual(checkPid("pid", 1), 1)
        self.assertEqual(checkSeconds("drainTimeout", 0.0), 0.0)
        self.assertEqual(checkSeconds("drainTimeout", MAX_SECONDS), MAX_SECONDS)
        for bad in (math.nan, math.inf, -math.inf, -0.5, MAX_SECONDS * 2):
            with self.assertRaises(BadArgument) as caught:
                checkSeconds("drainTimeout", bad)
            self.assertIn("drainTimeout must be a number of seconds", str(caught.exception))
        with self.assertRaises(BadArgument) as index:
            checkIndex("start", -1)
        self.assertEqual(str(index.exception), "start must be 0 or more, not -1")
        for pid in (0, -1):
            self.assertRaises(BadArgument, checkPid, "pid", pid)


class StopValidationTests(ControlTestCase):
    def test_badDrainTimeoutRefusedAndNothingChanges(self) -> None:
        """
        Stop with a drain timeout that is NaN, infinite or negative is answered BAD_ARGUMENT;
        the server neither stops nor changes its drain deadline, and the connection stays
        usable.
        """
        client, _, pump = self.connect()
        for bad in (math.nan, math.inf, -1.0):
            failure = self.fail_(pump, client, Stop, drainTimeout=bad)
            failure.trap(BadArgument)
            self.assertIn("drainTimeout must be a number of seconds", failure.getErrorMessage())
        self.reactor.advance(0)
        self.assertFalse(self.reactor.hasStopped)
        self.assertEqual(self.settings.drainTimeout, 60.0)
        self.assertEqual(self.call(pump, client, Status)["state"], "serving")


class IndexValidationTests(ControlTestCase):
    def test_negativeStatusStartRefused(self) -> None:
        """
        Status from a negative index is answered BAD_ARGUMENT (instead of a batch from the end).
        """
        client, _, pump = self.connect()
        self.fail_(pump, client, Status, start=-1).trap(BadArgument)
        self.assertEqual(self.call(pump, client, Status, start=0)["state"], "serving")

    def test_negativeTakeOverStartRefused(self) -> None:
        """
        TakeOver from a negative index is answered BAD_ARGUMENT with no descriptor sent, and the
        handoff goes on from a valid index.
        """
        client, _, pump = self.connect()
        self.hello(pump, client)
        self.fail_(pump, client, TakeOver, start=-2).trap(BadArgument)
        self.assertEqual(self.transports[-1].delivered, [])
        self.assertEqual(len(self.takeAll(pump, client)), 3)

    def test_helloWithNoPidRefused(self) -> None:
        """
        Hello with a pid that is no pid (0, negative) is answered BAD_ARGUMENT and starts no
        handoff: a proper Hello on the same connection still can.
        """
        client, _, pump = self.connect()
        for pid in (0, -1):
            self.fail_(pump, client, Hello, version=PROTOCOL_VERSION, pid=pid).trap(BadArgument)
            self.assertEqual(self.state(), "serving")
        self.hello(pump, client)
        self.assertEqual(self.state(), "handing_off")

    def test_badSessionReportIgnored(self) -> None:
        """
        A session report with a negative count or a pid that is no pid is dropped (logged), and
        the last good report stands.
        """
        from twisted.test.iosim import connectedServerAndClient

        from graceful_plugin.control import ClientHandler, ControlProtocol

        link = ControlProtocol(self.server.responder)
        predecessor = ControlProtocol(ClientHandler())
        c, p, pump = connectedServerAndClient(lambda: predecessor, lambda: link)
        self.server.adoptPredecessorLink(link)
        good = [{"pid": 7, "generation": 1, "state": "draining", "sessions": 3}]
        predecessor.callRemote(ReportSessions, generations=good)
        pump.flush()
        for bad in (
            [{"pid": 7, "generation": 1, "state": "draining", "sessions": -5}],
            [{"pid": -1, "generation": 1, "state": "draining", "sessions": 1}],
        ):
            predecessor.callRemote(ReportSessions, generations=bad)
            pump.flush()
        self.assertEqual(self.server.responder.status(link)["draining"], good)


def test_badArgumentIsAnAmpError() -> None:
    """
    BAD_ARGUMENT is a declared error of every command with a numeric argument, so a client gets
    the sentence, not UNKNOWN.
    """
    for command in (Hello, TakeOver, Status, Stop):
        assert command.errors[BadArgument] == b"BAD_ARGUMENT"
