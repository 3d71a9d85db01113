"""
Drain callbacks on a connection (L{DrainCallbacks}): shared by the HTTP/1.x channel
(L{graceful_plugin.web}) and the HTTP/2 connection (L{graceful_plugin.http2}), so that neither
imports the other back.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

_log = Logger()


class DrainCallbacks:
    """
    Callbacks an application registers (with L{whenDraining}) on the connection that carries a
    long response, called once when the connection's generation starts draining.
    """

    _drainCallbacks: list[Callable[[], object]] | None = None
    _drainFired = False

    def addDrainCallback(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} when draining starts, or now if it has.
        """
        if self._drainFired:
            callback()
            return
        if self._drainCallbacks is None:
            self._drainCallbacks = []
        self._drainCallbacks.append(callback)

    def _fireDrainCallbacks(self) -> None:
        if self._drainFired:
            return
        self._drainFired = True
        callbacks, self._drainCallbacks = self._drainCallbacks or [], None
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.failure("a drain callback failed")
