"""
L{TakeOver} answers are sized by their encoded bytes: however long the listeners' paths and
specs, no answer exceeds one AMP value, and together the answers hold every listener once.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from graceful_plugin.control import (
    TAKEOVER_BATCH,
    TakeOver,
    takeoverBatch,
    takeoverEntrySize,
)
from tests.test_control import ControlTestCase, FakePort


class _Spec:
    def __init__(self, text: str) -> None:
        self.text = text


class _Proto:
    """
    Just enough of an AMP protocol for L{amp.Descriptor.toStringProto}: ordinals as large as a
    long-lived connection's could be.
    """

    def __init__(self) -> None:
        self.sent = 10**15

    def _sendFileDescriptor(self, fd: int) -> int:
        self.sent += 1
        return self.sent


def _listenersField() -> amp.AmpList:
    [(name, field)] = [a for a in TakeOver.response if a[0] == b"listeners"]
    return field  # type: ignore[no-any-return]


def _longTLS(i: int, length: int) -> str:
    """
    An ssl --port value naming key and certificate files with paths of about C{length} bytes
    (colons in them, escaped in the spec text, make it longer still).
    """
    directory = "/srv/" + "/".join(["certs:" + "d" * 40] * (length // 47))
    return f"tls{i}=ssl:{8443 + i}:privateKey={directory}/k.pem:certKey={directory}/c.pem"


class EntrySizeTests(SynchronousTestCase):
    def test_sizeBoundsTheEncoding(self) -> None:
        """
        The size counted for an entry is never less than what AMP actually encodes for it, and
        within a few bytes of it.
        """
        field = _listenersField()
        entries: list[dict[str, Any]] = [
            {"name": "web", "kind": "tcp", "address": "127.0.0.1:80", "fd": 5, "spec": None},
            {"name": "é" * 300, "kind": "unix", "address": "/run/ü.sock", "fd": 7, "spec": "x"},
            {
                "name": "tls",
                "kind": "ssl",
                "address": "[::1]:8443",
                "fd": 1000,
                "spec": _longTLS(0, 3000),
            },
        ]
        for entry in entries:
            encoded = len(field.toStringProto([entry], _Proto()))  # type: ignore[arg-type]
            counted = takeoverEntrySize(entry)
            self.assertGreaterEqual(counted, encoded)
            self.assertLessEqual(counted - encoded, 20)

    def test_batchWithinOneValue(self) -> None:
        """
        A batch of entries of 4,000 bytes each holds as many as fit in 65,535 bytes, and at least
        one; a batch of short entries is capped by count.
        """
        big = [
            {"name": f"l{i}", "kind": "ssl", "address": "1", "fd": i, "spec": "s" * 4000}
            for i in range(40)
        ]
        batch = takeoverBatch(big)
        self.assertEqual(len(batch), 65535 // takeoverEntrySize(big[0]))
        self.assertLessEqual(sum(map(takeoverEntrySize, batch)), amp.MAX_VALUE_LENGTH)
        small = [{"name": f"l{i}", "kind": "tcp", "address": "1", "fd": i} for i in range(500)]
        self.assertEqual(len(takeoverBatch(small)), TAKEOVER_BATCH)
        self.assertEqual(takeoverBatch([]), [])

    def test_entryLargerThanAValue(self) -> None:
        """
        An entry that could never fit in one value is refused with a sentence naming it.
        """
        huge = [{"name": "giant", "kind": "tcp", "address": "1", "fd": 3, "spec": "s" * 70000}]
        with self.assertRaises(ValueError) as raised:
            takeoverBatch(huge)
        self.assertIn("'giant'", str(raised.exception))


class LongSpecTakeOverTests(ControlTestCase):
    def test_longTLSPathsManyListeners(self) -> None:
        """
        120 TLS listeners whose key and certificate paths are about 3,000 bytes long each (twice
        what one AMP value holds in a batch of 50) all come through, in answers that each fit in
        one value, every listener once, in order.
        """
        extra = []
        for i in range(120):
            port = FakePort(f"tls{i}", port=9000 + i)
            port.spec = _Spec(_longTLS(i, 3000))  # type: ignore[attr-defined]
            extra.append(port)
        self.server.ports = self.server.ports + extra  # type: ignore[operator]
        client, _, pump = self.connect()
        self.hello(pump, client)
        names: list[str] = []
        start, answers = 0, 0
        while start != -1:
            answer = self.call(pump, client, TakeOver, start=start)
            self.toClose.extend(e["fd"] for e in answer["listeners"])
            self.assertTrue(answer["listeners"])
            encoded = _listenersField().toStringProto(answer["listeners"], _Proto())  # type: ignore[arg-type]
            self.assertLessEqual(len(encoded), amp.MAX_VALUE_LENGTH)
            names.extend(e["name"] for e in answer["listeners"])
            start = answer["next"]
            answers += 1
        self.assertEqual(names, [p.name for p in self.server.ports] + ["control"])
        self.assertGreater(answers, (len(names) + TAKEOVER_BATCH - 1) // TAKEOVER_BATCH)
