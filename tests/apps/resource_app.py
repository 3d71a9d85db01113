"""
A Twisted web resource, given to ``--resource`` as a callable that builds it.
"""

from __future__ import annotations

import os

from twisted.web import resource, server


class Hello(resource.Resource):
    """
    ``GET /anything``: which process answered.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"resource pid %d\n" % (os.getpid(),)


def makeRoot() -> resource.Resource:
    """
    The root resource (a callable, so --resource calls it at start-up).
    """
    return Hello()
