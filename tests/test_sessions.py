"""
Counting live sessions and telling them to drain: L{SessionTracker} and L{drainableOf}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer
from zope.interface.verify import verifyObject

from graceful_plugin.sessions import IDrainable, IHandOver, SessionTracker, drainableOf


@implementer(IDrainable)
class Drainable(Protocol):
    def __init__(self, fails: bool = False) -> None:
        self.drained = 0
        self.fails = fails

    def drain(self) -> None:
        self.drained += 1
        if self.fails:
            raise RuntimeError("cannot drain")


class Session(StringTransport):
    """
    A connection transport with a protocol, as a port's transports have.
    """

    def __init__(self, protocol: Any = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


def wrap(protocol: Protocol, times: int) -> Protocol:
    for _ in range(times):
        protocol = ProtocolWrapper(WrappingFactory(None), protocol)
    return protocol


def test_fakeIsDrainable() -> None:
    """
    The test's drainable protocol provides IDrainable.
    """
    assert verifyObject(IDrainable, Drainable())


def test_drainableOfDirect() -> None:
    """
    A drainable protocol is its own drainable; a plain one and None have none.
    """
    protocol = Drainable()
    assert drainableOf(protocol) is protocol
    assert drainableOf(Protocol()) is None
    assert drainableOf(None) is None


def test_drainableOfThroughWrappers() -> None:
    """
    drainableOf looks through wrapping protocols (policies, TLS) to the drainable inside.
    """
    inner = Drainable()
    assert drainableOf(wrap(inner, 1)) is inner
    assert drainableOf(wrap(inner, 5)) is inner
    assert drainableOf(wrap(Protocol(), 3)) is None


def test_drainableOfStopsAfterEightWrappers() -> None:
    """
    drainableOf gives up after eight layers, so a wrapper cycle cannot loop forever.
    """
    wrapper = ProtocolWrapper(WrappingFactory(None), Protocol())
    wrapper.wrappedProtocol = wrapper
    assert drainableOf(wrapper) is None
    assert drainableOf(wrap(Drainable(), 9)) is None


def test_countAndObservers() -> None:
    """
    The count follows opened and closed connections, and every observer hears every change.
    """
    tracker = SessionTracker()
    seen: list[int] = []
    tracker.observe(lambda: seen.append(tracker.count))
    a, b = Session(), Session()
    tracker.opened(a)
    tracker.opened(b)
    tracker.closed(a)
    tracker.closed(a)
    tracker.closed(b)
    assert tracker.count == 0
    assert seen == [1, 2, 1, 1, 0]


def test_observerAddedWhileTellingHearsTheNextChange() -> None:
    """
    An observer added by another while a change is being told hears the changes after it, not
    that one, and the others still hear every change.
    """
    tracker = SessionTracker()
    first: list[int] = []
    late: list[int] = []

    def addLate() -> None:
        first.append(tracker.count)
        if len(first) == 1:
            tracker.observe(lambda: late.append(tracker.count))

    tracker.observe(addLate)
    a, b = Session(), Session()
    tracker.opened(a)
    tracker.opened(b)
    tracker.closed(a)
    assert first == [1, 2, 1]
    assert late == [2, 1]


def test_drainTellsDrainableSessions() -> None:
    """
    drain() tells every live drainable session (through wrappers) once and skips others.
    """
    tracker = SessionTracker()
    direct, wrapped = Drainable(), Drainable()
    tracker.opened(Session(direct))
    tracker.opened(Session(wrap(wrapped, 2)))
    tracker.opened(Session(Protocol()))
    tracker.opened(Session(None))
    tracker.drain()
    assert (direct.drained, wrapped.drained) == (1, 1)
    assert tracker.count == 4


@implementer(IHandOver)
class Busy(Drainable):
    """
    A drainable protocol that can be handed over once idle (an HTTP/1.x channel answering).
    """

    def __init__(self) -> None:
        super().__init__()
        self.later: Any = None

    def idleForHandover(self) -> bool:
        return False

    def offerWhenIdle(self, offer: Any) -> None:
        self.later = offer


def test_busySessionIsOfferedAgainOnceIdle() -> None:
    """
    drain(handOver) offers every session; one that is busy (not taken) is drained and told
    how to offer itself once idle: that later offer reaches handOver with its own transport.
    """
    tracker = SessionTracker()
    busy = Busy()
    assert verifyObject(IHandOver, busy)
    session = Session(wrap(busy, 1))
    tracker.opened(session)
    offered: list[Any] = []

    def handOver(transport: Any) -> bool:
        offered.append(transport)
        return len(offered) > 1

    tracker.drain(handOver)
    assert offered == [session] and busy.drained == 1
    assert busy.later() is True
    assert offered == [session, session]
    # Without a successor to hand over to, nobody is told to offer later.
    other = Busy()
    alone = SessionTracker()
    alone.opened(Session(other))
    alone.drain()
    assert other.drained == 1 and other.later is None


def test_failingDrainIsLoggedAndOthersStillDrain() -> None:
    """
    A session whose drain() raises is logged as a failure; the others are still told.
    """
    tracker = SessionTracker()
    bad, good = Drainable(fails=True), Drainable()
    tracker.opened(Session(bad))
    tracker.opened(Session(good))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        tracker.drain()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert good.drained == 1
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)


def test_abortAll() -> None:
    """
    abortAll aborts every live session and says how many.
    """
    tracker = SessionTracker()
    sessions = [Session(), Session(), Session()]
    for s in sessions:
        tracker.opened(s)
    tracker.closed(sessions[0])
    assert tracker.abortAll() == 2
    assert [s.aborted for s in sessions] == [False, True, True]
