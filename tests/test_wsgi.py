"""
The WSGI environ on a Unix listener, over a L{StringTransport} with Unix addresses and a
synchronous thread pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport

from graceful_plugin.web import drainableSite
from graceful_plugin.wsgi import WSGIResource


class Synchronous:
    """
    A thread pool and a reactor that run what they are given at once, in this thread.
    """

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = json.dumps({key: environ.get(key) for key in KEYS}).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def environOver(peer: UNIXAddress, request: bytes) -> dict[str, Any]:
    sync = Synchronous()
    site = drainableSite(WSGIResource(sync, sync, app))
    protocol = site.buildProtocol(None)
    transport = StringTransport(hostAddress=UNIXAddress(b"/run/shop.sock"), peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    response = transport.value()
    assert response.split(b" ", 2)[1] == b"200", response[:300]
    return dict(json.loads(response.partition(b"\r\n\r\n")[2]))


def test_unnamedUnixPeer() -> None:
    """
    An unnamed Unix peer (a proxy's unbound socket) gets gunicorn's environ: empty REMOTE_ADDR,
    no REMOTE_PORT, SERVER_NAME from Host, SERVER_PORT 80.
    """
    environ = environOver(UNIXAddress(None), b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    assert environ == {
        "REMOTE_ADDR": "",
        "REMOTE_PORT": None,
        "SERVER_NAME": "shop.example",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }


def test_namedUnixPeerWithoutHost() -> None:
    """
    A Unix peer bound to a path is named by it in REMOTE_ADDR; without a Host header (HTTP/1.0)
    SERVER_NAME is the listening socket's path.
    """
    environ = environOver(UNIXAddress(b"/tmp/client.sock"), b"GET / HTTP/1.0\r\n\r\n")
    assert environ["REMOTE_ADDR"] == "/tmp/client.sock"
    assert environ["SERVER_NAME"] == "/run/shop.sock"
    assert environ["SERVER_PORT"] == "80"
