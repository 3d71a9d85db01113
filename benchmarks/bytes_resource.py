"""A twisted.web resource serving exactly N bytes at ``/bytes/N``, for the benchmark servers.

It behaves as graceful's demo app does (a Content-Length, the body streamed by a pull producer),
so the benchmarks compare the servers, not two ways of writing a body:
``twistd -n web --class bytes_resource.BytesRoot`` (with this folder on ``PYTHONPATH``) serves it,
and so does ``reuseport_server.py``.
"""

from twisted.internet import interfaces
from twisted.web import resource, server
from zope.interface import implementer

CHUNK = 64 * 1024
"""Bodies are streamed in pieces of this size, as the demo app does."""

_FILLER = b"x" * CHUNK


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Write ``remaining`` filler bytes to a request, one chunk each time the transport asks."""

    def __init__(self, request: server.Request, remaining: int) -> None:
        self._request = request
        self._remaining = remaining

    def resumeProducing(self) -> None:
        """Write the next chunk, or finish the request once the whole body is out."""
        if self._remaining <= 0:
            self._request.unregisterProducer()
            self._request.finish()
            return
        piece = min(CHUNK, self._remaining)
        self._remaining -= piece
        self._request.write(_FILLER[:piece])

    def stopProducing(self) -> None:
        """Nothing to release: after a lost connection the transport asks for no more."""


class BytesRoot(resource.Resource):
    """Answer ``GET /bytes/N`` with N filler bytes and a Content-Length; anything else is 404."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes | int:
        """Stream the body through a pull producer, an empty one written at once."""
        path = request.postpath or []
        if len(path) != 2 or path[0] != b"bytes":
            request.setResponseCode(404)
            return b"not found\n"
        try:
            size = int(path[1])
        except ValueError:
            size = -1
        if size < 0:
            request.setResponseCode(400)
            return b"size must be a non-negative integer\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % size)
        if size == 0:
            return b""
        request.registerProducer(_BodyProducer(request, size), False)
        return server.NOT_DONE_YET
