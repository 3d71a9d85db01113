"""
Hostile and broken peers (issue 13): a predecessor that hands over blocking sockets, a control
path served by another uid, and the like; each costs at most the handoff it spoils.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from graceful_plugin.listeners import adoptListener
from tests.procs import Processes, freePort, httpGet


def test_adoptedDescriptorIsMadeNonBlocking() -> None:
    """
    A blocking listening socket adopted as a port becomes non-blocking (the flag is the
    socket's, so the adopted duplicate has it too).
    """
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    assert os.get_blocking(sock.fileno())
    try:
        port = adoptListener(MemoryReactor(), sock.fileno(), "tcp", Factory(), name="web")
        assert not os.get_blocking(sock.fileno())
        assert not os.get_blocking(port.fileno())
        port.socket.close()
    finally:
        sock.close()


@pytest.mark.slow
def test_successorServesABlockingListenerHandedOver(
    procs: Processes, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A successor handed blocking listening sockets by its predecessor serves many connections
    one after another and still stops on SIGTERM (it never sits in a blocking accept()).
    """
    port = freePort()
    monkeypatch.setenv("PORT", str(port))
    fake = procs.fakeSuccessor("old.sock", "predecessor:blocking")
    fake.waitFor(r"reached listening")
    successor = procs.server(["--takeover", "old.sock"], "successor")
    successor.pidfile = ""
    successor.start()
    fake.waitFor(r"successor accepting")
    successor.waitFor(r"took over from pid \d+")
    for _ in range(5):
        code, body = httpGet("127.0.0.1", port, "/", timeout=5)
        assert code == 200
    successor.signal(signal.SIGTERM)
    assert successor.wait(20) == 0
    assert "Traceback" not in successor.text()


