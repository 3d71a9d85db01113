"""
A datagram protocol that answers each datagram with the pid of the process that read it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    """
    Answers every datagram with ``pid N``.
    """

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.transport.write(b"pid %d" % os.getpid(), addr)
