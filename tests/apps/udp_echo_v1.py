"""
A datagram protocol, version 1: answers each datagram with ``v1 `` and the datagram.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import DatagramProtocol

VERSION = b"1"


class Echo(DatagramProtocol):
    """
    Echoes every datagram back to its sender, prefixed with the version.
    """

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.transport.write(b"v" + VERSION + b" " + datagram, addr)
