"""
A WSGI application for streaming in both directions: ``POST`` reads a whole request body and
answers its length and SHA-256; ``GET /bytes/N`` streams N bytes of ``x``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_CHUNK = b"x" * 65536


def _stream(size: int) -> Iterator[bytes]:
    while size > 0:
        n = min(size, len(_CHUNK))
        size -= n
        yield _CHUNK if n == len(_CHUNK) else _CHUNK[:n]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """
    Upload or download, as the method says.
    """
    if environ["REQUEST_METHOD"] == "GET":
        size = int(environ["PATH_INFO"].rsplit("/", 1)[-1] or 0)
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
        )
        return _stream(size)
    digest = hashlib.sha256()
    received = 0
    body = environ["wsgi.input"]
    while chunk := body.read(1 << 20):
        digest.update(chunk)
        received += len(chunk)
    answer = b"pid %d bytes %d sha256 %s\n" % (os.getpid(), received, digest.hexdigest().encode())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))])
    return [answer]
