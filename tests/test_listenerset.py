"""
A generation's listener set (L{graceful_plugin.listenerset}) on real sockets of this process,
with a L{MemoryReactorClock}.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from graceful_plugin.control import CONTROL_KIND, takeoverBatch
from graceful_plugin.listeners import ListenerSpec, parseListener
from graceful_plugin.listenerset import ListenerSet


@pytest.fixture
def directory() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="gr-")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def _set(reactor: MemoryReactorClock, directory: str) -> ListenerSet:
    listeners = ListenerSet(reactor, Factory)
    web = listeners.bind(parseListener("web=tcp:0:interface=127.0.0.1"), Factory())
    api = listeners.bind(
        ListenerSpec(name="api", kind="unix", path=os.path.join(directory, "api.sock")),
        Factory(),
    )
    control = listeners.bindControl(os.path.join(directory, "c.sock"))
    listeners.install([web, api], control)
    return listeners


def _finish(reactor: MemoryReactorClock) -> None:
    # (Ports finish closing in a call the reactor runs next.)
    reactor.advance(0)


def test_boundNotAccepting(directory: str) -> None:
    """
    Bound listeners and the control listener listen but do not accept until resumed; pause
    stops every one of them again.
    """
    reactor = MemoryReactorClock()
    listeners = _set(reactor, directory)
    assert [p.kind for p in listeners.all()] == ["tcp", "unix", CONTROL_KIND]
    assert not any(p.accepting for p in listeners.all())
    listeners.resume()
    assert all(p.accepting for p in listeners.all())
    listeners.pause()
    assert not any(p.accepting for p in listeners.all())
    assert os.stat(os.path.join(directory, "c.sock")).st_mode & 0o777 == 0o600
    listeners.close()
    _finish(reactor)


def test_releaseKeepsPathsAndClosesDropped(directory: str) -> None:
    """
    A release leaves every Unix path in place (a successor serves there), except for the
    listeners it dropped, which are closed for good; the control listener is never dropped.
    """
    reactor = MemoryReactorClock()
    listeners = _set(reactor, directory)
    listeners.dropped = {"api", "control"}
    listeners.release()
    _finish(reactor)
    assert not any(p.connected for p in listeners.all())
    assert not os.path.exists(os.path.join(directory, "api.sock"))
    assert os.path.exists(os.path.join(directory, "c.sock"))
    assert listeners.closed().called


def test_closeUnlinks(directory: str) -> None:
    """
    Closing for good (the last generation) unlinks every Unix path.
    """
    reactor = MemoryReactorClock()
    listeners = _set(reactor, directory)
    listeners.close()
    _finish(reactor)
    assert os.listdir(directory) == []


def test_takeoverBatchCarriesEveryListenerControlLast(directory: str) -> None:
    """
    The TakeOver answer names every listener with its descriptor and spec, the control
    listener last, in one batch here; its size fits one AMP value.
    """
    reactor = MemoryReactorClock()
    listeners = _set(reactor, directory)
    answer = listeners.takeoverBatch(0)
    assert answer["next"] == -1
    entries = answer["listeners"]
    assert [e["name"] for e in entries] == ["web", "api", "control"]
    assert [e["fd"] for e in entries] == [p.fileno() for p in listeners.all()]
    assert entries[0]["spec"] == listeners.ports[0].spec.text  # type: ignore[union-attr]
    assert entries[0]["spec"].startswith("web=tcp:0:interface=127.0.0.1")
    assert entries[2]["kind"] == CONTROL_KIND
    assert takeoverBatch(entries) == entries
    listeners.close()
    _finish(reactor)


def test_statusBatchAndCounts(directory: str) -> None:
    """
    Status lists open listeners only, with their sessions and connection totals; session
    counts and the busiest listeners come from the trackers.
    """
    reactor = MemoryReactorClock()
    listeners = _set(reactor, directory)
    web, api = listeners.ports
    session = object()
    web.sessions.opened(session)
    assert listeners.sessions() == 1
    assert listeners.busiest() == [{"name": "web", "sessions": 1}]
    status = listeners.statusBatch(0, {"web": 7})
    assert status["next"] == -1
    assert [(e["name"], e["sessions"], e["connections"]) for e in status["listeners"]] == [
        ("web", 1, 7),
        ("api", 0, 0),
    ]
    api.close()
    _finish(reactor)
    assert [e["name"] for e in listeners.statusBatch(0, {})["listeners"]] == ["web"]
    web.sessions.closed(session)
    assert listeners.sessions() == 0
    listeners.close()
    _finish(reactor)


def test_bindFailureNamesTheListener(directory: str) -> None:
    """
    A listener that cannot be bound fails with a sentence naming it and its address.
    """
    reactor = MemoryReactorClock()
    listeners = ListenerSet(reactor, Factory)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on web \\(127.0.0.1:{port}\\)"):
            listeners.bind(parseListener(f"web=tcp:{port}:interface=127.0.0.1"), Factory())
    finally:
        taken.close()
