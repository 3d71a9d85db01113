"""
An autobahn|Twisted WebSocket application, built for a version: ``/`` names the version and
pid over HTTP, ``/ws`` is a WebSocket that greets with it and echoes.
"""

from __future__ import annotations

import os
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web import resource, server


def make(version: str) -> Any:
    """
    A callable returning the root resource of C{version} (for ``--resource``).
    """

    class Echo(WebSocketServerProtocol):
        def onOpen(self) -> None:
            self.sendMessage(f"ws v{version} pid {os.getpid()}".encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(b"v" + version.encode() + b": " + payload, isBinary)

    class Root(resource.Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            if path == b"":
                return self
            return super().getChild(path, request)

        def render_GET(self, request: server.Request) -> bytes:
            request.setHeader(b"content-type", b"text/plain")
            return f"ws v{version} pid {os.getpid()}\n".encode()

    def root() -> Any:
        factory = WebSocketServerFactory()
        factory.protocol = Echo
        top = Root()
        top.putChild(b"ws", WebSocketResource(factory))
        return top

    return root
