"""
A WSGI application, version 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

VERSION = b"1"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """
    Answer which version and process served the request.
    """
    body = b"wsgi v%s pid %d path %s\n" % (VERSION, os.getpid(), environ["PATH_INFO"].encode())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


notAnApp = 42
