"""
A raw line protocol, version 1: greets each connection with its version, then echoes lines.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

VERSION = b"1"


class Echo(LineReceiver):
    """
    Greets with ``echo vN``, then answers each line with ``vN: LINE``.
    """

    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.sendLine(b"echo v" + VERSION)

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(b"v" + VERSION + b": " + line)


factory = Factory.forProtocol(Echo)
