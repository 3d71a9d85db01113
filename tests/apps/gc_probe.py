"""
A Twisted web resource that says how many objects the collector has frozen in the process
serving it (``gc.get_freeze_count()``).
"""

from __future__ import annotations

import gc

from twisted.web import resource, server


class FreezeCount(resource.Resource):
    """
    ``GET /anything``: the serving process's frozen object count.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"%d\n" % (gc.get_freeze_count(),)


def makeRoot() -> resource.Resource:
    """
    The root resource (a callable, so --resource calls it at start-up).
    """
    return FreezeCount()
