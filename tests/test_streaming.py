"""
Streaming across a takeover: a long download and a large upload in flight on the old generation
complete intact; a response still running at the drain deadline is cut and logged with its
method, path, peer and the bytes of it sent.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from graceful_plugin.sessions import IInFlight, SessionTracker
from graceful_plugin.web import drainableSite
from tests.procs import Processes, freePort

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}


class _Stream(resource.Resource):
    """
    Writes 1,000 bytes of a response that never ends.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> object:
        request.write(b"x" * 1000)
        return server.NOT_DONE_YET

    def render_POST(self, request: server.Request) -> bytes:
        return b"done"


class InFlightTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, object]] = []
        self.tracker = SessionTracker()
        self.tracker.log = Logger(observer=self.events.append)  # type: ignore[misc]

    def connect(self, peer: object = None) -> tuple[object, StringTransport]:
        peer = peer or IPv4Address("TCP", "10.0.0.7", 40000)
        site = drainableSite(_Stream(), reactor=self.clock)
        channel = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        transport.protocol = channel  # type: ignore[attr-defined]
        channel.makeConnection(transport)
        self.tracker.opened(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def cuts(self) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e["log_level"] == LogLevel.warn and "cut" in str(e["log_format"])
        ]

    def test_responseCutIsLogged(self) -> None:
        """
        A response still being written when the deadline cuts its connection is logged with
        its method, path, peer and the bytes of its body sent.
        """
        channel, transport = self.connect()
        verifyObject(IInFlight, channel)
        channel.dataReceived(b"GET /stream/1?q=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.tracker.abortAll(), 1)
        self.assertEqual(
            self.cuts(),
            [
                "drain deadline: cut GET /stream/1?q=2 from 10.0.0.7:40000 after 1000 bytes of its"
                " response"
            ],
        )
        [event] = [e for e in self.events if "cut" in str(e["log_format"])]
        self.assertEqual((event["path"], event["sent"]), ("/stream/1?q=2", 1000))

    def test_uploadCutIsLogged(self) -> None:
        """
        A request whose body is still arriving is logged as such, on a Unix peer too.
        """
        channel, transport = self.connect(UNIXAddress(b"/run/app.sock"))
        channel.dataReceived(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 500
        )
        self.tracker.abortAll()
        self.assertEqual(
            self.cuts(),
            [
                "drain deadline: cut POST /upload from unix:/run/app.sock while its request body"
                " was arriving"
            ],
        )

    def test_idleConnectionCutSilently(self) -> None:
        """
        A keep-alive connection between requests has nothing in flight: it is aborted (and
        counted) without a line of its own.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertIn(b"done", transport.value())
        self.assertEqual(self.tracker.abortAll(), 1)
        self.assertEqual(self.cuts(), [])


def _takeover(procs: Processes, first: object, args: list[str]) -> object:
    successor = procs.server(["--takeover", "c.sock", *args], "gen2").start(ENV)
    successor.waitFor(r"took over from pid %d" % first.pid)  # type: ignore[attr-defined]
    first.waitFor(r"generation 1 draining")  # type: ignore[attr-defined]
    return successor


def _headers(sock: socket.socket) -> tuple[bytes, bytes]:
    """
    Read a response's headers; them and whatever of the body came with them.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


@pytest.mark.slow
def test_downloadAndUploadSpanATakeover(procs: Processes, workdir: Path) -> None:
    """
    A 100 MB download from a WSGI application, read slowly, and a 50 MB POST to it, both started
    before a takeover (the upload half sent) and finished after the successor serves, complete
    intact on the old generation, which then exits 0 without reaching its drain deadline.
    """
    port = freePort()
    listen = ["--port", f"tcp:{port}:interface=127.0.0.1", "--control", "c.sock"]
    app = ["--wsgi", "tests.apps.upload.app"]
    first = procs.server([*listen, *app, "--drain-timeout", "120"], "gen1").start(ENV)
    first.waitServing()
    size, upload = 100 * 1024 * 1024, 50 * 1024 * 1024
    payload = os.urandom(1024 * 1024)
    expected = hashlib.sha256(payload * (upload // len(payload))).hexdigest()

    download = socket.create_connection(("127.0.0.1", port), timeout=30)
    download.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head, body = _headers(download)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head, head
    received = len(body)
    while received < 1024 * 1024:
        received += len(download.recv(65536))

    post = socket.create_connection(("127.0.0.1", port), timeout=30)
    post.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % upload)
    sent = 0
    while sent < upload // 2:
        post.sendall(payload)
        sent += len(payload)

    # The takeover, with the download and the upload under way.
    successor = _takeover(procs, first, app)

    while sent < upload:
        post.sendall(payload)
        sent += len(payload)
    head, answer = _headers(post)
    while not answer.endswith(b"\n"):
        chunk = post.recv(65536)
        assert chunk, answer
        answer += chunk
    post.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert answer == b"pid %d bytes %d sha256 %s\n" % (first.pid, upload, expected.encode())

    while True:
        chunk = download.recv(1024 * 1024)
        if not chunk:
            break
        assert chunk.count(b"x") == len(chunk)
        received += len(chunk)
    download.close()
    assert received == size

    assert first.wait(60) == 0, first.text()[-3000:]
    assert "drain deadline passed" not in first.text()
    assert successor.process.poll() is None  # type: ignore[attr-defined]


@pytest.mark.slow
def test_responseAtDeadlineLoggedWithPathAndBytes(procs: Processes, workdir: Path) -> None:
    """
    A download the client stops reading is cut at the drain deadline, and the old generation's
    log names its method, path, peer and the bytes of it sent, at least what the client got.
    """
    port = freePort()
    first = procs.server(
        [
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--control",
            "c.sock",
            "--drain-timeout",
            "1",
        ],
        "gen1",
    ).start(ENV)
    first.waitServing()
    size = 1 << 30
    download = socket.create_connection(("127.0.0.1", port), timeout=30)
    download.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head, body = _headers(download)
    local = download.getsockname()
    _takeover(procs, first, [])
    match = first.waitFor(
        r"drain deadline: cut GET /bytes/%d from 127\.0\.0\.1:%d after (\d+) bytes of its"
        r" response" % (size, local[1])
    )
    assert first.wait(30) == 0
    received = len(body)
    try:
        while chunk := download.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    download.close()
    assert 0 < received <= int(match.group(1)) < size
    assert re.search(r"drain deadline passed: closed 1 sessions still open", first.text())
