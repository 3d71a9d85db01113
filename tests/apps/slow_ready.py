"""
A WSGI application that is ready only once the file named by ``GRACEFUL_TEST_READY_FILE`` exists
(a test creates it when it has seen what it wants to see meanwhile), one whose readiness fails,
and the demo application (``/bytes/N``, for load) that is ready only once the file exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from graceful_plugin.apps import IReady
from graceful_plugin.web import DemoRoot

log = Logger()


@implementer(IReady)
class SlowApp:
    """
    Answers ``slow app pid N``; ready when the file appears.
    """

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = b"slow app pid %d\n" % (os.getpid(),)
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def ready(self) -> Deferred[None]:
        path = os.environ["GRACEFUL_TEST_READY_FILE"]
        log.info("warming up until {path} exists", path=path)
        done: Deferred[None] = Deferred()

        def check() -> None:
            if os.path.exists(path):
                loop.stop()
                log.info("warmed up")
                done.callback(None)

        loop = LoopingCall(check)
        loop.start(0.05)
        return done


@implementer(IReady)
class BrokenApp(SlowApp):
    """
    Never ready: its readiness check fails.
    """

    def ready(self) -> Deferred[None]:
        log.info("checking the database")
        return fail(RuntimeError("the database is down"))


app = SlowApp()
broken = BrokenApp()


@implementer(IReady)
class SlowDemo(DemoRoot):
    """
    The demo application (``/`` and ``/bytes/N``), ready only once the file appears.
    """

    def __init__(self) -> None:
        super().__init__(lambda: 0)

    ready = SlowApp.ready


def slowDemo() -> SlowDemo:
    return SlowDemo()
