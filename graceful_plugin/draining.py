"""
The generations still draining behind the serving one, seen from the serving one.

A draining generation reports its live sessions to the successor it handed over to, and passes
on what its own predecessors report to it.  When a middle generation finishes first and exits,
the link that carried the older generations' reports goes with it: the serving generation keeps
what it last heard of them (as long as their processes live), and each of them, having lost its
own link, connects to the control path again and reports to whoever serves it now
(L{Upstream}).  So every generation still draining stays in the view (for status, watch, the
metrics and the C{--max-draining} check) however they finish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger

from graceful_plugin import pidfile

#: How often the view looks whether a generation it only remembers is still alive.
PRUNE_INTERVAL = 1.0

#: How long a draining generation waits before it tries the control path again.
RECONNECT_INTERVAL = 1.0

Entry = dict[str, Any]


class DrainingView:
    """
    Every generation still draining behind this one: what each link reported last, and what
    we remember of generations whose link has gone while their process lives on.

    @param clock: for the check on remembered generations.
    @param alive: whether a pid is a live process (not a zombie).
    @param onGone: called with an entry and how many seconds that generation drained, when a
        generation leaves the view (it exited).
    @param ownPid: our own pid, never listed.
    """

    def __init__(
        self,
        clock: Any,
        alive: Callable[[int], bool] = pidfile.alive,
        onGone: Callable[[Entry, float], None] | None = None,
        ownPid: int = 0,
    ) -> None:
        self.clock = clock
        self.alive = alive
        self.onGone = onGone
        self.ownPid = ownPid
        self._links: dict[Any, list[Entry]] = {}
        self._remembered: dict[int, Entry] = {}
        # pid -> (last entry, when we heard it, when we first heard of it)
        self._seen: dict[int, tuple[Entry, float, float]] = {}
        self._pruneCall: Any = None

    def _now(self) -> float:
        return float(self.clock.seconds())

    # -- links ----------------------------------------------------------------------------

    def addLink(self, link: Any) -> None:
        """
        C{link} will carry a draining generation's reports (it counts as one until it reports).
        """
        self._links.setdefault(link, [])

    def links(self) -> list[Any]:
        """
        Every link that carries reports: our predecessor's, and those of generations draining
        further behind that connected to us directly.
        """
        return list(self._links)

    def isLink(self, link: Any) -> bool:
        """
        Whether C{link} carries reports of draining generations.
        """
        return link in self._links

    def report(self, link: Any, entries: list[Entry]) -> None:
        """
        C{link} reports these generations (its own first, then those draining behind it).
        """
        now = self._now()
        # (Optional fields an older generation did not send arrive as None: leave them out.)
        kept = [
            {key: value for key, value in entry.items() if value is not None}
            for entry in entries
            if entry.get("pid") != self.ownPid
        ]
        self._links[link] = kept
        for entry in kept:
            pid = entry["pid"]
            self._remembered.pop(pid, None)
            first = self._seen[pid][2] if pid in self._seen else now
            self._seen[pid] = (entry, now, first)
        self._sync()

    def linkClosed(self, link: Any) -> bool:
        """
        C{link} has gone: the generation at its end has exited (or died); the generations it
        reported for are remembered while their processes live.

        @return: whether C{link} was one of ours.
        """
        entries = self._links.pop(link, None)
        if entries is None:
            return False
        for entry in entries[1:]:
            self._remembered[entry["pid"]] = entry
        self._sync()
        return True

    # -- reading --------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """
        Every generation draining behind us, once each.
        """
        self._prune()
        return self._current()

    def count(self) -> int:
        """
        How many generations are draining behind us (a link that has not reported yet counts as
        one).
        """
        self._prune()
        return len(self._current()) + sum(1 for entries in self._links.values() if not entries)

    def _current(self) -> list[Entry]:
        found: dict[int, Entry] = {}
        for entries in self._links.values():
            for entry in entries:
                found.setdefault(entry["pid"], entry)
        for pid, entry in self._remembered.items():
            found.setdefault(pid, entry)
        return list(found.values())

    # -- housekeeping ---------------------------------------------------------------------

    def _prune(self) -> None:
        for pid in [pid for pid in self._remembered if not self.alive(pid)]:
            del self._remembered[pid]
        self._sync()

    def _sync(self) -> None:
        """
        Tell of generations that left the view; keep looking at remembered ones.
        """
        now = self._now()
        current = {entry["pid"] for entry in self._current()}
        for pid in [pid for pid in self._seen if pid not in current]:
            entry, heardAt, firstAt = self._seen.pop(pid)
            since = entry.get("since")
            seconds = (since if since is not None else heardAt - firstAt) + (now - heardAt)
            if self.onGone is not None:
                self.onGone(entry, seconds)
        if self._remembered and self._pruneCall is None:
            self._pruneCall = self.clock.callLater(PRUNE_INTERVAL, self._pruneLater)

    def _pruneLater(self) -> None:
        self._pruneCall = None
        self._prune()

    def stop(self) -> None:
        """
        Stop looking at remembered generations.
        """
        if self._pruneCall is not None and self._pruneCall.active():
            self._pruneCall.cancel()
        self._pruneCall = None


class Upstream:
    """
    Where a draining generation sends its reports once the successor it handed over to has
    gone: a new connection to the control path, served by whichever generation serves now.

    @param server: the draining generation; L{Upstream} calls its C{reportTo(link)} with each
        new connection, and C{stillReporting()} to know whether to go on.
    @param makeProtocol: a new control protocol for the connection.
    """

    log = Logger()

    def __init__(
        self,
        server: Any,
        makeProtocol: Callable[[], Any],
        path: str,
        interval: float = RECONNECT_INTERVAL,
    ) -> None:
        self.server = server
        self.makeProtocol = makeProtocol
        self.path = path
        self.interval = interval
        self._pending: Any = None
        self._failures = 0

    def lost(self) -> None:
        """
        Our report link has gone: connect to the control path again (at once).
        """
        if self._pending is None:
            self._pending = self.server.reactor.callLater(0, self._connect)

    def _connect(self) -> None:
        self._pending = None
        if not self.server.stillReporting():
            return
        endpoint = UNIXClientEndpoint(self.server.reactor, self.path, timeout=5)
        d = connectProtocol(endpoint, self.makeProtocol())
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, link: Any) -> None:
        if self._failures:
            self.log.info("reporting to the serving generation at {path} again", path=self.path)
        self._failures = 0
        if not self.server.stillReporting():
            if link.transport is not None:
                link.transport.loseConnection()
            return
        self.server.reportTo(link)

    def _failed(self, failure: Any) -> None:
        if not self._failures:
            self.log.warn(
                "cannot report our sessions to the serving generation at {path}: {error};"
                " trying again every {interval:g} s",
                path=self.path,
                error=failure.getErrorMessage(),
                interval=self.interval,
            )
        self._failures += 1
        if self.server.stillReporting() and self._pending is None:
            self._pending = self.server.reactor.callLater(self.interval, self._connect)

    def stop(self) -> None:
        """
        Stop trying.
        """
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


#: Bytes of sessions-by-listener detail one list of entries may carry (one AMP value holds at
#: most 64 KiB, and the rest of each entry needs room too).
LISTENER_DETAIL_BUDGET = 24 * 1024


def fitEntries(entries: list[Entry], budget: int = LISTENER_DETAIL_BUDGET) -> list[Entry]:
    """
    C{entries} with their sessions by listener as long as the detail fits C{budget} bytes (about
    as AMP encodes them); past it, entries keep their totals only.
    """
    fitted: list[Entry] = []
    for entry in entries:
        detail = entry.get("listeners")
        if detail:
            cost = sum(len(item["name"].encode()) + 40 for item in detail)
            if cost > budget:
                entry = {key: value for key, value in entry.items() if key != "listeners"}
            else:
                budget -= cost
        fitted.append(entry)
    return fitted
