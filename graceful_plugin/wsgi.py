"""
WSGI on every listener kind: Twisted's C{WSGIResource} with an environ that is right for Unix
peers too.

C{twisted.web.wsgi} reads C{getClientAddress().host}, C{.port} and C{getHost().port}, which a
L{UNIXAddress} does not have: every request on a Unix listener failed with 500.  For a Unix
listener the environ follows gunicorn: C{REMOTE_ADDR} is the peer's socket path, or empty for
an unnamed peer (the usual case: a reverse proxy connecting with an unbound socket), there is
no C{REMOTE_PORT}, C{SERVER_NAME} comes from the C{Host} header (the listening path without
one) and C{SERVER_PORT} is the scheme's default, 80 or 443.  TCP (IPv4, IPv6 with its scope,
as in C{fe80::1%eth0}) and TLS listeners keep Twisted's environ, whose C{wsgi.url_scheme} is
C{https} on TLS.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.web import wsgi
from twisted.web.server import NOT_DONE_YET


def _pathText(address: UNIXAddress) -> str:
    name = address.name
    if not name:
        return ""
    if isinstance(name, bytes):
        return os.fsdecode(name)
    return str(name)


class _IPLike:
    """
    The C{host} and C{port} Twisted's environ reads, for a Unix address (fixed afterwards).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


class _WSGIResponse(wsgi._WSGIResponse):
    """
    Twisted's WSGI response (private in C{twisted.web.wsgi}: wrapped here only), with the
    environ fixed for Unix peers.
    """

    def __init__(self, reactor: Any, threadpool: Any, application: Any, request: Any) -> None:
        peer, host = request.getClientAddress(), request.getHost()
        if not isinstance(peer, UNIXAddress) and not isinstance(host, UNIXAddress):
            super().__init__(reactor, threadpool, application, request)
            return
        # Twisted's constructor reads .host and .port of both addresses, and the request's
        # hostname (the listening address's .host without a Host header): give it IP-like
        # stand-ins for the time it builds the environ (all in the reactor thread), then
        # correct the keys they produced.
        port = 443 if request.isSecure() else 80
        hostname = request.getHeader(b"host")
        request.getClientAddress = lambda: _IPLike("", 0)
        request.getHost = lambda: _IPLike(_pathText(host), port)
        try:
            super().__init__(reactor, threadpool, application, request)
        finally:
            del request.getClientAddress
            del request.getHost
        environ = self.environ
        environ["REMOTE_ADDR"] = _pathText(peer) if isinstance(peer, UNIXAddress) else ""
        environ.pop("REMOTE_PORT", None)
        environ["SERVER_PORT"] = str(port)
        if not hostname:
            environ["SERVER_NAME"] = _pathText(host)


class WSGIResource(wsgi.WSGIResource):
    """
    A C{WSGIResource} whose environ is right on Unix listeners as well as TCP and TLS ones.
    """

    def render(self, request: Any) -> Any:
        response = _WSGIResponse(self._reactor, self._threadpool, self._application, request)
        response.start()
        return NOT_DONE_YET
